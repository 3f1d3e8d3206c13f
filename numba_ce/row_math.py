"""The row kernel's math on one word of logits: the online-softmax terms of pass 1 and the
gradient of pass 2, in the notation of numba_ce.kernels.

Every option that changes the per-element work (the format, elements a word, softcap, label
smoothing, class weights, class-probability targets) is fixed when :func:`row_math` builds the
functions, so each kernel compiles only what it uses and the loops over a word's elements
unroll. The class-probability kernels read a word of targets q (the logits' format) beside each
word of logits. Values that travel together are one argument: the softcap pair
(:class:`Softcap`), a row's gradient coefficients (:class:`RowGradient`) and label smoothing's
mix of class probabilities (:class:`TargetMix`); the functions are inlined, so the tuples cost
no instruction (the PTX is the same as with separate arguments).
"""
import functools
from collections import namedtuple
from typing import NamedTuple

import numpy as np

from .portable import device_function, exp2, fast_tanh, fma
from .reductions import LOG2E, ZERO
from .words import word_format

ONE = np.float32(1.0)
NO_TARGET_WORD = 0  # the word of targets of the class-index math, which never reads it
INDEX = np.int32  # an element's index in its row, as the argmax kernels keep it

# c and 1 / c of softcap, c * tanh(x / c); unused (0, 0) by the kernels without softcap
Softcap = namedtuple("Softcap", "value inverse")
# What pass 2 needs of its row: m, log2(s) and the coefficients P, Q, T of
# dL/dx_j = P * p_j - Q * w_j - T * [j == y]  (class probabilities: T * w_j q_j for the last)
RowGradient = namedtuple("RowGradient", "row_max log2_s coef_p coef_w coef_y")
# Label smoothing of class probabilities in pass 1, q' = keep * q + share: (1 - eps, eps / V)
TargetMix = namedtuple("TargetMix", "keep share")


class RowMath(NamedTuple):
    """Device functions of :func:`row_math`, for one word of ``pack`` elements."""
    word_max: object       # (word) -> max_i x_i, before softcap
    rescaled: object       # (row_max, row_sum, top, cap) -> (m, s) rescaled to a new maximum
    word_exp_sum: object   # (word, row_max, cap) -> sum_i exp(x_i - m)
    weighted_sum: object   # (word, k, weight, cap) -> sum_i w_j x_j
    label_logit: object    # (word, i, cap) -> what the loss keeps of x_y
    below_max: object      # (label_value, row_max, cap) -> m - x_y
    gradient_word: object  # (word, k, at, gradient, weight, cap) -> the word of dL/dx
    first_of: object       # (word, k, value, later) -> index of its first element == value
    # the class-probability kernels' (their words of targets q beside the words of logits):
    target_terms: object   # (word, target_word, k, m, weight, cap, mix) -> pass 1's sums,
    #                        (sum_i exp(x_j - m), sum_i w_j q'_j, sum_i w_j q'_j (x_j - m))
    target_gradient_word: object  # (word, target_word, k, gradient, weight, cap) -> the word of
    #                               dL/dx with class probabilities q from target_word


@functools.lru_cache(maxsize=None)
def row_math(fmt, pack, capped, smoothed, weighted, probabilities=False):
    """The :class:`RowMath` of words of ``pack`` elements of ``fmt``, with or without softcap
    (``capped``) and label smoothing (``smoothed``); ``weighted``: the per-element math reads the
    class weights (class-index kernels: label smoothing's sum_j w_j x_j; class-probability
    kernels: their w_j q_j too); ``probabilities``: the targets are words of class
    probabilities, not a class index."""
    element, placed, _, paired_word = word_format(fmt, pack)

    @device_function
    def softcapped(x, cap):
        """c * tanh(x / c) (the kernel for capped logits), else x. The tanh is
        portable.fast_tanh (one ex2, the division by FMAs; within 2.4e-7 of tanh): libdevice's
        tanhf adds an rcp to its ex2, and two tanh an element (one a pass) at two special-function
        operations each made the capped kernel SFU-bound."""
        return cap.value * fast_tanh(x, cap.inverse) if capped else x

    @device_function
    def logit(word, i, cap):
        """Element i of a word as float32, softcapped in the capped kernel."""
        return softcapped(element(word, i), cap)

    @device_function
    def from_max(word, i, row_max, cap):
        """(x_i - m, t_i): element i's distance from m and, in the capped kernel, t = tanh(r / c),
        with x - m = c * t - m in one fma. x - m comes first: exact near the maximum, where the
        terms that count are, at any |x|."""
        if capped:
            t = fast_tanh(element(word, i), cap.inverse)
            return fma(cap.value, t, -row_max), t
        return element(word, i) - row_max, ZERO

    @device_function
    def exponent(word, i, row_max, offset, cap):
        """((x_i - m) * log2(e) - offset, t_i): exp(x_i - m) / 2**offset as a power of two, and t_i
        (:func:`from_max`; offset 0 adds nothing: x - 0 is x). Folding m * log2(e) into the fma
        of t would save an instruction but round it to half an ulp first: a confident row's
        loss then comes out below 0 and its p_y above 1 (bench/NOTES.md)."""
        below, t = from_max(word, i, row_max, cap)
        return below * LOG2E - offset, t

    @device_function
    def label_logit(word, i, cap):
        """What the loss keeps of the target's logit, element i of a word: x, or in the capped
        kernel t = tanh(r / c) (x = c * t) for :func:`below_max`."""
        return fast_tanh(element(word, i), cap.inverse) if capped else element(word, i)

    @device_function
    def below_max(label_value, row_max, cap):
        """m - x for the target's logit (``label_value`` from label_logit). Capped, m - c * t is
        one fma, rounded once as the exponents of the sum it is set against are (m - round(c t)
        would be off by up to half an ulp of m: 3e-5 in the loss at c = 1000)."""
        return fma(-cap.value, label_value, row_max) if capped else row_max - label_value

    @device_function
    def word_max(word):
        """The largest raw element of a word (softcap is increasing, up to fast_tanh's 2.4e-7:
        cap the maximum once)."""
        top = element(word, 0)
        for i in range(1, pack):
            top = max(top, element(word, i))
        return top

    @device_function
    def word_exp_sum(word, row_max, cap):
        """sum_i exp(x_i - m) over the word's elements."""
        total = ZERO
        for i in range(pack):
            total += exp2(exponent(word, i, row_max, ZERO, cap)[0])
        return total

    @device_function
    def rescaled(row_max, row_sum, top, cap):
        """(m', s * exp(m - m')) for m' = max(m, softcapped(top)): the state before new terms
        join."""
        new_max = max(row_max, softcapped(top, cap))
        return new_max, row_sum * exp2((row_max - new_max) * LOG2E)

    @device_function
    def weighted_sum(word, k, weight, cap):
        """sum_i w_j x_j over the word's elements j = k * pack + i (w = 1 unless weighted)."""
        total = ZERO
        for i in range(pack):
            x = logit(word, i, cap)
            total += x * weight[k * pack + i] if weighted else x
        return total

    @device_function
    def weighted_target(q, k, i, weight):
        """w_j q for j = k * pack + i, where weighted; else q."""
        return q * weight[k * pack + i] if weighted else q

    @device_function
    def target_terms(word, target_word, k, row_max, weight, cap, mix):
        """(sum_i exp(x_j - m), sum_i w_j q'_j, sum_i w_j q'_j (x_j - m)) over the word's elements
        j = k * pack + i, q_j those of ``target_word`` (label smoothed by ``mix``): one x - m for
        the exponent and the target's term. A q'_j of 0 at an x_j of -inf makes the last NaN
        (0 * -inf), as torch's -sum_j q'_j log p_j is."""
        exp_sum = ZERO
        mass = ZERO
        gap = ZERO
        for i in range(pack):
            below = from_max(word, i, row_max, cap)[0]
            exp_sum += exp2(below * LOG2E)
            q = element(target_word, i)
            if smoothed:  # q' = (1 - eps) q + eps / V
                q = fma(q, mix.keep, mix.share)
            target = weighted_target(q, k, i, weight)
            mass += target
            gap += target * below
        return exp_sum, mass, gap

    @device_function
    def element_gradient(word, target_word, k, i, at, gradient, weight, cap):
        """dL/dx_j = P * p_j - Q * w_j - T * [j == y] for j = k * pack + i (``at`` = y - k * pack,
        the label's place in the word, or ``pack`` when the word does not hold it); with
        class-probability targets - T * w_j q_j in place of the label's term, q_j from
        ``target_word`` (unused otherwise); times the softcap derivative; float32.
        p_j = 2 ** ((x_j - m) * log2(e) - log2(s))."""
        log2_p, t = exponent(word, i, gradient.row_max, gradient.log2_s, cap)
        d = gradient.coef_p * exp2(log2_p)
        if smoothed:
            d -= gradient.coef_w * weight[k * pack + i] if weighted else gradient.coef_w
        if probabilities:  # (label smoothing's part of q'_j is Q * w_j's)
            d -= gradient.coef_y * weighted_target(element(target_word, i), k, i, weight)
        elif i == at:
            d -= gradient.coef_y
        if capped:  # x = c * t with t = tanh(r / c): dx/dr = 1 - t**2
            d *= fma(-t, t, ONE)
        return d

    if pack == 4:  # four 16-bit elements: two rounded pairs
        @device_function
        def word_gradient(word, target_word, k, at, gradient, weight, cap):
            """The word of the gradient of word k, each element rounded once."""
            d0 = element_gradient(word, target_word, k, 0, at, gradient, weight, cap)
            d1 = element_gradient(word, target_word, k, 1, at, gradient, weight, cap)
            d2 = element_gradient(word, target_word, k, 2, at, gradient, weight, cap)
            d3 = element_gradient(word, target_word, k, 3, at, gradient, weight, cap)
            return paired_word(d0, d1, d2, d3)
    else:  # two float32 elements, or one element of any format
        @device_function
        def word_gradient(word, target_word, k, at, gradient, weight, cap):
            """The word of the gradient of word k, each element rounded once."""
            out = 0
            for i in range(pack):
                out |= placed(element_gradient(word, target_word, k, i, at, gradient, weight,
                                               cap), i)
            return out

    @device_function
    def gradient_word(word, k, at, gradient, weight, cap):
        """The word of the gradient of word k against a class index (``at``: as in
        element_gradient)."""
        return word_gradient(word, NO_TARGET_WORD, k, at, gradient, weight, cap)

    @device_function
    def target_gradient_word(word, target_word, k, gradient, weight, cap):
        """The word of the gradient of word k against the class probabilities of
        ``target_word`` (class-probability kernels)."""
        return word_gradient(word, target_word, k, pack, gradient, weight, cap)

    @device_function
    def first_of(word, k, value, later):
        """The index of word k's first element equal to ``value`` (raw, before softcap), else
        ``later``; as an INDEX: 32 bits, one register (V < 2**31)."""
        at = later
        for i in range(pack - 1, -1, -1):
            if element(word, i) == value:
                at = INDEX(k * pack + i)
        return at

    return RowMath(word_max, rescaled, word_exp_sum, weighted_sum, label_logit, below_max,
                   gradient_word, first_of, target_terms, target_gradient_word)
