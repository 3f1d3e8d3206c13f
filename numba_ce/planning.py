"""Launch planning: from what a call computes to what to launch.

A plan is a :class:`Launch`: the kernel, its grid, block and dynamic shared memory, and its
arguments as a named tuple whose fields are the kernel's parameters in order (a test checks each
against the kernel's signature). Planning is pure: it reads the arrays' shapes, strides and
addresses, the options and a :class:`numba_ce.device_properties.DeviceProperties`, and launches
nothing; :mod:`numba_ce.execution` runs the plans, ``python -m numba_ce inspect`` prints them.

Block sizes. Row kernels give a row to a block: a warp, doubled while each thread would have more
than WORDS_PER_THREAD words, up to MAX_ROW_THREADS. Gradient kernels of 8-byte words keep the
first words of each row in shared memory (kernels.row_kernel): their blocks stay resident (as
many as fit at once) and stride over the rows, and a multiprocessor holds the first count of
CACHED_BLOCKS_PER_SM whose blocks' uncached words, which pass 2 reads again, fit in L2 together
(else the last): each block gets its share of the multiprocessor's shared memory, no more than
its row needs. Class-probability targets are read again by pass 2 too, none of them from shared
memory: a row of them counts whole among the uncached bytes.
"""
from typing import Any, NamedTuple

import numpy as np

from . import kernels, rounding, scale_kernel, slice_gradient, slice_states
from .limits import MAX_THREADS
from .words import UNROLL
from .devices import data_pointer
from .floatbits import FORMATS
from .portable import WARP_SIZE

WORD_BYTES = 8  # packed loads and stores: 4 x 16-bit or 2 x 32-bit elements a word
WORDS_PER_THREAD = 2 * UNROLL  # a row block grows until each thread has about this many
MAX_ROW_THREADS = 256  # row blocks without a shared-memory cache (bench/NOTES.md)
CACHED_BLOCKS_PER_SM = (2, 1)  # in order of preference (bench/NOTES.md, v9 and v12)
SYSTEM_SHARED_BYTES = 1024  # what the system keeps of a multiprocessor's shared memory a block
STATIC_SHARED_BYTES = 256  # the kernels' static shared arrays (kernels.WARP_SLOTS float32)
ROUND_THREADS, ROUND_MAX_BLOCKS = 256, 4096  # the rounding kernel's grid-stride launch
REDUCTION_CODES = {"none": kernels.NONE, "sum": kernels.SUM, "mean": kernels.MEAN}


class Launch(NamedTuple):
    kernel: Any       # a Numba kernel
    grid: int
    block: int
    arguments: tuple  # one of the *Arguments tuples below
    shared: int = 0   # bytes of dynamic shared memory a block


class StatsArguments(NamedTuple):
    """kernels.target_stats's parameters."""
    target: Any
    weight: Any
    has_weight: np.int32
    ignore_index: np.int64
    n_classes: np.int64
    stats: Any
    bad_row: Any


class ProbabilityStatsArguments(NamedTuple):
    """kernels.probability_stats's parameters."""
    n_rows: np.int64
    stats: Any
    bad_row: Any


# The last parameters of the row and slice gradient kernels: the options and the call's shape as
# scalars (_row_scalars makes them)
OPTION_SCALARS = [("n_classes", np.int64), ("ignore_index", np.int64),
                  ("one_minus_eps", np.float32), ("eps_over_v", np.float32),
                  ("z_loss", np.float32), ("softcap", np.float32), ("has_weight", np.int32),
                  ("reduction", np.int32), ("go_per_row", np.int32)]

RowArguments = NamedTuple("RowArguments", [
    (name, Any) for name in ("logits", "target", "weight", "grad", "row_loss", "row_z", "row_lse",
                             "row_correct", "predicted", "stats", "grad_output")] + OPTION_SCALARS)
RowArguments.__doc__ = "kernels.row_kernel's kernel's parameters."

SliceArguments = NamedTuple("SliceArguments", [
    (name, Any) for name in ("logits", "grad", "target", "weight", "slice_weight", "row_lse",
                             "stats", "grad_output")]
    + [("column_offset", np.int64), ("weight_by_row", np.int32)] + OPTION_SCALARS)
SliceArguments.__doc__ = "slice_gradient.slice_gradient_kernel's kernel's parameters."

StatesArguments = NamedTuple("StatesArguments", [
    (name, Any) for name in ("logits", "target", "weight", "row_max", "row_sum", "target_logit",
                             "target_weight", "weighted_sum")]
    + [("column_offset", np.int64), ("ignore_index", np.int64), ("softcap", np.float32),
       ("has_weight", np.int32)])
StatesArguments.__doc__ = "slice_states.slice_states_kernel's kernel's parameters."


class ReduceArguments(NamedTuple):
    """kernels.reduce_rows's parameters."""
    row_loss: Any
    row_z: Any
    stats: Any
    reduction: np.int32
    loss_out: Any
    z_out: Any


class ScaleArguments(NamedTuple):
    """scale_kernel.scale_kernel's kernel's parameters."""
    grad: Any
    grad_output: Any
    per_row: np.int32


class RoundArguments(NamedTuple):
    """rounding.round_kernel's kernel's parameters."""
    source: Any
    scale: Any
    out: Any


class RowKernelSpec(NamedTuple):
    """What is compiled into a row kernel (kernels.row_kernel's arguments)."""
    fmt: str
    pack: int
    with_grad: bool
    capped: bool
    smoothing: int
    argmax: bool
    targets: int = kernels.CLASS_INDICES


class RowInputs(NamedTuple):
    """The arrays a row kernel reads: logits (N, V) of format ``fmt``; target (N,) class indices
    or (N, V) class probabilities of the logits' format (:attr:`probabilities`); float32 class
    weights (V,) or None; float32 grad_output (1,) or (N,)."""
    logits: Any
    fmt: str
    target: Any
    weight: Any
    grad_output: Any

    @property
    def probabilities(self):
        """Whether the targets are rows of class probabilities (N, V), not class indices."""
        return self.target.ndim == 2


def row_kernel_spec(options, fmt, pack, with_grad, weighted, probabilities=False):
    """The compile-time part of a row kernel for these options, with class weights or not
    (``weighted``), for class indices or class probabilities."""
    smoothing = (kernels.NO_SMOOTHING if options.label_smoothing == 0 else
                 kernels.WEIGHTED_SMOOTHING if weighted else kernels.SMOOTHING)
    targets = (kernels.CLASS_INDICES if not probabilities else
               kernels.WEIGHTED_PROBABILITIES if weighted else kernels.PROBABILITIES)
    return RowKernelSpec(fmt, pack, with_grad, options.softcap is not None, smoothing,
                         options.argmax, targets)


def word_layout(array, fmt):
    """(elements per word, word dtype) for reading ``array`` (N, V): 8-byte words when every row
    starts 8-byte aligned and V fills whole words, else one element a word."""
    bits = FORMATS[fmt][0]
    pack = WORD_BYTES // (bits // 8)
    n_classes = array.shape[1]
    # The row stride counts even for one row: torch's dtype views (the adapter's TensorArray)
    # refuse any stride the word size does not divide.
    aligned = data_pointer(array) % WORD_BYTES == 0 and array.strides[0] % WORD_BYTES == 0
    if aligned and n_classes % pack == 0:
        return pack, np.int64
    return 1, _element_word(fmt)


def _element_word(fmt):
    return np.int16 if FORMATS[fmt][0] == 16 else np.int32


def block_threads(device):
    """Threads of a one-block kernel (target_stats, reduce_rows)."""
    return device.threads or MAX_THREADS


def row_blocks(n_rows, device):
    """Blocks of a row kernel without a cache: one a row (a few, striding, in the simulator)."""
    return min(n_rows, device.max_grid)


def threads_per_row(n_words, device, limit=MAX_ROW_THREADS):
    """Threads of a row block: a warp, doubled while each thread has over WORDS_PER_THREAD
    words, up to ``limit``."""
    if device.threads:
        return device.threads
    threads = WARP_SIZE
    while threads < limit and threads * WORDS_PER_THREAD < n_words:
        threads *= 2
    return threads


def max_shared_bytes(device, blocks_per_sm):
    """The dynamic shared memory a block may ask for so that ``blocks_per_sm`` of them fit on a
    multiprocessor."""
    per_block = device.shared_per_sm // blocks_per_sm - SYSTEM_SHARED_BYTES
    return min(device.shared_per_block, per_block) - STATIC_SHARED_BYTES


def cache_bytes(n_words, word_bytes, blocks_per_sm, device):
    """Dynamic shared memory of a cached row block: its share of the multiprocessor's, whole
    words, no more than the row needs."""
    budget = max_shared_bytes(device, blocks_per_sm)
    return min(budget - budget % word_bytes, n_words * word_bytes)


def cache_plan(n_words, word_bytes, device, reread_bytes=0):
    """(blocks a multiprocessor, cache bytes a block) for the cached gradient kernel on rows of
    ``n_words`` words, whose pass 2 also reads ``reread_bytes`` a row again from global memory
    (a row of class-probability targets; see the module docstring)."""
    for blocks in CACHED_BLOCKS_PER_SM:
        shared = cache_bytes(n_words, word_bytes, blocks, device)
        uncached = blocks * device.multiprocessors * (n_words * word_bytes - shared
                                                      + reread_bytes)
        if uncached <= device.l2_bytes:
            break
    return blocks, shared


def resident_row_blocks(n_rows, blocks_per_sm, device):
    """Blocks of a cached row kernel: as many as are resident at once, striding over the rows."""
    return min(n_rows, device.max_grid, device.multiprocessors * blocks_per_sm)


def plan_target_stats(target, weight, options, n_classes, stats, bad_row, device):
    """kernels.target_stats: the batch's reduction denominators into ``stats`` (3,) float32 and
    its first bad row into ``bad_row`` (1,) int64; for class-probability targets (N, V),
    kernels.probability_stats (N and N; no row is bad)."""
    has_weight = weight is not None
    if target.ndim == 2:
        arguments = ProbabilityStatsArguments(np.int64(target.shape[0]), stats, bad_row)
        return Launch(kernels.probability_stats, 1, 1, arguments)
    arguments = StatsArguments(target, weight if has_weight else stats, np.int32(has_weight),
                               np.int64(options.ignore_index), np.int64(n_classes), stats,
                               bad_row)
    return Launch(kernels.target_stats, 1, block_threads(device), arguments)


def plan_rows(inputs, options, stats, grad, outputs, device):
    """The row kernel over ``inputs.logits`` with the batch's ``stats``: row losses, z parts,
    lse (``outputs``, a buffers.RowOutputs) and, unless ``grad`` is None, the gradient. Class
    probabilities are read in words as the logits are."""
    logits, fmt = inputs.logits, inputs.fmt
    n_rows, n_classes = logits.shape
    probabilities = inputs.probabilities
    pack, word_dtype = word_layout(logits, fmt)
    others = [a for a in (grad, inputs.target if probabilities else None) if a is not None]
    if any(word_layout(a, fmt)[0] != pack for a in others):
        pack, word_dtype = 1, _element_word(fmt)  # e.g. a misaligned view, an aligned gradient
    words = logits.view(word_dtype)
    target = inputs.target.view(word_dtype) if probabilities else inputs.target
    spec = row_kernel_spec(options, fmt, pack, grad is not None, inputs.weight is not None,
                           probabilities)
    n_words = words.shape[1]
    if grad is not None and pack > 1:  # the cached kernel
        reread = n_words * words.itemsize if probabilities else 0  # a row of targets
        per_sm, shared = cache_plan(n_words, words.itemsize, device, reread)
        blocks = resident_row_blocks(n_rows, per_sm, device)
        threads = threads_per_row(n_words, device, MAX_THREADS // per_sm)
    else:
        blocks, shared, threads = row_blocks(n_rows, device), 0, threads_per_row(n_words, device)
    unused_int = outputs.row_loss if probabilities else inputs.target  # (no int array there)
    arguments = RowArguments(
        words, target, stats if inputs.weight is None else inputs.weight,
        words[:1, :1] if grad is None else grad.view(word_dtype),
        outputs.row_loss, outputs.row_z, outputs.row_lse,
        outputs.row_loss if outputs.row_correct is None else outputs.row_correct,
        unused_int if outputs.predicted is None else outputs.predicted, stats,
        inputs.grad_output, *_row_scalars(inputs, options, n_classes))
    return Launch(kernels.row_kernel(*spec), blocks, threads, arguments, shared)


def _row_scalars(inputs, options, n_classes):
    """The OPTION_SCALARS of a call on ``n_classes`` (V, all of them)."""
    eps = options.label_smoothing
    return (np.int64(n_classes), np.int64(options.ignore_index), np.float32(1.0 - eps),
            np.float32(eps / n_classes), np.float32(options.z_loss),
            np.float32(options.softcap or 0.0), np.int32(inputs.weight is not None),
            np.int32(REDUCTION_CODES[options.reduction]),
            np.int32(inputs.grad_output.shape[0] > 1))


def plan_slice_gradient(inputs, column_offset, n_classes, options, stats, row_lse, device,
                        grad=None, row_weight=None):
    """slice_gradient's kernel: the gradient of ``inputs.logits`` (N, V_s), the classes
    [column_offset, column_offset + V_s) of ``n_classes``, from each row's lse over all of them
    (``row_lse``, (N,) float32) and the batch's ``stats``, into ``grad`` (None: in place).
    ``inputs.weight`` are the class weights of all ``n_classes`` (or None); with ``row_weight``
    ((N,) float32: each row's w_y) they are the slice's own (V_s,) instead, as a
    vocabulary-parallel rank holds them, or None where other slices have weights and this one
    has none (its classes weigh 1). A block a row (a few, striding, in the simulator), no
    shared memory."""
    logits, fmt = inputs.logits, inputs.fmt
    n_rows, n_columns = logits.shape
    pack, word_dtype = word_layout(logits, fmt)
    if grad is not None and word_layout(grad, fmt)[0] != pack:
        pack, word_dtype = 1, _element_word(fmt)
    words = logits.view(word_dtype)
    weighted = inputs.weight is not None
    spec = row_kernel_spec(options, fmt, pack, True, weighted)
    by_row = row_weight is not None  # w_y of the merged states, whatever this slice holds
    if by_row:
        weight, slice_weight = row_weight, inputs.weight if weighted else stats
    elif not weighted:
        weight = slice_weight = stats
    else:
        weight = inputs.weight
        slice_weight = weight[column_offset:column_offset + n_columns]
    arguments = SliceArguments(
        words, words if grad is None else grad.view(word_dtype), inputs.target, weight,
        slice_weight, row_lse, stats, inputs.grad_output, np.int64(column_offset),
        np.int32(by_row), *_row_scalars(inputs, options, n_classes))
    if by_row:  # w_y read from row_weight, also on a slice without weights (another has them)
        arguments = arguments._replace(has_weight=np.int32(1))
    kernel = slice_gradient.slice_gradient_kernel(fmt, pack, spec.capped, spec.smoothing)
    return Launch(kernel, row_blocks(n_rows, device), threads_per_row(words.shape[1], device),
                  arguments)


def plan_slice_states(inputs, column_offset, options, states, device):
    """slice_states' kernel: each row's partial softmax state over ``inputs.logits`` (N, V_s),
    the classes [column_offset, column_offset + V_s), into ``states`` (a softmax_states.States
    of (N,) float32 arrays); ``inputs.weight`` the slice's class weights (V_s,) or None. A block
    a row, as the slice gradient's."""
    logits, fmt = inputs.logits, inputs.fmt
    pack, word_dtype = word_layout(logits, fmt)
    words = logits.view(word_dtype)
    spec = row_kernel_spec(options, fmt, pack, False, inputs.weight is not None)
    arguments = StatesArguments(
        words, inputs.target, states.row_max if inputs.weight is None else inputs.weight,
        states.row_max, states.row_sum, states.target_logit, states.target_weight,
        states.weighted_sum, np.int64(column_offset), np.int64(options.ignore_index),
        np.float32(options.softcap or 0.0), np.int32(inputs.weight is not None))
    kernel = slice_states.slice_states_kernel(fmt, pack, spec.capped, spec.smoothing)
    return Launch(kernel, row_blocks(logits.shape[0], device),
                  threads_per_row(words.shape[1], device), arguments)


def plan_reduce(outputs, stats, options, device):
    """kernels.reduce_rows: the row losses and z parts reduced by "sum" or "mean" into
    ``outputs.loss`` and ``outputs.z_loss``."""
    arguments = ReduceArguments(outputs.row_loss, outputs.row_z, stats,
                                np.int32(REDUCTION_CODES[options.reduction]), outputs.loss,
                                outputs.z_loss)
    return Launch(kernels.reduce_rows, 1, block_threads(device), arguments)


def plan_reduce_accuracy(outputs, stats, options, device):
    """kernels.reduce_rows on the rows' 0/1 correctness as both its inputs: its z part's
    reduction, a sum or a mean over the counted rows (as z-loss's), is the token accuracy; the
    other output, sum / S_w + mean, goes to scratch."""
    arguments = ReduceArguments(outputs.row_correct, outputs.row_correct, stats,
                                np.int32(REDUCTION_CODES[options.reduction]), outputs.scratch,
                                outputs.token_accuracy)
    return Launch(kernels.reduce_rows, 1, block_threads(device), arguments)


def plan_scale(grad, fmt, grad_output, per_row, device):
    """scale_kernel: ``grad`` (N, V) of format ``fmt`` times ``grad_output`` ((1,), or (N,)
    with ``per_row``) in place, a block a row."""
    pack, word_dtype = word_layout(grad, fmt)
    words = grad.view(word_dtype)
    arguments = ScaleArguments(words, grad_output, np.int32(per_row))
    return Launch(scale_kernel.scale_kernel(fmt, pack), row_blocks(grad.shape[0], device),
                  threads_per_row(words.shape[1], device), arguments)


def plan_round(source, scale, out, fmt, device):
    """rounding.round_kernel: ``out`` = ``source`` * scale[0] rounded to ``fmt``, for
    contiguous arrays of the same shape, a grid-stride loop over their elements."""
    n = source.size
    threads = device.threads or ROUND_THREADS
    blocks = min(device.max_grid, ROUND_MAX_BLOCKS, -(-n // threads))
    arguments = RoundArguments(source.reshape(-1), scale, out.reshape(-1).view(np.int16))
    return Launch(rounding.round_kernel(fmt), blocks, threads, arguments)
