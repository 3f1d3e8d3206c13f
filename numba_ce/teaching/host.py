"""The host side the teaching variants share: device copies in, mean loss and gradient out."""
import numpy as np
from numba import cuda

from ..portable import SIMULATOR

# Threads a block (a row): a power of two for the tree reductions. One warp keeps the simulator,
# which runs every thread as a Python thread, fast.
THREADS = 32 if SIMULATOR else 256


def device_buffers(logits, target):
    """Device arrays for fp32 ``logits`` (N, V) and ``target`` (N,):

    logits    # (N, V) float32, a copy
    target    # (N,) int64, a copy
    grad      # (N, V) float32, to fill
    row_loss  # (N,) float32, to fill
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.dtype != np.float32:
        raise ValueError(f"the teaching variants take float32 logits (N, V) (got {logits.dtype} "
                         f"of shape {logits.shape})")
    target = np.asarray(target, np.int64)
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape ({logits.shape[0]},) (got {target.shape})")
    return (cuda.to_device(np.ascontiguousarray(logits)), cuda.to_device(target),
            cuda.device_array(logits.shape, np.float32), cuda.device_array(len(target), np.float32))


def mean_loss_and_grad(row_loss, grad):
    """(the mean of the row losses as a float, the gradient as a NumPy array)."""
    return float(row_loss.copy_to_host().astype(np.float64).mean()), grad.copy_to_host()
