"""Correct computations warn nothing in the simulator, where the kernels' arithmetic runs on NumPy
scalars (which warn about the inf and NaN that the GPU gives silently), whatever the user's filters.

The suite's own filter (setup.cfg: ``error``, set by pytest around each test, after numba_ce's
import) covers every test; this runs the computations that used to warn in a process started
with ``python -W error``, whose filter is in place before numba_ce is imported.
"""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

COMPUTATIONS = """
import ml_dtypes
import numpy as np

import numba_ce
from numba_ce.teaching import naive

rng = np.random.default_rng(0)
logits = rng.standard_normal((4, 40)).astype(np.float32)
target = np.array([1, 2, 3, 4])
ignored = np.full(4, -100)
poisoned = logits.copy()
poisoned[0, 5], poisoned[1, 7], poisoned[2, 9] = np.inf, -np.inf, np.nan
extreme = np.where(logits > 0, 1.0, -1.0).astype(np.float32) * np.finfo(np.float32).max

# the first rescale of every row overflows: (-FLT_MAX - m) * log2(e) = -inf, a factor of 0
numba_ce.cross_entropy_with_grad(logits, target, label_smoothing=0.1, z_loss=1e-4)
# a "mean" over no counted rows: 0 / 0
assert np.isnan(numba_ce.cross_entropy_with_grad(logits, ignored).loss)
# +inf and NaN logits poison their own rows only; -inf is a probability of 0
losses = numba_ce.cross_entropy(poisoned, target, reduction="none")
assert np.isnan(losses[[0, 2]]).all() and np.isfinite(losses[[1, 3]]).all()
# logits at +-FLT_MAX: x - m overflows to -inf, a probability of 0
assert np.isfinite(numba_ce.cross_entropy_with_grad(extreme, target, reduction="sum").grad).all()
# softcap's tanh tames infinite logits
assert np.isfinite(numba_ce.cross_entropy(poisoned[:2], target[:2], softcap=30.0))
# the linear head's chunks of bf16 logits (the rounding kernel too)
head = rng.standard_normal((50, 40)).astype(ml_dtypes.bfloat16)
numba_ce.linear_cross_entropy_with_grad(logits.astype(ml_dtypes.bfloat16), head, target)
# a teaching kernel, launched directly rather than through numba_ce.launcher
naive.cross_entropy_with_grad(extreme, target)
print("no warning")
"""


def test_correct_computations_warn_nothing_under_python_w_error():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-W", "error", "-c", COMPUTATIONS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no warning" in done.stdout, done.stdout + done.stderr
