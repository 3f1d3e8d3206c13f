"""Class-probability targets (N, V) in the NumPy API: the fused kernels against the float64
reference and against PyTorch's cross_entropy with a float target, for every dtype and option,
awkward shapes and layouts, every plan the simulator can be made to take, and the values at the
edges of the formula (rows that do not sum to 1, -inf, NaN)."""
import itertools

import numpy as np
import pytest

import numba_ce
from numba_ce import device_properties, planning, reference
from numba_ce.words import UNROLL
from helpers import (DTYPES, PoisonedArrays, TOLERANCES, assert_close, assert_like_reference,
                     gradient_error_scale, random_logits, random_upstream, random_weight, to_numpy,
                     torch_loss_and_grad, with_and_without_grad)

REDUCTIONS = ["mean", "sum", "none"]
# The options that change the kernel or the formula; the dtype, the upstream gradient and
# in-place rotate through them, so that each meets every option value.
COMBINATIONS = list(itertools.product(REDUCTIONS, [False, True], [0.0, 0.1], [0.0, 1e-3],
                                      [None, 5.0]))
ROTATION = list(itertools.product(DTYPES, ["ones", "given"], [False, True]))


def random_probabilities(rng, n_rows, n_classes, dtype="float32"):
    """Rows of class probabilities that sum to 1 before rounding to ``dtype`` (cubed uniforms:
    some classes near 0, some near the top, as soft labels are)."""
    q = rng.random((n_rows, n_classes)) ** 3
    q /= np.maximum(q.sum(axis=1, keepdims=True), 1e-30)
    return q.astype(DTYPES[dtype])


def check_once(rng, dtype, n_rows, n_classes, *, reduction="mean", weighted=False,
               smoothing=0.0, z_loss=0.0, softcap=None, upstream="ones", inplace=False,
               logits=None, target=None, against_torch=True, alloc=None, device=None):
    """cross_entropy_with_grad and cross_entropy once on class probabilities, against the
    reference and torch; with an allocator or device properties, through helpers.core_call."""
    logits = random_logits(rng, n_rows, n_classes, dtype) if logits is None else logits
    target = random_probabilities(rng, n_rows, n_classes, dtype) if target is None else target
    weight = random_weight(rng, n_classes, weighted)
    grad_output = random_upstream(rng, n_rows, reduction, upstream)
    options = dict(weight=weight, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss,
                   softcap=softcap)
    original, target_before = logits.copy(), target.copy()
    expected = reference.cross_entropy_with_grad(logits, target, grad_output=grad_output,
                                                 **options)
    res, loss_only = with_and_without_grad(logits, original, target, grad_output=grad_output,
                                           inplace=inplace, alloc=alloc, device=device,
                                           **options)
    loss_tol, grad_tol = TOLERANCES[dtype]["loss"], TOLERANCES[dtype]["grad"]
    # The gradient's terms, p_j A and w_j q'_j, are each at most the row's upstream gradient
    # over the reduction's denominator times max w: its errors scale with that.
    denominator = max(n_rows, 1) if reduction == "mean" else 1
    grad_scale = gradient_error_scale(expected.grad, grad_output, n_rows, denominator)
    assert_like_reference(res, expected, logits, dtype, grad_scale)
    assert (target.view(np.uint8) == target_before.view(np.uint8)).all(), "target was modified"
    if inplace:
        assert res.grad is logits
    else:
        assert (logits.view(np.uint8) == original.view(np.uint8)).all(), "logits were modified"
    assert_close(loss_only, expected.loss, *loss_tol, "loss-only kernel")
    if against_torch:
        torch_loss, torch_grad = torch_loss_and_grad(original, target, grad_output=grad_output,
                                                     **options)
        assert_close(res.loss, torch_loss, *loss_tol, "loss vs torch")
        assert_close(res.grad, torch_grad, grad_tol[0], grad_tol[1] * grad_scale, "grad vs torch")
    return res


@pytest.mark.parametrize("reduction,weighted,smoothing,z_loss,softcap", COMBINATIONS)
def test_every_option_combination(rng, reduction, weighted, smoothing, z_loss, softcap):
    index = COMBINATIONS.index((reduction, weighted, smoothing, z_loss, softcap))
    dtype, upstream, inplace = ROTATION[index % len(ROTATION)]
    check_once(rng, dtype, 5, 67, reduction=reduction, weighted=weighted, smoothing=smoothing,
               z_loss=z_loss, softcap=softcap, upstream=upstream, inplace=inplace)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_options_at_once_each_dtype(rng, dtype, reduction):
    check_once(rng, dtype, 6, 128, reduction=reduction, weighted=True, smoothing=0.1,
               z_loss=1e-3, softcap=5.0, upstream="given")


# Awkward shapes, each for a reason: N = 0 and 1 and odd; V = 1 (the loss is -w q log 1 = 0);
# V not a multiple of the 8-byte word (one element a word for logits and targets); V around a
# power of two and across groups of words.
SHAPES = [(0, 7), (1, 1), (3, 1), (1, 5), (4, 3), (5, 7), (3, 1023), (2, 1024), (2, 1025),
          (5, 101)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows,n_classes", SHAPES)
def test_awkward_shapes(rng, dtype, n_rows, n_classes):
    for reduction in REDUCTIONS:
        check_once(rng, dtype, n_rows, n_classes, reduction=reduction, smoothing=0.1,
                   weighted=True, against_torch=n_rows > 0)


def test_no_rows():
    """N = 0: "mean" NaN (torch's 0 / 0), "sum" 0, "none" empty."""
    logits, target = np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32)
    for reduction, expected in [("mean", np.nan), ("sum", 0.0), ("none", np.zeros(0))]:
        res = numba_ce.cross_entropy_with_grad(logits, target, reduction=reduction)
        assert_close(res.loss, expected, 0, 0, f"loss ({reduction})")
        assert res.grad.shape == (0, 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned_rows(rng, dtype):
    """Views whose row stride exceeds V, and targets whose rows do not start on an 8-byte word
    while the logits' do (both are then read one element a word), give the same numbers."""
    wide_logits = random_logits(rng, 4, 48, dtype)  # rows of whole words
    wide_target = random_probabilities(rng, 4, 48, dtype)
    logits = wide_logits[:, :40]
    check_once(rng, dtype, 4, 40, logits=logits, target=wide_target[:, :40], weighted=True)
    misaligned = wide_target[:, 1:41]
    assert planning.word_layout(misaligned, dtype)[0] == 1
    assert planning.word_layout(logits, dtype)[0] > 1
    check_once(rng, dtype, 4, 40, logits=logits.copy(), target=misaligned, smoothing=0.1,
               z_loss=1e-3, inplace=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_poisoned_outputs_are_all_written(rng, dtype):
    """Output buffers start as NaN bit patterns: every element must be written."""
    for reduction in REDUCTIONS:
        check_once(rng, dtype, 5, 24, reduction=reduction, weighted=True, against_torch=False,
                   alloc=PoisonedArrays())


def test_multi_warp_reduction(rng):
    """With four warps a block the states of the threads (A and B moved from each thread's own
    maximum to the row's) are merged across warps too."""
    device = device_properties.SIMULATED._replace(threads=128)
    for dtype in DTYPES:
        check_once(rng, dtype, 3, 701, smoothing=0.1, weighted=True, z_loss=1e-3,
                   against_torch=False, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_rows_longer_than_the_shared_memory_cache(rng, dtype, inplace):
    """The cached gradient kernel with class probabilities: the logits' first words from shared
    memory (copied in, or prefetched during the block's previous row), the targets from global
    memory in both passes, pass 2 backwards; rows of a cached group, two uncached groups and a
    tail, more rows than blocks."""
    simulated = device_properties.SIMULATED
    per_sm = planning.CACHED_BLOCKS_PER_SM[0]  # the simulator's L2 holds anything
    group = UNROLL * simulated.threads  # words
    device = simulated._replace(shared_per_block=8 * group + planning.STATIC_SHARED_BYTES)
    pack = 8 // DTYPES[dtype].itemsize
    n_words = 3 * group + 7
    assert planning.cache_plan(n_words, 8, device, 8 * n_words) == (per_sm, 8 * group)
    n_rows = 2 * planning.resident_row_blocks(10**9, per_sm, device) + 1
    check_once(rng, dtype, n_rows, pack * n_words, reduction="sum", weighted=True,
               smoothing=0.1, z_loss=1e-3, upstream="given", inplace=inplace,
               against_torch=False, device=device)


def test_the_targets_row_counts_among_the_bytes_l2_must_hold():
    """Pass 2 reads the targets again: for 4096 x 128256 bf16 on an H200's figures, two blocks
    a multiprocessor would leave 105 MB of logits and targets to L2 (one block: 38 MB)."""
    device = device_properties.SM90._replace(l2_bytes=50 * 2**20)
    n_words = 128256 * 2 // 8
    assert planning.cache_plan(n_words, 8, device)[0] == 2  # class indices
    assert planning.cache_plan(n_words, 8, device, 8 * n_words)[0] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_that_do_not_sum_to_one(rng, dtype):
    """torch's formula as it stands, whatever the rows hold: twice a distribution, negative
    values, all zeros (a loss of 0 and no gradient but the z-loss's), one class only."""
    n_classes = 9
    q = random_probabilities(rng, 4, n_classes).astype(np.float64)
    q[0] *= 2
    q[1] -= 0.5 / n_classes
    q[2] = 0.0
    q[3] = np.eye(n_classes)[4] * 0.25
    target = q.astype(DTYPES[dtype])
    for options in [dict(reduction="none"), dict(reduction="mean", weighted=True,
                                                 smoothing=0.2, z_loss=1e-2)]:
        res = check_once(rng, dtype, 4, n_classes, target=target, **options)
    plain = numba_ce.cross_entropy_with_grad(random_logits(rng, 4, n_classes, dtype), target,
                                             reduction="none")
    assert to_numpy(plain.loss)[2] == 0 and not to_numpy(plain.grad)[2].any()
    assert res.loss is not None


def test_one_hot_probabilities_equal_class_indices(rng):
    """A one-hot row is its class index: the same loss and gradient (to rounding), with weights,
    smoothing, z-loss and softcap; "mean" differs only by its denominator (N, not sum w_y)."""
    logits = random_logits(rng, 6, 37)
    labels = rng.integers(0, 37, 6)
    onehot = np.eye(37, dtype=np.float32)[labels]
    weight = random_weight(rng, 37, True)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    for reduction in ("none", "sum"):
        a = numba_ce.cross_entropy_with_grad(logits, onehot, reduction=reduction, **options)
        b = numba_ce.cross_entropy_with_grad(logits, labels, reduction=reduction, **options)
        assert_close(a.loss, to_numpy(b.loss), 2e-6, 1e-6, f"loss ({reduction})")
        assert_close(a.grad, to_numpy(b.grad), 2e-6, 1e-7, f"grad ({reduction})")
    a = numba_ce.cross_entropy(logits, onehot, **options)
    b = numba_ce.cross_entropy(logits, labels, reduction="sum", **options)
    assert_close(a, to_numpy(b) / 6, 2e-6, 1e-6, "mean over N")


def test_special_values_as_torch(rng):
    """-inf, +inf and NaN, as torch's -sum_j w_j q'_j log p_j gives them: a -inf logit where q
    is 0 makes the row NaN (0 * -inf) and where q > 0 its loss +inf; a NaN or +inf logit, or a
    NaN probability, makes the row NaN; a row of only -inf is NaN. Other rows are unaffected,
    and the gradients are the reference's (finite at -inf columns)."""
    n_classes = 6
    logits = random_logits(rng, 6, n_classes)
    target = random_probabilities(rng, 6, n_classes)
    logits[0, 2], target[0, 2] = -np.inf, 0.0
    logits[1, 2] = -np.inf  # where q > 0
    logits[2, 3] = np.nan
    logits[3, 1] = np.inf
    logits[4] = -np.inf
    target[5, 0] = np.nan
    res = numba_ce.cross_entropy_with_grad(logits, target, reduction="none")
    expected = reference.cross_entropy_with_grad(logits, target, reduction="none")
    torch_loss, _ = torch_loss_and_grad(logits, target, reduction="none")
    loss = to_numpy(res.loss)
    assert np.isnan(loss[[0, 2, 3, 4, 5]]).all() and loss[1] == np.inf
    assert_close(loss, torch_loss, 2e-5, 1e-6, "loss vs torch")
    assert_close(res.grad, expected.grad, 2e-5, 1e-7, "grad")
    assert np.isfinite(to_numpy(res.grad)[:2]).all()
    one_row = numba_ce.cross_entropy_with_grad(logits[1:2].copy(), target[1:2].copy())
    assert to_numpy(one_row.loss) == np.inf


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_large_logits_keep_their_accuracy(rng, dtype, offset):
    """Logits of +-1e4 (every representable bf16 near there too): B is kept relative to the
    row's maximum, so the loss is as accurate as for small logits (A lse - sum w q x would lose
    an ulp of 1e4, 1e-3, to cancellation)."""
    logits = (random_logits(rng, 4, 64, "float32") + offset).astype(DTYPES[dtype])
    target = random_probabilities(rng, 4, 64, dtype)
    res = numba_ce.cross_entropy_with_grad(logits, target, reduction="none")
    expected = reference.cross_entropy_with_grad(logits, target, reduction="none")
    assert_close(res.loss, expected.loss, 2e-5, 2e-6, "loss")
    grad_tol = TOLERANCES[dtype]["grad"]
    assert_close(res.grad, expected.grad, grad_tol[0],
                 grad_tol[1] * np.abs(expected.grad).max(), "grad")


def test_predicted_tokens(rng):
    """The argmax kernel with class probabilities: each row's argmax of the logits, every row
    counted (no token accuracy: there is no target class)."""
    logits = random_logits(rng, 5, 30)
    logits[2, [3, 17]] = logits[2].max() + 1  # a tie: the first
    target = random_probabilities(rng, 5, 30)
    res = numba_ce.cross_entropy_with_grad(logits, target, return_predicted_tokens=True,
                                           reduction="sum")
    assert res.token_accuracy is None
    assert (to_numpy(res.predicted_tokens) == logits.argmax(axis=1)).all()
    plain = numba_ce.cross_entropy_with_grad(logits, target, reduction="sum")
    assert to_numpy(res.loss) == to_numpy(plain.loss)
    assert (to_numpy(res.grad) == to_numpy(plain.grad)).all()


def test_targets_sharing_memory_with_inplace_logits_are_refused(rng):
    memory = random_logits(rng, 4, 14)
    logits, target = memory[:, :7], memory[:, 7:]
    with pytest.raises(ValueError, match="^target shares memory with the logits, which "
                                         r"inplace=True overwrites with the gradient; pass a "
                                         "copy of target$"):
        numba_ce.cross_entropy_with_grad(logits, target, inplace=True)
