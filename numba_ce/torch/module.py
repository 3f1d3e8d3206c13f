"""The module forms: ``CrossEntropyLoss`` of :func:`numba_ce.torch.cross_entropy`, and
``LinearCrossEntropyLoss`` of :func:`numba_ce.torch.linear_cross_entropy`."""
from dataclasses import astuple

import torch

from .. import validation
from ..options import Options
from .functional import cross_entropy
from .linear import linear_cross_entropy


class CrossEntropyLoss(torch.nn.Module):
    """As :class:`torch.nn.CrossEntropyLoss` (the class weights are a buffer, so they follow
    ``.to(device)`` and the state dict), plus z-loss, softcap, in-place backward and the target
    check; ``crit(input, target)`` calls :func:`numba_ce.torch.cross_entropy` with these options.
    """

    weight: torch.Tensor | None  # a buffer

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: float | None = None, inplace_backward: bool = False,
                 validate: bool = True) -> None:
        super().__init__()
        # Bad options fail here, where they were written, not at the first call.
        options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
        (self.ignore_index, self.reduction, self.label_smoothing, self.z_loss,
         self.softcap) = astuple(options)
        self.inplace_backward = validation.check_flag("inplace_backward", inplace_backward)
        self.validate = validation.check_flag("validate", validate)
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             inplace_backward=self.inplace_backward, validate=self.validate)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, inplace_backward={self.inplace_backward}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """As :class:`torch.nn.LinearCrossEntropyLoss` (torch 2.13): owns the head ``self.linear``
    (an nn.Linear from ``in_features`` to ``num_classes``) and returns the cross-entropy of its
    logits, ``crit(input, target)``, through :func:`numba_ce.torch.linear_cross_entropy`; plus
    z-loss, softcap, chunk_size and the target check."""

    weight: torch.Tensor | None  # a buffer

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 reduction: str = "mean", weight: torch.Tensor | None = None,
                 ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: float | None = None, chunk_size: int | None = None,
                 validate: bool = True) -> None:
        super().__init__()
        options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
        (self.ignore_index, self.reduction, self.label_smoothing, self.z_loss,
         self.softcap) = astuple(options)
        validation.check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.validate = validation.check_flag("validate", validate)
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            chunk_size=self.chunk_size, validate=self.validate)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, chunk_size={self.chunk_size}")
