"""Rounding float32 values to fp16 or bf16 in one kernel: the last step of a gradient that the
linear cross-entropy sums in float32 (numba_ce.linear_fast's weight and bias gradients over
chunks of rows, numba_ce.linear_lean's input gradient over slices of the classes).

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
