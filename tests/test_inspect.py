"""The inspect and roofline commands and the numba_ce.inspection module.

Compiling is impossible with the simulator on, so the inspect command runs in a subprocess
without NUMBA_ENABLE_CUDASIM (it compiles offline for sm_90); the parts that need no compiler
(ptxas report parsing, occupancy, roofline, missing-tool hints, kernel sources) run here.
"""
import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from numba_ce import devices, inspection, teaching
from numba_ce.__main__ import main
from numba_ce.inspection import occupancy, roofline, tools
from numba_ce.inspection.launches import DTYPES, KERNELS, numpy_dtype
from numba_ce.portable import SIMULATOR

ROOT = pathlib.Path(__file__).resolve().parents[1]


def kernels_of(dtype, packed_only=False):
    """The kernels the dtype changes that exist for it (only those reading packed words)."""
    return tuple(name for name, spec in KERNELS.items() if spec.per_dtype and
                 dtype in spec.dtypes and (spec.packed or not packed_only))


# Each dtype's kernels, with the dtype-independent kernels in the bfloat16 run: one process
# each, for the command's default shape (4096 x 128256: packed 8-byte loads).
GROUPS = {dtype: kernels_of(dtype) for dtype in DTYPES}
GROUPS["bfloat16"] += tuple(name for name, spec in KERNELS.items() if not spec.per_dtype)


@functools.lru_cache(maxsize=None)
def inspect_command(kernels, dtype, *sections):
    """The sections {title: text} that `python -m numba_ce inspect` prints for sm_90, run in a
    process without the simulator."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    args = [f"--kernel={k}" for k in kernels] + [f"--dtype={dtype}", "--arch=sm_90", *sections]
    done = subprocess.run([sys.executable, "-m", "numba_ce", "inspect", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"inspect {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    parts = re.split(r"^===== (.*) =====$", done.stdout, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def table_rows(text):
    """The resource table as {kernel: {column: cell}} (columns are 2+ spaces apart)."""
    header, *lines = text.strip().splitlines()
    columns = re.split(r"\s{2,}", header)
    rows = [dict(zip(columns, re.split(r"\s{2,}", line))) for line in lines]
    return {row["kernel"]: row for row in rows}


def require_ptxas():
    try:
        tools.find_tool("ptxas")
    except tools.ToolMissing as missing:
        pytest.skip(f"the resource table needs ptxas: {missing}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_element_a_word_row_kernels_have_no_f64_and_spill_little(dtype):
    """An odd V gives the other specialisation of each row kernel: one element a load."""
    require_ptxas()
    packed = kernels_of(dtype, packed_only=True)
    parts = inspect_command(packed, dtype, "--shape", "4096", "128257", "--ptx", "--resources")
    rows = table_rows(parts["resources: sm_90"])
    for name in packed:
        ptx = parts[f"PTX: {name} {dtype} sm_90"]
        assert ".f64" not in ptx, f"{name} {dtype}: float64 in its PTX"
        assert rows[name]["pack"] == "1", rows[name]
        assert local_bytes(rows[name]) <= (MAX_GRADIENT_SPILL if name == "fused" else 0), rows[name]
        assert not conversion_problems(name, dtype, ptx, KERNELS[name].rounds)


@pytest.mark.parametrize("dtype", GROUPS)
def test_inspect_command_prints_sm90_ptx_and_resources(dtype):
    require_ptxas()
    kernels = GROUPS[dtype]
    parts = inspect_command(kernels, dtype, "--ptx", "--resources")
    rows = table_rows(parts["resources: sm_90"])
    problems = []
    for name in kernels:
        label = f"{name} {dtype}" if KERNELS[name].per_dtype else name
        ptx = parts[f"PTX: {label} sm_90"]
        if ".target sm_90" not in ptx:
            problems.append(f"{label}: no .target sm_90 in its PTX")
        doubles = [line.strip() for line in ptx.splitlines() if ".f64" in line]
        if doubles:
            problems.append(f"{label}: float64 in its PTX: {doubles[:3]}")
        row = rows[name]
        if not int(row["registers"]) > 0:
            problems.append(f"{label}: no registers in {row}")
        if local_bytes(row) > (MAX_GRADIENT_SPILL if name == "fused" else 0):
            problems.append(f"{label} uses local memory: {row['local']} a thread, spill "
                            f"stores/loads {row['spills st/ld']} ({row['registers']} registers)")
        # the default shape's rows fill whole 8-byte words: packed loads
        if KERNELS[name].packed and row["pack"] != str(8 // numpy_dtype(dtype).itemsize):
            problems.append(f"{label}: expected packed loads, got pack {row['pack']}")
        problems += conversion_problems(label, dtype, ptx, KERNELS[name].rounds)
        # 4096 x 128256: two blocks' uncached words (140 KB a bf16 row) fit in the 50 MiB L2,
        # float32 rows (397 KB uncached) take one block of 1024 (planning.CACHED_BLOCKS_PER_SM)
        expected_blocks = ("1024", "1") if dtype == "float32" else ("512", "2")
        if name == "fused" and (row["block"], row["blocks/SM"]) != expected_blocks:
            problems.append(f"{label}: block, blocks/SM {row['block']}, {row['blocks/SM']}; "
                            f"expected {expected_blocks}")
    if dtype == "bfloat16":  # the walkthrough's excerpt is of this PTX: checked here, compiled once
        problems += walkthrough_excerpt_problems(parts["PTX: fused bfloat16 sm_90"])
    assert not problems, "\n".join(problems)


# The gradient kernels at 64 registers spill a few per-row values (read once a row, outside the
# loops over the words; WALKTHROUGH.md section 7): 16-32 bytes by CUDA 12's ptxas here, 36 by the
# H200 machine's CUDA 13 (one element a word, float32: 8 bytes here); more would mean spills
# inside the loops.
MAX_GRADIENT_SPILL = 48


def local_bytes(row):
    """The larger of a resource-table row's local memory and its spill stores, in bytes."""
    stores = row["spills st/ld"].split("/")[0]
    return max(int(row["local"].split()[0]), int(stores))


def conversion_problems(label, dtype, ptx, rounds):
    """A kernel that rounds to bf16 must use a bf16 conversion (cvt.rn.bf16.f32, or
    cvt.rn.bf16x2.f32 for pairs) and nothing of fp16; an fp16 one, an fp16 conversion."""
    if not rounds or dtype == "float32":
        return []
    prefix = {"bfloat16": "cvt.rn.bf16", "float16": "cvt.rn.f16"}[dtype]
    conversions = set(re.findall(r"cvt\.rn\.b?f16(?:x2)?\.f32", ptx))
    problems = [] if {prefix + ".f32", prefix + "x2.f32"} & conversions else [
        f"{label}: no {prefix}.f32 or {prefix}x2.f32 in its PTX"]
    if dtype == "bfloat16" and any(".f16" in c for c in conversions):
        problems.append(f"{label}: an fp16 conversion in a bf16 kernel's PTX")
    return problems


def instructions(code):
    """The mnemonics of the PTX statements in ``code`` (several a line in inline-asm braces)."""
    return set(re.findall(r"(?:^|[;{])\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", code, re.M))


def walkthrough_excerpt_problems(ptx):
    """The instructions WALKTHROUGH.md shows that the fused bf16 kernel's ``ptx`` lacks."""
    present = instructions("\n".join(line.split("//")[0] for line in ptx.splitlines()))
    walkthrough = pathlib.Path(teaching.__file__).with_name("WALKTHROUGH.md").read_text()
    shown = set()
    for block in re.findall(r"^```ptx\n(.*?)^```", walkthrough, re.M | re.S):
        shown |= instructions("\n".join(line.split("//")[0] for line in block.splitlines()))
    if not shown:
        return ["WALKTHROUGH.md has no ptx excerpt"]
    missing = sorted(shown - present)
    return [f"WALKTHROUGH.md shows instructions that the fused bf16 PTX no longer has: "
            f"{missing}; update the excerpt"] if missing else []


def test_inspect_compiles_the_option_specialisations():
    """--softcap and --label-smoothing reach the compiled row kernels: the capped fused kernel
    takes an ex2 more per element (fast_tanh's) than the plain one, the smoothing one differs
    from it, and none has float64."""
    require_ptxas()
    plain = inspect_command(("fused",), "bfloat16", "--ptx")["PTX: fused bfloat16 sm_90"]
    capped = inspect_command(("fused", "loss"), "bfloat16", "--softcap", "30", "--ptx",
                             "--resources")
    smoothed = inspect_command(("fused",), "bfloat16", "--label-smoothing", "0.1", "--ptx")
    ex2 = [ptx.count("ex2.approx") for ptx in (plain, capped["PTX: fused bfloat16 sm_90"])]
    assert ex2[1] > ex2[0] > 0, ex2
    assert smoothed["PTX: fused bfloat16 sm_90"] != plain
    for ptx in (capped["PTX: fused bfloat16 sm_90"], capped["PTX: loss bfloat16 sm_90"],
                smoothed["PTX: fused bfloat16 sm_90"]):
        assert ".f64" not in ptx
    assert set(table_rows(capped["resources: sm_90"])) == {"fused", "loss"}


def require_disassembler():
    require_ptxas()
    try:
        tools.find_disassembler()
    except tools.ToolMissing as missing:
        pytest.skip(f"no SASS disassembler on this machine: {missing}")


def test_sass_of_a_kernel():
    require_disassembler()
    sass = inspect_command(("reduce_rows",), "bfloat16", "--sass")[
        "SASS: reduce_rows sm_90"]
    assert "EXIT" in sass and "SHFL.BFLY" in sass, sass[:2000]


def test_kernel_names_and_sources():
    assert inspection.kernel_names() == ["fused", "loss", "target_stats", "probability_stats",
                                         "reduce_rows", "scale", "slice", "states", "round"]
    assert "def row_kernel(" in inspection.source("fused")
    assert "def kernel(" in inspection.source("loss")
    assert "def scale_kernel(" in inspection.source("scale")
    assert "def slice_gradient_kernel(" in inspection.source("slice")
    assert "def slice_states_kernel(" in inspection.source("states")
    assert "def round_kernel(" in inspection.source("round")
    source = inspection.source("target_stats")
    assert source.startswith("# ") and "kernels.py:" in source and "def target_stats(" in source
    with pytest.raises(ValueError, match=r"kernel must be one of .* \(got 'row'\)"):
        inspection.source("row")


def test_round_kernel_exists_for_fp16_and_bf16_only():
    with pytest.raises(ValueError, match=re.escape(
            "kernel round is compiled for float16, bfloat16 only (got float32)")):
        inspection.planned_launch("round", "float32", (4, 8))


@pytest.mark.skipif(not SIMULATOR, reason="the message that the simulator gives")
def test_compiling_in_the_simulator_says_how_to_get_a_compiler(capsys):
    assert main(["inspect"]) == 1
    assert "without NUMBA_ENABLE_CUDASIM" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="without NUMBA_ENABLE_CUDASIM"):
        inspection.ptx("fused")


INSTALL_HINT = "pip install 'numba_ce[inspect]'"


def test_missing_tools_name_the_inspect_extra(monkeypatch):
    monkeypatch.setattr(tools, "_locate", lambda name: None)
    with pytest.raises(tools.ToolMissing, match=re.escape(
            "ptxas was not found (NVIDIA wheels, conda, CUDA_PATH/CUDA_HOME, the CUDA runtime's "
            f"toolkit, PATH); to install it and the other tools: {INSTALL_HINT}")):
        tools.find_tool("ptxas")
    with pytest.raises(tools.ToolMissing, match=re.escape(
            "SASS needs nvdisasm or cuobjdump, and neither was found (NVIDIA wheels, conda, "
            "CUDA_PATH/CUDA_HOME, the CUDA runtime's toolkit, PATH); to install nvdisasm and the "
            f"other tools: {INSTALL_HINT}")):
        tools.find_disassembler()


@pytest.mark.parametrize("library, name", [("nvrtc", "NVRTC"), ("nvvm", "NVVM")])
@pytest.mark.parametrize("section", ["--ptx", "--sass", "--resources"])
def test_inspect_without_a_compiler_says_which_extra_once(monkeypatch, capsys, library, name,
                                                          section):
    """A missing NVRTC or NVVM is one line naming the extra, checked before anything compiles:
    it used to be numba-cuda's 'Failure finding "libnvrtc.so.13 ..."', its search said twice."""
    monkeypatch.setattr(tools, "_loadable", lambda searched: searched != library)
    assert main(["inspect", "--kernel=reduce_rows", "--arch=sm_90", section]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err == (
        f"python -m numba_ce inspect: {name} (lib{library}), which compiling the kernels needs, "
        "was not found (NVIDIA wheels, conda, CUDA_PATH/CUDA_HOME, the CUDA runtime's toolkit, "
        f"the system's libraries); to install it and the other tools: {INSTALL_HINT}\n")


def test_inspect_without_ptxas_says_which_extra(monkeypatch, capsys):
    monkeypatch.setattr(tools, "_loadable", lambda library: True)
    monkeypatch.setattr(tools, "_locate", lambda name: None)
    assert main(["inspect", "--kernel=reduce_rows"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m numba_ce inspect: ptxas was not found (")
    assert err.endswith(f"; to install it and the other tools: {INSTALL_HINT}\n")
    assert err.count("\n") == 1


def test_the_compilers_numba_cuda_loads_are_found():
    """NVVM and NVRTC, which the test extra installs (through the inspect extra), are found."""
    assert tools.require_compilers() is None


@pytest.mark.parametrize("arch", ["sm_75", "sm_70", "sm_61"])
def test_inspect_refuses_an_arch_before_sm80_up_front(capsys, arch):
    with pytest.raises(SystemExit) as refused:
        main(["inspect", f"--arch={arch}", "--ptx"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m numba_ce inspect: error: argument --arch: arch must be sm_80 or newer, where "
        f"the kernels' cp.async and bf16 conversion instructions exist (got {arch})")


def test_inspect_takes_the_readmes_short_dtype_names():
    """--dtype fp16 compiles the float16 kernel (the README writes bf16, fp16, fp32)."""
    parts = inspect_command(("round",), "fp16", "--ptx")
    assert list(parts) == ["PTX: round float16 sm_90"]
    assert ".target sm_90" in parts["PTX: round float16 sm_90"]


PTXAS_REPORT = """\
ptxas info    : 144 bytes gmem
ptxas info    : Compiling entry function 'helper_entry' for 'sm_90'
ptxas info    : Function properties for helper_entry
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers
ptxas info    : Compiling entry function 'main_entry' for 'sm_90'
ptxas info    : Function properties for main_entry
    16 bytes stack frame, 20 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 256 bytes smem
ptxas info    : Compile time = 937.961 ms
"""


def test_ptxas_report_is_read_for_the_right_entry():
    assert tools.parse_report(PTXAS_REPORT, "main_entry") == tools.PtxasReport(
        registers=64, shared_bytes=256, local_bytes=16, spill_stores=20, spill_loads=36,
        barriers=1)
    assert tools.parse_report(PTXAS_REPORT, "helper_entry").registers == 20
    with pytest.raises(ValueError, match="'missing'"):
        tools.parse_report(PTXAS_REPORT, "missing")


@pytest.mark.parametrize("threads,registers,shared,blocks,fraction,limited_by", [
    (1024, 64, 256, 1, 0.5, "registers"),           # the row kernels: 64 x 1024 fills the file
    (1024, 32, 256, 2, 1.0, "threads and registers"),
    (128, 255, 0, 2, 0.125, "registers"),           # 255 -> 256 a thread, 32 K a warp group
    (256, 16, 100 * 1024, 2, 0.25, "shared memory"),  # 101 KB a block with the reserved 1 KB
    (32, 16, 0, 32, 0.5, "blocks"),
])
def test_occupancy_on_sm90(threads, registers, shared, blocks, fraction, limited_by):
    fits = occupancy.occupancy((9, 0), threads, registers, shared)
    assert (fits.blocks_per_sm, fits.fraction, fits.limited_by) == (blocks, fraction, limited_by)


def test_occupancy_of_an_unknown_architecture():
    with pytest.raises(ValueError, match=r"known for sm_80.*sm_90 \(got sm_75\)"):
        occupancy.occupancy((7, 5), 256, 32, 0)


def test_roofline_byte_model_and_report():
    shape = (4096, 128256)
    assert roofline.bytes_moved(shape, "bfloat16", "loss") == 4096 * 128256 * 2
    assert roofline.bytes_moved(shape, "bfloat16", "fused") == 2 * 4096 * 128256 * 2
    assert roofline.bytes_moved(shape, "float32", "fused") == 2 * 4096 * 128256 * 4
    report = roofline.roofline(shape, "bfloat16", "fused", seconds=1e-3)
    assert report.bandwidth == pytest.approx(2.101e12, rel=1e-3)
    assert report.share == pytest.approx(2.101 / 4.23, rel=1e-3)
    with pytest.raises(ValueError, match=r"mode must be one of \['loss', 'fused'\] \(got 'both'\)"):
        roofline.bytes_moved(shape, "bfloat16", "both")
    with pytest.raises(ValueError, match=r"time must be > 0 seconds \(got 0\)"):
        roofline.roofline(shape, "bfloat16", "fused", seconds=0)


def test_roofline_command(capsys):
    assert main(["roofline", "--shape", "4096", "128256", "--dtype", "bfloat16", "--mode",
                 "loss", "--time-ms", "0.5", "--ceiling-tbs", "4.0"]) == 0
    out = capsys.readouterr().out
    assert "bytes moved  1.051 GB  (byte model: N * V * itemsize)" in out
    assert "bandwidth    2.101 TB/s = 52.5% of the 4.00 TB/s ceiling" in out


@pytest.mark.parametrize("short, name", [("bf16", "bfloat16"), ("fp16", "float16"),
                                         ("fp32", "float32")])
def test_roofline_takes_the_readmes_short_dtype_names(capsys, short, name):
    assert main(["roofline", "--dtype", short, "--time-ms", "1"]) == 0
    assert f"on 4096 x 128256 {name} logits" in capsys.readouterr().out


@pytest.mark.parametrize("option, value, message", [
    ("--time-ms", "-1", "the time must be > 0 ms (got -1)"),
    ("--time-ms", "0", "the time must be > 0 ms (got 0)"),
    ("--time-ms", "x", "the time must be > 0 ms (got x)"),
    ("--ceiling-tbs", "0", "the ceiling must be > 0 TB/s (got 0)"),
])
def test_roofline_refuses_a_time_or_ceiling_not_above_0(capsys, option, value, message):
    arguments = ["roofline", option, value] + (["--time-ms", "1"] if option != "--time-ms" else [])
    with pytest.raises(SystemExit) as refused:
        main(arguments)
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m numba_ce roofline: error: argument {option}: {message}")


@pytest.mark.skipif(devices.gpu_available(), reason="a GPU is present: it measures")
def test_roofline_measure_needs_a_gpu(capsys):
    assert main(["roofline", "--measure"]) == 1
    assert "measuring needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not devices.gpu_available(), reason="measuring needs a CUDA GPU with CuPy")
def test_roofline_measures_a_call(capsys):
    assert main(["roofline", "--measure", "--shape", "64", "4096", "--repeats", "3"]) == 0
    assert "(measured: median of 3 calls)" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_argmax_kernels_have_no_f64_and_spill_as_little(dtype):
    """The argmax specialisation (return_token_accuracy / return_predicted_tokens) keeps the
    row kernels' PTX hygiene: no float64, and no more local memory than a few per-row values
    (the loss kernel's two more live registers, the running maximum and its index, spill one
    per-row value at 64 registers: one store and one load a row, outside the loops over the
    words, in the SASS of CUDA 13.0's ptxas)."""
    require_ptxas()
    parts = inspect_command(("fused", "loss"), dtype, "--argmax-outputs", "--ptx", "--resources")
    rows = table_rows(parts["resources: sm_90"])
    for name in ("fused", "loss"):
        ptx = parts[f"PTX: {name} {dtype} sm_90"]
        assert ".f64" not in ptx, f"{name} {dtype}: float64 in its PTX"
        bound = MAX_GRADIENT_SPILL if name == "fused" else MAX_ARGMAX_LOSS_SPILL
        assert local_bytes(rows[name]) <= bound, rows[name]


MAX_ARGMAX_LOSS_SPILL = 8


# The class-probability row kernels compiled offline for sm_90 (a process without the simulator):
# for each dtype and option set, the PTX's float64 instructions and the spill loads and stores
# (LDL/STL) that ptxas put inside the loops over a row's words (word_loop_spills): none, but for
# fp16 with softcap, whose pass-1 loops of packed words spill a few values at 64 registers, and
# more with class weights (CUDA 13.0's ptxas: 2-6 and 36-56 spill instructions in loops of
# ~500-700; bench/NOTES.md, "Class-probability targets"). The bounds say what was measured.
PROBABILITY_VARIANTS = {
    "plain": {}, "class weights": dict(class_weights=True),
    "weighted smoothing": dict(class_weights=True, label_smoothing=0.1),
    "softcap": dict(softcap=30.0), "softcap, smoothing": dict(softcap=30.0, label_smoothing=0.1),
    "softcap, class weights": dict(softcap=30.0, class_weights=True, label_smoothing=0.1),
    "predicted tokens": dict(argmax_outputs=True)}
MAX_WORD_LOOP_SPILLS = {("float16", "softcap"): 8, ("float16", "softcap, smoothing"): 8,
                        ("float16", "softcap, class weights"): 64}
PROBABILITY_SCRIPT = """
import json, re
from numba_ce.inspection import compiler
from numba_ce.inspection.launches import Variant
variants, kernel, dtype = {variants!r}, {kernel!r}, {dtype!r}
found = {{}}
for n_classes in (128256, 128257):
    for name, options in variants.items():
        variant = Variant(probability_targets=True, **options)
        built = compiler.compiled(kernel, dtype, "sm_90", (4096, n_classes), variant)
        doubles = sum(".f64" in line for line in built.ptx.splitlines())
        sass = compiler.sass(kernel, dtype, "sm_90", (4096, n_classes), variant)
        found[f"{{kernel}} {{dtype}} V={{n_classes}} {{name}}"] = (doubles, sass)
print(json.dumps({{key: value[0] for key, value in found.items()}}))
print(json.dumps({{key: value[1] for key, value in found.items()}}))
"""


def word_loop_spills(sass):
    """[(instructions, spill loads and stores)] of each loop over a row's words in a SASS
    listing: the innermost loops (a backward branch and the code between its target and it,
    enclosing no other) that read memory (LDG, LDS) and hold no shuffle or barrier (the block
    reductions' code, whose divergence fallbacks branch backwards too)."""
    label_at, items, pending = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            pending.append(label.group(1))
            continue
        instruction = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if instruction:
            address = int(instruction.group(1), 16)
            label_at.update((name, address) for name in pending)
            pending = []
            items.append((address, instruction.group(2)))
    loops = []
    for address, text in items:
        branch = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if branch and label_at.get(branch.group(1), address) < address:
            loops.append((label_at[branch.group(1)], address))
    innermost = [loop for loop in loops if not any(
        other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in loops)]
    found = []
    for start, end in innermost:
        body = [text for address, text in items if start <= address <= end]
        reads = any("LDG" in text or "LDS" in text for text in body)
        if reads and not any("SHFL" in text or "BAR" in text for text in body):
            found.append((len(body), sum("LDL" in text or "STL" in text for text in body)))
    return found


# one kernel and format a test: 14 compilations each, in parallel under pytest-xdist
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kernel", ["fused", "loss"])
def test_probability_kernels_have_no_f64_and_no_spills_in_their_word_loops(kernel, dtype):
    require_disassembler()
    script = PROBABILITY_SCRIPT.format(variants=PROBABILITY_VARIANTS, kernel=kernel, dtype=dtype)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    doubles_line, sass_line = done.stdout.strip().splitlines()[-2:]
    doubles, listings = json.loads(doubles_line), json.loads(sass_line)
    problems = [f"{key}: {count} float64 lines in its PTX" for key, count in doubles.items()
                if count]
    for key, sass in listings.items():
        loops = word_loop_spills(sass)
        if not loops:
            problems.append(f"{key}: no loop over the words found in its SASS")
        _, dtype, _, name = key.split(" ", 3)
        bound = MAX_WORD_LOOP_SPILLS.get((dtype, name), 0)
        if sum(spills for _, spills in loops) > bound:
            problems.append(f"{key}: more than {bound} spill instructions in its word loops "
                            f"(instructions, spills): {loops}")
    assert not problems, "\n".join(problems)


def test_word_loop_spills_finds_the_loops_and_their_spills():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.64 R2, [R4.64] ;
        /*0020*/                   STL [R1], R2 ;
        /*0030*/                   @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0040*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0050*/                   LDS R2, [R3] ;
        /*0060*/                   LDL R2, [R1] ;
        /*0070*/                   @P1 BRA `(.L_x_2) ;
        /*0080*/                   EXIT ;
"""
    assert word_loop_spills(sass) == [(3, 1)]
