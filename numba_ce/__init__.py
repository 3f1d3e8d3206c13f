"""numba_ce: fused cross-entropy loss and gradient in Numba CUDA kernels.

    loss = numba_ce.cross_entropy(logits, target)
    res = numba_ce.cross_entropy_with_grad(logits, target)  # res.loss, .grad, .z_loss, .lse
"""
from . import reference
from .api import cross_entropy, cross_entropy_with_grad
from .results import CrossEntropyResult

__all__ = ["cross_entropy", "cross_entropy_with_grad", "CrossEntropyResult", "reference"]
__version__ = "0.1.0"
