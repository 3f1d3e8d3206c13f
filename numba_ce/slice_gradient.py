"""The gradient of a slice of the vocabulary, from each row's log-sum-exp given: the kernel of
the lean linear cross-entropy's second pass (numba_ce.linear_lean), and of any split of the
classes whose lse is merged elsewhere (a vocabulary-parallel head: each rank holds a slice of
the classes and gets each row's lse from a collective).

A slice holds the classes [o, o + V_s) of V, o its ``column_offset``. Given a row's lse over
all V classes (numba_ce.kernels' notation; x after softcap where set):

    p_j      = exp(x_j - lse)                               no max and no sum: one pass
    dL/dx_j  = P * p_j - Q * w_j - T * [j == y]             j = o + local index
    P, Q, T  from the target, w_y, S_w, the reduction's statistics and the upstream gradient,
             as the row kernel computes them (kernels.gradient_coefficients); eps / V and S_w
             are of the full V
    softcap: dL/dr_j = dL/dx_j * (1 - tanh(r_j / c)**2)

w_y is read from the class weights of all V at the target, or (``weight_by_row``) from each
row's w_y given: a vocabulary-parallel rank holds only its slice's weights and gets w_y from the
merged states (numba_ce.softmax_states).

The target's class is in the slice for at most one slice of a row: [j == y] tests the local
index against y - o, which is negative or past the slice's end elsewhere. Rows whose target is
ignore_index get 0 and rows whose target is outside [0, V) NaN, as in the row kernel. Each
element is rounded once to the logits' format, in place or into another array of words.

p_j from x_j - lse loses up to half an ulp of lse against the row kernel's (x_j - m) - log(s):
a relative 4e-6 in p_j at |lse| = 64 (float32's), far below a bf16 or fp16 gradient's rounding
and within a float32 gradient's tolerance at the logits language models produce.

A block a row, striding over the rows; each thread reads and writes its words in groups of
UNROLL (numba_ce.row_passes' read_group and store_group, which the row kernel's pass 2 uses):
one read and one write of the slice, no shared memory, no barrier.
"""
import numpy as np
from numba import cuda

from .kernel_cache import kernel_factory
from .kernels import (NO_SMOOTHING, STAT_ALL_WEIGHTS, WEIGHTED_SMOOTHING, fill_row,
                      gradient_coefficients, kept, nan_word_of)
from .reductions import ZERO
from .row_math import ONE, RowGradient, Softcap
from .row_passes import grouped_words, row_passes
from .words import UNROLL

NO_POLICY = 0  # the passes' reads without an L2 cache policy


@kernel_factory
def slice_gradient_kernel(fmt, pack, capped=False, smoothing=NO_SMOOTHING):
    """The kernel for one logits format, ``pack`` elements per word, with or without softcap
    (``capped``) and label smoothing (``smoothing``, class weighted or not): compile-time, as
    in kernels.row_kernel."""
    nan_word = nan_word_of(fmt, pack)
    smoothed = smoothing != NO_SMOOTHING
    weighted = smoothing == WEIGHTED_SMOOTHING
    coefficients = gradient_coefficients(smoothed)
    passes = row_passes(fmt, pack, capped, smoothed, weighted, False)
    read, read_group, store_gradient, store_group = (passes.read, passes.read_group,
                                                     passes.store_gradient, passes.store_group)

    @cuda.jit
    def kernel(logits, grad, target, weight, slice_weight, row_lse, stats, grad_output,
               column_offset, weight_by_row, n_classes, ignore_index, one_minus_eps, eps_over_v,
               z_loss, softcap, has_weight, reduction, go_per_row):
        """
        logits        # (N, V_s / pack) words of the slice's logits, rows may be strided
        grad          # (N, V_s / pack) words: the slice's gradient (may be `logits`: in place)
        target        # (N,) int32/int64: classes of the full V
        weight        # (V,) float32 class weights, read at each row's target; with
                      #   weight_by_row (N,): each row's w_y itself (a vocabulary-parallel
                      #   call, whose rank holds only its slice's weights); (1,) unused when
                      #   has_weight == 0
        slice_weight  # (V_s,) float32: the slice's class weights, w[o:o + V_s] (read with
                      #   weighted smoothing only)
        row_lse       # (N,) float32: each row's lse over the full V
        stats         # (3,) float32 from target_stats
        grad_output   # (N,) float32 when go_per_row else (1,)
        column_offset # o, the slice's first class
        weight_by_row # 1: ``weight`` holds each row's w_y, 0: the class weights
        n_classes     # V, the full vocabulary
        """
        cap = Softcap(softcap, ONE / softcap if capped else ZERO)
        all_weights = stats[STAT_ALL_WEIGHTS]
        group_words = cuda.local.array(UNROLL, np.int64)  # a group's words, in registers
        n_words = logits.shape[1]
        step = cuda.blockDim.x
        n_grouped = grouped_words(n_words, step)
        for row in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):
            label = int(target[row])
            if not kept(label, ignore_index, n_classes):
                fill_row(grad[row], n_words, 0 if label == ignore_index else nan_word)
                continue
            lse = row_lse[row]
            label_weight = (weight[row] if weight_by_row else weight[label]) if has_weight else ONE
            upstream = grad_output[row] if go_per_row else grad_output[0]
            coef_p, coef_w, coef_y = coefficients(upstream, reduction, stats, all_weights,
                                                  one_minus_eps * label_weight, eps_over_v,
                                                  z_loss, lse)
            # p_j = 2 ** ((x_j - lse) * log2(e) - 0): lse in the place of m, log2(s) = 0
            gradient = RowGradient(lse, ZERO, coef_p, coef_w, coef_y)
            local_label = label - column_offset  # outside [0, V_s) when y is not in the slice
            for k in range(cuda.threadIdx.x, n_grouped, UNROLL * step):
                read_group(group_words, logits, row, k, step, NO_POLICY)
                store_group(grad, row, group_words, k, step, local_label, gradient,
                            slice_weight, cap)
            for k in range(n_grouped + cuda.threadIdx.x, n_words, step):
                store_gradient(grad, row, read(logits, row, k, NO_POLICY), k, local_label,
                               gradient, slice_weight, cap)

    return kernel
