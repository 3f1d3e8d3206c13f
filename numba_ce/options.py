"""The options of a cross-entropy call, checked once, read by name everywhere below.

An :class:`Options` is made at the entry point (or when a module is built) and travels down to the
launch plans; the compile-time part of the row kernel (softcap or not, label smoothing and how) is
derived from it by :func:`numba_ce.planning.row_kernel_spec`, with what the call's arrays decide
(class weights or not; class indices or class probabilities as targets).
"""
import math
import numbers
from dataclasses import dataclass

import numpy as np

REDUCTIONS = ("mean", "sum", "none")
INT64_RANGE = (-2**63, 2**63 - 1)
# softcap's tanh (portable.fast_tanh) is within 2.4e-7 of exact, so a capped logit is within
# softcap * 2.4e-7: at most 2.4e-4 up to this limit. Beyond it the error would grow without bound
# (a softcap far above the logits' range caps nothing and only adds that error).
MAX_SOFTCAP = 1000.0
# The kernels take 1 / softcap in float32: from float32's smallest normal number on, it is finite.
MIN_SOFTCAP = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class Options:
    """ignore_index: rows with this target count for nothing. reduction: "mean", "sum" or
    "none". label_smoothing in [0, 1]. z_loss >= 0 (z * lse**2 per counted row). softcap in
    (0, 1000] or None. return_token_accuracy: also the share of counted rows whose argmax is
    their target, reduced as the loss. return_predicted_tokens: also each row's argmax (-1 for
    ignored rows). Each is checked and normalised (ints, floats, bools) when it is made."""
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    return_token_accuracy: bool = False
    return_predicted_tokens: bool = False

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none' (got {self.reduction!r})")
        ignore_index = self.ignore_index
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int (got {type(ignore_index).__name__})")
        if not INT64_RANGE[0] <= ignore_index <= INT64_RANGE[1]:
            raise ValueError(f"ignore_index must fit in int64 (got {ignore_index})")
        label_smoothing = _real("label_smoothing", self.label_smoothing)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1] (got {label_smoothing})")
        z_loss = _real("z_loss", self.z_loss)
        if not 0.0 <= z_loss < math.inf:  # (comparisons, which torch.compile traces symbolically)
            raise ValueError(f"z_loss must be a finite number >= 0 (got {z_loss})")
        softcap = None if self.softcap is None else _softcap(self.softcap)
        accuracy = check_flag("return_token_accuracy", self.return_token_accuracy)
        predicted = check_flag("return_predicted_tokens", self.return_predicted_tokens)
        for name, value in [("ignore_index", int(ignore_index)),
                            ("label_smoothing", label_smoothing), ("z_loss", z_loss),
                            ("softcap", softcap), ("return_token_accuracy", accuracy),
                            ("return_predicted_tokens", predicted)]:
            object.__setattr__(self, name, value)

    @property
    def reduced(self):
        """Whether the loss is reduced to one number ("mean", "sum")."""
        return self.reduction != "none"

    @property
    def argmax(self):
        """Whether the row kernel finds each row's argmax (for either new output)."""
        return self.return_token_accuracy or self.return_predicted_tokens


def _softcap(value):
    softcap = _real("softcap", value)
    if not 0.0 < softcap < math.inf:
        raise ValueError(f"softcap must be None or a finite number > 0 (got {softcap})")
    if softcap > MAX_SOFTCAP:
        raise ValueError(
            f"softcap must be at most {MAX_SOFTCAP:g} (got {softcap:g}): capped logits are "
            "within softcap * 2.4e-7 of exact; for logits that need no cap pass softcap=None")
    if softcap < MIN_SOFTCAP:
        raise ValueError(f"softcap must be at least {MIN_SOFTCAP:.8g}, float32's smallest "
                         f"normal number (got {softcap:g})")
    return softcap


def check_flag(name, value):
    """A flag (an option above, ``validate``, ``inplace``...) is a bool: a None or a string
    would silently mean False or True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False (got {value!r})")
    return bool(value)


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (got {type(value).__name__})")
    return float(value)
