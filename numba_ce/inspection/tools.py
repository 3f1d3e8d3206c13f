"""The CUDA tools of kernel inspection: the compilers numba-cuda loads (NVVM, NVRTC), ptxas (PTX
-> cubin, and the resource report), nvdisasm or cuobjdump (cubin -> SASS). Found in NVIDIA's pip
wheels, conda, CUDA_PATH / CUDA_HOME or the toolkit of the loaded CUDA runtime (all by
cuda.pathfinder), tools then on PATH; a missing one names the ``inspect`` extra, which installs
them all."""
import functools
import os
import re
import shutil
import subprocess
import tempfile
from typing import NamedTuple

INSTALL_HINT = "pip install 'numba_ce[inspect]'"
WHERE_SEARCHED = "NVIDIA wheels, conda, CUDA_PATH/CUDA_HOME, the CUDA runtime's toolkit"
LIBRARIES = {"nvvm": "NVVM", "nvrtc": "NVRTC"}  # what numba-cuda compiles with
DISASSEMBLERS = ("nvdisasm", "cuobjdump")


class ToolMissing(RuntimeError):
    """A CUDA tool is not installed; the message names the extra that installs it."""


def _locate(name):
    from cuda.pathfinder import find_nvidia_binary_utility

    return find_nvidia_binary_utility(name) or shutil.which(name)


def _loadable(library):
    """Whether the CUDA library ``library`` (a key of LIBRARIES) loads as numba-cuda loads it."""
    from cuda.pathfinder import DynamicLibNotFoundError, load_nvidia_dynamic_lib

    try:
        load_nvidia_dynamic_lib(library)
    except DynamicLibNotFoundError:
        return False
    return True


def require_compilers():
    """Raise ToolMissing unless NVVM and NVRTC load (numba-cuda needs both to compile)."""
    for library, name in LIBRARIES.items():
        if not _loadable(library):
            raise ToolMissing(f"{name} (lib{library}), which compiling the kernels needs, was not "
                              f"found ({WHERE_SEARCHED}, the system's libraries); to install it "
                              f"and the other tools: {INSTALL_HINT}")


def find_tool(name):
    """The path of CUDA binary tool ``name`` (ptxas)."""
    path = _locate(name)
    if path is None:
        raise ToolMissing(f"{name} was not found ({WHERE_SEARCHED}, PATH); to install it and the "
                          f"other tools: {INSTALL_HINT}")
    return path


def find_disassembler():
    """The path of nvdisasm, else of cuobjdump."""
    for name in DISASSEMBLERS:
        path = _locate(name)
        if path is not None:
            return path
    raise ToolMissing(f"SASS needs nvdisasm or cuobjdump, and neither was found ({WHERE_SEARCHED}, "
                      f"PATH); to install nvdisasm and the other tools: {INSTALL_HINT}")


class Assembly(NamedTuple):
    cubin: bytes
    report: str  # what ptxas -v printed


@functools.lru_cache(maxsize=64)
def assemble(ptx, arch):
    """ptxas -v --gpu-name ``arch`` on ``ptx``: the cubin and the resource report."""
    ptxas = find_tool("ptxas")
    with tempfile.TemporaryDirectory() as folder:
        source, cubin = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        report = _run([ptxas, "-v", "--gpu-name", arch, "-o", cubin, source])
        with open(cubin, "rb") as f:
            return Assembly(f.read(), report)


def disassemble(cubin):
    """The SASS of a cubin, by nvdisasm or else cuobjdump -sass."""
    tool = find_disassembler()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        if os.path.basename(tool).startswith("nvdisasm"):
            return _run([tool, "-c", path])
        return _run([tool, "-sass", path])


def _run(command):
    """stdout + stderr of a tool; RuntimeError with its output when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


class PtxasReport(NamedTuple):
    registers: int      # per thread
    shared_bytes: int   # static shared memory per block
    local_bytes: int    # local memory per thread: the stack frame, where spills go too
    spill_stores: int   # bytes
    spill_loads: int    # bytes
    barriers: int


def parse_report(report, entry):
    """The numbers ptxas -v gives for kernel ``entry``, from lines like
        ptxas info    : Function properties for <entry>
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 64 registers, used 1 barriers, 256 bytes smem
    """
    properties = re.search(rf"Function properties for {re.escape(entry)}\n(.*)\n", report)
    usage = re.search(rf"Compiling entry function '{re.escape(entry)}'.*?\n"
                      r"([^\n]*Used \d+ registers[^\n]*)", report, re.DOTALL)
    if properties is None or usage is None:
        raise ValueError(
            f"ptxas's report lacks the properties or registers of {entry!r}:\n{report}")
    frame, used = properties.group(1), usage.group(1)

    def number(pattern, text):
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    return PtxasReport(
        registers=number(r"Used (\d+) registers", used),
        shared_bytes=number(r"(\d+) bytes smem", used),
        local_bytes=(number(r"(\d+) bytes stack frame", frame)
                     + number(r"(\d+) bytes lmem", used)),
        spill_stores=number(r"(\d+) bytes spill stores", frame),
        spill_loads=number(r"(\d+) bytes spill loads", frame),
        barriers=number(r"used (\d+) barriers", used),
    )
