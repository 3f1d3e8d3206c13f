"""Checks of every public argument. Each error says what was expected and what arrived."""
import math
import numbers

import numpy as np

from .floatbits import FORMATS

REDUCTIONS = ("mean", "sum", "none")


def check_options(ignore_index, reduction, label_smoothing, z_loss, softcap):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none' (got {reduction!r})")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int (got {type(ignore_index).__name__})")
    label_smoothing = _real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1] (got {label_smoothing})")
    z_loss = _real("z_loss", z_loss)
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss must be a finite number >= 0 (got {z_loss})")
    if softcap is not None:
        softcap = _real("softcap", softcap)
        if not (softcap > 0.0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be None or a finite number > 0 (got {softcap})")
    return int(ignore_index), reduction, label_smoothing, z_loss, softcap


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (got {type(value).__name__})")
    return float(value)


def check_logits(logits):
    """The logits' format name ('float32', 'float16' or 'bfloat16'); raises on a bad layout."""
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) != 2:
        got = "no shape" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(
            f"logits must be 2-D (N, V) with the class dimension last (got {got}); "
            "for (batch, seq, V) logits pass logits.reshape(-1, V)")
    if logits.dtype.name not in FORMATS:
        raise TypeError(
            f"logits dtype must be float32, float16 or bfloat16 (got {logits.dtype.name})")
    n_rows, n_classes = shape
    if n_classes < 1:
        raise ValueError(f"logits must have at least one class (got shape {tuple(shape)})")
    itemsize = logits.dtype.itemsize
    row_stride, col_stride = logits.strides
    if n_rows == 0:  # nothing is read; empty arrays may report any strides
        return logits.dtype.name
    if n_classes > 1 and col_stride != itemsize:
        raise ValueError(
            f"logits rows must be contiguous (class stride {itemsize} bytes; got {col_stride}); "
            "pass a contiguous copy")
    if n_rows > 1 and row_stride < n_classes * itemsize:
        raise ValueError(
            f"logits rows must not overlap or run backwards (row stride >= {n_classes * itemsize} "
            f"bytes; got {row_stride})")
    return logits.dtype.name


def check_target(target, n_rows):
    shape = getattr(target, "shape", None)
    if shape is None or tuple(shape) != (n_rows,):
        got = "no shape" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"target must have shape ({n_rows},) to match logits (got {got})")
    if target.dtype not in (np.int32, np.int64):
        raise TypeError(f"target dtype must be int32 or int64 (got {target.dtype.name})")


def check_weight(weight, n_classes):
    shape = getattr(weight, "shape", None)
    if shape is None or tuple(shape) != (n_classes,):
        got = "no shape" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"weight must have shape ({n_classes},), one per class (got {got})")
    if weight.dtype.kind != "f":
        raise TypeError(f"weight must be a float array (got {weight.dtype.name})")


def check_grad_output(grad_output, reduction, n_rows):
    """None, a scalar, or (N,) for reduction='none'. Returns the shape to read it as."""
    if grad_output is None or isinstance(grad_output, numbers.Real):
        return ()
    shape = tuple(getattr(grad_output, "shape", (None,)))
    if shape in ((), (1,)):
        return shape
    if reduction == "none" and shape == (n_rows,):
        return shape
    expected = f"a scalar or shape ({n_rows},)" if reduction == "none" else "a scalar"
    raise ValueError(f"grad_output for reduction={reduction!r} must be {expected} (got shape {shape})")
