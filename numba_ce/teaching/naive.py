"""Step 1, naive: three passes over the logits, a launch each, one block a row.

For a row x of V logits with target y, and the mean over N rows, L = (1/N) sum_rows loss:

    pass 1   m   = max_j x_j                                      reads the row
    pass 2   lse = m + log(sum_j exp(x_j - m))                     reads the row again
    pass 3   loss = lse - x_y                                      reads it a third time
             dL/dx_j = (p_j - [j == y]) / N,  p_j = exp(x_j - lse)   and writes the gradient

lse = log(sum_j exp(x_j)); subtracting m first keeps every exp() at most 1, so none overflows.
The gradient: d lse / dx_j = exp(x_j) / sum_k exp(x_k) = p_j, the softmax; d x_y / dx_j = [j == y].

Memory traffic: 3 reads and 1 write of an N x V array, 16 N V bytes in fp32, plus m and lse
(8 bytes a row) between the launches. The kernel does little arithmetic per byte, so its time
is its bytes over the memory bandwidth: the passes are the cost that steps 2 and 3 remove.
"""
import math

import numpy as np
from numba import cuda

from ..kernels import ONE
from ..reductions import NEG_INF, ZERO
from . import host
from .tree import MAX_THREADS, block_max, block_sum

DRAM_ARRAYS = 4  # N x V arrays through DRAM: three reads of the logits, one write of the gradient


@cuda.jit
def row_max(logits, m_out):
    """Pass 1: m = max_j x_j.  logits # (N, V) float32;  m_out # (N,) float32."""
    scratch = cuda.shared.array(MAX_THREADS, np.float32)
    row = cuda.blockIdx.x
    m = NEG_INF
    for j in range(cuda.threadIdx.x, logits.shape[1], cuda.blockDim.x):  # j = t, t + T, t + 2T...
        m = max(m, logits[row, j])
    m = block_max(m, scratch)
    if cuda.threadIdx.x == 0:
        m_out[row] = m


@cuda.jit
def row_lse(logits, m, lse_out):
    """Pass 2: lse = m + log(sum_j exp(x_j - m)).  m, lse_out # (N,) float32."""
    scratch = cuda.shared.array(MAX_THREADS, np.float32)
    row = cuda.blockIdx.x
    row_m = m[row]
    s = ZERO
    for j in range(cuda.threadIdx.x, logits.shape[1], cuda.blockDim.x):
        s += math.exp(logits[row, j] - row_m)
    s = block_sum(s, scratch)
    if cuda.threadIdx.x == 0:
        lse_out[row] = row_m + math.log(s)


@cuda.jit
def gradient(logits, target, lse, inv_rows, row_loss, grad):
    """Pass 3: loss = lse - x_y and dL/dx_j = (p_j - [j == y]) / N.

    target # (N,) int64;  lse, row_loss # (N,) float32;  grad # (N, V) float32;  inv_rows = 1 / N
    """
    row = cuda.blockIdx.x
    y = target[row]
    row_lse_value = lse[row]
    if cuda.threadIdx.x == 0:
        row_loss[row] = row_lse_value - logits[row, y]
    for j in range(cuda.threadIdx.x, logits.shape[1], cuda.blockDim.x):
        p = math.exp(logits[row, j] - row_lse_value)
        grad[row, j] = (p - ONE if j == y else p) * inv_rows


def cross_entropy_with_grad(logits, target):
    """(mean loss, gradient) of fp32 ``logits`` (N, V) against ``target`` (N,): three launches."""
    x, y, grad, row_loss = host.device_buffers(logits, target)
    n_rows = x.shape[0]
    m = cuda.device_array(n_rows, np.float32)
    lse = cuda.device_array(n_rows, np.float32)
    row_max[n_rows, host.THREADS](x, m)
    row_lse[n_rows, host.THREADS](x, m, lse)
    gradient[n_rows, host.THREADS](x, y, lse, np.float32(1 / n_rows), row_loss, grad)
    return host.mean_loss_and_grad(row_loss, grad)
