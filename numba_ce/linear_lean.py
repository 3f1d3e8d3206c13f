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
Memory beyond the inputs and the returned gradients: one workspace, allocated once, and O(N):

    [0, L)          the logits of a slice of pass B (N x V_s, L = LOGITS_BYTES)
    [L, L + 4NH)    the float32 input-gradient sum of pass B (fp16/bf16 only: a float32 input
                    gradient is its own sum)
    [0, L + 4NH)    all of it: the logits of a chunk of pass A, which ends before pass B starts

With the weight gradient asked for, pass A's logits go to the returned weight gradient's memory
instead where a chunk fits there (V x H elements: up to H rows), which pass B then overwrites
slice by slice. So pass A's products have rows enough (H = 4096 at the benchmark's shape, as the
fast design's chunks), and the peak does not depend on when an allocator frees (the torch
adapter's keeps a call's buffers until it returns).

fp16 "mean": the kernels form the gradient for an upstream of S_w (entries ~ p_j - [j == y]; p_j
/ S_w would flush to zero) and the float32 sums are scaled by g / S_w as they are rounded: the
input gradient's sum, and each slice's weight and bias gradient, whose product goes to a float32
scratch first, block by block of at most the logits slice's bytes (only in this case).
"""
from typing import NamedTuple

import numpy as np

from . import execution
from .linear_work import logits_into, rounded, row_chunk
from .matmul import matmul
from .planning import RowInputs, plan_slice_gradient

# Pass B's logits slice. At 8192 x 4096 x 128256 bf16: slices of 4096 classes (products of
# 8192 x 4096 x 4096), 64 MiB beside the 128 MiB float32 input-gradient sum (bench/NOTES.md,
# "Linear cross-entropy: the lean design").
LOGITS_BYTES = 64 * 2**20
# Slices of whole tiles where they are large enough (which also keeps a slice's rows in whole
# 8-byte words).
CLASS_UNIT = 64
WORD_BYTES = 8  # the input-gradient sum starts on a word, after the logits


class LeanChunks(NamedTuple):
    rows: int          # C: rows of logits a chunk of pass A
    classes: int       # V_s: classes a slice of pass B
    logits_bytes: int  # L: the workspace's logits part (a multiple of WORD_BYTES)
    sum_bytes: int     # the float32 input-gradient sum after it (0 where not needed)
    loss_in_weight_gradient: bool  # pass A's logits in the weight gradient's memory


def lean_chunks(n_rows, n_features, n_classes, itemsize, needed, chunk_size=None):
    """The chunks of both passes and the workspace's parts (module docstring) for the gradients
    ``needed`` = (input, weight, bias).

    By default pass B's slices hold LOGITS_BYTES of logits and pass A's chunks as many rows as
    the larger of the whole workspace and (when it is needed) the weight gradient hold, balanced
    (N / C rows each, not a short last one). ``chunk_size`` (rows, as the fast design's) fixes
    pass A's chunk instead, and pass B's slices then hold as many logits: chunk_size x V. A
    chunk of up to H rows goes to the weight gradient's memory when it is needed."""
    need_input, need_weight, _ = needed
    sum_bytes = n_rows * n_features * 4 if need_input and itemsize < 4 else 0
    if chunk_size is None:  # LOGITS_BYTES, or all the logits where they take less
        logits_bytes = min(LOGITS_BYTES, _words(max(n_rows, 1) * n_classes * itemsize))
        rows = max((logits_bytes + sum_bytes) // (n_classes * itemsize),
                   n_features if need_weight else 1, 1)
        rows = -(-n_rows // -(-n_rows // rows)) if n_rows else 1
    else:
        rows = min(chunk_size, max(n_rows, 1))
        logits_bytes = _words(rows * n_classes * itemsize)
    classes = min(_whole(logits_bytes // itemsize // max(n_rows, 1), CLASS_UNIT), n_classes)
    # A slice has at least one class of all N rows, which may be more than chunk_size x V (or
    # LOGITS_BYTES) hold: the logits part grows to it.
    logits_bytes = max(logits_bytes, _words(n_rows * classes * itemsize))
    return LeanChunks(rows, classes, logits_bytes, sum_bytes,
                      bool(need_weight and rows <= n_features))


def gradients(work, chunk_size, with_loss=True):
    """Row losses and lse into work.outputs (pass A; without ``with_loss``, work.outputs.row_lse
    holds them already) and the gradients named by work.needed (pass B): (grad_input,
    grad_linear_weight, grad_linear_bias), each None where not needed."""
    inputs = work.inputs
    n_rows, n_features = inputs.input.shape
    dtype = inputs.input.dtype
    n_classes = inputs.linear_weight.shape[0]
    need_input, need_weight, _ = work.needed
    chunks = lean_chunks(n_rows, n_features, n_classes, dtype.itemsize, work.needed, chunk_size)
    workspace = work.alloc.empty(chunks.logits_bytes + chunks.sum_bytes, np.uint8)
    grad_weight = work.alloc.empty((n_classes, n_features), dtype) if need_weight else None
    if with_loss:
        loss_pass(work, chunks.rows, grad_weight.reshape(-1) if chunks.loss_in_weight_gradient
                  else workspace.view(dtype))
    if not any(work.needed):
        return None, None, None
    if chunks.sum_bytes:
        input_sum = workspace[chunks.logits_bytes:].view(np.float32).reshape(n_rows, n_features)
    else:  # float32: the input gradient is its own sum
        input_sum = work.alloc.empty((n_rows, n_features), np.float32) if need_input else None
    logits = workspace[:chunks.logits_bytes].view(dtype)
    grad_bias = _gradient_pass(work, chunks.classes, logits, input_sum, grad_weight)
    return (None if input_sum is None else rounded(work, input_sum)), grad_weight, grad_bias


def loss_pass(work, chunk, memory, each=row_chunk):
    """Pass A: row losses and lse (and the argmax outputs) of every row, chunk by chunk of
    ``chunk`` rows, their logits in ``memory`` (1-D, of the input's format): ``each(work, rows,
    z)`` computes a chunk's logits into z and reads them (linear_work.row_chunk: the row
    kernel)."""
    n_rows = work.inputs.input.shape[0]
    n_classes = work.inputs.linear_weight.shape[0]
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        count = rows.stop - start
        each(work, rows, memory[:count * n_classes].reshape(count, n_classes))


def _gradient_pass(work, width, memory, input_sum, grad_weight):
    """Pass B, slice by slice of ``width`` classes, their logits in ``memory`` (1-D, of the
    input's format): the float32 input-gradient sum into ``input_sum`` and the weight gradient
    into ``grad_weight`` (each None where not needed); returns grad_linear_bias (None where not
    needed)."""
    alloc, inputs = work.alloc, work.inputs
    x, linear_weight, linear_bias = inputs.input, inputs.linear_weight, inputs.linear_bias
    n_rows, n_features = x.shape
    n_classes = linear_weight.shape[0]
    dtype = x.dtype
    _, need_weight, need_bias = work.needed
    grad_bias = alloc.empty(n_classes, dtype) if need_bias else None
    # fp16 "mean": the weight gradient's float32 sums go through a scratch of at most the
    # logits slice's bytes (a slice of V_s x H float32 would be up to 2H / N times that: all of
    # V x H for a batch of few rows), block by block of its rows
    scratch_rows = min(width, max(1, memory.nbytes // (4 * max(n_features, 1))))
    weight_sums = (alloc.empty((scratch_rows, n_features), np.float32)
                   if need_weight and work.rescaled else None)
    bias_sums = alloc.empty((width, 1), np.float32) if need_bias and work.rescaled else None
    for start in range(0, n_classes, width):
        classes = slice(start, min(start + width, n_classes))
        z = memory[:n_rows * (classes.stop - start)].reshape(n_rows, classes.stop - start)
        logits_into(x, linear_weight[classes],
                    None if linear_bias is None else linear_bias[classes], z, work.unit_column)
        if n_rows:
            execution.EXECUTOR.launch(_slice_plan(work, z, classes))
        if input_sum is not None:
            matmul(z, linear_weight[classes], input_sum, accumulate=start > 0)
        if need_weight:
            _rounded_product(work, z.T, x, grad_weight[classes], weight_sums)
        if need_bias:
            _rounded_product(work, z.T, work.unit_column, grad_bias[classes].reshape(-1, 1),
                             bias_sums)
    return grad_bias


def _slice_plan(work, z, classes):
    """The slice gradient's plan for the logits ``z`` of the head's classes ``classes`` (a
    slice), in place: of all the head's classes, or (work.columns) of a slice of a vocabulary
    whose rows' w_y are given."""
    inputs, columns = work.inputs, work.columns
    weight = inputs.weight
    if columns is None:
        offset, n_classes, row_weight = 0, inputs.linear_weight.shape[0], None
    else:
        offset, n_classes, row_weight = columns
        weight = None if weight is None else weight[classes]
    slice_inputs = RowInputs(z, inputs.fmt, inputs.target, weight, inputs.grad_output)
    return plan_slice_gradient(slice_inputs, offset + classes.start, n_classes, work.options,
                               work.stats, work.outputs.row_lse, work.device,
                               row_weight=row_weight)


def _rounded_product(work, a, b, out, sums):
    """out = a @ b, a part of the returned weight or bias gradient, rounded once: by the product
    itself, or (fp16 "mean", ``sums`` a float32 scratch) as its float32 sums times g / S_w,
    ``sums``'s rows at a time."""
    if sums is None:
        matmul(a, b, out)
        return
    block = sums.shape[0]
    for start in range(0, out.shape[0], block):
        rows = slice(start, min(start + block, out.shape[0]))
        part = sums[:rows.stop - start]
        matmul(a[rows], b, part)
        execution.round_into(part, work.unscale, out[rows], work.inputs.fmt, work.device)


def _words(nbytes):
    """``nbytes`` rounded up to whole words (WORD_BYTES)."""
    return -(-nbytes // WORD_BYTES) * WORD_BYTES


def _whole(count, unit):
    """``count`` rounded down to a multiple of ``unit`` where it holds one, else at least 1."""
    return count - count % unit if count >= unit else max(count, 1)
