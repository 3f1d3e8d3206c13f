"""Compiling a planned launch for a chosen GPU architecture, with or without a GPU present.

The PTX comes from :func:`numba_ce.launcher.compile_ptx`, the function that compiles the kernels
the GPU path launches, so it is the code that runs (numba_ce.ptx_edits' edits included). Numba
compiles a kernel's device functions for the compute capability its current device reports:
while compiling, that device is replaced by one reporting the chosen architecture, which also
makes compiling work on a machine without a GPU.
"""
import contextlib
import functools
import re
import types
from typing import NamedTuple

from numba import cuda

from .. import launcher
from ..devices import MIN_CAPABILITY
from ..portable import SIMULATOR
from . import tools
from .launches import DEFAULT_SHAPE, PLAIN, Launch, planned_launch

OFFLINE_ARCH = (9, 0)  # compiled for when no GPU is visible: the H200's


def require_compiler():
    if SIMULATOR:
        raise RuntimeError(
            "compiling for a GPU needs a process without NUMBA_ENABLE_CUDASIM=1 (it is set "
            "here, and the CUDA simulator has no compiler): unset it, e.g. "
            "`env -u NUMBA_ENABLE_CUDASIM python -m numba_ce inspect ...`")


def parse_arch(text):
    """(major, minor) from a name like 'sm_90', sm_80 or newer; None gives :func:`default_arch`."""
    if text is None:
        return default_arch()
    match = re.fullmatch(r"sm_(\d+)(\d)", str(text))
    if match is None:
        raise ValueError(f"arch must be a name like sm_90 or sm_80 (got {text!r})")
    capability = int(match.group(1)), int(match.group(2))
    if capability < MIN_CAPABILITY:
        raise ValueError(f"arch must be {arch_name(MIN_CAPABILITY)} or newer, where the kernels' "
                         f"cp.async and bf16 conversion instructions exist (got {text})")
    return capability


def arch_name(capability):
    return f"sm_{capability[0]}{capability[1]}"


def default_arch():
    """The visible GPU's compute capability, or sm_90 when there is none."""
    require_compiler()
    return cuda.get_current_device().compute_capability if cuda.is_available() else OFFLINE_ARCH


def describe_arch(capability):
    """The architecture and where it came from, for report headers."""
    require_compiler()
    if cuda.is_available():
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        if device.compute_capability == capability:
            return f"{arch_name(capability)} (the visible GPU, {name})"
        visible = arch_name(device.compute_capability)
        return f"{arch_name(capability)} (compiled offline; the visible GPU, {name}, is {visible})"
    return f"{arch_name(capability)} (compiled offline: no GPU visible)"


class Compiled(NamedTuple):
    launch: Launch
    capability: tuple
    ptx: str
    entry: str  # the PTX entry's (mangled) name

    @property
    def assembly(self):
        """ptxas's cubin and ``-v`` report (:class:`numba_ce.inspection.tools.Assembly`)."""
        return tools.assemble(self.ptx, arch_name(self.capability))


def compiled(kernel, dtype="bfloat16", arch=None, shape=DEFAULT_SHAPE, variant=PLAIN):
    """The :class:`Compiled` kernel ``kernel`` (a name from ``kernel_names()``) as a call on
    ``shape`` logits of ``dtype`` with the options of ``variant`` (launches.Variant) launches it,
    for ``arch`` ('sm_90'; default: the visible GPU, else sm_90)."""
    require_compiler()
    capability = parse_arch(arch)
    launch = planned_launch(kernel, dtype, shape, variant)
    ptx, entry = compile_signature(launch.kernel, launch.signature, capability)
    return Compiled(launch, capability, ptx, entry)


@functools.lru_cache(maxsize=None)
def compile_signature(kernel, signature, capability):
    """(PTX, entry name) of a Numba kernel for a tuple of argument types and a compute
    capability, by :func:`numba_ce.launcher.compile_ptx`, with or without a GPU."""
    require_compiler()
    with _current_device_reports(capability):
        return launcher.compile_ptx(kernel, signature, capability)


@contextlib.contextmanager
def _current_device_reports(capability):
    """Numba's dispatcher sees a device of compute capability ``capability`` meanwhile."""
    from numba.cuda import dispatcher

    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: types.SimpleNamespace(
        compute_capability=capability, name=f"{arch_name(capability)} (compiling)")
    try:
        yield
    finally:
        dispatcher.get_current_device = real


def sass(kernel, dtype="bfloat16", arch=None, shape=DEFAULT_SHAPE, variant=PLAIN):
    """The SASS of ``kernel`` compiled as in :func:`compiled`, by nvdisasm or cuobjdump."""
    return tools.disassemble(compiled(kernel, dtype, arch, shape, variant).assembly.cubin)
