"""The slice gradient kernel alone (numba_ce.slice_gradient): the gradient of a slice of the
classes from each row's lse given, against torch's float64 gradient of the whole row (the
slice's columns of it), for slices at several offsets (targets inside and outside them, words
packed or not), ignored rows, out-of-range targets, class weights, label smoothing, softcap,
z-loss, every reduction and upstream gradients."""
import numpy as np
import pytest

from numba_ce import device_properties, devices, execution
from numba_ce.options import Options
from numba_ce.planning import RowInputs, plan_slice_gradient
from helpers import (DTYPES, TOLERANCES, assert_close, random_logits, random_target,
                     random_upstream, random_weight, torch_loss_and_grad)

N_ROWS, N_CLASSES, IGNORE = 7, 40, -100
# (offset, width): packed words where the width fills them (8 for fp16/bf16, 4 for float32:
# 2 a word), one element a word elsewhere; the last runs to V
SLICES = [(0, 12), (12, 8), (20, 17), (37, 3)]
CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", weighted=True, label_smoothing=0.1, ignored=0.3, upstream="given"),
    dict(reduction="mean", softcap=5.0, z_loss=1e-3, ignored=0.3, weighted=True),
    dict(reduction="none", label_smoothing=0.2, softcap=3.0, z_loss=1e-2, upstream="given"),
]


def statistics(target, weight, n_classes):
    """kernels.target_stats' values, from NumPy: the sum of w_y and the count of the counted
    rows, and S_w."""
    counted = (target >= 0) & (target < n_classes)
    w = np.ones(n_classes) if weight is None else weight.astype(np.float64)
    return np.array([w[target[counted]].sum(), counted.sum(), w.sum()], np.float32)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_slices_match_the_rows_gradient(rng, dtype, case):
    options = dict(CASES[case])
    weighted, ignored = options.pop("weighted", False), options.pop("ignored", 0.0)
    upstream = options.pop("upstream", "ones")
    logits = random_logits(rng, N_ROWS, N_CLASSES, dtype)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, ignored)
    target[rng.integers(N_ROWS)] = N_CLASSES + 3  # out of range: NaN, counted nowhere
    weight = random_weight(rng, N_CLASSES, weighted)
    grad_output = random_upstream(rng, N_ROWS, options["reduction"], upstream)

    bad = (target >= N_CLASSES) | (target < 0) & (target != IGNORE)
    reference_target = np.where(bad, IGNORE, target)  # the same statistics, a row of zeros
    _, expected = torch_loss_and_grad(logits, reference_target, weight=weight,
                                      ignore_index=IGNORE, grad_output=grad_output, **options)
    expected[bad] = np.nan
    x = logits.astype(np.float64)
    if options.get("softcap"):
        x = options["softcap"] * np.tanh(x / options["softcap"])
    top = x.max(axis=1, keepdims=True)
    row_lse = (top[:, 0] + np.log(np.exp(x - top).sum(axis=1))).astype(np.float32)

    # the kernel reads device memory: CuPy arrays on a GPU, NumPy's in the simulator
    xp = devices.cupy if devices.gpu_available() else np
    stats = xp.asarray(statistics(target, weight, N_CLASSES))
    upstream_array = xp.asarray(np.atleast_1d(np.float32(1.0 if grad_output is None
                                                         else grad_output)))
    rtol, atol = TOLERANCES[dtype]["grad"]
    for offset, width in SLICES:
        part = xp.array(logits[:, offset:offset + width])  # a copy: the kernel writes in place
        inputs = RowInputs(part, dtype, xp.asarray(target),
                           None if weight is None else xp.asarray(weight), upstream_array)
        plan = plan_slice_gradient(inputs, offset, N_CLASSES, Options(ignore_index=IGNORE,
                                                                      **options),
                                   stats, xp.asarray(row_lse), device_properties.current())
        execution.EXECUTOR.launch(plan)
        want = expected[:, offset:offset + width]
        assert_close(part, want, rtol, atol * np.nanmax(np.abs(expected)),
                     f"slice [{offset}, {offset + width})")
    holds_target = [(target >= o) & (target < o + w) for o, w in SLICES]
    assert sum(h.astype(int) for h in holds_target).max() == 1  # each target in one slice
    assert all(not h.all() for h in holds_target)  # each slice has rows whose target is not in it


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_and_single_element_words(dtype):
    """The plans of the slices above read 8-byte words where the width fills them."""
    logits = np.zeros((N_ROWS, N_CLASSES), DTYPES[dtype])
    pack = 8 // DTYPES[dtype].itemsize
    for offset, width in SLICES:
        inputs = RowInputs(logits[:, offset:offset + width].copy(), dtype,
                           np.zeros(N_ROWS, np.int64), None, np.ones(1, np.float32))
        plan = plan_slice_gradient(inputs, offset, N_CLASSES, Options(), np.ones(3, np.float32),
                                   np.zeros(N_ROWS, np.float32), device_properties.current())
        words = plan.arguments.logits.shape[1]
        assert words == (width // pack if width % pack == 0 else width), (offset, width)
