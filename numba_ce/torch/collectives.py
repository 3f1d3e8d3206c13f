"""What numba_ce.torch's vocabulary-parallel losses exchange over a torch.distributed group (NCCL
on GPUs, gloo on CPUs), and the merge that follows: every rank gathers every rank's partial
softmax state (5N + 3 float32, numba_ce.softmax_states) and merges them itself, so each holds the
same merged state, loss and statistics; one all-gather of O(N) floats a forward, nothing in the
backward. With ``vocab_start=None`` a call exchanges its slice's size first (two integers a rank)
and takes the slices in the group's rank order.
"""
import numpy as np
import torch
import torch.distributed as dist

from .. import softmax_states, vocab_parallel
from . import tensors

# torch 2.13 names the all-gather into one tensor all_gather_single (older: the deprecated
# all_gather_into_tensor); a flat output of R slots suits NCCL and gloo alike
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def slice_start(group, n_columns, n_rows, vocab_start, device):
    """This rank's first class: ``vocab_start`` as given (checked), or with None the sum of the
    sizes of the slices of the ranks before it in ``group``, gathered with each rank's row count
    (ValueError on every rank unless they agree: the same target everywhere)."""
    if vocab_start is not None:
        vocab_parallel.check_vocab_start(vocab_start, n_columns)
        return vocab_start
    world = dist.get_world_size(group)
    mine = torch.tensor([n_columns, n_rows], dtype=torch.int64, device=device)
    sizes = torch.empty(2 * world, dtype=torch.int64, device=device)
    _gather_into(sizes, mine, group=group)
    sizes = sizes.view(world, 2).tolist()
    rows = [n for _, n in sizes]
    if len(set(rows)) > 1:
        raise ValueError(f"every rank of the group must pass the same target, so the same rows "
                         f"(got {rows} rows by rank)")
    return sum(size for size, _ in sizes[:dist.get_rank(group)])


def gathered_states(state, group):
    """Every rank's state (a float32 tensor (5N + 3,)) stacked in rank order: (R, 5N + 3)."""
    world = dist.get_world_size(group)
    out = state.new_empty(world * state.numel())
    _gather_into(out, state, group=group)
    return out.view(world, -1)


def merged(arrays, state, target, group, options, smoothing_style, validate):
    """Gather every rank's ``state`` (an array ``arrays`` made) over ``group``, merge them (the
    slices must tile [0, V)), and compute the loss of all V classes for ``target`` (an array):
    numba_ce.vocab_parallel.merged_loss's MergedLoss. Runs on torch's current stream."""
    stacked = gathered_states(arrays.tensor(state), group)
    merged_state = arrays.empty(state.shape, np.float32)
    start, n_classes = softmax_states.merge(tensors.as_array(stacked), merged_state)
    if start != 0:
        raise ValueError(f"the ranks' slices must cover the classes from 0 on (got [{start}, "
                         f"{start + n_classes}))")
    return vocab_parallel.merged_loss(arrays, merged_state, target, options, smoothing_style,
                                      n_classes, validate)
