"""The CUDA kernels. Row-parallel: a thread block owns one row of logits at a time.

Notation (per row): x = logits row of V classes (after softcap when set), y = target,
eps = label smoothing, w = class weights (all ones when absent), S_w = sum_j w_j, z = z-loss scale.

    lse  = m + log(sum_j exp(x_j - m)),  m = max_j x_j            log-sum-exp, p_j = exp(x_j - lse)
    ce   = (1 - eps) * w_y * (lse - x_y) + (eps / V) * (S_w * lse - sum_j w_j x_j)
    zl   = z * lse**2
    loss = ce + zl                                                  (0 for ignored rows)

Gradient of the reduced loss L = sum_rows g_row * loss_row, with g_row the upstream gradient
divided by the reduction's denominator (sum of w_y for the CE part of "mean", the count of
non-ignored rows for its z part):

    dce/dx_j = (1 - eps) * w_y * (p_j - [j == y]) + (eps / V) * (S_w * p_j - w_j)
    dzl/dx_j = 2 * z * lse * p_j
    dL/dx_j  = P * p_j - Q * w_j - T * [j == y]       with, per row,
               P = g_ce * ((1 - eps) * w_y + (eps / V) * S_w) + g_z * 2 * z * lse
               Q = g_ce * eps / V,   T = g_ce * (1 - eps) * w_y
    softcap:  x = c * tanh(r / c)  =>  dL/dr_j = dL/dx_j * (1 - tanh(r_j / c)**2)

P * p_y - T forms p_y - 1 in fp32; the result is rounded to the logits' format once.
numba_ce.slice_gradient forms the same dL/dx_j for a slice of the classes from a given lse (the
lean linear cross-entropy's second pass), with P, Q, T from :func:`gradient_coefficients`.

Class-probability targets (torch's float target of the logits' shape): a row's target is a
vector q of V probabilities, q' = (1 - eps) q + eps / V with label smoothing, and

    ce = -sum_j w_j q'_j log p_j = sum_j w_j q'_j (lse - x_j) = A * log(s) - B
    with A = sum_j w_j q'_j,  B = sum_j w_j q'_j (x_j - m)    (lse - x_j = log(s) - (x_j - m))
    dL/dx_j = g_ce * (A * p_j - w_j q'_j) + g_z * 2 * z * lse * p_j
            = P * p_j - Q * w_j - T * w_j q_j,   P = g_ce * A + g_z * 2 * z * lse,
              Q = g_ce * eps / V,  T = g_ce * (1 - eps)

A class index y is the target q = e_y: the same P, Q, T (A = (1 - eps) w_y + (eps / V) S_w,
and T * w_j q_j = T [j == y] w_y), which is why the class-probability kernels are the row kernel
with its label's terms replaced (compiled in by ``targets``). Pass 1 forms q'_j per element (one
fma), so label smoothing needs no sum_j w_j x_j and no S_w here. Nothing assumes
sum_j q_j = 1 (torch's formula does not): rows whose q do not sum to 1, or hold negative
values, get the formula's value. Every row counts (there is no ignore_index), and "mean"
divides both parts by N, as torch does (not by a sum of weights): :func:`probability_stats`
gives the reduction kernel and the gradient N as both denominators. B is kept relative to the
thread's running maximum (B' = B + A (m - m') when m grows, then merged over the block to the
row's m), so lse - x_j is never formed from two large numbers.

What the class-probability kernels read: pass 1 reads each row of logits and of targets once
(online max and sum, A and B); the loss needs nothing more. The
gradient needs p_j, which needs the row's lse, known only after pass 1: pass 2 reads the logits
again (the first words from shared memory, as for class indices) and the targets again (from L2
or DRAM, with the logits' L2 hints: numba_ce.planning counts them among the uncached bytes that
must fit in L2), and writes the gradient. Loss-only kernels: one read of each; gradient kernels:
two reads of each (the first words of the logits from chip), one write.

Memory traffic of the fused kernel: pass 1 reads the row (online max and sum), pass 2 reads it
again and writes the gradient. A row (256 KB for 128256 bf16 logits) does not fit a block's share
of shared memory, so each block keeps the first words of its row there (~113 KB with two blocks a
multiprocessor, ~227 KB with one): pass 2 reads those from chip and only the rest from L2 or
DRAM. Pass 1 loads that rest with an L2 "evict last" policy and pass 2 reads it backwards (the
words pass 1 read last come first) with "evict first", so that it comes from L2 when the rows in
flight let it (numba_ce.launch picks one block a multiprocessor where two would hold more
uncached words than L2 has room for). The blocks stay resident and stride over the rows; while
pass 2 consumes a cached word, the word of the block's next row is already copied into its slot
(cp.async), so that row's loads overlap this row's gradient stores. Loss-only kernels read each
row once and cache nothing, and so do gradient kernels of one element a word (rows whose V or
alignment does not allow 8-byte words).

Per element the plain kernels do: decode, max, exp2 (pass 1); decode, exp2, one multiply, one
rounding of a pair (pass 2). Softcap and label smoothing are compiled in only where asked for.

Three kernels make one call, all on one stream, without host synchronisation:
    target_stats   1 block    sums over the targets: reduction denominators, S_w; the first bad row
                              (probability_stats for class-probability targets: N and N)
    row_kernel     N blocks, or (cached gradient kernels) as many as are resident, striding over
                              the rows: lse, row losses and (fused variant) the gradient
    reduce_rows    1 block    sum of the row losses for reduction "sum" / "mean"
"""
import functools
import math

import numpy as np
from numba import cuda

from .floatbits import FORMATS
from .kernel_cache import kernel_factory
from .portable import (bits_from_f32, copy_word, device_function, f32_from_bits, l2_drop_policy,
                       l2_keep_policy, load_word, wait_copies)
from .reductions import (LOG2E, NEG_INF, NO_INDEX, ZERO, block_argmax, block_lse, block_sum2,
                         reduction_scratch)
from .row_math import INDEX, RowGradient, Softcap, TargetMix, row_math
from .row_passes import cached_group, grouped_words, prefetch_group, row_passes
from .words import UNROLL, host_word, word_format

ONE = np.float32(1.0)
TWO = np.float32(2.0)
NAN = np.float32(np.nan)
POS_INF = np.float32(np.inf)

# reduction codes, the kernels' argument `reduction`
NONE, SUM, MEAN = 0, 1, 2

# target_stats writes these slots of its float32 `stats` output
STAT_WEIGHT_SUM, STAT_COUNT, STAT_ALL_WEIGHTS = 0, 1, 2

# What a row's target is (compile-time, the row kernel's ``targets``): a class index (N,), or a
# row of class probabilities (N, V) in the logits' format, with class weights or without
CLASS_INDICES, PROBABILITIES, WEIGHTED_PROBABILITIES = 0, 1, 2
NO_LABEL = -1  # the label of a class-probability row: it matches no class


@cuda.jit
def target_stats(target, weight, has_weight, ignore_index, n_classes, stats, bad_row):
    """stats = [sum of w_y over rows with a valid, non-ignored target; their count; S_w];
    bad_row[0] = the first row whose target is neither ignore_index nor in [0, V), else N.
    One block, so a barrier orders the reset of bad_row before the atomic minima.

    target  # (N,) int32/int64
    weight  # (V,) float32, or (1,) unused when has_weight == 0
    """
    scratch = reduction_scratch()
    tid = cuda.threadIdx.x
    n_rows = target.shape[0]
    if tid == 0:
        bad_row[0] = n_rows  # no bad row yet
    cuda.syncthreads()  # the reset is seen before any thread lowers it
    weight_sum = ZERO
    count = ZERO
    for row in range(tid, n_rows, cuda.blockDim.x):
        label = target[row]
        if label != ignore_index:
            if 0 <= label < n_classes:
                weight_sum += weight[label] if has_weight else ONE
                count += ONE
            else:
                cuda.atomic.min(bad_row, 0, row)
    weight_sum, count = block_sum2(weight_sum, count, scratch)
    all_weights = np.float32(n_classes)
    if has_weight:  # uniform over the block, so every thread reaches the barriers
        all_weights = ZERO
        for col in range(tid, n_classes, cuda.blockDim.x):
            all_weights += weight[col]
        all_weights, _ = block_sum2(all_weights, ZERO, scratch)
    if tid == 0:
        stats[STAT_WEIGHT_SUM] = weight_sum
        stats[STAT_COUNT] = count
        stats[STAT_ALL_WEIGHTS] = all_weights


@cuda.jit
def probability_stats(n_rows, stats, bad_row):
    """target_stats for class-probability targets (one thread): every row counts once, so both
    denominators of "mean" are N, torch's mean over the rows whatever the class weights; S_w is
    not used (the kernels fold label smoothing into the targets): 0; bad_row[0] = N, no target
    is out of range."""
    if cuda.threadIdx.x == 0:
        stats[STAT_WEIGHT_SUM] = np.float32(n_rows)
        stats[STAT_COUNT] = np.float32(n_rows)
        stats[STAT_ALL_WEIGHTS] = ZERO
        bad_row[0] = n_rows


@cuda.jit
def reduce_rows(row_loss, row_z, stats, reduction, loss_out, z_out):
    """loss_out[0], z_out[0] = the row losses reduced by "sum" or "mean", in a fixed order.

    "mean": sum(ce) / sum(w_y) + sum(zl) / count, row_loss holding each row's ce alone.
    """
    scratch = reduction_scratch()
    tid = cuda.threadIdx.x
    loss_sum = ZERO
    z_sum = ZERO
    for row in range(tid, row_loss.shape[0], cuda.blockDim.x):
        loss_sum += row_loss[row]
        z_sum += row_z[row]
    loss_sum, z_sum = block_sum2(loss_sum, z_sum, scratch)
    if tid == 0:
        if reduction == MEAN:
            z_mean = z_sum / stats[STAT_COUNT]
            loss_out[0] = loss_sum / stats[STAT_WEIGHT_SUM] + z_mean
            z_out[0] = z_mean
        else:
            loss_out[0] = loss_sum
            z_out[0] = z_sum


# Element codes of a quiet NaN: the gradient of a row whose target is out of range.
NAN_CODES = {"float32": 0x7FC00000, "float16": 0x7E00, "bfloat16": 0x7FC0}

# The running maximum starts finite, so exp(m_old - m_new) never meets -inf - (-inf) = NaN and
# the pass loops need no test for an empty state; a row of -inf logits is recognised at the end
# by its sum of 0.
LOWEST = np.float32(np.finfo(np.float32).min)

# What label smoothing adds per element (compile-time, so the plain kernel carries none of it)
NO_SMOOTHING, SMOOTHING, WEIGHTED_SMOOTHING = 0, 1, 2


@device_function
def kept(label, ignore_index, n_classes):
    """Whether a row with this target counts: not ignored, and a class in [0, V)."""
    return label != ignore_index and 0 <= label < n_classes


def nan_word_of(fmt, pack):
    """The word of ``pack`` quiet NaNs of ``fmt``: a gradient row whose target is out of range."""
    return host_word([NAN_CODES[fmt]] * pack, FORMATS[fmt][0])


@cuda.jit(device=True)
def fill_row(out_row, n_words, word):
    """Fill a gradient row with one word (zeros for ignored rows, NaN for bad targets)."""
    for k in range(cuda.threadIdx.x, n_words, cuda.blockDim.x):
        out_row[k] = word


@device_function
def upstream_scales(upstream, reduction, stats):
    """(g_ce, g_z): the upstream gradient over the reduction's denominators, of the CE part and
    of the z part ("mean": sum of w_y and the count of counted rows; N and N for class
    probabilities), or itself for "sum" and "none"."""
    if reduction == MEAN:
        return upstream / stats[STAT_WEIGHT_SUM], upstream / stats[STAT_COUNT]
    return upstream, upstream


@functools.lru_cache(maxsize=None)
def gradient_coefficients(smoothed):
    """The device function (upstream, reduction, stats, S_w, (1 - eps) * w_y, eps / V, z, lse)
    -> (P, Q, T) of a row's gradient dL/dx_j = P * p_j - Q * w_j - T * [j == y] (module
    docstring), with or without label smoothing (``smoothed``, fixed at compile time):

        g_ce = g / sum(w_y), g_z = g / count   ("mean"; g itself for "sum" and "none")
        P = g_ce * (1 - eps) * w_y  [+ g_ce * (eps / V) * S_w]  [+ g_z * 2 * z * lse]
        Q = g_ce * eps / V,   T = g_ce * (1 - eps) * w_y

    Terms only where their option is on: a NaN or inf weight of a class that no row targets
    (in S_w) must multiply nothing, and an upstream of inf must not meet a z-loss of 0
    (inf * 0 = NaN), as neither does in torch's formula. Shared by the row kernel and the slice
    gradient kernel (numba_ce.slice_gradient), which takes lse as given."""

    @device_function
    def coefficients(upstream, reduction, stats, all_weights, ce_part_weight, eps_over_v,
                     z_loss, lse):
        grad_ce, grad_z = upstream_scales(upstream, reduction, stats)
        coef_p = grad_ce * ce_part_weight
        if smoothed:
            coef_p += grad_ce * (eps_over_v * all_weights)
        if z_loss != ZERO:
            coef_p += grad_z * (TWO * z_loss * lse)
        return coef_p, grad_ce * eps_over_v, grad_ce * ce_part_weight

    return coefficients


@kernel_factory
def row_kernel(fmt, pack, with_grad, capped=False, smoothing=NO_SMOOTHING, argmax=False,
               targets=CLASS_INDICES):
    """The row kernel for one logits format, ``pack`` elements per loaded word, with or without
    the gradient, with or without softcap (``capped``) and label smoothing (``smoothing``, class
    weighted or not), finding each row's argmax or not (``argmax``: token accuracy and
    predicted tokens), for class indices or class probabilities (``targets``, class weighted or
    not). Each is fixed at compile time: the loops over a word's elements unroll and
    the plain kernel's per-element work is decode, exp2 and (pass 2) one rounding per element.
    The per-element math is numba_ce.row_math, the groups of words numba_ce.row_passes."""
    nan_word = nan_word_of(fmt, pack)
    smoothed = smoothing != NO_SMOOTHING
    probabilities = targets != CLASS_INDICES
    # Label smoothing's sum_j w_j x_j and S_w: class indices only (class probabilities fold eps
    # into q'_j, and their gradient's Q * w_j takes P without S_w)
    smoothed_sum = smoothed and not probabilities
    coefficients = gradient_coefficients(smoothed_sum)
    # Gradient kernels of 8-byte words keep the first words of each row in shared memory.
    cached = with_grad and pack > 1
    # Gradient kernels read the uncached words twice, pass 2 backwards (the latest read first,
    # the likeliest still in L2). The cached kernels, whose rows in flight numba_ce.planning
    # fits to L2, also ask L2 to keep those words from pass 1 (evict last) and let them go in
    # pass 2 (evict first). Not the capped kernels: they are issue-bound, and the hints cost
    # them more than they saved (bench/NOTES.md).
    hint_l2 = cached and not capped
    # Class weights in the per-element math: label smoothing's sum_j w_j x_j, and w_j q_j
    weighted = smoothing == WEIGHTED_SMOOTHING or targets == WEIGHTED_PROBABILITIES
    element_math = row_math(fmt, pack, capped, smoothed, weighted, probabilities)
    label_logit, below_max = element_math.label_logit, element_math.below_max
    passes = row_passes(fmt, pack, capped, smoothed, weighted, hint_l2, probabilities)
    (read, read_group, absorb_group, absorb_word, store_gradient, store_group, track_group,
     track_word) = passes[:8]
    absorb_targets_group, absorb_targets_word = (passes.absorb_targets_group,
                                                 passes.absorb_targets_word)
    store_targets_gradient, store_targets_group = (passes.store_targets_gradient,
                                                   passes.store_targets_group)
    element = word_format(fmt, pack).element

    if probabilities:
        @device_function
        def row_target(target, row, ignore_index, n_classes):
            """(label, counted): class-probability rows have no label, and every row counts."""
            return NO_LABEL, True

        @device_function
        def read_target(target, row, k, policy):
            """Word k of the row's class probabilities."""
            return read(target, row, k, policy)

        @device_function
        def read_targets(targets, target, row, k, step, policy):
            """targets[u] = word k + u * step of the row's class probabilities."""
            read_group(targets, target, row, k, step, policy)
    else:
        @device_function
        def row_target(target, row, ignore_index, n_classes):
            """(label, counted): the row's class index, and whether it counts (not ignored, in
            [0, V))."""
            label = int(target[row])
            return label, kept(label, ignore_index, n_classes)

        @device_function
        def read_target(target, row, k, policy):
            """0: a class index has no words (never called)."""
            return 0

        @device_function
        def read_targets(targets, target, row, k, step, policy):
            """Nothing: a class index has no words (never called)."""
            pass

    @cuda.jit(device=True)
    def merged_state(row_max, row_sum, weighted_x, scratch):
        """(m, log(s), sum_j w_j x_j) of the row from the threads' states, merged over the block:
        every thread gets them. A +inf or NaN logit makes m and log(s) NaN (the row's loss and
        gradient NaN, as PyTorch's); a row of -inf logits has m = -inf, log(s) = 0."""
        row_max, row_sum = block_lse(row_max, row_sum, scratch)
        if smoothed_sum:
            weighted_x, _ = block_sum2(weighted_x, ZERO, scratch)
        if row_max == POS_INF or row_sum != row_sum:
            return NAN, NAN, weighted_x
        if row_sum == ZERO:
            return NEG_INF, ZERO, weighted_x
        return row_max, math.log(row_sum), weighted_x

    @cuda.jit(device=True)
    def merged_targets(row_max, row_sum, mass, gap, scratch):
        """merged_state for the class-probability state: (m, log(s), A, B), B moved from the
        thread's maximum to the row's (as row_passes' moved, only where A is not 0). A row of
        -inf logits has B NaN, so its loss is NaN: each log p_j is -inf - -inf, as in torch's
        log_softmax."""
        thread_max = row_max
        row_max, log_s, _ = merged_state(row_max, row_sum, ZERO, scratch)
        if mass != ZERO:
            gap += mass * (thread_max - row_max)
        mass, gap = block_sum2(mass, gap, scratch)
        return row_max, log_s, mass, (NAN if row_max == NEG_INF else gap)

    @cuda.jit(device=True)
    def first_nan(logits, row, n_words):
        """This thread's first NaN element of the row (its words in index order), else
        NO_INDEX; read again from global memory only for rows with a NaN or +inf logit."""
        for k in range(cuda.threadIdx.x, n_words, cuda.blockDim.x):
            word = load_word(logits, row, k)
            for i in range(pack):
                x = element(word, i)
                if x != x:
                    return k * pack + i
        return NO_INDEX

    @cuda.jit(device=True)
    def row_argmax(logits, row, n_words, best, best_at, log_s, scratch):
        """The row's argmax from every thread's (value, index): the first maximal element, or
        the first NaN if the row has one, as torch.argmax. Every thread of the block calls it
        (barriers); ``log_s`` is merged_state's (NaN for a row with a NaN or +inf logit)."""
        _, at_bits = block_argmax(best, f32_from_bits(best_at), scratch)
        at = bits_from_f32(at_bits)
        if log_s != log_s:  # uniform over the block
            nan_at = first_nan(logits, row, n_words)
            found, nan_bits = block_argmax(ZERO if nan_at != NO_INDEX else NEG_INF,
                                           f32_from_bits(nan_at), scratch)
            if found == ZERO:
                at = bits_from_f32(nan_bits)
        return at

    @cuda.jit
    def kernel(logits, target, weight, grad, row_loss, row_z, row_lse, row_correct, predicted,
               stats, grad_output, n_classes, ignore_index, one_minus_eps, eps_over_v, z_loss,
               softcap, has_weight, reduction, go_per_row):
        """
        logits       # (N, V / pack) words of `pack` elements, rows may be strided
        target       # (N,) int32/int64 class indices; class-probability kernels: (N, V / pack)
                     #   words of probabilities in the logits' format, rows may be strided
        weight       # (V,) float32, or (1,) unused when has_weight == 0
        grad         # (N, V / pack) words (may be `logits` itself: in-place); unused without grad
        row_loss, row_z, row_lse  # (N,) float32 outputs: loss (with z part), z part, lse
        row_correct  # (N,) float32: 1 where the argmax is the target (argmax kernels, else unused)
        predicted    # (N,) int64: the argmax, -1 for rows not counted (argmax kernels, else
                     #   unused)
        stats        # (3,) float32 from target_stats (probability_stats)
        grad_output  # (N,) float32 when go_per_row else (1,)
        """
        scratch = reduction_scratch()
        group_words = cuda.local.array(UNROLL, np.int64)  # a group's words, in registers
        target_words = cuda.local.array(UNROLL, np.int64)  # and theirs of class probabilities
        tid = cuda.threadIdx.x
        step = cuda.blockDim.x
        n_words = logits.shape[1]
        # Words in whole groups of UNROLL per thread (no bounds tests), then the rest one by one.
        group = UNROLL * step
        n_grouped = grouped_words(n_words, step)
        # The first n_cached words of a row (whole groups) live in the launch's dynamic shared
        # memory. Slot k is only ever touched by the thread that owns word k, so no barrier
        # guards it: that thread copies the word in (cp.async), reads it in pass 1 and pass 2,
        # and then copies in word k of the block's next row, which loads while pass 2 goes on.
        cache = cuda.shared.array(0, np.int64)
        n_cached = min(n_grouped, cache.shape[0] - cache.shape[0] % group) if cached else 0
        cap = Softcap(softcap, ONE / softcap if capped else ZERO)
        mix = TargetMix(one_minus_eps, eps_over_v)  # class probabilities: q' = keep q + share
        keep = l2_keep_policy() if hint_l2 else 0  # L2 cache policies of the hinted loads
        drop = l2_drop_policy() if hint_l2 else 0
        all_weights = stats[STAT_ALL_WEIGHTS]
        prefetched = False  # whether this row's cached words are already on their way
        for row in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):
            # 1. The target: ignored rows are not read; an out-of-range target poisons the row.
            #    (Every row of class probabilities counts.)
            label, counted = row_target(target, row, ignore_index, n_classes)
            if not counted:
                ignored = label == ignore_index
                fill = ZERO if ignored else NAN
                if tid == 0:
                    row_loss[row] = fill
                    row_z[row] = fill
                    row_lse[row] = fill
                    if argmax:
                        row_correct[row] = ZERO
                        predicted[row] = -1
                if with_grad:
                    fill_row(grad[row], n_words, 0 if ignored else nan_word)
                continue

            # 2. Pass 1: online softmax state per thread over its words, UNROLL words a step;
            #    also sum_j w_j x_j for label smoothing, or with class probabilities A and B
            #    over the targets' words. Cached words come from shared memory.
            if not prefetched:
                for k in range(tid, n_cached, step):
                    copy_word(cache, k, logits, row, k)
            wait_copies()
            row_max = LOWEST
            row_sum = ZERO
            weighted_x = ZERO
            mass = ZERO  # class probabilities: A and B (module docstring)
            gap = ZERO
            best = NEG_INF  # argmax kernels: the first largest raw logit so far, and its index
            best_at = INDEX(0)
            for k in range(tid, n_cached, group):
                cached_group(group_words, cache, k, step)
                if probabilities:
                    read_targets(target_words, target, row, k, step, keep)
                    row_max, row_sum, mass, gap = absorb_targets_group(
                        row_max, row_sum, mass, gap, group_words, target_words, k, step, weight,
                        cap, mix)
                else:
                    row_max, row_sum, weighted_x = absorb_group(row_max, row_sum, weighted_x,
                                                                group_words, k, step, weight, cap)
                if argmax:
                    best, best_at = track_group(best, best_at, group_words, k, step)
            for k in range(n_cached + tid, n_grouped, group):
                read_group(group_words, logits, row, k, step, keep)
                if probabilities:
                    read_targets(target_words, target, row, k, step, keep)
                    row_max, row_sum, mass, gap = absorb_targets_group(
                        row_max, row_sum, mass, gap, group_words, target_words, k, step, weight,
                        cap, mix)
                else:
                    row_max, row_sum, weighted_x = absorb_group(row_max, row_sum, weighted_x,
                                                                group_words, k, step, weight, cap)
                if argmax:
                    best, best_at = track_group(best, best_at, group_words, k, step)
            for k in range(n_grouped + tid, n_words, step):
                word = read(logits, row, k, keep)
                if probabilities:
                    row_max, row_sum, mass, gap = absorb_targets_word(
                        row_max, row_sum, mass, gap, word, read_target(target, row, k, keep), k,
                        weight, cap, mix)
                else:
                    row_max, row_sum, weighted_x = absorb_word(row_max, row_sum, weighted_x, word,
                                                               k, weight, cap)
                if argmax:
                    best, best_at = track_word(best, best_at, word, k)

            # 3. Thread 0 reads the target's logit (before the barriers below: in-place, pass 2
            #    overwrites the row), then the threads combine their states: every thread gets
            #    the row's m and s. log p_j = (x_j - m) - log(s): lse - x_j would lose log(s) to
            #    an ulp of lse (1e-3 at |x| = 1e4, 2e31 at bf16's largest values).
            if probabilities:
                row_max, log_s, mass, gap = merged_targets(row_max, row_sum, mass, gap, scratch)
            else:
                if tid == 0:
                    label_value = label_logit(load_word(logits, row, label // pack),
                                              label % pack, cap)
                row_max, log_s, weighted_x = merged_state(row_max, row_sum, weighted_x, scratch)
            lse = row_max + log_s
            if argmax:
                best_at = row_argmax(logits, row, n_words, best, best_at, log_s, scratch)

            # 4. The row's loss: (1 - eps) w_y (lse - x_y), plus label smoothing's part; with
            #    class probabilities sum_j w_j q'_j (lse - x_j) = A log(s) - B.
            if probabilities:
                ce_part_weight = mass
            else:
                label_weight = weight[label] if has_weight else ONE
                ce_part_weight = one_minus_eps * label_weight
            if tid == 0:
                z_part = z_loss * lse * lse
                if probabilities:
                    ce = mass * log_s - gap
                else:
                    ce = ce_part_weight * (below_max(label_value, row_max, cap) + log_s)
                if smoothed_sum:  # (eps / V) * S_w first: V * lse alone can overflow fp32
                    ce += (eps_over_v * all_weights) * lse - eps_over_v * weighted_x
                # "mean" divides the CE part and the z part by different sums (S_w, the count):
                # its row_loss is the CE part alone, which ce + z_part would round to z_part's
                # ulps (class weights of 1e-6 lost a 1% of the mean loss that way)
                row_loss[row] = ce if reduction == MEAN else ce + z_part
                row_z[row] = z_part
                row_lse[row] = lse
                if argmax:
                    row_correct[row] = ONE if best_at == label else ZERO
                    predicted[row] = best_at
            if not with_grad:
                continue

            # 5. Pass 2: the gradient (module docstring), UNROLL loads in flight before the stores;
            #    with class probabilities P = g_ce A [+ z part], Q as label smoothing's, and
            #    T = g_ce (1 - eps) times w_j q_j.
            upstream = grad_output[row] if go_per_row else grad_output[0]
            coef_p, coef_w, coef_y = coefficients(upstream, reduction, stats, all_weights,
                                                  ce_part_weight, eps_over_v, z_loss, lse)
            if probabilities:
                coef_y = upstream_scales(upstream, reduction, stats)[0] * one_minus_eps
            gradient = RowGradient(row_max, log_s * LOG2E, coef_p, coef_w, coef_y)
            next_row = row + cuda.gridDim.x
            prefetched = (next_row < logits.shape[0]
                          and row_target(target, next_row, ignore_index, n_classes)[1])
            # Backwards through what pass 1 read from global memory: the tail, the uncached
            # groups from the last; then the cached groups.
            for k in range(n_grouped + tid, n_words, step):
                word = read(logits, row, k, drop)
                if probabilities:
                    store_targets_gradient(grad, row, word, read_target(target, row, k, drop), k,
                                           gradient, weight, cap)
                else:
                    store_gradient(grad, row, word, k, label, gradient, weight, cap)
            for k in range(n_grouped - group + tid, n_cached + tid - 1, -group):
                read_group(group_words, logits, row, k, step, drop)
                if probabilities:
                    read_targets(target_words, target, row, k, step, drop)
                    store_targets_group(grad, row, group_words, target_words, k, step, gradient,
                                        weight, cap)
                else:
                    store_group(grad, row, group_words, k, step, label, gradient, weight, cap)
            for k in range(tid, n_cached, group):
                cached_group(group_words, cache, k, step)
                if probabilities:
                    read_targets(target_words, target, row, k, step, drop)
                    store_targets_group(grad, row, group_words, target_words, k, step, gradient,
                                        weight, cap)
                else:
                    store_group(grad, row, group_words, k, step, label, gradient, weight, cap)
                if prefetched:
                    prefetch_group(cache, logits, next_row, k, step)

    return kernel
