"""The framework-neutral public API: NumPy and CuPy arrays in, the same kind out."""
import numbers

import numpy as np

from . import buffers, devices, execution, results, validation
from .execution import RowCall
from .options import Options, check_flag
from .planning import RowInputs
from .portable import SIMULATOR
from .results import Array, CrossEntropyResult


def cross_entropy(logits: Array, target: Array, *, weight: Array | None = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  validate: bool = True) -> Array:
    """Cross-entropy loss of ``logits`` (N, V) against class indices ``target`` (N,), or against
    class probabilities ``target`` (N, V), as PyTorch defines both.

    Parameters
    ----------
    logits : float32, float16 or bfloat16 array (N, V), rows contiguous (a row stride > V is fine).
    target : int32 or int64 array (N,) of class indices; rows equal to ``ignore_index``
        contribute nothing. Or an array (N, V) of class probabilities q of the logits' dtype,
        rows contiguous: each row's loss is -sum_j w_j q'_j log p_j with q' = (1 - eps) q +
        eps / V, whatever q sums to (PyTorch's formula); every row counts.
    weight : float array (V,), optional. Class weights, as in PyTorch.
    reduction : 'mean' (class indices: weighted by w_y, as PyTorch; class probabilities: over
        the N rows, as PyTorch), 'sum' or 'none'.
    label_smoothing : float in [0, 1]. z_loss : float >= 0, adds z_loss * lse**2 per row.
    softcap : float > 0, optional. Replaces x by softcap * tanh(x / softcap) first.
    validate : bool. Raise ValueError for a target outside [0, V) (one 8-byte device read);
        with False the call never synchronises and such rows give NaN. Class probabilities
        have nothing to check: no read either way.

    Returns
    -------
    float32 array: 0-d for 'mean' and 'sum', (N,) for 'none'. Reads the logits (and class
    probabilities) once and writes nothing of size N x V.
    """
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return compute(logits, target, options, weight=weight, validate=validate).loss


def cross_entropy_with_grad(logits: Array, target: Array, *, weight: Array | None = None,
                            ignore_index: int = -100, reduction: str = "mean",
                            label_smoothing: float = 0.0, z_loss: float = 0.0,
                            softcap: float | None = None,
                            grad_output: Array | float | None = None, inplace: bool = False,
                            return_token_accuracy: bool = False,
                            return_predicted_tokens: bool = False,
                            validate: bool = True) -> CrossEntropyResult:
    """Loss and gradient in one fused kernel; options as in :func:`cross_entropy`.

    grad_output : None (ones), a scalar, or an (N,) array for reduction='none': the upstream
        gradient, so that ``grad`` = d(sum(loss * grad_output)) / d(logits). With class
        probabilities q: g * (p_j * sum_k w_k q'_k - w_j q'_j), one fused kernel that reads the
        logits and q twice (the gradient pass needs each row's lse first), no gradient for q.
    inplace : write the gradient into the logits buffer (``res.grad is logits``); otherwise the
        logits are never modified.
    return_token_accuracy, return_predicted_tokens : also fill ``res.token_accuracy`` (the share
        of counted rows whose argmax is their target, reduced as the loss) and
        ``res.predicted_tokens`` (each row's argmax, int64, -1 for ignored rows), found in the
        kernel's first pass over the logits. Class probabilities: the predicted tokens only
        (there is no target class to compare with).

    Returns
    -------
    CrossEntropyResult(loss, grad, z_loss, lse, token_accuracy, predicted_tokens): ``grad`` has
    the logits' shape and dtype and is computed in fp32 and rounded once; ``z_loss`` is the
    z-loss part of ``loss``; ``lse`` is the float32 (N,) log-sum-exp of the (softcapped) logits,
    0 for ignored rows; the last two None unless asked.
    """
    options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                      return_token_accuracy, return_predicted_tokens)
    return compute(logits, target, options, weight=weight, grad_output=grad_output,
                   with_grad=True, inplace=inplace, validate=validate)


def compute(logits, target, options, *, weight=None, grad_output=None, with_grad=False,
            inplace=False, validate=True, alloc=None, device=None):
    """The checked call behind both functions, with ``options`` an :class:`Options`. ``alloc``
    makes the output buffers with its ``empty(shape, dtype)`` (default: the arrays' module);
    ``device`` is the DeviceProperties to plan for (default: the current device's). Tests pass
    an allocator that poisons the buffers, and properties that exercise other plans."""
    validate = check_flag("validate", validate)
    inplace = check_flag("inplace", inplace)
    xp, on_host = array_kind(logits=logits, target=target, weight=weight,
                             grad_output=grad_output)
    fmt = validation.check_logits(logits)
    n_rows, n_classes = logits.shape
    validation.check_row_target(target, logits, options)
    if weight is not None:
        validation.check_weight(weight, n_classes)
    go_shape = (validation.check_grad_output(grad_output, options.reduction, n_rows)
                if with_grad else ())
    if inplace:
        validation.check_writeable(logits)
        validation.check_not_overlapping(logits, "inplace=True", target=target, weight=weight,
                                         grad_output=grad_output)

    caller_logits = logits
    logits, target, weight, grad_output = on_device(on_host, logits, target, weight, grad_output)
    inputs = RowInputs(logits, fmt, target, class_weights(xp, weight),
                       upstream(xp, grad_output, go_shape))
    alloc = alloc or xp
    grad = None
    if with_grad:
        grad = logits if inplace else alloc.empty(logits.shape, logits.dtype)
    outputs = buffers.allocate(alloc, n_rows, options)
    execution.run(RowCall(inputs, options, grad, outputs, validate), alloc, device)

    loss, z_part, accuracy, predicted = results.returned(outputs, options)
    row_lse = outputs.row_lse
    if on_host:
        loss, z_part, row_lse, accuracy, predicted = (
            None if a is None else devices.cupy.asnumpy(a)
            for a in (loss, z_part, row_lse, accuracy, predicted))
        if grad is not None:
            if inplace:
                caller_logits[...] = devices.cupy.asnumpy(grad)  # the caller's view may be strided
                grad = caller_logits
            else:
                grad = devices.cupy.asnumpy(grad)
    return CrossEntropyResult(loss, grad, z_part, row_lse, accuracy, predicted)


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
