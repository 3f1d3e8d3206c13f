"""The CUDA kernels. Row-parallel: one thread block owns one row of logits.

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

Memory traffic of the fused kernel: pass 1 reads the row (online max and sum), pass 2 reads it
again and writes the gradient. The row is only 2 * V bytes (bf16), so with one block of many threads
per row on each SM, the second read is served from L2 rather than from DRAM.

Three kernels make one call, all on one stream, without host synchronisation:
    target_stats   1 block    sums over the targets: reduction denominators, S_w; the first bad row
    row_kernel     N blocks   lse, row losses and (fused variant) the gradient
    reduce_rows    1 block    sum of the row losses for reduction "sum" / "mean"
"""
import functools
import math

import numpy as np
from numba import cuda

from .floatbits import kernel_codec, tag
from .portable import device_function, exp2
from .reductions import LOG2E, NEG_INF, ZERO, block_lse, block_sum2

ONE = np.float32(1.0)
TWO = np.float32(2.0)
NAN = np.float32(np.nan)
POS_INF = np.float32(np.inf)
# The largest block; numba_ce.launcher compiles every kernel for it. 256 threads a row measured
# fastest on the H200 (bench/NOTES.md) and leave ptxas up to 255 registers, so nothing spills.
MAX_THREADS = 256
WARP_SLOTS = MAX_THREADS // 32  # shared float32 slots for per-warp partial results

# reduction codes, the kernels' argument `reduction`
NONE, SUM, MEAN = 0, 1, 2

# target_stats writes these slots of its float32 `stats` output
STAT_WEIGHT_SUM, STAT_COUNT, STAT_ALL_WEIGHTS = 0, 1, 2


@cuda.jit(device=True)
def reduction_scratch():
    """Shared arrays for the block reductions: a slot per thread (simulator only), a slot per warp.
    One allocation a line: the simulator tells shared arrays apart by their source line."""
    lane_a = cuda.shared.array(MAX_THREADS, np.float32)
    lane_b = cuda.shared.array(MAX_THREADS, np.float32)
    warp_a = cuda.shared.array(WARP_SLOTS, np.float32)
    warp_b = cuda.shared.array(WARP_SLOTS, np.float32)
    return lane_a, lane_b, warp_a, warp_b


@cuda.jit
def target_stats(target, weight, has_weight, ignore_index, n_classes, stats, bad_row):
    """stats = [sum of w_y over rows with a valid, non-ignored target; their count; S_w];
    bad_row[0] = the first row whose target is neither ignore_index nor in [0, V), else N.
    One block, so a barrier orders the reset of bad_row before the atomic minima.

    target  # (N,) int32/int64
    weight  # (V,) float32, or (1,) unused when has_weight == 0
    """
    lane_a, lane_b, warp_a, warp_b = reduction_scratch()
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
    weight_sum, count = block_sum2(weight_sum, count, lane_a, lane_b, warp_a, warp_b)
    all_weights = np.float32(n_classes)
    if has_weight:  # uniform over the block, so every thread reaches the barriers
        all_weights = ZERO
        for col in range(tid, n_classes, cuda.blockDim.x):
            all_weights += weight[col]
        all_weights, _ = block_sum2(all_weights, ZERO, lane_a, lane_b, warp_a, warp_b)
    if tid == 0:
        stats[STAT_WEIGHT_SUM] = weight_sum
        stats[STAT_COUNT] = count
        stats[STAT_ALL_WEIGHTS] = all_weights


@cuda.jit
def reduce_rows(row_loss, row_z, stats, reduction, loss_out, z_out):
    """loss_out[0], z_out[0] = the row losses reduced by "sum" or "mean", in a fixed order.

    "mean": sum(ce) / sum(w_y) + sum(zl) / count, with ce = loss - zl per row.
    """
    lane_a, lane_b, warp_a, warp_b = reduction_scratch()
    tid = cuda.threadIdx.x
    loss_sum = ZERO
    z_sum = ZERO
    for row in range(tid, row_loss.shape[0], cuda.blockDim.x):
        loss_sum += row_loss[row]
        z_sum += row_z[row]
    loss_sum, z_sum = block_sum2(loss_sum, z_sum, lane_a, lane_b, warp_a, warp_b)
    if tid == 0:
        if reduction == MEAN:
            z_mean = z_sum / stats[STAT_COUNT]
            loss_out[0] = (loss_sum - z_sum) / stats[STAT_WEIGHT_SUM] + z_mean
            z_out[0] = z_mean
        else:
            loss_out[0] = loss_sum
            z_out[0] = z_sum


def _pack_word(codes, bits):
    """Element codes (low element first) packed into one signed integer word, as the kernels
    store them: the last element is sign-extended so the word fits its signed type."""
    word = 0
    for i, code in enumerate(codes):
        if i == len(codes) - 1 and code >> (bits - 1):
            code -= 1 << bits
        word |= code << (bits * i)
    return word


# Element codes of a quiet NaN: the gradient of a row whose target is out of range.
NAN_CODES = {"float32": 0x7FC00000, "float16": 0x7E00, "bfloat16": 0x7FC0}

# Pass loops issue UNROLL independent word loads before using any, so each thread keeps
# UNROLL * 8 bytes in flight: one load at a time left the kernel latency-bound at ~1 TB/s.
UNROLL = 4


@device_function
def load(row_words, k, n_words):
    """Word k of a row as a 64-bit integer (0 past the row's end, never used)."""
    return int(row_words[k]) if k < n_words else 0


@functools.lru_cache(maxsize=None)
def row_kernel(fmt, pack, with_grad):
    """The row kernel for one logits format, ``pack`` elements per loaded word, with or without
    the gradient. Specialised at compile time: the loops over a word's elements unroll."""
    bits, decode, encode, rewrites = kernel_codec(fmt)
    mask = (1 << bits) - 1
    top_sign = 1 << (bits - 1)  # the last element of a word is sign-extended into the signed word
    nan_word = _pack_word([NAN_CODES[fmt]] * pack, bits)

    @device_function
    def raw(word, i):
        """Element i of a word as float32."""
        return decode((word >> (bits * i)) & mask)

    @device_function
    def capped(x, softcap, inv_softcap):
        """softcap * tanh(x / softcap) when softcap > 0, else x."""
        return softcap * math.tanh(x * inv_softcap) if softcap > ZERO else x

    @device_function
    def element(word, i, softcap, inv_softcap):
        """Element i of a word as float32, softcapped when softcap > 0."""
        return capped(raw(word, i), softcap, inv_softcap)

    @device_function
    def absorb(row_max, row_sum, word, k, n_words, softcap, inv_softcap):
        """The online-softmax state (m, s = sum exp(x - m)) after word k (unchanged past the
        row's end), without branches that diverge inside a warp:
            m' = max(m, max_i x_i);  s' = s * exp(m - m') + sum_i exp(x_i - m')
        (one exp per element plus one per word). softcap is increasing, so the word's maximum
        is softcapped once. A word that leaves m = -inf adds nothing (exp(-inf + inf) would be
        NaN) unless it holds a NaN; a NaN elsewhere reaches s through its exp."""
        if k >= n_words:
            return row_max, row_sum
        raw_max = NEG_INF
        for i in range(pack):
            raw_max = max(raw_max, raw(word, i))
        new_max = max(row_max, capped(raw_max, softcap, inv_softcap))
        if new_max == NEG_INF:
            for i in range(pack):
                if raw(word, i) != raw(word, i):
                    row_sum = NAN
            return row_max, row_sum
        row_sum *= exp2((row_max - new_max) * LOG2E)
        for i in range(pack):
            row_sum += exp2((element(word, i, softcap, inv_softcap) - new_max) * LOG2E)
        return new_max, row_sum

    @device_function
    def weighted_sum(word, k, n_words, weight, has_weight, softcap, inv_softcap):
        """sum_i w_j x_j over the word's elements j = k * pack + i (0 past the row's end)."""
        total = ZERO
        if k < n_words:
            for i in range(pack):
                x = element(word, i, softcap, inv_softcap)
                total += x * weight[k * pack + i] if has_weight else x
        return total

    @device_function
    def gradient_word(word, k, label, row_max, log_s, coef_p, coef_w, coef_y, weight, has_weight,
                      softcap, inv_softcap):
        """The packed gradient of word k: dL/dx_j = P * p_j - Q * w_j - T * [j == y], times the
        softcap derivative, each element rounded once to the logits' format."""
        out = 0
        label_here = k == label // pack  # one comparison a word; the element is label % pack
        for i in range(pack):
            x = element(word, i, softcap, inv_softcap)
            d = coef_p * exp2(((x - row_max) - log_s) * LOG2E)
            if coef_w != ZERO:
                d -= coef_w * weight[k * pack + i] if has_weight else coef_w
            if label_here and i == label % pack:
                d -= coef_y
            if softcap > ZERO:  # x = c * t with t = tanh(r / c): dx/dr = 1 - t**2
                t = x * inv_softcap
                d *= ONE - t * t
            code = encode(d) & mask
            if i == pack - 1:
                code = (code ^ top_sign) - top_sign
            out |= code << (bits * i)
        return out

    @cuda.jit(device=True)
    def fill_row(out_row, n_words, word):
        """Fill a gradient row with one word (zeros for ignored rows, NaN for bad targets)."""
        for k in range(cuda.threadIdx.x, n_words, cuda.blockDim.x):
            out_row[k] = word

    @cuda.jit
    def kernel(logits, target, weight, grad, row_loss, row_z, row_lse, stats, grad_output,
               n_classes, ignore_index, one_minus_eps, eps_over_v, z_loss, softcap,
               has_weight, reduction, go_per_row):
        """
        logits       # (N, V / pack) words of `pack` elements, rows may be strided
        target       # (N,) int32/int64
        weight       # (V,) float32, or (1,) unused when has_weight == 0
        grad         # (N, V / pack) words (may be `logits` itself: in-place); unused without grad
        row_loss, row_z, row_lse  # (N,) float32 outputs: loss (with z part), z part, lse
        stats        # (3,) float32 from target_stats
        grad_output  # (N,) float32 when go_per_row else (1,)
        """
        lane_a, lane_b, warp_a, warp_b = reduction_scratch()
        tid = cuda.threadIdx.x
        step = cuda.blockDim.x
        n_words = logits.shape[1]
        inv_softcap = ONE / softcap if softcap > ZERO else ZERO
        need_dot = eps_over_v > ZERO
        all_weights = stats[STAT_ALL_WEIGHTS]
        for row in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):
            # 1. The target: ignored rows are not read; an out-of-range target poisons the row.
            label = int(target[row])
            if label == ignore_index or not (0 <= label < n_classes):
                ignored = label == ignore_index
                fill = ZERO if ignored else NAN
                if tid == 0:
                    row_loss[row] = fill
                    row_z[row] = fill
                    row_lse[row] = fill
                if with_grad:
                    fill_row(grad[row], n_words, 0 if ignored else nan_word)
                continue

            # 2. Pass 1: online softmax state (m, s) per thread over its words, four loads in
            #    flight; also sum_j w_j x_j for label smoothing.
            row_words = logits[row]
            row_max = NEG_INF
            row_sum = ZERO
            weighted_x = ZERO
            for k in range(tid, n_words, UNROLL * step):
                w0 = load(row_words, k, n_words)
                w1 = load(row_words, k + step, n_words)
                w2 = load(row_words, k + 2 * step, n_words)
                w3 = load(row_words, k + 3 * step, n_words)
                row_max, row_sum = absorb(row_max, row_sum, w0, k, n_words, softcap,
                                          inv_softcap)
                row_max, row_sum = absorb(row_max, row_sum, w1, k + step, n_words, softcap,
                                          inv_softcap)
                row_max, row_sum = absorb(row_max, row_sum, w2, k + 2 * step, n_words, softcap,
                                          inv_softcap)
                row_max, row_sum = absorb(row_max, row_sum, w3, k + 3 * step, n_words, softcap,
                                          inv_softcap)
                if need_dot:
                    weighted_x += (
                        weighted_sum(w0, k, n_words, weight, has_weight, softcap, inv_softcap)
                        + weighted_sum(w1, k + step, n_words, weight, has_weight, softcap,
                                       inv_softcap)
                        + weighted_sum(w2, k + 2 * step, n_words, weight, has_weight, softcap,
                                       inv_softcap)
                        + weighted_sum(w3, k + 3 * step, n_words, weight, has_weight, softcap,
                                       inv_softcap))

            # 3. Thread 0 reads x_y (before the barriers below: in-place, pass 2 overwrites the
            #    row), then the threads combine their states: every thread gets the row's m and s.
            if tid == 0:
                x_label = element(int(row_words[label // pack]), label % pack, softcap,
                                  inv_softcap)
            row_max, row_sum = block_lse(row_max, row_sum, lane_a, lane_b, warp_a, warp_b)
            if need_dot:
                weighted_x, _ = block_sum2(weighted_x, ZERO, lane_a, lane_b, warp_a, warp_b)
            # log p_j = (x_j - m) - log(s): lse - x_j would lose log(s) to an ulp of lse
            # (1e-3 at |x| = 1e4, 2e31 at bf16's largest values).
            if row_max == POS_INF or row_sum != row_sum:  # a +inf or NaN logit: the row's
                row_max = NAN                               # loss and gradient are NaN, as
                log_s = NAN                                 # PyTorch's
            elif row_sum == ZERO:  # every logit -inf: lse = -inf, loss and gradient NaN
                log_s = ZERO
            else:
                log_s = math.log(row_sum)
            lse = row_max + log_s

            # 4. The row's loss.
            label_weight = weight[label] if has_weight else ONE
            ce_part_weight = one_minus_eps * label_weight
            if tid == 0:
                z_part = z_loss * lse * lse
                ce = ce_part_weight * ((row_max - x_label) + log_s)
                if need_dot:  # (eps / V) * S_w first: V * lse alone can overflow fp32
                    ce += (eps_over_v * all_weights) * lse - eps_over_v * weighted_x
                row_loss[row] = ce + z_part
                row_z[row] = z_part
                row_lse[row] = lse
            if not with_grad:
                continue

            # 5. Pass 2: the gradient (module docstring), four loads in flight before the stores.
            upstream = grad_output[row] if go_per_row else grad_output[0]
            if reduction == MEAN:
                grad_ce = upstream / stats[STAT_WEIGHT_SUM]
                grad_z = upstream / stats[STAT_COUNT]
            else:
                grad_ce = upstream
                grad_z = upstream
            coef_p = (grad_ce * (ce_part_weight + eps_over_v * all_weights)
                      + grad_z * TWO * z_loss * lse)
            coef_w = grad_ce * eps_over_v
            coef_y = grad_ce * ce_part_weight
            grad_row = grad[row]
            for k in range(tid, n_words, UNROLL * step):
                w0 = load(row_words, k, n_words)
                w1 = load(row_words, k + step, n_words)
                w2 = load(row_words, k + 2 * step, n_words)
                w3 = load(row_words, k + 3 * step, n_words)
                grad_row[k] = gradient_word(w0, k, label, row_max, log_s, coef_p, coef_w,
                                            coef_y, weight, has_weight, softcap, inv_softcap)
                if k + step < n_words:
                    grad_row[k + step] = gradient_word(w1, k + step, label, row_max, log_s,
                                                       coef_p, coef_w, coef_y, weight,
                                                       has_weight, softcap, inv_softcap)
                if k + 2 * step < n_words:
                    grad_row[k + 2 * step] = gradient_word(w2, k + 2 * step, label, row_max,
                                                           log_s, coef_p, coef_w, coef_y, weight,
                                                           has_weight, softcap, inv_softcap)
                if k + 3 * step < n_words:
                    grad_row[k + 3 * step] = gradient_word(w3, k + 3 * step, label, row_max,
                                                           log_s, coef_p, coef_w, coef_y, weight,
                                                           has_weight, softcap, inv_softcap)

    return tag(kernel, rewrites)
