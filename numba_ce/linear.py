"""Fused linear cross-entropy: the loss of a language-model head, logits = x @ W^T + b, without
ever holding all N x V logits.

    stats = target_stats(target)                     once: the batch's reduction denominators
    for each chunk c of C rows:                      one C x V logits buffer, reused
        z     = x_c @ W^T (+ b)                      cuBLAS, fp32 sums, rounded to x's format
                                                     (with b: rounded, then b added, rounded)
        z    <- dL/dz in place                       numba_ce's row kernel: row loss, lse and
                                                     gradient, scaled by the batch's stats
        dx_c  = dz @ W                               cuBLAS (sum over V in fp32)
        dW   += dz^T @ x_c                           cuBLAS into a float32 accumulator
        db   += dz^T @ 1                             cuBLAS (a matrix-vector product)
    loss = reduce(row losses);  dW, db rounded once to W's format (numba_ce.rounding)

The matrix products are the three of an unfused ``linear`` + ``cross_entropy`` (one forward,
two backward), so the work is theirs plus one pass of our kernel per chunk. The weight gradient
sums N / C chunk products: in the weight's bf16 each addition would round (Liger-Kernel issue
1391), so the sum is kept in float32 (V x H x 4 bytes; for float32 weights it is the output
itself) and rounded once at the end.

Memory beyond the inputs and the returned gradients: the C x V logits chunk, three float32 values
a row (row loss, z part, lse) and, for fp16/bf16 weights, the float32 accumulators (V x H x 4
bytes, the floor of this design). The default chunk
is 4096 rows (CHUNK_ROWS), fewer when its logits would exceed 1 GiB.
fp16 "mean" forms the chunk gradient without the 1 / S_w and the upstream factor, which it
applies afterwards (see ``compute``): p_j / S_w would flush to zero, g * p_j overflow.
"""
from typing import Any, NamedTuple

import numpy as np

from . import api, buffers, device_properties, devices, execution, results, validation
from .host_read import start_read
from .kernels import STAT_WEIGHT_SUM
from .matmul import matmul
from .options import Options, check_flag
from .planning import RowInputs, plan_rows
from .results import Array, LinearCrossEntropyResult

# The default chunk: 4096 rows, halved while its logits exceed 1 GiB. Each chunk's weight-gradient
# product reads and writes the float32 accumulator (8 * V * H bytes) for 2 * V * H * C flops:
# enough rows keep it compute-bound (bench/NOTES.md, "Figures behind the code's comments").
CHUNK_ROWS = 4096
CHUNK_BYTES = 2**30


def linear_cross_entropy(input: Array, linear_weight: Array, target: Array, *,
                         linear_bias: Array | None = None, weight: Array | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, chunk_size: int | None = None,
                         validate: bool = True) -> Array:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias`` against ``target``,
    computed chunk by chunk of rows, so that no N x V array is ever allocated.

    Parameters
    ----------
    input : float32, float16 or bfloat16 array (N, H): the hidden states.
    linear_weight : (V, H) array of input's dtype, as nn.Linear's weight.
    target : int32 or int64 array (N,).
    linear_bias : (V,) array of input's dtype, optional.
    weight, ignore_index, reduction, label_smoothing, z_loss, softcap, validate : as
        :func:`numba_ce.cross_entropy`.
    chunk_size : rows per chunk (default: 4096, fewer when C x V logits would exceed 1 GiB).

    Returns
    -------
    float32 loss: 0-d for 'mean' and 'sum', (N,) for 'none'.
    """
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return call(input, linear_weight, target, options, linear_bias=linear_bias, weight=weight,
                chunk_size=chunk_size, validate=validate).loss


def linear_cross_entropy_with_grad(input: Array, linear_weight: Array, target: Array, *,
                                   linear_bias: Array | None = None,
                                   weight: Array | None = None, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0,
                                   z_loss: float = 0.0, softcap: float | None = None,
                                   chunk_size: int | None = None,
                                   grad_output: Array | float | None = None,
                                   return_token_accuracy: bool = False,
                                   return_predicted_tokens: bool = False,
                                   validate: bool = True) -> LinearCrossEntropyResult:
    """The loss of :func:`linear_cross_entropy` and its gradients in one pass over the chunks.

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
                chunk_size=chunk_size, grad_output=grad_output, with_grad=True,
                validate=validate)


def call(input, linear_weight, target, options, *, linear_bias=None, weight=None,
         chunk_size=None, grad_output=None, with_grad=False, validate=True, alloc=None):
    """The checked call behind both functions, with ``options`` an :class:`Options`; ``alloc``
    makes every buffer with its ``empty(shape, dtype)`` (default: the arrays' module; tests pass
    one that poisons them)."""
    validate = check_flag("validate", validate)
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
    result = compute(alloc or xp, inputs, options, needed, chunk_size=chunk_size,
                     validate=validate)
    if on_host:
        result = LinearCrossEntropyResult(*(None if a is None else devices.cupy.asnumpy(a)
                                            for a in result))
    return result


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


def compute(alloc, inputs, options, needed, *, chunk_size=None, validate=True):
    """The loss and the gradients named by ``needed`` = (input, weight, bias) (shared with
    numba_ce.torch); ``alloc.empty`` makes every buffer. Launches on the current stream;
    synchronises only for ``validate``."""
    input, linear_weight, linear_bias, target, weight, grad_output, fmt = inputs
    n_rows, n_features = input.shape
    n_classes = linear_weight.shape[0]
    dtype = input.dtype
    need_input, need_weight, need_bias = needed
    with_grad = any(needed)
    chunk = min(chunk_size or default_chunk(n_classes, dtype.itemsize), max(n_rows, 1))
    device = device_properties.current()

    outputs = buffers.allocate(alloc, n_rows, options)
    grad_input = alloc.empty((n_rows, n_features), dtype) if need_input else None
    weight_sum = _zeros(alloc, (n_classes, n_features)) if need_weight else None
    bias_sum = _zeros(alloc, (n_classes, 1)) if need_bias else None
    ones = _ones(alloc, (chunk, 1), dtype) if need_bias else None
    logits = alloc.empty((chunk, n_classes), dtype)
    stats = None
    if n_rows:  # checked before any chunk: the matrix products dwarf the wait for the read
        stats, bad_row = execution.target_statistics(alloc, target, weight, options, n_classes,
                                                     device)
        if validate:
            execution.check_targets(start_read(bad_row), target, n_classes,
                                    options.ignore_index)
    # fp16 only: its smallest subnormal is 6e-8 and its largest value 65504, so the entries
    # g * p_j / S_w of a "mean" gradient (S_w = the batch's sum of w_y, g the scalar upstream)
    # would flush to zero for a large batch, or overflow for a loss-scaled g. The chunk gradient
    # is formed for an upstream of S_w instead (entries ~ p_j - [j == y], within [-1, 1]); the
    # input gradient is then scaled by g / S_w once more, and the float32 weight and bias sums
    # are scaled by it as they are rounded.
    rescale = bool(with_grad and n_rows and fmt == "float16" and options.reduction == "mean")
    unscale = _ones(alloc, (1,), np.dtype(np.float32))
    if rescale:
        grad_output = _undo_mean(alloc, grad_output, stats, unscale)

    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        x = input[rows]
        z = logits[:x.shape[0]]
        if linear_bias is not None:
            _broadcast_rows(z, linear_bias)
        matmul(x, linear_weight.T, z, accumulate=linear_bias is not None)
        chunk_inputs = RowInputs(z, fmt, target[rows], weight,
                                 grad_output[rows] if grad_output.shape[0] > 1 else grad_output)
        execution.EXECUTOR.launch(plan_rows(chunk_inputs, options, stats,
                                            z if with_grad else None, outputs.rows(rows),
                                            device))
        if need_input:
            matmul(z, linear_weight, grad_input[rows])
        if need_weight:
            matmul(z.T, x, weight_sum, accumulate=True)
        if need_bias:
            matmul(z.T, ones[:x.shape[0]], bias_sum, accumulate=True)

    if n_rows:
        execution.reduce(outputs, stats, options, device)
    else:
        execution.fill_no_rows(options, outputs)
    loss, z_part, accuracy, predicted = results.returned(outputs, options)
    if rescale and need_input:
        execution.scale_rows(grad_input, fmt, unscale, False, device)
    grad_weight = (None if weight_sum is None
                   else _rounded(alloc, weight_sum, unscale, dtype, fmt, device))
    grad_bias = (None if bias_sum is None
                 else _rounded(alloc, bias_sum, unscale, dtype, fmt, device).reshape(-1))
    return LinearCrossEntropyResult(loss, grad_input, grad_weight, grad_bias, z_part, accuracy,
                                    predicted)


def default_chunk(n_classes, itemsize):
    rows = CHUNK_ROWS
    while rows > 1 and rows * n_classes * itemsize > CHUNK_BYTES:
        rows //= 2
    return rows


def _undo_mean(alloc, grad_output, stats, unscale):
    """The upstream S_w for the row kernel, and unscale[0] = g / S_w, on the device. With no
    row counted, S_w = 0 is replaced by a tiny value: the gradient is all zeros either way."""
    array_module = np if isinstance(stats, np.ndarray) else devices.cupy
    weight_sum = alloc.empty(1, np.float32)
    array_module.maximum(stats[STAT_WEIGHT_SUM:STAT_WEIGHT_SUM + 1], np.float32(1e-30),
                         out=weight_sum)
    array_module.divide(grad_output, weight_sum, out=unscale)
    return weight_sum


def _zeros(alloc, shape):
    out = alloc.empty(shape, np.float32)
    out.fill(0)
    return out


def _ones(alloc, shape, dtype):
    """An array of ones in ``dtype`` (fp16/bf16 too), written through an integer view of it."""
    out = alloc.empty(shape, dtype)
    bits = np.dtype(f"int{8 * dtype.itemsize}")
    out.view(bits).fill(np.ones(1, dtype).view(bits)[0])
    return out


def _broadcast_rows(out, row):
    """Every row of ``out`` = ``row`` (bits copied through an integer view, any format)."""
    bits = np.dtype(f"int{8 * row.dtype.itemsize}")
    out.view(bits)[...] = row.view(bits)


def _rounded(alloc, sums, scale, dtype, fmt, device):
    """The float32 ``sums`` times scale[0] in ``dtype``: the sums themselves for float32 (scale
    is 1 there), else rounded once."""
    if dtype == np.float32:
        return sums
    out = alloc.empty(sums.shape, dtype)
    execution.round_into(sums, scale, out, fmt, device)
    return out
