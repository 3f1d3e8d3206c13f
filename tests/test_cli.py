"""``python -m numba_ce demo`` and ``check``, the commands the README starts with, run in the
simulator as a user runs them: a fresh interpreter without the test suite's warning filters,
RuntimeWarnings made errors, stderr clean. The simulator's NumPy scalars warn where the GPU's
float32 arithmetic silently gives +-inf, which the kernels count on: the demo used to print
such a warning on every run. (On a GPU, scripts/gpu runs both commands as steps of their own.)"""
import os
import subprocess
import sys

import pytest

from numba_ce.portable import SIMULATOR

pytestmark = pytest.mark.skipif(not SIMULATOR, reason="simulator only: scripts/gpu runs check and "
                                "demo as steps of their own on a GPU")


@pytest.mark.parametrize("command, lines", [
    ("demo", ["backend: ", "max |loss - reference| over ", "max |grad - reference| over ",
              "time for loss + gradient: "]),
    ("check", ["float32 ", "float16 ", "bfloat16 ", "backend: "]),
])
def test_command_runs_clean(command, lines):
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "numba_ce", command],
        capture_output=True, text=True, env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"),
        timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    printed = done.stdout.splitlines()
    for start in lines:
        assert any(line.startswith(start) for line in printed), (start, done.stdout)
    assert "FAILED" not in done.stdout
