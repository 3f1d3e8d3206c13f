"""numba_ce: fused cross-entropy loss and gradient in Numba CUDA kernels.

    loss = numba_ce.cross_entropy(logits, target)
    res = numba_ce.cross_entropy_with_grad(logits, target)  # res.loss, .grad, .z_loss, .lse
    res = numba_ce.linear_cross_entropy_with_grad(hidden, head_weight, target)  # no N x V logits
    state = numba_ce.softmax_state(local_logits, target, vocab_start=o)  # a vocabulary slice's:
    merged = numba_ce.merge_softmax_states(all_states)       # numba_ce.vocab_parallel
"""
from . import numpy_compat  # noqa: F401  (first: numba-cuda 0.30 under NumPy 2.5)
from . import reference
from .api import cross_entropy, cross_entropy_with_grad
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad
from .results import CrossEntropyResult, LinearCrossEntropyResult
from .vocab_parallel import merge_softmax_states, slice_cross_entropy_with_grad, softmax_state
from .vocab_parallel_linear import linear_slice_cross_entropy_with_grad, linear_softmax_state

__all__ = ["cross_entropy", "cross_entropy_with_grad", "linear_cross_entropy",
           "linear_cross_entropy_with_grad", "CrossEntropyResult", "LinearCrossEntropyResult",
           "softmax_state", "merge_softmax_states", "slice_cross_entropy_with_grad",
           "linear_softmax_state", "linear_slice_cross_entropy_with_grad", "reference"]
__version__ = "0.1.0"
