"""Helpers shared by the PyTorch adapter's tests (simulator and GPU): tensors from the shared
random inputs, and one check of numba_ce.torch against PyTorch's float64 autograd."""
import numpy as np
import torch

import numba_ce.torch as nce
from numba_ce import reference
from helpers import (DTYPES, TOLERANCES, assert_close, random_logits, random_target,
                     random_upstream, random_weight, torch_loss_and_grad)

# Option sets checked for every reduction; the logits dtype rotates with (reduction, case) so
# that each reduction meets each dtype and each option set meets each dtype. Each case is one
# forward and one backward: in the simulator about half a second.
CASES = [
    dict(),
    dict(ignored=0.3, weighted=True, upstream="given", target_dtype=torch.int32),
    dict(smoothing=0.1, z_loss=1e-3, upstream="given", inplace=True),
    dict(ignored=0.3, softcap=5.0, inplace=True, target_dtype=torch.int32),
    dict(weighted=True, smoothing=0.1, softcap=5.0, upstream="given"),
    dict(ignored=0.3, weighted=True, smoothing=0.1, z_loss=1e-3, softcap=5.0, upstream="given",
         inplace=True),
]
REDUCTIONS = ["mean", "sum", "none"]
ROTATION = [(reduction, case, list(DTYPES)[(r + case) % len(DTYPES)])
            for r, reduction in enumerate(REDUCTIONS) for case in range(len(CASES))]


def to_torch(array, device="cpu", dtype=None):
    """A torch copy of a NumPy array (ml_dtypes.bfloat16 becomes torch.bfloat16)."""
    array = np.asarray(array)
    if array.dtype == DTYPES["bfloat16"]:
        tensor = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array.copy())
    return tensor.to(device=device, dtype=dtype)


def from_torch(tensor):
    """float64 NumPy copy of a tensor, for the comparisons."""
    return tensor.detach().cpu().double().numpy()


def check_against_torch(rng, device, dtype, n_rows, n_classes, *, reduction="mean", ignored=0.0,
                        weighted=False, smoothing=0.0, z_loss=0.0, softcap=None, upstream="ones",
                        inplace=False, target_dtype=torch.int64, ignore_index=-100):
    """One forward and backward of numba_ce.torch.cross_entropy of a leaf tensor (in place: of
    its clone), compared with torch's float64 loss and autograd gradient; also the z-loss part,
    the dtypes, and whether the input was written (in place) or left alone."""
    logits = random_logits(rng, n_rows, n_classes, dtype)
    target = random_target(rng, n_rows, n_classes, ignore_index, ignored)
    weight = random_weight(rng, n_classes, weighted)
    grad_output = random_upstream(rng, n_rows, reduction, upstream)
    if upstream == "given" and reduction == "none" and n_rows > 1:
        grad_output[0] = 1.0  # a row whose upstream is 1 keeps its gradient unscaled
    options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=smoothing, z_loss=z_loss, softcap=softcap)
    expected_loss, expected_grad = torch_loss_and_grad(logits, target, grad_output=grad_output,
                                                       **options)
    expected_z = reference.cross_entropy_with_grad(logits, target, **options).z_loss

    leaf = to_torch(logits, device).requires_grad_()
    x = leaf.clone() if inplace else leaf  # a leaf that requires grad is not overwritten
    original = x.detach().clone()
    loss, z_part = nce.cross_entropy(
        x, to_torch(target, device, target_dtype),
        None if weight is None else to_torch(weight, device), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, softcap=softcap,
        inplace_backward=inplace, return_z_loss=True)
    if grad_output is not None:
        loss.backward(to_torch(grad_output, device, torch.float32).reshape(loss.shape))
    elif reduction == "none":
        loss.sum().backward()  # the upstream gradient arrives as expanded (stride 0) ones
    else:
        loss.backward()

    loss_tol, grad_tol = TOLERANCES[dtype]["loss"], TOLERANCES[dtype]["grad"]
    assert loss.dtype == z_part.dtype == torch.float32 and not z_part.requires_grad
    assert_close(from_torch(loss), expected_loss, *loss_tol, "loss vs torch")
    assert_close(from_torch(z_part), expected_z, *loss_tol, "z_loss vs reference")
    assert leaf.grad.dtype == x.dtype and leaf.grad.shape == x.shape
    if not (reduction == "mean" and (target == ignore_index).all()):
        # (torch's gradient of a mean over no rows is NaN; ours is zero, as for any ignored row)
        scale = max(np.abs(expected_grad).max(initial=0.0), 1e-30)
        assert_close(from_torch(leaf.grad), expected_grad, grad_tol[0], grad_tol[1] * scale,
                     "grad vs torch")
    if inplace:
        assert torch.equal(x.detach(), leaf.grad), "the gradient is not in the input's memory"
    else:
        assert torch.equal(x.detach(), original), "the input was modified"


def check_autocast(rng, device, n_rows, n_features, n_classes):
    """Under autocast a linear layer gives bf16 logits, which numba_ce reads as bf16 with fp32
    math: the loss and the head's gradient agree with torch's loss on the logits cast to fp32
    (whose backward rounds the gradient to bf16 once, as ours does)."""
    import torch.nn.functional as F

    torch.manual_seed(int(rng.integers(2**31)))
    head = torch.nn.Linear(n_features, n_classes).to(device)
    hidden = torch.randn(n_rows, n_features, device=device)
    target = torch.randint(0, n_classes, (n_rows,), device=device)
    results = []
    for loss_fn in (nce.cross_entropy, lambda x, t: F.cross_entropy(x.float(), t)):
        head.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            logits = head(hidden)
            assert logits.dtype == torch.bfloat16
            loss = loss_fn(logits, target)
        loss.backward()
        results.append((from_torch(loss), from_torch(head.weight.grad)))
    (ours, ours_grad), (theirs, theirs_grad) = results
    assert_close(ours, theirs, 1e-4, 1e-6, "loss")
    assert_close(ours_grad, theirs_grad, 2e-2, 2e-2 * np.abs(theirs_grad).max(), "weight grad")
