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
becomes 0); and a kernel's own ``ptx_rewrites`` (bf16 kernels: cvt.rn.f16.f32 ->
cvt.rn.bf16.f32, see numba_ce.floatbits.kernel_codec). Blocks stay at kernels.MAX_THREADS = 256
threads, so ptxas may use up to 255 registers a thread and the kernels never spill.
"""
import ctypes
import functools
import re
import struct

import numba
import numpy as np
from numba import cuda, types

from .devices import cupy, kernel_array
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


def launch(kernel, grid, block, *args):
    """kernel[grid, block](*args) on the current stream; ``args`` are arrays and NumPy scalars."""
    if SIMULATOR:
        kernel[grid, block](*(a if isinstance(a, np.generic) else kernel_array(a) for a in args))
        return
    key = _argument_key(args)
    function = _compiled(kernel, key, cupy.cuda.Device().id)
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
    driver.launchKernel(function.ptr, grid, 1, 1, block, 1, 1, 0,
                        cupy.cuda.get_current_stream().ptr, 0, ctypes.addressof(extra))


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
    for old, new in getattr(kernel, "ptx_rewrites", ()):  # floatbits.kernel_codec
        ptx = ptx.replace(old, new)
    return ptx, _ENTRY.search(ptx).group(1)


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")


@functools.lru_cache(maxsize=None)
def _compiled(kernel, key, device_id):
    capability = cuda.get_current_device().compute_capability
    ptx, entry = compile_ptx(kernel, _numba_types(key), capability)
    module = cupy.cuda.function.Module()
    module.load(ptx.encode())
    return module.get_function(entry)
