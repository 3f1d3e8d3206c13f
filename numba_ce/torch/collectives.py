"""What numba_ce.torch's vocabulary-parallel losses exchange over a torch.distributed group (NCCL
on GPUs, gloo on CPUs), and the merge that follows: every rank gathers every rank's partial
softmax state (5N + 3 float32, numba_ce.softmax_states) and merges them itself, so each holds the
same merged state, loss and statistics; one all-gather of O(N) floats a forward, nothing in the
backward. With ``vocab_start=None`` a call exchanges its slice's size first (two integers a rank)
and takes the slices in the group's rank order.
"""
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .. import softmax_states, vocab_parallel
from . import tensors

# torch 2.13 names the all-gather into one tensor all_gather_single (older: the deprecated
# all_gather_into_tensor); a flat output of R slots suits NCCL and gloo alike
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class SliceBounds(NamedTuple):
    """Where a rank's slice sits: its first class, and V where known on the host (None: read
    back from the merged state)."""
    start: int
    n_classes: int | None


def slice_bounds(group, n_columns, n_rows, vocab_start, n_classes, device):
    """This rank's :class:`SliceBounds`: ``vocab_start`` and ``n_classes`` as given (checked),
    or with ``vocab_start`` None the sum of the sizes of the slices of the ranks before it in
    ``group`` and V the sum of them all, gathered with each rank's row count (ValueError on
    every rank unless they agree: the same target everywhere)."""
    if n_classes is not None:
        vocab_parallel.check_n_classes(n_classes)
    if vocab_start is not None:
        vocab_parallel.check_vocab_start(vocab_start, n_columns)
        return SliceBounds(vocab_start, n_classes)
    world = dist.get_world_size(group)
    mine = torch.tensor([n_columns, n_rows], dtype=torch.int64, device=device)
    sizes = torch.empty(2 * world, dtype=torch.int64, device=device)
    _gather_into(sizes, mine, group=group)
    sizes = sizes.view(world, 2).tolist()
    rows = [n for _, n in sizes]
    if len(set(rows)) > 1:
        raise ValueError(f"every rank of the group must pass the same target, so the same rows "
                         f"(got {rows} rows by rank)")
    total = sum(size for size, _ in sizes)
    vocab_parallel.check_classes_agree(n_classes, total, "the ranks' slices")
    return SliceBounds(sum(size for size, _ in sizes[:dist.get_rank(group)]), total)


def gathered_states(state, group):
    """Every rank's state (a float32 tensor (5N + 3,)) stacked in rank order: (R, 5N + 3)."""
    world = dist.get_world_size(group)
    out = state.new_empty(world * state.numel())
    _gather_into(out, state, group=group)
    return out.view(world, -1)


def merged(arrays, state, target, group, options, smoothing_style, validate, n_classes=None):
    """Gather every rank's ``state`` (an array ``arrays`` made) over ``group``, merge them (the
    slices must tile [0, V)), and compute the loss of all V classes for ``target`` (an array):
    numba_ce.vocab_parallel.merged_loss's MergedLoss. Runs on torch's current stream. With V
    known (``n_classes``) and ``validate`` off, the slices' bounds are not read back: nothing
    waits for the device."""
    stacked = gathered_states(arrays.tensor(state), group)
    merged_state = arrays.empty(state.shape, np.float32)
    layout = (0, n_classes) if n_classes is not None and not validate else None
    start, size = softmax_states.merge(tensors.as_array(stacked), merged_state, layout)
    if start != 0:
        raise ValueError(f"the ranks' slices must cover the classes from 0 on (got [{start}, "
                         f"{start + size}))")
    vocab_parallel.check_classes_agree(n_classes, size, "the ranks' slices")
    return vocab_parallel.merged_loss(arrays, merged_state, target, options, smoothing_style,
                                      size, validate)
