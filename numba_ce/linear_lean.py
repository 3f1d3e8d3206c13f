"""The fused linear cross-entropy's lean design (memory="low", the default): two passes over
the head, no N x V logits and no V x H float32 sum.

    Pass A, the loss: chunks of C rows             one C x V logits buffer, reused
        z      = x_c @ W^T (+ b)                   rounded to x's format as in the fast design
        loss_r, lse_r                              the row kernel without the gradient
    Pass B, the gradients: slices of V_s classes   one N x V_s logits buffer, reused
        z      = x @ W_s^T (+ b_s)                 the same logits again (same rounding)
        z     <- dL/dz in place                    numba_ce.slice_gradient: p_j = exp(z_j - lse_r),
                                                   no max or sum, the target tested at the slice's
                                                   offset, eps / V and S_w of the full V
        dX    += dz @ W_s                          float32 N x H sum, rounded once at the end
        dW_s   = dz^T @ x                          all N rows in one product: its float32 sums are
                                                   rounded once, straight into W's format
        db_s   = dz^T @ 1                          the same, a matrix-vector product

Four products where the fast design has three (the logits are computed twice), and no V x H
float32 accumulator: each slice of the weight gradient is one complete product over the rows.
Memory beyond the inputs and the returned gradients: the logits buffer of pass B (N x V_s,
LOGITS_BYTES), the float32 N x H input-gradient sum (for fp16/bf16; a float32 input gradient is
its own sum) and O(N). Pass A's buffer (C x V) is freed before pass B starts and may take what
pass B will hold (its buffers and the weight gradient it returns), so that its products have
rows enough and the peak is pass B's.

fp16 "mean": the kernels form the gradient for an upstream of S_w (entries ~ p_j - [j == y]; p_j
/ S_w would flush to zero) and the float32 sums are scaled by g / S_w as they are rounded: the
input gradient's sum, and each slice's weight and bias gradient, whose product goes to a float32
V_s x H scratch first (only in this case).
"""
from typing import NamedTuple

import numpy as np

from . import execution
from .linear_work import logits_into, ones, rounded, row_chunk
from .matmul import matmul
from .planning import RowInputs, plan_slice_gradient

# Pass B's logits buffer. At 8192 x 4096 x 128256 bf16: slices of 4096 classes (products of
# 8192 x 4096 x 4096), 64 MiB beside the 128 MiB float32 input-gradient sum and the returned
# weight gradient (bench/NOTES.md, "Linear cross-entropy: the lean design").
LOGITS_BYTES = 64 * 2**20
# Slices of whole tiles where they are large enough (which also keeps a slice's rows in whole
# 8-byte words).
CLASS_UNIT = 64


class LeanChunks(NamedTuple):
    rows: int     # C: rows of logits a chunk of pass A
    classes: int  # V_s: classes a slice of pass B


def lean_chunks(n_rows, n_features, n_classes, itemsize, needed, chunk_size=None):
    """The chunks of both passes for the gradients ``needed`` = (input, weight, bias).

    By default pass B's slices hold LOGITS_BYTES of logits, and pass A's chunks may take all
    that pass B will hold: the logits, the float32 input-gradient sum and the returned weight
    gradient (not allocated before pass B); so the peak is pass B's, and pass A's products have
    rows enough to keep the tensor cores busy. Its chunks are balanced (N / C rows each, not a
    short last one). ``chunk_size`` (rows, as the fast design's) fixes pass A's chunk instead,
    and pass B's slices then hold as many logits: chunk_size x V."""
    if chunk_size is None:
        need_input, need_weight, _ = needed
        pass_b = (LOGITS_BYTES + (n_rows * n_features * 4 if need_input else 0)
                  + (n_classes * n_features * itemsize if need_weight else 0))
        rows = max(pass_b // (n_classes * itemsize), 1)
        rows = -(-n_rows // -(-n_rows // rows)) if n_rows else 1
        elements = LOGITS_BYTES // itemsize
    else:
        rows, elements = chunk_size, chunk_size * n_classes
    classes = _whole(elements // max(n_rows, 1), CLASS_UNIT)
    return LeanChunks(min(rows, max(n_rows, 1)), min(classes, n_classes))


def gradients(work, chunk_size):
    """Row losses and lse into work.outputs (pass A) and the gradients named by work.needed
    (pass B): (grad_input, grad_linear_weight, grad_linear_bias), each None where not
    needed."""
    inputs = work.inputs
    n_rows, n_features = inputs.input.shape
    chunks = lean_chunks(n_rows, n_features, inputs.linear_weight.shape[0],
                         inputs.input.dtype.itemsize, work.needed, chunk_size)
    _loss_pass(work, chunks.rows)
    if not any(work.needed):
        return None, None, None
    input_sum, grad_weight, grad_bias = _gradient_pass(work, chunks.classes)
    return (None if input_sum is None else rounded(work, input_sum)), grad_weight, grad_bias


def _loss_pass(work, chunk):
    """Pass A: row losses and lse (and the argmax outputs) of every row, chunk by chunk; the
    logits buffer is freed on return."""
    n_rows = work.inputs.input.shape[0]
    logits = work.alloc.empty((chunk, work.inputs.linear_weight.shape[0]),
                              work.inputs.input.dtype)
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        row_chunk(work, rows, logits[:rows.stop - start], False)


def _gradient_pass(work, width):
    """Pass B: (the float32 input-gradient sum, grad_linear_weight, grad_linear_bias), slice by
    slice of ``width`` classes; the logits buffer and the fp16 "mean" scratch are freed on
    return."""
    alloc, inputs, options = work.alloc, work.inputs, work.options
    x, linear_weight, linear_bias = inputs.input, inputs.linear_weight, inputs.linear_bias
    n_rows, n_features = x.shape
    n_classes = linear_weight.shape[0]
    dtype = x.dtype
    need_input, need_weight, need_bias = work.needed
    input_sum = alloc.empty((n_rows, n_features), np.float32) if need_input else None
    grad_weight = alloc.empty((n_classes, n_features), dtype) if need_weight else None
    grad_bias = alloc.empty(n_classes, dtype) if need_bias else None
    unit_column = ones(alloc, (n_rows, 1), dtype) if need_bias else None
    logits = alloc.empty(n_rows * width, dtype)  # each slice's N x V_s logits, row-major
    weight_sums = (alloc.empty((width, n_features), np.float32)
                   if need_weight and work.rescaled else None)
    bias_sums = alloc.empty((width, 1), np.float32) if need_bias and work.rescaled else None
    for start in range(0, n_classes, width):
        classes = slice(start, min(start + width, n_classes))
        z = logits[:n_rows * (classes.stop - start)].reshape(n_rows, classes.stop - start)
        logits_into(x, linear_weight[classes],
                    None if linear_bias is None else linear_bias[classes], z)
        if n_rows:
            slice_inputs = RowInputs(z, inputs.fmt, inputs.target, inputs.weight,
                                     inputs.grad_output)
            execution.EXECUTOR.launch(plan_slice_gradient(
                slice_inputs, start, n_classes, options, work.stats, work.outputs.row_lse,
                work.device))
        if need_input:
            matmul(z, linear_weight[classes], input_sum, accumulate=start > 0)
        if need_weight:
            _rounded_product(work, z.T, x, grad_weight[classes], weight_sums)
        if need_bias:
            _rounded_product(work, z.T, unit_column, grad_bias[classes].reshape(-1, 1),
                             bias_sums)
    return input_sum, grad_weight, grad_bias


def _rounded_product(work, a, b, out, sums):
    """out = a @ b, a part of the returned weight or bias gradient, rounded once: by the product
    itself, or (fp16 "mean", ``sums`` a float32 scratch of at least out's rows) as its float32
    sums times g / S_w."""
    if sums is None:
        matmul(a, b, out)
        return
    sums = sums[:out.shape[0]]
    matmul(a, b, sums)
    execution.round_into(sums, work.unscale, out, work.inputs.fmt, work.device)


def _whole(count, unit):
    """``count`` rounded down to a multiple of ``unit`` where it holds one, else at least 1."""
    return count - count % unit if count >= unit else max(count, 1)
