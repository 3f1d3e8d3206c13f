"""The partial softmax state of each row over a slice of the vocabulary: the kernel of the first
pass of a vocabulary-parallel cross-entropy (numba_ce.vocab_parallel), where each rank holds the
classes [o, o + V_s) of V (o its ``column_offset``) and the states of all slices are merged
elsewhere (numba_ce.softmax_states) into each row's statistics over all V classes.

Per row, in the notation of numba_ce.kernels (x after softcap where set, w the slice's class
weights, 1 without them), over the slice's classes j only:

    m   = max_j x_j                    LOWEST for a row of -inf (the row kernel's start value)
    s   = sum_j exp(x_j - m)           float32, the row kernel's pass 1 (online, one rescale a
                                       group of words; numba_ce.row_passes)
    x_y = x_y where o <= y < o + V_s   else 0: what the loss keeps of it, as the row kernel's
                                       (with softcap t = tanh(r_y / c), x_y = c t, so that the
                                       merge forms m - c t with one rounding)
    w_y = w_y there                    else 0 (1 without class weights)
    wx  = sum_j w_j x_j                label smoothing's sum (0 without smoothing)

Rows whose target is ignore_index are not read: the empty state (LOWEST, 0, 0, 0, 0). A target
outside [0, V) is in no slice; the merge gives its row NaN, as the row kernel does.

A block a row, striding over the rows: one read of the slice, no shared memory but the block
reductions' (numba_ce.reductions), and thread 0 reads the target's word once more.
"""
import numpy as np
from numba import cuda

from .kernel_cache import kernel_factory
from .kernels import LOWEST, NO_SMOOTHING, WEIGHTED_SMOOTHING
from .portable import load_word
from .reductions import ZERO, block_lse, block_sum2, reduction_scratch
from .row_math import ONE, Softcap, row_math
from .row_passes import grouped_words, row_passes
from .slice_gradient import NO_POLICY
from .words import UNROLL


@kernel_factory
def slice_states_kernel(fmt, pack, capped=False, smoothing=NO_SMOOTHING):
    """The kernel for one logits format, ``pack`` elements per word, with or without softcap
    (``capped``) and label smoothing's weighted sum (``smoothing``, class weighted or not):
    compile-time, as in kernels.row_kernel."""
    smoothed = smoothing != NO_SMOOTHING
    weighted = smoothing == WEIGHTED_SMOOTHING
    label_logit = row_math(fmt, pack, capped, smoothed, weighted).label_logit
    passes = row_passes(fmt, pack, capped, smoothed, weighted, False)
    read, read_group, absorb_group, absorb_word = (passes.read, passes.read_group,
                                                   passes.absorb_group, passes.absorb_word)

    @cuda.jit
    def kernel(logits, target, weight, row_max, row_sum, target_logit, target_weight,
               weighted_sum, column_offset, ignore_index, softcap, has_weight):
        """
        logits        # (N, V_s / pack) words of the slice's logits, rows may be strided
        target        # (N,) int32/int64: classes of the full V
        weight        # (V_s,) float32: the slice's class weights, or (1,) unused when
                      #   has_weight == 0
        row_max, row_sum, target_logit, target_weight, weighted_sum
                      # (N,) float32 outputs: m, s, x_y, w_y, wx of the module docstring
        column_offset # o, the slice's first class
        """
        scratch = reduction_scratch()
        group_words = cuda.local.array(UNROLL, np.int64)  # a group's words, in registers
        tid = cuda.threadIdx.x
        step = cuda.blockDim.x
        n_words = logits.shape[1]
        n_columns = n_words * pack
        n_grouped = grouped_words(n_words, step)
        cap = Softcap(softcap, ONE / softcap if capped else ZERO)
        for row in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):
            label = int(target[row])
            if label == ignore_index:  # uniform over the block: every thread continues
                if tid == 0:
                    row_max[row] = LOWEST
                    row_sum[row] = ZERO
                    target_logit[row] = ZERO
                    target_weight[row] = ZERO
                    weighted_sum[row] = ZERO
                continue
            # 1. This thread's online-softmax state over its words (and sum_j w_j x_j).
            state_max = LOWEST
            state_sum = ZERO
            weighted_x = ZERO
            for k in range(tid, n_grouped, UNROLL * step):
                read_group(group_words, logits, row, k, step, NO_POLICY)
                state_max, state_sum, weighted_x = absorb_group(
                    state_max, state_sum, weighted_x, group_words, k, step, weight, cap)
            for k in range(n_grouped + tid, n_words, step):
                state_max, state_sum, weighted_x = absorb_word(
                    state_max, state_sum, weighted_x, read(logits, row, k, NO_POLICY), k,
                    weight, cap)
            # 2. The block's state: every thread takes part in the reductions (barriers).
            state_max, state_sum = block_lse(state_max, state_sum, scratch)
            if smoothed:
                weighted_x, _ = block_sum2(weighted_x, ZERO, scratch)
            # 3. Thread 0 writes the row's state, with the target's logit and weight where the
            #    slice holds the target.
            if tid == 0:
                local = label - column_offset
                held = 0 <= local < n_columns
                row_max[row] = state_max
                row_sum[row] = state_sum
                weighted_sum[row] = weighted_x
                target_logit[row] = (label_logit(load_word(logits, row, local // pack),
                                                 local % pack, cap) if held else ZERO)
                target_weight[row] = ((weight[local] if has_weight else ONE) if held
                                      else ZERO)

    return kernel
