"""Step 3, the production design: :func:`numba_ce.kernels.row_kernel` (read it there; it is not
copied here). What it changes from step 2, and what each change saves:

1. Both passes in one launch: pass 2 re-reads the row that pass 1 has just read, and lse never
   travels between launches. The ncu counters on the H200 showed that the second read missed L2
   (8192 x 128256 bf16: 4.2 GB read, twice the logits) while every block streamed its own row,
   so each block keeps the first words of its row in shared memory between the passes (about
   113 KB of a 250 KB row, two blocks a multiprocessor), and copies in its next row's words
   (cp.async) while pass 2 writes the gradient: 3.3 GB read, 1.49 ms instead of 1.61. Pass 1
   then loads the rest with an L2 evict-last policy and pass 2 reads it backwards with
   evict-first, so most of the second read comes from L2 (1.39 ms; WALKTHROUGH section 10).
2. 16-bit logits, read as 8-byte words of four elements (``portable.load_word`` and
   numba_ce.words): half the bytes of fp32 and a quarter of the load instructions. The gradient
   is packed and written the same way, rounded once from fp32, two elements an instruction.
3. Several loads in flight per thread (``words.UNROLL``): their latencies overlap instead of
   adding up, which a memory-bound kernel needs to come near the bandwidth ceiling.
4. Block reductions by warp shuffles (numba_ce.reductions): the (m, s) states merge pairwise in
   registers (``reductions.merge_lse``), two barriers instead of one per tree level.
5. The loss is written with the lse and the gradient can overwrite the logits (inplace=True):
   no softmax stored for a backward pass, no second N x V buffer.
6. A training loss's options: ignore_index, class weights, label smoothing, z-loss, softcap and
   the reductions 'mean' / 'sum' / 'none' (their gradients are in the kernels.py docstring).
"""
import numpy as np

from ..api import cross_entropy_with_grad as production_cross_entropy_with_grad
from ..inspection.roofline import ARRAYS_MOVED

DRAM_ARRAYS = ARRAYS_MOVED["fused"]  # one read of the logits, one write of the gradient


def cross_entropy_with_grad(logits, target):
    """(mean loss, gradient) of fp32 ``logits`` (N, V) against ``target`` (N,), by the
    production kernels through :func:`numba_ce.cross_entropy_with_grad`."""
    result = production_cross_entropy_with_grad(np.asarray(logits), np.asarray(target))
    return float(result.loss), np.asarray(result.grad)
