"""Partial softmax states of vocabulary slices as flat float32 arrays, their merge, and each
row's loss and statistics from a merged state: array code (NumPy or CuPy) between the passes of
a vocabulary-parallel cross-entropy (numba_ce.vocab_parallel), so that any engine can move the
states (an all-gather of torch.distributed, mpi4py, NCCL through CuPy).

A state of N rows is one float32 array of 5N + 3 values (a stack of R of them: (R, 5N + 3)),
its fields in the notation of numba_ce.slice_states, which computes them:

    [0, N)      m     the rows' maxima over the slice
    [N, 2N)     s     sum_j exp(x_j - m)
    [2N, 3N)    x_y   the target's logit where the slice holds it, else 0 (softcap: t)
    [3N, 4N)    w_y   the target's class weight there, else 0
    [4N, 5N)    wx    sum_j w_j x_j (label smoothing), else 0
    5N          S_w   the sum of the slice's class weights (its class count without weights)
    5N + 1      o     the slice's first class   } whole numbers, exact in float32 below
    5N + 2      V_s   its number of classes     } MAX_CLASSES

The merge of states of adjacent slices is the state of their union (the online-softmax combine):

    M = max_r m_r                    S = sum_r s_r exp(m_r - M)
    x_y = sum_r x_y,r   w_y = sum_r w_y,r     (one slice holds y: the others add exact zeros)
    wx = sum_r wx_r     S_w = sum_r S_w,r     o = min_r o_r     V_s = sum_r V_s,r

Mathematically exact and associative. In floating point M, x_y, w_y, o and V_s are exact in any
order and grouping; S, wx and S_w are sums of float64 terms (m_r - M is exact in float64, its
exp rounded once), sorted before they are added and rounded once to float32, so any order of the
same states gives the same bits, and merging in groups (rounding each group's state to float32)
agrees to a few float32 ulps.

From the merged state of the whole vocabulary, each row's (the row kernel's merged_state and
step 4, numba_ce.kernels):

    lse  = M + log(S)                 NaN where M = +inf or S is NaN; -inf where S = 0 (every
                                      logit -inf, M then taken as -inf)
    ce   = (1 - eps) w_y ((M - x_y) + log(S)) + (eps / V) (S_w lse - wx)
    zl   = z lse**2,   loss = ce + zl (0 for ignored rows, NaN for a target outside [0, V))

in float64, rounded to float32 once; "mean" divides the CE part by sum(w_y) and the z part by
the count of counted rows, as numba_ce.kernels.reduce_rows.
"""
from typing import Any, NamedTuple

import numpy as np

from . import devices, execution, kernels

FIELDS = 5  # per-row fields
TAIL = 3  # S_w, o, V_s
MAX_CLASSES = 2**24  # o and V_s are exact float32 whole numbers up to here


class States(NamedTuple):
    """Views of a state (or a stack of states: each field with a leading axis of slices)."""
    row_max: Any        # (..., N)
    row_sum: Any        # (..., N)
    target_logit: Any   # (..., N)
    target_weight: Any  # (..., N)
    weighted_sum: Any   # (..., N)
    weight_total: Any   # (..., 1)
    start: Any          # (..., 1)
    size: Any           # (..., 1)


ROW_FIELDS = States._fields[:FIELDS]


class RowStatistics(NamedTuple):
    """What the gradient pass needs of a merged state, as the row kernel's call has it."""
    row_lse: Any     # (N,) float32: lse, 0 for ignored rows, NaN for targets outside [0, V)
    row_weight: Any  # (N,) float32: w_y (0 where no slice holds the target)
    stats: Any       # (3,) float32: kernels.target_stats' [sum of w_y, count, S_w]


def packed_size(n_rows):
    """The float32 values of a state of ``n_rows`` rows."""
    return FIELDS * n_rows + TAIL


def rows_of(packed):
    """N of a state (or a stack of states), from its last dimension; ValueError if no N fits."""
    length = packed.shape[-1] if packed.ndim else 0
    if packed.ndim not in (1, 2) or length < TAIL or (length - TAIL) % FIELDS:
        raise ValueError(f"softmax states must be float32 arrays (5N + 3,) or a stack of them "
                         f"(R, 5N + 3) (got shape {tuple(packed.shape)})")
    return (length - TAIL) // FIELDS


def unpack(packed):
    """The :class:`States` views of ``packed`` (one state, or a stack of them)."""
    n_rows = rows_of(packed)
    rows = [packed[..., i * n_rows:(i + 1) * n_rows] for i in range(FIELDS)]
    tail = [packed[..., FIELDS * n_rows + i:FIELDS * n_rows + i + 1] for i in range(TAIL)]
    return States(*rows, *tail)


def array_module(array):
    """NumPy or CuPy, whichever ``array`` belongs to."""
    return np if isinstance(array, np.ndarray) else devices.cupy


def to_host(array):
    """A NumPy copy of a NumPy or CuPy array (for CuPy, a read that waits for the device)."""
    return np.array(array) if isinstance(array, np.ndarray) else devices.cupy.asnumpy(array)


def slice_layout(stacked):
    """(first class, number of classes) of the union of the slices whose states are stacked in
    ``stacked`` (R, 5N + 3), read to the host (2R values); ValueError unless the slices, in any
    order, tile that range without gaps or overlaps."""
    states = unpack(stacked)
    starts = to_host(states.start).reshape(-1)
    sizes = to_host(states.size).reshape(-1)
    order = np.argsort(starts, kind="stable")
    starts, sizes = starts[order], sizes[order]
    ends = starts + sizes
    if (sizes < 1).any() or (starts[1:] != ends[:-1]).any():
        got = ", ".join(f"[{a:.0f}, {b:.0f})" for a, b in zip(starts, ends))
        raise ValueError(f"the slices of the states must tile a range of classes without gaps "
                         f"or overlaps (got {got})")
    return int(starts[0]), int(ends[-1] - starts[0])


def merge(stacked, out, layout=None):
    """The state of the union of the slices stacked in ``stacked`` (R, 5N + 3) into ``out``
    (5N + 3,) (module docstring); returns the union's (first class, number of classes):
    ``layout`` where the caller knows them (nothing read back), else :func:`slice_layout`'s."""
    start, size = slice_layout(stacked) if layout is None else layout
    xp = array_module(stacked)
    states, merged = unpack(stacked), unpack(out)
    with np.errstate(invalid="ignore", over="ignore"):  # +-inf and NaN, as the kernels make them
        top = states.row_max.max(axis=0)
        shift = states.row_max.astype(np.float64) - top.astype(np.float64)
        merged.row_max[...] = top
        merged.row_sum[...] = _sorted_sum(xp, states.row_sum * xp.exp(shift))
        merged.target_logit[...] = states.target_logit.sum(axis=0)
        merged.target_weight[...] = states.target_weight.sum(axis=0)
        merged.weighted_sum[...] = _sorted_sum(xp, states.weighted_sum.astype(np.float64))
        merged.weight_total[...] = _sorted_sum(xp, states.weight_total.astype(np.float64))
    merged.start[...] = start
    merged.size[...] = size
    return start, size


def _sorted_sum(xp, terms):
    """The float64 sum over the first axis of ``terms``, added in increasing order: the same
    bits for any order of the slices."""
    return xp.sort(terms, axis=0).sum(axis=0)


def counted_rows(target, ignore_index, n_classes):
    """(N,) bool: the rows that count, a target neither ignore_index nor outside [0, V)."""
    return (target != ignore_index) & (target >= 0) & (target < n_classes)


def first_bad_row(target, ignore_index, n_classes):
    """The first row whose target is neither ignore_index nor in [0, V), else None (a read that
    waits for the device)."""
    bad = to_host((target != ignore_index) & ~counted_rows(target, ignore_index, n_classes))
    return int(np.argmax(bad)) if bad.any() else None


def row_losses(merged, target, options, n_classes, outputs):
    """Each row's loss, z part and lse from ``merged`` (the state of all ``n_classes`` classes)
    into ``outputs`` (a buffers.RowOutputs, float32), and the reduced ones for "sum" and "mean"
    (module docstring); ``options`` an Options whose label_smoothing is the one the loss uses.
    Returns the :class:`RowStatistics` of the gradient pass."""
    xp = array_module(merged)
    state = unpack(merged)
    counted = counted_rows(target, options.ignore_index, n_classes)
    ignored = target == options.ignore_index
    eps = options.label_smoothing
    label_weight = xp.where(counted, state.target_weight.astype(np.float64), 0.0)
    # +-inf and NaN as the kernels make them, without a word
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        top = state.row_max.astype(np.float64)
        total = state.row_sum.astype(np.float64)
        poisoned = (top == np.inf) | xp.isnan(total)  # a +inf or NaN logit
        empty = total == 0  # every logit -inf: m = -inf, log(s) = 0
        log_s = xp.where(poisoned, np.nan, xp.log(xp.where(empty, 1.0, total)))
        top = xp.where(poisoned, np.nan, xp.where(empty, -np.inf, top))
        lse = top + log_s
        label = state.target_logit.astype(np.float64) * (options.softcap or 1.0)  # c t
        ce = (1.0 - eps) * label_weight * ((top - label) + log_s)
        if eps:  # (eps / V) * S_w first: V * lse alone can overflow float32
            eps_over_v = eps / n_classes
            ce += (eps_over_v * state.weight_total.astype(np.float64)) * lse - eps_over_v * (
                state.weighted_sum.astype(np.float64))
        z_part = options.z_loss * lse * lse
        loss = ce if options.reduction == "mean" else ce + z_part  # as the row kernel's
        for name, value in (("row_loss", loss), ("row_z", z_part), ("row_lse", lse)):
            getattr(outputs, name)[...] = xp.where(counted, value,
                                                   xp.where(ignored, 0.0, np.nan))
        if options.reduced:
            _reduce(outputs, label_weight.sum(), counted.sum(), options)
    stats = xp.empty(3, np.float32)
    stats[kernels.STAT_WEIGHT_SUM] = label_weight.sum()
    stats[kernels.STAT_COUNT] = counted.sum()
    stats[kernels.STAT_ALL_WEIGHTS] = state.weight_total[0]
    return RowStatistics(outputs.row_lse, state.target_weight, stats)


def _reduce(outputs, weight_sum, count, options):
    """The reduced loss and z part, as kernels.reduce_rows: "mean" is sum(ce) / sum(w_y) +
    sum(zl) / count (row_loss holds ce alone), "sum" the sums; a batch of no rows as
    execution.fill_no_rows."""
    if not outputs.row_loss.shape[0]:
        execution.fill_no_rows(options, outputs)
        return
    loss_sum = outputs.row_loss.astype(np.float64).sum()
    z_sum = outputs.row_z.astype(np.float64).sum()
    if options.reduction == "mean":
        outputs.loss[...] = loss_sum / weight_sum + z_sum / count
        outputs.z_loss[...] = z_sum / count
    else:
        outputs.loss[...] = loss_sum
        outputs.z_loss[...] = z_sum
