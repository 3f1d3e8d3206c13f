"""Backward of the PyTorch adapter: scale the gradient saved by the forward, in place, by the
upstream gradient.

The forward's fused kernel computes the gradient for an upstream gradient of 1 (one read of the
logits, one write of the gradient). Backward multiplies it by the real upstream value g:

    grad[r, j] *= g_r        g_r = grad_output[0] ("mean", "sum"), grad_output[r] ("none")

Each element is decoded to float32, multiplied and rounded once more to the logits' format;
zeros stay zero (an ignored row's gradient is 0 for any g, +-inf included, as PyTorch's).
Memory traffic: one read and one write of the gradient, except where g_r == 1 (a plain
``loss.backward()``): the kernel reads g on the device, and a row block whose g is 1 returns at
once, so that case costs one launch and no pass over the gradient, and the host never
synchronises to find out which case it is.
"""

import numpy as np
from numba import cuda

from .kernel_cache import kernel_factory
from .portable import device_function
from .words import UNROLL, load, word_format

ONE = np.float32(1.0)


@kernel_factory
def scale_kernel(fmt, pack):
    """The kernel for one logits format and ``pack`` elements per word (as kernels.row_kernel)."""
    scaled = word_format(fmt, pack).scaled

    @device_function
    def store_scaled(row_words, k, n_words, word, g):
        """row_words[k] = word with each element multiplied by g, rounded once (past the row's
        end: nothing)."""
        if k < n_words:
            row_words[k] = scaled(word, g)

    @cuda.jit
    def kernel(grad, grad_output, per_row):
        """
        grad         # (N, V / pack) words of `pack` elements, rows may be strided; scaled in place
        grad_output  # (N,) float32 when per_row else (1,); may be strided (an expanded tensor)
        """
        if not per_row and grad_output[0] == ONE:
            return  # the common loss.backward(): every block returns before touching the gradient
        group_words = cuda.local.array(UNROLL, np.int64)  # in registers: the loops unroll
        tid = cuda.threadIdx.x
        step = cuda.blockDim.x
        n_words = grad.shape[1]
        for row in range(cuda.blockIdx.x, grad.shape[0], cuda.gridDim.x):
            g = grad_output[row] if per_row else grad_output[0]
            if g == ONE:  # uniform over the block: no barrier below depends on it
                continue
            grad_row = grad[row]
            # UNROLL independent loads in flight before the stores: one at a time is
            # latency-bound.
            for k in range(tid, n_words, UNROLL * step):
                for u in range(UNROLL):
                    group_words[u] = load(grad_row, k + u * step, n_words)
                for u in range(UNROLL):
                    store_scaled(grad_row, k + u * step, n_words, group_words[u], g)

    return kernel
