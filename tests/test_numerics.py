"""Numerics at the edges: NaN and +inf rows, masked (-inf) vocabulary, logits of large magnitude,
and confident predictions in bf16. Each case is checked against the float64 reference and, where
PyTorch defines the answer, against PyTorch."""
import ml_dtypes
import numpy as np
import pytest

import numba_ce
from numba_ce import reference
from helpers import (DTYPES, TOLERANCES, assert_close, random_logits, random_target, to_numpy,
                     torch_loss_and_grad)

# V = 37 makes every row a whole number of elements but not of 8-byte words (one element a load);
# V = 40 takes the packed path (two fp32 or four 16-bit elements a load).
WIDTHS = [37, 40]


def check_against_reference_and_torch(logits, target, dtype, **options):
    """Loss, lse and gradient against the float64 reference; loss and gradient against torch."""
    expected = reference.cross_entropy_with_grad(logits, target, **options)
    res = numba_ce.cross_entropy_with_grad(logits, target, **options)
    loss_only = numba_ce.cross_entropy(logits, target, **options)
    tol = TOLERANCES[dtype]
    scale = np.nanmax(np.abs(expected.grad), initial=1e-30)
    assert_close(res.loss, expected.loss, *tol["loss"], "loss")
    assert_close(loss_only, expected.loss, *tol["loss"], "loss-only kernel")
    assert_close(res.lse, expected.lse, *tol["loss"], "lse")
    assert_close(res.grad, expected.grad, tol["grad"][0], tol["grad"][1] * scale, "grad")
    torch_loss, torch_grad = torch_loss_and_grad(logits, target, **options)
    assert_close(res.loss, torch_loss, *tol["loss"], "loss vs torch")
    assert_close(res.grad, torch_grad, tol["grad"][0], tol["grad"][1] * scale, "grad vs torch")
    return res


# --- NaN and +inf -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", WIDTHS)
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_nan_or_inf_poisons_its_row_only(rng, dtype, n_classes, poison):
    """A NaN or +inf logit makes its row's loss, lse and whole gradient NaN (PyTorch gives NaN
    loss and gradient); the other rows are unaffected. The bad value sits in the first column
    (the first element a thread reads), the target column, the last column, or everywhere."""
    logits = random_logits(rng, 6, n_classes, dtype)
    target = random_target(rng, 6, n_classes)
    target[[1, 2]] = [3, 5]
    logits[0, 0] = poison
    logits[1, 3] = poison  # the target column
    logits[2, -1] = poison
    logits[3, :] = poison
    for reduction in ("none", "mean"):
        res = check_against_reference_and_torch(logits, target, dtype, reduction=reduction)
        grad = to_numpy(res.grad).astype(np.float64)
        assert np.isnan(grad[:4]).all(), "poisoned rows: the whole gradient row is NaN"
        assert np.isfinite(grad[4:]).all(), "the other rows are untouched"
        assert np.isnan(to_numpy(res.lse)[:4]).all() and np.isfinite(to_numpy(res.lse)[4:]).all()


def test_ignored_rows_are_not_read(rng):
    """An ignored row's loss and gradient are 0 whatever it holds (PyTorch gives a NaN gradient
    for an ignored row of NaN: we never read it)."""
    logits = random_logits(rng, 3, 40)
    logits[1] = np.nan
    target = np.array([4, -100, 7])
    res = numba_ce.cross_entropy_with_grad(logits, target, reduction="none")
    assert to_numpy(res.loss)[1] == 0 and not to_numpy(res.grad)[1].any()
    assert np.isfinite(to_numpy(res.loss)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_tames_infinite_logits(rng, dtype):
    """With softcap c, +inf and -inf become +c and -c: the row stays finite, and the gradient
    there is 0 (1 - tanh(inf)**2), as in PyTorch."""
    logits = random_logits(rng, 4, 40, dtype)
    target = random_target(rng, 4, 40)
    logits[0, 5] = np.inf
    logits[1, target[1]] = np.inf
    logits[2, target[2]] = -np.inf
    res = check_against_reference_and_torch(logits, target, dtype, softcap=15.0,
                                            reduction="none")
    assert np.isfinite(to_numpy(res.loss)).all()
    grad = to_numpy(res.grad)
    assert grad[0, 5] == 0 and grad[1, target[1]] == 0 and grad[2, target[2]] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", WIDTHS)
@pytest.mark.parametrize("softcap", [30.0, 100.0])
def test_softcap_rows_of_a_confident_target(rng, dtype, n_classes, softcap):
    """Rows whose target holds nearly all the probability keep a loss of ~0 and p_y - 1 of ~0, as
    the reference, wherever the row's maximum lies in [-c, c]: at the top (a logit of 3c among
    zeros) and far below it (the target capped to -c/2, the rest -inf, so -c). A shift by
    anything but the row's maximum, or m - x_y rounded apart from the sum's exponents, puts up
    to half an ulp of m or 2c into them, a loss of -4e-6 where 8e-8 is right (bench/NOTES.md,
    v13-v15). A row of only -inf is uniform (loss log V); a row of ordinary logits sets the
    gradient's scale for the tolerance."""
    target = random_target(rng, 4, n_classes)
    logits = np.full((4, n_classes), -np.inf)
    logits[0] = 0.0
    logits[0, target[0]] = 3 * softcap
    logits[1, target[1]] = softcap * np.arctanh(-0.5)
    logits[3] = random_logits(rng, 1, n_classes)
    check_against_reference_and_torch(logits.astype(DTYPES[dtype]), target, dtype,
                                      softcap=softcap, reduction="none")


# --- -inf columns (a masked vocabulary) -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", WIDTHS)
def test_masked_columns_have_zero_probability(rng, dtype, n_classes):
    """-inf columns get p = 0 exactly (a zero gradient) and the loss stays finite."""
    logits = random_logits(rng, 5, n_classes, dtype)
    masked = rng.random(n_classes) < 0.4
    masked[[0, -1]] = True  # the first element a thread reads, and the row's end
    logits[:, masked] = -np.inf
    target = rng.choice(np.flatnonzero(~masked), 5)
    for reduction in ("none", "sum"):
        res = check_against_reference_and_torch(logits, target, dtype, reduction=reduction,
                                                weight=rng.random(n_classes) + 0.5)
        assert np.isfinite(to_numpy(res.loss)).all()
        assert (to_numpy(res.grad)[:, masked] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_target_column_gives_infinite_loss(rng, dtype):
    """A target whose logit is -inf has p_y = 0: loss +inf, as in PyTorch; the gradient stays
    finite (p - onehot). The mean is then +inf as well."""
    logits = random_logits(rng, 4, 40, dtype)
    target = random_target(rng, 4, 40)
    logits[1, target[1]] = -np.inf
    logits[1, (target[1] + 1) % 40] = -np.inf
    for reduction in ("none", "mean"):
        res = check_against_reference_and_torch(logits, target, dtype, reduction=reduction)
        assert np.isfinite(to_numpy(res.grad)).all()
    loss = to_numpy(numba_ce.cross_entropy(logits, target, reduction="none"))
    assert loss[1] == np.inf and np.isfinite(loss[[0, 2, 3]]).all()


def test_masked_columns_with_label_smoothing(rng):
    """Label smoothing spreads eps/V of the target over every column, -inf ones included: the
    loss is +inf, as in PyTorch, and the gradient is finite (-eps/V at a masked column)."""
    logits = random_logits(rng, 3, 40)
    logits[:, ::5] = -np.inf
    target = np.array([1, 2, 3])
    res = check_against_reference_and_torch(logits, target, "float32", reduction="none",
                                            label_smoothing=0.1)
    assert (to_numpy(res.loss) == np.inf).all() and np.isfinite(to_numpy(res.grad)).all()


def test_fully_masked_row_is_nan(rng):
    """Every column -inf: no class has any probability; loss and gradient NaN, as in PyTorch."""
    logits = random_logits(rng, 3, 40)
    logits[2] = -np.inf
    target = np.array([1, 2, 3])
    res = check_against_reference_and_torch(logits, target, "float32", reduction="none")
    assert np.isnan(to_numpy(res.loss)[2]) and np.isnan(to_numpy(res.grad)[2]).all()
    assert np.isfinite(to_numpy(res.loss)[:2]).all()


# --- large magnitudes -------------------------------------------------------------------------

def check_large(logits, target, dtype, **options):
    """Loss, lse and gradient as accurate as for small logits: the loss to fp32's relative
    precision, the gradient to the format's (relative to its largest element). Only the label
    smoothing term, (eps / V) * (S_w * lse - sum_j w_j x_j), may lose a few fp32 ulp of
    V * max|x| to cancellation."""
    expected = reference.cross_entropy_with_grad(logits, target, **options)
    res = numba_ce.cross_entropy_with_grad(logits, target, **options)
    magnitude = np.abs(logits.astype(np.float64)).max()
    smoothing_slack = options.get("label_smoothing", 0.0) * 8 * np.finfo(np.float32).eps * magnitude
    loss_rtol, loss_atol = TOLERANCES[dtype]["loss"]
    grad_rtol, grad_atol = TOLERANCES[dtype]["grad"]
    assert np.isfinite(to_numpy(res.lse)).all() and np.isfinite(to_numpy(res.loss)).all()
    assert_close(res.lse, expected.lse, loss_rtol, loss_atol, "lse")
    assert_close(res.loss, expected.loss, loss_rtol, loss_atol + smoothing_slack, "loss")
    assert_close(numba_ce.cross_entropy(logits, target, **options), expected.loss, loss_rtol,
                 loss_atol + smoothing_slack, "loss-only kernel")
    assert_close(res.grad, expected.grad, grad_rtol, grad_atol * np.abs(expected.grad).max(),
                 "grad")
    return res


@pytest.mark.parametrize("n_classes", WIDTHS)
def test_fp32_logits_of_ten_thousand(rng, n_classes):
    """Logits spread over [-1e4, 1e4] (exp overflows beyond 88: the online max must shift
    first), and rows whose values sit within a few units of +-1e4, where p is spread over many
    classes and an ulp of lse (1e-3) is a visible error in x - lse."""
    logits = rng.uniform(-1e4, 1e4, (6, n_classes)).astype(np.float32)
    logits[0] = 1e4  # a tie at the top: p = 1/V everywhere
    logits[1, :3] = [1e4, -1e4, 1e4 - 1]
    logits[3:5] = 1e4 - rng.uniform(0, 8, (2, n_classes))
    logits[5] = -1e4 + rng.uniform(0, 8, n_classes)
    target = random_target(rng, 6, n_classes)
    target[2] = int(np.argmax(logits[2]))
    check_large(logits, target, "float32", reduction="none")
    check_large(logits, target, "float32", label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("n_classes", WIDTHS)
def test_fp16_full_range(rng, n_classes):
    """fp16 values up to +-65504 (its largest), with subnormals and zeros among them; a row of
    ties at the top (65504 and its neighbour 65472: p = 1/k over the k maxima)."""
    logits = (rng.uniform(-1, 1, (5, n_classes)) * 65504).astype(np.float16)
    logits[0, :4] = [65504, -65504, 6e-8, 0]
    logits[1, :] = -65504
    logits[1, 7] = 65504
    logits[2] = rng.choice(np.array([65504, 65472], np.float16), n_classes)
    target = random_target(rng, 5, n_classes)
    check_large(logits, target, "float16", reduction="none")
    check_large(logits, target, "float16", reduction="mean", label_smoothing=0.2)


@pytest.mark.parametrize("n_classes", WIDTHS)
def test_bf16_full_range(rng, n_classes):
    """bf16 values with exponents across its whole range, +-3.39e38 (its largest) included.
    x - max overflows fp32 to -inf for opposite extremes (exp gives 0, as it should); the lse
    stays finite. Targets sit on non-negative logits: lse - x_y then fits in fp32 (a loss above
    3.4e38 is +inf in fp32, whatever the method), and no label smoothing (the sum of a row of
    such values overflows fp32). For "mean" the targets are the rows' maxima, so that the sum
    of the row losses fits in fp32 too. Two tied maxima of 3.39e38 have p = 1/2 each: lse - x
    would round log(2) away (an ulp of lse is 2e31), log p = (x - m) - log(s) keeps it."""
    bf16_max = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    exponents = rng.uniform(-120, 127.99, (5, n_classes))
    signs = rng.choice([-1.0, 1.0], (5, n_classes))
    logits = (signs * 2.0**exponents).astype(ml_dtypes.bfloat16)
    logits[0, :3] = [bf16_max, -bf16_max, bf16_max]
    logits[1, :] = -bf16_max
    logits[1, 4] = 0
    target = np.array([rng.choice(np.flatnonzero(row.astype(np.float32) >= 0)) for row in logits])
    check_large(logits, target, "bfloat16", reduction="none")
    check_large(logits, np.argmax(logits.astype(np.float32), axis=1), "bfloat16",
                reduction="mean", weight=rng.random(n_classes) + 0.5)


# --- confident predictions in bf16 --------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_confident_bf16_gradient_beats_torch_bf16(rng, reduction):
    """p_y = 0.999: the gradient at the target is p_y - 1 = -0.001, which a bf16 read-modify-write
    loses. Ours forms it in fp32 and rounds once: its error against the exact gradient (float64,
    on the same bf16 logits) must be no worse than PyTorch's own bf16 autograd on the CPU, and
    within 1% at the target column."""
    torch = pytest.importorskip("torch")
    n_rows, n_classes = 8, 512
    x = rng.standard_normal((n_rows, n_classes)) * 0.5
    target = rng.integers(0, n_classes, n_rows)
    rows = np.arange(n_rows)
    others = np.log(np.exp(x).sum(axis=1) - np.exp(x[rows, target]))
    x[rows, target] = others + np.log(0.999 / 0.001)  # p_y = 0.999 before rounding to bf16
    logits = x.astype(ml_dtypes.bfloat16)

    exact = reference.cross_entropy_with_grad(logits, target, reduction=reduction).grad
    p_target = np.exp(logits.astype(np.float64)[rows, target]
                      - reference.cross_entropy_with_grad(logits, target).lse)
    assert (np.abs(p_target - 0.999) < 2e-4).all(), "the set-up gives p_y = 0.999"
    ours = to_numpy(numba_ce.cross_entropy_with_grad(logits, target, reduction=reduction).grad)
    ours_error = np.abs(ours.astype(np.float64) - exact)

    torch_logits = torch.tensor(logits.astype(np.float32)).to(torch.bfloat16).requires_grad_()
    torch.nn.functional.cross_entropy(torch_logits, torch.tensor(target),
                                      reduction=reduction).backward()
    torch_error = np.abs(torch_logits.grad.float().numpy().astype(np.float64) - exact)

    assert ours_error.max() <= torch_error.max(), (
        f"max gradient error: ours {ours_error.max():.3g}, torch bf16 {torch_error.max():.3g}")
    relative = ours_error[rows, target] / np.abs(exact[rows, target])
    assert relative.max() < 1e-2, f"relative error at the target column up to {relative.max():.3g}"


# --- class weights and upstream gradients that are not finite ---------------------------------

def untargeted_class(target, n_classes):
    """A class that no row targets."""
    return int(np.setdiff1d(np.arange(n_classes), target)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_of_a_class_no_row_targets(rng, dtype, reduction, bad):
    """Such a weight multiplies nothing in torch's formula: loss and gradient stay finite, as
    torch's (every gradient entry was NaN: the sum of all weights entered it at eps = 0)."""
    logits = random_logits(rng, 6, 40, dtype)
    target = random_target(rng, 6, 40, ignored_share=0.3)
    weight = (rng.random(40) + 0.5).astype(np.float32)
    weight[untargeted_class(target, 40)] = bad
    res = check_against_reference_and_torch(logits, target, dtype, weight=weight,
                                            reduction=reduction)
    assert np.isfinite(to_numpy(res.grad).astype(np.float64)).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_non_finite_upstream_gives_torchs_gradient(rng, reduction, upstream, label_smoothing):
    """An upstream gradient of +-inf or NaN (a loss-scale overflow) gives torch's gradient: +-inf
    off the target, NaN at it (torch forms g * p_y - g) and everywhere with label smoothing, 0
    in ignored rows. It was NaN everywhere: the z-loss term formed inf * 0 at z_loss = 0."""
    logits = random_logits(rng, 6, 40)
    target = random_target(rng, 6, 40)
    target[2] = -100
    grad_output = (np.array([1.0, upstream, upstream, -2.0, upstream, 0.5])
                   if reduction == "none" else upstream)
    options = dict(reduction=reduction, label_smoothing=label_smoothing)
    res = numba_ce.cross_entropy_with_grad(logits, target, grad_output=grad_output, **options)
    _, expected = torch_loss_and_grad(logits, target, grad_output=grad_output, **options)
    assert_close(res.grad, expected, *TOLERANCES["float32"]["grad"], "grad vs torch")
    assert not np.isfinite(expected).all(), "the case has non-finite gradient entries"
