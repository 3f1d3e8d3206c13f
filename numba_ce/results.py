"""The result types of :func:`numba_ce.cross_entropy_with_grad` and of the linear variant."""
from typing import Any, NamedTuple

# A NumPy or CuPy array (in the simulator NumPy only): the public API takes and returns either.
Array = Any


class CrossEntropyResult(NamedTuple):
    """loss: float32, 0-d ("mean"/"sum") or (N,) ("none").  grad: like the logits.
    z_loss: the z-loss part of ``loss``, reduced the same way.
    lse: float32 (N,), 0 for ignored rows."""
    loss: Any
    grad: Any
    z_loss: Any
    lse: Any


class LinearCrossEntropyResult(NamedTuple):
    """The result of :func:`numba_ce.linear_cross_entropy_with_grad`. loss and z_loss as in
    CrossEntropyResult; each gradient has the shape and dtype of what it differentiates (None
    for an absent bias, or one not asked for)."""
    loss: Any
    grad_input: Any
    grad_linear_weight: Any
    grad_linear_bias: Any
    z_loss: Any
