"""Which kernels a call launches, with what grid, block and argument types: asked of the code
that launches them.

The signatures are never written down here. :func:`planned_launch` asks the planning functions
that the entry points use (numba_ce.planning: the loss kernels, the torch adapter's backward
scaling, the linear cross-entropy's weight-gradient rounding) for the plans of a call on
stand-in NumPy arrays and the current device's properties (an sm_90 GPU offline), and types each
plan's arguments with :func:`numba_ce.abi.argument_types`, the function the GPU path
compiles with. So whatever is passed to a kernel, and whatever block size is picked for a row
length, is what gets inspected. The stand-in arrays are views whose rows (or elements) all alias
one real row: planning only looks at their dtype, shape, strides and alignment.
"""
import inspect as pyinspect
from typing import NamedTuple

import ml_dtypes
import numpy as np

from .. import (abi, buffers, device_properties, kernels, planning, rounding, scale_kernel,
                slice_gradient, slice_states, softmax_states)
from ..floatbits import FORMATS
from ..options import Options
from ..portable import SIMULATOR


DTYPES = tuple(FORMATS)  # float32, float16, bfloat16


class KernelSpec(NamedTuple):
    module: object   # the module that defines it
    function: str    # its name there (row_kernel, scale_kernel, round_kernel: factories)
    call: str        # what launches it: "with_grad", "loss" (a call with or without a
    #                  gradient), "backward" (scale_rows), "round" (round_into), "slice"
    #                  (a slice of the classes in the lean linear cross-entropy's pass B),
    #                  "states" (a vocab-parallel slice's partial softmax states)
    per_dtype: bool  # whether the logits' dtype changes the compiled code
    packed: bool     # whether it reads the logits (or gradient) as words of packed elements
    rounds: bool     # whether it rounds float32 results to the logits' format
    summary: str
    dtypes: tuple = DTYPES  # the logits dtypes it is compiled for
    targets: str | None = None  # "indices" or "probabilities": the targets of the call that
    #                             launches it whatever the variant (None: the variant's)


KERNELS = {
    "fused": KernelSpec(kernels, "row_kernel", "with_grad", True, True, True,
                        "resident blocks striding over the rows, each keeping a row's first "
                        "words in shared memory: lse, row losses and the gradient "
                        "(cross_entropy_with_grad)"),
    "loss": KernelSpec(kernels, "row_kernel", "loss", True, True, False,
                       "one block a row: lse and row losses, no gradient (cross_entropy)"),
    "target_stats": KernelSpec(kernels, "target_stats", "with_grad", False, False, False,
                               "one block: the reduction denominators and S_w from the targets",
                               targets="indices"),
    "probability_stats": KernelSpec(kernels, "probability_stats", "with_grad", False, False,
                                    False, "one block: N, N and S_w for class-probability "
                                    "targets", targets="probabilities"),
    "reduce_rows": KernelSpec(kernels, "reduce_rows", "with_grad", False, False, False,
                              "one block: the row losses summed for reduction 'sum' / 'mean'"),
    "scale": KernelSpec(scale_kernel, "scale_kernel", "backward", True, True, True,
                        "one block a row: the torch adapter's backward, the saved gradient "
                        "times the upstream gradient in place (blocks return at once when it "
                        "is 1)"),
    "slice": KernelSpec(slice_gradient, "slice_gradient_kernel", "slice", True, True, True,
                        "one block a row: the gradient of a slice of the classes in place, "
                        "from each row's lse given (the lean linear cross-entropy's pass B)",
                        targets="indices"),
    "states": KernelSpec(slice_states, "slice_states_kernel", "states", True, True, False,
                         "one block a row: a slice of the classes' partial softmax states, "
                         "read once (the vocab-parallel loss's first pass)",
                         targets="indices"),
    "round": KernelSpec(rounding, "round_kernel", "round", True, False, True,
                        "grid-stride: the linear cross-entropy's float32 weight gradient "
                        "rounded to the logits' format (fp16 and bf16 only)",
                        ("float16", "bfloat16")),
}
DEFAULT_SHAPE = (4096, 128256)  # 4096 tokens of Llama 3's vocabulary, as the demo's GPU shape


class Variant(NamedTuple):
    """The options that change a row kernel's code (each is compiled in only when used):
    softcap, label smoothing, class weights (with label smoothing, or with class-probability
    targets), the argmax outputs (token accuracy, predicted tokens; with class probabilities,
    the predicted tokens) and class-probability targets (N, V) in place of class indices (N,).
    z-loss, ignore_index and the reduction are run-time values of every kernel."""
    softcap: float | None = None
    label_smoothing: float = 0.0
    class_weights: bool = False
    argmax_outputs: bool = False
    probability_targets: bool = False

    def describe(self):
        parts = ([f"softcap {self.softcap}"] if self.softcap is not None else []) + (
            [f"label smoothing {self.label_smoothing}"] if self.label_smoothing else []) + (
            ["class weights"] if self.class_weights else []) + (
            ["argmax outputs"] if self.argmax_outputs else [])
        return ", ".join(parts) or "no softcap, label smoothing, class weights or argmax outputs"

    def targets(self):
        """What the call's targets are, as the inspect command's header says it."""
        return "class-probability targets" if self.probability_targets else "int64 targets"


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
    """(file, first line, source) of the Python code of a kernel; for the row, scale and round
    kernels, the whole factory with the device functions it specialises (the row kernel's
    per-word and per-group functions are numba_ce.row_math's and numba_ce.row_passes')."""
    spec = check_kernel(name)
    function = getattr(spec.module, spec.function)
    function = pyinspect.unwrap(getattr(function, "py_func", function))  # row_kernel is cached
    lines, first = pyinspect.getsourcelines(function)
    return pyinspect.getsourcefile(function), first, "".join(lines)


def check_kernel_dtype(name, dtype):
    """The kernel's spec, if it is compiled for logits of ``dtype``."""
    spec = check_kernel(name)
    if check_dtype(dtype) not in spec.dtypes:
        raise ValueError(f"kernel {name} is compiled for {', '.join(spec.dtypes)} only (got "
                         f"{dtype})")
    return spec


def planned_launch(name, dtype, shape, variant=PLAIN):
    """The :class:`Launch` of kernel ``name`` in a call on ``shape`` (N, V) logits of ``dtype``
    with int64 targets (or class probabilities of ``dtype``), reduction "mean" and the options
    of ``variant`` (a :class:`Variant`), as the launching code plans it for a GPU (for "round":
    a weight gradient of N x V elements; for "slice" and "states": the first V classes of a
    vocabulary of V, as one slice). Kernels of one kind of targets (KernelSpec.targets) are
    planned for it."""
    spec = check_kernel_dtype(name, dtype)
    if spec.targets is not None:
        variant = variant._replace(probability_targets=spec.targets == "probabilities")
    if SIMULATOR:
        raise RuntimeError(
            "planning a GPU launch needs a process without NUMBA_ENABLE_CUDASIM=1 (the kernels "
            "are Python functions there)")
    n_rows, n_classes = (int(n) for n in shape)
    if n_rows < 1 or n_classes < 1:
        raise ValueError(f"shape must be (N, V) with N >= 1 and V >= 1 (got {tuple(shape)})")
    recorded = [Launch(name, dtype, plan.kernel, plan.grid, plan.block,
                       abi.argument_types(plan.arguments), plan.shared)
                for plan in _plans(spec.call, dtype, n_rows, n_classes, variant)
                if _function_name(plan.kernel) == spec.function]
    if len(recorded) != 1:
        raise RuntimeError(
            f"expected the {spec.call} call to launch {spec.function} once, but it did "
            f"{len(recorded)} times: numba_ce.inspection.launches needs updating to follow "
            f"{spec.module.__name__}")
    return recorded[0]


def _plans(call, dtype, n_rows, n_classes, variant):
    """The plans (numba_ce.planning) of one call of kind ``call`` (KernelSpec.call) on stand-in
    arrays of ``dtype``, for the current device (an sm_90 GPU offline)."""
    device = device_properties.current()
    one_row = np.zeros(n_classes, numpy_dtype(dtype))
    logits = np.broadcast_to(one_row, (n_rows, n_classes))
    if call == "backward":
        return [planning.plan_scale(logits, dtype, np.full(1, 0.5, np.float32), False, device)]
    if call == "round":  # N x V elements, all aliasing one
        n = n_rows * n_classes
        source = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (n,), (0,))
        out = np.lib.stride_tricks.as_strided(one_row, (n,), (0,))
        return [planning.plan_round(source, np.ones(1, np.float32), out, dtype, device)]
    probabilities = variant.probability_targets
    options = Options(label_smoothing=variant.label_smoothing, softcap=variant.softcap,
                      return_token_accuracy=variant.argmax_outputs and not probabilities,
                      return_predicted_tokens=variant.argmax_outputs)
    weight = np.ones(n_classes, np.float32) if variant.class_weights else None
    target = logits if probabilities else np.zeros(n_rows, np.int64)  # (rows aliasing one too)
    inputs = planning.RowInputs(logits, dtype, target, weight, np.ones(1, np.float32))
    stats = np.zeros(3, np.float32)
    if call == "slice":
        return [planning.plan_slice_gradient(inputs, 0, n_classes, options, stats,
                                             np.zeros(n_rows, np.float32), device)]
    if call == "states":
        states = softmax_states.unpack(np.zeros(softmax_states.packed_size(n_rows), np.float32))
        return [planning.plan_slice_states(inputs, 0, options, states, device)]
    grad = np.broadcast_to(one_row.copy(), (n_rows, n_classes)) if call == "with_grad" else None
    outputs = buffers.allocate(np, n_rows, options)
    bad_row = np.zeros(1, np.int64)
    return [planning.plan_target_stats(inputs.target, weight, options, n_classes, stats,
                                       bad_row, device),
            planning.plan_rows(inputs, options, stats, grad, outputs, device),
            planning.plan_reduce(outputs, stats, options, device)]


def _function_name(kernel):
    """The kernel's name in its module (row_kernel for each of its specialisations)."""
    return kernel.py_func.__qualname__.split(".")[0]
