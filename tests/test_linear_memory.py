"""The lean linear cross-entropy's memory, counted by the allocator a call is given (every buffer
comes from its ``empty``): no V x H float32 array and no N x V logits are ever made, and the
bytes alive at once stay within the design's bound (numba_ce.linear_lean); the fast design, for
contrast, makes its V x H float32 sum. Also the default chunks at the issue's GPU shapes."""
import weakref
from typing import NamedTuple

import numpy as np
import pytest

from numba_ce import linear
from numba_ce.linear_lean import LOGITS_BYTES, lean_chunks
from numba_ce.options import Options
from helpers import PoisonedArrays, random_target, random_weight, torch_linear_loss_and_grads
from helpers import assert_rounded_close
from test_linear import random_head

GIB = 2**30


class Allocation(NamedTuple):
    shape: tuple
    dtype: np.dtype
    nbytes: int


class CountingArrays(PoisonedArrays):
    """PoisonedArrays that records each allocation and the bytes alive at once: an array's
    bytes count from its ``empty`` until it and every view of it are gone (a weakref
    finalizer on the array)."""

    def __init__(self):
        super().__init__()
        self.allocations = []
        self.live = 0
        self.peak = 0

    def empty(self, shape, dtype):
        out = super().empty(shape, dtype)
        self.allocations.append(Allocation(tuple(out.shape), np.dtype(dtype), out.nbytes))
        self.live += out.nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(out, self._freed, out.nbytes)
        return out

    def _freed(self, nbytes):
        self.live -= nbytes


N_ROWS, N_FEATURES, N_CLASSES = 64, 16, 200


def counted_call(rng, memory, dtype="bfloat16", chunk_size=8, reduction="sum", n_rows=N_ROWS):
    """A call with every gradient (bias and class weights too) through a CountingArrays, checked
    against torch's float64 computation; returns the allocator and the result."""
    x, w, b = random_head(rng, n_rows, N_FEATURES, N_CLASSES, dtype, True)
    target = random_target(rng, n_rows, N_CLASSES, ignored_share=0.2)
    weight = random_weight(rng, N_CLASSES, True)
    alloc = CountingArrays()
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    # inputs where the allocator's arrays live (CuPy's on a GPU): NumPy inputs would send the
    # call's results back to the host and free the counted buffers before the count is read
    x_in, w_in, b_in, target_in, weight_in = (alloc.xp.asarray(a)
                                              for a in (x, w, b, target, weight))
    res = linear.call(x_in, w_in, target_in, Options(**options), linear_bias=b_in,
                      weight=weight_in, memory=memory, chunk_size=chunk_size, with_grad=True,
                      alloc=alloc)
    expected = torch_linear_loss_and_grads(x, w, target, linear_bias=b, weight=weight,
                                           logits_format=dtype, **options)
    for name, got, want, magnitude in zip(["grad_input", "grad_linear_weight",
                                           "grad_linear_bias"], res[1:4], expected[1:4],
                                          expected.magnitudes):
        assert_rounded_close(got, want, magnitude, dtype, name)
    return alloc, res


# chunk 8 <= H: pass A's logits in the weight gradient's memory; 32 > H: in the workspace.
# Pass B's slices then hold 8 x V or 32 x V logits: 25 classes, or 100 rounded down to whole
# tiles of 64 (linear_lean.CLASS_UNIT), for the 64 rows.
@pytest.mark.parametrize("chunk_size,classes", [(8, 25), (32, 64)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lean_design_allocates_no_vocabulary_sized_sums_or_logits(rng, dtype, chunk_size,
                                                                  classes):
    alloc, res = counted_call(rng, "low", dtype, chunk_size)
    itemsize = np.dtype(res.grad_input.dtype).itemsize
    chunks = lean_chunks(N_ROWS, N_FEATURES, N_CLASSES, itemsize, (True, True, True),
                         chunk_size)
    assert chunks == (chunk_size, classes, chunk_size * N_CLASSES * itemsize,
                      N_ROWS * N_FEATURES * 4, chunk_size <= N_FEATURES)
    float32_sums = [a for a in alloc.allocations
                    if a.dtype == np.float32 and np.prod(a.shape) >= N_CLASSES * N_FEATURES]
    assert not float32_sums, float32_sums
    logits = [a for a in alloc.allocations if a.nbytes >= N_ROWS * N_CLASSES * itemsize]
    assert not logits, logits
    # The design's bound on the bytes alive at once (linear_lean's docstring): the returned
    # gradients, the one workspace (the logits of a slice, or of a chunk, and the float32
    # input-gradient sum) and O(N): the row outputs, the statistics, g / S_w, a column of ones.
    returned = sum(a.nbytes for a in res[1:4])
    workspace = chunks.logits_bytes + chunks.sum_bytes
    assert Allocation((workspace,), np.dtype(np.uint8), workspace) in alloc.allocations
    small = 4 * (3 * N_ROWS + 2) + 3 * 4 + 8 + 4 + N_ROWS * itemsize
    assert returned + workspace < alloc.peak <= returned + workspace + small, alloc.peak
    # alive after the call: what it returns, the gradients and the one allocation of the row
    # outputs (numba_ce.buffers) that the loss is a view of
    assert alloc.live == returned + 4 * (3 * N_ROWS + 2)


def test_fp16_mean_sums_the_weight_gradient_in_blocks_of_the_logits_slices_bytes(rng):
    """fp16 "mean" rounds the weight gradient's float32 sums scaled by g / S_w, through a
    scratch: for a batch of few rows (N < 2H), a slice's V_s x H float32 sums would outgrow the
    N x V_s logits slice, up to all of V x H; the scratch holds at most the slice's bytes."""
    n_rows, chunk_size = 8, 8
    alloc, _ = counted_call(rng, "low", "float16", chunk_size, "mean", n_rows)
    chunks = lean_chunks(n_rows, N_FEATURES, N_CLASSES, 2, (True, True, True), chunk_size)
    assert chunks.classes * N_FEATURES * 4 > chunks.logits_bytes  # the case the blocks are for
    scratch = [a for a in alloc.allocations if a.dtype == np.float32 and len(a.shape) == 2
               and a.shape[1] == N_FEATURES and a.shape[0] != n_rows]
    assert scratch == [Allocation((chunks.logits_bytes // (4 * N_FEATURES), N_FEATURES),
                                  np.dtype(np.float32), chunks.logits_bytes)], scratch


@pytest.mark.parametrize("memory", ["low", "fast"])
def test_slices_of_all_rows_fit_however_small_the_chunk(rng, memory):
    """chunk_size x V smaller than the batch (a small head, a chunk of one row): a slice of pass
    B still holds one class of every row, and both designs give torch's gradients."""
    counted_call(rng, memory, "bfloat16", chunk_size=1, n_rows=N_CLASSES + 3)


def test_fast_design_keeps_a_float32_weight_gradient_sum(rng):
    """The contrast that shows the counting sees it: memory="fast" sums dW in float32 V x H."""
    alloc, _ = counted_call(rng, "fast")
    assert Allocation((N_CLASSES, N_FEATURES), np.dtype(np.float32),
                      N_CLASSES * N_FEATURES * 4) in alloc.allocations


# The issue's GPU shapes (N, H, V), bf16: the default chunks (rows of pass A, classes of pass
# B; pass A in the weight gradient's memory or not) and the peak they give.
ISSUE_SHAPES = [((8192, 4096, 128256), (4096, 4096, True)),
                ((16384, 2048, 32000), (2731, 2048, False)),
                ((4096, 3584, 256000), (2048, 8192, True))]


@pytest.mark.parametrize("shape,expected", ISSUE_SHAPES)
def test_default_chunks_at_the_issues_shapes(shape, expected):
    """Pass B's slices hold LOGITS_BYTES of logits; the workspace adds the float32 input-gradient
    sum; pass A's chunks fill the workspace or the weight gradient, whichever holds more rows.
    The peak, with the returned gradients: at 8192 x 4096 x 128256 within the issue's target of
    1.25 GiB."""
    n_rows, n_features, n_classes = shape
    chunks = lean_chunks(n_rows, n_features, n_classes, 2, (True, True, False))
    rows, classes, in_weight_gradient = expected
    assert (chunks.rows, chunks.classes, chunks.loss_in_weight_gradient) == expected
    assert chunks.logits_bytes == LOGITS_BYTES >= n_rows * classes * 2
    workspace = LOGITS_BYTES + n_rows * n_features * 4
    assert chunks.sum_bytes + chunks.logits_bytes == workspace
    returned = (n_classes + n_rows) * n_features * 2
    assert rows * n_classes * 2 <= (returned if in_weight_gradient else workspace)
    if shape == (8192, 4096, 128256):
        assert returned + workspace <= 1.25 * GIB, (returned + workspace) / GIB
