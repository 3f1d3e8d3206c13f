"""numba_ce.numpy_compat: under NumPy 2.5, numba-cuda 0.30 imports without a warning and compiles
kernels; under any NumPy, importing numba_ce leaves NumPy's namespace as it was.

Each backend runs in a fresh process with warnings as errors (this one has imported numba_ce, and
the backend is fixed at numba's import). Without the compat module, under NumPy 2.5 the import
raises numba-cuda's DeprecationWarning, and the compile (no simulator) raises AttributeError for
``np.row_stack``; under NumPy < 2.5 the module does nothing, which the namespace check sees.
"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

IMPORT_AND_COMPILE = """
import numpy as np
had_row_stack = hasattr(np, "row_stack")
import numba_ce
from numba import cuda, float32

assert hasattr(np, "row_stack") == had_row_stack, "importing numba_ce changed NumPy's namespace"
if not numba_ce.portable.SIMULATOR:
    def double(a):
        a[0] *= 2

    cuda.compile_ptx(double, (float32[:],), cc=(9, 0))
print("imported" + ("" if numba_ce.portable.SIMULATOR else " and compiled"), "under NumPy",
      np.__version__)
"""


@pytest.mark.parametrize("simulator", [False, True], ids=["gpu-compiler", "simulator"])
def test_import_and_compile_under_warnings_as_errors(simulator):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    done = subprocess.run([sys.executable, "-W", "error", "-c", IMPORT_AND_COMPILE], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode and "NVVM" in done.stderr:
        pytest.skip(f"no NVVM to compile with: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "imported" in done.stdout
