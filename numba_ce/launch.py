"""Launching one call: pick the word width and block size, then run the three kernels in order.

Framework-neutral: takes NumPy arrays in the simulator and CuPy arrays (or the torch adapter's
TensorArrays, which have their attributes) on a GPU, plus preallocated outputs, so the NumPy/CuPy
API and the PyTorch adapter share it. Launches on the current stream and never synchronises,
except for the optional target check (one 8-byte read).
"""
import numpy as np

from . import kernels
from .devices import data_pointer
from .floatbits import FORMATS
from .host_read import start_read
from .launcher import l2_bytes, launch, max_shared_bytes, multiprocessors
from .portable import SIMULATOR, WARP_SIZE
from .validation import target_out_of_range

WORD_BYTES = 8  # packed loads and stores: 4 x 16-bit or 2 x 32-bit elements a word
# The simulator runs every thread as a Python thread and each block costs a thread start-up and
# a few barriers: one warp a block and two blocks striding over the rows keep it fast. Tests widen
# SIMULATOR_THREADS to cover the cross-warp reduction.
SIMULATOR_THREADS = 32
SIMULATOR_ROW_BLOCKS = 2
WORDS_PER_THREAD = 2 * kernels.UNROLL  # a row block grows until each thread has about this many
MAX_ROW_THREADS = 256  # row blocks without a shared-memory cache (measured fastest, bench/NOTES.md)
MAX_ROW_BLOCKS = 2**31 - 1  # one block a row; fewer blocks stride over the rows
# Gradient kernels keep the first words of each row in shared memory (kernels.row_kernel): a few
# blocks of kernels.MAX_THREADS // blocks threads share a multiprocessor and its shared memory,
# and the grid is what fits at once. Two blocks of 512 threads measured fastest on the H200
# (against one of 1024 and four of 256: bench/NOTES.md, v9) where the words they do not cache fit
# in L2 for pass 2 to read again; for longer rows, one block of 1024 threads with twice the cache
# (v12).
CACHED_BLOCKS_PER_SM = (2, 1)  # in order of preference
REDUCTION_CODES = {"none": kernels.NONE, "sum": kernels.SUM, "mean": kernels.MEAN}


def word_layout(array, fmt):
    """(elements per word, word dtype) for reading ``array`` (N, V): 8-byte words when every row
    starts 8-byte aligned and V fills whole words, else one element a word."""
    bits = FORMATS[fmt][0]
    itemsize = bits // 8
    pack = WORD_BYTES // itemsize
    n_rows, n_classes = array.shape
    # The row stride counts even for one row: torch's dtype views (the adapter's TensorArray)
    # refuse any stride the word size does not divide.
    aligned = data_pointer(array) % WORD_BYTES == 0 and array.strides[0] % WORD_BYTES == 0
    if aligned and n_classes % pack == 0:
        return pack, np.int64
    return 1, np.int16 if bits == 16 else np.int32


def single_block_threads():
    return SIMULATOR_THREADS if SIMULATOR else kernels.MAX_THREADS


def row_blocks(n_rows):
    """Blocks for a row kernel: one a row on a GPU, two striding over the rows in the simulator."""
    return min(n_rows, SIMULATOR_ROW_BLOCKS if SIMULATOR else MAX_ROW_BLOCKS)


def cache_plan(n_words, word_bytes):
    """(blocks a multiprocessor, cache bytes a block) for the cached gradient kernel on rows of
    ``n_words`` words: the first count of CACHED_BLOCKS_PER_SM whose blocks' uncached words
    (pass 2 reads them again) fit in L2 together, else the last; the first in the simulator."""
    for blocks in CACHED_BLOCKS_PER_SM:
        shared = cache_bytes(n_words, word_bytes, blocks)
        if SIMULATOR or blocks * multiprocessors() * (n_words * word_bytes - shared) <= l2_bytes():
            break
    return blocks, shared


def resident_row_blocks(n_rows, blocks_per_sm):
    """Blocks for a cached row kernel: as many as are resident at once, striding over the rows
    (each prefetches its next row while it finishes the current one)."""
    return min(n_rows, SIMULATOR_ROW_BLOCKS if SIMULATOR
               else multiprocessors() * blocks_per_sm)


def threads_per_row(n_words, limit=None):
    """Threads of a row block: a warp, doubled while each thread has over WORDS_PER_THREAD
    words, up to ``limit`` (MAX_ROW_THREADS)."""
    if SIMULATOR:
        return SIMULATOR_THREADS
    limit = limit or MAX_ROW_THREADS
    threads = WARP_SIZE
    while threads < limit and threads * WORDS_PER_THREAD < n_words:
        threads *= 2
    return threads


def run(xp, logits, fmt, target, weight, options, grad, grad_output, row_loss, row_z, row_lse,
        loss_out, z_out, validate):
    """Fill the outputs. ``grad`` is None for the loss-only kernel, or an (N, V) array of the
    logits' format (``logits`` itself for in-place). ``grad_output`` is a float32 array of shape
    (1,) or (N,). ``loss_out``/``z_out`` are (1,) float32 for "sum"/"mean", None for "none".

    With ``validate``, the target check's read is started after the target statistics and
    waited for after the other launches (numba_ce.host_read), so the GPU does not idle while the
    host waits; a bad target gives its row NaN in the meantime, in outputs the caller never sees.
    In place, the check comes before the row kernel: the logits are the caller's."""
    ignore_index, n_classes = options[0], logits.shape[1]
    stats, bad_row = target_statistics(xp, target, weight, ignore_index, n_classes)
    first_bad = start_read(bad_row) if validate else None
    if first_bad is not None and grad is not None and data_pointer(grad) == data_pointer(logits):
        check_targets(first_bad, target, n_classes, ignore_index)
        first_bad = None
    rows(logits, fmt, target, weight, options, stats, grad, grad_output, row_loss, row_z, row_lse)
    if loss_out is not None:
        reduce(row_loss, row_z, stats, options[1], loss_out, z_out)
    if first_bad is not None:
        check_targets(first_bad, target, n_classes, ignore_index)


def target_statistics(xp, target, weight, ignore_index, n_classes):
    """(stats, bad_row): the reduction denominators of a batch (kernels.target_stats) as a
    float32 device array, and the first row whose target is out of range (N if none) as an int64
    device array of one element, for :func:`check_targets`. A batch processed in chunks of rows
    (numba_ce.linear) computes them once, so every chunk's gradient has the batch's scale."""
    stats = xp.empty(3, np.float32)
    bad_row = xp.empty(1, np.int64)
    has_weight = weight is not None
    launch(kernels.target_stats, 1, single_block_threads(), target,
           weight if has_weight else stats, np.int32(has_weight), np.int64(ignore_index),
           np.int64(n_classes), stats, bad_row)
    return stats, bad_row


def rows(logits, fmt, target, weight, options, stats, grad, grad_output, row_loss, row_z,
         row_lse):
    """The row kernel over ``logits`` (N, V) with the batch's ``stats``: row losses, z parts,
    lse and (unless ``grad`` is None) the gradient."""
    ignore_index, reduction, label_smoothing, z_loss, softcap = options
    n_rows, n_classes = logits.shape
    has_weight = weight is not None
    pack, word_dtype = word_layout(logits, fmt)
    if grad is not None:
        grad_pack, _ = word_layout(grad, fmt)
        if grad_pack != pack:  # e.g. a misaligned logits view with an aligned gradient buffer
            pack, word_dtype = 1, np.int16 if FORMATS[fmt][0] == 16 else np.int32
    words = logits.view(word_dtype)
    grad_words = words[:1, :1] if grad is None else grad.view(word_dtype)
    smoothing = (kernels.NO_SMOOTHING if label_smoothing == 0 else
                 kernels.WEIGHTED_SMOOTHING if has_weight else kernels.SMOOTHING)
    kernel = kernels.row_kernel(fmt, pack, grad is not None, softcap is not None, smoothing)
    n_words = words.shape[1]
    if grad is not None and pack > 1:  # the cached kernel (kernels.row_kernel)
        per_sm, shared = cache_plan(n_words, words.itemsize)
        blocks = resident_row_blocks(n_rows, per_sm)
        threads = threads_per_row(n_words, kernels.MAX_THREADS // per_sm)
    else:
        blocks, shared, threads = row_blocks(n_rows), 0, threads_per_row(n_words)
    launch(kernel, blocks, threads, words, target, weight if has_weight else stats, grad_words,
           row_loss, row_z, row_lse, stats, grad_output, np.int64(n_classes),
           np.int64(ignore_index), np.float32(1.0 - label_smoothing),
           np.float32(label_smoothing / n_classes), np.float32(z_loss),
           np.float32(softcap or 0.0), np.int32(has_weight), np.int32(REDUCTION_CODES[reduction]),
           np.int32(grad_output.shape[0] > 1), shared=shared)


def cache_bytes(n_words, word_bytes, blocks_per_sm):
    """Dynamic shared memory of a row block: its share of the multiprocessor's, no more than the
    row needs; pass 2 reads these words from chip instead of from L2 or DRAM."""
    budget = max_shared_bytes(blocks_per_sm)
    return min(budget - budget % word_bytes, n_words * word_bytes)


def reduce(row_loss, row_z, stats, reduction, loss_out, z_out):
    """loss_out[0], z_out[0] = the row losses and z parts reduced by "sum" or "mean"."""
    launch(kernels.reduce_rows, 1, single_block_threads(), row_loss, row_z, stats,
           np.int32(REDUCTION_CODES[reduction]), loss_out, z_out)


def check_targets(first_bad, target, n_classes, ignore_index):
    """Raise ValueError naming the first row whose target is neither in [0, V) nor ignore_index;
    ``first_bad`` is the read (host_read.start_read) of target_statistics' bad_row."""
    row = int(first_bad.result()[0])
    if row < target.shape[0]:
        value = int(start_read(target[row:row + 1]).result()[0])
        raise target_out_of_range(row, value, n_classes, ignore_index)
