"""The result type of :func:`numba_ce.cross_entropy_with_grad`."""
from typing import Any, NamedTuple


class CrossEntropyResult(NamedTuple):
    """loss: float32, 0-d ("mean"/"sum") or (N,) ("none").  grad: like the logits.
    z_loss: the z-loss part of ``loss``, reduced the same way.
    lse: float32 (N,), 0 for ignored rows."""
    loss: Any
    grad: Any
    z_loss: Any
    lse: Any
