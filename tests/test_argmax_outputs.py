"""return_token_accuracy and return_predicted_tokens (issue 18), as Liger-Kernel returns them:
each row's argmax (torch.argmax's: the first maximal index, a row's first NaN) found in the
kernel's first pass, -1 for ignored rows, and the share of counted rows whose argmax is their
target, reduced as the loss. Checked against torch.argmax for every dtype, ties within and
across a block's threads, NaN and +inf rows, ignored rows, all-ignored batches and every
reduction, through every entry point."""
import numpy as np
import pytest

import numba_ce
from numba_ce import reference
from numba_ce.portable import SIMULATOR
from helpers import DTYPES, assert_close, random_logits, random_target, to_numpy

torch = pytest.importorskip("torch")  # the comparisons are with torch.argmax

REDUCTIONS = ["mean", "sum", "none"]


def torch_argmax_outputs(logits, target, reduction, ignore_index=-100):
    """(token accuracy, predicted tokens) from torch.argmax of the stored values."""
    x = torch.from_numpy(np.asarray(logits).astype(np.float32))
    t = torch.from_numpy(np.asarray(target).astype(np.int64))
    counted = (t != ignore_index) & (t >= 0) & (t < x.shape[1])
    predicted = torch.where(counted, x.argmax(dim=1), torch.tensor(-1))
    correct = (counted & (predicted == t)).double()
    accuracy = {"none": correct, "sum": correct.sum(),
                "mean": correct.sum() / counted.sum()}[reduction]
    return accuracy.numpy(), predicted.numpy()


def tied_logits(rng, n_rows, n_classes, dtype):
    """Rows whose maximum appears several times, in different words and threads' strides, one
    of them at the target in some rows; a row of NaN after a +inf, a row of +inf twice, a row of
    -inf only, and rows of a constant."""
    logits = random_logits(rng, n_rows, n_classes, dtype)
    target = random_target(rng, n_rows, n_classes)
    for row in range(n_rows):
        places = rng.choice(n_classes, size=min(3, n_classes), replace=False)
        logits[row, places] = 9.0
        if row % 2:
            target[row] = places[rng.integers(len(places))]
    logits[0, 1:] = 4.0  # constant from the second column on: the first maximal is column 1
    if n_rows > 3:
        logits[1, n_classes // 2] = np.inf
        logits[1, -1] = np.nan
        logits[2, [1, n_classes - 1]] = np.inf
        logits[3] = -np.inf
    return logits, target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n_classes", [37, 40, 300])
def test_outputs_match_torch_argmax(rng, dtype, reduction, n_classes):
    logits, target = tied_logits(rng, 7, n_classes, dtype)
    target[5] = -100
    res = numba_ce.cross_entropy_with_grad(logits, target, reduction=reduction,
                                           return_token_accuracy=True,
                                           return_predicted_tokens=True)
    accuracy, predicted = torch_argmax_outputs(logits, target, reduction)
    np.testing.assert_array_equal(to_numpy(res.predicted_tokens), predicted)
    assert to_numpy(res.predicted_tokens).dtype == np.int64
    assert_close(res.token_accuracy, accuracy, 0, 1e-7, "token accuracy")
    expected = reference.cross_entropy_with_grad(logits, target, reduction=reduction,
                                                 return_token_accuracy=True,
                                                 return_predicted_tokens=True)
    np.testing.assert_array_equal(expected.predicted_tokens, predicted)
    assert_close(expected.token_accuracy, accuracy, 0, 0, "reference token accuracy")


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_leave_the_loss_and_gradient_as_they_were(rng, dtype):
    """Bit for bit the plain call's loss, gradient and lse, with softcap (the argmax is of the
    raw logits: softcap is increasing) and label smoothing compiled in."""
    logits, target = tied_logits(rng, 6, 67, dtype)
    options = dict(reduction="none", softcap=5.0, label_smoothing=0.1)
    plain = numba_ce.cross_entropy_with_grad(logits, target, **options)
    both = numba_ce.cross_entropy_with_grad(logits, target, return_token_accuracy=True,
                                            return_predicted_tokens=True, **options)
    for name in ("loss", "grad", "z_loss", "lse"):  # as float32: a NaN's bits may differ
        np.testing.assert_array_equal(to_numpy(getattr(both, name)).astype(np.float32),
                                      to_numpy(getattr(plain, name)).astype(np.float32),
                                      err_msg=name)
    assert plain.token_accuracy is None and plain.predicted_tokens is None
    np.testing.assert_array_equal(to_numpy(both.predicted_tokens),
                                  torch_argmax_outputs(logits, target, "none")[1])


@pytest.mark.parametrize("reduction,expected", [("mean", np.nan), ("sum", 0.0)])
def test_all_ignored_batches(rng, reduction, expected):
    logits = random_logits(rng, 4, 24)
    target = np.full(4, -100)
    res = numba_ce.cross_entropy_with_grad(logits, target, reduction=reduction,
                                           return_token_accuracy=True,
                                           return_predicted_tokens=True)
    assert_close(res.token_accuracy, expected, 0, 0, "token accuracy")
    np.testing.assert_array_equal(to_numpy(res.predicted_tokens), [-1] * 4)
    empty = numba_ce.cross_entropy_with_grad(logits[:0], target[:0], reduction=reduction,
                                             return_token_accuracy=True,
                                             return_predicted_tokens=True)
    assert_close(empty.token_accuracy, expected, 0, 0, "token accuracy of no rows")
    assert to_numpy(empty.predicted_tokens).shape == (0,)


def test_one_accurate_row_in_four(rng):
    logits = random_logits(rng, 4, 50)
    target = logits.argmax(axis=1)
    target[1:] = (target[1:] + 1) % 50
    res = numba_ce.cross_entropy_with_grad(logits, target, return_token_accuracy=True)
    assert float(to_numpy(res.token_accuracy)) == 0.25


@pytest.mark.skipif(not SIMULATOR, reason="CPU tensors: the simulator")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("return_z_loss", [False, True])
def test_torch_entry_points_return_a_named_result(rng, reduction, return_z_loss):
    import numba_ce.torch as nce

    logits, target = tied_logits(rng, 6, 40, "float32")
    target[4] = -100
    accuracy, predicted = torch_argmax_outputs(logits, target, reduction)
    x = torch.from_numpy(logits).requires_grad_()
    t = torch.from_numpy(target)
    out = nce.cross_entropy(x, t, reduction=reduction, return_z_loss=return_z_loss,
                            return_token_accuracy=True, return_predicted_tokens=True)
    assert type(out).__name__ == "CrossEntropyOutput"
    assert (out.z_loss is not None) == return_z_loss
    np.testing.assert_array_equal(out.predicted_tokens.numpy(), predicted)
    assert_close(out.token_accuracy.numpy(), accuracy, 0, 1e-7, "token accuracy")
    assert not out.token_accuracy.requires_grad and not out.predicted_tokens.requires_grad
    plain = nce.cross_entropy(x.detach(), t, reduction=reduction)
    torch.testing.assert_close(out.loss.detach(), plain, rtol=0, atol=0, equal_nan=True)
    out.loss.sum().backward()
    assert torch.isfinite(x.grad[[0, 4, 5]]).all()

    crit = nce.CrossEntropyLoss(reduction=reduction, return_predicted_tokens=True)
    np.testing.assert_array_equal(crit(x, t).predicted_tokens.numpy(), predicted)
    only_accuracy = nce.cross_entropy(x, t, reduction=reduction, return_token_accuracy=True)
    assert only_accuracy.predicted_tokens is None and only_accuracy.z_loss is None


def linear_head(rng, n_rows=9, n_features=8, n_classes=24):
    """Hidden states and head of small multiples of 1/4: exact logits, with ties."""
    x = (rng.integers(-2, 3, (n_rows, n_features)) / 2).astype(np.float32)
    w = (rng.integers(-2, 3, (n_classes, n_features)) / 2).astype(np.float32)
    return x, w, x.astype(np.float64) @ w.astype(np.float64).T


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_entry_points(rng, reduction):
    x, w, logits = linear_head(rng)
    target = random_target(rng, 9, 24, ignored_share=0.3)
    target[0] = logits[0].argmax()
    accuracy, predicted = torch_argmax_outputs(logits, target, reduction)
    res = numba_ce.linear_cross_entropy_with_grad(x, w, target, reduction=reduction,
                                                  chunk_size=4, return_token_accuracy=True,
                                                  return_predicted_tokens=True)
    np.testing.assert_array_equal(to_numpy(res.predicted_tokens), predicted)
    assert_close(res.token_accuracy, accuracy, 0, 1e-7, "token accuracy")
    if SIMULATOR:
        import numba_ce.torch as nce
        out = nce.linear_cross_entropy(torch.from_numpy(x).requires_grad_(), torch.from_numpy(w),
                                       torch.from_numpy(target), reduction=reduction,
                                       chunk_size=4, return_token_accuracy=True,
                                       return_predicted_tokens=True)
        np.testing.assert_array_equal(out.predicted_tokens.numpy(), predicted)
        assert_close(out.token_accuracy.numpy(), accuracy, 0, 1e-7, "torch token accuracy")
        out.loss.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_across_warps(rng, dtype):
    """Four warps a block: the first maximal index (and first NaN) wins across warps too."""
    from numba_ce import device_properties
    from helpers import core_call

    logits, target = tied_logits(rng, 5, 1201, dtype)
    logits[4, [1100, 7, 600]] = 50.0  # the first is in the last warp's words, the answer 7
    res = core_call(logits, target, reduction="none", return_token_accuracy=True,
                    return_predicted_tokens=True,
                    device=device_properties.SIMULATED._replace(threads=128))
    accuracy, predicted = torch_argmax_outputs(logits, target, "none")
    assert predicted[4] == 7
    np.testing.assert_array_equal(to_numpy(res.predicted_tokens), predicted)
    assert_close(res.token_accuracy, accuracy, 0, 0, "token accuracy")
