"""Vocabulary-parallel cross-entropy's building blocks for NumPy and CuPy arrays: each rank (or
any holder of a slice of the classes) reads its slice of the logits twice, and moves one state of
5N + 3 floats between the two reads, by whatever engine it likes.

    state  = softmax_state(local_logits, target, vocab_start=o)     pass 1: the slice's partial
                                                                    softmax state of each row
    states = <every slice's state, stacked: an all-gather>          (R, 5N + 3), any order
    merged = merge_softmax_states(states)                           the state of all V classes
    res    = slice_cross_entropy_with_grad(local_logits, target,    pass 2: the loss (the same
                                           merged, vocab_start=o)   on every rank) and this
                                                                    slice's gradient

numba_ce.slice_states has pass 1's kernel, numba_ce.softmax_states the states' layout, merge and
loss, numba_ce.slice_gradient pass 2's kernel. The loss needs no pass over the logits: the merged
state holds each row's max, sum of exps, target logit and weight and label smoothing's sum, so
every holder of the merged state computes the whole loss, not a share of it.

Class weights are the slice's own, (V_s,): w[o:o + V_s] of the whole vocabulary's.

Label smoothing, ``label_smoothing_style``:
    "torch"     torch's: (1 - eps) * CE + eps / V * sum_j w_j (lse - x_j)
    "megatron"  Megatron-LM's (megatron.core.tensor_parallel.cross_entropy): the target keeps
                1 - eps of the mass and the other V - 1 classes share eps, i.e. torch's formula
                with eps * V / (V - 1) in the place of eps, V the whole vocabulary. (Megatron-LM
                itself takes V and the mean of log p over each rank's own slice, so its loss
                differs from rank to rank: NVIDIA/Megatron-LM issues 737 and 7464.)
"""
import dataclasses
import numbers
from typing import Any, NamedTuple

import numpy as np

from . import (api, buffers, device_properties, devices, execution, results, softmax_states,
               validation)
from .options import Options, check_flag
from .planning import RowInputs, plan_slice_gradient, plan_slice_states
from .results import Array, CrossEntropyResult

SMOOTHING_STYLES = ("torch", "megatron")


def softmax_state(local_logits: Array, target: Array, *, vocab_start: int,
                  weight: Array | None = None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, softcap: float | None = None) -> Array:
    """Pass 1: each row's partial softmax state over a slice of the classes, read once.

    Parameters
    ----------
    local_logits : float32, float16 or bfloat16 array (N, V_s): the logits of the classes
        [vocab_start, vocab_start + V_s) of the vocabulary.
    target : int32 or int64 array (N,): classes of the whole vocabulary (the same on every
        slice).
    vocab_start : int >= 0, the slice's first class.
    weight : float array (V_s,), optional: the slice's class weights.
    ignore_index, label_smoothing, softcap : as :func:`numba_ce.cross_entropy` (label smoothing
        only says whether to sum w_j x_j).

    Returns
    -------
    float32 array (5N + 3,): the state (numba_ce.softmax_states has its layout), to be stacked
    with the other slices' and merged by :func:`merge_softmax_states`.
    """
    options = Options(ignore_index, "sum", label_smoothing, 0.0, softcap)
    xp, on_host = api.array_kind(local_logits=local_logits, target=target, weight=weight)
    fmt = _check_slice(local_logits, target, weight, vocab_start)
    local_logits, target, weight = api.on_device(on_host, local_logits, target, weight)
    state = xp.empty(softmax_states.packed_size(target.shape[0]), np.float32)
    inputs = RowInputs(local_logits, fmt, target, api.class_weights(xp, weight), None)
    state_into(inputs, vocab_start, options, state)
    return devices.cupy.asnumpy(state) if on_host else state


def merge_softmax_states(states: Array) -> Array:
    """The state of the union of the slices whose states are stacked in ``states`` (R, 5N + 3)
    (in any order; merged states of groups of slices merge again): the online-softmax combine,
    written out in numba_ce.softmax_states. Raises ValueError unless the slices tile a range of
    classes without gaps or overlaps (the check reads their 2R bounds to the host)."""
    xp, on_host = api.array_kind(states=states)
    if states.dtype != np.float32:
        raise TypeError(f"softmax states must be float32 (got {states.dtype.name})")
    n_rows = softmax_states.rows_of(states)
    if states.ndim != 2 or not states.shape[0]:
        raise ValueError(f"softmax states to merge must be stacked, (R, 5N + 3) with R >= 1 "
                         f"(got shape {tuple(states.shape)})")
    (states,) = api.on_device(on_host, states)
    merged = xp.empty(softmax_states.packed_size(n_rows), np.float32)
    softmax_states.merge(states, merged)
    return devices.cupy.asnumpy(merged) if on_host else merged


def slice_cross_entropy_with_grad(local_logits: Array, target: Array, merged_state: Array, *,
                                  vocab_start: int, weight: Array | None = None,
                                  ignore_index: int = -100, reduction: str = "mean",
                                  label_smoothing: float = 0.0,
                                  label_smoothing_style: str = "torch", z_loss: float = 0.0,
                                  softcap: float | None = None,
                                  grad_output: Array | float | None = None,
                                  inplace: bool = False, validate: bool = True,
                                  n_classes: int | None = None) -> CrossEntropyResult:
    """Pass 2: the loss of all V classes and this slice's gradient, given ``merged_state``, the
    merged state of every slice of the vocabulary (classes [0, V)); arguments as
    :func:`softmax_state` (the same ones) and :func:`numba_ce.cross_entropy_with_grad`, and
    ``label_smoothing_style`` "torch" or "megatron" (module docstring). ``n_classes``: V, where
    the caller knows it; with ``validate=False`` the merged state's bounds are then not read
    (no wait for the device: the call only launches), else they are checked against it.

    Returns
    -------
    CrossEntropyResult(loss, grad, z_loss, lse): the loss, its z part and lse as
    :func:`numba_ce.cross_entropy_with_grad` gives them for the whole vocabulary's logits (the
    same on every slice); ``grad`` the gradient of this slice's logits (N, V_s), rounded once
    to their format, into them with ``inplace``.
    """
    check_smoothing_style(label_smoothing_style)
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    validate = check_flag("validate", validate)
    inplace = check_flag("inplace", inplace)
    xp, on_host = api.array_kind(local_logits=local_logits, target=target,
                                 merged_state=merged_state, weight=weight,
                                 grad_output=grad_output)
    fmt = _check_slice(local_logits, target, weight, vocab_start)
    n_rows = target.shape[0]
    go_shape = validation.check_grad_output(grad_output, reduction, n_rows)
    if inplace:
        validation.check_writeable(local_logits)
        validation.check_not_overlapping(local_logits, "inplace=True", target=target,
                                         weight=weight, merged_state=merged_state,
                                         grad_output=grad_output)
    caller_logits = local_logits
    local_logits, target, merged_state, weight, grad_output = api.on_device(
        on_host, local_logits, target, merged_state, weight, grad_output)
    done = merged_loss(xp, merged_state, target, options, label_smoothing_style,
                       merged_classes(merged_state, n_rows, vocab_start, local_logits.shape[1],
                                      n_classes, validate), validate)
    grad = local_logits if inplace else xp.empty(local_logits.shape, local_logits.dtype)
    inputs = RowInputs(local_logits, fmt, target, api.class_weights(xp, weight),
                       api.upstream(xp, grad_output, go_shape))
    gradient_into(inputs, vocab_start, done.n_classes, done.options, done.statistics, grad)
    loss, z_part, _, _ = results.returned(done.outputs, done.options)
    row_lse = done.outputs.row_lse
    if on_host:
        loss, z_part, row_lse = (devices.cupy.asnumpy(a) for a in (loss, z_part, row_lse))
        if inplace:
            caller_logits[...] = devices.cupy.asnumpy(grad)
            grad = caller_logits
        else:
            grad = devices.cupy.asnumpy(grad)
    return CrossEntropyResult(loss, grad, z_part, row_lse)


class MergedLoss(NamedTuple):
    """The loss of all V classes from a merged state, and what the gradient pass needs."""
    options: Options  # the call's, its label_smoothing the eps of torch's formula that it uses
    n_classes: int    # V
    outputs: Any      # buffers.RowOutputs: the rows' and the reduced loss, z part and lse
    statistics: Any   # softmax_states.RowStatistics


def merged_loss(alloc, merged_state, target, options, smoothing_style, n_classes, validate):
    """The :class:`MergedLoss` of ``target`` from ``merged_state``, the state of all
    ``n_classes`` classes, with ``options`` (label smoothing as given, of ``smoothing_style``);
    ``alloc.empty`` makes the outputs. ``validate``: ValueError for a target outside [0, V)
    first (a read that waits for the device)."""
    options = dataclasses.replace(options, label_smoothing=loss_smoothing(
        options.label_smoothing, smoothing_style, n_classes))
    if validate:
        check_targets(target, options.ignore_index, n_classes)
    outputs = buffers.allocate(alloc, target.shape[0], options)
    statistics = softmax_states.row_losses(merged_state, target, options, n_classes, outputs)
    return MergedLoss(options, n_classes, outputs, statistics)


def state_into(inputs, vocab_start, options, out, device=None):
    """Pass 1 into ``out`` (5N + 3,) float32 for checked ``inputs`` (a RowInputs of the slice's
    logits, its class weights or None; no grad_output): the kernel's rows, then the tail."""
    n_rows, n_columns = inputs.logits.shape
    state = softmax_states.unpack(out)
    if n_rows:
        execution.EXECUTOR.launch(plan_slice_states(
            inputs, vocab_start, options, state, device or device_properties.current()))
    state_tail(state, inputs.weight, vocab_start, n_columns)


def state_tail(state, weight, vocab_start, n_columns):
    """A state's tail (softmax_states.States): S_w of the slice's class ``weight`` (float32
    (V_s,) or None: V_s), its first class and its number of classes."""
    state.weight_total[...] = n_columns if weight is None else weight.astype(np.float64).sum()
    state.start[...] = vocab_start
    state.size[...] = n_columns


def gradient_into(inputs, vocab_start, n_classes, options, statistics, grad, device=None):
    """Pass 2's gradient into ``grad`` (the slice's shape and format; may be the logits) from
    the merged state's ``statistics`` (softmax_states.RowStatistics), for the upstream
    ``inputs.grad_output``."""
    if inputs.logits.shape[0]:
        execution.EXECUTOR.launch(plan_slice_gradient(
            inputs, vocab_start, n_classes, options, statistics.stats, statistics.row_lse,
            device or device_properties.current(), grad=grad, row_weight=statistics.row_weight))


def merged_classes(merged_state, n_rows, vocab_start, n_columns, n_classes=None,
                   validate=True):
    """V of a merged state of the whole vocabulary: ``n_classes`` as the caller knows it where
    ``validate`` is off (nothing read), else the state's own bounds, read to the host (a wait
    for the device). ValueError unless it is a state of ``n_rows`` rows whose classes start at
    0 and hold this slice's, the classes [vocab_start, vocab_start + n_columns), and (where
    read) ``n_classes`` is its V."""
    if merged_state.dtype != np.float32 or merged_state.shape != (
            softmax_states.packed_size(n_rows),):
        raise ValueError(f"merged_state must be a float32 state of the target's {n_rows} rows, "
                         f"shape ({softmax_states.packed_size(n_rows)},) (got "
                         f"{merged_state.dtype.name} shape {tuple(merged_state.shape)})")
    if n_classes is not None:
        check_n_classes(n_classes)
    if n_classes is None or validate:
        state = softmax_states.unpack(merged_state)
        start, size = (int(softmax_states.to_host(a)[0]) for a in (state.start, state.size))
        if start != 0:
            raise ValueError(f"merged_state must cover the whole vocabulary, classes [0, V) (got "
                             f"classes [{start}, {start + size}): merge every slice's state)")
        check_classes_agree(n_classes, size, "merged_state's slices")
        n_classes = size
    if vocab_start + n_columns > n_classes:
        raise ValueError(f"this slice's classes [{vocab_start}, {vocab_start + n_columns}) must "
                         f"lie within merged_state's [0, {n_classes}): vocab_start and the "
                         f"slice's size must be those its state was made with")
    return n_classes


def check_classes_agree(n_classes, size, whose):
    """ValueError unless ``n_classes`` (a caller's V, or None) is ``size``, the V of
    ``whose``."""
    if n_classes is not None and n_classes != size:
        raise ValueError(f"n_classes must be the V of {whose}, {size} (got {n_classes})")


def check_n_classes(n_classes):
    """``n_classes`` (V, given by a caller) is an int >= 1."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral):
        raise TypeError(f"n_classes must be an int or None (got {type(n_classes).__name__})")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1 (got {n_classes})")


def check_targets(target, ignore_index, n_classes):
    """ValueError naming the first row whose target is neither in [0, V) nor ignore_index (one
    read that waits for the device)."""
    row = softmax_states.first_bad_row(target, ignore_index, n_classes)
    if row is not None:
        value = int(softmax_states.to_host(target[row:row + 1])[0])
        raise validation.target_out_of_range(row, value, n_classes, ignore_index)


def check_smoothing_style(style):
    if not isinstance(style, str) or style not in SMOOTHING_STYLES:
        raise ValueError(f"label_smoothing_style must be 'torch' or 'megatron' (got {style!r})")


def loss_smoothing(label_smoothing, style, n_classes):
    """The eps of torch's formula that the loss of ``style`` uses on V = ``n_classes``:
    eps itself ("torch"), or eps * V / (V - 1) ("megatron": the V - 1 other classes share eps),
    which must be at most 1."""
    if style == "torch" or not label_smoothing:
        return label_smoothing
    if n_classes < 2:
        raise ValueError("label_smoothing_style='megatron' spreads eps over the V - 1 classes "
                         "other than the target: it needs V >= 2 (got V = 1)")
    eps = label_smoothing * n_classes / (n_classes - 1)
    if eps > 1.0:
        raise ValueError(f"label_smoothing_style='megatron' uses eps * V / (V - 1) = {eps:.6g} "
                         f"in torch's formula, which must be at most 1: label_smoothing must be "
                         f"at most (V - 1) / V = {(n_classes - 1) / n_classes:.6g} (got "
                         f"{label_smoothing})")
    return eps


def _check_slice(local_logits, target, weight, vocab_start):
    """The logits' format name; checks the slice's logits, target, weights and first class."""
    fmt = validation.check_logits(local_logits)
    n_rows, n_columns = local_logits.shape
    validation.check_target(target, n_rows)
    if weight is not None:
        validation.check_weight(weight, n_columns)
    check_vocab_start(vocab_start, n_columns)
    return fmt


def check_vocab_start(vocab_start, n_columns):
    """``vocab_start`` is an int >= 0, and the slice ends below softmax_states.MAX_CLASSES."""
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"vocab_start must be an int (got {type(vocab_start).__name__})")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0 (got {vocab_start})")
    if vocab_start + n_columns > softmax_states.MAX_CLASSES:
        raise ValueError(f"a vocabulary-parallel slice must end at class 2**24 at the latest "
                         f"(got classes [{vocab_start}, {vocab_start + n_columns}))")
