"""The ``inspect`` and ``roofline`` commands of ``python -m numba_ce``: arguments and printing."""
import argparse
import math
import sys

from . import compiler, resource_table, roofline, tools
from .launches import DEFAULT_SHAPE, DTYPES, KERNELS, Variant, check_kernel_dtype, kernel_source

SECTIONS = ("source", "ptx", "sass", "resources")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # as the README has them
DTYPE_HELP = "bfloat16 (bf16), float16 (fp16) or float32 (fp32)"


def _dtype(text):
    """argparse type of --dtype: a logits dtype's long name, from itself or its short one."""
    return DTYPE_ALIASES.get(text, text)


def _arch(text):
    """argparse type of --arch: (major, minor) of an architecture the kernels run on."""
    try:
        return compiler.parse_arch(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(what, unit):
    """An argparse type: a float > 0, refused with a message naming ``what`` and ``unit``."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # refused below, with the same message
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{what} must be > 0 {unit} (got {text})")
        return value
    return parse


def add_commands(commands):
    """Add the two commands to ``python -m numba_ce``'s subparsers."""
    kernels_help = "; ".join(f"{name}: {spec.summary}" for name, spec in KERNELS.items())
    inspect = commands.add_parser(
        "inspect", help="source, PTX, SASS and resource use of the kernels (no GPU needed)",
        description="Compile the kernels as a call on (N, V) logits would launch them (int64 "
                    "targets or, with --probability-targets, class probabilities; reduction "
                    "'mean'; the options given) and print what is asked; "
                    "without --source, --ptx or --sass, the resource table. Needs no GPU, a shell "
                    "without NUMBA_ENABLE_CUDASIM=1, and the CUDA tools that pip install "
                    "'numba_ce[inspect]' brings.")
    inspect.add_argument("--kernel", action="append", choices=[*KERNELS, "all"],
                         help=f"repeatable; default all. {kernels_help}")
    inspect.add_argument("--dtype", action="append", type=_dtype, choices=[*DTYPES, "all"],
                         help=f"logits dtype, {DTYPE_HELP}, or all; repeatable (default bfloat16)")
    inspect.add_argument("--arch", type=_arch,
                         help="target architecture, sm_80 or newer, such as sm_90 (default: the "
                              "visible GPU's, else sm_90)")
    inspect.add_argument("--shape", nargs=2, type=int, metavar=("N", "V"), default=DEFAULT_SHAPE,
                         help="logits shape: it picks packed 8-byte loads (V fills whole words) "
                              "or one element a load, and the block size (default %(default)s)")
    inspect.add_argument("--softcap", type=float, metavar="C",
                         help="compile the softcap specialisation of the row kernels")
    inspect.add_argument("--label-smoothing", type=float, default=0.0, metavar="S",
                         help="compile the label-smoothing specialisation of the row kernels")
    inspect.add_argument("--class-weights", action="store_true",
                         help="a call with class weights (with --label-smoothing: the weighted "
                              "smoothing specialisation)")
    inspect.add_argument("--argmax-outputs", action="store_true",
                         help="a call with return_token_accuracy and return_predicted_tokens "
                              "(the argmax specialisation of the row kernels; with "
                              "--probability-targets, return_predicted_tokens)")
    inspect.add_argument("--probability-targets", action="store_true",
                         help="a call with class-probability targets (N, V) of the logits' "
                              "dtype (the class-probability specialisation of the row kernels; "
                              "with --class-weights, the weighted one)")
    for section, what in [("source", "the kernel's Python source"), ("ptx", "its PTX"),
                          ("sass", "its SASS (needs nvdisasm or cuobjdump)"),
                          ("resources", "the resource table (needs ptxas)")]:
        inspect.add_argument(f"--{section}", action="store_true", help=f"print {what}")

    report = commands.add_parser(
        "roofline", help="bytes moved, effective bandwidth and share of the bandwidth ceiling",
        description=roofline.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("--shape", nargs=2, type=int, metavar=("N", "V"), default=DEFAULT_SHAPE,
                        help="logits shape (default %(default)s)")
    report.add_argument("--dtype", type=_dtype, choices=DTYPES, default="bfloat16",
                        help=f"logits dtype, {DTYPE_HELP} (default %(default)s)")
    report.add_argument("--mode", choices=list(roofline.ARRAYS_MOVED), default="fused")
    timing = report.add_mutually_exclusive_group(required=True)
    timing.add_argument("--time-ms", type=_positive("the time", "ms"),
                        help="the measured time of one call, ms")
    timing.add_argument("--measure", action="store_true",
                        help="time the call on the GPU (median of --repeats)")
    report.add_argument("--repeats", type=int, default=20)
    report.add_argument("--ceiling-tbs", type=_positive("the ceiling", "TB/s"),
                        default=roofline.H200_COPY_CEILING / 1e12,
                        help="bandwidth ceiling, TB/s (default: %(default)s, a measured H200 copy)")


def run(args):
    """Run a parsed ``inspect`` or ``roofline`` command; returns the exit status."""
    try:
        return _inspect(args) if args.command == "inspect" else _roofline(args)
    except (ValueError, RuntimeError) as error:  # ToolMissing included
        print(f"python -m numba_ce {args.command}: {error}", file=sys.stderr)
        return 1


def _inspect(args):
    sections = [s for s in SECTIONS if getattr(args, s)] or ["resources"]
    names = list(KERNELS) if args.kernel is None or "all" in args.kernel else args.kernel
    dtypes = args.dtype or ["bfloat16"]
    dtypes = list(DTYPES) if "all" in dtypes else dtypes
    if set(sections) - {"source"}:  # the rest is compiled
        tools.require_compilers()
    if "sass" in sections:
        tools.find_disassembler()
    if "sass" in sections or "resources" in sections:
        tools.find_tool("ptxas")
    capability = args.arch or compiler.default_arch()
    arch = compiler.arch_name(capability)
    shape = tuple(args.shape)
    variant = Variant(args.softcap, args.label_smoothing, args.class_weights, args.argmax_outputs,
                      args.probability_targets)
    plan = [(name, _dtypes_of(name, dtypes)) for name in names]  # raises before any output
    print(f"numba_ce kernels for {compiler.describe_arch(capability)}; "
          f"logits {shape[0]} x {shape[1]}, {variant.targets()}, reduction 'mean', "
          f"{variant.describe()}")
    table = []
    for name, name_dtypes in plan:
        if "source" in sections:
            path, line, text = kernel_source(name)
            _section(f"source: {name}  ({path}:{line})", text)
        for dtype in name_dtypes:
            label = f"{name} {dtype if KERNELS[name].per_dtype else ''}".rstrip()
            if "ptx" in sections:
                built = compiler.compiled(name, dtype, arch, shape, variant)
                _section(f"PTX: {label} {arch}", built.ptx)
            if "sass" in sections:
                _section(f"SASS: {label} {arch}", compiler.sass(name, dtype, arch, shape, variant))
            if "resources" in sections:
                table.append(resource_table.resources(name, dtype, arch, shape, variant))
    if table:
        _section(f"resources: {arch}", resource_table.format_table(table))
    return 0


def _dtypes_of(name, dtypes):
    """The dtypes of ``dtypes`` to compile kernel ``name`` for: the first for kernels the dtype
    does not change, those it exists for otherwise (an error if none)."""
    spec = KERNELS[name]
    if not spec.per_dtype:
        return dtypes[:1]
    chosen = [dtype for dtype in dtypes if dtype in spec.dtypes]
    if not chosen:
        check_kernel_dtype(name, dtypes[0])  # raises, naming the dtypes it exists for
    return chosen


def _section(title, text):
    print(f"\n===== {title} =====")
    print(text.rstrip("\n"))


def _roofline(args):
    shape = tuple(args.shape)
    if args.measure:
        seconds = roofline.measure(shape, args.dtype, args.mode, args.repeats)
        timed = f"measured: median of {args.repeats} calls"
    else:
        seconds, timed = args.time_ms / 1e3, "given"
    print(roofline.roofline(shape, args.dtype, args.mode, seconds, args.ceiling_tbs * 1e12, timed))
    return 0
