"""Block-wide max and sum by a tree in shared memory, the textbook reduction of the teaching
variants. Every thread of the block calls it and gets the block's result. With 8 threads:

    slot        0    1    2    3    4  5  6  7
    stride 4   0+4  1+5  2+6  3+7                 thread t < 4: slot t = combine(t, t + 4)
    stride 2   0..2 1..3                          thread t < 2: slot t = combine(t, t + 2)
    stride 1   0..1                               slot 0: the block's result, read by all
    log2(threads) steps, a barrier after each.

The production kernels reduce with warp shuffles instead (numba_ce.reductions): registers
within each warp, shared memory only between warps, and two barriers whatever the block size.
"""
from numba import cuda

from ..portable import device_function

MAX_THREADS = 1024  # slots of the scratch array; blocks are a power of two up to this


def _tree_allreduce(combine):
    @cuda.jit(device=True)
    def allreduce(value, scratch):
        """``combine`` over every thread's ``value``; scratch # (MAX_THREADS,) shared float32."""
        tid = cuda.threadIdx.x
        scratch[tid] = value
        cuda.syncthreads()  # every thread's value is in its slot
        stride = cuda.blockDim.x // 2
        while stride > 0:
            if tid < stride:
                scratch[tid] = combine(scratch[tid], scratch[tid + stride])
            cuda.syncthreads()  # this level of the tree is complete before the next reads it
            stride //= 2
        result = scratch[0]
        cuda.syncthreads()  # everyone has read slot 0 before the scratch is used again
        return result

    return allreduce


@device_function
def _larger(a, b):
    return max(a, b)


@device_function
def _add(a, b):
    return a + b


block_max = _tree_allreduce(_larger)
block_sum = _tree_allreduce(_add)
