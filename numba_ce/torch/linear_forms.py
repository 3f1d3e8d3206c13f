"""torch 2.13's forms of a linear cross-entropy call (torch.nn.functional.linear_cross_entropy,
torch.nn.LinearCrossEntropyLoss) in numba_ce's terms:

    ignore_index=None                   torch's default: -100 for class-index targets
    options=LinearCrossEntropyOptions   torch's chunked path's settings:
        batch_chunk_size, chunking_method   the rows of a chunk: chunk_size
                                            (chunking_method "auto": numba_ce's default chunks;
                                            "aspect_ratio[:F]": torch's formula, below)
        acc_policy                          any: numba_ce's designs all sum in float32 and round
                                            once (torch's most accurate policy); how much memory
                                            that takes is numba_ce's memory= ("low" keeps no
                                            V x H float32 sum, as "compact"; "fast" keeps one,
                                            as "balanced")
        acc_dtype                           None or torch.float32 (numba_ce sums in float32)
        allow_retain_graph                  False: a second backward is refused, as torch's
                                            default (the backward scales saved gradients in
                                            place); True is refused with the reason
    out_features=() (the module)        a (V, H) head; torch's K-dimensional heads are refused
"""
import math

import torch

IGNORE_INDEX = -100  # what torch's ignore_index=None means for class-index targets
# torch 2.13's options class (older torch has none: then options are read by field name alone)
TorchOptions = getattr(torch.nn, "LinearCrossEntropyOptions", object)


def ignore_index_of(ignore_index: int | None) -> int:
    """torch's ignore_index, None meaning -100."""
    return IGNORE_INDEX if ignore_index is None else ignore_index


def chunk_size_of(options, chunk_size: int | None, n_rows: int, n_features: int,
                  n_classes: int) -> int | None:
    """The chunk_size of a call given torch's LinearCrossEntropyOptions ``options`` (None: the
    call's own ``chunk_size``, which may not be given beside them)."""
    if options is None:
        return chunk_size
    check_options(options, chunk_size)
    method, rows = options.chunking_method, options.batch_chunk_size
    if method == "auto" and rows is not None:  # torch: a size given turns "auto" off
        method = None
    if method == "auto":
        return None  # numba_ce's own chunks (torch's "auto" is its pick per device and dtype)
    if method is None:
        return max(1, n_rows if rows is None else min(rows, n_rows))  # None: one chunk
    # "aspect_ratio[:F]": chunks whose (C, V) logits match the (N, H) input in size,
    # next_pow2(ceil(N / ceil(V / H))) rows, divided by F, at most N
    factor = int(method.partition(":")[2] or 1)
    target = math.ceil(n_rows / math.ceil(n_classes / max(n_features, 1)))
    computed = min((1 << (target - 1).bit_length()) // factor, n_rows)
    if rows is not None and rows != computed:
        raise ValueError(f"batch_chunk_size (={rows}) and chunking_method ('{method}') give "
                         f"different chunk sizes ({rows} vs {computed}); pass only one (as "
                         "torch refuses them)")
    return max(1, computed)


def check_options(options, chunk_size):
    """Refuse LinearCrossEntropyOptions that numba_ce cannot honour, or given beside a
    chunk_size, saying why."""
    if chunk_size is not None:
        raise ValueError(f"pass chunk_size or options, not both (got chunk_size={chunk_size} "
                         f"and {options!r})")
    if options.acc_dtype not in (None, torch.float32):
        raise ValueError(f"numba_ce sums the linear cross-entropy in float32: options.acc_dtype "
                         f"must be None or torch.float32 (got {options.acc_dtype})")
    if options.allow_retain_graph:
        raise ValueError("options.allow_retain_graph=True is not supported: numba_ce's backward "
                         "scales the gradients its forward computed, in place; compute the loss "
                         "again for each backward")


def check_out_features(out_features):
    """torch's module takes out_features (d1, ..., dk) for K-dimensional heads; numba_ce's
    linear cross-entropy has a (V, H) head."""
    if tuple(out_features) != ():
        raise ValueError(f"numba_ce's LinearCrossEntropyLoss has a (num_classes, in_features) "
                         f"head: out_features must be () (got {tuple(out_features)})")
