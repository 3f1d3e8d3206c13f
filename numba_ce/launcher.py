"""Calling a Numba kernel with little host overhead.

In the simulator a kernel is called through Numba's dispatcher. On a GPU, Numba's dispatcher
spends hundreds of microseconds a call wrapping and typing every array argument, which dominates
small shapes. Here each kernel is compiled once per argument signature with ``cuda.compile_ptx``
(the same compiler Numba's dispatcher uses), loaded as a CuPy module, and called with the
arguments already in the layout Numba's kernel ABI expects:

    an array of ndim d  ->  meminfo, parent, nitems, itemsize, data, shape[0..d), strides[0..d)
    a scalar            ->  its value (int64, int32, float32 ...)

packed into one parameter buffer by a ``struct.Struct`` made once per signature (C layout: each
parameter at its natural alignment, as the PTX parameter space) and handed to cuLaunchKernel as
CU_LAUNCH_PARAM_BUFFER_POINTER, so a launch costs a few microseconds of Python (CuPy's own
argument handling spent about a microsecond per parameter, and a row-kernel launch has 80).
Arrays are NumPy in the simulator and CuPy (or anything CuPy wraps without a copy) on a GPU; the
launch goes on CuPy's current stream.

Edits to the PTX: ``ex2.approx.ftz``, exp2 without the subnormal fix-up instructions (the
kernels take exp2 of x - m <= 0 only, so the one difference is that a probability below 2**-126
becomes 0); and ``.maxntid`` kernels.MAX_THREADS = 1024, so ptxas keeps to 64 registers a thread
and two blocks of 512 threads share a multiprocessor.

Dynamic shared memory: ``launch(..., shared=bytes)``; the first such launch of a kernel raises its
limit to the device's opt-in maximum (48 KiB without asking).
"""
import ctypes
import functools
import re
import struct

import numba
import numpy as np
from numba import cuda, types

from .devices import cupy, kernel_array
from .kernels import MAX_THREADS
from .portable import SIMULATOR

if cupy is not None:
    from cupy_backends.cuda.api import driver


def argument_types(args):
    """The Numba signature of a launch: arrays as any-layout arrays of their dtype and rank."""
    return _numba_types(_argument_key(args))


def _argument_key(args):
    """A cheap hashable description of the arguments' types: (dtype, rank) or the scalar type."""
    return tuple(type(a) if isinstance(a, np.generic) else (a.dtype, a.ndim) for a in args)


@functools.lru_cache(maxsize=None)
def _numba_types(key):
    return tuple(numba.from_dtype(np.dtype(k)) if isinstance(k, type) else
                 types.Array(numba.from_dtype(k[0]), k[1], "A") for k in key)


def launch(kernel, grid, block, *args, shared=0):
    """kernel[grid, block](*args) on the current stream; ``args`` are arrays and NumPy scalars,
    ``shared`` the bytes of dynamic shared memory of each block (at most
    :func:`max_shared_bytes`)."""
    if SIMULATOR:
        kernel[grid, block, 0, shared](
            *(a if isinstance(a, np.generic) else kernel_array(a) for a in args))
        return
    key = _argument_key(args)
    device_id = cupy.cuda.Device().id
    function = _compiled(kernel, key, device_id)
    if shared > 0:
        _allow_shared(function, device_id)
    values = []
    for a in args:
        if isinstance(a, np.generic):
            values.append(a)
        else:  # meminfo and parent are unused by kernels: 0
            values += (0, 0, a.size, a.itemsize, a.data.ptr, *a.shape, *a.strides)
    buffer = ctypes.create_string_buffer(_layout(key).pack(*values))
    size = ctypes.c_size_t(len(buffer) - 1)  # create_string_buffer adds a NUL
    extra = (ctypes.c_void_p * 5)(_PARAM_BUFFER_POINTER, ctypes.addressof(buffer),
                                  _PARAM_BUFFER_SIZE, ctypes.addressof(size), _PARAM_END)
    driver.launchKernel(function.ptr, grid, 1, 1, block, 1, 1, shared,
                        cupy.cuda.get_current_stream().ptr, 0, ctypes.addressof(extra))


def max_shared_bytes(blocks_per_sm=1):
    """The dynamic shared memory a block may ask for so that ``blocks_per_sm`` of them fit on a
    multiprocessor of the current GPU (leaving each 1 KiB for the system and 256 bytes for the
    kernel's static arrays); a small buffer in the simulator, enough to exercise the code."""
    if SIMULATOR:
        return SIMULATOR_SHARED_BYTES
    per_block, per_sm = (SM90_SHARED_LIMITS if cupy is None  # planning offline (inspect)
                         else _shared_limits(cupy.cuda.Device().id))
    return min(per_block, per_sm // blocks_per_sm - 1024) - 256


SIMULATOR_SHARED_BYTES = 1024
SM90_SHARED_LIMITS = (232448, 233472)  # H100 / H200: 227 KiB a block, 228 KiB a multiprocessor


def multiprocessors():
    """The current GPU's multiprocessor count (132 on an H100 or H200, offline)."""
    if cupy is None:
        return 132
    return _multiprocessors(cupy.cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_id):
    return cupy.cuda.runtime.deviceGetAttribute(_MULTIPROCESSOR_COUNT, device_id)


@functools.lru_cache(maxsize=None)
def _shared_limits(device_id):
    """(opt-in bytes a block, bytes a multiprocessor) of shared memory."""
    attribute = cupy.cuda.runtime.deviceGetAttribute
    return (attribute(_MAX_SHARED_OPTIN, device_id), attribute(_MAX_SHARED_SM, device_id))


@functools.lru_cache(maxsize=None)
def _allow_shared(function, device_id):
    """Let ``function`` take up to the device's opt-in limit of dynamic shared memory (48 KiB
    without asking)."""
    static = driver.funcGetAttribute(_FUNC_SHARED_SIZE, function.ptr)
    driver.funcSetAttribute(function.ptr, _FUNC_MAX_DYNAMIC_SHARED,
                            _shared_limits(device_id)[0] - static)


# cudaDevAttrMaxSharedMemoryPerBlockOptin, ...PerMultiprocessor, cudaDevAttrMultiProcessorCount;
# CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_MAX_SHARED_OPTIN, _MAX_SHARED_SM, _MULTIPROCESSOR_COUNT = 97, 81, 16
_FUNC_SHARED_SIZE, _FUNC_MAX_DYNAMIC_SHARED = 1, 8
# cuLaunchKernel's `extra` keys (cuda.h)
_PARAM_END, _PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE = 0, 1, 2
_SCALAR_CODES = {np.dtype(np.int64): "q", np.dtype(np.int32): "i", np.dtype(np.float32): "f",
                 np.dtype(np.float64): "d", np.dtype(np.uint64): "Q", np.dtype(np.uint32): "I"}


@functools.lru_cache(maxsize=None)
def _layout(key):
    """The parameter buffer of a signature: an array of rank d is 5 + 2 d 64-bit words."""
    codes = "".join(_SCALAR_CODES[np.dtype(k)] if isinstance(k, type) else "q" * (5 + 2 * k[1])
                    for k in key)
    return struct.Struct("@" + codes)


def compile_ptx(kernel, signature, capability):
    """(PTX, entry name) of a Numba kernel for one signature and compute capability."""
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=capability)
    ptx = ptx.replace("ex2.approx.f32 ", "ex2.approx.ftz.f32 ")
    # Every block has at most MAX_THREADS threads: ptxas keeps to 65536 / MAX_THREADS registers.
    ptx = _ENTRY_BODY.sub(rf"\1.maxntid {MAX_THREADS}, 1, 1\n{{", ptx, count=1)
    return ptx, _ENTRY.search(ptx).group(1)


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")
_ENTRY_BODY = re.compile(r"(\.entry\s[^{]*\)\s*)\{")


@functools.lru_cache(maxsize=None)
def _compiled(kernel, key, device_id):
    capability = cuda.get_current_device().compute_capability
    ptx, entry = compile_ptx(kernel, _numba_types(key), capability)
    module = cupy.cuda.function.Module()
    module.load(ptx.encode())
    return module.get_function(entry)
