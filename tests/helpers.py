"""Shared test helpers: inputs, tolerances, comparisons that report the worst element, an
independent torch (float64, autograd) implementation of the loss, and compiling offline."""
import json
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import ml_dtypes
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# portable.fast_tanh(y, scale)'s largest absolute error against tanh(y * scale), which
# tests/test_fast_tanh.py holds it to: a capped logit c * tanh(x / c) is off by up to c times
# this whatever x is, so near 0 its relative error is not fp32's (lse and loss inherit it).
FAST_TANH_ERROR = 3.1e-7

# Per logits dtype: (rtol, atol) for the loss, and (rtol, atol relative to max |grad|) for the
# gradient, which is rounded once to the logits' format (fp16 keeps 11 significant bits and
# flushes below 6e-8; bf16 keeps 8). The loss is fp32 whatever the input.
TOLERANCES = {
    "float32": {"loss": (2e-5, 1e-6), "grad": (2e-5, 1e-6)},
    "float16": {"loss": (2e-5, 1e-6), "grad": (1e-3, 1e-4)},
    "bfloat16": {"loss": (2e-5, 1e-6), "grad": (8e-3, 1e-3)},
}


def loss_tolerance(dtype, softcap=None):
    """TOLERANCES' (rtol, atol) for the loss and lse of ``dtype``, the atol widened by softcap's
    c * FAST_TANH_ERROR (a capped logit near 0 has no fp32 relative accuracy)."""
    rtol, atol = TOLERANCES[dtype]["loss"]
    return rtol, atol + (0.0 if softcap is None else softcap * FAST_TANH_ERROR)


def random_logits(rng, n_rows, n_classes, dtype="float32", scale=3.0):
    """Normal logits rounded to ``dtype`` (the reference reads the rounded values)."""
    return (rng.standard_normal((n_rows, n_classes)) * scale).astype(DTYPES[dtype])


def random_target(rng, n_rows, n_classes, ignore_index=-100, ignored_share=0.0):
    target = rng.integers(0, n_classes, n_rows)
    target[rng.random(n_rows) < ignored_share] = ignore_index
    return target


def random_weight(rng, n_classes, weighted):
    """Class weights in [0.5, 1.5) as float32, or None."""
    return (rng.random(n_classes) + 0.5).astype(np.float32) if weighted else None


def random_upstream(rng, n_rows, reduction, upstream):
    """The grad_output of a case: None for "ones"; for "given", 0.37, or a random (N,) array
    under reduction "none"; for "scaled", a GradScaler-sized 65536."""
    if upstream == "given":
        return rng.standard_normal(n_rows) if reduction == "none" else 0.37
    return {"ones": None, "scaled": 65536.0}[upstream]


def core_call(logits, target, *, with_grad=True, weight=None, grad_output=None, inplace=False,
              validate=True, alloc=None, device=None, **options):
    """numba_ce.api.compute, the call behind the public functions, with an allocator and
    device properties of the test's own (``options``: those of numba_ce.options.Options)."""
    from numba_ce import api
    from numba_ce.options import Options

    return api.compute(logits, target, Options(**options), weight=weight,
                       grad_output=grad_output, with_grad=with_grad, inplace=inplace,
                       validate=validate, alloc=alloc, device=device)


def with_and_without_grad(logits, original, target, *, grad_output, inplace, alloc, device,
                          **options):
    """(cross_entropy_with_grad's result on ``logits``, cross_entropy's loss on ``original``):
    the public functions, or with an allocator or device properties :func:`core_call`, the call
    behind them."""
    import numba_ce

    if alloc is None and device is None:
        return (numba_ce.cross_entropy_with_grad(logits, target, grad_output=grad_output,
                                                 inplace=inplace, **options),
                numba_ce.cross_entropy(original, target, **options))
    return (core_call(logits, target, grad_output=grad_output, inplace=inplace, alloc=alloc,
                      device=device, **options),
            core_call(original, target, with_grad=False, alloc=alloc, device=device,
                      **options).loss)


def gradient_error_scale(expected_grad, grad_output, n_rows, denominator):
    """What a gradient's errors scale with: its largest entry, or where larger a row's upstream
    gradient over the reduction's ``denominator`` (1 for "sum" and "none")."""
    upstream = np.abs(np.broadcast_to(1.0 if grad_output is None else grad_output,
                                      (n_rows,))).max(initial=0.0)
    return max(np.abs(expected_grad).max(initial=0.0), upstream / denominator, 1e-30)


class PoisonedArrays:
    """An allocator (``empty``) of arrays whose every byte is 0xFF: NaN in every float format,
    so an element a kernel does not write shows. CuPy arrays on a GPU, NumPy in the simulator:
    what the calls of NumPy inputs compute with."""

    def __init__(self):
        from numba_ce import devices
        self.xp = devices.cupy if devices.gpu_available() else np

    def empty(self, shape, dtype):
        out = self.xp.empty(shape, dtype)
        out.view(np.uint8).fill(0xFF)
        return out


def to_numpy(a):
    """NumPy arrays and scalars as they are, CuPy arrays copied to the host."""
    return a.get() if hasattr(a, "__cuda_array_interface__") else a


def assert_close(actual, expected, rtol, atol, what):
    """|actual - expected| <= atol + rtol * |expected| everywhere (NaN only where expected NaN);
    ``atol`` may be an array of the expected's shape."""
    actual = np.asarray(to_numpy(actual)).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_mismatch = np.isnan(actual) != np.isnan(expected)
    assert not nan_mismatch.any(), (
        f"{what}: NaN mismatch at {np.argwhere(nan_mismatch)[:5].tolist()}")
    with np.errstate(invalid="ignore"):
        error = np.where(np.isnan(expected), 0.0, np.abs(actual - expected))
        error = np.where(np.isinf(expected) & (actual == expected), 0.0, error)
    allowed = np.broadcast_to(atol + rtol * np.abs(np.nan_to_num(expected)), expected.shape)
    excess = error - allowed
    if excess.size and excess.max() > 0:
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {excess.size} elements off; worst at "
            f"{tuple(int(i) for i in worst)}: got {actual[worst]!r}, expected {expected[worst]!r} "
            f"(error {error[worst]:.3g}, allowed {allowed[worst]:.3g})")


def assert_like_reference(res, expected, logits, dtype, grad_scale):
    """A call's CrossEntropyResult against the reference's, within TOLERANCES of ``dtype`` (the
    gradient's atol relative to ``grad_scale``); float32 loss and lse, the gradient of the
    logits' shape and dtype."""
    loss_tol, grad_tol = TOLERANCES[dtype]["loss"], TOLERANCES[dtype]["grad"]
    assert_close(res.loss, expected.loss, *loss_tol, "loss")
    assert_close(res.z_loss, expected.z_loss, *loss_tol, "z_loss")
    assert_close(res.lse, expected.lse, *loss_tol, "lse")
    assert_close(res.grad, expected.grad, grad_tol[0], grad_tol[1] * grad_scale, "grad")
    assert to_numpy(res.loss).dtype == np.float32 and to_numpy(res.lse).dtype == np.float32
    assert res.grad.dtype == logits.dtype and res.grad.shape == logits.shape


def torch_loss_and_grad(logits, target, *, grad_output=None, **options):
    """PyTorch's cross_entropy in float64 (CPU), plus z-loss and softcap written out, and its
    autograd gradient: an implementation independent of ours."""
    torch = pytest.importorskip("torch")

    with torch.device("cpu"):  # whatever the caller's default device (a spawned NCCL rank's)
        x = torch.tensor(np.asarray(logits).astype(np.float64), requires_grad=True)
        total = torch_total_loss(x, target, **options)
        (grad,) = _torch_grads(total, [x], grad_output) if x.shape[0] else (torch.zeros_like(x),)
    return total.detach().numpy(), grad.numpy()


# Half an ulp, relative: the largest relative error of one rounding to each format; and the
# largest absolute error of a rounding below its normal range (half fp16's subnormal spacing;
# float32 and bf16 values below 2**-126 may be flushed to 0 by the kernels' float32 math).
# Inductor and Triton warn about their own settings and imports (TF32 left off, torch.jit's
# deprecation when Inductor first imports torch.utils.mkldnn): not ours.
INDUCTOR_WARNINGS = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
HALF_ULP = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
TINY_ERROR = {"float32": 2.0**-126, "float16": 2.0**-25, "bfloat16": 2.0**-126}


class LinearExpected(NamedTuple):
    """The unfused linear cross-entropy in float64: the loss, the gradients (grad_linear_bias
    None without a bias), and for each gradient the magnitudes that scale its rounding errors:
    the sum of its terms' magnitudes (|dz| @ |W|, |dz|^T @ |x|, sum_i |dz_i|) and the same
    with every |dz| = 1 (for the absolute error of a dz rounded below the normal range); None
    without ``logits_format``, where they would bound nothing."""
    loss: np.ndarray
    grad_input: np.ndarray
    grad_linear_weight: np.ndarray
    grad_linear_bias: np.ndarray | None
    magnitudes: tuple


def torch_linear_loss_and_grads(input, linear_weight, target, *, linear_bias=None,
                                grad_output=None, logits_format=None, **options):
    """The unfused linear + cross-entropy in torch float64 (CPU): logits z = x @ W^T + b, the loss
    of :func:`torch_total_loss` and its autograd gradient dz, then dx = dz @ W, dW = dz^T @ x,
    db = sum_i dz_i. With ``logits_format`` the logits are rounded to that format as numba_ce's
    chunks round them: the product x @ W^T once, and with a bias the sum once more
    (linear_work.logits_into adds the bias as a product of its own), and the magnitudes of
    :class:`LinearExpected` are computed."""
    torch = pytest.importorskip("torch")

    def rounded(values):
        if logits_format is None:
            return values
        return values.astype(DTYPES[logits_format]).astype(np.float64)

    x, w = (np.asarray(a).astype(np.float64) for a in (input, linear_weight))
    z = rounded(x @ w.T)
    if linear_bias is not None:
        z = rounded(z + np.asarray(linear_bias).astype(np.float64))
    with torch.device("cpu"):  # whatever the caller's default device (a spawned NCCL rank's)
        logits = torch.tensor(z, requires_grad=True)
        total = torch_total_loss(logits, target, **options)
        (dz,) = (t.numpy() for t in _torch_grads(total, [logits], grad_output))
    grads = [dz @ w, dz.T @ x, None if linear_bias is None else dz.sum(axis=0)]
    magnitudes = None
    if logits_format is not None:
        size, abs_x, abs_w, abs_dz = dz.shape[0], np.abs(x), np.abs(w), np.abs(dz)
        magnitudes = ((abs_dz @ abs_w, np.broadcast_to(abs_w.sum(axis=0), x.shape)),
                      (abs_dz.T @ abs_x, np.broadcast_to(abs_x.sum(axis=0), w.shape)),
                      (abs_dz.sum(axis=0), np.full(w.shape[0], float(size))))
    return LinearExpected(total.detach().numpy(), *grads, magnitudes)


def assert_rounded_close(actual, expected, magnitudes, dtype, what, roundings=1):
    """A gradient that numba_ce forms from float32 terms of dz rounded to ``dtype`` (stored in
    the logits' format) and rounds ``roundings`` times more (the result; an upstream factor
    applied to it): |error| <= half an ulp of each, relative, times the terms' magnitudes and
    the result's; TINY_ERROR per term for a dz below the normal range; 1e-5 of the terms'
    magnitudes for the kernel's float32 math and 1e-6 of the largest result for float32 sums.
    ``magnitudes``: a pair of LinearExpected.magnitudes. (fp16 "mean" stores dz as p_j - [j ==
    y] and scales afterwards, so its subnormal error grows by g / S_w: the 1e-6 covers it.)"""
    expected = np.asarray(expected, dtype=np.float64)
    terms, unit_terms = magnitudes
    atol = ((HALF_ULP[dtype] + 1e-5) * terms + TINY_ERROR[dtype] * unit_terms
            + 1e-6 * np.abs(expected).max(initial=0.0) + 1e-30)
    assert_close(actual, expected, roundings * HALF_ULP[dtype], atol, what)


def torch_total_loss(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                     label_smoothing=0.0, z_loss=0.0, softcap=None):
    """F.cross_entropy of float64 ``logits`` (a tensor), plus z-loss and softcap written out;
    ``target``: class indices (N,), or class probabilities (N, V) (taken in float64)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    target = np.asarray(target)
    probabilities = target.ndim == 2
    t = (torch.tensor(target.astype(np.float64)) if probabilities
         else torch.tensor(target, dtype=torch.int64))
    w = None if weight is None else torch.tensor(np.asarray(weight, dtype=np.float64))
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(capped, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if not z_loss:  # torch's own graph: an infinite upstream then meets no 0 * inf
        return loss
    valid = torch.ones(len(t), dtype=torch.bool) if probabilities else t != ignore_index
    z_rows = z_loss * torch.logsumexp(capped, dim=1) ** 2 * valid
    # "mean" over no counted rows: the z part is 0 (its sum is), so that the total keeps
    # F.cross_entropy's NaN loss and 0 gradient instead of a 0 / 0 gradient
    z_mean = z_rows.sum() / valid.sum().clamp(min=1)
    z_part = {"none": z_rows, "sum": z_rows.sum(), "mean": z_mean}[reduction]
    return loss + z_part


def _torch_grads(total, leaves, grad_output):
    torch = pytest.importorskip("torch")

    upstream = torch.ones_like(total) if grad_output is None else torch.as_tensor(
        np.asarray(grad_output, dtype=np.float64)).expand_as(total)
    return torch.autograd.grad(total, leaves, upstream)


def run_offline(script):
    """What ``script`` prints on its last line, as JSON: the script runs in a Python process
    without NUMBA_ENABLE_CUDASIM, where Numba compiles for sm_90 (no GPU needed). Skips the test
    where NVVM is missing."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode and "NVVM" in done.stderr:
        pytest.skip(f"no NVVM to compile with: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
