"""torch's forms of a cross-entropy call (the legacy size_average and reduce; the input forms)
as the 2-D call the custom ops take, and the outputs back in torch's shapes, with torch ops only,
which autograd and torch.compile see. The ops take (M, C) logits whose rows hold their classes
contiguously, and an (M,) target:

    input (N, C), target (N,)                      as they are
    input (N, C, d1, ..., dk), target (N, d1..dk)  the class dimension moved last: (N d1..dk, C),
                                                   a view when the classes are already contiguous
                                                   (channels-last), else a copy
    input (C,), target () (unbatched)              one row (1, C), a view
    float64 input                                  a float32 copy (the math is float32 anyway);
                                                   the loss comes back in float64, and autograd
                                                   gives the input its float64 gradient
    uint8 target                                   an int64 copy (int64 and int32: as they are)

or, with class probabilities (a floating-point target of input's shape and dtype, as torch
tells them apart: by the shape), the same moves and casts of the target as of the input, into
(M, C): its class dimension last, float64 as float32.

A per-element output (the loss and its z part for reduction="none", the token accuracy, the
predicted tokens) comes back in the target's shape: (N, d1, ..., dk), or 0-d unbatched.
"""
import warnings
from typing import NamedTuple

import torch

from ..options import Options

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.uint8, torch.int32)
# torch.nn._reduction's words, so that filters written for torch's warning catch ours
LEGACY_WARNING = ("size_average and reduce args will be deprecated, please use reduction='{}' "
                  "instead.")


def reduction_of(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """The reduction of a call or module given torch's deprecated ``size_average`` and
    ``reduce``: ``reduction`` when both are None, else the one torch's legacy rule makes of them
    (torch.nn._reduction.legacy_get_string's: None counts as True; "mean" where both hold, "sum"
    where only reduce does, else "none"), with torch's deprecation warning in eager calls.
    Written out here, as TorchDynamo takes a torch function that returns a string for an op it
    cannot trace."""
    if size_average is None and reduce is None:
        return reduction
    reduce = reduce is None or bool(reduce)
    legacy = "none" if not reduce else "mean" if size_average is None or size_average else "sum"
    if not torch.compiler.is_compiling():  # (TorchDynamo cannot trace warnings.warn)
        warnings.warn(LEGACY_WARNING.format(legacy), UserWarning, stacklevel=3)
    return legacy


class Rows(NamedTuple):
    """A call in the form the ops take."""
    logits: torch.Tensor  # (M, C), of input's dtype (float32 for float64 input)
    target: torch.Tensor  # (M,), int64 or int32; class probabilities (M, C) of logits' dtype
    element_shape: torch.Size  # torch's shape of a per-element output: target's
    loss_dtype: torch.dtype  # of the loss torch returns: float32, or float64 for float64 input


def as_rows(input: torch.Tensor, target: torch.Tensor) -> Rows:
    """The call of ``input`` against class indices or class probabilities ``target`` in the
    ops' form (see the module's docstring); raises TypeError for a dtype torch's cross_entropy
    does not take (int32 targets excepted; class probabilities of another dtype than input's,
    which torch would promote) and ValueError for shapes that do not match as torch matches
    them."""
    _check_dtypes(input, target)
    probabilities = target.is_floating_point()
    element_shape = _probability_shape(input, target) if probabilities else _element_shape(
        input, target)
    shape = (element_shape.numel(), input.shape[0] if input.dim() == 1 else input.shape[1])
    logits = _class_rows(input, shape)
    if probabilities:
        target = _class_rows(target, shape)
    elif input.dim() != 2:
        target = target.reshape(-1)
    if target.dtype == torch.uint8:
        target = target.long()
    loss_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    return Rows(logits, target, element_shape, loss_dtype)


def _class_rows(tensor, shape):
    """``tensor`` (input's shape) as ``shape`` (M, C), rows of classes: the class dimension moved
    last (a view, copied by the reshape where the classes are not contiguous), float64 as
    float32."""
    rows = tensor.movedim(1, -1) if tensor.dim() > 2 else tensor
    if tensor.dtype == torch.float64:
        rows = rows.to(torch.float32, memory_format=torch.contiguous_format)
    return rows if tensor.dim() == 2 else rows.reshape(shape)


def in_torch_shapes(rows: Rows, options: Options, outputs: tuple) -> tuple:
    """The ops' (loss, z part, token accuracy, predicted tokens) for ``rows``, as torch shapes
    them: the per-element ones asked for by ``options`` (an Options: the loss and its z part for
    reduction="none", the token accuracy then too, the predicted tokens always) in the target's
    shape; the loss and its z part in ``rows.loss_dtype``."""
    loss, z_part, accuracy, predicted = outputs
    shape = rows.element_shape
    if not options.reduced:
        loss, z_part = loss.reshape(shape), z_part.reshape(shape)
        if options.return_token_accuracy:
            accuracy = accuracy.reshape(shape)
    if options.return_predicted_tokens:
        predicted = predicted.reshape(shape)
    if rows.loss_dtype != torch.float32:
        loss, z_part = loss.to(rows.loss_dtype), z_part.to(rows.loss_dtype)
    return loss, z_part, accuracy, predicted


def _check_dtypes(input, target):
    if input.dtype not in LOGITS_DTYPES:
        raise TypeError(f"input dtype must be float32, float16, bfloat16 or float64 (got "
                        f"{_name(input.dtype)})")
    if target.is_floating_point():
        if target.dtype != input.dtype:
            raise TypeError(f"target (class probabilities) must have input's dtype "
                            f"{_name(input.dtype)} (got {_name(target.dtype)}); pass "
                            "target.to(input.dtype)")
    elif target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must hold class indices of dtype int64 or uint8 (as torch's), "
                        f"or int32, or class probabilities of input's dtype (got "
                        f"{_name(target.dtype)})")


def _probability_shape(input, target):
    """The shape of a per-element output of class probabilities ``target``, which torch
    requires to have input's shape: input's without the class dimension."""
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: (C,), (N, C) or (N, C, d1, ..., "
                         "dk) (got a 0-d tensor)")
    if target.shape != input.shape:
        indices = (input.shape[:1] + input.shape[2:]) if input.dim() > 1 else torch.Size(())
        raise ValueError(f"target of floating-point dtype holds class probabilities and must "
                         f"have input's shape {_shape(input)} (got shape {_shape(target)}); "
                         f"class indices (int64, uint8 or int32) have shape {_shape(indices)}")
    return input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size(())


def _element_shape(input, target):
    """The target's shape, which torch's cross_entropy requires to be input's without the class
    dimension (dimension 1; 0 for an unbatched (C,) input, whose target may be () or (1,))."""
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: (C,), (N, C) or (N, C, d1, ..., "
                         "dk) (got a 0-d tensor)")
    if input.dim() == 1:
        if target.dim() > 1 or target.numel() != 1:
            raise ValueError(f"target of an unbatched input {_shape(input)} must be one class "
                             f"index, shape () (got shape {_shape(target)})")
        return torch.Size(())
    expected = input.shape[:1] + input.shape[2:]
    if target.shape != expected:
        hint = ("; a target of input's shape holds class probabilities, of input's "
                "floating-point dtype" if target.shape == input.shape else "")
        raise ValueError(f"target must have shape {_shape(expected)} to match input "
                         f"{_shape(input)}, whose class dimension is dimension 1 (got shape "
                         f"{_shape(target)}){hint}")
    return target.shape


def _shape(tensor_or_shape):
    shape = tuple(getattr(tensor_or_shape, "shape", tensor_or_shape))
    return f"({shape[0]},)" if len(shape) == 1 else str(shape)


def _name(dtype):
    return str(dtype).removeprefix("torch.")
