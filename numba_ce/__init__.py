"""numba_ce: fused cross-entropy loss and gradient in Numba CUDA kernels.

    loss = numba_ce.cross_entropy(logits, target)
    res = numba_ce.cross_entropy_with_grad(logits, target)  # res.loss, .grad, .z_loss, .lse
    res = numba_ce.linear_cross_entropy_with_grad(hidden, head_weight, target)  # no N x V logits
"""
from . import numpy_compat  # noqa: F401  (first: numba-cuda 0.30 under NumPy 2.5)
from . import reference
from .api import cross_entropy, cross_entropy_with_grad
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad
from .results import CrossEntropyResult, LinearCrossEntropyResult

__all__ = ["cross_entropy", "cross_entropy_with_grad", "linear_cross_entropy",
           "linear_cross_entropy_with_grad", "CrossEntropyResult", "LinearCrossEntropyResult",
           "reference"]
__version__ = "0.1.0"
