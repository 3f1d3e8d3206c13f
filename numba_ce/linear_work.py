"""What both designs of the fused linear cross-entropy share (numba_ce.linear_fast,
numba_ce.linear_lean): the call's state as one value, the logits product of a block of the
head, a chunk of rows through the row kernel, and the float32 -> format rounding of a sum.
"""
from typing import Any, NamedTuple

import numpy as np

from . import execution
from .matmul import matmul
from .planning import RowInputs, plan_rows


class LinearWork(NamedTuple):
    """A call as numba_ce.linear.compute hands it to a design: ``alloc.empty`` makes every
    buffer; ``inputs`` a linear.LinearInputs whose grad_output is the one the kernels read
    (S_w for fp16 "mean", see ``unscale``); ``needed`` = (input, weight, bias) gradients;
    ``stats`` the batch's target statistics (None without rows); ``outputs`` the call's
    buffers.RowOutputs; ``unscale`` (1,) float32: what the float32 sums are multiplied by as
    they are rounded (g / S_w for fp16 "mean", else 1); ``columns`` where the head's classes
    sit in the vocabulary (None: the head is all of it); ``unit_column`` (N, 1) ones of the
    input's format where the head has a bias (:func:`logits_into` and the bias gradient's
    products), else None."""
    alloc: Any
    inputs: Any
    options: Any
    needed: tuple
    stats: Any
    outputs: Any
    unscale: Any
    device: Any
    columns: Any = None
    unit_column: Any = None

    @property
    def rescaled(self):
        """Whether the kernels' gradients leave out g / S_w (fp16 "mean"), for ``unscale``."""
        return self.inputs.fmt == "float16" and self.options.reduction == "mean" and any(
            self.needed) and self.stats is not None


class Columns(NamedTuple):
    """A head of a slice of the vocabulary (a vocabulary-parallel rank's): its classes are
    [offset, offset + V_s) of ``n_classes``; ``inputs.weight`` holds the slice's class weights
    and ``row_weight`` (N,) float32 each row's w_y (numba_ce.softmax_states.RowStatistics)."""
    offset: int
    n_classes: int
    row_weight: Any


def logits_into(x, linear_weight, linear_bias, out, unit_column):
    """out = x @ linear_weight.T (+ linear_bias) in out's format: float32 sums rounded once,
    and with a bias, the bias rows added to that and rounded once more. The bias goes in as a
    product of its own, ones (``unit_column``, at least N x 1) times the bias row: its terms are
    exact, so cuBLAS's sum with beta = 1 rounds z + b once whichever kernel the shape gets (a
    product of x rounded straight into a bias-filled C is rounded once or twice, by kernel: an
    H100 gave pass B's slices of 25 classes other logits than pass A's chunks, and the lean
    design's gradient needs the same bits from both)."""
    matmul(x, linear_weight.T, out)
    if linear_bias is not None:
        matmul(unit_column[:x.shape[0]], linear_bias.reshape(1, -1), out, accumulate=True)


def row_chunk(work, rows, z, with_grad=False):
    """The logits of the rows ``rows`` (a slice) into ``z``, then the row kernel on them: row
    losses and lse into work.outputs and, ``with_grad``, the gradient in place of z."""
    inputs = work.inputs
    logits_into(inputs.input[rows], inputs.linear_weight, inputs.linear_bias, z,
                work.unit_column)
    grad_output = inputs.grad_output
    chunk_inputs = RowInputs(z, inputs.fmt, inputs.target[rows], inputs.weight,
                             grad_output[rows] if grad_output.shape[0] > 1 else grad_output)
    execution.EXECUTOR.launch(plan_rows(chunk_inputs, work.options, work.stats,
                                        z if with_grad else None, work.outputs.rows(rows),
                                        work.device))


def unit_column(alloc, inputs):
    """LinearWork.unit_column for ``inputs`` (a linear.LinearInputs): (N, 1) ones of the
    input's format where the head has a bias, else None."""
    if inputs.linear_bias is None:
        return None
    return ones(alloc, (inputs.input.shape[0], 1), inputs.input.dtype)


def ones(alloc, shape, dtype):
    """An array of ones in ``dtype`` (fp16/bf16 too), written through an integer view of it."""
    out = alloc.empty(shape, dtype)
    bits = np.dtype(f"int{8 * dtype.itemsize}")
    out.view(bits).fill(np.ones(1, dtype).view(bits)[0])
    return out


def rounded(work, sums):
    """The float32 ``sums`` times work.unscale[0] in the input's format: the sums themselves
    for float32 (the scale is 1 there), else a new array, each element rounded once."""
    dtype = work.inputs.input.dtype
    if dtype == np.float32:
        return sums
    out = work.alloc.empty(sums.shape, dtype)
    execution.round_into(sums, work.unscale, out, work.inputs.fmt, work.device)
    return out
