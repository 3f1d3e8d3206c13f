"""Where arrays live and how kernels see them: NumPy in the simulator; on a GPU, CuPy arrays or
the torch adapter's TensorArrays (numba_ce.torch.tensors), which have CuPy's attributes.

On a GPU, :mod:`numba_ce.launcher` launches kernels on CuPy's current stream, or on the stream an
enclosing ``launcher.on_stream`` names (the torch adapter's: torch's current stream).
"""
import functools

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


# cp.async and the bf16 conversion instructions of the kernels (numba_ce.portable)
MIN_CAPABILITY = (8, 0)
# CuPy's wheels are each built for one CUDA major version, which the driver must support
GPU_EXTRAS = "pip install 'numba_ce[gpu]' for a CUDA 13 driver, 'numba_ce[gpu-cuda12]' for CUDA 12"


def require_backend():
    if SIMULATOR:
        return
    if gpu_available():
        _check_capability(cupy.cuda.Device().id)
        return
    install = f"; {GPU_EXTRAS}" if cupy is None else ""
    raise RuntimeError(
        f"numba_ce needs a CUDA GPU with CuPy ({gpu_problem()}{install}), or the CUDA "
        "simulator: to run on the CPU, set NUMBA_ENABLE_CUDASIM=1 before importing numba.")


def gpu_problem():
    """Why the kernels cannot run on a GPU in this process (one without the simulator), or None
    when they can: no CuPy, no GPU visible, a GPU older than MIN_CAPABILITY, or a CUDA driver
    older than the one CuPy was built for."""
    if cupy is None:
        return "CuPy is not installed"
    if not cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        _check_capability(cupy.cuda.Device().id)
    except RuntimeError as error:  # CuPy's CUDARuntimeError is one too
        return str(error)
    return None


@functools.lru_cache(maxsize=None)
def _check_capability(device_id):
    device = cupy.cuda.Device(device_id)
    capability = divmod(int(device.compute_capability), 10)
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    check_capability(capability, name.decode() if isinstance(name, bytes) else name)


def check_capability(capability, name):
    """Raise unless a GPU of compute capability ``capability`` (major, minor) runs the kernels."""
    if tuple(capability) < MIN_CAPABILITY:
        raise RuntimeError(
            f"numba_ce needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"or newer (Ampere, Hopper and later: its kernels use cp.async and bf16 conversion "
            f"instructions); {name} is {capability[0]}.{capability[1]}")


def to_device(a):
    """A CuPy view of a device array (zero-copy), or a device copy of a NumPy array."""
    return cupy.asarray(a)


def kernel_array(a):
    """The simulator's device-array wrapper around a NumPy array, sharing its memory (a bare
    NumPy argument would be copied in and out, and must be contiguous)."""
    return FakeCUDAArray(a)


def data_pointer(a):
    """The address of a NumPy array's first element, or of a device array's (CuPy's
    ``data.ptr``, which numba_ce.torch.tensors.TensorArray also has)."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr


_ONES = {}


def ones(xp):
    """A float32 array [1.0], one per device, made once (kernels only read it)."""
    key = None if xp is np else xp.cuda.Device().id
    if key not in _ONES:
        _ONES[key] = xp.ones(1, np.float32)
    return _ONES[key]
