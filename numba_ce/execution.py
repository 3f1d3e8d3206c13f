"""Running a call's plans (numba_ce.planning) on the current stream, in order.

    target_stats   the batch's reduction denominators; its first bad row, read back when checked
                   (probability_stats for class-probability targets: nothing to check or read)
    row kernel     lse, row losses and (fused) the gradient
    reduce_rows    for "sum" and "mean"

Nothing waits for the GPU except the target check (``validate``): its one 8-byte read is started
after target_stats and waited for after the other launches (numba_ce.host_read), so the GPU does
not idle while the host waits; a bad target gives its row NaN meanwhile, in outputs the caller
never sees. In place, the wait comes before the row kernel, which would overwrite the caller's
logits.
"""
from typing import Any, NamedTuple

import numpy as np

from . import device_properties, host_read, launcher
from .buffers import RowOutputs
from .devices import data_pointer
from .options import Options
from .planning import (RowInputs, plan_reduce, plan_reduce_accuracy, plan_round, plan_rows,
                       plan_scale, plan_target_stats)
from .validation import target_out_of_range


class Executor:
    """Launches plans and starts device reads. Tests pass a subclass that records them."""

    def launch(self, plan):
        launcher.launch(plan.kernel, plan.grid, plan.block, *plan.arguments, shared=plan.shared)

    def start_read(self, array):
        return host_read.start_read(array)


EXECUTOR = Executor()


class RowCall(NamedTuple):
    """One call of the row kernels: its inputs, options, the gradient buffer (None for the loss
    only; the logits themselves in place) and the outputs to fill."""
    inputs: RowInputs
    options: Options
    grad: Any
    outputs: RowOutputs
    validate: bool


def run(call, alloc, device=None, executor=EXECUTOR):
    """Fill ``call.outputs`` and ``call.grad``; ``alloc.empty`` makes the small work arrays.
    A batch of no rows gets the reduced outputs PyTorch gives: "sum" 0, "mean" 0 / 0 = NaN."""
    inputs, options = call.inputs, call.options
    n_rows, n_classes = inputs.logits.shape
    if n_rows == 0:
        fill_no_rows(options, call.outputs)
        return
    device = device or device_properties.current()
    stats, bad_row = target_statistics(alloc, inputs.target, inputs.weight, options, n_classes,
                                       device, executor)
    # (class probabilities have no index to check: no read, no synchronisation)
    checked = call.validate and not inputs.probabilities
    first_bad = executor.start_read(bad_row) if checked else None
    in_place = call.grad is not None and data_pointer(call.grad) == data_pointer(inputs.logits)
    if first_bad is not None and in_place:
        check_targets(first_bad, inputs.target, n_classes, options.ignore_index, executor)
        first_bad = None
    executor.launch(plan_rows(inputs, options, stats, call.grad, call.outputs, device))
    reduce(call.outputs, stats, options, device, executor)
    if first_bad is not None:
        check_targets(first_bad, inputs.target, n_classes, options.ignore_index, executor)


def reduce(outputs, stats, options, device, executor=EXECUTOR):
    """The reduced loss, z part and (if asked) token accuracy of the row outputs, for "sum" and
    "mean"."""
    if options.reduced:
        executor.launch(plan_reduce(outputs, stats, options, device))
        if options.return_token_accuracy:
            executor.launch(plan_reduce_accuracy(outputs, stats, options, device))


def target_statistics(alloc, target, weight, options, n_classes, device, executor=EXECUTOR):
    """(stats, bad_row): the reduction denominators of a batch (kernels.target_stats) as a
    float32 device array (3,), and the first row whose target is out of range (N if none) as an
    int64 device array (1,), for :func:`check_targets`. A batch processed in chunks of rows
    (numba_ce.linear) computes them once, so every chunk's gradient has the batch's scale."""
    stats = alloc.empty(3, np.float32)
    bad_row = alloc.empty(1, np.int64)
    executor.launch(plan_target_stats(target, weight, options, n_classes, stats, bad_row,
                                      device))
    return stats, bad_row


def check_targets(first_bad, target, n_classes, ignore_index, executor=EXECUTOR):
    """Raise ValueError naming the first row whose target is neither in [0, V) nor ignore_index;
    ``first_bad`` is the started read of target_statistics' bad_row."""
    row = int(first_bad.result()[0])
    if row < target.shape[0]:
        value = int(executor.start_read(target[row:row + 1]).result()[0])
        raise target_out_of_range(row, value, n_classes, ignore_index)


def fill_no_rows(options, outputs):
    """The reduced outputs of a batch of no rows, as PyTorch gives them: "sum" is 0 and "mean"
    is 0 / 0 = NaN."""
    if options.reduced:
        for out in (outputs.loss, outputs.z_loss, outputs.token_accuracy):
            if out is not None:
                out.fill(np.nan if options.reduction == "mean" else 0.0)


def scale_rows(grad, fmt, grad_output, per_row, device=None):
    """Multiply ``grad`` (N, V) of format ``fmt`` in place by ``grad_output``: a float32 array of
    shape (1,), or (N,) with ``per_row``. Launches on the current stream; never synchronises."""
    if grad.shape[0]:
        EXECUTOR.launch(plan_scale(grad, fmt, grad_output, per_row,
                                   device or device_properties.current()))


def round_into(source, scale, out, fmt, device=None):
    """out[...] = source * scale[0] rounded to ``fmt`` ('float16' or 'bfloat16'); ``source`` and
    ``out`` contiguous, same shape. Launches on the current stream."""
    if source.size:
        EXECUTOR.launch(plan_round(source, scale, out, fmt,
                                   device or device_properties.current()))
