"""Block-wide reductions shared by the kernels: a butterfly inside each warp, then across warps.

    lanes  0 1 2 3 ... 31      step 16: lane i meets lane i^16
           |/ \\| ...           step  8: lane i meets lane i^8  ... down to step 1
    every lane of a warp now holds the warp's result; lane 0 writes it to ``warp_a/warp_b[warp]``,
    then every warp reduces those slots the same way, so every thread ends with the block's result.

The helpers reduce a pair of float32 values at once (an online-softmax state (m, s), or two sums)
and must be called by every thread of the block (they contain barriers), with the shared
``scratch`` of :func:`reduction_scratch`.
"""
import numpy as np
from numba import cuda

from .limits import MAX_THREADS
from .portable import (SIMULATOR, WARP_SIZE, bits_from_f32, device_function, exp2,
                       make_warp_allreduce)

NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)
LOG2E = np.float32(np.log2(np.e))  # exp(x) = exp2(x * log2(e))

WARP_SLOTS = MAX_THREADS // WARP_SIZE  # shared float32 slots for per-warp partial results
# A slot per thread for the simulator's warp reductions; GPU warps shuffle registers instead, and
# a one-slot array keeps the kernels' static shared memory at the 256 bytes of the warp slots,
# which numba_ce.planning.STATIC_SHARED_BYTES counts on.
LANE_SLOTS = MAX_THREADS if SIMULATOR else 1


@cuda.jit(device=True)
def reduction_scratch():
    """The shared arrays of the block reductions, (lane_a, lane_b, warp_a, warp_b): a float32
    slot per thread (simulator only, see :mod:`numba_ce.portable`) and a slot per warp, two of
    each for the pair. One allocation a line: the simulator tells shared arrays apart by their
    source line."""
    lane_a = cuda.shared.array(LANE_SLOTS, np.float32)
    lane_b = cuda.shared.array(LANE_SLOTS, np.float32)
    warp_a = cuda.shared.array(WARP_SLOTS, np.float32)
    warp_b = cuda.shared.array(WARP_SLOTS, np.float32)
    return lane_a, lane_b, warp_a, warp_b


@device_function
def merge_lse(max_a, sum_a, max_b, sum_b):
    """Merge two online-softmax states (m, s), where s = sum_j exp(x_j - m).

    m = max(m_a, m_b);  s = s_a * exp(m_a - m) + s_b * exp(m_b - m).
    Two empty states (m = -inf) stay empty instead of producing exp(-inf + inf) = NaN; a NaN or
    +inf anywhere makes the result NaN, as it should.
    """
    new_max = max(max_a, max_b)
    if new_max == NEG_INF:
        return new_max, sum_a + sum_b
    return new_max, (sum_a * exp2((max_a - new_max) * LOG2E)
                     + sum_b * exp2((max_b - new_max) * LOG2E))


@device_function
def add_pair(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


warp_lse = make_warp_allreduce(merge_lse)
warp_sum2 = make_warp_allreduce(add_pair)


def _make_block_allreduce(warp_allreduce, empty_a, empty_b):
    @cuda.jit(device=True)
    def block_allreduce(a, b, scratch):
        lane_a, lane_b, warp_a, warp_b = scratch
        lane = cuda.threadIdx.x % WARP_SIZE
        warp = cuda.threadIdx.x // WARP_SIZE
        n_warps = cuda.blockDim.x // WARP_SIZE
        a, b = warp_allreduce(a, b, lane_a, lane_b)
        if n_warps > 1:  # uniform over the block
            if lane == 0:
                warp_a[warp] = a
                warp_b[warp] = b
            cuda.syncthreads()  # all warp results are in shared memory
            if lane < n_warps:
                a, b = warp_a[lane], warp_b[lane]
            else:
                a, b = empty_a, empty_b
            a, b = warp_allreduce(a, b, lane_a, lane_b)
            cuda.syncthreads()  # the slots may be reused by the next reduction
        return a, b

    return block_allreduce


# Every thread's (max, sum) state merged over the block, returned to every thread.
block_lse = _make_block_allreduce(warp_lse, NEG_INF, ZERO)
# Two sums over the block in a fixed order (deterministic), returned to every thread.
block_sum2 = _make_block_allreduce(warp_sum2, ZERO, ZERO)


# An index no row has (float32's largest finite value as a bit pattern, so never a NaN pattern
# in flight): what a lane without a candidate offers to block_argmax.
NO_INDEX = 0x7F7FFFFF


@device_function
def first_largest(value_a, at_a, value_b, at_b):
    """The (value, index) pair of the larger value, the smaller index on a tie: the first
    maximal element, as torch.argmax. Indices travel as float32 bit patterns
    (portable.f32_from_bits), moved and compared as integers, never as floats."""
    if value_b > value_a or (value_b == value_a and bits_from_f32(at_b) < bits_from_f32(at_a)):
        return value_b, at_b
    return value_a, at_a


warp_argmax = make_warp_allreduce(first_largest)
# Every thread's (largest value, its first index as float32 bits) merged over the block.
block_argmax = _make_block_allreduce(warp_argmax, NEG_INF,
                                     np.int32(NO_INDEX).view(np.float32))
