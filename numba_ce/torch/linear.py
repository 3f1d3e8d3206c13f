"""``linear_cross_entropy`` for torch tensors: an autograd function around numba_ce.linear.

    forward   "mean"/"sum": one pass over the chunks computes the loss and every gradient asked
              for (input, linear weight, bias) for an upstream gradient of 1; they are saved.
              "none": the loss only (the per-row upstream gradient is not known yet).
    backward  "mean"/"sum": scales the saved gradients by the upstream gradient on the device
              (numba_ce.scale_kernel; nothing to do when it is 1, and no host synchronisation).
              "none": a second pass over the chunks with the per-row upstream gradient.

No math lives here: tensors become array views (numba_ce.torch.tensors) and the core does the rest.
Under torch.autocast the input, weight and bias are cast to the autocast dtype first, as
torch.nn.functional.linear would be.
"""
import torch
from torch.autograd.function import once_differentiable

from .. import execution, linear, validation
from ..options import Options
from ..results import CrossEntropyOutput
from . import tensors


@tensors.graph_break
def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                         *, linear_bias: torch.Tensor | None = None,
                         weight: torch.Tensor | None = None, reduction: str = "mean",
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: float | None = None,
                         chunk_size: int | None = None, return_token_accuracy: bool = False,
                         return_predicted_tokens: bool = False,
                         validate: bool = True) -> torch.Tensor | CrossEntropyOutput:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias`` against ``target``,
    as :func:`torch.nn.functional.linear_cross_entropy` (same leading signature), plus z-loss and
    softcap, computed chunk by chunk of rows so that no N x V logits are ever stored.

    Parameters
    ----------
    input : float32, float16 or bfloat16 tensor (N, H) on the GPU (CPU in the simulator).
    linear_weight : (V, H) tensor of input's dtype. linear_bias : (V,) tensor or None.
    target : int64 or int32 tensor (N,).
    weight, reduction, ignore_index, label_smoothing, z_loss, softcap, validate : as
        :func:`numba_ce.torch.cross_entropy`.
    chunk_size : rows per chunk (default: 4096, fewer when C x V logits would exceed 1 GiB).
    return_token_accuracy, return_predicted_tokens : as in :func:`numba_ce.torch.cross_entropy`.

    Returns
    -------
    float32 loss: 0-d for 'mean' and 'sum', (N,) for 'none' (a CrossEntropyOutput with
    return_token_accuracy or return_predicted_tokens, as cross_entropy's). Gradients reach input,
    linear_weight and linear_bias in their dtypes; the weight and bias gradients are summed over
    the rows in float32 and rounded once (a backward whose upstream gradient is not 1 rounds them
    once more as it scales them).
    """
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                      return_token_accuracy, return_predicted_tokens)
    validation.check_chunk_size(chunk_size)
    validate = validation.check_flag("validate", validate)
    tensors.check_devices(input, linear_weight=linear_weight, target=target,
                          linear_bias=linear_bias, weight=weight)
    if torch.is_autocast_enabled(input.device.type):
        dtype = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(dtype), linear_weight.to(dtype)
        linear_bias = None if linear_bias is None else linear_bias.to(dtype)
    needed = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad
                   for t in (input, linear_weight, linear_bias))
    loss, accuracy, predicted = _FusedLinearCrossEntropy.apply(
        input, linear_weight, linear_bias, target, weight, options, chunk_size, validate, needed)
    return CrossEntropyOutput(loss, None, accuracy, predicted) if options.argmax else loss


class _FusedLinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, options, chunk_size,
                validate, needed):
        ctx.per_row = not options.reduced
        ctx.arguments = (options, chunk_size, validate, needed)
        eager = any(needed) and not ctx.per_row
        returned, grads = _run(input, linear_weight, linear_bias, target, weight, options,
                               chunk_size, validate, needed if eager else (False,) * 3, None)
        ctx.mark_non_differentiable(*(t for t in returned[1:] if t is not None))
        ctx.set_materialize_grads(False)
        if eager:
            ctx.save_for_backward(*grads)
        elif any(needed):
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight)
        ctx.scaled = False
        return returned

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *not_differentiable):
        options, chunk_size, validate, needed = ctx.arguments
        upstream = grad_loss.detach().float().reshape(-1)  # (1,), or (N,) for reduction="none"
        if ctx.per_row:
            _, grads = _run(*ctx.saved_tensors, options, chunk_size, False, needed, upstream)
        else:
            if ctx.scaled:
                raise RuntimeError(
                    "numba_ce.torch.linear_cross_entropy: backward ran twice on one forward "
                    "(retain_graph=True?); the first scaled the saved gradients in place, so "
                    "compute the loss again")
            ctx.scaled = True
            grads = ctx.saved_tensors
            view = tensors.as_kernel_array
            with tensors.on_torch_stream(upstream.device):
                for grad in grads:
                    if grad is not None:
                        array = view(grad)
                        execution.scale_rows(array.reshape(-1, array.shape[-1]),
                                             array.dtype.name, view(upstream), False)
        return (*grads, None, None, None, None, None, None)


def _run(input, linear_weight, linear_bias, target, weight, options, chunk_size, validate,
         needed, upstream):
    """((loss, token accuracy, predicted tokens), (grad_input, grad_linear_weight,
    grad_linear_bias)) as tensors, each None unless asked or ``needed``, for an upstream
    gradient ``upstream`` (None: 1)."""
    view = tensors.as_array
    arrays = [None if t is None else view(t) for t in (input, linear_weight, target, linear_bias)]
    class_weight = tensors.class_weights(weight)
    fmt = linear.check_arguments(*arrays, class_weight, chunk_size)
    input_array, weight_array, target_array, bias_array = arrays
    device = input.device
    xp = tensors.TorchArrays(device)
    inputs = linear.LinearInputs(input_array, weight_array, bias_array, target_array,
                                 class_weight,
                                 tensors.ones(device) if upstream is None else view(upstream), fmt)
    with tensors.on_torch_stream_with_cupy(device):
        result = linear.compute(xp, inputs, options, needed, chunk_size=chunk_size,
                                validate=validate)

    def tensor(array):
        return None if array is None else xp.tensor(array)

    returned = tuple(tensor(a) for a in (result.loss, result.token_accuracy,
                                         result.predicted_tokens))
    return returned, tuple(tensor(a) for a in result[1:4])
