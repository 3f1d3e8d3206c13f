"""The framework-neutral public API: NumPy and CuPy arrays in, the same kind out."""
import numbers

import numpy as np

from . import devices, launch, validation
from .portable import SIMULATOR
from .results import CrossEntropyResult


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, validate=True):
    """Cross-entropy loss of ``logits`` (N, V) against class indices ``target`` (N,).

    Parameters
    ----------
    logits : float32, float16 or bfloat16 array (N, V), rows contiguous (a row stride > V is fine).
    target : int32 or int64 array (N,). Rows equal to ``ignore_index`` contribute nothing.
    weight : float array (V,), optional. Class weights, as in PyTorch.
    reduction : 'mean' (weighted by w_y, as PyTorch), 'sum' or 'none'.
    label_smoothing : float in [0, 1]. z_loss : float >= 0, adds z_loss * lse**2 per row.
    softcap : float > 0, optional. Replaces x by softcap * tanh(x / softcap) first.
    validate : bool. Raise ValueError for a target outside [0, V) (one 8-byte device read);
        with False the call never synchronises and such rows give NaN.

    Returns
    -------
    float32 array: 0-d for 'mean' and 'sum', (N,) for 'none'. Reads the logits once and writes
    nothing of size N x V.
    """
    return _compute(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, None, False, False, validate).loss


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=None,
                            inplace=False, validate=True):
    """Loss and gradient in one fused kernel; options as in :func:`cross_entropy`.

    grad_output : None (ones), a scalar, or an (N,) array for reduction='none': the upstream
        gradient, so that ``grad`` = d(sum(loss * grad_output)) / d(logits).
    inplace : write the gradient into the logits buffer (``res.grad is logits``); otherwise the
        logits are never modified.

    Returns
    -------
    CrossEntropyResult(loss, grad, z_loss, lse): ``grad`` has the logits' shape and dtype and is
    computed in fp32 and rounded once; ``z_loss`` is the z-loss part of ``loss``; ``lse`` is the
    float32 (N,) log-sum-exp of the (softcapped) logits, 0 for ignored rows.
    """
    return _compute(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, grad_output, True, inplace, validate)


def _compute(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             grad_output, with_grad, inplace, validate):
    options = validation.check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    validate = validation.check_flag("validate", validate)
    inplace = validation.check_flag("inplace", inplace)
    xp, on_host = array_kind(logits=logits, target=target, weight=weight,
                             grad_output=grad_output)
    fmt = validation.check_logits(logits)
    n_rows, n_classes = logits.shape
    validation.check_target(target, n_rows)
    if weight is not None:
        validation.check_weight(weight, n_classes)
    go_shape = validation.check_grad_output(grad_output, reduction, n_rows) if with_grad else ()
    if inplace:
        validation.check_writeable(logits)
        validation.check_not_overlapping(logits, "inplace=True", target=target, weight=weight,
                                         grad_output=grad_output)

    caller_logits = logits
    logits, target, weight, grad_output = on_device(on_host, logits, target, weight, grad_output)
    weight = class_weights(xp, weight)
    grad_output = upstream(xp, grad_output, go_shape)

    grad = None
    if with_grad:
        grad = logits if inplace else empty(xp, logits.shape, logits.dtype)
    row_loss, row_z, row_lse = (empty(xp, n_rows, np.float32) for _ in range(3))
    reduced = reduction != "none"
    loss_out, z_out = ((empty(xp, 1, np.float32), empty(xp, 1, np.float32)) if reduced
                       else (None, None))
    run_or_fill(xp, logits, fmt, target, weight, options, grad, grad_output, row_loss, row_z,
                row_lse, loss_out, z_out, validate)

    loss, z_part = (loss_out.reshape(()), z_out.reshape(())) if reduced else (row_loss, row_z)
    if on_host:
        loss, z_part, row_lse = (devices.cupy.asnumpy(a) for a in (loss, z_part, row_lse))
        if grad is not None:
            if inplace:
                caller_logits[...] = devices.cupy.asnumpy(grad)  # the caller's view may be strided
                grad = caller_logits
            else:
                grad = devices.cupy.asnumpy(grad)
    return CrossEntropyResult(loss, grad, z_part, row_lse)


def run_or_fill(xp, logits, fmt, target, weight, options, grad, grad_output, row_loss, row_z,
                row_lse, loss_out, z_out, validate):
    """:func:`numba_ce.launch.run` (same arguments), or for a batch of no rows the reduced
    outputs PyTorch gives: "sum" is 0 and "mean" is 0 / 0 = NaN. Shared with numba_ce.torch."""
    if logits.shape[0] > 0:
        launch.run(xp, logits, fmt, target, weight, options, grad, grad_output, row_loss, row_z,
                   row_lse, loss_out, z_out, validate)
    elif loss_out is not None:
        fill_no_rows(options[1], loss_out, z_out)


def fill_no_rows(reduction, *outputs):
    """The reduced outputs of a batch of no rows, as PyTorch gives them: "sum" is 0 and "mean"
    is 0 / 0 = NaN."""
    for out in outputs:
        out.fill(np.nan if reduction == "mean" else 0.0)


def empty(xp, shape, dtype):
    """Every output buffer comes from here (tests replace it to poison the buffers)."""
    return xp.empty(shape, dtype)


def array_kind(**arrays):
    """(array module, whether the inputs are NumPy arrays that must travel to a GPU and back) of
    the named arguments (None and scalars are skipped: their own checks say what they must be).
    Checked before anything reads an array's shape, dtype or strides: those mean other things in
    other frameworks (torch strides count elements). NumPy arrays must be plain and native
    (validation.check_plain_array)."""
    devices.require_backend()
    arrays = {name: a for name, a in arrays.items()
              if a is not None and not isinstance(a, (numbers.Number, np.generic))}
    for name, a in arrays.items():
        if isinstance(a, np.ndarray):
            validation.check_plain_array(name, a)
    kinds = ", ".join(f"{name}: {_kind(a)}" for name, a in arrays.items())
    hint = ("; for torch tensors use numba_ce.torch"
            if any(type(a).__module__.split(".")[0] == "torch" for a in arrays.values()) else "")
    if SIMULATOR:
        if not all(isinstance(a, np.ndarray) for a in arrays.values()):
            raise TypeError(f"the CUDA simulator takes NumPy arrays only (got {kinds}){hint}")
        return np, False
    if all(isinstance(a, np.ndarray) for a in arrays.values()):
        return devices.cupy, True
    if not all(isinstance(a, devices.cupy.ndarray) for a in arrays.values()):
        raise TypeError(
            f"arrays must all be CuPy arrays or all be NumPy arrays (got {kinds}){hint}")
    current = devices.cupy.cuda.Device().id
    if any(a.device.id != current for a in arrays.values()):
        where = ", ".join(f"{name} on GPU {a.device.id}" for name, a in arrays.items())
        raise ValueError(f"arrays must all be on the current GPU ({current}) (got {where})")
    return devices.cupy, False


def _kind(array):
    """'numpy.ndarray', 'cupy.ndarray', 'torch.Tensor', 'list' ... for error messages."""
    module = type(array).__module__.split(".")[0]
    name = type(array).__name__
    return name if module == "builtins" else f"{module}.{name}"


def on_device(on_host, *arrays):
    """The arrays where the kernels run: with ``on_host`` (a GPU is present but the inputs are
    NumPy) device copies of them; None and plain numbers as they are."""
    if not on_host:
        return arrays
    return [a if a is None or isinstance(a, numbers.Real) else devices.to_device(a)
            for a in arrays]


def class_weights(xp, weight):
    """The class weights as the kernels read them: contiguous float32 (or None)."""
    return None if weight is None else xp.ascontiguousarray(weight, dtype=np.float32)


def upstream(xp, grad_output, shape):
    """grad_output as a float32 device array of shape (1,) or (N,)."""
    if grad_output is None:
        return devices.ones(xp)
    if isinstance(grad_output, numbers.Real):
        return xp.full(1, grad_output, np.float32)
    return xp.asarray(grad_output, dtype=np.float32).reshape(-1)
