"""``linear_cross_entropy`` for torch tensors: the checks, then one custom op,
numba_ce::linear_cross_entropy (numba_ce.torch.linear_ops: what its forward and backward compute).

No math lives here: the op runs numba_ce.linear on views of the tensors. Under torch.autocast
the input, weight and bias are cast to the autocast dtype first, as torch.nn.functional.linear
would be.
"""
import torch

from .. import linear, validation
from ..options import Options, check_flag
from ..results import CrossEntropyOutput
from . import linear_forms, linear_ops, ops, tensors


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                         *, linear_bias: torch.Tensor | None = None,
                         weight: torch.Tensor | None = None, reduction: str = "mean",
                         ignore_index: int | None = None, label_smoothing: float = 0.0,
                         options: linear_forms.TorchOptions | None = None,
                         z_loss: float = 0.0, softcap: float | None = None,
                         memory: str = "low", chunk_size: int | None = None,
                         return_z_loss: bool = False, return_token_accuracy: bool = False,
                         return_predicted_tokens: bool = False, validate: bool = True
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias`` against ``target``,
    as :func:`torch.nn.functional.linear_cross_entropy` (same leading signature), plus z-loss and
    softcap, computed chunk by chunk so that no N x V logits are ever stored.

    Parameters
    ----------
    input : float32, float16 or bfloat16 tensor (N, H) on the GPU (CPU in the simulator).
    linear_weight : (V, H) tensor of input's dtype. linear_bias : (V,) tensor or None.
    target : int64 or int32 tensor (N,).
    weight, reduction, label_smoothing, z_loss, softcap, validate : as
        :func:`numba_ce.torch.cross_entropy`. ignore_index : as torch's, None meaning -100.
    options : torch's LinearCrossEntropyOptions, or None: its chunking sets chunk_size, its other
        fields are checked (numba_ce.torch.linear_forms says how each maps).
    memory, chunk_size : as :func:`numba_ce.linear_cross_entropy`: "low" (default) computes the
        gradients in a second pass over slices of the classes, with no V x H float32 sum;
        "fast" in one pass over chunks of rows, with a float32 V x H weight-gradient sum.
    return_z_loss, return_token_accuracy, return_predicted_tokens : as in
        :func:`numba_ce.torch.cross_entropy`.

    Returns
    -------
    float32 loss: 0-d for 'mean' and 'sum', (N,) for 'none'; or (loss, z_loss) with
    ``return_z_loss``; with return_token_accuracy or return_predicted_tokens a
    CrossEntropyOutput, as cross_entropy's. Gradients reach input,
    linear_weight and linear_bias in their dtypes; the weight and bias gradients are summed over
    the rows in float32 and rounded once (a backward whose upstream gradient is not 1 rounds them
    once more as it scales them).
    """
    chunk_size = linear_forms.chunk_size_of(options, chunk_size, input.shape[0],
                                            linear_weight.shape[-1], linear_weight.shape[0])
    options = Options(linear_forms.ignore_index_of(ignore_index), reduction, label_smoothing,
                      z_loss, softcap, return_token_accuracy, return_predicted_tokens)
    validation.check_chunk_size(chunk_size)
    linear.check_memory(memory)
    return_z_loss = check_flag("return_z_loss", return_z_loss)
    validate = check_flag("validate", validate)
    others = dict(linear_weight=linear_weight, target=target, linear_bias=linear_bias,
                  weight=weight)
    tensors.check_devices(input, **others)
    tensors.check_differentiation(input, **others)
    if torch.is_autocast_enabled(input.device.type):
        dtype = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(dtype), linear_weight.to(dtype)
        linear_bias = None if linear_bias is None else linear_bias.to(dtype)
    linear_inputs = (input, linear_weight, linear_bias)
    asked = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in linear_inputs]
    arguments = dict(ops.option_arguments(options), memory=memory, chunk_size=chunk_size,
                     validate=validate, input_grad=asked[0], linear_weight_grad=asked[1],
                     linear_bias_grad=asked[2])
    if not (options.reduced and any(asked)):  # "none": the op's autograd formula, a second pass
        loss, z_part, accuracy, predicted, *_ = linear_ops.linear_cross_entropy(
            input, linear_weight, linear_bias, target, weight, None, **arguments)
    else:  # the gradients for an upstream of 1, computed now, scaled by attach_gradient's backward
        loss, z_part, accuracy, predicted, *grads = linear_ops.linear_cross_entropy(
            *(None if t is None else t.detach() for t in linear_inputs), target, weight, None,
            **arguments)
        for tensor, grad, needed in zip(linear_inputs, grads, asked):
            if needed:
                loss = ops.entry_points().attach_gradient(loss, tensor, grad)
    if options.argmax:
        return CrossEntropyOutput(loss, z_part if return_z_loss else None,
                                  accuracy if options.return_token_accuracy else None,
                                  predicted if options.return_predicted_tokens else None)
    return (loss, z_part) if return_z_loss else loss
