"""What launch planning needs to know of a device, as a value.

Plans are a pure function of (what a call computes, the arrays' shapes, these properties), so a
test or ``python -m numba_ce inspect`` plans for any device by passing one, and nothing reads
global device state while planning. :func:`current` gives the properties of where launches go
now: the GPU (queried once per device), the CUDA simulator, or, on a machine with neither (offline
inspection), an sm_90 GPU (H100 / H200).
"""
import functools
from typing import NamedTuple

from .devices import cupy
from .portable import SIMULATOR


class DeviceProperties(NamedTuple):
    name: str
    multiprocessors: int
    l2_bytes: int
    shared_per_block: int   # bytes of shared memory a block may opt in to
    shared_per_sm: int      # bytes of shared memory a multiprocessor has
    max_grid: int = 2**31 - 1  # blocks a launch may have (the simulator: a few, striding)
    threads: int | None = None  # a fixed block size (the simulator's), else chosen per row


SM90 = DeviceProperties("sm_90 (H100 / H200)", 132, 50 * 2**20, 232448, 233472)
# The simulator runs every thread as a Python thread and each block costs a thread start-up and
# a few barriers: one warp a block and two blocks striding over the rows keep it fast, and a
# shared-memory row cache of 1 KiB exercises the cached path. Tests widen it as they need.
SIMULATED = DeviceProperties("Numba CUDA simulator", multiprocessors=1, l2_bytes=2**40,
                             shared_per_block=1024 + 256, shared_per_sm=2**30, max_grid=2,
                             threads=32)


def current():
    """The properties of the device that launches go to now."""
    if SIMULATOR:
        return SIMULATED
    if cupy is None:  # planning offline (inspect)
        return SM90
    return _queried(cupy.cuda.runtime.getDevice())  # the current device: launches go there


@functools.lru_cache(maxsize=None)
def _queried(device_id):
    attribute = cupy.cuda.runtime.deviceGetAttribute
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return DeviceProperties(name.decode() if isinstance(name, bytes) else name,
                            attribute(_MULTIPROCESSOR_COUNT, device_id),
                            attribute(_L2_CACHE_SIZE, device_id),
                            attribute(_MAX_SHARED_OPTIN, device_id),
                            attribute(_MAX_SHARED_SM, device_id))


# cudaDevAttrMultiProcessorCount, cudaDevAttrL2CacheSize, cudaDevAttrMaxSharedMemoryPerBlockOptin,
# cudaDevAttrMaxSharedMemoryPerMultiprocessor
_MULTIPROCESSOR_COUNT, _L2_CACHE_SIZE, _MAX_SHARED_OPTIN, _MAX_SHARED_SM = 16, 38, 97, 81
