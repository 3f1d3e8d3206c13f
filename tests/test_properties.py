"""Property-based tests: random small shapes, dtypes, options and targets (valid, ignored and out of
range) against the float64 reference. Few examples: a simulator call costs about 0.3 s."""
import os
import re

import hypothesis
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import numba_ce
from numba_ce import reference
from helpers import DTYPES, TOLERANCES, assert_close, loss_tolerance, to_numpy

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The run's seed (tests/conftest.py exports it), so NUMBA_CE_TEST_SEED replays these examples too.
RUN_SEED = hypothesis.seed(int(os.environ["NUMBA_CE_TEST_SEED"]))


@st.composite
def calls(draw):
    """The arguments of one call, and which entry point to use."""
    n_rows = draw(st.integers(0, 5))
    n_classes = draw(st.integers(1, 70))
    ignore_index = draw(st.sampled_from([-100, -1]) | st.integers(0, n_classes - 1))
    # each row's target: a class, ignore_index, or out of range (not ignore_index)
    out_of_range = st.sampled_from([n_classes, n_classes + 7, -2**40, 2**40, -1, -100]).filter(
        lambda t: t != ignore_index)
    row_target = st.one_of(st.integers(0, n_classes - 1), st.just(ignore_index), out_of_range)
    targets = draw(st.lists(row_target, min_size=n_rows, max_size=n_rows))
    target_dtype = draw(st.sampled_from([np.int64, np.int32]))
    if target_dtype is np.int32:
        targets = [t if -2**31 <= t < 2**31 else n_classes for t in targets]
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    with_grad = draw(st.booleans())
    upstream = None
    if with_grad:
        kinds = ["none", "scalar", "rows"] if reduction == "none" else ["none", "scalar"]
        upstream = draw(st.sampled_from(kinds))
    return dict(
        n_rows=n_rows, n_classes=n_classes, dtype=draw(st.sampled_from(list(DTYPES))),
        scale=draw(st.sampled_from([0.1, 3.0, 30.0])), seed=draw(st.integers(0, 2**32 - 1)),
        target=np.array(targets, dtype=target_dtype), weighted=draw(st.booleans()),
        options=dict(
            ignore_index=ignore_index, reduction=reduction,
            label_smoothing=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
            z_loss=draw(st.sampled_from([0.0, 1e-4, 1e-2])),
            softcap=draw(st.none() | st.floats(0.5, 50.0)),
            validate=draw(st.booleans())),
        with_grad=with_grad, upstream=upstream, inplace=with_grad and draw(st.booleans()))


def term_scale(target, n_classes, options, lse):
    """The size of the terms whose sum is a gradient element, P * p_j - Q * w_j - T * [j == y]:
    the upstream gradient over the reduction's denominator (times 1 + 2 z |lse| with z-loss).
    Their fp32 rounding is relative to this, not to the result (V = 1 gives 0 = P - Q - T)."""
    upstream = np.abs(np.asarray(options.get("grad_output", 1.0))).max(initial=0.0)
    if options["reduction"] == "mean":
        valid = (target != options["ignore_index"]) & (target >= 0) & (target < n_classes)
        weight = options.get("weight", np.ones(n_classes))
        denominator = min(weight[target[valid]].sum(), valid.sum())
        upstream = upstream / denominator if denominator > 0 else 0.0
    return upstream * (1 + 2 * options["z_loss"] * np.nanmax(np.abs(lse), initial=0.0)) + 1e-30


@RUN_SEED
@SETTINGS
@given(calls())
def test_matches_the_reference(call):
    rng = np.random.default_rng(call["seed"])
    n_rows, n_classes, dtype = call["n_rows"], call["n_classes"], call["dtype"]
    logits = (rng.standard_normal((n_rows, n_classes)) * call["scale"]).astype(DTYPES[dtype])
    target = call["target"]
    options = dict(call["options"])
    if call["weighted"]:
        options["weight"] = (rng.random(n_classes) + 0.5).astype(np.float32)
    if call["upstream"] == "scalar":
        options["grad_output"] = float(rng.standard_normal())
    elif call["upstream"] == "rows":
        options["grad_output"] = rng.standard_normal(n_rows).astype(np.float32)
    original = logits.copy()
    target_before = target.copy()

    try:
        expected = reference.cross_entropy_with_grad(logits, target, **options)
    except ValueError as error:  # a checked call with a target outside [0, V)
        entry = numba_ce.cross_entropy_with_grad if call["with_grad"] else numba_ce.cross_entropy
        if not call["with_grad"]:
            options.pop("grad_output", None)
        with pytest.raises(ValueError, match=f"^{re.escape(str(error))}$"):
            entry(logits, target, **options, **({"inplace": True} if call["inplace"] else {}))
        assert (logits.view(np.uint8) == original.view(np.uint8)).all(), "a refused call wrote"
        return

    tol = dict(TOLERANCES[dtype], loss=loss_tolerance(dtype, options["softcap"]))
    ignored = target == options["ignore_index"]
    if call["with_grad"]:
        res = numba_ce.cross_entropy_with_grad(logits, target, inplace=call["inplace"], **options)
        loss, lse = res.loss, res.lse
        grad = to_numpy(res.grad)
        assert grad.shape == logits.shape and grad.dtype == logits.dtype
        if call["inplace"]:
            assert res.grad is logits
        else:
            assert (logits.view(np.uint8) == original.view(np.uint8)).all(), "logits modified"
        scale = max(np.nanmax(np.abs(expected.grad), initial=0.0),
                    term_scale(target, n_classes, options, expected.lse))
        assert_close(grad, expected.grad, tol["grad"][0], tol["grad"][1] * scale, "grad")
        assert not grad[ignored].astype(np.float32).any(), "ignored rows have a zero gradient"
        assert_close(lse, expected.lse, *tol["loss"], "lse")
        assert_close(res.z_loss, expected.z_loss, *tol["loss"], "z_loss")
    else:
        options.pop("grad_output", None)
        loss = numba_ce.cross_entropy(logits, target, **options)
        assert (logits.view(np.uint8) == original.view(np.uint8)).all(), "logits modified"
    loss = to_numpy(loss)
    assert loss.dtype == np.float32
    assert loss.shape == (() if options["reduction"] != "none" else (n_rows,))
    assert_close(loss, expected.loss, *tol["loss"], "loss")
    assert (target == target_before).all() and target.dtype == target_before.dtype


@RUN_SEED
@SETTINGS
@given(n_rows=st.integers(1, 4), n_classes=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       ignore_index=st.sampled_from([-100, 0, 3]))
@example(n_rows=1, n_classes=3, seed=2, ignore_index=3)  # V == ignore_index (found on the H200)
def test_reported_row_is_the_first_bad_one(n_rows, n_classes, seed, ignore_index):
    """Whatever the rows, a checked call names the first row that is neither a class nor
    ignore_index, with its value."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n_rows, n_classes)).astype(np.float32)
    target = rng.integers(-3, n_classes + 3, n_rows)
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if not bad.any():  # make the last row bad: V itself, or V + 1 when V is ignore_index
        target[-1] = n_classes + (n_classes == ignore_index)
        bad[-1] = True
    row = int(np.argmax(bad))
    message = (f"target[{row}] = {target[row]} is outside [0, {n_classes}) and is not "
               f"ignore_index ({ignore_index}); pass validate=False to skip this check (such rows "
               "then give NaN)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        numba_ce.cross_entropy(logits, target, ignore_index=ignore_index)
