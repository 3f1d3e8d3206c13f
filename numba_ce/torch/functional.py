"""``cross_entropy`` for torch tensors: an autograd function around one fused kernel call.

    forward   one call of numba_ce.execution.run with a gradient buffer: loss and d(loss)/d(input)
              for an upstream gradient of 1 from the same kernel (the gradient is written once,
              while the logits are still on chip); the gradient is saved.
    backward  scales the saved gradient in place by the upstream gradient (per row for
              reduction="none") with numba_ce.scale_kernel; when that is 1 the kernel's blocks
              return at once. No host synchronisation.

No math lives here: tensors become array views (numba_ce.torch.tensors) and the core does the rest.
Host time is what small batches pay for (a training step waits for it when the GPU is faster):
the views are TensorArrays, not CuPy arrays, and the launches go to torch's stream directly.

torch.autocast: nothing here is an autocast-eligible op (allocations and kernel launches only), so
no custom_fwd or autocast-disabled block is needed: low-precision logits are read as they are and
the math is fp32 either way. torch.compile: ``cross_entropy`` runs eagerly, one graph break
(tensors.graph_break); a torch.library custom op would avoid the break, but its functionalisation
copies the buffers that inplace_backward and the in-place backward exist to avoid.
"""
from typing import Literal, overload

import torch
from torch.autograd.function import once_differentiable

from .. import buffers, execution, results, validation
from ..execution import RowCall
from ..options import Options
from ..planning import RowInputs
from ..results import CrossEntropyOutput
from . import tensors


@overload
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = ...,
                  ignore_index: int = ..., reduction: str = ..., label_smoothing: float = ..., *,
                  z_loss: float = ..., softcap: float | None = ..., inplace_backward: bool = ...,
                  return_z_loss: Literal[False] = ...,
                  return_token_accuracy: Literal[False] = ...,
                  return_predicted_tokens: Literal[False] = ...,
                  validate: bool = ...) -> torch.Tensor: ...


@overload
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = ...,
                  ignore_index: int = ..., reduction: str = ..., label_smoothing: float = ..., *,
                  z_loss: float = ..., softcap: float | None = ..., inplace_backward: bool = ...,
                  return_z_loss: Literal[True], return_token_accuracy: Literal[False] = ...,
                  return_predicted_tokens: Literal[False] = ..., validate: bool = ...
                  ) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = ...,
                  ignore_index: int = ..., reduction: str = ..., label_smoothing: float = ..., *,
                  z_loss: float = ..., softcap: float | None = ..., inplace_backward: bool = ...,
                  return_z_loss: bool = ..., return_token_accuracy: bool = ...,
                  return_predicted_tokens: bool = ..., validate: bool = ...
                  ) -> CrossEntropyOutput: ...


@tensors.graph_break
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, softcap: float | None = None,
                  inplace_backward: bool = False, return_z_loss: bool = False,
                  return_token_accuracy: bool = False, return_predicted_tokens: bool = False,
                  validate: bool = True
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """Cross-entropy of ``input`` (N, V) against class indices ``target`` (N,), as
    :func:`torch.nn.functional.cross_entropy`, plus z-loss and softcap.

    Parameters
    ----------
    input : float32, float16 or bfloat16 tensor (N, V) on the GPU (CPU in the simulator). Rows
        whose class stride is not 1 (or that overlap) are copied first.
    target : int64 or int32 tensor (N,). Rows equal to ``ignore_index`` contribute nothing.
    weight : float tensor (V,), optional. Class weights, as in PyTorch (read as float32).
    reduction : 'mean' (weighted by w_y, as PyTorch), 'sum' or 'none'.
    label_smoothing : float in [0, 1]. z_loss : float >= 0, adds z_loss * lse**2 per row.
    softcap : float > 0, optional. Replaces x by softcap * tanh(x / softcap) first.
    inplace_backward : write the gradient into ``input``'s memory (no extra N x V buffer).
        ``input`` then holds the gradient, not the logits: its version counter is bumped, so
        autograd raises if anything saved it for backward. (An input that had to be copied is
        left alone: the copy takes the gradient.) Default False: ``input`` is never modified.
    return_z_loss : also return the z-loss part of the loss (reduced the same way, no gradient).
    return_token_accuracy : also return the share of counted rows whose argmax is their target
        (reduced as the loss: a mean over counted rows, a sum, or 0/1 per row; no gradient).
    return_predicted_tokens : also return each row's argmax (int64, first maximal index as
        torch.argmax; -1 for ignored rows).
    validate : raise ValueError for a target outside [0, V) (one 8-byte device read, a host
        synchronisation); with False nothing synchronises (CUDA-graph capture) and such rows
        give NaN.

    Returns
    -------
    float32 loss: 0-d for 'mean' and 'sum', (N,) for 'none'; or (loss, z_loss) with
    ``return_z_loss``; with ``return_token_accuracy`` or ``return_predicted_tokens`` a
    CrossEntropyOutput(loss, z_loss, token_accuracy, predicted_tokens), None where not asked.
    The gradient reaching ``input`` has its dtype, computed in fp32 and rounded once by the
    forward (and once more when the upstream gradient is not 1).

    Notes
    -----
    The forward stores the gradient for an upstream gradient of 1 in the logits' dtype. With
    float16 logits and reduction="mean" its entries are p_j / N, and those below fp16's smallest
    subnormal (6e-8) are zero before a loss scale (GradScaler) multiplies them; bfloat16 has
    float32's range and does not lose them.
    """
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                      return_token_accuracy, return_predicted_tokens)
    inplace_backward = validation.check_flag("inplace_backward", inplace_backward)
    return_z_loss = validation.check_flag("return_z_loss", return_z_loss)
    validate = validation.check_flag("validate", validate)
    tensors.check_devices(input, target=target, weight=weight)
    with_grad = torch.is_grad_enabled() and input.requires_grad
    loss, z_part, accuracy, predicted = _FusedCrossEntropy.apply(
        input, target, weight, options, with_grad, inplace_backward, validate)
    if options.argmax:
        return CrossEntropyOutput(loss, z_part if return_z_loss else None, accuracy, predicted)
    return (loss, z_part) if return_z_loss else loss


class _FusedCrossEntropy(torch.autograd.Function):
    """(loss, z_loss, token accuracy, predicted tokens) of the logits (the last two None unless
    asked); the gradient comes from the forward's kernel call."""

    @staticmethod
    def forward(ctx, input, target, weight, options, with_grad, inplace, validate):
        returned, grad, fmt = _forward(input, target, weight, options, with_grad, inplace,
                                       validate)
        ctx.mark_non_differentiable(*(t for t in returned[1:] if t is not None))
        ctx.set_materialize_grads(False)  # the others' gradients: None, not zeros made and filled
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.fmt = fmt
        ctx.per_row = not options.reduced
        ctx.scaled = False
        return returned

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *not_differentiable):
        """Runs on autograd's device thread, whose hand-offs of the interpreter lock with the
        thread in loss.backward() make each line dearer than in the forward (bench/NOTES.md):
        kept short. It scales the gradient that ctx.saved_tensors gives back, which
        saved-tensor hooks (non-reentrant checkpointing, offloading) may have copied."""
        if grad_loss is None or not ctx.needs_input_grad[0]:  # e.g. only the class weights
            return (None,) * 7                                  # require grad
        if ctx.scaled:
            raise RuntimeError(
                "numba_ce.torch.cross_entropy: backward ran twice on one forward (retain_graph="
                "True?); the first scaled the saved gradient in place, so compute the loss again")
        ctx.scaled = True
        (grad,) = ctx.saved_tensors
        upstream = grad_loss.float().reshape(-1)  # (1,), or (N,) for reduction="none"
        view = tensors.as_kernel_array
        with tensors.on_torch_stream(grad.device):
            execution.scale_rows(view(grad), ctx.fmt, view(upstream), ctx.per_row)
        # The scaled gradient may live in the caller's logits (inplace_backward): say so.
        torch.autograd.graph.increment_version(grad)
        return grad, None, None, None, None, None, None


def _forward(input, target, weight, options, with_grad, inplace, validate):
    """((loss, z part, token accuracy, predicted tokens), gradient for an upstream gradient of 1
    or None, logits format)."""
    view = tensors.as_kernel_array
    logits, logits_array, copied = _readable_logits(input)
    fmt = validation.check_logits(logits_array)
    n_rows, n_classes = logits_array.shape
    target_array = view(target)
    validation.check_target(target_array, n_rows)
    weight_array = tensors.class_weights(weight, view)
    if weight_array is not None:
        validation.check_weight(weight_array, n_classes)

    # The outputs as tensors to return and as the kernels' views of the same memory.
    memory = torch.empty(buffers.size(n_rows, options), dtype=torch.float32, device=input.device)
    predicted = (torch.empty(n_rows, dtype=torch.int64, device=input.device)
                 if options.argmax else None)
    returned = buffers.row_outputs(memory, n_rows, options, predicted)
    grad = grad_array = None
    if with_grad and inplace:
        validation.check_not_overlapping(logits_array, "inplace_backward=True",
                                         target=target_array,
                                         weight=None if weight is None else view(weight))
    if with_grad:
        grad = logits if inplace else torch.empty((n_rows, n_classes), dtype=logits.dtype,
                                                  device=input.device)
        grad_array = logits_array if inplace else view(grad)
    inputs = RowInputs(logits_array, fmt, target_array, weight_array,
                       tensors.ones(input.device, view))
    outputs = buffers.row_outputs(view(memory), n_rows, options,
                                  None if predicted is None else view(predicted))
    with tensors.on_torch_stream(input.device):
        execution.run(RowCall(inputs, options, grad_array, outputs, validate),
                      tensors.TorchArrays(input.device, view))
    if grad is logits and not copied:
        torch.autograd.graph.increment_version(input)  # the kernel wrote the caller's tensor
    return results.returned(returned, options), grad, fmt


def _readable_logits(input):
    """(logits tensor, its array view, whether it is a copy): ``input`` itself, or a contiguous
    copy when the kernels cannot read its rows in place (a class stride other than 1, rows that
    overlap)."""
    logits = input.detach()
    array = tensors.as_kernel_array(logits)
    if array.ndim == 2 and validation.row_layout_problem(array.shape, array.strides,
                                                         array.itemsize):
        logits = logits.contiguous()
        return logits, tensors.as_kernel_array(logits), True
    return logits, array, False
