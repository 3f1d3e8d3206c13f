"""The fused cross-entropy kernel built up in three steps, each a small runnable variant.

    naive   three passes over the logits (max, sum, gradient), a launch each   4 N x V arrays moved
    online  online softmax: max and sum in one pass, then the gradient           3 N x V arrays
    fused   the production kernel, numba_ce.kernels.row_kernel: both passes in
            one launch, the second read from L2 while the rows in flight fit   2 N x V arrays

Each module has ``cross_entropy_with_grad(logits, target) -> (mean loss, gradient)`` for fp32
logits (N, V) and int targets (N,), runs in the CUDA simulator and on a GPU, and matches
:func:`numba_ce.reference.cross_entropy_with_grad`. WALKTHROUGH.md beside this file tells the
story from the formula to the kernel lines and their PTX.
"""
from . import fused, naive, online

STEPS = (naive, online, fused)
