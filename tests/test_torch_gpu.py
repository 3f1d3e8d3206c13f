"""numba_ce.torch on CUDA tensors: the simulator's checks again, and what only a GPU has: a
non-default stream, CUDA-graph capture and replay, torch.compile with Inductor, autocast, and a
short training loop against torch's own loss."""
import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F
from torch._dynamo.utils import counters

import numba_ce.torch as nce
from numba_ce.portable import SIMULATOR
from helpers import (INDUCTOR_WARNINGS, TOLERANCES, assert_close, random_logits, random_target,
                     torch_loss_and_grad)
from torch_helpers import (CASES, ROTATION, check_against_torch, check_autocast, from_torch,
                           to_torch)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(SIMULATOR or not torch.cuda.is_available(),
                       reason="needs a CUDA GPU visible to torch (running in the CUDA simulator)"),
]
CUDA = "cuda"


# V = 1001 reads one element a word; V = 4096 reads 8-byte words with blocks of many warps.
@pytest.mark.parametrize("n_rows,n_classes", [(37, 1001), (64, 4096)])
@pytest.mark.parametrize("reduction,case,dtype", ROTATION)
def test_matches_torch(rng, reduction, case, dtype, n_rows, n_classes):
    check_against_torch(rng, CUDA, dtype, n_rows, n_classes, reduction=reduction, **CASES[case])


def test_inplace_backward_overwrite_detected_by_autograd(rng):
    x = to_torch(random_logits(rng, 8, 300), CUDA).requires_grad_()
    logits = x.exp()  # ExpBackward saves its output: the logits
    loss = nce.cross_entropy(logits, to_torch(random_target(rng, 8, 300), CUDA),
                             inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("rows", [1, 3])
def test_rows_of_a_wider_tensor_in_place(rng, rows):
    """bf16 rows of a wider tensor (row stride 50 elements, 100 bytes: not a whole number of
    8-byte words), one row or several, read in place; with inplace_backward the gradient goes
    into the view and the columns beside it are untouched."""
    source = to_torch(random_logits(rng, 3, 50, "bfloat16"), CUDA).requires_grad_()
    wide = source * 1  # computed logits: inplace_backward may overwrite them (not a leaf's)
    padding = wide[:, 48:].detach().clone()
    logits = wide[:rows, :48]
    target = random_target(rng, rows, 48)
    expected_loss, expected_grad = torch_loss_and_grad(from_torch(logits), target)
    loss = nce.cross_entropy(logits, to_torch(target, CUDA), inplace_backward=True)
    loss.backward()
    tol = TOLERANCES["bfloat16"]
    grad_tol = (tol["grad"][0], tol["grad"][1] * np.abs(expected_grad).max())
    assert_close(from_torch(loss), expected_loss, *tol["loss"], "loss")
    assert_close(from_torch(wide[:rows, :48]), expected_grad, *grad_tol, "gradient in the view")
    assert torch.equal(wide[:, 48:], padding)
    assert_close(from_torch(source.grad[:rows, :48]), expected_grad, *grad_tol, "source.grad")
    assert not source.grad[:, 48:].any() and not source.grad[rows:].any()


def test_module_int32_target_and_empty_batch(rng):
    crit = nce.CrossEntropyLoss(torch.rand(300) + 0.5, label_smoothing=0.1).to(CUDA)
    assert crit.weight.device.type == "cuda"
    logits = random_logits(rng, 8, 300, "bfloat16")
    target = random_target(rng, 8, 300)
    x = to_torch(logits, CUDA).requires_grad_()
    loss = crit(x, to_torch(target, CUDA, torch.int32))
    loss.backward()
    expected = F.cross_entropy(to_torch(logits).double(), to_torch(target),
                               weight=crit.weight.cpu().double(), label_smoothing=0.1)
    assert_close(from_torch(loss), from_torch(expected), *TOLERANCES["bfloat16"]["loss"], "loss")
    assert x.grad.dtype == torch.bfloat16 and x.grad.isfinite().all()

    empty = torch.zeros(0, 300, device=CUDA, requires_grad=True)
    loss = crit(empty, torch.zeros(0, dtype=torch.int64, device=CUDA))
    loss.backward()
    assert loss.isnan() and empty.grad.shape == (0, 300)


def test_graph_lets_the_gradient_go_after_backward(rng):
    """After backward the graph (alive as long as the loss is) holds no reference to the
    gradient: once x.grad is dropped its memory is free, as with PyTorch's own loss."""
    x = to_torch(random_logits(rng, 64, 4096), CUDA).requires_grad_()
    loss = nce.cross_entropy(x, to_torch(random_target(rng, 64, 4096), CUDA))
    loss.backward()
    held = torch.cuda.memory_allocated()
    x.grad = None
    assert torch.cuda.memory_allocated() <= held - x.numel() * x.element_size()
    assert loss.grad_fn is not None


def test_gradient_offloaded_by_save_on_cpu(rng):
    """save_on_cpu moves the saved gradient to the host after the forward and back to the GPU
    for the backward, a new buffer: the backward scales that one (upstream 0.5)."""
    logits, target = random_logits(rng, 64, 4096), random_target(rng, 64, 4096)
    _, expected = torch_loss_and_grad(logits, target, grad_output=0.5)
    x = to_torch(logits, CUDA).requires_grad_()
    with torch.autograd.graph.save_on_cpu():
        loss = nce.cross_entropy(x, to_torch(target, CUDA))
    (loss * 0.5).backward()
    assert_close(from_torch(x.grad), expected, *TOLERANCES["float32"]["grad"], "grad")


@pytest.mark.parametrize("where,message", [
    ("target", "target must be on the same device as input (expected cuda:0, got cpu)"),
    ("input", "numba_ce runs on CUDA tensors (expected input on cuda, got cpu); move the tensors "
              "with .cuda(), or set NUMBA_ENABLE_CUDASIM=1 to run CPU tensors in the CUDA "
              "simulator"),
])
def test_mixed_devices(where, message):
    on = {"input": CUDA, "target": CUDA, where: "cpu"}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        nce.cross_entropy(torch.zeros(4, 10, device=on["input"]),
                          torch.zeros(4, dtype=torch.int64, device=on["target"]))


def _loss_and_grad(x, target, **options):
    """Loss and input gradient (an upstream gradient of 0.5) on the current stream."""
    x = x.detach().clone().requires_grad_()
    loss = nce.cross_entropy(x, target, **options)
    (loss * 0.5).backward()
    return loss.detach(), x.grad


def test_non_default_stream(rng):
    """On a side stream whose logits are still being written (a long sleep is queued before
    them), the kernels must wait for them: they run on torch's current stream, not stream 0."""
    base = to_torch(random_logits(rng, 256, 8192, "bfloat16"), CUDA)
    target = to_torch(random_target(rng, 256, 8192, ignored_share=0.1), CUDA)
    options = dict(reduction="sum", label_smoothing=0.1, z_loss=1e-4)
    expected_loss, expected_grad = _loss_and_grad(base, target, **options)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before the logits exist
        logits = base * 1  # written on the side stream, after the sleep
        loss, grad = _loss_and_grad(logits, target, **options)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(loss, expected_loss)
    assert torch.equal(grad, expected_grad)


def test_cuda_graph_capture_and_replay(rng):
    """Forward and backward captured in a CUDA graph (validate=False: no host synchronisation),
    replayed on new inputs copied into the static tensors: identical to eager calls."""
    n_rows, n_classes = 128, 8192
    options = dict(label_smoothing=0.1, z_loss=1e-4, validate=False)
    static_x = torch.zeros(n_rows, n_classes, dtype=torch.bfloat16, device=CUDA,
                           requires_grad=True)
    static_target = torch.zeros(n_rows, dtype=torch.int64, device=CUDA)

    def step():
        loss = nce.cross_entropy(static_x, static_target, **options)
        loss.backward()
        return loss

    warmup = torch.cuda.Stream()  # compiles and loads the kernels; captures need warm-up
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        for _ in range(3):
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(warmup)
    static_x.grad = None  # the gradient buffer is then allocated inside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    for _ in range(2):
        x = to_torch(random_logits(rng, n_rows, n_classes, "bfloat16"), CUDA)
        target = to_torch(random_target(rng, n_rows, n_classes, ignored_share=0.1), CUDA)
        with torch.no_grad():
            static_x.copy_(x)
            static_target.copy_(target)
        graph.replay()
        eager_x = x.clone().requires_grad_()
        eager_loss = nce.cross_entropy(eager_x, target, **options)
        eager_loss.backward()
        torch.cuda.synchronize()
        assert torch.equal(static_loss, eager_loss.detach())
        assert torch.equal(static_x.grad, eager_x.grad)


@INDUCTOR_WARNINGS
def test_reduce_overhead_captures_the_compiled_step(rng):
    """torch.compile(mode="reduce-overhead") captures the compiled forward and backward in CUDA
    graphs (the ops' fake implementations give the static shapes, validate=False keeps the host
    out) and replays them: loss and gradients as eager calls', on new inputs each step."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = TinyLM(4096, 64, nce.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4,
                                                  validate=False)).to(CUDA)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    for step in range(4):  # the first calls record; later ones replay
        tokens = torch.randint(0, 4096, (256,), device=CUDA)
        target = torch.randint(0, 4096, (256,), device=CUDA)
        results = []
        for module in (model, compiled):  # sharing the parameters
            model.zero_grad()
            loss = module(tokens, target)
            loss.backward()
            results.append((from_torch(loss), from_torch(model.head.weight.grad)))
        (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
        assert_close(compiled_loss, eager_loss, 1e-5, 1e-6, f"loss, step {step}")
        assert_close(compiled_grad, eager_grad, 1e-4, 1e-5 * np.abs(eager_grad).max(),
                     f"grad, step {step}")
    assert not counters["inductor"]["cudagraph_skips"], "Inductor did not capture the step"


def test_validate_is_refused_during_cuda_graph_capture(rng):
    """validate=True would read the target check back to the host, which breaks a capture: the
    call refuses before launching anything, saying what to pass instead."""
    x = to_torch(random_logits(rng, 8, 300), CUDA).requires_grad_()
    target = to_torch(random_target(rng, 8, 300), CUDA)
    nce.cross_entropy(x, target, validate=False)  # compiles and loads the kernels
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="pass validate=False"):
        with torch.cuda.graph(graph):
            doubled = x.detach() * 2  # (the capture is not empty)
            nce.cross_entropy(doubled, target, validate=True)


class TinyLM(torch.nn.Module):
    """Embedding -> linear LM head; the loss function is a constructor argument."""

    def __init__(self, vocab, dim, loss_fn):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.loss_fn = loss_fn

    def forward(self, tokens, target):
        return self.loss_fn(self.head(self.embed(tokens)), target)


@INDUCTOR_WARNINGS
def test_torch_compile_inductor(rng):
    """A module using the loss under torch.compile (Inductor), traced whole (fullgraph=True: the
    kernels are custom ops); loss and gradients match the eager module."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = TinyLM(512, 64, nce.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)).to(CUDA)
    tokens = torch.randint(0, 512, (256,), device=CUDA)
    target = torch.randint(0, 512, (256,), device=CUDA)
    results = []
    for module in (model, torch.compile(model, fullgraph=True)):  # sharing the parameters
        model.zero_grad()
        loss = module(tokens, target)
        loss.backward()
        results.append((from_torch(loss), from_torch(model.head.weight.grad)))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    assert_close(compiled_loss, eager_loss, 1e-5, 1e-6, "loss")
    assert_close(compiled_grad, eager_grad, 1e-4, 1e-5 * np.abs(eager_grad).max(), "grad")


def test_autocast(rng):
    check_autocast(rng, CUDA, 128, 64, 1000)


@pytest.mark.parametrize("inplace", [False, True])
def test_training_loop_matches_torch(inplace):
    """50 SGD steps of an embedding -> linear head in fp32, one model with our loss and one with
    torch's (plus the same z-loss written in torch): the losses agree to 1e-4 at every step.
    In-place backward is safe here: the linear layer does not save its output."""
    torch.manual_seed(0)
    vocab, dim, batch, z_loss = 512, 64, 256, 1e-4

    def torch_loss(logits, target):
        valid = target != -100
        z_part = z_loss * (torch.logsumexp(logits, dim=1)[valid] ** 2).mean()
        return F.cross_entropy(logits, target, label_smoothing=0.1) + z_part

    def our_loss(logits, target):
        return nce.cross_entropy(logits, target, label_smoothing=0.1, z_loss=z_loss,
                                 inplace_backward=inplace)

    ours = TinyLM(vocab, dim, our_loss).to(CUDA)
    theirs = copy.deepcopy(ours)
    theirs.loss_fn = torch_loss
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, theirs)]
    tokens = torch.randint(0, vocab, (batch,), device=CUDA)
    target = (tokens * 7 + 3) % vocab  # learnable
    target[::9] = -100
    losses = []
    for _ in range(50):
        step = []
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            loss = model(tokens, target)
            loss.backward()
            optimizer.step()
            step.append(loss.item())
        assert abs(step[0] - step[1]) <= 1e-4 * abs(step[1]), f"step {len(losses)}: {step}"
        losses.append(step[0])
    assert losses[-1] < 0.5 * losses[0], "the model did not learn"
