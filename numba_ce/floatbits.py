"""Decoding and encoding of the three logit formats as raw bits, in fp32 arithmetic.

The kernels read the logits as integer words (one to four elements a word) and write the gradient
the same way, so one kernel source serves fp32, fp16 and bf16 with wide loads. An element's bits
are a non-negative integer below ``2**ELEMENT_BITS``; ``decode`` turns them into a float32 and
``encode`` rounds a float32 to the nearest representable value (ties to even) and returns its bits.

    bf16 = the top half of an fp32:  seeeeeee emmmmmmm  -> fp32 bits << 16
    fp16:                            seeeeemm mmmmmmmm  -> rebias the exponent by 127 - 15 = 112
"""
import numpy as np

from . import portable
from .portable import SIMULATOR, bits_from_f32, device_function, f32_from_bits

TWO_POW_112 = np.float32(2.0**112)


@device_function
def decode_f32(bits):
    return f32_from_bits(bits)


@device_function
def encode_f32(value):
    return bits_from_f32(value)


@device_function
def decode_bf16(bits):
    return f32_from_bits(bits << 16)


@device_function
def encode_bf16(value):
    """Round to nearest even on the 16 bits dropped; NaN stays a quiet NaN."""
    bits = bits_from_f32(value)
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return 0x7FC0
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


@device_function
def decode_f16(bits):
    """fp16 -> fp32, exact. Shifting the 15 magnitude bits into fp32's place and multiplying by
    2**112 rebiases the exponent; subnormal halves become fp32 subnormals first, then normal."""
    magnitude = bits & 0x7FFF
    if magnitude >= 0x7C00:  # inf or NaN: exponent all ones
        value = f32_from_bits(0x7F800000 | ((magnitude & 0x3FF) << 13))
    else:
        value = f32_from_bits(magnitude << 13) * TWO_POW_112
    if bits & 0x8000:
        value = -value
    return value


@device_function
def encode_f16(value):
    """fp32 -> fp16 bits, round to nearest even, overflow to inf, gradual underflow."""
    bits = bits_from_f32(value)
    sign = (bits >> 16) & 0x8000
    magnitude = bits & 0x7FFFFFFF
    if magnitude >= 0x7F800000:  # inf, or NaN kept quiet
        return sign | (0x7E00 if magnitude > 0x7F800000 else 0x7C00)
    if magnitude >= 0x477FF000:  # >= 65520 rounds to inf
        return sign | 0x7C00
    if magnitude >= 0x38800000:  # >= 2**-14: a normal half; rebias by 112 and keep 10 mantissa bits
        rebased = magnitude - (112 << 23)
        return sign | ((rebased + 0xFFF + ((rebased >> 13) & 1)) >> 13)
    if magnitude <= 0x33000000:  # <= 2**-25 rounds to zero (the tie goes to even 0)
        return sign
    # A subnormal half counts units of 2**-24: value = mantissa * 2**(exponent - 150).
    exponent = magnitude >> 23
    mantissa = (magnitude & 0x7FFFFF) | 0x800000
    shift = 126 - exponent  # 14 .. 24
    units = mantissa >> shift
    remainder = mantissa & ((1 << shift) - 1)
    halfway = 1 << (shift - 1)
    if remainder > halfway or (remainder == halfway and (units & 1)):
        units += 1
    return sign | units


# name -> (bits per element, decode, encode)
FORMATS = {
    "float32": (32, decode_f32, encode_f32),
    "float16": (16, decode_f16, encode_f16),
    "bfloat16": (16, decode_bf16, encode_bf16),
}


def kernel_codec(fmt):
    """(bits, decode, encode) for a kernel of format ``fmt``: FORMATS' integer routines in the
    simulator; on a GPU the conversion instructions of numba_ce.portable (cvt.rn.f16.f32 /
    cvt.f32.f16, cvt.rn.bf16.f32), one instead of about nine integer instructions for bf16 and
    twenty for fp16, with the same results except the bits of NaN (0x7FFF against 0x7E00 and
    0x7FC0: NaN either way)."""
    bits, decode, encode = FORMATS[fmt]
    if SIMULATOR or fmt == "float32":
        return bits, decode, encode
    if fmt == "float16":
        return bits, portable.half_value, portable.half_bits
    return bits, decode, portable.bf16_bits


def pair_encoder(fmt):
    """``pair(lo, hi)``: two float32 values rounded to a 16-bit format, as the signed 32-bit word
    holding ``lo`` in its low half; one cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 on a GPU."""
    bits, _, encode = FORMATS[fmt]
    if bits != 16:
        raise ValueError(f"pairs are of 16-bit formats (got {fmt})")
    if not SIMULATOR:
        return portable.bf16x2_bits if fmt == "bfloat16" else portable.f16x2_bits

    def pair(lo, hi):
        word = encode(lo) | (encode(hi) << 16)
        return word - (1 << 32) if word >> 31 else word

    return pair
