"""numba_ce.torch against torch.nn.functional.cross_entropy called the same way (issue 20): every
form of torch's signature (positional, keywords, the legacy size_average and reduce), its input
forms (K-dimensional, unbatched), uint8 and int32 targets, class-probability targets and float64
logits, through the
function and the module, on fresh random inputs, each compared with torch's float64 loss and
input gradient; then PyTorch's own OpInfo sample inputs for nn.functional.cross_entropy. CPU
tensors in the simulator, CUDA tensors on a GPU (the bad inputs' errors: test_torch.py)."""
import contextlib
import re
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

import numba_ce.torch as nce
from numba_ce.portable import SIMULATOR
from helpers import DTYPES, TOLERANCES, assert_close
from torch_helpers import from_torch, to_torch

DEVICE = "cpu" if SIMULATOR else "cuda"

N_CLASSES = 7
IGNORED = 3  # the ignore_index of the cases that ignore: a class index, so rows of it exist
LEGACY_WARNING = "size_average and reduce args will be deprecated, please use reduction='{}' " \
                 "instead."
NUMPY_DTYPES = {**DTYPES, "float64": np.dtype(np.float64)}


class RandomWeight:
    """Stands for fresh random class weights (of the input's dtype) in a Call's arguments."""


WEIGHT = RandomWeight()


class Call(NamedTuple):
    """One call of torch's cross_entropy, or of CrossEntropyLoss (whose parameters are the same,
    in the same order): the input's shape (classes in dimension 1; (C,) unbatched) and dtype,
    the target's dtype, the arguments after (input, target), whether a quarter of the target
    elements are set to IGNORED, whether the input is in channels-last memory, and the reduction
    named by the deprecation warning that legacy arguments bring (None: no warning); with
    ``probabilities``, the target holds class probabilities of the input's shape and dtype."""
    shape: tuple
    args: tuple = ()
    kwargs: dict = {}
    dtype: str = "float32"
    target_dtype: torch.dtype = torch.int64
    ignored: bool = False
    channels_last: bool = False
    legacy: str | None = None
    probabilities: bool = False


K_DIM = (3, N_CLASSES, 5)
CALLS = {
    "positional, every parameter": Call((6, N_CLASSES), (WEIGHT, None, IGNORED, None, "sum", 0.1),
                                        ignored=True),
    "positional (x, t, None, None, -100)": Call((6, N_CLASSES), (None, None, -100)),
    "keywords": Call((6, N_CLASSES), kwargs=dict(weight=WEIGHT, ignore_index=IGNORED,
                                                 reduction="none", label_smoothing=0.2),
                     ignored=True),
    "legacy size_average=False": Call((6, N_CLASSES), (None, False), legacy="sum"),
    "legacy reduce=False": Call((6, N_CLASSES), kwargs=dict(reduce=False), legacy="none"),
    "legacy positional, both True": Call((6, N_CLASSES), (WEIGHT, True, -100, True),
                                         legacy="mean"),
    "legacy over reduction": Call((6, N_CLASSES), kwargs=dict(size_average=False,
                                                              reduction="none"), legacy="sum"),
    **{f"(N, C, d) {reduction}": Call(K_DIM, kwargs=dict(reduction=reduction))
       for reduction in ("mean", "sum", "none")},
    **{f"(N, C, d1, d2) {reduction}, every option": Call(
        (2, N_CLASSES, 3, 4), (WEIGHT, None, IGNORED, None, reduction, 0.1), ignored=True)
       for reduction in ("mean", "sum", "none")},
    "(N, C, d1, d2) channels-last": Call((2, N_CLASSES, 3, 4), kwargs=dict(reduction="none"),
                                         channels_last=True),
    "(N, C, 1)": Call((4, N_CLASSES, 1), kwargs=dict(weight=WEIGHT)),
    "(N, C, d) bfloat16": Call(K_DIM, kwargs=dict(reduction="none"), dtype="bfloat16"),
    "(N, C, d) float16, weights": Call(K_DIM, (WEIGHT,), dtype="float16"),
    "(0, C, d) none": Call((0, N_CLASSES, 3), kwargs=dict(reduction="none")),
    "(0, C, d) sum": Call((0, N_CLASSES, 3), kwargs=dict(reduction="sum")),
    **{f"unbatched (C,) {reduction}": Call((N_CLASSES,), (WEIGHT,),
                                           dict(reduction=reduction, label_smoothing=0.1))
       for reduction in ("mean", "sum", "none")},
    "uint8 target": Call((6, N_CLASSES), kwargs=dict(ignore_index=IGNORED),
                         target_dtype=torch.uint8, ignored=True),
    "uint8 target, (N, C, d)": Call(K_DIM, target_dtype=torch.uint8),
    "int32 target, (N, C, d)": Call(K_DIM, kwargs=dict(reduction="none"),
                                    target_dtype=torch.int32),
    "float64": Call((6, N_CLASSES), (WEIGHT,), dict(label_smoothing=0.1), dtype="float64"),
    "float64 (N, C, d1, d2)": Call((2, N_CLASSES, 3, 2), kwargs=dict(reduction="none"),
                                   dtype="float64"),
    "float64 unbatched": Call((N_CLASSES,), dtype="float64"),
    **{f"probabilities {reduction}, every option": Call(
        (6, N_CLASSES), (WEIGHT, None, -100, None, reduction, 0.1), probabilities=True)
       for reduction in ("mean", "sum", "none")},
    "probabilities, keywords": Call((6, N_CLASSES), kwargs=dict(weight=WEIGHT, reduction="sum"),
                                    probabilities=True),
    "probabilities (N, C, d1, d2) none": Call((2, N_CLASSES, 3, 4), (WEIGHT,),
                                              dict(reduction="none", label_smoothing=0.2),
                                              probabilities=True),
    "probabilities (N, C, d) channels-last": Call((2, N_CLASSES, 3, 4), channels_last=True,
                                                  probabilities=True),
    "probabilities unbatched (C,)": Call((N_CLASSES,), (WEIGHT,), dict(reduction="none"),
                                         probabilities=True),
    "probabilities bfloat16": Call((6, N_CLASSES), (WEIGHT,), dict(label_smoothing=0.1),
                                   dtype="bfloat16", probabilities=True),
    "probabilities float16 (N, C, d)": Call(K_DIM, kwargs=dict(reduction="sum"), dtype="float16",
                                            probabilities=True),
    "probabilities float64 (N, C, d)": Call(K_DIM, (WEIGHT,), dict(reduction="none"),
                                            dtype="float64", probabilities=True),
    "probabilities, legacy reduce=False": Call((6, N_CLASSES), kwargs=dict(reduce=False),
                                               legacy="none", probabilities=True),
    "probabilities (0, C)": Call((0, N_CLASSES), kwargs=dict(reduction="sum"),
                                 probabilities=True),
}


def random_input(rng, call):
    """(leaf input, target, weight) of ``call``: normal logits (scale 3) rounded to its dtype,
    class indices of its dtype (or class probabilities, of the input's shape and dtype and in
    its memory format), weights in [0.5, 1.5) of the input's dtype."""
    values = (rng.standard_normal(call.shape) * 3).astype(NUMPY_DTYPES[call.dtype])
    x = to_torch(values, DEVICE)
    if call.channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = to_torch((rng.random(N_CLASSES) + 0.5).astype(NUMPY_DTYPES[call.dtype]), DEVICE)
    if call.probabilities:
        class_dim = 0 if len(call.shape) == 1 else 1
        q = rng.random(call.shape) ** 3
        q /= np.maximum(q.sum(axis=class_dim, keepdims=True), 1e-30)
        target = to_torch(q.astype(NUMPY_DTYPES[call.dtype]), DEVICE)
        if call.channels_last:
            target = target.to(memory_format=torch.channels_last)
        return x.requires_grad_(), target, weight
    element_shape = call.shape[:1] + call.shape[2:] if len(call.shape) > 1 else ()
    target = rng.integers(0, N_CLASSES, element_shape)
    if call.ignored:
        target[rng.random(element_shape) < 0.25] = IGNORED
    return x.requires_grad_(), to_torch(target, DEVICE, call.target_dtype), weight


def arguments(call, weight):
    """``call``'s positional and keyword arguments, ``weight`` in place of WEIGHT."""
    def given(value):
        return weight if value is WEIGHT else value
    return tuple(map(given, call.args)), {k: given(v) for k, v in call.kwargs.items()}


def warns_legacy(reduction):
    """A context that expects torch's deprecation warning for legacy arguments that mean
    ``reduction`` (nothing when it is None: the suite's warnings are errors)."""
    if reduction is None:
        return contextlib.nullcontext()
    return pytest.warns(UserWarning, match=f"^{re.escape(LEGACY_WARNING.format(reduction))}$")


def same_layout(a, b):
    """Whether two tensors of one shape have the same strides (a dimension of size 1 takes
    any)."""
    return all(n == 1 or p == q for n, p, q in zip(a.shape, a.stride(), b.stride()))


def torch_float64(x, target, weight, call):
    """torch's loss of ``call`` on the float64 values of its inputs, and its input gradient for
    a fresh upstream gradient (returned too)."""
    leaf = x.detach().double().requires_grad_()
    args, kwargs = arguments(call, weight.double())
    target = target.double() if call.probabilities else target.long()
    with warns_legacy(call.legacy):
        loss = F.cross_entropy(leaf, target, *args, **kwargs)
    upstream = torch.rand_like(loss) + 0.5
    loss.backward(upstream)
    return loss.detach(), leaf.grad, upstream


def ours(entry, x, target, weight, call):
    args, kwargs = arguments(call, weight)
    with warns_legacy(call.legacy):
        if entry == "function":
            return nce.cross_entropy(x, target, *args, **kwargs)
        crit = nce.CrossEntropyLoss(*args, **kwargs)
    return crit(x, target)


@pytest.mark.parametrize("entry", ["function", "module"])
@pytest.mark.parametrize("case", CALLS)
def test_call_matches_torch(rng, case, entry):
    """The loss in torch's shape (float32; float64 for float64 input), and the input's gradient
    in its dtype and layout, within TOLERANCES of torch's float64 results (float64 input: those
    of float32, in which it is computed)."""
    call = CALLS[case]
    x, target, weight = random_input(rng, call)
    before = x.detach().clone()
    expected_loss, expected_grad, upstream = torch_float64(x, target, weight, call)
    loss = ours(entry, x, target, weight, call)
    loss.backward(upstream.to(loss.dtype))
    tolerance = TOLERANCES["float32" if call.dtype == "float64" else call.dtype]
    assert loss.dtype == (torch.float64 if call.dtype == "float64" else torch.float32)
    assert_close(from_torch(loss), from_torch(expected_loss), *tolerance["loss"], "loss")
    assert x.grad.dtype == x.dtype and same_layout(x.grad, x)
    scale = from_torch(expected_grad.abs()).max(initial=0.0)
    assert_close(from_torch(x.grad), from_torch(expected_grad), tolerance["grad"][0],
                 tolerance["grad"][1] * scale, "input gradient")
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "float64"])
def test_inplace_backward_of_k_dimensional_input(rng, layout):
    """(N, C, d1, d2) input whose classes are contiguous (channels-last) is read in place and
    takes the gradient; any other (a permuted copy, float64's float32 copy) is left alone while
    the copy takes it: the gradient is torch's either way."""
    call = Call((2, N_CLASSES, 3, 4), kwargs=dict(reduction="sum"),
                dtype="float64" if layout == "float64" else "float32",
                channels_last=layout == "channels-last")
    leaf, target, weight = random_input(rng, call)
    _, expected_grad, upstream = torch_float64(leaf, target, weight, call)
    x = leaf * 1  # computed: a leaf that requires grad is not overwritten
    before = x.detach().clone()
    loss = nce.cross_entropy(x, target, reduction="sum", inplace_backward=True)
    loss.backward(upstream.to(loss.dtype))
    assert_close(from_torch(leaf.grad), from_torch(expected_grad), 2e-5,
                 1e-6 * from_torch(expected_grad.abs()).max(), "input gradient")
    if layout == "channels-last":
        assert torch.equal(x.detach(), leaf.grad), "the gradient is not in the input's memory"
    else:
        assert torch.equal(x.detach(), before), "the input was modified"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_module_returns_the_z_loss(rng, reduction):
    """CrossEntropyLoss(return_z_loss=True) returns (loss, z part) as the function does, the z
    part in the loss's shape (the target's for "none" with K-dimensional input)."""
    x, target, _ = random_input(rng, Call(K_DIM, ignored=True))
    options = dict(ignore_index=IGNORED, reduction=reduction, z_loss=1e-2)
    crit = nce.CrossEntropyLoss(**options, return_z_loss=True)
    assert "return_z_loss=True" in repr(crit)
    loss, z_part = crit(x, target)
    expected_loss, expected_z = nce.cross_entropy(x, target, **options, return_z_loss=True)
    logits = x.detach().double().movedim(1, -1)
    z_rows = 1e-2 * torch.logsumexp(logits, dim=-1) ** 2 * (target != IGNORED)
    z_reference = z_rows if reduction == "none" else z_rows.sum() / (target != IGNORED).sum()
    assert z_part.shape == target.shape if reduction == "none" else z_part.shape == ()
    assert torch.equal(loss, expected_loss) and torch.equal(z_part, expected_z)
    assert_close(from_torch(z_part), from_torch(z_reference), 2e-5, 1e-6, "z part")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_argmax_outputs_of_k_dimensional_input(rng, reduction):
    """The predicted tokens are torch.argmax over dimension 1 in the target's shape (-1 where
    ignored); the token accuracy is reduced as the loss, in the target's shape for "none"."""
    x, target, _ = random_input(rng, Call((2, N_CLASSES, 3, 4), ignored=True))
    out = nce.cross_entropy(x, target, ignore_index=IGNORED, reduction=reduction,
                            return_token_accuracy=True, return_predicted_tokens=True)
    counted = target != IGNORED
    predicted = torch.where(counted, x.detach().argmax(dim=1), -1)
    correct = (counted & (predicted == target)).float()
    assert torch.equal(out.predicted_tokens, predicted)
    assert torch.equal(out.token_accuracy, correct if reduction == "none" else correct.sum())


def test_unbatched_target_of_shape_1(rng):
    """torch takes a (1,) target for a (C,) input too, as a 0-d one: the loss is 0-d. (torch's
    own backward of that form fails, "size mismatch": the gradient is compared with the 0-d
    target's.)"""
    call = Call((N_CLASSES,), kwargs=dict(reduction="none"))
    x, target, weight = random_input(rng, call)
    expected_loss, expected_grad, upstream = torch_float64(x, target, weight, call)
    loss = nce.cross_entropy(x, target.reshape(1), reduction="none")
    assert_close(from_torch(F.cross_entropy(x.detach(), target.reshape(1), reduction="none")),
                 from_torch(expected_loss), 2e-5, 1e-6, "torch's loss")
    loss.backward(upstream.float())
    assert_close(from_torch(loss), from_torch(expected_loss), 2e-5, 1e-6, "loss")
    assert_close(from_torch(x.grad), from_torch(expected_grad), 2e-5, 1e-6, "input gradient")


@pytest.mark.parametrize("args,reduction", [((None, False), "sum"),
                                            ((None, None, 3, False), "none"),
                                            ((None, True, -100, True), "mean")])
def test_module_legacy_arguments_set_its_reduction_as_torch(args, reduction):
    with pytest.warns(UserWarning, match=re.escape(LEGACY_WARNING.format(reduction))):
        theirs = torch.nn.CrossEntropyLoss(*args)
    with pytest.warns(UserWarning, match=re.escape(LEGACY_WARNING.format(reduction))):
        crit = nce.CrossEntropyLoss(*args)
    assert crit.reduction == theirs.reduction == reduction
    assert crit.ignore_index == theirs.ignore_index


OPINFO_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def opinfo_samples(dtype, device=DEVICE):
    """PyTorch's own sample inputs for nn.functional.cross_entropy in ``dtype`` on ``device``
    (its OpInfo in torch.testing._internal.common_methods_invocations, which needs expecttest),
    drawn from torch's generator."""
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [op for op in op_db if op.name == "nn.functional.cross_entropy"]
    return list(op.sample_inputs(device, dtype, requires_grad=True))


# Which samples there are (drawn again in each test, from the test's seed)
SAMPLES = [(name, index) for name, dtype in OPINFO_DTYPES.items()
           for index in range(len(opinfo_samples(dtype, "cpu")))]


@pytest.mark.parametrize("dtype,index", SAMPLES, ids=[f"{d}-{i}" for d, i in SAMPLES])
def test_opinfo_sample_matches_torch(dtype, index):
    """Each OpInfo sample's loss and input gradient, within TOLERANCES (float64: float32's) of
    torch's on the sample's values in float64; the loss in torch's shape. Class-probability
    targets (the samples' require grad) are passed detached: numba_ce.torch computes no gradient
    for them and refuses one that requires it (test_torch.py)."""
    sample = opinfo_samples(OPINFO_DTYPES[dtype])[index]
    target, *args = sample.args
    target = target.detach()
    x = sample.input.detach().clone().requires_grad_()
    reference = x.detach().double().requires_grad_()
    expected = F.cross_entropy(reference, target.double() if target.is_floating_point()
                               else target, *args, **{
                                   name: value.double() if torch.is_tensor(value) else value
                                   for name, value in sample.kwargs.items()})
    upstream = torch.rand_like(expected) + 0.5
    expected.backward(upstream)
    loss = nce.cross_entropy(x, target, *args, **sample.kwargs)
    loss.backward(upstream.to(loss.dtype))
    tolerance = TOLERANCES["float32" if dtype == "float64" else dtype]
    assert loss.shape == expected.shape
    assert_close(from_torch(loss), from_torch(expected), *tolerance["loss"], "loss")
    scale = from_torch(reference.grad.abs()).max(initial=0.0)
    assert_close(from_torch(x.grad), from_torch(reference.grad), tolerance["grad"][0],
                 tolerance["grad"][1] * scale, "input gradient")
