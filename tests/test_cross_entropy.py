"""The kernels against the float64 reference and against PyTorch, for every option combination."""
import itertools

import numpy as np
import pytest

import numba_ce
from numba_ce import device_properties, planning, reference
from numba_ce.words import UNROLL
from helpers import (DTYPES, PoisonedArrays, TOLERANCES, assert_close, assert_like_reference,
                     gradient_error_scale, random_logits, random_target, random_upstream,
                     random_weight, to_numpy, torch_loss_and_grad, with_and_without_grad)

# Every combination of the options; the logits dtype rotates through the combinations so that
# each dtype meets every option value (the full product with dtypes triples the simulator time).
REDUCTIONS = ["mean", "sum", "none"]
COMBINATIONS = [
    (reduction, ignored, weighted, smoothing, z_loss, softcap, upstream, inplace)
    for reduction, ignored, weighted, smoothing, z_loss, softcap, upstream, inplace
    in itertools.product(REDUCTIONS, [0.0, 0.3], [False, True], [0.0, 0.1], [0.0, 1e-3],
                         [None, 5.0], ["ones", "given"], [False, True])
]
ROTATION = list(DTYPES)


def check_once(rng, dtype, n_rows, n_classes, *, reduction="mean", ignored=0.0, weighted=False,
               smoothing=0.0, z_loss=0.0, softcap=None, upstream="ones", inplace=False,
               ignore_index=-100, against_torch=True, alloc=None, device=None):
    """cross_entropy_with_grad and cross_entropy once, against the reference and torch; with an
    allocator or device properties (helpers.core_call), the call behind them."""
    logits = random_logits(rng, n_rows, n_classes, dtype)
    target = random_target(rng, n_rows, n_classes, ignore_index, ignored)
    weight = random_weight(rng, n_classes, weighted)
    grad_output = random_upstream(rng, n_rows, reduction, upstream)
    options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=smoothing, z_loss=z_loss, softcap=softcap)
    original = logits.copy()

    expected = reference.cross_entropy_with_grad(logits, target, grad_output=grad_output, **options)
    res, loss_only = with_and_without_grad(logits, original, target, grad_output=grad_output,
                                           inplace=inplace, alloc=alloc, device=device,
                                           **options)
    loss_tol, grad_tol = TOLERANCES[dtype]["loss"], TOLERANCES[dtype]["grad"]
    # Gradient errors scale with the terms that cancel in them (p_y - 1 + eps / V, ...), each of
    # the order of a row's upstream gradient over the reduction's denominator.
    denominator = max(int((target != ignore_index).sum()), 1) if reduction == "mean" else 1
    grad_scale = gradient_error_scale(expected.grad, grad_output, n_rows, denominator)
    assert_like_reference(res, expected, logits, dtype, grad_scale)
    if inplace:
        assert res.grad is logits
    else:
        assert (logits.view(np.uint8) == original.view(np.uint8)).all(), "logits were modified"

    assert_close(loss_only, expected.loss, *loss_tol, "loss-only kernel")

    if against_torch:
        torch_loss, torch_grad = torch_loss_and_grad(original, target, grad_output=grad_output,
                                                     **options)
        assert_close(res.loss, torch_loss, *loss_tol, "loss vs torch")
        if not (reduction == "mean" and (target == ignore_index).all()):
            # (torch's gradient of a mean over no rows is NaN; ours is zero, as for any ignored row)
            assert_close(res.grad, torch_grad, grad_tol[0], grad_tol[1] * grad_scale,
                         "grad vs torch")
    return res


@pytest.mark.parametrize(
    "reduction,ignored,weighted,smoothing,z_loss,softcap,upstream,inplace", COMBINATIONS)
def test_every_option_combination(rng, reduction, ignored, weighted, smoothing, z_loss, softcap,
                                  upstream, inplace):
    index = COMBINATIONS.index((reduction, ignored, weighted, smoothing, z_loss, softcap,
                                upstream, inplace))
    check_once(rng, ROTATION[index % len(ROTATION)], 5, 67, reduction=reduction, ignored=ignored,
               weighted=weighted, smoothing=smoothing, z_loss=z_loss, softcap=softcap,
               upstream=upstream, inplace=inplace)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_options_at_once_each_dtype(rng, dtype, reduction):
    check_once(rng, dtype, 6, 128, reduction=reduction, ignored=0.3, weighted=True,
               smoothing=0.1, z_loss=1e-3, softcap=5.0, upstream="given")


# Awkward shapes, each for a reason: N = 0 and 1; V = 1 (the loss is 0, the gradient 0); V not a
# multiple of the 8-byte word (scalar path) or of the block; V around a power of two.
SHAPES = [(0, 7), (1, 1), (1, 5), (3, 1), (2, 2), (4, 3), (3, 1023), (2, 1024), (2, 1025),
          (5, 100), (5, 101)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows,n_classes", SHAPES)
def test_awkward_shapes(rng, dtype, n_rows, n_classes):
    for reduction in REDUCTIONS:
        check_once(rng, dtype, n_rows, n_classes, reduction=reduction, ignored=0.25,
                   smoothing=0.1, against_torch=n_rows > 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_int32_target(rng, dtype):
    """A view whose row stride exceeds V, and int32 targets, give the same numbers."""
    wide = random_logits(rng, 4, 48, dtype)
    logits = wide[:, :40]
    target = random_target(rng, 4, 40).astype(np.int32)
    expected = reference.cross_entropy_with_grad(logits, target)
    res = numba_ce.cross_entropy_with_grad(logits, target)
    tol = TOLERANCES[dtype]
    assert_close(res.loss, expected.loss, *tol["loss"], "loss")
    assert_close(res.grad, expected.grad, tol["grad"][0],
                 tol["grad"][1] * np.abs(expected.grad).max(), "grad")
    res = numba_ce.cross_entropy_with_grad(logits, target, inplace=True)
    assert res.grad is logits
    assert_close(wide[:, :40], expected.grad, tol["grad"][0],
                 tol["grad"][1] * np.abs(expected.grad).max(), "in-place grad in the view")


def test_every_row_ignored(rng):
    logits = random_logits(rng, 4, 9)
    target = np.full(4, 3)
    for reduction, expected in [("mean", np.nan), ("sum", 0.0), ("none", np.zeros(4))]:
        res = numba_ce.cross_entropy_with_grad(logits, target, ignore_index=3, reduction=reduction)
        assert_close(res.loss, expected, 0, 0, f"loss ({reduction})")
        assert not to_numpy(res.grad).any() and not to_numpy(res.lse).any()


def test_negative_infinity_columns(rng):
    """A masked vocabulary (-inf columns) has p = 0 there and a finite loss."""
    logits = random_logits(rng, 4, 30)
    logits[:, ::3] = -np.inf
    target = np.array([1, 2, 4, 29])
    expected = reference.cross_entropy_with_grad(logits, target, reduction="none")
    res = numba_ce.cross_entropy_with_grad(logits, target, reduction="none")
    assert np.isfinite(to_numpy(res.loss)).all()
    assert_close(res.loss, expected.loss, 2e-5, 1e-6, "loss")
    assert_close(res.grad, expected.grad, 2e-5, 1e-7, "grad")
    assert not to_numpy(res.grad)[:, ::3].any()


def test_multi_warp_reduction(rng):
    """The simulator normally runs one warp a block; with four, the cross-warp stage is covered."""
    device = device_properties.SIMULATED._replace(threads=128)
    for dtype in DTYPES:
        check_once(rng, dtype, 3, 701, smoothing=0.1, weighted=True, z_loss=1e-3,
                   against_torch=False, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_weighted_mean_keeps_its_ce_part_beside_a_larger_z_part(rng, dtype):
    """Class weights of ~1e-6 (inverse class frequencies) with z-loss: "mean" divides the CE
    part by sum(w_y) ~ 1e-5 and the z part by the count, so row losses kept as ce + zl in float32
    would lose ce to zl's ulps, 0.5% of the loss here; scaling the weights leaves a weighted mean
    as it was."""
    logits = random_logits(rng, 8, 40, dtype)
    target = random_target(rng, 8, 40)
    weight = random_weight(rng, 40, True) * np.float32(1e-6)
    options = dict(weight=weight, z_loss=1e-2)
    expected = reference.cross_entropy_with_grad(logits, target, **options)
    res, loss_only = with_and_without_grad(logits, logits.copy(), target, grad_output=None,
                                           inplace=False, alloc=None, device=None, **options)
    for loss, what in ((res.loss, "loss"), (loss_only, "loss-only kernel")):
        assert_close(loss, expected.loss, 2e-6, 0.0, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_rows_longer_than_the_shared_memory_cache(rng, dtype, inplace):
    """Gradient kernels read the first words of a row from shared memory (copied in, or
    prefetched while the block's previous row finished) and the rest from the logits, pass 2
    backwards: with a cache of one group of words, rows of a cached group, two uncached groups
    and a tail, more rows than blocks, and an ignored row between them give the reference's
    numbers."""
    simulated = device_properties.SIMULATED
    per_sm = planning.CACHED_BLOCKS_PER_SM[0]  # rows this short: their uncached words fit in L2
    group = UNROLL * simulated.threads  # words
    device = simulated._replace(  # a cache of one group a block
        shared_per_block=8 * group + planning.STATIC_SHARED_BYTES)
    pack = 8 // np.dtype(random_logits(rng, 1, 1, dtype).dtype).itemsize
    n_classes = pack * (3 * group + 7)
    assert planning.cache_plan(n_classes // pack, 8, device) == (per_sm, 8 * group)
    n_rows = 2 * planning.resident_row_blocks(10**9, per_sm, device) + 1
    check_once(rng, dtype, n_rows, n_classes, reduction="sum", ignored=0.2,
               smoothing=0.1, z_loss=1e-3, upstream="given", inplace=inplace,
               against_torch=False, device=device)


@pytest.mark.parametrize("n_classes, itemsize, l2_mib, expected", [
    (32000, 2, 50, 2),    # fits in shared memory: nothing uncached
    (128256, 2, 50, 2),   # 140 KB uncached x 264 blocks = 37 MB
    (151936, 2, 50, 2),   # 47 MiB
    (151936, 2, 40, 1),   # ... not in a 40 MiB L2
    (256000, 2, 50, 1),   # 105 MB with two blocks, 37 MB with one
    (128256, 4, 50, 1),   # float32: the same
    (10**6, 2, 50, 1),    # fits neither way: the last choice
])
def test_cache_plan_fits_the_uncached_words_in_l2(n_classes, itemsize, l2_mib, expected):
    """Gradient kernels take two blocks a multiprocessor while the words their rows leave
    uncached fit in L2 together (pass 2 reads them again from there), else one with twice the
    cache; on an H200's figures: 132 multiprocessors, 227 KiB of shared memory a block."""
    device = device_properties.SM90._replace(l2_bytes=l2_mib * 2**20)
    n_words = n_classes * itemsize // 8
    blocks, shared = planning.cache_plan(n_words, 8, device)
    assert blocks == expected
    # the cache of that choice: the block's share of 228 KiB, or the whole row
    assert shared == min(n_words * 8, (233472 // blocks - 1024 - 256) // 8 * 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_poisoned_outputs_are_all_written(rng, dtype):
    """Output buffers start as NaN bit patterns: every element must be written."""
    for reduction in REDUCTIONS:
        check_once(rng, dtype, 5, 24, reduction=reduction, ignored=0.4, against_torch=False,
                   alloc=PoisonedArrays())
