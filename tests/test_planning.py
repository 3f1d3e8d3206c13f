"""Launch planning is a pure function of the call and a device's properties: the plans' named
arguments match each kernel's parameters, and plans follow the device they are made for. Runs
without a GPU (the kernels' Python signatures are those the GPU compiles)."""
import inspect

import numpy as np
import pytest

from numba_ce import (buffers, device_properties, kernels, planning, rounding, scale_kernel,
                      slice_gradient, slice_states)
from numba_ce.options import Options
from numba_ce.planning import RowInputs

ARGUMENTS = [
    (kernels.target_stats, planning.StatsArguments),
    (kernels.probability_stats, planning.ProbabilityStatsArguments),
    (kernels.reduce_rows, planning.ReduceArguments),
    (kernels.row_kernel("bfloat16", 4, True), planning.RowArguments),
    (kernels.row_kernel("float32", 1, False, True, kernels.WEIGHTED_SMOOTHING),
     planning.RowArguments),
    (kernels.row_kernel("float16", 4, True, False, kernels.SMOOTHING, True,
                        kernels.WEIGHTED_PROBABILITIES), planning.RowArguments),
    (slice_gradient.slice_gradient_kernel("bfloat16", 4), planning.SliceArguments),
    (slice_gradient.slice_gradient_kernel("float32", 1, True, kernels.WEIGHTED_SMOOTHING),
     planning.SliceArguments),
    (slice_states.slice_states_kernel("bfloat16", 4), planning.StatesArguments),
    (slice_states.slice_states_kernel("float32", 1, True, kernels.WEIGHTED_SMOOTHING),
     planning.StatesArguments),
    (scale_kernel.scale_kernel("float16", 4), planning.ScaleArguments),
    (rounding.round_kernel("bfloat16"), planning.RoundArguments),
]


@pytest.mark.parametrize("kernel,arguments", ARGUMENTS)
def test_plan_arguments_are_the_kernel_parameters_in_order(kernel, arguments):
    assert tuple(inspect.signature(kernel.py_func).parameters) == arguments._fields


def row_call(n_rows, n_classes, dtype=np.float32, with_grad=True, options=Options()):
    """Stand-in arrays of a call (rows aliasing one: planning reads only shapes and layouts)."""
    logits = np.broadcast_to(np.zeros(n_classes, dtype), (n_rows, n_classes))
    inputs = RowInputs(logits, np.dtype(dtype).name, np.zeros(n_rows, np.int64), None,
                       np.ones(1, np.float32))
    outputs = buffers.allocate(np, n_rows, options)
    return inputs, options, np.zeros(3, np.float32), logits if with_grad else None, outputs


@pytest.mark.parametrize("multiprocessors", [132, 78])
def test_cached_plans_follow_the_devices_multiprocessors(multiprocessors):
    """Resident blocks: two a multiprocessor where the rows' uncached words fit in L2."""
    device = device_properties.SM90._replace(multiprocessors=multiprocessors)
    plan = planning.plan_rows(*row_call(8192, 32000, np.float16), device)
    assert (plan.grid, plan.block) == (2 * multiprocessors, 512)
    assert plan.shared == 64000  # the whole row is cached
    plan = planning.plan_rows(*row_call(8192, 256000, np.float16), device)
    assert (plan.grid, plan.block) == (multiprocessors, 1024)  # 2 x 132 x 397 KB > 50 MiB
    assert plan.shared == 232448 - 256


def test_loss_only_plans_give_each_row_a_block_of_threads_for_its_length():
    plan = planning.plan_rows(*row_call(5000, 128256, with_grad=False), device_properties.SM90)
    assert (plan.grid, plan.block, plan.shared) == (5000, 256, 0)
    plan = planning.plan_rows(*row_call(3, 100, with_grad=False), device_properties.SM90)
    assert (plan.grid, plan.block) == (3, 32)


def test_the_simulated_device_plans_a_few_blocks_of_one_warp():
    plan = planning.plan_rows(*row_call(50, 4096), device_properties.SIMULATED)
    assert (plan.grid, plan.block, plan.shared) == (2, 32, 1024)


def test_row_arguments_carry_the_options_by_name():
    options = Options(ignore_index=7, reduction="sum", label_smoothing=0.25, z_loss=1e-3,
                      softcap=30.0)
    plan = planning.plan_rows(*row_call(4, 64, options=options), device_properties.SM90)
    arguments = plan.arguments
    assert (arguments.ignore_index, arguments.n_classes) == (7, 64)
    assert arguments.one_minus_eps == np.float32(0.75)
    assert arguments.eps_over_v == np.float32(0.25 / 64)
    assert (arguments.z_loss, arguments.softcap) == (np.float32(1e-3), np.float32(30.0))
    assert arguments.reduction == kernels.SUM and arguments.go_per_row == 0


def test_probability_targets_pick_their_kernels_and_stats():
    """Class probabilities (N, V) of the logits' format: the spec's targets (weighted where
    there are class weights), the target read in words as the logits, probability_stats."""
    n_rows, n_classes = 4, 64
    inputs, options, stats, grad, outputs = row_call(n_rows, n_classes, np.float16)
    target = np.zeros((n_rows, n_classes), np.float16)
    for weight, targets in [(None, kernels.PROBABILITIES),
                            (np.ones(n_classes, np.float32), kernels.WEIGHTED_PROBABILITIES)]:
        call = inputs._replace(target=target, weight=weight)
        assert call.probabilities
        plan = planning.plan_rows(call, options, stats, grad, outputs, device_properties.SM90)
        assert plan.kernel is kernels.row_kernel("float16", 4, True, False, kernels.NO_SMOOTHING,
                                                 False, targets)
        assert plan.arguments.target.shape == (n_rows, n_classes // 4)
        assert plan.arguments.target.dtype == np.int64
    plan = planning.plan_target_stats(target, None, options, n_classes, stats,
                                      np.zeros(1, np.int64), device_properties.SM90)
    assert plan.kernel is kernels.probability_stats and plan.arguments.n_rows == n_rows
