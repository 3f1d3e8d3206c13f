"""Roofline of a memory-bound call: the bytes its byte model moves, over its time, against the
bandwidth ceiling.

Byte model, counting only the N x V arrays (the per-row values are O(N)):
    loss    cross_entropy reads the logits once:                         N * V * itemsize
    fused   cross_entropy_with_grad reads them once, writes the gradient: 2 * N * V * itemsize
The fused kernel reads each row twice; the model counts one read, which is what DRAM sees for the
words its blocks keep in shared memory between the passes (numba_ce.kernels).
"""
from typing import NamedTuple

import numpy as np

from .. import devices
from ..floatbits import FORMATS
from .launches import check_dtype, numpy_dtype

H200_COPY_CEILING = 4.23e12  # bytes/s: a device-to-device copy measured on an H200 (4.8 on paper)
ARRAYS_MOVED = {"loss": 1, "fused": 2}  # N x V arrays that cross DRAM once each
MODE_NAMES = {"loss": "loss only (cross_entropy)",
              "fused": "fused forward+backward (cross_entropy_with_grad)"}


def bytes_moved(shape, dtype, mode):
    """The byte model: ARRAYS_MOVED[mode] * N * V * itemsize."""
    if mode not in ARRAYS_MOVED:
        raise ValueError(f"mode must be one of {list(ARRAYS_MOVED)} (got {mode!r})")
    n_rows, n_classes = shape
    return ARRAYS_MOVED[mode] * n_rows * n_classes * FORMATS[check_dtype(dtype)][0] // 8


class Roofline(NamedTuple):
    shape: tuple
    dtype: str
    mode: str
    bytes: int
    seconds: float
    ceiling: float  # bytes/s
    timed: str      # where the time came from: "given" or "measured ..."

    @property
    def bandwidth(self):
        """Effective bandwidth, bytes/s."""
        return self.bytes / self.seconds

    @property
    def share(self):
        """Fraction of the ceiling reached."""
        return self.bandwidth / self.ceiling

    def __str__(self):
        n_rows, n_classes = self.shape
        factor = ARRAYS_MOVED[self.mode]
        model = f"{factor} * N * V * itemsize" if factor > 1 else "N * V * itemsize"
        return "\n".join([
            f"{MODE_NAMES[self.mode]} on {n_rows} x {n_classes} {self.dtype} logits",
            f"bytes moved  {self.bytes / 1e9:.3f} GB  (byte model: {model})",
            f"time         {self.seconds * 1e3:.4f} ms  ({self.timed})",
            f"bandwidth    {self.bandwidth / 1e12:.3f} TB/s = {self.share:.1%} of the "
            f"{self.ceiling / 1e12:.2f} TB/s ceiling",
            f"at the ceiling these bytes take {self.bytes / self.ceiling * 1e3:.4f} ms",
        ])


def roofline(shape, dtype, mode, seconds, ceiling=H200_COPY_CEILING, timed="given"):
    """The :class:`Roofline` of a call on ``shape`` (N, V) logits of ``dtype`` that took
    ``seconds``; ``mode`` is "loss" or "fused"; ``ceiling`` in bytes/s."""
    if not seconds > 0:
        raise ValueError(f"the time must be > 0 seconds (got {seconds})")
    if not ceiling > 0:
        raise ValueError(f"the ceiling must be > 0 bytes/s (got {ceiling})")
    shape = tuple(int(n) for n in shape)
    return Roofline(shape, dtype, mode, bytes_moved(shape, dtype, mode), float(seconds),
                    float(ceiling), timed)


def measure(shape, dtype, mode, repeats=20):
    """Median seconds of one call ("loss": cross_entropy, "fused": cross_entropy_with_grad) on
    random logits on the GPU, timed by CUDA events on the current stream, after one warm-up
    call. ``validate=False``: the kernels without the target check's host round trip."""
    from ..api import cross_entropy, cross_entropy_with_grad

    if not devices.gpu_available():
        raise RuntimeError(f"measuring needs a CUDA GPU with CuPy (backend here: "
                           f"{devices.backend_name()}); pass a measured time instead")
    call = {"loss": cross_entropy, "fused": cross_entropy_with_grad}[mode]
    cupy = devices.cupy
    n_rows, n_classes = shape
    rng = np.random.default_rng(0)
    logits = cupy.asarray(rng.standard_normal((n_rows, n_classes), np.float32)
                          .astype(numpy_dtype(dtype)))
    target = cupy.asarray(rng.integers(0, n_classes, n_rows))
    call(logits, target, validate=False)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    seconds = []
    for _ in range(repeats):
        start.record()
        call(logits, target, validate=False)
        stop.record()
        stop.synchronize()
        seconds.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(seconds))
