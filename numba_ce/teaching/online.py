"""Step 2, online softmax: the max and the sum in one pass, then step 1's gradient pass.

Each thread keeps a state (m, s) over the elements it has seen: their max m and
s = sum_i exp(x_i - m). A new element x moves the max and rescales the sum to it:

    m' = max(m, x)
    s' = s * exp(m - m') + exp(x - m')          (exp(m - m') = 1 when the max did not move)

so s is always relative to the current max and never overflows. The block then merges the
threads' states: m = max_t m_t,  s = sum_t s_t * exp(m_t - m),  lse = m + log(s).

Memory traffic: 2 reads and 1 write of an N x V array, 12 N V bytes in fp32. One exp more per
element (the rescale) buys a whole read of the logits: arithmetic is cheap, bytes are not.
"""
import math

import numpy as np
from numba import cuda

from ..reductions import NEG_INF, ZERO
from . import host
from .naive import gradient
from .tree import MAX_THREADS, block_max, block_sum

DRAM_ARRAYS = 3  # two reads of the logits, one write of the gradient


@cuda.jit
def row_lse(logits, lse_out):
    """The online pass: lse = log(sum_j exp(x_j)) in one read.  lse_out # (N,) float32."""
    scratch = cuda.shared.array(MAX_THREADS, np.float32)
    row = cuda.blockIdx.x
    m = NEG_INF
    s = ZERO
    for j in range(cuda.threadIdx.x, logits.shape[1], cuda.blockDim.x):
        x = logits[row, j]
        new_m = max(m, x)
        s = s * math.exp(m - new_m) + math.exp(x - new_m)
        m = new_m
    # Merge the threads' states; a thread without elements has (m, s) = (-inf, 0) and adds 0.
    row_m = block_max(m, scratch)
    s = block_sum(s * math.exp(m - row_m), scratch)
    if cuda.threadIdx.x == 0:
        lse_out[row] = row_m + math.log(s)


def cross_entropy_with_grad(logits, target):
    """(mean loss, gradient) of fp32 ``logits`` (N, V) against ``target`` (N,): two launches."""
    x, y, grad, row_loss = host.device_buffers(logits, target)
    n_rows = x.shape[0]
    lse = cuda.device_array(n_rows, np.float32)
    row_lse[n_rows, host.THREADS](x, lse)
    gradient[n_rows, host.THREADS](x, y, lse, np.float32(1 / n_rows), row_loss, grad)
    return host.mean_loss_and_grad(row_loss, grad)
