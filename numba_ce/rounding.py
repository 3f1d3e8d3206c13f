"""Rounding float32 values to fp16 or bf16 in one kernel: the last step of a weight gradient
that numba_ce.linear accumulates in float32 over chunks of rows.

    out[i] = the bits of (source[i] * scale[0]) rounded to nearest (ties to even), as
             floatbits.FORMATS; scale is a float32 device array (no host synchronisation)

Elements are independent: a grid-stride loop over the flattened arrays, one element a thread a
step. Memory traffic: 4 bytes read and 2 written per element.
"""

from numba import cuda

from .kernel_cache import kernel_factory
from .words import word_format


@kernel_factory
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
