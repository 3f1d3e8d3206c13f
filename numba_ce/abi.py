"""Numba's kernel ABI: the parameters a compiled kernel takes, and their bytes in a launch.

A kernel compiled by Numba takes its arguments flattened into parameters:

    an array of ndim d  ->  meminfo, parent, nitems, itemsize, data, shape[0..d), strides[0..d)
                            (64-bit words; meminfo and parent are unused by kernels: 0)
    a NumPy scalar      ->  its value (int64, int32, float32 ...)

each at its natural alignment, as the PTX parameter space lays out an entry's parameters: the
C layout of a ``struct.Struct`` ("@"), made once per signature. numba_ce.launcher packs a
launch's values with it into the buffer it hands to cuLaunchKernel. The ABI is Numba's, not a
stable interface: tests/test_abi.py compiles kernels offline and compares this layout with the
parameter list of their PTX, so a numba-cuda release that changes it fails there.

Arrays are NumPy in the simulator (and offline); on a GPU, CuPy arrays or anything with their
attributes (``dtype``, ``ndim``, ``size``, ``itemsize``, ``shape``, byte ``strides``,
``data.ptr``: the torch adapter's numba_ce.torch.tensors.TensorArray).
"""
import functools
import struct

import numba
import numpy as np
from numba import types

from .devices import data_pointer

MAX_PARAMETER_BYTES = 4096  # every CUDA version's limit on a kernel's parameters (12.1+: 32764)

_SCALAR_CODES = {np.dtype(np.int64): "q", np.dtype(np.int32): "i", np.dtype(np.float32): "f",
                 np.dtype(np.float64): "d", np.dtype(np.uint64): "Q", np.dtype(np.uint32): "I"}
ARRAY_HEADER_WORDS = 5  # meminfo, parent, nitems, itemsize, data; then shape and strides


def flatten(args):
    """(signature key, parameter values) of a launch's arguments: an array gives (dtype, rank)
    and its 5 + 2 d words, a NumPy scalar its type and itself. The key selects the compiled
    kernel and its :func:`parameter_layout`."""
    key, values = [], []
    for a in args:
        if isinstance(a, np.generic):
            key.append(type(a))
            values.append(a)
        else:
            key.append((a.dtype, a.ndim))
            values += (0, 0, a.size, a.itemsize, data_pointer(a), *a.shape, *a.strides)
    return tuple(key), values


def argument_types(args):
    """The Numba signature of a launch: arrays as any-layout arrays of their dtype and rank."""
    return numba_types(flatten(args)[0])


@functools.lru_cache(maxsize=None)
def numba_types(key):
    """The Numba types of a signature key, as the kernel is compiled for them."""
    return tuple(numba.from_dtype(np.dtype(k)) if isinstance(k, type) else
                 types.Array(numba.from_dtype(k[0]), k[1], "A") for k in key)


@functools.lru_cache(maxsize=None)
def parameter_layout(key):
    """The ``struct.Struct`` of a signature key's parameter buffer: an array of rank d is
    5 + 2 d 64-bit words. Raises ValueError above MAX_PARAMETER_BYTES."""
    codes = "".join(_SCALAR_CODES[np.dtype(k)] if isinstance(k, type) else
                    "q" * (ARRAY_HEADER_WORDS + 2 * k[1]) for k in key)
    layout = struct.Struct("@" + codes)
    if layout.size > MAX_PARAMETER_BYTES:
        raise ValueError(f"a kernel's parameters may take {MAX_PARAMETER_BYTES} bytes (got "
                         f"{layout.size} for {len(key)} arguments)")
    return layout
