"""The main demo: loss and gradient of random logits by the fused kernels, checked against the
float64 reference, and timed. A realistic LLM shape on a GPU; a small one in the simulator."""
import time

import ml_dtypes
import numpy as np

from . import devices, reference
from .api import cross_entropy_with_grad
from .portable import SIMULATOR

GPU_SHAPE = (4096, 128256)  # a Llama-3 vocabulary, 4096 tokens
SIMULATOR_SHAPE = (8, 1000)
CHECKED_ROWS = 64  # rows compared with the float64 reference on the GPU (the whole batch is 1 GB)

# The closing line of the demo and of ``python -m numba_ce check``: the verdict, in words
PASSED = "ok: loss and gradient within the documented tolerance of the float64 reference"
FAILED = "FAILED: loss or gradient outside the documented tolerance of the float64 reference"


def agrees(loss_error, grad_error, reference_grad):
    """Whether the kernels' errors against the float64 reference are within the tolerance the
    README documents: the loss within 1e-3, the gradient within 0.8% of the reference's largest
    entry (two roundings to bf16, which keeps 8 bits: 2**-8 = 0.4% each)."""
    return loss_error <= 1e-3 and grad_error <= 8e-3 * np.abs(reference_grad).max()


def verdict(ok):
    """Print the closing line; the exit status (1 when the check failed)."""
    print(PASSED if ok else FAILED)
    return 0 if ok else 1


def main():
    """Run the demo; the exit status."""
    devices.require_backend()
    n_rows, n_classes = SIMULATOR_SHAPE if SIMULATOR else GPU_SHAPE
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((n_rows, n_classes), np.float32) * 2).astype(ml_dtypes.bfloat16)
    target = rng.integers(0, n_classes, n_rows)
    target[::7] = -100  # some ignored rows
    print(f"backend: {devices.backend_name()}")
    print(f"logits: {n_rows} x {n_classes} bfloat16, label_smoothing=0.1, z_loss=1e-4, "
          f"reduction='none' (per row) and 'mean'")
    options = dict(label_smoothing=0.1, z_loss=1e-4)

    if SIMULATOR:
        args = (logits, target)
        sync = lambda: None  # noqa: E731
    else:
        cupy = devices.cupy
        args = (cupy.asarray(logits), cupy.asarray(target))
        sync = cupy.cuda.get_current_stream().synchronize
    res = cross_entropy_with_grad(*args, reduction="none", **options)
    mean = cross_entropy_with_grad(*args, **options)
    sync()
    seconds = []
    for _ in range(1 if SIMULATOR else 20):
        start = time.perf_counter()
        cross_entropy_with_grad(*args, **options)
        sync()
        seconds.append(time.perf_counter() - start)

    rows = np.arange(n_rows) if SIMULATOR else np.sort(rng.choice(n_rows, CHECKED_ROWS, False))
    host = lambda a: a if SIMULATOR else devices.cupy.asnumpy(a)  # noqa: E731
    expected = reference.cross_entropy_with_grad(logits[rows], target[rows], reduction="none",
                                                 **options)
    expected_mean = reference.cross_entropy(logits, target, **options) if SIMULATOR else None
    loss_error = np.abs(host(res.loss)[rows] - expected.loss).max()
    grad_error = np.abs(host(res.grad[rows]).astype(np.float64) - expected.grad).max()
    print(f"loss (mean): {float(host(mean.loss)):.6f}"
          + ("" if expected_mean is None else f"   reference: {expected_mean:.6f}"))
    print(f"max |loss - reference| over {len(rows)} rows: {loss_error:.2e}")
    print(f"max |grad - reference| over {len(rows)} rows: {grad_error:.2e}   "
          f"(max |grad| {np.abs(expected.grad).max():.2e}; bf16 keeps 8 bits)")
    print(f"time for loss + gradient: {np.median(seconds) * 1e3:.3f} ms (median of {len(seconds)}, "
          "host wall clock)")
    return verdict(agrees(loss_error, grad_error, expected.grad))
