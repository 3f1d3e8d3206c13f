"""A float64 NumPy implementation of both public functions: the test oracle and the math in plain code.

Same signatures as :func:`numba_ce.cross_entropy` and :func:`numba_ce.cross_entropy_with_grad`,
NumPy arrays only. Read it top to bottom as the definition of what the kernels compute.
"""
import numpy as np

from .results import CrossEntropyResult


def _forward(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row pieces of the loss, in float64."""
    raw = np.asarray(logits).astype(np.float64)
    x = raw if softcap is None else softcap * np.tanh(raw / softcap)
    n_rows, n_classes = x.shape
    w = np.ones(n_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    valid = np.asarray(target) != ignore_index
    label = np.where(valid, target, 0)
    rows = np.arange(n_rows)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = x.max(axis=1, initial=-np.inf, keepdims=True)
        m_safe = np.where(np.isfinite(m), m, 0.0)  # a row of -inf keeps lse = -inf
        lse = (m_safe + np.log(np.exp(x - m_safe).sum(axis=1, keepdims=True)))[:, 0]
        p = np.exp(x - lse[:, None])
        # ce = (1 - eps) * w_y * (lse - x_y) + (eps / V) * sum_j w_j * (lse - x_j)
        nll = w[label] * (lse - x[rows, label])
        smooth = (w * (lse[:, None] - x)).sum(axis=1) if label_smoothing else 0.0  # inf at -inf x
        ce = (1 - label_smoothing) * nll + label_smoothing / n_classes * smooth
        zl = z_loss * lse**2
    ce, zl, lse = (np.where(valid, a, 0.0) for a in (ce, zl, lse))
    return x, raw, w, valid, label, p, lse, ce, zl


def _reduce(ce, zl, w_label, valid, reduction):
    if reduction == "none":
        return ce + zl, zl
    if reduction == "sum":
        return np.float64(ce.sum() + zl.sum()), np.float64(zl.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        z_mean = zl.sum() / valid.sum()
        return ce.sum() / w_label[valid].sum() + z_mean, z_mean


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None):
    _, _, w, valid, label, _, _, ce, zl = _forward(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    return _reduce(ce, zl, w[label], valid, reduction)[0]


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=None,
                            inplace=False):
    """float64 loss, gradient (float64, whatever the logits' dtype), z-loss part and lse.
    ``inplace`` is accepted for signature parity and ignored: the reference never writes."""
    x, raw, w, valid, label, p, lse, ce, zl = _forward(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    loss, z_part = _reduce(ce, zl, w[label], valid, reduction)
    n_rows, n_classes = x.shape
    g = np.broadcast_to(np.float64(1.0) if grad_output is None else
                        np.asarray(grad_output, dtype=np.float64).reshape(-1), (n_rows,))
    if reduction == "mean":  # CE part over sum of w_y, z part over the count of valid rows
        with np.errstate(divide="ignore"):
            g_ce, g_z = g / w[label][valid].sum(), g / valid.sum()
    else:
        g_ce = g_z = g

    eps = label_smoothing
    onehot = np.zeros_like(x)
    onehot[np.arange(n_rows), label] = 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        # dce/dx_j = (1 - eps) w_y (p_j - [j == y]) + (eps / V) (S_w p_j - w_j);  dzl/dx_j = 2 z lse p_j
        d_ce = (1 - eps) * w[label][:, None] * (p - onehot) + eps / n_classes * (w.sum() * p - w)
        d_z = 2 * z_loss * lse[:, None] * p
        grad = g_ce[:, None] * d_ce + g_z[:, None] * d_z
        if softcap is not None:
            grad *= 1 - np.tanh(raw / softcap) ** 2
    grad[~valid] = 0.0
    return CrossEntropyResult(loss, grad, z_part, lse)
