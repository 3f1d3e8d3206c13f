"""Where arrays live and how kernels see them: NumPy in the simulator, CuPy on a GPU.

On a GPU, kernels are launched on CuPy's current stream by :mod:`numba_ce.launcher`.
"""
import numpy as np
from numba import cuda

from .portable import SIMULATOR

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

try:
    import cupy
except ImportError:  # CPU-only machines: the simulator needs no CuPy
    cupy = None


def gpu_available():
    return not SIMULATOR and cupy is not None and cuda.is_available()


def backend_name():
    if SIMULATOR:
        return "Numba CUDA simulator (CPU)"
    if gpu_available():
        name = cuda.get_current_device().name
        return f"GPU: {name.decode() if isinstance(name, bytes) else name}"
    return "none"


def require_backend():
    if SIMULATOR or gpu_available():
        return
    missing = "CuPy is not installed" if cupy is None else "no CUDA GPU is visible"
    raise RuntimeError(
        f"numba_ce needs a CUDA GPU with CuPy, or the CUDA simulator ({missing}). "
        "To run on the CPU, set NUMBA_ENABLE_CUDASIM=1 before importing numba.")


def is_device_array(a):
    return hasattr(a, "__cuda_array_interface__")


def to_device(a):
    """A CuPy view of a device array (zero-copy), or a device copy of a NumPy array."""
    return cupy.asarray(a)


def kernel_array(a):
    """The simulator's device-array wrapper around a NumPy array, sharing its memory (a bare
    NumPy argument would be copied in and out, and must be contiguous)."""
    return FakeCUDAArray(a)


def data_pointer(a):
    if SIMULATOR or isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


_ONES = {}


def ones(xp):
    """A float32 array [1.0], one per device, made once (kernels only read it)."""
    key = None if xp is np else xp.cuda.Device().id
    if key not in _ONES:
        _ONES[key] = xp.ones(1, np.float32)
    return _ONES[key]


def synchronize_read(a):
    """Copy a small device array to the host (the one host synchronisation of a checked call)."""
    return a.copy() if SIMULATOR or isinstance(a, np.ndarray) else cupy.asnumpy(a)
