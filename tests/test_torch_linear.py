"""numba_ce.torch.linear_cross_entropy and LinearCrossEntropyLoss against torch's unfused
linear + cross_entropy (float64 autograd) in both designs (memory="low" and "fast"): options,
reductions with an upstream gradient, which parameters require grad, autocast and errors. CPU
tensors in the simulator, CUDA tensors on a GPU.
"""
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import numba_ce.torch as nce
from numba_ce.portable import SIMULATOR
from helpers import (DTYPES, assert_close, assert_rounded_close, random_target, random_upstream,
                     random_weight, torch_linear_loss_and_grads)
from test_linear import MEMORY, N_CLASSES, N_FEATURES, N_ROWS, RELATIVE, random_head
from torch_helpers import from_torch, to_torch

DEVICE = "cpu" if SIMULATOR else "cuda"
CASES = [
    dict(reduction="mean", bias=True, chunk_size=4),
    dict(reduction="sum", ignored=0.3, weighted=True, smoothing=0.1, z_loss=1e-3, upstream="given"),
    dict(reduction="none", bias=True, softcap=5.0, chunk_size=2, upstream="given"),
    dict(reduction="none", ignored=0.3, z_loss=1e-3, upstream="given", frozen_input=True),
    dict(reduction="mean", bias=True, frozen_weight=True, target_dtype=torch.int32,
         upstream="given"),
]


def check(rng, dtype, *, reduction="mean", bias=False, ignored=0.0, weighted=False,
          smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None, upstream="ones",
          frozen_input=False, frozen_weight=False, target_dtype=torch.int64, memory="low"):
    x, w, b = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, dtype, bias)
    target = random_target(rng, N_ROWS, N_CLASSES, ignored_share=ignored)
    weight = random_weight(rng, N_CLASSES, weighted)
    grad_output = random_upstream(rng, N_ROWS, reduction, upstream)
    options = dict(weight=weight, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss,
                   softcap=softcap)
    leaves = [to_torch(a, DEVICE).requires_grad_(not frozen) for a, frozen in
              ((x, frozen_input), (w, frozen_weight), (b, False)) if a is not None]
    torch_options = {**options, "weight": None if weight is None else to_torch(weight, DEVICE)}
    loss = nce.linear_cross_entropy(leaves[0], leaves[1], to_torch(target, DEVICE, target_dtype),
                                    linear_bias=leaves[2] if bias else None,
                                    chunk_size=chunk_size, memory=memory, **torch_options)
    assert loss.dtype == torch.float32
    loss.backward(torch.ones_like(loss) if grad_output is None else
                  torch.as_tensor(grad_output, dtype=torch.float32, device=DEVICE))

    expected = torch_linear_loss_and_grads(x, w, target, linear_bias=b, grad_output=grad_output,
                                           logits_format=dtype, **options)
    assert_close(from_torch(loss), expected.loss, 0.0,
                 RELATIVE["float32"] * np.abs(expected.loss).max(), "loss")
    for name, leaf, want, magnitude in zip(["input", "linear_weight", "linear_bias"], leaves,
                                           expected[1:4], expected.magnitudes):
        if not leaf.requires_grad:
            assert leaf.grad is None
            continue
        assert leaf.grad.dtype == leaf.dtype, f"{name}.grad dtype"
        # fp16 "mean" scales the rounded input gradient by 1 / S_w (the fast design); for "mean"
        # and "sum" the adapter scales a gradient stored for an upstream of 1 by a given one
        roundings = (1 + (dtype == "float16" and reduction == "mean" and name == "input")
                     + (grad_output is not None and reduction != "none"))
        assert_rounded_close(from_torch(leaf.grad), want, magnitude, dtype, f"{name}.grad",
                             roundings=roundings)


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_unfused_torch(rng, case, dtype, memory):
    check(rng, dtype, memory=memory, **CASES[case])


@pytest.mark.parametrize("memory", ["low", "fast"])
def test_module_owns_the_head(rng, memory):
    """LinearCrossEntropyLoss(in_features, num_classes, bias=...) as torch 2.13's module: the
    head's parameters get the gradients of the unfused computation, in either design."""
    torch.manual_seed(int(rng.integers(2**31)))
    crit = nce.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES, bias=True, device=DEVICE,
                                      label_smoothing=0.1, chunk_size=4, memory=memory)
    x = torch.randn(N_ROWS, N_FEATURES, device=DEVICE)
    target = random_target(rng, N_ROWS, N_CLASSES, ignored_share=0.3)
    crit(x, to_torch(target, DEVICE)).backward()
    head = crit.linear
    expected = torch_linear_loss_and_grads(
        from_torch(x), from_torch(head.weight), target, linear_bias=from_torch(head.bias),
        label_smoothing=0.1)
    assert_close(from_torch(head.weight.grad), expected[2], 0.0, 1e-5, "weight.grad")
    assert_close(from_torch(head.bias.grad), expected[3], 0.0, 1e-5, "bias.grad")
    assert f"chunk_size=4, memory='{memory}'" in repr(crit)


def autocast_exact_head(rng):
    """float32 x and W whose bfloat16 casts are random_head's exact head, each off its cast by
    up to a relative 2**-10 (under half a bf16 ulp, >= 2**-9, so the cast gives the head back).
    Returns x, W and the casts."""
    x_cast, w_cast, _ = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", False)
    off = [1 + 2.0**-10 * rng.uniform(-1, 1, a.shape) for a in (x_cast, w_cast)]
    return ((x_cast * off[0]).astype(np.float32), (w_cast * off[1]).astype(np.float32), x_cast,
            w_cast)


@pytest.mark.parametrize("memory", MEMORY)
def test_autocast_casts_the_head_like_linear(rng, memory):
    """float32 parameters under autocast: the product runs in bfloat16 (as F.linear's would) and
    the gradients come back in float32. The reference is float64 on the same bf16 logits; a
    product left in float32 (the inputs' offsets kept, the logits unrounded) moves each row's
    loss by ~1e-3, where the tolerance is ~1e-5 (checked row by row: a mean can cancel)."""
    x, w, x_cast, w_cast = autocast_exact_head(rng)
    target = random_target(rng, N_ROWS, N_CLASSES)
    xt, wt = (to_torch(a, DEVICE).requires_grad_() for a in (x, w))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = nce.linear_cross_entropy(xt, wt, to_torch(target, DEVICE), reduction="none",
                                        memory=memory)
    loss.backward(torch.ones_like(loss))
    assert xt.grad.dtype == torch.float32 and wt.grad.dtype == torch.float32

    expected = torch_linear_loss_and_grads(x_cast, w_cast, target, logits_format="bfloat16",
                                           reduction="none")
    assert_close(from_torch(loss), expected.loss, 2e-6, 1e-6, "loss")
    for name, leaf, want, magnitude in zip(["input", "linear_weight"], (xt, wt), expected[1:3],
                                           expected.magnitudes):
        assert_rounded_close(from_torch(leaf.grad), want, magnitude, "bfloat16", f"{name}.grad")


def test_per_sample_gradients_through_torch_func_are_refused(rng):
    """torch.func.grad over the head's weight (functional_call's per-sample gradients): a clear
    error naming the transformed argument, before any product."""
    x, w, _ = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", False)
    xt, wt = to_torch(x, DEVICE), to_torch(w, DEVICE)
    target = to_torch(random_target(rng, N_ROWS, N_CLASSES), DEVICE)
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "numba_ce.torch cannot run under torch.func's transforms (grad, vmap, jacrev, jvp), "
            "and linear_weight arrived as one of their tensors, which hold no memory a kernel "
            "can read; compute this loss with torch's own functions inside them") + "$"):
        torch.func.grad(lambda head: nce.linear_cross_entropy(xt, head, target))(wt)


def test_second_backward_is_refused(rng):
    x, w, _ = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", False)
    xt = to_torch(x, DEVICE).requires_grad_()
    loss = nce.linear_cross_entropy(xt, to_torch(w, DEVICE),
                                    to_torch(random_target(rng, N_ROWS, N_CLASSES), DEVICE))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=re.escape(
            "a second backward through one forward (retain_graph=True) cannot be answered")):
        loss.backward()


def test_errors_name_what_arrived(rng):
    x, w, _ = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", False)
    xt, wt = to_torch(x, DEVICE), to_torch(w, DEVICE)
    target = to_torch(random_target(rng, N_ROWS, N_CLASSES), DEVICE)
    with pytest.raises(TypeError, match=re.escape(
            "linear_weight dtype must match input's float32 (got float16)")):
        nce.linear_cross_entropy(xt, wt.half(), target)
    with pytest.raises(TypeError, match=re.escape("linear_weight must be a torch.Tensor (got "
                                                  "ndarray)")):
        nce.linear_cross_entropy(xt, w, target)
    with pytest.raises(ValueError, match=re.escape("memory must be 'low' or 'fast' (got 'lean')")):
        nce.linear_cross_entropy(xt, wt, target, memory="lean")
    with pytest.raises(ValueError, match=re.escape("chunk_size must be at least 1 row (got 0)")):
        nce.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES, chunk_size=0)
    with pytest.raises(ValueError, match=re.escape("memory must be 'low' or 'fast' (got None)")):
        nce.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES, memory=None)
    if not SIMULATOR:
        with pytest.raises(ValueError, match=re.escape(
                "linear_weight must be on the same device as input (expected cuda:0, got cpu)")):
            nce.linear_cross_entropy(xt, wt.cpu(), target)


# torch 2.13's own linear_cross_entropy and LinearCrossEntropyOptions (older torch has neither)
NEEDS_TORCH_2_13 = pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyOptions"),
                                      reason="torch before 2.13 has no linear_cross_entropy")


def torch_options(**fields):
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
    return LinearCrossEntropyOptions(**fields)


@NEEDS_TORCH_2_13
@pytest.mark.parametrize("call", ["function", "module"])
@pytest.mark.parametrize("options", [None, dict(), dict(chunking_method="aspect_ratio:2"),
                                     dict(chunking_method=None, batch_chunk_size=3),
                                     dict(chunking_method=None, acc_policy="compact")])
def test_torch_2_13_signature_and_options(rng, call, options):
    """torch 2.13's linear_cross_entropy and LinearCrossEntropyLoss calls as written for torch:
    ignore_index left None (-100), options=LinearCrossEntropyOptions(...) or None; loss and
    gradients those of torch's own function on the same float32 values."""
    F = torch.nn.functional
    x, w, _ = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", False)
    target = random_target(rng, N_ROWS, N_CLASSES, ignored_share=0.3)  # -100 rows
    # (torch's chunked path takes no label smoothing: it would warn and ignore the options)
    arguments = dict(reduction="mean",
                     options=None if options is None else torch_options(**options))
    results = []
    for implementation in ("torch", call):
        xt = to_torch(x, DEVICE).requires_grad_()
        wt = to_torch(w, DEVICE).requires_grad_()
        t = to_torch(target, DEVICE)
        if implementation == "module":
            crit = nce.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES, device=DEVICE, **arguments)
            theirs = torch.nn.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES, **arguments)
            for name in ("num_classes", "out_features", "reduction", "label_smoothing"):
                assert getattr(crit, name) == getattr(theirs, name), name
            assert crit.linear.in_features == theirs.linear.in_features
            with torch.no_grad():
                crit.linear.weight.copy_(wt)
            loss = crit(xt, t)
            loss.backward()
            results.append((loss, xt.grad, crit.linear.weight.grad))
            continue
        function = F.linear_cross_entropy if implementation == "torch" else (
            nce.linear_cross_entropy)
        loss = function(xt, wt, t, **arguments)
        loss.backward()
        results.append((loss, xt.grad, wt.grad))
    for name, ours, theirs in zip(("loss", "grad_input", "grad_linear_weight"), results[1],
                                  results[0]):
        expected = from_torch(theirs)
        assert_close(from_torch(ours), expected, 1e-5, 1e-6 * np.abs(expected).max(), name)


@NEEDS_TORCH_2_13
def test_torch_options_numba_ce_cannot_honour_are_refused():
    x = torch.randn(4, N_FEATURES, device=DEVICE)
    w = torch.randn(N_CLASSES, N_FEATURES, device=DEVICE)
    t = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    refusals = [
        (dict(options=torch_options(acc_dtype=torch.bfloat16)),
         "options.acc_dtype must be None or torch.float32 (got torch.bfloat16)"),
        (dict(options=torch_options(allow_retain_graph=True)),
         "options.allow_retain_graph=True is not supported"),
        (dict(options=torch_options(), chunk_size=2), "pass chunk_size or options, not both"),
        (dict(options=torch_options(chunking_method="aspect_ratio", batch_chunk_size=3)),
         "batch_chunk_size (=3) and chunking_method ('aspect_ratio') give different chunk "
         "sizes (3 vs 2); pass only one (as torch refuses them)"),
    ]
    for arguments, message in refusals:
        with pytest.raises(ValueError, match=re.escape(message)):
            nce.linear_cross_entropy(x, w, t, **arguments)
    with pytest.raises(ValueError, match=re.escape("out_features must be () (got (2, 3))")):
        nce.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES, out_features=(2, 3))
    with pytest.raises(ValueError, match=re.escape("options.allow_retain_graph=True")):
        nce.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES,
                                   options=torch_options(allow_retain_graph=True))


@NEEDS_TORCH_2_13
@pytest.mark.parametrize("shape", [(8192, 4096, 128256), (5, 8, 8), (4, 8, 24)])
@pytest.mark.parametrize("fields", [
    dict(chunking_method="aspect_ratio"), dict(chunking_method="aspect_ratio:2"),
    dict(chunking_method=None, batch_chunk_size=1000), dict(chunking_method=None),
    dict(batch_chunk_size=3),  # "auto" with a size: the size (torch turns "auto" off)
    dict(chunking_method="aspect_ratio:4", batch_chunk_size=64)])  # agreeing at the 1st shape
def test_torch_options_chunking_as_torch_defines_it(fields, shape):
    """The chunk size of torch's own resolution of the options (LinearCrossEntropyOptions.
    _adjust), or its refusal; "auto" alone leaves numba_ce its own chunks (None)."""
    from numba_ce.torch.linear_forms import chunk_size_of
    options = torch_options(**fields)
    try:
        expected = options._adjust(*shape, torch.bfloat16).batch_chunk_size
    except ValueError as refusal:
        with pytest.raises(ValueError, match="give different chunk sizes"):
            chunk_size_of(options, None, *shape)
        assert "give different chunk sizes" in str(refusal)
        return
    assert chunk_size_of(options, None, *shape) == expected
    assert chunk_size_of(torch_options(), None, *shape) is None


@pytest.mark.parametrize("entry", ["function", "module"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("memory", MEMORY)
def test_return_z_loss(rng, memory, reduction, entry):
    """return_z_loss=True: (loss, z_loss) as cross_entropy gives them, the z part (no gradient)
    that of torch's float64 logits within float32 rounding (z * lse**2 per counted row, "mean"
    over the counted rows), reduced as the loss; the loss and the gradients those of a call
    without it, to the bit."""
    x, w, b = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", True)
    target = to_torch(random_target(rng, N_ROWS, N_CLASSES, ignored_share=0.3), DEVICE)
    options = dict(reduction=reduction, z_loss=1e-2, label_smoothing=0.1, memory=memory,
                   chunk_size=3)
    results = []
    for return_z_loss in (True, False):
        leaves = [to_torch(a, DEVICE).requires_grad_() for a in (x, w, b)]
        if entry == "module":
            crit = nce.LinearCrossEntropyLoss(N_FEATURES, N_CLASSES, bias=True, device=DEVICE,
                                              return_z_loss=return_z_loss, **options)
            assert f"return_z_loss={return_z_loss}" in repr(crit)
            with torch.no_grad():
                crit.linear.weight.copy_(leaves[1])
                crit.linear.bias.copy_(leaves[2])
            leaves[1:] = [crit.linear.weight, crit.linear.bias]
            returned = crit(leaves[0], target)
        else:
            returned = nce.linear_cross_entropy(leaves[0], leaves[1], target,
                                                linear_bias=leaves[2],
                                                return_z_loss=return_z_loss, **options)
        loss = returned[0] if return_z_loss else returned
        loss.backward(torch.full_like(loss, 0.75))
        results.append((returned, [leaf.grad for leaf in leaves]))
    ((loss, z_part), grads), (plain_loss, plain_grads) = results
    assert not z_part.requires_grad and z_part.shape == loss.shape
    assert z_part.dtype == torch.float32
    assert torch.equal(loss.detach(), plain_loss.detach())
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    logits = torch.tensor(np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
                          + np.asarray(b, np.float64))
    counted = torch.tensor(from_torch(target) != -100)
    z_rows = 1e-2 * torch.logsumexp(logits, dim=1) ** 2 * counted
    expected = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / counted.sum()}
    assert_close(from_torch(z_part), expected[reduction].numpy(), 2e-5, 1e-7, "z part")


def test_return_z_loss_with_the_argmax_outputs(rng):
    """With return_token_accuracy the z part goes into the CrossEntropyOutput, as
    cross_entropy's."""
    x, w, _ = random_head(rng, N_ROWS, N_FEATURES, N_CLASSES, "float32", False)
    target = to_torch(random_target(rng, N_ROWS, N_CLASSES), DEVICE)
    out = nce.linear_cross_entropy(to_torch(x, DEVICE), to_torch(w, DEVICE), target, z_loss=1e-2,
                                   return_z_loss=True, return_token_accuracy=True)
    loss, z_part = nce.linear_cross_entropy(to_torch(x, DEVICE), to_torch(w, DEVICE), target,
                                            z_loss=1e-2, return_z_loss=True)
    assert torch.equal(out.loss, loss) and torch.equal(out.z_loss, z_part)
    assert out.token_accuracy is not None and out.predicted_tokens is None
    with pytest.raises(TypeError, match=re.escape("return_z_loss must be True or False (got 1)")):
        nce.linear_cross_entropy(to_torch(x, DEVICE), to_torch(w, DEVICE), target,
                                 return_z_loss=1)
