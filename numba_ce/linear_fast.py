"""The fused linear cross-entropy's fast design (memory="fast"): chunks of rows, the three
matrix products of an unfused linear + cross_entropy, and a float32 weight-gradient sum.

    for each chunk c of C rows:                      one C x V logits buffer, reused
        z     = x_c @ W^T (+ b)                      cuBLAS, fp32 sums, rounded to x's format
                                                     (with b: rounded, then b added, rounded)
        z    <- dL/dz in place                       the row kernel: row loss, lse and
                                                     gradient, scaled by the batch's stats
        dx_c  = dz @ W                               cuBLAS (sum over V in fp32)
        dW   += dz^T @ x_c                           cuBLAS into a float32 accumulator
        db   += dz^T @ 1                             cuBLAS (a matrix-vector product)
    dW, db rounded once to W's format (numba_ce.rounding)

The work is the unfused computation's three products plus one pass of the row kernel a chunk.
The weight gradient sums N / C chunk products: in the weight's bf16 each addition would round
(Liger-Kernel issue 1391), so the sum is kept in float32 (V x H x 4 bytes; for float32 weights
it is the output itself) and rounded once at the end.

Memory beyond the inputs and the returned gradients: the C x V logits chunk and, for fp16/bf16
weights, the float32 accumulators (V x H x 4 bytes, the floor of this design). The default chunk
is 4096 rows (CHUNK_ROWS), fewer when its logits would exceed 1 GiB (CHUNK_BYTES).
"""
import numpy as np

from . import execution
from .linear_work import rounded, row_chunk
from .matmul import matmul

# The default chunk: 4096 rows, halved while its logits exceed 1 GiB. Each chunk's weight-gradient
# product reads and writes the float32 accumulator (8 * V * H bytes) for 2 * V * H * C flops:
# enough rows keep it compute-bound (bench/NOTES.md, "Figures behind the code's comments").
CHUNK_ROWS = 4096
CHUNK_BYTES = 2**30


def gradients(work, chunk_size):
    """Row losses and lse into work.outputs, chunk by chunk of ``chunk_size`` rows (None: the
    default), and the gradients named by work.needed: (grad_input, grad_linear_weight,
    grad_linear_bias), each None where not needed."""
    alloc, inputs = work.alloc, work.inputs
    n_rows, n_features = inputs.input.shape
    n_classes = inputs.linear_weight.shape[0]
    dtype = inputs.input.dtype
    need_input, need_weight, need_bias = work.needed
    chunk = min(chunk_size or default_chunk(n_classes, dtype.itemsize), max(n_rows, 1))
    grad_input = alloc.empty((n_rows, n_features), dtype) if need_input else None
    weight_sum = _zeros(alloc, (n_classes, n_features)) if need_weight else None
    bias_sum = _zeros(alloc, (n_classes, 1)) if need_bias else None
    logits = alloc.empty((chunk, n_classes), dtype)
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        x = inputs.input[rows]
        z = logits[:x.shape[0]]
        row_chunk(work, rows, z, any(work.needed))
        if need_input:
            matmul(z, inputs.linear_weight, grad_input[rows])
        if need_weight:
            matmul(z.T, x, weight_sum, accumulate=True)
        if need_bias:
            matmul(z.T, work.unit_column[rows], bias_sum, accumulate=True)
    if work.rescaled and need_input:  # the rounded input gradient times g / S_w
        execution.scale_rows(grad_input, inputs.fmt, work.unscale, False, work.device)
    grad_weight = None if weight_sum is None else rounded(work, weight_sum)
    grad_bias = None if bias_sum is None else rounded(work, bias_sum).reshape(-1)
    return grad_input, grad_weight, grad_bias


def default_chunk(n_classes, itemsize):
    rows = CHUNK_ROWS
    while rows > 1 and rows * n_classes * itemsize > CHUNK_BYTES:
        rows //= 2
    return rows


def _zeros(alloc, shape):
    out = alloc.empty(shape, np.float32)
    out.fill(0)
    return out
