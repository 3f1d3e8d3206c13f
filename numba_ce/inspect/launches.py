"""Which kernels a call launches, with what grid, block and argument types: asked of launch.py.

The signatures are never written down here. :func:`planned_launch` runs
:func:`numba_ce.launch.run` itself on stand-in NumPy arrays, with its ``launch`` function replaced
by a recorder, and types each recorded argument list with
:func:`numba_ce.launcher.argument_types`, the function the GPU path compiles with. So whatever
launch.py passes to a kernel, and whatever block size it picks for a row length, is what gets
inspected. The stand-in logits are an (N, V) view whose rows all alias one real row: launch.run
only looks at their dtype, shape, strides and alignment.
"""
import inspect as pyinspect
from typing import NamedTuple

import ml_dtypes
import numpy as np

from .. import kernels, launch, launcher, validation
from ..demo import GPU_SHAPE
from ..floatbits import FORMATS
from ..portable import SIMULATOR


class KernelSpec(NamedTuple):
    function: str    # its name in numba_ce.kernels (row_kernel is a factory of specialisations)
    with_grad: bool  # the kind of call that launches it: cross_entropy_with_grad or cross_entropy
    per_dtype: bool  # whether the logits' dtype changes the compiled code
    summary: str


KERNELS = {
    "fused": KernelSpec("row_kernel", True, True, "resident blocks striding over the rows, each "
                                                  "keeping a row's first words in shared memory: "
                                                  "lse, row losses and the gradient "
                                                  "(cross_entropy_with_grad)"),
    "loss": KernelSpec("row_kernel", False, True,
                       "one block a row: lse and row losses, no gradient (cross_entropy)"),
    "target_stats": KernelSpec("target_stats", True, False,
                               "one block: the reduction denominators and S_w from the targets"),
    "reduce_rows": KernelSpec("reduce_rows", True, False,
                              "one block: the row losses summed for reduction 'sum' / 'mean'"),
}
DTYPES = tuple(FORMATS)  # float32, float16, bfloat16
DEFAULT_SHAPE = GPU_SHAPE  # the demo's: 4096 tokens of Llama 3's 128256-word vocabulary


class Variant(NamedTuple):
    """The loss options that change a row kernel's code (each is compiled in only when used):
    softcap, label smoothing, and class weights with label smoothing. z-loss, ignore_index and
    the reduction are run-time values of every kernel."""
    softcap: float | None = None
    label_smoothing: float = 0.0
    class_weights: bool = False

    def describe(self):
        parts = ([f"softcap {self.softcap}"] if self.softcap is not None else []) + (
            [f"label smoothing {self.label_smoothing}"] if self.label_smoothing else []) + (
            ["class weights"] if self.class_weights else [])
        return ", ".join(parts) or "no softcap, label smoothing or class weights"


PLAIN = Variant()


class Launch(NamedTuple):
    name: str       # a key of KERNELS
    dtype: str      # the logits' dtype the launch was planned for
    kernel: object  # the Numba dispatcher
    grid: int
    block: int
    signature: tuple  # Numba types of the arguments
    shared: int     # bytes of dynamic shared memory a block


def kernel_names():
    """The names :func:`planned_launch` and the inspect command accept."""
    return list(KERNELS)


def check_kernel(name):
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {kernel_names()} (got {name!r})")
    return KERNELS[name]


def check_dtype(dtype):
    if dtype not in FORMATS:
        raise ValueError(f"dtype must be one of {list(DTYPES)} (got {dtype!r})")
    return dtype


def numpy_dtype(dtype):
    """The NumPy dtype of a logits format name (bfloat16 from ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if check_dtype(dtype) == "bfloat16" else np.dtype(dtype)


def kernel_source(name):
    """(file, first line, source) of the Python code of a kernel; for the row kernels, the whole
    ``row_kernel`` factory with the device functions it specialises."""
    spec = check_kernel(name)
    function = getattr(kernels, spec.function)
    function = pyinspect.unwrap(getattr(function, "py_func", function))  # row_kernel is cached
    lines, first = pyinspect.getsourcelines(function)
    return pyinspect.getsourcefile(function), first, "".join(lines)


def planned_launch(name, dtype, shape, variant=PLAIN):
    """The :class:`Launch` of kernel ``name`` in a call on ``shape`` (N, V) logits of ``dtype``
    with int64 targets, reduction "mean" and the options of ``variant`` (a :class:`Variant`), as
    launch.run plans it for a GPU."""
    spec = check_kernel(name)
    check_dtype(dtype)
    if SIMULATOR:
        raise RuntimeError(
            "planning a GPU launch needs a process without NUMBA_ENABLE_CUDASIM=1 (launch.run "
            "picks simulator block sizes there)")
    n_rows, n_classes = (int(n) for n in shape)
    if n_rows < 1 or n_classes < 1:
        raise ValueError(f"shape must be (N, V) with N >= 1 and V >= 1 (got {tuple(shape)})")
    recorded = []
    for kernel, grid, block, args, shared in _dry_run(dtype, n_rows, n_classes, spec.with_grad,
                                                      variant):
        if _function_name(kernel) == spec.function:
            recorded.append(Launch(name, dtype, kernel, grid, block,
                                   launcher.argument_types(args), shared))
    if len(recorded) != 1:
        raise RuntimeError(
            f"expected launch.run to launch {spec.function} once, but it did {len(recorded)} "
            "times: numba_ce.inspect.launches needs updating to follow launch.py")
    return recorded[0]


def _dry_run(dtype, n_rows, n_classes, with_grad, variant):
    """[(kernel, grid, block, args, shared)] of one launch.run call, recorded instead of
    launched."""
    one_row = np.zeros(n_classes, numpy_dtype(dtype))
    logits = np.broadcast_to(one_row, (n_rows, n_classes))
    grad = np.broadcast_to(one_row.copy(), (n_rows, n_classes)) if with_grad else None
    options = validation.check_options(-100, "mean", variant.label_smoothing, 0.0,
                                       variant.softcap)
    weight = np.ones(n_classes, np.float32) if variant.class_weights else None
    rows = [np.zeros(n_rows, np.float32) for _ in range(3)]  # row_loss, row_z, row_lse
    reduced = [np.zeros(1, np.float32) for _ in range(2)]  # loss_out, z_out
    recorded = []
    real_launch = launch.launch
    launch.launch = lambda kernel, grid, block, *args, shared=0: recorded.append(
        (kernel, grid, block, args, shared))
    try:
        launch.run(np, logits, dtype, np.zeros(n_rows, np.int64), weight, options, grad,
                   np.ones(1, np.float32), *rows, *reduced, False)
    finally:
        launch.launch = real_launch
    return recorded


def _function_name(kernel):
    """The kernel's name in numba_ce.kernels (row_kernel for each of its specialisations)."""
    return kernel.py_func.__qualname__.split(".")[0]
