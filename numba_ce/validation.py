"""Checks of every public argument. Each error says what was expected and what arrived."""
import numbers

import numpy as np

from .devices import data_pointer
from .floatbits import FORMATS


def check_plain_array(name, array):
    """A NumPy array the kernels can read as its bytes say: not a masked array (its mask would
    be ignored; mark masked rows of a target with ignore_index instead) and in the machine's byte
    order (the kernels read the bytes as they are: big-endian float32 would read as 1e29)."""
    if isinstance(array, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a plain array, not a masked array (got "
                        f"numpy.ma.MaskedArray); pass {name}.filled(...), and give masked rows "
                        "of a target the ignore_index")
    if not array.dtype.isnative:
        raise TypeError(f"{name} must be in the machine's byte order (got dtype "
                        f"{array.dtype.str!r}); pass {name}.astype({array.dtype.name!r})")


def check_not_overlapping(written, flag, **read):
    """Raise if an array in ``read`` shares memory with the logits that ``flag`` (say
    "inplace=True") makes the call overwrite: the kernels would read values they are
    overwriting. Compares the bytes each array spans, so an interleaved view counts too."""
    span = memory_span(written)
    for name, array in read.items():
        other = None if array is None or isinstance(array, numbers.Real) else memory_span(array)
        if span and other and other[0] < span[1] and span[0] < other[1]:
            raise ValueError(f"{name} shares memory with the logits, which {flag} overwrites "
                             f"with the gradient; pass a copy of {name}")


def memory_span(array):
    """(first byte, one past the last byte) that an array's elements span; None if it has
    none. For NumPy and CuPy arrays and the torch adapter's TensorArrays (strides in bytes)."""
    if array.size == 0:
        return None
    start = data_pointer(array)
    extents = [(n - 1) * s for n, s in zip(array.shape, array.strides)]
    return (start + sum(min(e, 0) for e in extents),
            start + sum(max(e, 0) for e in extents) + array.itemsize)


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
    _check_readable_rows("logits", logits)
    return logits.dtype.name


def _check_readable_rows(name, array):
    """Raise ValueError unless the kernels can read the rows of ``array`` (N, V) in place, as
    they read the logits: rows contiguous, not overlapping, elements aligned."""
    n_rows = array.shape[0]
    itemsize = array.dtype.itemsize
    row_stride = array.strides[0]
    if n_rows == 0:  # nothing is read; empty arrays may report any strides
        return
    problem = row_layout_problem(array.shape, array.strides, itemsize, name)
    if problem:
        raise ValueError(problem)
    # The kernels read whole elements (or 8-byte words of them) at byte offsets built from the
    # data address and the row stride: a misaligned element is a fault on a GPU.
    address = data_pointer(array)
    if address % itemsize or (n_rows > 1 and row_stride % itemsize):
        whose = "their" if name == "logits" else "its"
        raise ValueError(
            f"{name} must be aligned to {whose} {itemsize}-byte elements (got data address "
            f"{address:#x} and row stride {row_stride} bytes)")


def row_layout_problem(shape, strides, itemsize, name="logits"):
    """What stops the kernels reading (N, V) logits (or class probabilities: ``name``) with
    these byte strides in place, or None: rows must be unit-stride over the classes and must
    neither overlap nor run backwards. (numba_ce.torch asks this to decide when to copy.)"""
    n_rows, n_classes = shape
    row_stride, col_stride = strides
    if n_rows == 0:  # nothing is read; empty arrays may report any strides
        return None
    if n_classes > 1 and col_stride != itemsize:
        return (f"{name} rows must be contiguous (class stride {itemsize} bytes; got "
                f"{col_stride}); pass a contiguous copy")
    if n_rows > 1 and row_stride < n_classes * itemsize:
        return (f"{name} rows must not overlap or run backwards (row stride >= "
                f"{n_classes * itemsize} bytes; got {row_stride})")
    return None


def check_writeable(logits):
    """inplace=True writes the gradient into ``logits``: a read-only NumPy array cannot take it."""
    flags = getattr(logits, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError("inplace=True writes the gradient into the logits, which are read-only "
                         "(got a read-only array); pass a writeable array or inplace=False")


def target_out_of_range(row, value, n_classes, ignore_index):
    """The ValueError of a checked call whose target[row] is neither in [0, V) nor ignore_index."""
    return ValueError(
        f"target[{row}] = {value} is outside [0, {n_classes}) and is not ignore_index "
        f"({ignore_index}); pass validate=False to skip this check (such rows then give NaN)")


def check_matrix(name, array, expected, hint):
    """The format name of a float32/float16/bfloat16 2-D ``array`` that matrix products can read
    in place (see :func:`matrix_layout`)."""
    shape = getattr(array, "shape", None)
    if shape is None or len(shape) != 2:
        got = "no shape" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"{name} must be 2-D {expected} (got {got}); {hint}")
    if array.dtype.name not in FORMATS:
        raise TypeError(
            f"{name} dtype must be float32, float16 or bfloat16 (got {array.dtype.name})")
    if matrix_layout(array) is None:
        raise ValueError(f"{name} must be row-major or the transpose of a row-major array, "
                         f"without broadcast or overlapping rows (got shape {tuple(shape)}, "
                         f"strides {tuple(array.strides)} bytes); pass a contiguous copy")
    return array.dtype.name


def matrix_layout(array):
    """(transposed, leading dimension in elements) of a 2-D array that is row-major (unit
    stride along a row, rows at least a row apart) or the transpose of one; None for any other
    layout (broadcast, overlapping or misaligned). A dimension of size 1 takes any stride, an
    array of no elements any layout (nothing is read)."""
    rows, cols = array.shape
    if rows == 0 or cols == 0:
        return False, max(cols, 1)
    if any(s % array.itemsize for s in array.strides):
        return None
    row_stride, col_stride = (s // array.itemsize for s in array.strides)
    if (cols <= 1 or col_stride == 1) and (rows <= 1 or row_stride >= max(cols, 1)):
        return False, max(row_stride if rows > 1 else cols, 1)
    if (rows <= 1 or row_stride == 1) and (cols <= 1 or col_stride >= max(rows, 1)):
        return True, max(col_stride if cols > 1 else rows, 1)
    return None


def check_same_dtype(name, array, input):
    if array.dtype != input.dtype:
        raise TypeError(f"{name} dtype must match input's {input.dtype.name} "
                        f"(got {array.dtype.name})")


def check_chunk_size(chunk_size):
    """None (the default) or a positive int number of rows."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be None or an int (got {type(chunk_size).__name__})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 row (got {chunk_size})")


def check_target(target, n_rows, rows_of="logits"):
    """Class indices: int32 or int64 (N,)."""
    shape = getattr(target, "shape", None)
    if shape is None or tuple(shape) != (n_rows,):
        got = "no shape" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"target must have shape ({n_rows},) to match {rows_of} (got {got})")
    if target.dtype not in (np.int32, np.int64):
        raise TypeError(f"target dtype must be int32 or int64 (got {target.dtype.name})")


def check_row_target(target, logits, options):
    """The target of a cross-entropy call on ``logits`` (N, V), checked: class indices, int32 or
    int64 (N,), or class probabilities (N, V) of the logits' dtype, whose rows the kernels read
    as they read the logits'. Returns whether they are probabilities. Class probabilities take
    no ignore_index >= 0 (torch refuses one too) and have no target class for a token accuracy
    (``options``: an Options)."""
    n_rows, n_classes = logits.shape
    shape = getattr(target, "shape", None)
    shape = None if shape is None else tuple(shape)
    if shape != (n_rows, n_classes):
        if shape is None or shape != (n_rows,):
            got = "no shape" if shape is None else f"shape {shape}"
            raise ValueError(f"target must have shape ({n_rows},) (class indices) or "
                             f"({n_rows}, {n_classes}) (class probabilities) to match logits "
                             f"(got {got})")
        if target.dtype not in (np.int32, np.int64):
            hint = (f"; class probabilities have the logits' shape ({n_rows}, {n_classes})"
                    if target.dtype.kind == "f" or target.dtype.name in FORMATS else "")
            raise TypeError(f"target dtype must be int32 or int64 (got {target.dtype.name})"
                            f"{hint}")
        return False
    if target.dtype != logits.dtype:
        if target.dtype.kind == "f" or target.dtype.name in FORMATS:
            raise TypeError(f"target (class probabilities) must have the logits' dtype "
                            f"{logits.dtype.name} (got {target.dtype.name}); pass "
                            "target.astype(logits.dtype)")
        raise TypeError(f"target of the logits' shape ({n_rows}, {n_classes}) holds class "
                        f"probabilities: a float array of the logits' dtype {logits.dtype.name} "
                        f"(got {target.dtype.name}); class indices have shape ({n_rows},)")
    _check_readable_rows("target", target)
    if options.ignore_index >= 0:
        raise ValueError(f"ignore_index does not apply to class-probability targets, where every "
                         f"row counts (got {options.ignore_index}; torch refuses one >= 0 too); "
                         "leave it negative, as the default -100")
    if options.return_token_accuracy:
        raise ValueError("return_token_accuracy needs class-index targets (the share of rows "
                         "whose argmax is their target class); these targets are class "
                         "probabilities")
    return True


def check_weight(weight, n_classes):
    shape = getattr(weight, "shape", None)
    if shape is None or tuple(shape) != (n_classes,):
        got = "no shape" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"weight must have shape ({n_classes},), one per class (got {got})")
    if weight.dtype.kind != "f" and weight.dtype.name not in FORMATS:
        raise TypeError(f"weight must be a float array (got {weight.dtype.name})")


def check_grad_output(grad_output, reduction, n_rows):
    """None, a real scalar, or a real (N,) array for reduction='none'. Returns the shape to read
    it as. Booleans and complex numbers are refused, as for every numeric option."""
    if grad_output is None:
        return ()
    dtype = getattr(grad_output, "dtype", None)
    if (isinstance(grad_output, (bool, np.bool_, complex, np.complexfloating))
            or (dtype is not None and dtype.kind not in "fiu" and dtype.name not in FORMATS)):
        got = type(grad_output).__name__ if dtype is None else dtype.name
        raise TypeError(f"grad_output must be a real number or an array of real numbers "
                        f"(got {got})")
    if isinstance(grad_output, numbers.Real):
        return ()
    shape = tuple(getattr(grad_output, "shape", (None,)))
    if shape in ((), (1,)):
        return shape
    if reduction == "none" and shape == (n_rows,):
        return shape
    expected = f"a scalar or shape ({n_rows},)" if reduction == "none" else "a scalar"
    raise ValueError(
        f"grad_output for reduction={reduction!r} must be {expected} (got shape {shape})")
