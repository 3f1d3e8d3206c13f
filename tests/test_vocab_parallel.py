"""The vocabulary-parallel building blocks on NumPy arrays (numba_ce.vocab_parallel,
numba_ce.vocab_parallel_linear, numba_ce.softmax_states): slices of a row's classes, each read
for its partial softmax state, the states merged in any order, then each slice's gradient and the
loss, against the float64 reference on the whole row and the single-call kernels; the merge's
order and grouping; Megatron-LM's label smoothing; the errors. (The torch.distributed adapter:
tests/test_torch_vocab_parallel.py.)"""
import itertools
import re

import numpy as np
import pytest

import numba_ce
from numba_ce import reference, softmax_states
from numba_ce.vocab_parallel import (merge_softmax_states, slice_cross_entropy_with_grad,
                                     softmax_state)
from numba_ce.vocab_parallel_linear import (linear_slice_cross_entropy_with_grad,
                                            linear_softmax_state)
from helpers import (DTYPES, TOLERANCES, assert_close, assert_rounded_close, random_logits,
                     random_target, random_upstream, random_weight, torch_linear_loss_and_grads)

N_ROWS, N_CLASSES, IGNORE = 6, 37, -100
# Uneven slices, of one element a word (13, 9, 7) and of packed words (8, 12 for 16-bit, 4, 8
# for float32); the 1-wide slice holds a single class
BOUNDS = [[0, 37], [0, 13, 21, 33, 36, 37], [0, 8, 20, 37], [0, 16, 24, 28, 37]]
CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", weighted=True, label_smoothing=0.1, ignored=0.3, upstream="given"),
    dict(reduction="mean", softcap=5.0, z_loss=1e-3, ignored=0.3, weighted=True),
    dict(reduction="none", label_smoothing=0.2, softcap=3.0, z_loss=1e-2, upstream="given",
         inplace=True),
]


def split(array, bounds, axis=-1):
    """The slices [bounds[k], bounds[k + 1]) of ``array`` along ``axis``, each a copy."""
    return [np.take(array, np.arange(a, b), axis=axis) for a, b in zip(bounds[:-1], bounds[1:])]


def merged_state(rng, logits, target, bounds, weight=None, **options):
    """Every slice's state, stacked in a random order, merged."""
    weights = [None] * (len(bounds) - 1) if weight is None else split(weight, bounds)
    states = [softmax_state(part, target, vocab_start=start, weight=w, ignore_index=IGNORE,
                            **options)
              for part, start, w in zip(split(logits, bounds), bounds, weights)]
    return merge_softmax_states(np.stack(rng.permutation(states)))


@pytest.mark.parametrize("bounds", range(len(BOUNDS)))
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_slices_give_the_whole_rows_loss_and_gradient(rng, dtype, case, bounds):
    options = dict(CASES[case])
    weighted, ignored = options.pop("weighted", False), options.pop("ignored", 0.0)
    upstream, inplace = options.pop("upstream", "ones"), options.pop("inplace", False)
    bounds = BOUNDS[bounds]
    logits = random_logits(rng, N_ROWS, N_CLASSES, dtype)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, ignored)
    weight = random_weight(rng, N_CLASSES, weighted)
    grad_output = random_upstream(rng, N_ROWS, options["reduction"], upstream)
    state_options = {k: options[k] for k in ("label_smoothing", "softcap") if k in options}
    merged = merged_state(rng, logits, target, bounds, weight, **state_options)

    results, grads = [], []
    weights = [None] * (len(bounds) - 1) if weight is None else split(weight, bounds)
    for part, start, w in zip(split(logits, bounds), bounds, weights):
        res = slice_cross_entropy_with_grad(part, target, merged, vocab_start=start, weight=w,
                                            ignore_index=IGNORE, grad_output=grad_output,
                                            inplace=inplace, **options)
        assert (res.grad is part) == inplace and res.grad.dtype == part.dtype
        results.append(res)
        grads.append(res.grad)
    first = results[0]
    for res in results[1:]:  # every slice computes the same loss from the same merged state
        for name in ("loss", "z_loss", "lse"):
            assert np.array_equal(getattr(res, name), getattr(first, name), equal_nan=True)

    expected = reference.cross_entropy_with_grad(logits, target, weight=weight,
                                                 ignore_index=IGNORE, grad_output=grad_output,
                                                 **options)
    single = numba_ce.cross_entropy_with_grad(logits, target, weight=weight, ignore_index=IGNORE,
                                              grad_output=grad_output, **options)
    loss_tol, (grad_rtol, grad_atol) = TOLERANCES[dtype]["loss"], TOLERANCES[dtype]["grad"]
    for name in ("loss", "z_loss", "lse"):
        assert_close(getattr(first, name), getattr(expected, name), *loss_tol, f"{name} vs ref")
        assert_close(getattr(first, name), getattr(single, name), *loss_tol, f"{name} vs single")
    grad = np.concatenate(grads, axis=1)
    scale = np.abs(expected.grad).max()
    assert_close(grad, expected.grad, grad_rtol, grad_atol * scale, "grad vs reference")
    assert_close(grad, single.grad.astype(np.float64), grad_rtol, grad_atol * scale,
                 "grad vs single call")


def test_a_weighted_mean_keeps_its_ce_part_beside_a_larger_z_part(rng):
    """As the single call's test (test_cross_entropy): class weights of ~1e-6 with z-loss, the
    merged rows' "mean" loss as the reference's, not a CE part lost to the z part's ulps."""
    logits = random_logits(rng, N_ROWS, N_CLASSES, "float32")
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE)
    weight = random_weight(rng, N_CLASSES, True) * np.float32(1e-6)
    bounds = BOUNDS[2]
    merged = merged_state(rng, logits, target, bounds, weight)
    res = slice_cross_entropy_with_grad(split(logits, bounds)[0], target, merged, vocab_start=0,
                                        weight=split(weight, bounds)[0], ignore_index=IGNORE,
                                        z_loss=1e-2)
    expected = reference.cross_entropy_with_grad(logits, target, weight=weight,
                                                 ignore_index=IGNORE, z_loss=1e-2)
    assert_close(res.loss, expected.loss, 2e-6, 0.0, "loss")


def test_a_row_of_inf_nan_and_minus_inf_logits_as_the_single_call(rng):
    """NaN and +inf poison their row, -inf columns have probability 0, a row of -inf is NaN,
    whichever slices hold them."""
    logits = random_logits(rng, N_ROWS, N_CLASSES)
    logits[0, 30] = np.nan
    logits[1, 3] = np.inf
    logits[2, :20] = -np.inf
    logits[3] = -np.inf
    target = np.array([1, 2, 25, 4, 5, 6])
    merged = merged_state(rng, logits, target, BOUNDS[1])
    grads = [slice_cross_entropy_with_grad(part, target, merged, vocab_start=start,
                                           reduction="none").grad
             for part, start in zip(split(logits, BOUNDS[1]), BOUNDS[1])]
    res = slice_cross_entropy_with_grad(logits[:, :13], target, merged, vocab_start=0,
                                        reduction="none")
    single = numba_ce.cross_entropy_with_grad(logits, target, reduction="none")
    for name in ("loss", "z_loss", "lse"):
        assert_close(getattr(res, name), getattr(single, name), 2e-5, 1e-6, name)
    assert_close(np.concatenate(grads, axis=1), single.grad, 2e-5, 1e-6, "grad")


def test_any_order_of_the_states_merges_to_the_same_bits(rng):
    logits = random_logits(rng, N_ROWS, N_CLASSES, scale=8.0)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, 0.3)
    weight = random_weight(rng, N_CLASSES, True)
    bounds = BOUNDS[1]
    states = np.stack([softmax_state(part, target, vocab_start=start, weight=w,
                                     label_smoothing=0.1, softcap=20.0)
                       for part, start, w in zip(split(logits, bounds), bounds,
                                                 split(weight, bounds))])
    first = merge_softmax_states(states)
    for order in itertools.islice(itertools.permutations(range(len(states))), 1, None, 7):
        assert merge_softmax_states(states[list(order)]).tobytes() == first.tobytes(), order


def test_merging_in_groups_agrees_to_float32_rounding(rng):
    """((a b) (c d e)) and (a (b (c (d e)))) against all at once: the max, the target's logit
    and weight and the slices' bounds to the bit; the sums within a few float32 ulps of their
    terms' magnitudes."""
    logits = random_logits(rng, N_ROWS, N_CLASSES, scale=8.0)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, 0.3)
    bounds = BOUNDS[1]
    states = [softmax_state(part, target, vocab_start=start, label_smoothing=0.1)
              for part, start in zip(split(logits, bounds), bounds)]
    flat = softmax_states.unpack(merge_softmax_states(np.stack(states)))

    def merged(group):
        return merge_softmax_states(np.stack([merged(g) if isinstance(g, list) else states[g]
                                              for g in group]))

    exact = ("row_max", "target_logit", "target_weight", "start", "size")
    for grouping in ([[0, 1], [2, 3, 4]], [0, [1, [2, [3, 4]]]]):
        grouped = softmax_states.unpack(merged(grouping))
        for name in exact:
            assert getattr(grouped, name).tobytes() == getattr(flat, name).tobytes(), name
        assert_close(grouped.row_sum, flat.row_sum, 4 * 2.0**-24, 0.0, "sum of exps")
        magnitude = np.abs(logits.astype(np.float64)).sum(axis=1)
        assert_close(grouped.weighted_sum, flat.weighted_sum, 0.0, 4 * 2.0**-24 * magnitude,
                     "sum of logits")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_megatron_label_smoothing_spreads_eps_over_the_other_classes(rng, reduction):
    """Megatron-LM's formula on the whole vocabulary, in float64: with s = eps V / (V - 1),
    (1 - s) (-log p_y) - s mean_j log p_j (the target keeps 1 - eps of the mass)."""
    eps = 0.1
    logits = random_logits(rng, N_ROWS, N_CLASSES)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, 0.3)
    merged = merged_state(rng, logits, target, BOUNDS[2], label_smoothing=eps)
    results = [slice_cross_entropy_with_grad(part, target, merged, vocab_start=start,
                                             label_smoothing=eps, reduction=reduction,
                                             label_smoothing_style="megatron")
               for part, start in zip(split(logits, BOUNDS[2]), BOUNDS[2])]

    x = logits.astype(np.float64)
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    counted = target != IGNORE
    label = np.where(counted, target, 0)
    smoothing = eps * N_CLASSES / (N_CLASSES - 1)
    rows = (1 - smoothing) * -log_p[np.arange(N_ROWS), label] - smoothing * log_p.mean(axis=1)
    rows = np.where(counted, rows, 0.0)
    expected = rows if reduction == "none" else rows.sum() / counted.sum()
    assert_close(results[0].loss, expected, 2e-5, 1e-6, "megatron loss")
    onehot = np.eye(N_CLASSES)[label]
    scale = counted[:, None] / (counted.sum() if reduction == "mean" else 1)
    grad = (np.exp(log_p) - (1 - smoothing) * onehot - smoothing / N_CLASSES) * scale
    # the target's p_y - (1 - s) cancels: float32 errors of its terms' size, not the result's
    terms = (np.exp(log_p) + (1 - smoothing) * onehot + smoothing / N_CLASSES) * scale
    assert_close(np.concatenate([r.grad for r in results], axis=1), grad, 2e-5,
                 1e-7 + 1e-5 * terms, "megatron grad")


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_slices_give_the_unfused_heads_loss_and_gradients(rng, dtype, case):
    """Each slice's head: the loss of the unfused float64 computation, the slice's rows of the
    weight and bias gradients, and a share of the input gradient whose sum is the whole."""
    options = [dict(reduction="mean"),
               dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3, weighted=True),
               dict(reduction="none", softcap=5.0, upstream="given")][case]
    weighted, upstream = options.pop("weighted", False), options.pop("upstream", "ones")
    n_features = 8
    dt = DTYPES[dtype]
    x = (rng.standard_normal((N_ROWS, n_features))).astype(dt)
    head = (rng.standard_normal((N_CLASSES, n_features)) / 2).astype(dt)
    bias = rng.standard_normal(N_CLASSES).astype(dt)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, 0.2)
    weight = random_weight(rng, N_CLASSES, weighted)
    grad_output = random_upstream(rng, N_ROWS, options["reduction"], upstream)
    bounds = BOUNDS[3]
    weights = [None] * (len(bounds) - 1) if weight is None else split(weight, bounds)
    parts = list(zip(split(head, bounds, 0), split(bias, bounds), bounds, weights))
    state_options = {k: options[k] for k in ("label_smoothing", "softcap") if k in options}
    states = [linear_softmax_state(x, w_s, target, vocab_start=start, linear_bias=b_s,
                                   weight=cw, chunk_size=4, **state_options)
              for w_s, b_s, start, cw in parts]
    merged = merge_softmax_states(np.stack(states[::-1]))
    results = [linear_slice_cross_entropy_with_grad(x, w_s, target, merged, vocab_start=start,
                                                    linear_bias=b_s, weight=cw, chunk_size=4,
                                                    grad_output=grad_output, **options)
               for w_s, b_s, start, cw in parts]
    expected = torch_linear_loss_and_grads(x, head, target, linear_bias=bias, weight=weight,
                                           grad_output=grad_output, logits_format=dtype,
                                           ignore_index=IGNORE, **options)
    assert_close(results[0].loss, expected.loss, 1e-5, 1e-6, "loss")
    shares = sum(r.grad_input.astype(np.float64) for r in results)
    # each share is rounded once: the sum carries a rounding a slice
    assert_rounded_close(shares, expected.grad_input, expected.magnitudes[0], dtype,
                         "grad_input", roundings=len(results))
    for name, want, magnitude in (("grad_linear_weight", expected.grad_linear_weight,
                                   expected.magnitudes[1]),
                                  ("grad_linear_bias", expected.grad_linear_bias,
                                   expected.magnitudes[2])):
        got = np.concatenate([getattr(r, name) for r in results])
        assert_rounded_close(got, want, magnitude, dtype, name)


def test_slices_that_do_not_tile_the_vocabulary_are_refused(rng):
    logits = random_logits(rng, N_ROWS, N_CLASSES)
    target = random_target(rng, N_ROWS, N_CLASSES)
    a = softmax_state(logits[:, :10], target, vocab_start=0)
    gap = softmax_state(logits[:, 12:20], target, vocab_start=12)
    overlap = softmax_state(logits[:, 8:20], target, vocab_start=8)
    for states, got in (((a, gap), "[0, 10), [12, 20)"), ((overlap, a), "[0, 10), [8, 20)")):
        with pytest.raises(ValueError, match=re.escape(
                "the slices of the states must tile a range of classes without gaps or "
                f"overlaps (got {got})")):
            merge_softmax_states(np.stack(states))
    tail = softmax_state(logits[:, 10:], target, vocab_start=10)
    part = merge_softmax_states(np.stack([tail]))
    with pytest.raises(ValueError, match=re.escape(
            "merged_state must cover the whole vocabulary, classes [0, V) (got classes "
            "[10, 37): merge every slice's state)")):
        slice_cross_entropy_with_grad(logits[:, 10:], target, part, vocab_start=10)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_slices_without_weights_beside_weighted_ones_weigh_their_classes_1(rng, reduction,
                                                                           smoothing):
    """Class weights on some slices and None on others: the None slices' classes weigh 1, in
    the loss and in every slice's gradient (each row's w_y comes from the merged state, also on
    a slice without weights)."""
    logits = random_logits(rng, N_ROWS, N_CLASSES)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, 0.2)
    bounds = BOUNDS[2]
    weight = random_weight(rng, N_CLASSES, True)
    weight[bounds[1]:bounds[2]] = 1.0  # the middle slice passes None
    weights = [w if k != 1 else None for k, w in enumerate(split(weight, bounds))]
    parts = split(logits, bounds)
    states = [softmax_state(part, target, vocab_start=start, weight=w, ignore_index=IGNORE,
                            label_smoothing=smoothing)
              for part, start, w in zip(parts, bounds, weights)]
    merged = merge_softmax_states(np.stack(states))
    results = [slice_cross_entropy_with_grad(part, target, merged, vocab_start=start, weight=w,
                                             ignore_index=IGNORE, reduction=reduction,
                                             label_smoothing=smoothing)
               for part, start, w in zip(parts, bounds, weights)]
    expected = reference.cross_entropy_with_grad(logits, target, weight=weight,
                                                 ignore_index=IGNORE, reduction=reduction,
                                                 label_smoothing=smoothing)
    assert_close(results[1].loss, expected.loss, 2e-6, 1e-6, "loss")
    grad = np.concatenate([res.grad for res in results], axis=1)
    assert_close(grad, expected.grad, 2e-5, 1e-6 * np.abs(expected.grad).max(), "grad")


def test_a_slice_outside_the_merged_vocabulary_is_refused(rng):
    logits = random_logits(rng, N_ROWS, 10)
    target = random_target(rng, N_ROWS, 10)
    merged = merge_softmax_states(softmax_state(logits, target, vocab_start=0)[None])
    with pytest.raises(ValueError, match=re.escape(
            "this slice's classes [30, 36) must lie within merged_state's [0, 10): vocab_start "
            "and the slice's size must be those its state was made with")):
        slice_cross_entropy_with_grad(logits[:, :6], target, merged, vocab_start=30)
    head = np.ascontiguousarray(rng.standard_normal((6, 4)).astype(np.float32))
    hidden = np.ascontiguousarray(rng.standard_normal((N_ROWS, 4)).astype(np.float32))
    with pytest.raises(ValueError, match=re.escape(
            "this slice's classes [8, 14) must lie within merged_state's [0, 10)")):
        linear_slice_cross_entropy_with_grad(hidden, head, target, merged, vocab_start=8)


def test_a_caller_who_knows_the_vocabulary_spares_the_read_of_its_bounds(rng):
    """n_classes=V with validate=False: the merged state's bounds are not read (a state whose
    bounds say otherwise goes through, with the same numbers); with validate they are checked
    against it."""
    logits = random_logits(rng, N_ROWS, N_CLASSES)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, 0.3)
    merged = merge_softmax_states(softmax_state(logits, target, vocab_start=0,
                                                ignore_index=IGNORE)[None])
    wrong_bounds = merged.copy()
    softmax_states.unpack(wrong_bounds).start[...] = 5  # read, this state is refused
    options = dict(vocab_start=8, ignore_index=IGNORE, label_smoothing=0.1)
    read = slice_cross_entropy_with_grad(logits[:, 8:20], target, merged, **options)
    given = slice_cross_entropy_with_grad(logits[:, 8:20], target, wrong_bounds, validate=False,
                                          n_classes=N_CLASSES, **options)
    for name, a, b in zip(read._fields, read, given):  # the same bits
        assert (a is None) == (b is None), name
        assert a is None or np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
    with pytest.raises(ValueError, match=re.escape("merged_state must cover the whole "
                                                   "vocabulary")):
        slice_cross_entropy_with_grad(logits[:, 8:20], target, wrong_bounds, validate=False,
                                      **options)
    with pytest.raises(ValueError, match=re.escape(
            f"n_classes must be the V of merged_state's slices, {N_CLASSES} (got 40)")):
        slice_cross_entropy_with_grad(logits[:, 8:20], target, merged, n_classes=40, **options)
    with pytest.raises(ValueError, match=re.escape(
            "this slice's classes [30, 42) must lie within merged_state's [0, 37)")):
        slice_cross_entropy_with_grad(logits[:, 8:20], target, merged, vocab_start=30,
                                      validate=False, n_classes=N_CLASSES)
    with pytest.raises(ValueError, match=re.escape("n_classes must be >= 1 (got 0)")):
        slice_cross_entropy_with_grad(logits, target, merged, vocab_start=0, n_classes=0)
    with pytest.raises(TypeError, match=re.escape("n_classes must be an int or None (got "
                                                  "float)")):
        slice_cross_entropy_with_grad(logits, target, merged, vocab_start=0, n_classes=37.0)
    head = np.ascontiguousarray(rng.standard_normal((N_CLASSES, 4)).astype(np.float32))
    hidden = np.ascontiguousarray(rng.standard_normal((N_ROWS, 4)).astype(np.float32))
    state = linear_softmax_state(hidden, head, target, vocab_start=0, ignore_index=IGNORE)
    linear_merged = merge_softmax_states(state[None])
    softmax_states.unpack(linear_merged).start[...] = 5
    with pytest.raises(ValueError, match=re.escape("merged_state must cover the whole")):
        linear_slice_cross_entropy_with_grad(hidden, head, target, linear_merged, vocab_start=0,
                                             ignore_index=IGNORE)
    linear_slice_cross_entropy_with_grad(hidden, head, target, linear_merged, vocab_start=0,
                                         ignore_index=IGNORE, validate=False,
                                         n_classes=N_CLASSES)


def test_a_known_layout_is_merged_without_reading_the_bounds(rng):
    """softmax_states.merge with the union's (start, size) given: the same merged state as
    with the bounds read, from states whose own bounds would be refused (so none was read)."""
    logits = random_logits(rng, N_ROWS, N_CLASSES)
    target = random_target(rng, N_ROWS, N_CLASSES, IGNORE, 0.3)
    states = np.stack([softmax_state(part, target, vocab_start=start, ignore_index=IGNORE)
                       for part, start in zip(split(logits, BOUNDS[1]), BOUNDS[1])])
    read = np.empty(states.shape[1], np.float32)
    assert softmax_states.merge(states, read) == (0, N_CLASSES)
    overlapping = states.copy()
    softmax_states.unpack(overlapping).start[...] = 0  # every slice claims class 0 on
    with pytest.raises(ValueError, match="must tile a range of classes"):
        softmax_states.merge(overlapping, np.empty_like(read))
    given = np.empty_like(read)
    assert softmax_states.merge(overlapping, given, (0, N_CLASSES)) == (0, N_CLASSES)
    assert given.tobytes() == read.tobytes()


def test_bad_arguments_are_refused(rng):
    logits = random_logits(rng, N_ROWS, N_CLASSES)
    target = random_target(rng, N_ROWS, N_CLASSES)
    merged = merge_softmax_states(softmax_state(logits, target, vocab_start=0)[None])
    bad = target.copy()
    bad[4] = N_CLASSES
    with pytest.raises(ValueError, match=re.escape(
            f"target[4] = {N_CLASSES} is outside [0, {N_CLASSES}) and is not ignore_index "
            "(-100)")):
        slice_cross_entropy_with_grad(logits, bad, merged, vocab_start=0)
    # unchecked, the row is NaN, as in the single call
    res = slice_cross_entropy_with_grad(logits, bad, merged, vocab_start=0, reduction="none",
                                        validate=False)
    assert np.isnan(res.loss[4]) and np.isnan(res.grad[4]).all()
    assert np.isfinite(np.delete(res.loss, 4)).all()
    with pytest.raises(ValueError, match=re.escape("vocab_start must be >= 0 (got -1)")):
        softmax_state(logits, target, vocab_start=-1)
    with pytest.raises(TypeError, match=re.escape("vocab_start must be an int (got float)")):
        softmax_state(logits, target, vocab_start=0.0)
    with pytest.raises(ValueError, match=re.escape(
            "label_smoothing_style must be 'torch' or 'megatron' (got 'nemo')")):
        slice_cross_entropy_with_grad(logits, target, merged, vocab_start=0,
                                      label_smoothing_style="nemo")
    with pytest.raises(ValueError, match=re.escape(
            "label_smoothing_style='megatron' uses eps * V / (V - 1) = 1.0175 in torch's "
            "formula, which must be at most 1: label_smoothing must be at most (V - 1) / V = "
            "0.972973 (got 0.99)")):
        slice_cross_entropy_with_grad(logits, target, merged, vocab_start=0,
                                      label_smoothing=0.99, label_smoothing_style="megatron")
    with pytest.raises(ValueError, match=re.escape(
            "softmax states must be float32 arrays (5N + 3,) or a stack of them (R, 5N + 3) "
            "(got shape (2, 7))")):
        merge_softmax_states(np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match=re.escape(
            "softmax states to merge must be stacked, (R, 5N + 3) with R >= 1 (got shape "
            "(0, 33))")):
        merge_softmax_states(np.zeros((0, 33), np.float32))
    with pytest.raises(ValueError, match=re.escape(
            "merged_state must be a float32 state of the target's 6 rows, shape (33,) (got "
            "float32 shape (38,))")):
        slice_cross_entropy_with_grad(logits, target, np.zeros(38, np.float32),
                                      vocab_start=0)
