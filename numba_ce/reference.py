"""A float64 NumPy implementation of both public functions: the test oracle, and the math in
plain code.

Same signatures as :func:`numba_ce.cross_entropy` and :func:`numba_ce.cross_entropy_with_grad`,
NumPy arrays only. Read it top to bottom as the definition of what the kernels compute. A target
is class indices (N,), or class probabilities (N, V) (:func:`_probability_targets`, PyTorch's
formula for them).
"""
import numpy as np

from . import validation
from .results import CrossEntropyResult


def _log_softmax(x):
    """(log p, lse) of each row of float64 ``x``:
    log p_j = (x_j - m) - log(s), s = sum_j exp(x_j - m): exact for logits of any size (lse - x_j
    would cancel: at |x| = 3e38, lse = m + log(2) rounds to m even in float64)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = x.max(axis=1, initial=-np.inf, keepdims=True)
        m_safe = np.where(np.isfinite(m), m, 0.0)  # a row of -inf keeps lse = -inf
        shifted = x - m_safe
        log_s = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return shifted - log_s, (m_safe + log_s)[:, 0]


def _forward(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, validate):
    """Per-row pieces of the loss, in float64."""
    raw = np.asarray(logits).astype(np.float64)
    x = raw if softcap is None else softcap * np.tanh(raw / softcap)
    n_rows, n_classes = x.shape
    w = np.ones(n_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    target = np.asarray(target)
    if target.ndim == 2:
        return _probability_targets(x, raw, w, target, label_smoothing, z_loss)
    ignored = target == ignore_index
    out_of_range = ~ignored & ((target < 0) | (target >= n_classes))
    if validate and out_of_range.any():
        row = int(np.argmax(out_of_range))
        raise validation.target_out_of_range(row, int(target[row]), n_classes, ignore_index)
    valid = ~ignored & ~out_of_range  # the rows that count, in the loss and in "mean"'s denominator
    label = np.where(valid, target, 0)
    rows = np.arange(n_rows)

    log_p, lse = _log_softmax(x)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        p = np.exp(log_p)
        # ce = (1 - eps) * w_y * (lse - x_y) + (eps / V) * sum_j w_j * (lse - x_j), lse - x = -log p
        nll = -w[label] * log_p[rows, label]
        smooth = -(w * log_p).sum(axis=1) if label_smoothing else 0.0  # inf at -inf x
        ce = (1 - label_smoothing) * nll + label_smoothing / n_classes * smooth
        zl = z_loss * lse**2
    ce, zl, lse = (np.where(valid, a, 0.0) for a in (ce, zl, lse))
    # NaN rows, as in PyTorch: a NaN or +inf logit (after softcap) makes the row's loss, lse and
    # gradient NaN, and so does an out-of-range target when unchecked. Ignored rows are not read.
    nan_rows = out_of_range | (~ignored & (np.isnan(x) | np.isposinf(x)).any(axis=1))
    ce, zl, lse = (np.where(nan_rows, np.nan, a) for a in (ce, zl, lse))
    onehot = np.zeros_like(x)
    onehot[rows, label] = 1.0
    return x, raw, w, valid, nan_rows, label, w[label], onehot, p, lse, ce, zl


def _probability_targets(x, raw, w, target, label_smoothing, z_loss):
    """_forward for class probabilities q (N, V), torch's formula as it stands: with q' =
    (1 - eps) q + eps / V,

        ce = -sum_j w_j q'_j log p_j       (whatever q sums to; a q'_j of 0 where x_j = -inf
                                            gives 0 * -inf = NaN, as in torch)

    Every row counts, with weight 1 in "mean"'s denominators (torch divides by N, not by a sum
    of weights). The row's "target" for the gradient is q' itself (a class index's is its
    one-hot row)."""
    n_rows, n_classes = x.shape
    q = (1 - label_smoothing) * target.astype(np.float64) + label_smoothing / n_classes
    log_p, lse = _log_softmax(x)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(log_p)
        ce = -(w * q * log_p).sum(axis=1)
        zl = z_loss * lse**2
    nan_rows = (np.isnan(x) | np.isposinf(x)).any(axis=1)
    ce, zl, lse = (np.where(nan_rows, np.nan, a) for a in (ce, zl, lse))
    valid = np.ones(n_rows, dtype=bool)
    return x, raw, w, valid, nan_rows, None, np.ones(n_rows), q, p, lse, ce, zl


def _reduce(ce, zl, row_weight, valid, reduction):
    """The loss and its z part: per row, summed, or "mean": sum(ce) / sum(row_weight[valid])
    (w_y of the counted rows; 1 a row for class probabilities) + sum(zl) / count."""
    if reduction == "none":
        return ce + zl, zl
    if reduction == "sum":
        return np.float64(ce.sum() + zl.sum()), np.float64(zl.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        z_mean = zl.sum() / valid.sum()
        return ce.sum() / row_weight[valid].sum() + z_mean, z_mean


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, validate=True):
    _, _, _, valid, _, _, row_weight, _, _, _, ce, zl = _forward(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, validate)
    return _reduce(ce, zl, row_weight, valid, reduction)[0]


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=None,
                            inplace=False, return_token_accuracy=False,
                            return_predicted_tokens=False, validate=True):
    """float64 loss, gradient (float64, whatever the logits' dtype), z-loss part and lse, and
    if asked the token accuracy and predicted tokens (:func:`_argmax_outputs`).
    ``inplace`` is accepted for signature parity and ignored: the reference never writes.
    ``validate`` as in the kernels: the same ValueError for a target outside [0, V), or with
    False NaN loss, lse and gradient in such rows (left out of "mean"'s denominator)."""
    x, raw, w, valid, nan_rows, label, row_weight, q, p, lse, ce, zl = _forward(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, validate)
    loss, z_part = _reduce(ce, zl, row_weight, valid, reduction)
    n_rows, n_classes = x.shape
    g = np.broadcast_to(np.float64(1.0) if grad_output is None else
                        np.asarray(grad_output, dtype=np.float64).reshape(-1), (n_rows,))
    if reduction == "mean":  # CE part over sum of w_y (N), z part over the count of valid rows
        with np.errstate(divide="ignore"):
            g_ce, g_z = g / row_weight[valid].sum(), g / valid.sum()
    else:
        g_ce = g_z = g

    eps = label_smoothing
    with np.errstate(invalid="ignore", over="ignore"):
        if label is None:  # class probabilities, q smoothed: p_j sum_k w_k q_k - w_j q_j
            d_ce = (w * q).sum(axis=1, keepdims=True) * p - w * q
        else:
            # dce/dx_j = (1 - eps) w_y (p_j - [j == y]) + (eps / V) (S_w p_j - w_j)
            # (each term only where its option is on, as in torch's formula: a NaN weight of a
            # class no row targets multiplies nothing, and an infinite g meets no zero z-loss)
            d_ce = (1 - eps) * w[label][:, None] * (p - q)
            if eps:
                d_ce += eps / n_classes * (w.sum() * p - w)
        # dzl/dx_j = 2 z lse p_j
        grad = g_ce[:, None] * d_ce
        if z_loss:
            grad += g_z[:, None] * (2 * z_loss * lse[:, None] * p)
        if softcap is not None:
            grad *= 1 - np.tanh(raw / softcap) ** 2
    grad[~valid] = 0.0
    grad[nan_rows] = np.nan
    accuracy, predicted = _argmax_outputs(raw, target if label is not None else None, valid,
                                          reduction)
    return CrossEntropyResult(loss, grad, z_part, lse,
                              accuracy if return_token_accuracy else None,
                              predicted if return_predicted_tokens else None)


def _argmax_outputs(raw, target, valid, reduction):
    """(token accuracy, predicted tokens): each counted row's argmax of the raw logits (softcap
    is increasing: the same), the first maximal index as torch.argmax, a row's first NaN if it
    has one (NumPy's argmax agrees); -1 where a row is not counted. The accuracy is 1 where the
    argmax is the target, 0 elsewhere, reduced over the counted rows ("mean": a share; with no
    counted row NaN, as a mean of nothing)."""
    predicted = np.where(valid, raw.argmax(axis=1), -1)
    if target is None:  # class probabilities: no target class (only the predicted tokens)
        return None, predicted.astype(np.int64)
    correct = (valid & (predicted == np.asarray(target))).astype(np.float64)
    if reduction == "none":
        return correct, predicted.astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = correct.sum() / valid.sum() if reduction == "mean" else correct.sum()
    return np.float64(accuracy), predicted.astype(np.int64)
