"""The torch.library custom ops behind numba_ce.torch's cross-entropy: torch.compile traces a
call as nodes of its graph (no graph break) and runs our kernels there.

    numba_ce::cross_entropy    (input, target, weight?, grad_output?, *, options..., with_grad,
                               validate) -> (loss, z part, token accuracy, predicted tokens,
                               gradient for the upstream grad_output, None: 1)
    numba_ce::cross_entropy_   (input!, target, weight?, *, options..., validate) -> the first
                               four, the gradient for an upstream of 1 written into input
    numba_ce::attach_gradient  (loss, input, gradient) -> a copy of loss whose gradient in input
                               is ``gradient`` times the upstream gradient

Each op has an eager implementation (numba_ce's core on views of the tensors, the calls the
adapter made before the ops existed), a fake one for tracing (the outputs' shapes: both make
their outputs with one function, so they agree) and, where torch.library takes one, an autograd
formula. The options are the fields of numba_ce.options.Options, keyword-only and by name
(OPTIONS_SCHEMA), from which the implementations rebuild an Options.

The gradient. The forward's kernel computes d(loss)/d(input) for an upstream gradient of 1 while
the logits are on chip; the backward only scales it: for an upstream g (a scalar, or g_r per row
for reduction="none"),

    d(g . loss)/d(x[r, j]) = g_r * grad[r, j]

so numba_ce.torch.cross_entropy runs a kernel op on ``input.detach()`` (outside autograd), with
the gradient as an output, or written into the logits by the in-place op, and hands it to
attach_gradient, whose autograd formula saves it and whose backward scales it (as torch ops,
which Inductor fuses; eagerly, in place by numba_ce.scale_kernel: one launch, whose blocks
return at once when g is 1). Why two ops and not one
with a formula: torch.library takes no autograd formula for an op that mutates its inputs, and
an op whose backward mutated one of its own outputs breaks AOTAutograd when that output leaves
the compiled graph (its partitioner fails; torch.library.opcheck shows it), whereas a backward
may scale a saved input. attach_gradient's output is a copy (an op's output may not alias its
inputs): 4 bytes, or 4 N for reduction="none".

Eager calls skip the ops (:func:`entry_points`): they call the implementations directly and
attach the gradient with :class:`EagerAttachGradient`, the same formula as a plain autograd
Function that hands back the loss itself, so that an eager step pays no dispatcher host time and
no copy for what only tracing needs.

numba_ce::cross_entropy's own autograd formula, for callers of the op itself, runs it again with
the upstream gradient as grad_output (a second pass over the logits).

Under torch.compile the in-place op becomes functional and Inductor writes the gradient into the
logits' buffer again, and the backward's scaling is torch ops (see _scaled_gradient) that it
writes into the saved gradient's buffer: a compiled step holds no more N x V buffers than an
eager one (the aot_eager backend, which runs the graph op by op, copies them instead; README,
"torch.compile and CUDA graphs").
"""
from typing import Callable, NamedTuple

import torch

from .. import buffers, execution, results, validation
from ..execution import RowCall
from ..options import Options
from ..planning import RowInputs
from . import tensors

OPTIONS_SCHEMA = ("int ignore_index, str reduction, float label_smoothing, float z_loss, "
                  "float? softcap, bool return_token_accuracy, bool return_predicted_tokens")


def option_arguments(options):
    """The keyword arguments of an op for ``options`` (an Options), by field name."""
    return {"ignore_index": options.ignore_index, "reduction": options.reduction,
            "label_smoothing": options.label_smoothing, "z_loss": options.z_loss,
            "softcap": options.softcap, "return_token_accuracy": options.return_token_accuracy,
            "return_predicted_tokens": options.return_predicted_tokens}


@torch.library.custom_op(
    "numba_ce::cross_entropy", mutates_args=(),
    schema=f"(Tensor input, Tensor target, Tensor? weight, Tensor? grad_output, *, "
           f"{OPTIONS_SCHEMA}, bool with_grad, bool validate) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor)")
def cross_entropy(input, target, weight, grad_output, *, with_grad, validate, **options):
    """(loss, z part, token accuracy, predicted tokens, gradient) of logits ``input`` (N, V),
    whose rows the kernels must be able to read in place; outputs not asked for are empty (0,).
    The gradient (``with_grad``) is for the upstream gradient ``grad_output``, float32 (1,) or
    (N,) for reduction="none" (None: 1), in input's dtype."""
    return run(input, target, weight, grad_output, Options(**options), with_grad=with_grad,
               validate=validate)


@torch.library.custom_op(
    "numba_ce::cross_entropy_", mutates_args=("input",),
    schema=f"(Tensor(a!) input, Tensor target, Tensor? weight, *, {OPTIONS_SCHEMA}, "
           "bool validate) -> (Tensor, Tensor, Tensor, Tensor)")
def cross_entropy_(input, target, weight, *, validate, **options):
    """The first four outputs of numba_ce::cross_entropy; the gradient, for an upstream gradient
    of 1, is written into ``input``."""
    return run_(input, target, weight, Options(**options), validate=validate)


@cross_entropy.register_fake
def _(input, target, weight, grad_output, *, with_grad, validate, **options):
    gradient = input.new_empty(input.shape if with_grad else (0,))
    return (*empty_outputs(input, Options(**options)), gradient)


@cross_entropy_.register_fake
def _(input, target, weight, *, validate, **options):
    return empty_outputs(input, Options(**options))


def run(input, target, weight, grad_output, options, *, with_grad, validate, in_place=False):
    """numba_ce::cross_entropy's outputs for ``options`` (an Options) from one call of
    numba_ce.execution.run, the arguments checked first; ``in_place``: the gradient is written
    into ``input`` (the fifth output)."""
    view = tensors.as_kernel_array
    logits = view(input)
    fmt = validation.check_logits(logits)
    n_rows, n_classes = logits.shape
    target_array = view(target)
    validation.check_row_target(target_array, logits, options)
    weight_array = tensors.class_weights(weight, view)
    if weight_array is not None:
        validation.check_weight(weight_array, n_classes)
    if in_place:
        validation.check_not_overlapping(logits, "inplace_backward=True", target=target_array,
                                         weight=None if weight is None else view(weight))
    tensors.check_not_capturing(input.device, validate)
    returned = empty_outputs(input, options)
    grad = input if in_place else input.new_empty(input.shape) if with_grad else None
    upstream = tensors.ones(input.device, view) if grad_output is None else view(grad_output)
    inputs = RowInputs(logits, fmt, target_array, weight_array, upstream)
    grad_array = logits if in_place else None if grad is None else view(grad)
    outputs = _row_outputs(returned, n_rows, options, input.device, view)
    with tensors.on_torch_stream(input.device):
        execution.run(RowCall(inputs, options, grad_array, outputs, validate),
                      tensors.TorchArrays(input.device, view))
    return (*returned, input.new_empty(0) if grad is None else grad)


def run_(input, target, weight, options, *, validate):
    """numba_ce::cross_entropy_'s outputs for ``options`` (an Options)."""
    return run(input, target, weight, None, options, with_grad=True, validate=validate,
               in_place=True)[:4]


def empty_outputs(input, options):
    """The first four outputs of numba_ce::cross_entropy, made and not filled: the loss and its
    z part (0-d for a reduced loss, (N,) for "none"), the token accuracy (the same; (0,) unless
    asked) and the predicted tokens (int64 (N,); (0,) unless asked). (The linear op's fake
    implementation takes them too, less the z part.)"""
    n_rows = input.shape[0]
    per_loss = () if options.reduced else (n_rows,)
    return (input.new_empty(per_loss, dtype=torch.float32),
            input.new_empty(per_loss, dtype=torch.float32),
            input.new_empty(per_loss if options.return_token_accuracy else (0,),
                            dtype=torch.float32),
            input.new_empty((n_rows,) if options.return_predicted_tokens else (0,),
                            dtype=torch.int64))


def _row_outputs(returned, n_rows, options, device, view):
    """The buffers.RowOutputs the kernels fill, seen by ``view``: the returned tensors where they
    go (an op's outputs may not share memory, so each is an allocation of its own) and the rest
    in one float32 workspace (laid out as buffers.row_outputs lays out all of them)."""
    loss, z_part, accuracy, predicted = returned
    workspace = torch.empty(buffers.size(n_rows, options), dtype=torch.float32, device=device)
    if options.argmax and not options.return_predicted_tokens:  # the kernel finds it anyway
        predicted = torch.empty(n_rows, dtype=torch.int64, device=device)
    outputs = buffers.row_outputs(view(workspace), n_rows, options,
                                  view(predicted) if options.argmax else None)
    asked = (loss, z_part, accuracy) if options.return_token_accuracy else (loss, z_part)
    return outputs._replace(**{name: view(tensor.view(-1)) for name, tensor
                               in zip(results.returned_fields(options), asked)})


def _keep_inputs(ctx, inputs, keyword_only_inputs, output):
    """numba_ce::cross_entropy's setup_context: its inputs, for a second pass."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # the others' gradients: None, not zeros made and filled
    ctx.save_for_backward(*inputs[:3])
    ctx.options = {**keyword_only_inputs, "with_grad": True, "validate": False}  # checked


def _second_pass(ctx, grad_loss, *not_differentiable):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    refuse_create_graph()
    upstream = grad_loss.float().reshape(-1).contiguous()  # (1,), or (N,) for "none"
    return cross_entropy(*ctx.saved_tensors, upstream, **ctx.options)[4], None, None, None


cross_entropy.register_autograd(_second_pass, setup_context=_keep_inputs)


@torch.library.custom_op("numba_ce::attach_gradient", mutates_args=(),
                         schema="(Tensor loss, Tensor input, Tensor gradient) -> Tensor")
def attach_gradient(loss, input, gradient):
    """A copy of ``loss`` whose gradient in ``input`` is ``gradient``, computed for an upstream
    gradient of 1 (backward scales it in place); the upstream gradient reaches ``loss`` as it
    is, so that one loss can take the gradients of several inputs, one attach_gradient each."""
    return loss.clone()


@attach_gradient.register_fake
def _(loss, input, gradient):
    return torch.empty_like(loss)


def _keep_gradient(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.per_row = output.dim() == 1  # reduction="none": an upstream gradient per row
    ctx.scaled = False


def _scaled_gradient(ctx, grad_loss):
    """(the upstream gradient for loss, as it is; the saved gradient times it, for input; None):

        d(g . loss)/d(x[r, j]) = g_r * grad[r, j]   (g_r = g[0] for a reduced loss; a zero stays
                                                    zero: an ignored row's gradient is 0 for any
                                                    g, +-inf included)

    each element rounded once to grad's dtype, as torch ops: traced (torch.compile), Inductor
    fuses them with the upstream's own computation and writes the product into the saved
    gradient's buffer, and no op mutates in the backward, which AOTAutograd cannot take when the
    gradient lives in a graph input's memory (inplace_backward=True on logits passed to the
    compiled function). Eager calls scale in place instead (:class:`EagerAttachGradient`)."""
    if not ctx.needs_input_grad[1]:
        return grad_loss, None, None
    refuse_create_graph()
    (grad,) = ctx.saved_tensors
    upstream = grad_loss.float().reshape(-1)  # (1,), or (N,) for "none"
    scaled = grad.float() * (upstream[:, None] if ctx.per_row else upstream)
    return grad_loss, torch.where(grad == 0, grad, scaled.to(grad.dtype)), None


attach_gradient.register_autograd(_scaled_gradient, setup_context=_keep_gradient)


class EagerAttachGradient(torch.autograd.Function):
    """numba_ce::attach_gradient's formula as a plain autograd Function, for eager calls: a
    custom op's call passes torch's dispatcher and its autograd wrapper, host time that a small
    batch's step waits for (bench/NOTES.md), and only tracing needs the op."""

    @staticmethod
    def forward(ctx, loss, input, gradient):
        _keep_gradient(ctx, (loss, input, gradient), loss)
        # the loss itself, its history replaced, not a copy (the op's output must be one): it
        # is this call's own tensor, and one returned as it is would come back as a view, which
        # refuses in-place use (loss /= steps)
        ctx.mark_dirty(loss)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """_scaled_gradient's product, computed in place by :func:`scale_` (one launch, whose
        blocks return at once when g is 1). Runs on autograd's device thread, whose hand-offs
        of the interpreter lock make each line dearer (bench/NOTES.md): kept short. It scales
        what ctx.saved_tensors gives back, which saved-tensor hooks (checkpointing, offloading)
        may have copied."""
        if not ctx.needs_input_grad[1]:
            return grad_loss, None, None
        refuse_create_graph()
        refuse_second_backward(ctx)
        (grad,) = ctx.saved_tensors
        scale_(grad, grad_loss.float().reshape(-1), ctx.per_row)
        return grad_loss, grad, None


class EntryPoints(NamedTuple):
    """What numba_ce.torch's functions call, with an Options: the custom ops when torch.compile
    or torch.export traces them (graph nodes), their implementations when they run eagerly (the
    same kernels and formulas, without the dispatcher's host time)."""
    cross_entropy: Callable  # (input, target, weight, grad_output, options, *, with_grad,
    #                            validate)
    cross_entropy_: Callable  # (input, target, weight, options, *, validate)
    attach_gradient: Callable


def _traced_cross_entropy(input, target, weight, grad_output, options, **flags):
    return cross_entropy(input, target, weight, grad_output, **option_arguments(options), **flags)


def _traced_cross_entropy_(input, target, weight, options, **flags):
    return cross_entropy_(input, target, weight, **option_arguments(options), **flags)


def _eager_cross_entropy_(input, target, weight, options, *, validate):
    returned = run_(input, target, weight, options, validate=validate)
    torch.autograd.graph.increment_version(input)  # as the op's declared mutation does
    return returned


TRACED = EntryPoints(_traced_cross_entropy, _traced_cross_entropy_, attach_gradient)
EAGER = EntryPoints(run, _eager_cross_entropy_, EagerAttachGradient.apply)


def entry_points():
    """TRACED while torch.compile or torch.export traces the caller, else EAGER."""
    return TRACED if torch.compiler.is_compiling() else EAGER


def refuse_create_graph():
    """Refuse a backward that builds a graph of itself (create_graph=True, as for a double
    backward: autograd runs it with grad mode on). What it returns comes from kernels, not from
    torch ops, so it would silently not depend on the logits."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "numba_ce.torch's losses have no second derivative: their backward returns a "
            "gradient that a kernel computed, so a backward with create_graph=True (a double "
            "backward, e.g. a gradient penalty) cannot differentiate it; compute that loss with "
            "torch's own functions")


def refuse_second_backward(ctx):
    """Refuse a second backward through one forward (retain_graph=True): the first scaled the
    saved gradient in place."""
    if ctx.scaled:
        raise RuntimeError(
            "numba_ce.torch: a second backward through one forward (retain_graph=True) cannot "
            "be answered: the first scaled the gradient that the forward saved, in place, so it "
            "no longer holds d(loss)/d(input); compute the loss again for each backward")
    ctx.scaled = True


def scale_(grad, upstream, per_row):
    """grad (N, V) *= upstream, float32 (N,) with ``per_row``, else (1,) (then grad may be a
    bias's gradient (V,) too, scaled as the one row of its (1, V) view): each element rounded
    once to grad's dtype (numba_ce.scale_kernel). Never synchronises."""
    rows = tensors.as_kernel_array(grad if grad.dim() == 2 else grad.view(1, -1))
    with tensors.on_torch_stream(grad.device):
        execution.scale_rows(rows, rows.dtype.name, tensors.as_kernel_array(upstream), per_row)
