"""Fused linear cross-entropy: the loss of a language-model head, logits = x @ W^T + b, without
ever holding all N x V logits. Two designs, chosen by ``memory``:

    "low"   (default) numba_ce.linear_lean: a loss pass over chunks of rows, then a gradient
            pass over slices of the classes; four matrix products, memory beyond the returned
            gradients a logits slice, a float32 N x H sum and O(N)
    "fast"  numba_ce.linear_fast: one pass over chunks of rows; the three products of the
            unfused computation, and a float32 V x H weight-gradient sum

Both compute the batch's target statistics first (the reduction's denominators: every chunk's
gradient has the batch's scale), check the targets before any product, and reduce the row losses
at the end; both round each logit as cuBLAS does (the product to x's format, the bias added and
rounded again) and sum every gradient in float32, rounded once to its format.
fp16 "mean" forms the gradient without the g / S_w of the upstream and the mean, which it
applies afterwards (see ``prepared_work``): p_j / S_w would flush to zero, g * p_j overflow.
"""
import functools
from typing import Any, NamedTuple

import numpy as np

from . import (api, buffers, device_properties, devices, execution, linear_fast, linear_lean,
               results, validation)
from .host_read import start_read
from .kernels import STAT_WEIGHT_SUM
from .linear_work import LinearWork, ones, unit_column
from .options import Options, check_flag
from .results import Array, LinearCrossEntropyResult

TINY = np.float32(1e-30)  # stands for a zero S_w or |w|max, whose gradient is zeros anyway

# memory=: what each design trades (numba_ce.linear_lean, numba_ce.linear_fast)
DESIGNS = {"low": linear_lean, "fast": linear_fast}


def linear_cross_entropy(input: Array, linear_weight: Array, target: Array, *,
                         linear_bias: Array | None = None, weight: Array | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, memory: str = "low",
                         chunk_size: int | None = None, validate: bool = True) -> Array:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias`` against ``target``,
    computed chunk by chunk, so that no N x V array is ever allocated.

    Parameters
    ----------
    input : float32, float16 or bfloat16 array (N, H): the hidden states.
    linear_weight : (V, H) array of input's dtype, as nn.Linear's weight.
    target : int32 or int64 array (N,).
    linear_bias : (V,) array of input's dtype, optional.
    weight, ignore_index, reduction, label_smoothing, z_loss, softcap, validate : as
        :func:`numba_ce.cross_entropy`.
    memory : "low" (default): the gradients in a second pass over slices of the classes, four
        matrix products, no V x H float32 sum; "fast": one pass over chunks of rows, three
        products, a float32 V x H weight-gradient sum (module docstring). The loss alone is
        the first pass of either: "low"'s chunks hold 64 MiB of logits (256 rows at V = 128256
        bf16), "fast"'s up to 1 GiB (4096 rows), so its products are smaller and likely slower
        on a GPU; chunk_size chooses.
    chunk_size : rows per chunk ("fast" default: 4096, fewer when C x V logits would exceed
        1 GiB; "low": numba_ce.linear_lean.lean_chunks, whose slices of classes then hold as
        many logits as chunk_size rows).

    Returns
    -------
    float32 loss: 0-d for 'mean' and 'sum', (N,) for 'none'.
    """
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return call(input, linear_weight, target, options, linear_bias=linear_bias, weight=weight,
                memory=memory, chunk_size=chunk_size, validate=validate).loss


def linear_cross_entropy_with_grad(input: Array, linear_weight: Array, target: Array, *,
                                   linear_bias: Array | None = None,
                                   weight: Array | None = None, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0,
                                   z_loss: float = 0.0, softcap: float | None = None,
                                   memory: str = "low", chunk_size: int | None = None,
                                   grad_output: Array | float | None = None,
                                   return_token_accuracy: bool = False,
                                   return_predicted_tokens: bool = False,
                                   validate: bool = True) -> LinearCrossEntropyResult:
    """The loss of :func:`linear_cross_entropy` and its gradients (``memory``: as there).

    grad_output : None (ones), a scalar, or an (N,) array for reduction='none'.
    return_token_accuracy, return_predicted_tokens : as in
        :func:`numba_ce.cross_entropy_with_grad`.

    Returns
    -------
    LinearCrossEntropyResult(loss, grad_input, grad_linear_weight, grad_linear_bias, z_loss,
    token_accuracy, predicted_tokens): gradients in the dtype of what they differentiate
    (grad_linear_bias None without a bias); the weight and bias gradients are summed over the
    rows in float32 and rounded once; the last two None unless asked.
    """
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                      return_token_accuracy, return_predicted_tokens)
    return call(input, linear_weight, target, options, linear_bias=linear_bias, weight=weight,
                memory=memory, chunk_size=chunk_size, grad_output=grad_output, with_grad=True,
                validate=validate)


def call(input, linear_weight, target, options, *, linear_bias=None, weight=None,
         memory="low", chunk_size=None, grad_output=None, with_grad=False, validate=True,
         alloc=None):
    """The checked call behind both functions, with ``options`` an :class:`Options`; ``alloc``
    makes every buffer with its ``empty(shape, dtype)`` (default: the arrays' module; tests pass
    one that poisons them)."""
    validate = check_flag("validate", validate)
    check_memory(memory)
    xp, on_host = api.array_kind(input=input, linear_weight=linear_weight, target=target,
                                 linear_bias=linear_bias, weight=weight, grad_output=grad_output)
    fmt = check_arguments(input, linear_weight, target, linear_bias, weight, chunk_size)
    go_shape = (validation.check_grad_output(grad_output, options.reduction, input.shape[0])
                if with_grad else ())
    input, linear_weight, target, linear_bias, weight, grad_output = api.on_device(
        on_host, input, linear_weight, target, linear_bias, weight, grad_output)
    weight = api.class_weights(xp, weight)
    grad_output = api.upstream(xp, grad_output, go_shape)
    needed = (with_grad, with_grad, with_grad and linear_bias is not None)
    inputs = LinearInputs(input, linear_weight, linear_bias, target, weight, grad_output, fmt)
    result = compute(alloc or xp, inputs, options, needed, memory=memory,
                     chunk_size=chunk_size, validate=validate)
    if on_host:
        result = LinearCrossEntropyResult(*(None if a is None else devices.cupy.asnumpy(a)
                                            for a in result))
    return result


def check_memory(memory):
    """``memory`` names a design: "low" or "fast"."""
    if not isinstance(memory, str) or memory not in DESIGNS:
        raise ValueError(f"memory must be 'low' or 'fast' (got {memory!r})")


def check_arguments(input, linear_weight, target, linear_bias, weight, chunk_size):
    """Check shapes, dtypes and layouts; return the format name of input (and of the weight)."""
    fmt = validation.check_matrix("input", input, "(N, H)",
                                  "for (batch, seq, H) hidden states pass input.reshape(-1, H)")
    n_rows, n_features = input.shape
    validation.check_matrix("linear_weight", linear_weight, "(V, H)", "as nn.Linear's weight")
    n_classes, weight_features = linear_weight.shape
    if weight_features != n_features or n_classes < 1:
        raise ValueError(f"linear_weight must have shape (V, {n_features}) with V >= 1 to match "
                         f"input (got shape {tuple(linear_weight.shape)})")
    validation.check_same_dtype("linear_weight", linear_weight, input)
    validation.check_target(target, n_rows, "input")
    if linear_bias is not None:
        shape = getattr(linear_bias, "shape", None)
        if shape is None or tuple(shape) != (n_classes,):
            got = "no shape" if shape is None else f"shape {tuple(shape)}"
            raise ValueError(f"linear_bias must have shape ({n_classes},) (got {got})")
        validation.check_same_dtype("linear_bias", linear_bias, input)
        if n_classes > 1 and linear_bias.strides[0] <= 0:  # a product's operand (1, V)
            raise ValueError(f"linear_bias must have a positive stride (got "
                             f"{linear_bias.strides[0]} bytes: reversed or broadcast); pass a "
                             "contiguous copy")
    if weight is not None:
        validation.check_weight(weight, n_classes)
    validation.check_chunk_size(chunk_size)
    return fmt


class LinearInputs(NamedTuple):
    """The checked arrays of a call on the compute device: input (N, H) of format ``fmt``,
    linear_weight (V, H), linear_bias (V,) or None, target (N,), class weights as float32 (V,)
    or None, grad_output as float32 (1,) or (N,)."""
    input: Any
    linear_weight: Any
    linear_bias: Any
    target: Any
    weight: Any
    grad_output: Any
    fmt: str


def compute(alloc, inputs, options, needed, *, memory="low", chunk_size=None, validate=True):
    """The loss and the gradients named by ``needed`` = (input, weight, bias) (shared with
    numba_ce.torch) by the design ``memory`` names; ``alloc.empty`` makes every buffer.
    Launches on the current stream; synchronises only for ``validate``."""
    n_rows = inputs.input.shape[0]
    n_classes = inputs.linear_weight.shape[0]
    device = device_properties.current()
    outputs = buffers.allocate(alloc, n_rows, options)
    stats = None
    if n_rows:  # checked before any chunk: the matrix products dwarf the wait for the read
        stats, bad_row = execution.target_statistics(alloc, inputs.target, inputs.weight,
                                                     options, n_classes, device)
        if validate:
            execution.check_targets(start_read(bad_row), inputs.target, n_classes,
                                    options.ignore_index)
    work = prepared_work(alloc, inputs, options, needed, stats, outputs, device)
    grads = DESIGNS[memory].gradients(work, chunk_size)
    if n_rows:
        execution.reduce(outputs, stats, options, device)
    else:
        execution.fill_no_rows(options, outputs)
    loss, z_part, accuracy, predicted = results.returned(outputs, options)
    return LinearCrossEntropyResult(loss, *grads, z_part, accuracy, predicted)


def prepared_work(alloc, inputs, options, needed, stats, outputs, device, columns=None):
    """The LinearWork a design takes for a call (``columns``: a head of a slice of the
    vocabulary, linear_work.Columns), its upstream gradient the one the kernels read."""
    unscale = ones(alloc, (1,), np.dtype(np.float32))
    work = LinearWork(alloc, inputs, options, tuple(needed), stats, outputs, unscale, device,
                      columns, unit_column(alloc, inputs))
    # fp16 only: its smallest subnormal is 6e-8 and its largest value 65504, so the entries
    # g * w_y (p_j - [j == y]) / S_w of a "mean" gradient (S_w = the batch's sum of w_y, g the
    # scalar upstream) would flush to zero for a large batch, or overflow for a loss-scaled g.
    # The kernels form the gradient for an upstream of S_w / |w|max instead (entries ~ (w_y /
    # |w|max)(p_j - [j == y]), within [-1, 1] whatever the class weights' scale; |w|max = 1
    # without them), and each design scales by g |w|max / S_w (``unscale``) once more: the
    # float32 sums as they are rounded, the fast design's rounded input gradient after it.
    if work.rescaled:
        bounds = [w for w in (inputs.weight, None if columns is None else columns.row_weight)
                  if w is not None and w.size]  # of each w_y (a slice's rows: row_weight)
        upstream = _undo_mean(alloc, inputs.grad_output, stats, bounds, unscale)
        work = work._replace(inputs=inputs._replace(grad_output=upstream))
    return work


def _undo_mean(alloc, grad_output, stats, weights, unscale):
    """The upstream S_w / |w|max for the kernels, and unscale[0] = g / that, on the device;
    |w|max the largest magnitude in ``weights`` (arrays), 1 with none. With no row counted,
    S_w = 0 is replaced by a tiny value (and so is a |w|max of 0): the gradient is all zeros
    either way."""
    array_module = np if isinstance(stats, np.ndarray) else devices.cupy
    upstream = alloc.empty(1, np.float32)
    array_module.maximum(stats[STAT_WEIGHT_SUM:STAT_WEIGHT_SUM + 1], TINY, out=upstream)
    if weights:
        largest = functools.reduce(array_module.maximum,
                                   [array_module.abs(w).max() for w in weights])
        upstream /= array_module.maximum(largest, TINY)
    array_module.divide(grad_output, upstream, out=unscale)
    return upstream
