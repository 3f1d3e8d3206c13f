"""numba_ce.torch's vocabulary-parallel losses over real torch.distributed process groups: gloo
worlds of 1 to 4 processes spawned by the test (CPU tensors, the simulator in each), every
option, uneven slices (V = 37), slices given by vocab_start, a subgroup of the world, the module
and the fused linear form. Each rank checks its loss (the same bits on every rank) and its
slice's gradients against torch's float64 autograd on the whole logits and against the
single-process numba_ce call on them. The GPU part: a world of one through NCCL.
"""
import datetime
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist
import torch.multiprocessing as mp

import numba_ce.torch as nce
from numba_ce.portable import SIMULATOR
from helpers import (DTYPES, TOLERANCES, assert_close, assert_rounded_close, random_logits,
                     random_target, random_upstream, random_weight, torch_linear_loss_and_grads,
                     torch_loss_and_grad)
from torch_helpers import from_torch, to_torch

N_ROWS, N_CLASSES, N_FEATURES = 6, 37, 8
CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", ignored=0.3, weighted=True, smoothing=0.1, upstream="given",
         target_dtype=torch.int32),
    dict(reduction="none", smoothing=0.1, z_loss=1e-3, softcap=5.0, upstream="given",
         inplace=True),
    dict(reduction="mean", ignored=0.3, weighted=True, smoothing=0.1, style="megatron",
         z_loss=1e-3, given_start=True),
    dict(reduction="none", softcap=5.0, inplace=True, batch_shape=(2, 3), upstream="given"),
    dict(reduction="mean", weighted=True, softcap=5.0, module=True),
]
LINEAR_CASES = [
    dict(reduction="mean", bias=True),
    dict(reduction="none", smoothing=0.1, z_loss=1e-3, weighted=True, upstream="given"),
]


def tensor(array, dtype=None):
    """A copy of a NumPy array on the rank's device (torch's default device there)."""
    return to_torch(array, torch.get_default_device(), dtype)


def bounds_of(world):
    """Uneven slices of the classes in rank order: np.array_split's (19 + 18, 13 + 12 + 12,
    10 + 9 + 9 + 9)."""
    sizes = [len(part) for part in np.array_split(np.arange(N_CLASSES), world)]
    return np.concatenate([[0], np.cumsum(sizes)]).tolist()


def check_case(rng, group, dtype, *, reduction="mean", ignored=0.0, weighted=False,
               smoothing=0.0, style="torch", z_loss=0.0, softcap=None, upstream="ones",
               inplace=False, target_dtype=torch.int64, given_start=False, batch_shape=None,
               module=False):
    """One forward and backward of this rank's slice, against torch float64 autograd and the
    single call on the whole logits; the loss's bits against every rank's."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    bounds = bounds_of(world)
    start, stop = bounds[rank], bounds[rank + 1]
    logits = random_logits(rng, N_ROWS, N_CLASSES, dtype)
    target = random_target(rng, N_ROWS, N_CLASSES, -100, ignored)
    weight = random_weight(rng, N_CLASSES, weighted)
    grad_output = random_upstream(rng, N_ROWS, reduction, upstream)
    options = dict(reduction=reduction, z_loss=z_loss, softcap=softcap)
    torch_smoothing = (smoothing * N_CLASSES / (N_CLASSES - 1) if style == "megatron"
                       else smoothing)  # Megatron-LM's: the other V - 1 classes share eps
    expected_loss, expected_grad = torch_loss_and_grad(
        logits, target, weight=weight, label_smoothing=torch_smoothing, grad_output=grad_output,
        **options)
    whole = tensor(logits).requires_grad_()
    single = nce.cross_entropy(whole, tensor(target), None if weight is None else tensor(weight),
                               label_smoothing=torch_smoothing, **options)

    shape = batch_shape or (N_ROWS,)
    leaf = tensor(logits[:, start:stop]).reshape(*shape, stop - start).requires_grad_()
    x = leaf.clone() if inplace else leaf
    local_target = tensor(target, target_dtype).reshape(shape)
    arguments = dict(group=group, vocab_start=start if given_start else None,
                     weight=None if weight is None else tensor(weight[start:stop]),
                     label_smoothing=smoothing, label_smoothing_style=style,
                     inplace_backward=inplace, **options)
    if module:
        crit = nce.VocabParallelCrossEntropyLoss(**arguments)
        loss = crit(x, local_target)
    else:
        loss = nce.vocab_parallel_cross_entropy(x, local_target, **arguments)
    upstream_tensor = (torch.ones_like(loss) if grad_output is None
                       else tensor(np.asarray(grad_output), torch.float32)
                       .reshape(loss.shape))
    loss.backward(upstream_tensor)
    single.backward(upstream_tensor.reshape(single.shape))

    assert loss.dtype == torch.float32 and loss.shape == (() if reduction != "none" else shape)
    loss_tol = TOLERANCES[dtype]["loss"]
    assert_close(from_torch(loss).reshape(-1), np.reshape(expected_loss, -1), *loss_tol,
                 "loss vs torch")
    assert_close(from_torch(loss).reshape(-1), from_torch(single).reshape(-1), *loss_tol,
                 "loss vs the single call")
    losses = [torch.empty_like(loss) for _ in range(world)]
    dist.all_gather(losses, loss.detach(), group=group)
    assert all(torch.equal(other, losses[0]) for other in losses), "ranks' losses differ"
    grad_rtol, grad_atol = TOLERANCES[dtype]["grad"]
    scale = np.abs(expected_grad).max()
    grad = from_torch(leaf.grad).reshape(N_ROWS, stop - start)
    assert_close(grad, expected_grad[:, start:stop], grad_rtol, grad_atol * scale,
                 "grad vs torch")
    assert_close(grad, from_torch(whole.grad)[:, start:stop], grad_rtol, grad_atol * scale,
                 "grad vs the single call")
    if inplace:
        assert torch.equal(x.detach(), leaf.grad), "the gradient is not in the input's memory"


def check_linear_case(rng, group, dtype, *, reduction="mean", bias=False, smoothing=0.0,
                      z_loss=0.0, weighted=False, upstream="ones"):
    """The fused linear form: the loss, the slice's rows of the head's gradients and the sum of
    the ranks' input-gradient shares against the unfused float64 computation."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    bounds = bounds_of(world)
    start, stop = bounds[rank], bounds[rank + 1]
    dt = DTYPES[dtype]
    x = rng.standard_normal((N_ROWS, N_FEATURES)).astype(dt)
    head = (rng.standard_normal((N_CLASSES, N_FEATURES)) / 2).astype(dt)
    head_bias = rng.standard_normal(N_CLASSES).astype(dt) if bias else None
    target = random_target(rng, N_ROWS, N_CLASSES, -100, 0.2)
    weight = random_weight(rng, N_CLASSES, weighted)
    grad_output = random_upstream(rng, N_ROWS, reduction, upstream)
    options = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)
    expected = torch_linear_loss_and_grads(x, head, target, linear_bias=head_bias, weight=weight,
                                           grad_output=grad_output, logits_format=dtype,
                                           **options)
    hidden = tensor(x).requires_grad_()
    local_weight = tensor(head[start:stop]).requires_grad_()
    local_bias = None if head_bias is None else tensor(head_bias[start:stop]).requires_grad_()
    loss = nce.vocab_parallel_linear_cross_entropy(
        hidden, local_weight, tensor(target), group=group, linear_bias=local_bias,
        weight=None if weight is None else tensor(weight[start:stop]), chunk_size=4,
        **options)
    loss.backward(torch.ones_like(loss) if grad_output is None
                  else tensor(np.asarray(grad_output), torch.float32).reshape(loss.shape))
    assert_close(from_torch(loss), expected.loss, 1e-5, 1e-6, "linear loss")
    assert_rounded_close(from_torch(local_weight.grad), expected.grad_linear_weight[start:stop],
                         tuple(m[start:stop] for m in expected.magnitudes[1]), dtype,
                         "local_weight.grad")
    if bias:
        assert_rounded_close(from_torch(local_bias.grad), expected.grad_linear_bias[start:stop],
                             tuple(m[start:stop] for m in expected.magnitudes[2]), dtype,
                             "linear_bias.grad")
    total = hidden.grad.double()
    dist.all_reduce(total, group=group)  # what a tensor-parallel head's input backward does
    assert_rounded_close(from_torch(total), expected.grad_input, expected.magnitudes[0], dtype,
                         "sum of hidden.grad shares", roundings=world)


def check_errors(rng, group):
    """Bad input raises the same error on every rank (they all hold the merged state)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    bounds = bounds_of(world)
    start, stop = bounds[rank], bounds[rank + 1]
    logits = tensor(random_logits(rng, N_ROWS, N_CLASSES)[:, start:stop])
    target = tensor(random_target(rng, N_ROWS, N_CLASSES))
    bad = target.clone()
    bad[2] = N_CLASSES
    with pytest.raises(ValueError, match=re.escape(
            f"target[2] = {N_CLASSES} is outside [0, {N_CLASSES}) and is not ignore_index "
            "(-100)")):
        nce.vocab_parallel_cross_entropy(logits, bad, group=group)
    if world > 1:  # every rank claims the classes from 0: the slices overlap
        got = ", ".join(f"[0, {b - a})" for a, b in zip(bounds[:-1], bounds[1:]))
        with pytest.raises(ValueError, match=re.escape(
                "the slices of the states must tile a range of classes without gaps or "
                f"overlaps (got {got})")):
            nce.vocab_parallel_cross_entropy(logits, target, group=group, vocab_start=0)
    with pytest.raises(ValueError, match=re.escape(
            "target must have shape (6,) to match local_logits (6, 4), whose classes are its "
            "last dimension (got shape (5,))")):
        nce.vocab_parallel_cross_entropy(logits[:, :4], target[:5], group=group)


def check_known_vocabulary(rng, group):
    """V known on the host (n_classes, or the module's one exchange) with validate=False: the
    merge takes the slices' bounds from it instead of reading them back, and the loss and
    gradient are the same bits as the call that reads them; a wrong V is refused on every
    rank, from the exchange or (validate=True) from the merged state."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    bounds = bounds_of(world)
    start, stop = bounds[rank], bounds[rank + 1]
    logits = random_logits(rng, N_ROWS, N_CLASSES)[:, start:stop]
    target = tensor(random_target(rng, N_ROWS, N_CLASSES, -100, 0.3))
    options = dict(group=group, label_smoothing=0.1, z_loss=1e-3)
    crit = nce.VocabParallelCrossEntropyLoss(validate=False, **options)
    results = []
    for call in (lambda x: nce.vocab_parallel_cross_entropy(x, target, **options),
                 lambda x: nce.vocab_parallel_cross_entropy(
                     x, target, vocab_start=start, n_classes=N_CLASSES, validate=False,
                     **options),
                 lambda x: crit(x, target)):
        for _ in range(2):  # the module's second call takes its kept bounds
            x = tensor(logits).requires_grad_()
            loss = call(x)
            loss.backward()
            results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    message = re.escape(f"n_classes must be the V of the ranks' slices, {N_CLASSES} (got 38)")
    with pytest.raises(ValueError, match=message):
        nce.vocab_parallel_cross_entropy(tensor(logits), target, n_classes=38, **options)
    with pytest.raises(ValueError, match=message):
        nce.vocab_parallel_cross_entropy(tensor(logits), target, vocab_start=start,
                                         n_classes=38, **options)
    with pytest.raises(ValueError, match=re.escape("n_classes must be >= 1 (got 0)")):
        nce.VocabParallelCrossEntropyLoss(group, n_classes=0)
    head = tensor(rng.standard_normal((stop - start, N_FEATURES)).astype(np.float32))
    hidden = tensor(rng.standard_normal((N_ROWS, N_FEATURES)).astype(np.float32))
    read = nce.vocab_parallel_linear_cross_entropy(hidden, head, target, **options)
    known = nce.vocab_parallel_linear_cross_entropy(hidden, head, target, vocab_start=start,
                                                    n_classes=N_CLASSES, validate=False,
                                                    **options)
    assert torch.equal(read, known)


def _world(rank, world, store, seed, backend):
    """A spawned rank: every check on the whole world, then on a subgroup of it."""
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    device = "cuda" if backend == "nccl" else "cpu"
    try:
        with torch.device(device):
            group = dist.group.WORLD
            for i, case in enumerate(CASES):
                dtype = list(DTYPES)[(i + world) % len(DTYPES)]
                check_case(np.random.default_rng([seed, i]), group, dtype, **case)
            for i, case in enumerate(LINEAR_CASES):
                dtype = list(DTYPES)[(i + world) % len(DTYPES)]
                check_linear_case(np.random.default_rng([seed, 100 + i]), group, dtype, **case)
            check_errors(np.random.default_rng([seed, 200]), group)
            check_known_vocabulary(np.random.default_rng([seed, 201]), group)
            if world >= 3:  # a tensor-parallel group of ranks 0 and 2 (or 1 and 3)
                members = [0, 2] if world == 3 else [1, 3]
                subgroup = dist.new_group(members)
                if rank in members:
                    check_case(np.random.default_rng([seed, 300]), subgroup, "bfloat16",
                               **CASES[3])
                    check_linear_case(np.random.default_rng([seed, 301]), subgroup, "float32",
                                      **LINEAR_CASES[1])
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_world(world, tmp_path, rng, backend="gloo"):
    store = tmp_path / "store"
    mp.spawn(_world, args=(world, os.fspath(store), int(rng.integers(2**31)), backend),
             nprocs=world)


@pytest.mark.skipif(not SIMULATOR, reason="gloo worlds of CPU tensors: the simulator's")
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_gloo_world(world, tmp_path, rng):
    spawn_world(world, tmp_path, rng)


@pytest.mark.skipif(not SIMULATOR, reason="gloo ranks of CPU tensors: the simulator's")
def test_the_readme_example_runs_under_torchrun(tmp_path):
    """The README's vocab-parallel block, saved as a file and run by torchrun on two ranks."""
    root = pathlib.Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "vocab_parallel_cross_entropy" in b]
    script = tmp_path / "head.py"
    script.write_text(block)
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR or not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_world_of_one(tmp_path, rng):
    spawn_world(1, tmp_path, rng, backend="nccl")
