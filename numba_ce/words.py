"""Words: the kernels read and write logits of every format as integers.

A row of logits is read as words of ``pack`` elements: 8-byte words of two fp32 or four
fp16/bf16 elements (packed loads), or one element a word where the row's length or alignment
does not allow 8-byte words. Element i of a word holds bits [b i, b (i + 1)), b the element's
bits (numba_ce.floatbits), the low element first. Words are signed integers (int64, int32,
int16), so the last element's code is stored sign-extended:

    word = code_0 | code_1 << b | ... | signed(code_last) << b (pack - 1)

Loops over a word's elements run over the compile-time ``pack`` and unroll; so do the loops
over a group of UNROLL words.
"""
import functools
from typing import NamedTuple

import numpy as np

from .floatbits import kernel_codec, pair_encoder
from .portable import device_function

# Word loops load UNROLL independent words before using any, so each thread keeps UNROLL * 8
# bytes in flight: one load at a time left the kernels latency-bound.
UNROLL = 4

ZERO = np.float32(0.0)


class WordFormat(NamedTuple):
    """Device functions for words of ``pack`` elements of one format."""
    element: object      # (word, i) -> element i as float32
    placed: object       # (value, i) -> float32 value rounded to the format, as element i's bits
    scaled: object       # (word, g) -> the word with each nonzero element times g, rounded once
    paired_word: object  # (v0, v1, v2, v3) -> the word of four 16-bit elements; None otherwise


@functools.lru_cache(maxsize=None)
def word_format(fmt, pack):
    """The :class:`WordFormat` of ``pack`` elements of ``fmt`` a word."""
    bits, decode, encode = kernel_codec(fmt)
    mask = (1 << bits) - 1
    top_sign = 1 << (bits - 1)

    @device_function
    def element(word, i):
        """Element i of a word as float32."""
        return decode((word >> (bits * i)) & mask)

    @device_function
    def placed(value, i):
        """``value`` rounded to the format, its code shifted to element i of a word; the last
        element's code sign-extended, so that the OR of a word's elements fits its type."""
        code = encode(value) & mask
        if i == pack - 1:
            code = (code ^ top_sign) - top_sign
        return code << (bits * i)

    @device_function
    def scaled(word, g):
        """The word with each element multiplied by g and rounded once. Zeros stay zero (an
        ignored row's gradient is 0 for any g, +-inf too, as torch's)."""
        out = 0
        for i in range(pack):
            value = element(word, i)
            out |= placed(value * g if value != ZERO else value, i)
        return out

    if pack != 4:
        return WordFormat(element, placed, scaled, None)
    pair = pair_encoder(fmt)  # 16-bit elements: a GPU rounds two in one instruction

    @device_function
    def paired_word(v0, v1, v2, v3):
        """The word of four float32 values, each rounded to the format: two signed 32-bit pairs,
        the low one's bits below the high one's sign-extended bits."""
        lo, hi = pair(v0, v1), pair(v2, v3)
        return (int(hi) << 32) | (int(lo) & 0xFFFFFFFF)

    return WordFormat(element, placed, scaled, paired_word)


@device_function
def load(row_words, k, n_words):
    """Word k of a row as a 64-bit integer (0 past the row's end, never used)."""
    return int(row_words[k]) if k < n_words else 0


def host_word(codes, bits):
    """Element codes (low element first) packed on the host into one word as the kernels store
    them (:func:`word_format`'s ``placed``): the last code sign-extended."""
    word = 0
    for i, code in enumerate(codes):
        if i == len(codes) - 1 and code >> (bits - 1):
            code -= 1 << bits
        word |= code << (bits * i)
    return word
