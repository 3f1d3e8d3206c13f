"""Rounding float32 values to fp16 or bf16 in one kernel: the last step of a weight gradient
that numba_ce.linear accumulates in float32 over chunks of rows.

    out[i] = the bits of (source[i] * scale[0]) rounded to nearest (ties to even), as
             floatbits.FORMATS; scale is a float32 device array (no host synchronisation)

Elements are independent: a grid-stride loop over the flattened arrays, one element a thread a
step. Memory traffic: 4 bytes read and 2 written per element.
"""
import functools

import numpy as np
from numba import cuda

from .launcher import launch
from .portable import SIMULATOR
from .words import word_format

THREADS = 32 if SIMULATOR else 256
MAX_BLOCKS = 2 if SIMULATOR else 4096


@functools.lru_cache(maxsize=None)
def round_kernel(fmt):
    placed = word_format(fmt, 1).placed  # a value as the one element of a signed 16-bit word

    @cuda.jit
    def kernel(source, scale, out):
        """
        source  # (n,) float32
        scale   # (1,) float32
        out     # (n,) int16: the element codes of `fmt`
        """
        factor = scale[0]
        for i in range(cuda.grid(1), source.shape[0], cuda.gridsize(1)):
            out[i] = placed(source[i] * factor, 0)

    return kernel


def round_into(source, scale, out, fmt):
    """out[...] = source * scale[0] rounded to ``fmt`` ('float16' or 'bfloat16'); ``source`` and
    ``out`` contiguous, same shape. Launches on the current stream."""
    n = source.size
    if n == 0:
        return
    blocks = min(MAX_BLOCKS, -(-n // THREADS))
    launch(round_kernel(fmt), blocks, THREADS, source.reshape(-1), scale,
           out.reshape(-1).view(np.int16))
