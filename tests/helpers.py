"""Shared test helpers: inputs, tolerances, comparisons that report the worst element, and an
independent torch (float64, autograd) implementation of the loss."""
import ml_dtypes
import numpy as np


DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Per logits dtype: (rtol, atol) for the loss, and (rtol, atol relative to max |grad|) for the
# gradient, which is rounded once to the logits' format (fp16 keeps 11 significant bits and
# flushes below 6e-8; bf16 keeps 8). The loss is fp32 whatever the input.
TOLERANCES = {
    "float32": {"loss": (2e-5, 1e-6), "grad": (2e-5, 1e-6)},
    "float16": {"loss": (2e-5, 1e-6), "grad": (1e-3, 1e-4)},
    "bfloat16": {"loss": (2e-5, 1e-6), "grad": (8e-3, 1e-3)},
}


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


def to_numpy(a):
    """NumPy arrays and scalars as they are, CuPy arrays copied to the host."""
    return a.get() if hasattr(a, "__cuda_array_interface__") else a


def assert_close(actual, expected, rtol, atol, what):
    """|actual - expected| <= atol + rtol * |expected| everywhere (NaN only where expected NaN)."""
    actual = np.asarray(to_numpy(actual)).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_mismatch = np.isnan(actual) != np.isnan(expected)
    assert not nan_mismatch.any(), (
        f"{what}: NaN mismatch at {np.argwhere(nan_mismatch)[:5].tolist()}")
    with np.errstate(invalid="ignore"):
        error = np.where(np.isnan(expected), 0.0, np.abs(actual - expected))
        error = np.where(np.isinf(expected) & (actual == expected), 0.0, error)
    excess = error - (atol + rtol * np.abs(np.nan_to_num(expected)))
    if excess.size and excess.max() > 0:
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {excess.size} elements off; worst at "
            f"{tuple(int(i) for i in worst)}: got {actual[worst]!r}, expected {expected[worst]!r} "
            f"(error {error[worst]:.3g}, allowed {atol + rtol * abs(expected[worst]):.3g})")


def torch_loss_and_grad(logits, target, *, grad_output=None, **options):
    """PyTorch's cross_entropy in float64 (CPU), plus z-loss and softcap written out, and its
    autograd gradient: an implementation independent of ours."""
    import torch

    x = torch.tensor(np.asarray(logits).astype(np.float64), requires_grad=True)
    total = torch_total_loss(x, target, **options)
    (grad,) = _torch_grads(total, [x], grad_output) if x.shape[0] else (torch.zeros_like(x),)
    return total.detach().numpy(), grad.numpy()


def torch_linear_loss_and_grads(input, linear_weight, target, *, linear_bias=None,
                                grad_output=None, **options):
    """The unfused linear + cross-entropy in torch float64 (CPU): logits = x @ W^T + b, the loss
    of :func:`torch_total_loss`, and the autograd gradients of x, W and b (None without b)."""
    import torch

    leaves = [torch.tensor(np.asarray(a).astype(np.float64), requires_grad=True)
              for a in (input, linear_weight)]
    if linear_bias is not None:
        leaves.append(torch.tensor(np.asarray(linear_bias).astype(np.float64),
                                   requires_grad=True))
    logits = leaves[0] @ leaves[1].T + (leaves[2] if linear_bias is not None else 0.0)
    total = torch_total_loss(logits, target, **options)
    grads = [g.numpy() for g in _torch_grads(total, leaves, grad_output)]
    return (total.detach().numpy(), *grads, *([None] if linear_bias is None else []))


def torch_total_loss(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                     label_smoothing=0.0, z_loss=0.0, softcap=None):
    """F.cross_entropy of float64 ``logits`` (a tensor), plus z-loss and softcap written out."""
    import torch
    import torch.nn.functional as F

    t = torch.tensor(np.asarray(target), dtype=torch.int64)
    w = None if weight is None else torch.tensor(np.asarray(weight, dtype=np.float64))
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(capped, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    valid = t != ignore_index
    z_rows = z_loss * torch.logsumexp(capped, dim=1) ** 2 * valid
    z_part = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / valid.sum()}[reduction]
    return loss + z_part


def _torch_grads(total, leaves, grad_output):
    import torch

    upstream = torch.ones_like(total) if grad_output is None else torch.as_tensor(
        np.asarray(grad_output, dtype=np.float64)).expand_as(total)
    return torch.autograd.grad(total, leaves, upstream)
