"""Step 3, the production design: :func:`numba_ce.kernels.row_kernel` (read it there; it is not
copied here). What it changes from step 2, and what each change saves:

1. Both passes in one launch, one block a row: pass 2 re-reads the row that pass 1 has just
   read, and lse never travels between launches. When the rows in flight fit in L2 (an H200's
   is 50 MB; a bf16 row of 128256 logits is 250 KB, so one row on each of its 132 SMs is 33 MB),
   the second read comes from L2 and DRAM sees one read and one write, 2 N V itemsize bytes:
   the byte model of numba_ce.inspect.roofline.
2. 16-bit logits, read as 8-byte words of four elements (row_kernel's ``load`` and
   ``element``): half the bytes of fp32 and a quarter of the load instructions. The gradient is
   packed and written the same way, rounded once from fp32.
3. Several loads in flight per thread (``kernels.UNROLL``): their latencies overlap instead of
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
from ..inspect.roofline import ARRAYS_MOVED

DRAM_ARRAYS = ARRAYS_MOVED["fused"]  # one read of the logits, one write of the gradient


def cross_entropy_with_grad(logits, target):
    """(mean loss, gradient) of fp32 ``logits`` (N, V) against ``target`` (N,), by the
    production kernels through :func:`numba_ce.cross_entropy_with_grad`."""
    result = production_cross_entropy_with_grad(np.asarray(logits), np.asarray(target))
    return float(result.loss), np.asarray(result.grad)
