"""numba_ce.torch against torch.nn.functional.cross_entropy (float64 autograd), on CPU tensors in
the CUDA simulator: options, dtypes, upstream gradients, in-place backward, layouts, the module,
autocast, the backwards refused and the errors (torch.compile: test_torch_compile.py).
test_torch_gpu.py repeats the checks on CUDA tensors."""
import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils.checkpoint import checkpoint

import numba_ce.torch as nce
from numba_ce.portable import SIMULATOR
from helpers import TOLERANCES, assert_close, random_logits, random_target, torch_loss_and_grad
from torch_helpers import (CASES, ROTATION, check_against_torch, check_autocast, from_torch,
                           to_torch)

pytestmark = pytest.mark.skipif(not SIMULATOR, reason="CPU tensors run in the simulator only; "
                                "test_torch_gpu.py covers the GPU")


@pytest.mark.parametrize("reduction,case,dtype", ROTATION)
def test_matches_torch(rng, reduction, case, dtype):
    check_against_torch(rng, "cpu", dtype, 5, 67, reduction=reduction, **CASES[case])


def test_reduction_none_scales_each_row_by_its_own_upstream(rng):
    """Each row's gradient is scaled by its own upstream value (not by grad_output[0]); a row
    whose value is 1 is left as the forward wrote it, a row with 0 becomes zero."""
    logits = random_logits(rng, 4, 24)
    target = random_target(rng, 4, 24)
    upstream = np.array([1.0, -2.0, 0.5, 0.0])
    _, expected = torch_loss_and_grad(logits, target, reduction="none", grad_output=upstream)
    x = to_torch(logits).requires_grad_()
    nce.cross_entropy(x, to_torch(target), reduction="none").backward(
        to_torch(upstream, dtype=torch.float32))
    assert_close(from_torch(x.grad), expected, 2e-5, 1e-7, "grad")
    assert not x.grad[3].any()


def test_inplace_backward_overwrite_detected_by_autograd(rng):
    """With inplace_backward the logits' memory holds the gradient after the forward: autograd
    must refuse a backward that needs the logits (here exp's saved output) instead of silently
    using the gradient as logits."""
    x = to_torch(random_logits(rng, 4, 24)).requires_grad_()
    target = to_torch(random_target(rng, 4, 24))
    logits = x.exp()  # ExpBackward saves its output: the logits
    loss = nce.cross_entropy(logits, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_later_use_detected_by_autograd(rng):
    """A second consumer that saved the logits before our forward overwrote them."""
    x = to_torch(random_logits(rng, 4, 24)).requires_grad_()
    target = to_torch(random_target(rng, 4, 24))
    logits = x * 2.0
    penalty = (logits * logits).sum()  # MulBackward saves the logits
    loss = nce.cross_entropy(logits, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + penalty).backward()


def test_inplace_backward_into_a_strided_view(rng):
    """Rows with unit class stride and a row stride > V are read in place; the gradient goes
    into the view and the columns outside it are untouched."""
    leaf = to_torch(random_logits(rng, 4, 40, "bfloat16")).requires_grad_()
    wide = leaf * 1  # logits computed from a leaf: a leaf itself is refused
    padding = wide[:, 32:].detach().clone()
    logits = wide[:, :32]
    target = random_target(rng, 4, 32)
    _, expected = torch_loss_and_grad(from_torch(logits), target)
    version = wide._version
    nce.cross_entropy(logits, to_torch(target), inplace_backward=True).backward()
    tol = TOLERANCES["bfloat16"]["grad"]
    assert_close(from_torch(wide[:, :32]), expected, tol[0], tol[1] * np.abs(expected).max(),
                 "gradient in the view")
    assert torch.equal(leaf.grad[:, :32], wide[:, :32]) and not leaf.grad[:, 32:].any()
    assert torch.equal(wide[:, 32:], padding)
    assert wide._version > version


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_rows_that_cannot_be_read_in_place_are_copied(rng, layout):
    """A class stride other than 1, or rows that overlap (stride 0), are copied first: the
    numbers are right and the input stays as it was, even with inplace_backward."""
    if layout == "transposed":
        source = to_torch(random_logits(rng, 24, 5)).t()
    else:
        source = to_torch(random_logits(rng, 1, 24)).expand(5, 24)
    target = random_target(rng, 5, 24)
    expected_loss, expected_grad = torch_loss_and_grad(from_torch(source), target)
    x = source.detach().requires_grad_()
    before = x.detach().clone()
    loss = nce.cross_entropy(x, to_torch(target), inplace_backward=True)
    loss.backward()
    assert_close(from_torch(loss), expected_loss, 2e-5, 1e-6, "loss")
    assert_close(from_torch(x.grad), expected_grad, 2e-5, 1e-7, "grad")
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("grad_mode", ["no input grad", "no_grad"])
def test_loss_only_when_no_gradient_is_needed(rng, grad_mode):
    """Without a gradient to compute, the loss-only kernel runs: inplace_backward leaves the
    input alone."""
    logits = random_logits(rng, 5, 67)
    target = random_target(rng, 5, 67, ignored_share=0.3)
    expected, _ = torch_loss_and_grad(logits, target, label_smoothing=0.1)
    x = to_torch(logits)
    if grad_mode == "no_grad":
        x.requires_grad_()
    before = x.detach().clone()
    with torch.set_grad_enabled(grad_mode != "no_grad"):
        loss = nce.cross_entropy(x, to_torch(target), label_smoothing=0.1, inplace_backward=True)
    assert not loss.requires_grad
    assert_close(from_torch(loss), expected, 2e-5, 1e-6, "loss")
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("reduction,expected", [("mean", float("nan")), ("sum", 0.0),
                                                ("none", np.zeros(0))])
def test_empty_batch(reduction, expected):
    x = torch.zeros(0, 7, requires_grad=True)
    loss = nce.cross_entropy(x, torch.zeros(0, dtype=torch.int64), reduction=reduction)
    loss.sum().backward()
    assert_close(from_torch(loss), expected, 0, 0, "loss")
    assert x.grad.shape == (0, 7)


def test_module_mirrors_torch_cross_entropy_loss(rng):
    """CrossEntropyLoss: the options of torch.nn.CrossEntropyLoss (weight as a buffer) plus ours."""
    weight = torch.from_numpy(rng.random(67) + 0.5)  # float64, drawn from the run's seed
    crit = nce.CrossEntropyLoss(weight, ignore_index=3, reduction="sum", label_smoothing=0.1,
                                z_loss=1e-3, softcap=5.0)
    assert dict(crit.named_buffers())["weight"] is weight
    assert "weight" in crit.state_dict()
    assert "reduction='sum'" in repr(crit) and "softcap=5.0" in repr(crit)
    crit = crit.to(torch.float16)  # buffers follow .to(); the kernels read float32 weights
    logits = random_logits(rng, 5, 67)
    target = random_target(rng, 5, 67)
    target[1] = 3
    expected_loss, expected_grad = torch_loss_and_grad(
        logits, target, weight=from_torch(crit.weight), ignore_index=3, reduction="sum",
        label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    x = to_torch(logits).requires_grad_()
    loss = crit(x, to_torch(target))
    loss.backward()
    assert_close(from_torch(loss), expected_loss, 2e-5, 1e-6, "loss")
    assert_close(from_torch(x.grad), expected_grad, 2e-5, 1e-7, "grad")
    assert not x.grad[1].any()


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_twice_raises(rng, inplace):
    """The first backward scaled the saved gradient in place: a second one through the same
    forward is refused, naming that (not a wrong answer, nor torch's saved-tensor version error)."""
    x = to_torch(random_logits(rng, 3, 9)).requires_grad_()
    loss = nce.cross_entropy(x * 1, to_torch(random_target(rng, 3, 9)), inplace_backward=inplace)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=re.escape(
            "a second backward through one forward (retain_graph=True) cannot be answered: the "
            "first scaled the gradient that the forward saved, in place")):
        loss.backward()


def test_z_part_added_to_the_loss_adds_no_gradient(rng):
    """The z part is a non-differentiable output (its gradient reaches backward as None, not as
    zeros): loss + z_part back-propagates the loss's gradient alone."""
    logits, target = random_logits(rng, 4, 24), random_target(rng, 4, 24)
    _, expected = torch_loss_and_grad(logits, target, z_loss=1e-2)
    x = to_torch(logits).requires_grad_()
    loss, z_part = nce.cross_entropy(x, to_torch(target), z_loss=1e-2, return_z_loss=True)
    assert not z_part.requires_grad
    (loss + z_part).backward()
    assert_close(from_torch(x.grad), expected, 2e-5, 1e-7, "grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("saving", ["checkpoint", "copying hooks"])
def test_saved_gradient_that_hooks_give_back(rng, reduction, saving):
    """Backward scales the gradient that saved-tensor hooks give back (non-reentrant
    checkpointing recomputes it, a packing hook may copy it), not the forward's buffer: with an
    upstream gradient of 0.5 a scaled stale buffer would leave x.grad twice too large."""
    logits, target = random_logits(rng, 4, 24), random_target(rng, 4, 24)
    grad_output = np.full(4, 0.5) if reduction == "none" else 0.5
    _, expected = torch_loss_and_grad(logits, target, reduction=reduction,
                                      grad_output=grad_output)
    x, t = to_torch(logits).requires_grad_(), to_torch(target)
    if saving == "checkpoint":
        loss = checkpoint(lambda a: nce.cross_entropy(a, t, reduction=reduction), x,
                          use_reentrant=False)
    else:
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
            loss = nce.cross_entropy(x, t, reduction=reduction)
    (loss.sum() * 0.5).backward()
    assert_close(from_torch(x.grad), expected, 2e-5, 1e-7, "grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_loss_takes_in_place_ops_as_torchs_does(rng, reduction):
    """A returned loss is a tensor of its own, as torch's: dividing it in place (gradient
    accumulation's loss /= steps) or masking rows of a per-row loss scales the gradient."""
    logits, target = random_logits(rng, 4, 24), random_target(rng, 4, 24)
    mask = np.array([1.0, 0.0, 1.0, 1.0])
    grad_output = mask / 4 if reduction == "none" else 0.25
    _, expected = torch_loss_and_grad(logits, target, reduction=reduction,
                                      grad_output=grad_output)
    x = to_torch(logits).requires_grad_()
    loss = nce.cross_entropy(x * 1, to_torch(target), reduction=reduction)
    if reduction == "none":
        loss *= to_torch(mask).float()
        loss[1] = 0.0
    loss /= 4
    loss.sum().backward()
    assert_close(from_torch(x.grad), expected, 2e-5, 1e-7, "grad")


def test_autocast(rng):
    check_autocast(rng, "cpu", 6, 16, 40)


@pytest.mark.parametrize("entry", ["cross_entropy", "cross_entropy in place",
                                   "linear_cross_entropy", "linear_cross_entropy none"])
def test_create_graph_is_refused_at_the_first_backward(rng, entry):
    """A double backward cannot differentiate a gradient that a kernel computed: the first
    backward with create_graph=True says so (it used to return a gradient that silently did not
    require grad)."""
    x = to_torch(random_logits(rng, 4, 24)).requires_grad_()
    target = to_torch(random_target(rng, 4, 24))
    if entry.startswith("linear"):
        head = to_torch(random_logits(rng, 6, 24)).requires_grad_()
        loss = nce.linear_cross_entropy(x, head, to_torch(random_target(rng, 4, 6)),
                                        reduction="none" if "none" in entry else "mean").sum()
    else:
        loss = nce.cross_entropy(x * 1, target, inplace_backward="in place" in entry)
    with pytest.raises(RuntimeError, match=re.escape(
            "numba_ce.torch's losses have no second derivative: their backward returns a "
            "gradient that a kernel computed, so a backward with create_graph=True")):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("logits", ["leaf", "view of a leaf"])
def test_inplace_backward_refuses_a_leaf_that_requires_grad(rng, logits):
    """A parameter used as the logits would be overwritten by its own gradient: refused as torch
    refuses an in-place op on one, and left as it was."""
    parameter = torch.nn.Parameter(to_torch(random_logits(rng, 4, 24)))
    before = parameter.detach().clone()
    what = "a leaf Variable" if logits == "leaf" else "a view of a leaf Variable"
    with pytest.raises(RuntimeError, match=re.escape(
            f"inplace_backward=True writes the gradient into input, which is {what} that "
            "requires grad: torch refuses to modify one in place (a leaf Variable that requires "
            "grad is being used in an in-place operation)")):
        nce.cross_entropy(parameter if logits == "leaf" else parameter[1:], to_torch(
            random_target(rng, 4 if logits == "leaf" else 3, 24)), inplace_backward=True)
    assert torch.equal(parameter.detach(), before)
    with torch.no_grad():  # no gradient to write: the loss only, as for any tensor
        nce.cross_entropy(parameter, to_torch(random_target(rng, 4, 24)), inplace_backward=True)


def test_capture_check_is_asked_on_cuda_tensors_only(rng):
    """validate=True is refused during CUDA-graph capture (tests/test_torch_gpu.py); the check
    asks torch.cuda, which on this CPU build of torch raises: a call on CPU tensors never asks
    it."""
    try:
        torch.cuda.is_current_stream_capturing()
    except RuntimeError:
        pass
    else:
        pytest.skip("this build of torch answers torch.cuda.is_current_stream_capturing()")
    x = to_torch(random_logits(rng, 4, 24)).requires_grad_()
    nce.cross_entropy(x, to_torch(random_target(rng, 4, 24)), validate=True).backward()
    assert x.grad is not None


def _logits():
    return torch.zeros(5, 67)


def _target():
    return torch.zeros(5, dtype=torch.int64)


META = torch.device("meta")
ERRORS = [
    (dict(input=np.zeros((5, 67), np.float32)), TypeError,
     "input must be a torch.Tensor (got ndarray)"),
    (dict(target=[0, 1, 2, 3, 4]), TypeError, "target must be a torch.Tensor (got list)"),
    (dict(input=torch.zeros(5, 67, device=META)), ValueError,
     "the CUDA simulator runs on CPU tensors (expected input on cpu, got meta); unset "
     "NUMBA_ENABLE_CUDASIM to use the GPU"),
    (dict(target=torch.zeros(5, dtype=torch.int64, device=META)), ValueError,
     "target must be on the same device as input (expected cpu, got meta)"),
    (dict(weight=torch.ones(67, device=META)), ValueError,
     "weight must be on the same device as input (expected cpu, got meta)"),
    (dict(input=torch.zeros(5, 67, dtype=torch.int64)), TypeError,
     "input dtype must be float32, float16, bfloat16 or float64 (got int64)"),
    (dict(input=torch.zeros(5, 67, dtype=torch.complex64)), TypeError,
     "input dtype must be float32, float16, bfloat16 or float64 (got complex64)"),
    (dict(input=torch.zeros(())), ValueError,
     "input must have a class dimension: (C,), (N, C) or (N, C, d1, ..., dk) (got a 0-d tensor)"),
    (dict(input=torch.zeros(5, 67, 2)), ValueError,
     "target must have shape (5, 2) to match input (5, 67, 2), whose class dimension is "
     "dimension 1 (got shape (5,))"),
    (dict(input=torch.zeros(5, 67, 2), target=torch.zeros(2, 5, dtype=torch.int64)), ValueError,
     "target must have shape (5, 2) to match input (5, 67, 2), whose class dimension is "
     "dimension 1 (got shape (2, 5))"),
    (dict(target=torch.zeros(4, dtype=torch.int64)), ValueError,
     "target must have shape (5,) to match input (5, 67), whose class dimension is dimension 1 "
     "(got shape (4,))"),
    (dict(target=torch.zeros(5, 1, dtype=torch.int64)), ValueError,
     "target must have shape (5,) to match input (5, 67), whose class dimension is dimension 1 "
     "(got shape (5, 1))"),
    (dict(input=torch.zeros(67), target=torch.zeros(2, dtype=torch.int64)), ValueError,
     "target of an unbatched input (67,) must be one class index, shape () (got shape (2,))"),
    (dict(target=torch.zeros(5)), ValueError,
     "target of floating-point dtype holds class probabilities and must have input's shape "
     "(5, 67) (got shape (5,)); class indices (int64, uint8 or int32) have shape (5,)"),
    (dict(input=torch.zeros(5, 67, 2), target=torch.zeros(5, 2)), ValueError,
     "target of floating-point dtype holds class probabilities and must have input's shape "
     "(5, 67, 2) (got shape (5, 2)); class indices (int64, uint8 or int32) have shape (5, 2)"),
    (dict(input=torch.zeros(67), target=torch.zeros(1, 67)), ValueError,
     "target of floating-point dtype holds class probabilities and must have input's shape "
     "(67,) (got shape (1, 67)); class indices (int64, uint8 or int32) have shape ()"),
    (dict(target=torch.zeros(5, 67, dtype=torch.float64)), TypeError,
     "target (class probabilities) must have input's dtype float32 (got float64); pass "
     "target.to(input.dtype)"),
    (dict(input=torch.zeros(5, 67, dtype=torch.bfloat16), target=torch.zeros(5, 67)), TypeError,
     "target (class probabilities) must have input's dtype bfloat16 (got float32); pass "
     "target.to(input.dtype)"),
    (dict(target=torch.zeros(5, 67, dtype=torch.int64)), ValueError,
     "target must have shape (5,) to match input (5, 67), whose class dimension is dimension 1 "
     "(got shape (5, 67)); a target of input's shape holds class probabilities, of input's "
     "floating-point dtype"),
    (dict(target=torch.full((5, 67), 1 / 67).requires_grad_()), RuntimeError,
     "numba_ce.torch computes no gradient for class-probability targets, and target requires "
     "grad (torch's cross_entropy would differentiate -sum w q log p in q too); pass "
     "target.detach(), or compute this loss with torch's own cross_entropy"),
    (dict(weight=torch.ones(67).requires_grad_()), RuntimeError,
     "numba_ce.torch computes no gradient for the class weights, and weight requires grad "
     "(torch's cross_entropy differentiates it for class-probability targets and refuses it for "
     "class indices); pass weight.detach(), or compute this loss with torch's own cross_entropy"),
    (dict(target=torch.full((5, 67), 1 / 67), weight=torch.ones(67).requires_grad_()),
     RuntimeError, "numba_ce.torch computes no gradient for the class weights, and weight "
     "requires grad (torch's cross_entropy differentiates it for class-probability targets and "
     "refuses it for class indices); pass weight.detach(), or compute this loss with torch's "
     "own cross_entropy"),
    (dict(target=torch.full((5, 67), 1 / 67), ignore_index=3), ValueError,
     "ignore_index does not apply to class-probability targets, where every row counts (got 3; "
     "torch refuses one >= 0 too); leave it negative, as the default -100"),
    (dict(target=torch.full((5, 67), 1 / 67), return_token_accuracy=True), ValueError,
     "return_token_accuracy needs class-index targets (the share of rows whose argmax is their "
     "target class); these targets are class probabilities"),
    (dict(target=torch.zeros(5, dtype=torch.int16)), TypeError,
     "target must hold class indices of dtype int64 or uint8 (as torch's), or int32, or class "
     "probabilities of input's dtype (got int16)"),
    (dict(target=torch.zeros(5, dtype=torch.bool)), TypeError,
     "target must hold class indices of dtype int64 or uint8 (as torch's), or int32, or class "
     "probabilities of input's dtype (got bool)"),
    (dict(weight=torch.ones(3)), ValueError,
     "weight must have shape (67,), one per class (got shape (3,))"),
    (dict(weight=torch.ones(67, dtype=torch.int64)), TypeError,
     "weight must be a float array (got int64)"),
    (dict(reduction="avg"), ValueError, "reduction must be 'mean', 'sum' or 'none' (got 'avg')"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in [0, 1] (got 1.5)"),
    (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0 (got 0.0)"),
    (dict(inplace_backward="yes"), TypeError, "inplace_backward must be True or False (got 'yes')"),
    (dict(target=torch.tensor([0, 1, 67, 2, 3])), ValueError,
     "target[2] = 67 is outside [0, 67) and is not ignore_index (-100); pass validate=False to "
     "skip this check (such rows then give NaN)"),
]


@pytest.mark.parametrize("arguments,error,message", ERRORS, ids=[m[:40] for _, _, m in ERRORS])
def test_errors(arguments, error, message):
    arguments = dict(dict(input=_logits().requires_grad_().clone(), target=_target()),
                     **arguments)  # (logits computed from a leaf: inplace_backward refuses one)
    before = arguments["input"].detach().clone() if torch.is_tensor(arguments["input"]) else None
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        nce.cross_entropy(inplace_backward=arguments.pop("inplace_backward", True), **arguments)
    if before is not None and before.device.type == "cpu":
        assert torch.equal(arguments["input"].detach(), before), "a failed call wrote the input"


def test_weight_that_requires_grad_is_taken_without_grad_mode(rng):
    """The refusal above is grad mode's: under no_grad the weight's values are used."""
    x, t = to_torch(random_logits(rng, 5, 67)), to_torch(random_target(rng, 5, 67))
    w = torch.rand(67) + 0.5
    with torch.no_grad():
        loss = nce.cross_entropy(x, t, weight=w.clone().requires_grad_())
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(x, t, weight=w), rtol=1e-5)


@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev"])
def test_torch_func_transforms_are_refused(transform):
    """Their tensors are wrappers a kernel cannot read: a clear error before any launch, not the
    data pointer's 'Tensor that doesn't have storage'."""
    x, t = _logits(), _target()
    loss = functools.partial(nce.cross_entropy, target=t)
    call = {"grad": lambda: torch.func.grad(loss)(x),
            "vmap": lambda: torch.func.vmap(loss)(x[None]),
            "jacrev": lambda: torch.func.jacrev(loss)(x)}[transform]
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "numba_ce.torch cannot run under torch.func's transforms (grad, vmap, jacrev, jvp), "
            "and input arrived as one of their tensors, which hold no memory a kernel can read; "
            "compute this loss with torch's own functions inside them") + "$"):
        call()


# (torch's make_dual loads its jvp decompositions through torch.jit.script, which warns)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_dual_tensors_are_refused(rng):
    """A dual tensor's tangent would be dropped (the loss came back without one): refused; a
    plain tensor inside a dual level is computed as anywhere."""
    import torch.autograd.forward_ad as forward_ad
    x, t = to_torch(random_logits(rng, 5, 67)), to_torch(random_target(rng, 5, 67))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="^" + re.escape(
                "numba_ce.torch computes no forward-mode derivative, and input is a dual tensor "
                "of torch.autograd.forward_ad (its tangent would be dropped); compute this loss "
                "with torch's own functions for forward-mode AD") + "$"):
            nce.cross_entropy(dual, t)
        plain = nce.cross_entropy(x, t)
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(x, t), rtol=1e-5)


def test_module_checks_options_when_built():
    message = "z_loss must be a finite number >= 0 (got -1.0)"
    with pytest.raises(ValueError, match=re.escape(message)):
        nce.CrossEntropyLoss(z_loss=-1.0)


def test_without_gpu_or_simulator():
    """A process without the simulator on a machine without a usable GPU (this one): a call
    says what it needs (CuPy may be installed or not)."""
    code = ("import torch, numba_ce.torch as nce; "
            "nce.cross_entropy(torch.zeros(5, 67), torch.zeros(5, dtype=torch.int64))")
    environment = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                          text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    reasons = ("CuPy is not installed; pip install 'numba_ce[gpu]' for a CUDA 13 driver, "
               "'numba_ce[gpu-cuda12]' for CUDA 12", "no CUDA GPU is visible")
    assert last in [f"RuntimeError: numba_ce needs a CUDA GPU with CuPy ({reason}), or the CUDA "
                    "simulator: to run on the CPU, set NUMBA_ENABLE_CUDASIM=1 before importing "
                    "numba." for reason in reasons], done.stderr


def test_inplace_backward_refuses_a_weight_in_the_logits_memory(rng):
    """The gradient overwrites the logits while the kernel still reads the class weights: a
    weight viewing the logits' memory would be read while being overwritten."""
    logits = to_torch(random_logits(rng, 6, 6)).requires_grad_().clone()
    target = to_torch(random_target(rng, 6, 6))
    weight = logits.detach()[2]
    with pytest.raises(ValueError, match=re.escape(
            "weight shares memory with the logits, which inplace_backward=True overwrites with "
            "the gradient; pass a copy of weight")):
        nce.cross_entropy(logits, target, weight=weight, inplace_backward=True)
    nce.cross_entropy(logits.clone(), target, weight=weight.clone(), inplace_backward=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_of_a_class_no_row_targets_multiplies_nothing(rng, bad):
    """The loss and gradient are those of any finite weight for that class, to the bit."""
    logits = to_torch(random_logits(rng, 6, 40))
    target = random_target(rng, 6, 40, ignored_share=0.3)
    target[0] = rng.integers(0, 40)  # a row counted: a mean over none is NaN for any weights
    target = to_torch(target)
    weight = to_torch(rng.random(40) + 0.5, dtype=torch.float32)
    unused = int(np.setdiff1d(np.arange(40), target.numpy())[0])
    results = []
    for value in (bad, 1.0):
        weight[unused] = value
        x = logits.clone().requires_grad_()
        loss = nce.cross_entropy(x, target, weight=weight)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (finite_loss, finite_grad) = results
    assert torch.isfinite(grad).all()
    assert torch.equal(loss, finite_loss) and torch.equal(grad, finite_grad)


@pytest.mark.parametrize("upstream", [float("inf"), float("-inf")])
def test_infinite_upstream_is_non_finite_where_torchs_is(rng, upstream):
    """The backward scales the forward's finite gradient by g: +-inf where torch's is +-inf, and
    at the target, where torch forms g * p_y - g = NaN, -+inf; ignored rows stay 0."""
    logits = random_logits(rng, 5, 24)
    target = random_target(rng, 5, 24)
    target[1] = -100
    _, expected = torch_loss_and_grad(logits, target, reduction="sum",
                                      grad_output=np.float64(upstream))
    x = to_torch(logits).requires_grad_()
    nce.cross_entropy(x, to_torch(target), reduction="sum").backward(torch.tensor(upstream))
    got = from_torch(x.grad)
    infinite = np.isinf(expected)
    assert infinite.any() and (got[infinite] == expected[infinite]).all()
    assert not np.isfinite(got[np.isnan(expected)]).any()
    assert not got[1].any() and not expected[1].any()


def test_class_probabilities_in_place_and_with_the_outputs(rng):
    """Class probabilities with inplace_backward (the gradient in the logits' memory), the
    z part and the predicted tokens; a target that requires grad is taken where no gradient is
    asked for (torch.no_grad)."""
    logits = random_logits(rng, 5, 33)
    q = rng.random((5, 33)) ** 3
    target = to_torch((q / q.sum(axis=1, keepdims=True)).astype(np.float32))
    leaf = to_torch(logits).requires_grad_()
    x = leaf * 1
    out = nce.cross_entropy(x, target, label_smoothing=0.1, z_loss=1e-3, inplace_backward=True,
                            return_z_loss=True, return_predicted_tokens=True)
    out.loss.backward(torch.tensor(0.5))
    expected_loss, expected_grad = torch_loss_and_grad(logits, target.numpy(), grad_output=0.5,
                                                       label_smoothing=0.1, z_loss=1e-3)
    assert_close(from_torch(out.loss), expected_loss, 2e-5, 1e-6, "loss")
    assert_close(from_torch(leaf.grad), expected_grad, 2e-5, 1e-6 * np.abs(expected_grad).max(),
                 "input gradient")
    assert torch.equal(x.detach(), leaf.grad), "the gradient is not in the input's memory"
    assert torch.equal(out.predicted_tokens, leaf.detach().argmax(dim=1))
    assert out.z_loss.shape == () and out.token_accuracy is None
    with torch.no_grad():
        loss = nce.CrossEntropyLoss()(leaf, target.clone().requires_grad_())
    assert_close(from_torch(loss), torch_loss_and_grad(logits, target.numpy())[0], 2e-5, 1e-6,
                 "loss without grad mode")
