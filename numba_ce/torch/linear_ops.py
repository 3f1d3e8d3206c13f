"""The torch.library custom op behind numba_ce.torch.linear_cross_entropy (numba_ce.torch.ops
has the cross-entropy's, and says why custom ops):

    numba_ce::linear_cross_entropy
        (input, linear_weight, linear_bias?, target, weight?, grad_output?, *, options...,
         memory, chunk_size, validate, input_grad, linear_weight_grad, linear_bias_grad)
        -> (loss, z part, token accuracy, predicted tokens, grad_input, grad_linear_weight,
            grad_linear_bias)

numba_ce.linear.compute in the design ``memory`` names: the loss, and the gradients asked for by
the flags where the upstream gradient is known: ``grad_output`` when given, else 1 for a reduced
loss ("none" without grad_output: the loss only).

numba_ce.torch.linear_cross_entropy uses it in two ways:

    "mean"/"sum"  the op on detached tensors computes the loss and every gradient asked for, for
                  an upstream gradient of 1; numba_ce::attach_gradient links each to its input,
                  and its backward scales it in place (nothing to do when the upstream is 1).
    "none"        the op with its own autograd formula: the loss only, then, in backward, the op
                  again with the per-row upstream gradient as grad_output (a second pass).
"""
import torch

from .. import linear
from ..options import Options
from . import tensors
from .ops import OPTIONS_SCHEMA, empty_outputs, refuse_create_graph

GRADIENT_FLAGS = "bool input_grad, bool linear_weight_grad, bool linear_bias_grad"


@torch.library.custom_op(
    "numba_ce::linear_cross_entropy", mutates_args=(),
    schema="(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
           f"Tensor? weight, Tensor? grad_output, *, {OPTIONS_SCHEMA}, str memory, "
           f"int? chunk_size, bool validate, {GRADIENT_FLAGS}) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def linear_cross_entropy(input, linear_weight, linear_bias, target, weight, grad_output, *,
                         memory, chunk_size, validate, input_grad, linear_weight_grad,
                         linear_bias_grad, **options):
    """(loss, z part, token accuracy, predicted tokens, grad_input, grad_linear_weight,
    grad_linear_bias): the z part as numba_ce::cross_entropy's (no gradient); outputs not asked
    for or not computed are empty (0,)."""
    options = Options(**options)
    needed = _computed(options, grad_output, linear_bias,
                       (input_grad, linear_weight_grad, linear_bias_grad))
    view = tensors.as_array
    arrays = [None if t is None else view(t) for t in (input, linear_weight, target, linear_bias)]
    class_weight = tensors.class_weights(weight)
    fmt = linear.check_arguments(*arrays, class_weight, chunk_size)
    tensors.check_not_capturing(input.device, validate)
    input_array, weight_array, target_array, bias_array = arrays
    device = input.device
    xp = tensors.TorchArrays(device)
    upstream = tensors.ones(device) if grad_output is None else view(grad_output)
    inputs = linear.LinearInputs(input_array, weight_array, bias_array, target_array,
                                 class_weight, upstream, fmt)
    with tensors.on_torch_stream_with_cupy(device):
        result = linear.compute(xp, inputs, options, needed, memory=memory,
                                chunk_size=chunk_size, validate=validate)

    def tensor(array, dtype):
        return input.new_empty(0, dtype=dtype) if array is None else xp.tensor(array)

    # The loss, its z part and the token accuracy are views of one allocation
    # (buffers.allocate), and an op's outputs may not share memory: copies (one value each, or N).
    return (tensor(result.loss, torch.float32).clone(),
            tensor(result.z_loss, torch.float32).clone(),
            tensor(result.token_accuracy, torch.float32).clone(),
            tensor(result.predicted_tokens, torch.int64),
            *(tensor(array, input.dtype) for array in result[1:4]))


@linear_cross_entropy.register_fake
def _(input, linear_weight, linear_bias, target, weight, grad_output, *, memory, chunk_size,
      validate, input_grad, linear_weight_grad, linear_bias_grad, **options):
    options = Options(**options)
    needed = _computed(options, grad_output, linear_bias,
                       (input_grad, linear_weight_grad, linear_bias_grad))
    return (*empty_outputs(input, options),
            *(input.new_empty(t.shape if computed else (0,))
              for t, computed in zip((input, linear_weight, linear_bias), needed)))


def _computed(options, grad_output, linear_bias, asked):
    """Which of (grad_input, grad_linear_weight, grad_linear_bias) the op computes: those asked
    for, when the upstream gradient is known (given, or 1 for a reduced loss) and, for the
    bias's, when there is a bias."""
    known = grad_output is not None or options.reduced
    return (known and asked[0], known and asked[1],
            known and asked[2] and linear_bias is not None)


def _keep_inputs(ctx, inputs, keyword_only_inputs, output):
    """setup_context: the inputs of a second pass."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # the others' gradients: None, not zeros made and filled
    ctx.save_for_backward(*inputs[:5])
    ctx.options = {**keyword_only_inputs, "validate": False}  # the forward checked the targets


def _second_pass(ctx, grad_loss, *not_differentiable):
    needed = ctx.needs_input_grad[:3]
    if grad_loss is None or not any(needed):
        return (None,) * 6
    refuse_create_graph()
    upstream = grad_loss.float().reshape(-1).contiguous()  # (1,), or (N,) for "none"
    flags = dict(zip(("input_grad", "linear_weight_grad", "linear_bias_grad"), needed))
    grads = linear_cross_entropy(*ctx.saved_tensors, upstream, **{**ctx.options, **flags})[4:]
    return (*(grad if asked else None for grad, asked in zip(grads, needed)), None, None, None)


linear_cross_entropy.register_autograd(_second_pass, setup_context=_keep_inputs)
