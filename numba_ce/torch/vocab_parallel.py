"""Vocabulary-parallel cross-entropy for torch tensors over a torch.distributed group: each rank
holds the logits (or the head's weight rows) of its slice of the classes, as a tensor-parallel
LM head splits them (Megatron-LM, NeMo, torchtitan), and gets the loss of all V classes and its
slice's gradients.

    forward   pass 1 over the rank's slice: each row's partial softmax state (5N + 3 floats);
              one all-gather of the states over the group, merged on every rank
              (numba_ce.torch.collectives: the same loss on every rank); then
              vocab_parallel_cross_entropy: pass 2, the slice's gradient for an upstream of 1,
                  attached as numba_ce.torch.cross_entropy attaches its own (the backward scales
                  it: ops.EagerAttachGradient)
              vocab_parallel_linear_cross_entropy: the merged statistics are saved, and the
                  backward runs pass 2 (the lean linear design's gradient pass) with the
                  upstream gradient
    backward  no collective

No math lives here: numba_ce.vocab_parallel, numba_ce.vocab_parallel_linear and
numba_ce.softmax_states compute on views of the tensors (numba_ce.torch.tensors). Eager calls
only: torch.compile does not trace these functions (their collectives and kernels run as they
are called).
"""
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .. import linear, softmax_states, validation, vocab_parallel, vocab_parallel_linear
from ..options import Options, check_flag
from ..planning import RowInputs
from ..results import returned
from . import collectives, ops, tensors
from .functional import check_overwritable


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, *,
                                 group: dist.ProcessGroup | None = None,
                                 vocab_start: int | None = None,
                                 n_classes: int | None = None,
                                 weight: torch.Tensor | None = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0,
                                 label_smoothing_style: str = "torch", z_loss: float = 0.0,
                                 softcap: float | None = None, inplace_backward: bool = False,
                                 return_z_loss: bool = False, validate: bool = True
                                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits split by classes over the ranks of ``group``: this rank's
    ``local_logits`` are the classes [vocab_start, vocab_start + V_s) of V.

    Parameters
    ----------
    local_logits : float32, float16 or bfloat16 tensor (..., V_s), the classes last (as
        Megatron-LM's [s, b, V / p] logits; torch's cross_entropy has them in dimension 1).
    target : int64 or int32 tensor of local_logits' shape without the last dimension: classes
        of the whole vocabulary, the same on every rank.
    group : the tensor-parallel group (None: the default group); a subgroup of the world works.
        Every rank of the group calls this function with the same target and options.
    vocab_start : this rank's first class; None: the slices follow the group's rank order, and
        their sizes (which may differ) are exchanged first (one all-gather of two integers).
    n_classes : V, where the caller knows it (VocabParallelCrossEntropyLoss keeps it from its
        one exchange): with ``validate=False`` the merged slices' bounds are then not read back,
        so the call does not wait for the device; else they are checked against it.
    weight : float tensor (V_s,), optional: the class weights of this rank's slice only.
    ignore_index, reduction, z_loss, softcap, inplace_backward, return_z_loss, validate : as
        :func:`numba_ce.torch.cross_entropy`.
    label_smoothing : float in [0, 1], in the form ``label_smoothing_style`` names: "torch"
        (default): torch's, (1 - eps) CE + eps / V sum_j w_j (lse - x_j); "megatron":
        Megatron-LM's, the target keeps 1 - eps and the other V - 1 classes share eps (torch's
        formula with eps V / (V - 1), which must be at most 1). Megatron-LM's own
        vocab_parallel_cross_entropy takes V and the mean of log p over each rank's slice
        instead of the whole vocabulary, so its loss differs from rank to rank (Megatron-LM
        issues 737, 7464); this one uses all V classes.

    Returns
    -------
    float32 loss of all V classes, the same on every rank: 0-d for "mean" and "sum", target's
    shape for "none"; (loss, z_loss) with ``return_z_loss``. Its gradient reaches
    ``local_logits`` only (this rank's slice), computed in fp32 by the forward and rounded once:
    every rank backpropagates the same upstream gradient through its copy of the loss. One
    all-gather of 5N + 3 floats a call, none in the backward; the merge reads the slices' bounds
    back to the host (one synchronisation), as ``validate`` does, unless V is known (above).
    """
    options, flags = _checked(ignore_index, reduction, label_smoothing, label_smoothing_style,
                              z_loss, softcap, validate, inplace_backward=inplace_backward,
                              return_z_loss=return_z_loss)
    tensors.check_devices(local_logits, target=target, weight=weight)
    tensors.check_differentiation(local_logits, target=target, weight=weight)
    logits, rows_target = _as_rows(local_logits, target)
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    if with_grad and flags["inplace_backward"]:
        check_overwritable(logits)
    view = tensors.as_array
    inputs = RowInputs(view(logits), validation.check_logits(view(logits)), view(rows_target),
                       tensors.class_weights(weight), tensors.ones(logits.device))
    _check_rows(inputs)
    device = logits.device
    start, n_classes = collectives.slice_bounds(group, logits.shape[1], logits.shape[0],
                                                vocab_start, n_classes, device)
    arrays = tensors.TorchArrays(device)
    with tensors.on_torch_stream_with_cupy(device):
        state = arrays.empty(softmax_states.packed_size(logits.shape[0]), "float32")
        vocab_parallel.state_into(inputs, start, options, state)
        done = collectives.merged(arrays, state, inputs.target, group, options,
                                  label_smoothing_style, flags["validate"], n_classes)
        grad = None
        if with_grad:
            grad = logits.detach() if flags["inplace_backward"] else torch.empty_like(logits)
            vocab_parallel.gradient_into(inputs, start, done.n_classes, done.options,
                                         done.statistics, view(grad))
    loss, z_part = _loss_tensors(arrays, done, target.shape)
    loss = loss.clone()  # its own memory, as numba_ce.torch.cross_entropy's
    if grad is not None:
        if flags["inplace_backward"]:
            torch.autograd.graph.increment_version(logits)  # as an in-place op would
        # attached to the rows' (M,) losses: the backward scales row by row only a 1-D loss
        rows_loss = loss if done.options.reduced else loss.reshape(-1)
        loss = ops.EagerAttachGradient.apply(rows_loss, logits, grad).reshape(loss.shape)
    return (loss, z_part) if flags["return_z_loss"] else loss


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, local_weight: torch.Tensor,
                                        target: torch.Tensor, *,
                                        group: dist.ProcessGroup | None = None,
                                        vocab_start: int | None = None,
                                        n_classes: int | None = None,
                                        linear_bias: torch.Tensor | None = None,
                                        weight: torch.Tensor | None = None,
                                        ignore_index: int = -100, reduction: str = "mean",
                                        label_smoothing: float = 0.0,
                                        label_smoothing_style: str = "torch",
                                        z_loss: float = 0.0, softcap: float | None = None,
                                        chunk_size: int | None = None,
                                        return_z_loss: bool = False, validate: bool = True
                                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of the logits ``hidden @ W.T + b`` of a head split by classes over the
    ranks of ``group``: this rank holds ``local_weight`` (V_s, H), the rows [vocab_start,
    vocab_start + V_s) of W (and ``linear_bias``, (V_s,), of b), and no rank holds more logits
    than a chunk of its own slice (numba_ce.vocab_parallel_linear).

    Parameters
    ----------
    hidden : float32, float16 or bfloat16 tensor (N, H), the same on every rank.
    local_weight, linear_bias : this rank's rows of the head, of hidden's dtype.
    target : int64 or int32 tensor (N,), the same on every rank.
    chunk_size : rows of a chunk of logits, as :func:`numba_ce.torch.linear_cross_entropy`'s
        "low" design.
    group, vocab_start, n_classes, weight, ignore_index, reduction, label_smoothing,
    label_smoothing_style, z_loss, softcap, return_z_loss, validate : as
    :func:`vocab_parallel_cross_entropy`.

    Returns
    -------
    The float32 loss of all V classes, the same on every rank (and its z part with
    ``return_z_loss``). Gradients: ``local_weight`` and ``linear_bias`` get their complete
    gradients; ``hidden`` gets this rank's share, sum_{j in the slice} dL/dz_j W_j, and dL/dx is
    the sum of the shares over the group. A tensor-parallel model's head input passes through an
    identity whose backward all-reduces over the group (Megatron-LM's
    copy_to_tensor_model_parallel_region), which adds them; without one, all-reduce
    ``hidden.grad`` yourself. The backward computes the gradients (a second pass over the slice,
    the logits again), with no collective.
    """
    options, flags = _checked(ignore_index, reduction, label_smoothing, label_smoothing_style,
                              z_loss, softcap, validate, return_z_loss=return_z_loss)
    others = dict(local_weight=local_weight, target=target, linear_bias=linear_bias, weight=weight)
    tensors.check_devices(hidden, **others)
    tensors.check_differentiation(hidden, **others)
    view = tensors.as_array
    arrays = [None if t is None else view(t) for t in (hidden, local_weight, target, linear_bias)]
    class_weight = tensors.class_weights(weight)
    fmt = linear.check_arguments(*arrays, class_weight, chunk_size)
    call = _LinearCall(group, vocab_start, n_classes, options, label_smoothing_style,
                       chunk_size, flags["validate"], fmt)
    loss, z_part = _VocabParallelLinear.apply(hidden, local_weight, linear_bias, target,
                                              class_weight, call)
    return (loss, z_part) if flags["return_z_loss"] else loss


class _LinearCall(NamedTuple):
    """What _VocabParallelLinear takes besides its tensors."""
    group: Any
    vocab_start: Any
    n_classes: Any
    options: Options
    smoothing_style: str
    chunk_size: Any
    validate: bool
    fmt: str


class _VocabParallelLinear(torch.autograd.Function):
    """forward: pass 1, the all-gather and the merged loss (statistics saved); backward: pass 2
    with the upstream gradient, from the saved statistics."""

    @staticmethod
    def forward(ctx, hidden, local_weight, linear_bias, target, class_weight, call):
        view = tensors.as_array
        device = hidden.device
        n_rows = hidden.shape[0]
        start, n_classes = collectives.slice_bounds(call.group, local_weight.shape[0], n_rows,
                                                    call.vocab_start, call.n_classes, device)
        arrays = tensors.TorchArrays(device)
        inputs = linear.LinearInputs(view(hidden), view(local_weight),
                                     None if linear_bias is None else view(linear_bias),
                                     view(target), class_weight, None, call.fmt)
        with tensors.on_torch_stream_with_cupy(device):
            state = arrays.empty(softmax_states.packed_size(n_rows), "float32")
            vocab_parallel_linear.state_into(arrays, inputs, call.options, start,
                                             call.chunk_size, state)
            done = collectives.merged(arrays, state, inputs.target, call.group, call.options,
                                      call.smoothing_style, call.validate, n_classes)
        loss, z_part = _loss_tensors(arrays, done, target.shape)
        ctx.mark_non_differentiable(z_part)
        ctx.save_for_backward(hidden, local_weight, linear_bias, target)
        ctx.statistics, ctx.class_weight = done.statistics, class_weight  # arrays of its own
        ctx.call = call._replace(options=done.options)
        ctx.columns = (start, done.n_classes)
        return loss.clone(), z_part

    @staticmethod
    def backward(ctx, grad_loss, _):
        needed = ctx.needs_input_grad[:3]
        if grad_loss is None or not any(needed):
            return (None,) * 6
        ops.refuse_create_graph()
        view = tensors.as_array
        hidden, local_weight, linear_bias, target = ctx.saved_tensors
        call = ctx.call
        upstream = grad_loss.float().reshape(-1).contiguous()  # (1,), or (N,) for "none"
        inputs = linear.LinearInputs(view(hidden), view(local_weight),
                                     None if linear_bias is None else view(linear_bias),
                                     view(target), ctx.class_weight, view(upstream), call.fmt)
        arrays = tensors.TorchArrays(hidden.device)
        with tensors.on_torch_stream_with_cupy(hidden.device):
            grads = vocab_parallel_linear.gradients(
                arrays, inputs, call.options, needed, ctx.statistics, *ctx.columns,
                call.chunk_size)
        return (*(None if g is None else arrays.tensor(g) for g in grads), None, None, None)


def _checked(ignore_index, reduction, label_smoothing, smoothing_style, z_loss, softcap,
             validate, **flags):
    """The call's Options (label smoothing as given: the loss's form needs V) and its flags,
    checked before anything is read or exchanged."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    vocab_parallel.check_smoothing_style(smoothing_style)
    checked = {name: check_flag(name, value) for name, value in flags.items()}
    checked["validate"] = check_flag("validate", validate)
    return options, checked


def _as_rows(local_logits, target):
    """(rows (M, V_s), target (M,)) of logits whose classes are their last dimension."""
    if local_logits.dim() < 1 or target.shape != local_logits.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(local_logits.shape[:-1])} to match "
                         f"local_logits {tuple(local_logits.shape)}, whose classes are its last "
                         f"dimension (got shape {tuple(target.shape)})")
    n_columns = local_logits.shape[-1]
    return tensors.readable_rows(local_logits.reshape(-1, n_columns)), target.reshape(-1)


def _check_rows(inputs):
    """The slice's target and class weights against its logits (RowInputs of arrays)."""
    n_rows, n_columns = inputs.logits.shape
    validation.check_target(inputs.target, n_rows)
    if inputs.weight is not None:
        validation.check_weight(inputs.weight, n_columns)


def _loss_tensors(arrays, done, shape):
    """(loss, z part) tensors of a vocab_parallel.MergedLoss, per element in ``shape`` for
    "none"."""
    loss, z_part, _, _ = returned(done.outputs, done.options)
    loss, z_part = arrays.tensor(loss), arrays.tensor(z_part)
    if not done.options.reduced:
        loss, z_part = loss.reshape(shape), z_part.reshape(shape)
    return loss, z_part
