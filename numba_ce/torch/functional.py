"""``cross_entropy`` for torch tensors: the checks, then the custom ops of numba_ce.torch.ops.

    forward   numba_ce::cross_entropy on the detached logits: the loss and d(loss)/d(input) for
              an upstream gradient of 1 from one fused kernel call (the gradient is written
              once, while the logits are still on chip; into the logits themselves by
              numba_ce::cross_entropy_ with inplace_backward); numba_ce::attach_gradient gives
              the loss its autograd node, which saves the gradient.
    backward  scales the saved gradient in place by the upstream gradient (per row for
              reduction="none") with numba_ce.scale_kernel; when that is 1 the kernel's blocks
              return at once. No host synchronisation.
    Eagerly the ops' implementations run without the ops (ops.entry_points): the same kernels,
    without the dispatcher's host time.

No math lives here: the ops run the core on views of the tensors (numba_ce.torch.tensors). The
ops take (M, C) logits: torch's other forms of a call (K-dimensional or unbatched input, float64
input, uint8 targets) become that by torch ops before them, and the outputs take torch's shapes by
torch ops after them (numba_ce.torch.forms), which torch.compile traces with the ops.
Host time is what small batches pay for (a training step waits for it when the GPU is faster):
what is not the ops' is a few checks.

torch.autocast: nothing here is an autocast-eligible op (allocations and kernel launches only), so
low-precision logits are read as they are and the math is fp32 either way. torch.compile: the ops
are nodes of the graph (fullgraph=True works, dynamic batch sizes too); README, "torch.compile and
CUDA graphs".
"""
from typing import Literal, overload

import torch

from ..options import Options, check_flag
from ..results import CrossEntropyOutput
from . import forms, ops, tensors


@overload
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = ...,
                  size_average: bool | None = ..., ignore_index: int = ...,
                  reduce: bool | None = ..., reduction: str = ...,
                  label_smoothing: float = ..., *,
                  z_loss: float = ..., softcap: float | None = ..., inplace_backward: bool = ...,
                  return_z_loss: Literal[False] = ...,
                  return_token_accuracy: Literal[False] = ...,
                  return_predicted_tokens: Literal[False] = ...,
                  validate: bool = ...) -> torch.Tensor: ...


@overload
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = ...,
                  size_average: bool | None = ..., ignore_index: int = ...,
                  reduce: bool | None = ..., reduction: str = ...,
                  label_smoothing: float = ..., *,
                  z_loss: float = ..., softcap: float | None = ..., inplace_backward: bool = ...,
                  return_z_loss: Literal[True], return_token_accuracy: Literal[False] = ...,
                  return_predicted_tokens: Literal[False] = ..., validate: bool = ...
                  ) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = ...,
                  size_average: bool | None = ..., ignore_index: int = ...,
                  reduce: bool | None = ..., reduction: str = ...,
                  label_smoothing: float = ..., *,
                  z_loss: float = ..., softcap: float | None = ..., inplace_backward: bool = ...,
                  return_z_loss: bool = ..., return_token_accuracy: bool = ...,
                  return_predicted_tokens: bool = ..., validate: bool = ...
                  ) -> CrossEntropyOutput: ...


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100,
                  reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: float | None = None, inplace_backward: bool = False,
                  return_z_loss: bool = False, return_token_accuracy: bool = False,
                  return_predicted_tokens: bool = False, validate: bool = True
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """Cross-entropy of ``input`` against class indices or class probabilities ``target``, as
    :func:`torch.nn.functional.cross_entropy` (the same positional parameters, input forms and
    legacy arguments), plus z-loss and softcap; our own options are keyword-only.

    Parameters
    ----------
    input : float32, float16, bfloat16 or float64 tensor on the GPU (CPU in the simulator), as
        torch's: (N, C); (N, C, d1, ..., dk), the classes in dimension 1 (moved last for the
        kernels: a view when each element's classes are contiguous, as in channels-last memory,
        else a copy); or (C,), one unbatched row. Rows whose class stride is not 1 (or that
        overlap) are copied first. float64 is computed in float32 (numerics below).
    target : int64 or uint8 tensor (int32 too) of input's shape without the class dimension:
        (N,), (N, d1, ..., dk), or () for a (C,) input. Elements equal to ``ignore_index``
        contribute nothing. Or class probabilities: a tensor of input's shape and dtype (torch
        would promote other dtypes; refused here), each element's loss -sum_c w_c q'_c log p_c
        with q' = (1 - label_smoothing) q + label_smoothing / C, whatever q sums to, in the same
        fused kernel (logits and targets read once for the loss, twice for its gradient). Every
        element counts ("mean" divides by their number, as torch's); an ignore_index >= 0 and
        return_token_accuracy are refused with them, and so is a target that requires grad
        while grad mode is on (no gradient for q is computed: detach it).
    weight : float tensor (C,), optional. Class weights, as in PyTorch (read as float32).
    size_average, reduce : torch's deprecated arguments: when either is not None, they set the
        reduction by torch's rule (torch.nn._reduction.legacy_get_string, which warns as torch
        does).
    reduction : 'mean' (weighted by w_y, as PyTorch), 'sum' or 'none'.
    label_smoothing : float in [0, 1]. z_loss : float >= 0, adds z_loss * lse**2 per row.
    softcap : float > 0, optional. Replaces x by softcap * tanh(x / softcap) first.
    inplace_backward : write the gradient into ``input``'s memory (no extra N x C buffer).
        ``input`` then holds the gradient, not the logits: its version counter is bumped, so
        autograd raises if anything saved it for backward. An input that had to be copied (rows
        not readable in place, K-dimensional input whose classes are not contiguous, float64
        input) is left alone: the copy takes the gradient, and autograd brings it back to
        ``input``. Default False: ``input`` is never modified.
    return_z_loss : also return the z-loss part of the loss (reduced the same way, no gradient).
    return_token_accuracy : also return the share of counted rows whose argmax is their target
        (reduced as the loss: a mean over counted rows, a sum, or 0/1 per element; no gradient).
    return_predicted_tokens : also return each element's argmax (int64, first maximal index as
        torch.argmax; -1 for ignored elements), in the target's shape.
    validate : raise ValueError for a target outside [0, C) (one 8-byte device read, a host
        synchronisation; the index it names is one of ``target.reshape(-1)``); with False
        nothing synchronises (CUDA-graph capture) and such rows give NaN.

    Returns
    -------
    loss: 0-d for 'mean' and 'sum', the target's shape for 'none'; float32 (float64 for float64
    input); or (loss, z_loss) with ``return_z_loss``; with ``return_token_accuracy`` or
    ``return_predicted_tokens`` a CrossEntropyOutput(loss, z_loss, token_accuracy,
    predicted_tokens), None where not asked. The gradient reaching ``input`` has its shape and
    dtype (and, for a leaf's ``.grad``, its layout, channels-last included), computed in fp32
    and rounded once by the forward (and once more when the upstream gradient is not 1).

    Notes
    -----
    The forward stores the gradient for an upstream gradient of 1 in the logits' dtype. With
    float16 logits and reduction="mean" its entries are p_j / N, and those below fp16's smallest
    subnormal (6e-8) are zero before a loss scale (GradScaler) multiplies them; bfloat16 has
    float32's range and does not lose them.

    float64 input is rounded to float32 and computed as float32 logits are: the float64 loss and
    gradient carry float32's errors, not float64's (each logit's rounding is relative to its own
    magnitude: logits near 1e5 keep no difference below ~0.01, so torch.autograd.gradcheck
    cannot pass). Half-precision input gives a float32 loss (torch's is in the input's dtype).
    """
    reduction = forms.reduction_of(size_average, reduce, reduction)
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                      return_token_accuracy, return_predicted_tokens)
    inplace_backward = check_flag("inplace_backward", inplace_backward)
    return_z_loss = check_flag("return_z_loss", return_z_loss)
    validate = check_flag("validate", validate)
    tensors.check_devices(input, target=target, weight=weight)
    tensors.check_differentiation(input, target=target, weight=weight)
    rows = forms.as_rows(input, target)
    logits, target = tensors.readable_rows(rows.logits), tensors.readable_rows(rows.target)
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "numba_ce.torch computes no gradient for class-probability targets, and target "
            "requires grad (torch's cross_entropy would differentiate -sum w q log p in q too); "
            "pass target.detach(), or compute this loss with torch's own cross_entropy")
    run = ops.entry_points()
    if not (torch.is_grad_enabled() and logits.requires_grad):
        outputs = run.cross_entropy(logits, target, weight, None, options, with_grad=False,
                                    validate=validate)[:4]
    else:
        if inplace_backward:
            check_overwritable(logits)
            gradient = logits.detach()  # the op writes it outside autograd: attach_gradient
            outputs = run.cross_entropy_(  # links the loss to the logits
                gradient, target, weight, options, validate=validate)
        else:
            *outputs, gradient = run.cross_entropy(logits.detach(), target, weight, None,
                                                   options, with_grad=True, validate=validate)
        outputs = (run.attach_gradient(outputs[0], logits, gradient), *outputs[1:])
    loss, z_part, accuracy, predicted = forms.in_torch_shapes(rows, options, outputs)
    if options.argmax:
        return CrossEntropyOutput(loss, z_part if return_z_loss else None,
                                  accuracy if options.return_token_accuracy else None,
                                  predicted if options.return_predicted_tokens else None)
    return (loss, z_part) if return_z_loss else loss


def check_overwritable(logits):
    """inplace_backward=True overwrites the logits with their gradient: refused, as torch refuses
    an in-place op, for a leaf that requires grad (a parameter used as logits would become its
    own gradient) or a view of one."""
    base = logits._base
    if logits.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        what = "a leaf Variable" if logits.is_leaf else "a view of a leaf Variable"
        raise RuntimeError(
            f"inplace_backward=True writes the gradient into input, which is {what} that "
            "requires grad: torch refuses to modify one in place (a leaf Variable that requires "
            "grad is being used in an in-place operation); pass inplace_backward=False, or "
            "logits computed from it")
