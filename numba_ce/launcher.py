"""Calling a Numba kernel with little host overhead.

In the simulator a kernel is called through Numba's dispatcher. On a GPU, Numba's dispatcher
spends hundreds of microseconds a call wrapping and typing every array argument, which dominates
small shapes. Here each kernel is compiled once per argument signature with ``cuda.compile_ptx``
(the same compiler Numba's dispatcher uses), loaded as a CuPy module, and called with the
arguments already packed as Numba's kernel ABI lays them out (numba_ce.abi) into the thread's
parameter buffer, handed to cuLaunchKernel as CU_LAUNCH_PARAM_BUFFER_POINTER: a launch is one
``struct`` pack and one driver call, where CuPy's own argument handling would take each of the
row kernel's 76 parameters in turn. Arrays are NumPy in the simulator; on a GPU, CuPy arrays or
anything with their attributes (numba_ce.abi). A launch goes on CuPy's current device and
stream, or on the ones named by an enclosing :class:`on_stream`.

The PTX has the edits of numba_ce.ptx_edits (``.maxntid 1024, 1, 1``: ptxas keeps to 64
registers a thread) and is kept on disk (numba_ce.kernel_cache) for the next process.

Dynamic shared memory: ``launch(..., shared=bytes)``; the first such launch of a kernel raises its
limit to the device's opt-in maximum (48 KiB without asking).
"""
import ctypes
import functools
import re
import threading

import numpy as np
from numba import cuda

from . import device_properties, kernel_cache
from .abi import MAX_PARAMETER_BYTES, flatten, numba_types, parameter_layout
from .devices import cupy, kernel_array
from .portable import SIMULATOR
from .ptx_edits import with_max_threads

if cupy is not None:
    from cupy_backends.cuda.api import driver, runtime


def launch(kernel, grid, block, *args, shared=0):
    """kernel[grid, block](*args) on the current stream; ``args`` are arrays and NumPy scalars,
    ``shared`` the bytes of dynamic shared memory of each block (at most the device's opt-in
    limit less the kernel's static shared memory)."""
    if SIMULATOR:
        kernel[grid, block, 0, shared](
            *(a if isinstance(a, np.generic) else kernel_array(a) for a in args))
        return
    key, values = flatten(args)
    device_id, stream = current_stream()
    if not driver.ctxGetCurrent():
        # a thread CUDA has not run on, as torch's autograd device thread can be when a
        # backward's first CUDA call is ours (an H100 run: CUDA_ERROR_INVALID_CONTEXT); since
        # CUDA 12, cudaSetDevice makes the device's primary context current
        runtime.setDevice(device_id)
    function, layout = _prepared(kernel, key, device_id)
    if shared > 0:
        _allow_shared(function.ptr, device_id)
    parameters = _parameters
    layout.pack_into(parameters.buffer, 0, *values)
    parameters.size.value = layout.size
    driver.launchKernel(function.ptr, grid, 1, 1, block, 1, 1, shared, stream, 0,
                        parameters.extra_address)


def current_stream():
    """(device id, stream handle) where launches go: an enclosing :class:`on_stream`'s, else
    CuPy's current device and stream."""
    return getattr(_chosen, "stream", None) or (cupy.cuda.Device().id,
                                                cupy.cuda.get_current_stream().ptr)


# .stream: (device id, stream handle) of the innermost on_stream; .outer: those it replaced
_chosen = threading.local()


class on_stream:
    """``with on_stream(device_id, handle):`` launches go to the CUDA stream ``handle`` (an
    integer cudaStream_t) of GPU ``device_id``, which must be the current device, instead of
    CuPy's current ones: how numba_ce.torch launches on torch's stream without a CuPy stream
    object and context switch a call (microseconds each). Per thread, as CUDA streams are."""

    def __init__(self, device_id, handle):
        self.stream = (device_id, handle)

    def __enter__(self):
        _chosen.__dict__.setdefault("outer", []).append(getattr(_chosen, "stream", None))
        _chosen.stream = self.stream

    def __exit__(self, *exc):
        _chosen.stream = _chosen.outer.pop()


@functools.lru_cache(maxsize=None)
def _allow_shared(function, device_id):
    """Let ``function`` (a CUfunction handle) take up to the device's opt-in limit of dynamic
    shared memory (48 KiB without asking)."""
    static = driver.funcGetAttribute(_FUNC_SHARED_SIZE, function)
    driver.funcSetAttribute(function, _FUNC_MAX_DYNAMIC_SHARED,
                            device_properties.current().shared_per_block - static)


# CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, ...MAX_DYNAMIC_SHARED_SIZE_BYTES
_FUNC_SHARED_SIZE, _FUNC_MAX_DYNAMIC_SHARED = 1, 8
# cuLaunchKernel's `extra` keys (cuda.h)
_PARAM_END, _PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE = 0, 1, 2


class _Parameters(threading.local):
    """A thread's parameter buffer and cuLaunchKernel ``extra`` list, made once and reused by
    every launch (cuLaunchKernel copies the parameters before it returns)."""

    def __init__(self):
        self.buffer = ctypes.create_string_buffer(MAX_PARAMETER_BYTES)
        self.size = ctypes.c_size_t()
        self.extra = (ctypes.c_void_p * 5)(_PARAM_BUFFER_POINTER, ctypes.addressof(self.buffer),
                                           _PARAM_BUFFER_SIZE, ctypes.addressof(self.size),
                                           _PARAM_END)
        self.extra_address = ctypes.addressof(self.extra)


_parameters = _Parameters()


def compile_ptx(kernel, signature, capability):
    """(PTX, entry name) of a Numba kernel for one signature and compute capability, compiled
    or, when compiled before on this machine, read from numba_ce.kernel_cache."""
    name = kernel_cache.kernel_name(kernel)
    ptx = (_compiled_ptx(kernel, signature, capability) if name is None else
           kernel_cache.cached_text((name, repr(tuple(signature)), repr(capability)),
                                    lambda: _compiled_ptx(kernel, signature, capability)))
    return ptx, _ENTRY.search(ptx).group(1)


def _compiled_ptx(kernel, signature, capability):
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=capability)
    return with_max_threads(ptx)


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")


@functools.lru_cache(maxsize=None)
def _prepared(kernel, key, device_id):
    """(CuPy Function, parameter layout) of ``kernel`` for one signature on one GPU: compiled
    and loaded at the first launch."""
    layout = parameter_layout(key)  # raises before compiling for too many parameters
    capability = cuda.get_current_device().compute_capability
    ptx, entry = compile_ptx(kernel, numba_types(key), capability)
    module = cupy.cuda.function.Module()
    module.load(ptx.encode())
    return module.get_function(entry), layout
