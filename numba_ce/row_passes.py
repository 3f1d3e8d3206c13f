"""The row kernel's two passes, a group of UNROLL words at a time.

A thread of a row block (thread ``tid`` of ``step``) owns words tid, tid + step, ... of its row.
They are read in groups of UNROLL words, k, k + step, ..., k + (UNROLL - 1) step, all loaded
before any is used, so that UNROLL loads are in flight; then the words that do not fill a whole
group of the block, one at a time:

    [0, n_cached)          whole groups kept in shared memory (the cached gradient kernels)
    [n_cached, n_grouped)  whole groups read from global memory
    [n_grouped, n_words)   the tail, word by word

Pass 1 absorbs a group into the thread's online-softmax state with one rescale (numba_ce.kernels
has the formulas); pass 2 stores the gradient of each word of a group. A group's words are held
in a local array of UNROLL words: the loops over it have compile-time bounds and unroll, which
leaves the array in registers.

The class-probability kernels read a word of targets (the same position in the row of class
probabilities q) beside each word of logits, a group of them into a second such array; their
pass 1 keeps the state (m, s, A, B), A = sum_j w_j q'_j and B = sum_j w_j q'_j (x_j - m)
(numba_ce.kernels), and pass 2 forms the gradient from both words.
"""
import functools
from typing import NamedTuple

from .portable import copy_word, device_function, load_word, load_word_hinted, store_word
from .reductions import ZERO
from .row_math import row_math
from .words import UNROLL

# absorb_group is written out for four words (its docstring says why); the other loops over a
# group run over range(UNROLL).
if UNROLL != 4:
    raise NotImplementedError(f"row_passes.absorb_group takes four words (UNROLL is {UNROLL})")


class RowPasses(NamedTuple):
    """Device functions of :func:`row_passes`."""
    read: object            # (logits, row, k, policy) -> word k of a row from global memory
    read_group: object      # (group, logits, row, k, step, policy): a group from global memory
    absorb_group: object    # (m, s, wx, group, k, step, weight, cap) -> (m, s, wx) after it
    absorb_word: object     # (m, s, wx, word, k, weight, cap) -> (m, s, wx) after it
    store_gradient: object  # (grad, row, word, k, label, gradient, weight, cap)
    store_group: object     # (grad, row, group, k, step, label, gradient, weight, cap)
    track_group: object     # (best, best_at, group, k, step) -> the first largest raw element
    track_word: object      # (best, best_at, word, k) -> the same after word k (the tail)
    # the class-probability kernels' (targets: a group of target words; mix: row_math.TargetMix)
    absorb_targets_group: object  # (m, s, a, b, group, targets, k, step, weight, cap, mix)
    #                               -> (m, s, a, b) after them
    absorb_targets_word: object   # (m, s, a, b, word, target_word, k, weight, cap, mix) -> same
    store_targets_gradient: object  # (grad, row, word, target_word, k, gradient, weight, cap)
    store_targets_group: object     # (grad, row, group, targets, k, step, gradient, weight, cap)


@device_function
def grouped_words(n_words, step):
    """The words of a row that whole groups of UNROLL words per thread cover, with ``step``
    threads: [0, n_grouped); the rest, [n_grouped, n_words), go one by one."""
    return n_words - n_words % (UNROLL * step)


@device_function
def cached_group(group, cache, k, step):
    """group[u] = cache[k + u * step]: a group's words from shared memory."""
    for u in range(UNROLL):
        group[u] = cache[k + u * step]


@device_function
def prefetch_group(cache, logits, row, k, step):
    """cache[k + u * step] = logits[row, k + u * step] in the background (cp.async)."""
    for u in range(UNROLL):
        copy_word(cache, k + u * step, logits, row, k + u * step)


@functools.lru_cache(maxsize=None)
def row_passes(fmt, pack, capped, smoothed, weighted, hint_l2, probabilities=False):
    """The :class:`RowPasses` of words of ``pack`` elements of ``fmt`` (options as
    numba_ce.row_math.row_math); ``hint_l2``: global reads carry an L2 cache policy."""
    math = row_math(fmt, pack, capped, smoothed, weighted, probabilities)
    word_max, rescaled, word_exp_sum, weighted_sum = (math.word_max, math.rescaled,
                                                      math.word_exp_sum, math.weighted_sum)
    gradient_word, first_of = math.gradient_word, math.first_of
    target_terms, target_gradient_word = math.target_terms, math.target_gradient_word

    @device_function
    def read(logits, row, k, policy):
        """Word k of a row from global memory, with an L2 cache policy (keep in pass 1, drop in
        pass 2) in the kernels that hint."""
        return load_word_hinted(logits, row, k, policy) if hint_l2 else load_word(logits, row, k)

    @device_function
    def read_group(group, logits, row, k, step, policy):
        """group[u] = word k + u * step of a row, from global memory."""
        for u in range(UNROLL):
            group[u] = read(logits, row, k + u * step, policy)

    @device_function
    def absorb_group(row_max, row_sum, weighted_x, group, k, step, weight, cap):
        """The state (m, s, sum_j w_j x_j) after the group's words (group[u] is word
        k + u * step):
            m' = max(m, max_i x_i),  s' = s * exp(m - m') + sum_i exp(x_i - m')
        with one rescale for the group. Written out for four words: a loop over the group
        (pairs of words, or a pairwise tree in a local array) computes the same values, but NVVM
        then orders the instructions differently and ptxas allocates worse (more registers in
        the loss kernels, more spills with smoothing: bench/NOTES.md). The state stays three
        values for the same reason (as a tuple carried through the loops, the same happened)."""
        w0, w1, w2, w3 = group[0], group[1], group[2], group[3]
        top = max(max(word_max(w0), word_max(w1)), max(word_max(w2), word_max(w3)))
        row_max, row_sum = rescaled(row_max, row_sum, top, cap)
        row_sum += ((word_exp_sum(w0, row_max, cap) + word_exp_sum(w1, row_max, cap))
                    + (word_exp_sum(w2, row_max, cap) + word_exp_sum(w3, row_max, cap)))
        if smoothed:
            weighted_x += ((weighted_sum(w0, k, weight, cap)
                            + weighted_sum(w1, k + step, weight, cap))
                           + (weighted_sum(w2, k + 2 * step, weight, cap)
                              + weighted_sum(w3, k + 3 * step, weight, cap)))
        return row_max, row_sum, weighted_x

    @device_function
    def absorb_word(row_max, row_sum, weighted_x, word, k, weight, cap):
        """The state (m, s, sum_j w_j x_j) after word k (the tail of a row)."""
        row_max, row_sum = rescaled(row_max, row_sum, word_max(word), cap)
        row_sum += word_exp_sum(word, row_max, cap)
        if smoothed:
            weighted_x += weighted_sum(word, k, weight, cap)
        return row_max, row_sum, weighted_x

    @device_function
    def store_gradient(grad, row, word, k, label, gradient, weight, cap):
        """grad[row, k] = the gradient of word k. One comparison a word finds the label's word;
        the other words get a copy of the code with no label test per element."""
        if k == label // pack:
            out = gradient_word(word, k, label % pack, gradient, weight, cap)
        else:
            out = gradient_word(word, k, pack, gradient, weight, cap)
        store_word(grad, row, k, out)

    @device_function
    def store_group(grad, row, group, k, step, label, gradient, weight, cap):
        """The gradient of the group's words."""
        for u in range(UNROLL):
            store_gradient(grad, row, group[u], k + u * step, label, gradient, weight, cap)

    @device_function
    def track_group(best, best_at, group, k, step):
        """(value, index) of the first largest raw element so far, after the group's words (in
        index order: only a strictly larger value moves it, so the first maximal index stays,
        as torch.argmax's). Softcap is increasing: the raw logits have the capped ones' argmax.
        A NaN never compares larger: the kernel looks for the first NaN of a NaN row apart."""
        w0, w1, w2, w3 = group[0], group[1], group[2], group[3]
        top = max(max(word_max(w0), word_max(w1)), max(word_max(w2), word_max(w3)))
        if top > best:
            return top, first_of(w0, k, top, first_of(w1, k + step, top, first_of(
                w2, k + 2 * step, top, first_of(w3, k + 3 * step, top, best_at))))
        return best, best_at

    @device_function
    def track_word(best, best_at, word, k):
        """track_group for one word (the tail of a row)."""
        top = word_max(word)
        if top > best:
            return top, first_of(word, k, top, best_at)
        return best, best_at

    @device_function
    def moved(gap, mass, shift):
        """B = sum_j w_j q'_j (x_j - m) moved to a new maximum m' = m - shift: B + A * shift;
        only where A is not 0: a thread that has seen no element has m = kernels.LOWEST, and
        LOWEST - m' overflows to -inf for an m' above 2e31 (0 * -inf would be NaN)."""
        return gap + mass * shift if mass != ZERO else gap

    @device_function
    def absorb_targets_group(row_max, row_sum, mass, gap, group, targets, k, step, weight, cap,
                             mix):
        """The class-probability state (m, s, A, B) after the group's words, targets[u] the word
        of targets of group[u]:
            m', s' as absorb_group's,  A' = A + sum_i w_i q'_i,
            B' = B + A (m - m') + sum_i w_i q'_i (x_i - m')
        (written out for four words, as absorb_group)."""
        w0, w1, w2, w3 = group[0], group[1], group[2], group[3]
        top = max(max(word_max(w0), word_max(w1)), max(word_max(w2), word_max(w3)))
        new_max, row_sum = rescaled(row_max, row_sum, top, cap)
        gap = moved(gap, mass, row_max - new_max)
        e0, a0, b0 = target_terms(w0, targets[0], k, new_max, weight, cap, mix)
        e1, a1, b1 = target_terms(w1, targets[1], k + step, new_max, weight, cap, mix)
        e2, a2, b2 = target_terms(w2, targets[2], k + 2 * step, new_max, weight, cap, mix)
        e3, a3, b3 = target_terms(w3, targets[3], k + 3 * step, new_max, weight, cap, mix)
        return (new_max, row_sum + ((e0 + e1) + (e2 + e3)), mass + ((a0 + a1) + (a2 + a3)),
                gap + ((b0 + b1) + (b2 + b3)))

    @device_function
    def absorb_targets_word(row_max, row_sum, mass, gap, word, target_word, k, weight, cap, mix):
        """The class-probability state (m, s, A, B) after word k (the tail of a row)."""
        new_max, row_sum = rescaled(row_max, row_sum, word_max(word), cap)
        exp_sum, word_mass, word_gap = target_terms(word, target_word, k, new_max, weight, cap,
                                                    mix)
        return (new_max, row_sum + exp_sum, mass + word_mass,
                moved(gap, mass, row_max - new_max) + word_gap)

    @device_function
    def store_targets_gradient(grad, row, word, target_word, k, gradient, weight, cap):
        """grad[row, k] = the gradient of word k against its word of class probabilities."""
        store_word(grad, row, k, target_gradient_word(word, target_word, k, gradient, weight,
                                                      cap))

    @device_function
    def store_targets_group(grad, row, group, targets, k, step, gradient, weight, cap):
        """The gradient of the group's words against their words of class probabilities."""
        for u in range(UNROLL):
            store_targets_gradient(grad, row, group[u], targets[u], k + u * step, gradient,
                                   weight, cap)

    return RowPasses(read, read_group, absorb_group, absorb_word, store_gradient, store_group,
                     track_group, track_word, absorb_targets_group, absorb_targets_word,
                     store_targets_gradient, store_targets_group)
