"""Rounding float32 values to fp16 or bf16 in one kernel: the last step of a weight gradient
that numba_ce.linear accumulates in float32 over chunks of rows.

    out[i] = the bits of (source[i] * scale[0]) rounded to nearest (ties to even), as
             floatbits.FORMATS; scale is a float32 device array (no host synchronisation)

Elements are independent: a grid-stride loop over the flattened arrays, one element a thread a
step. Memory traffic: 4 bytes read and 2 written per element.
"""
import functools

from numba import cuda

from .floatbits import kernel_codec


@functools.lru_cache(maxsize=None)
def round_kernel(fmt):
    bits, _, encode = kernel_codec(fmt)
    mask = (1 << bits) - 1
    top_sign = 1 << (bits - 1)  # codes are stored sign-extended in the signed 16-bit word

    @cuda.jit
    def kernel(source, scale, out):
        """
        source  # (n,) float32
        scale   # (1,) float32
        out     # (n,) int16: the element codes of `fmt`
        """
        factor = scale[0]
        for i in range(cuda.grid(1), source.shape[0], cuda.gridsize(1)):
            code = encode(source[i] * factor) & mask
            out[i] = (code ^ top_sign) - top_sign

    return kernel
