"""``python -m numba_ce demo`` and ``check``, the commands the README starts with, run as a user
runs them: a fresh interpreter without the test suite's warning filters. In the simulator,
RuntimeWarnings are errors and stderr must stay clean: its NumPy scalars warn where the GPU's
float32 arithmetic silently gives +-inf, which the kernels count on (the demo used to print such
a warning on every run). On a GPU, libraries outside numba_ce may warn at import: there the
commands must succeed and print their report."""
import os
import subprocess
import sys

import pytest

from numba_ce.portable import SIMULATOR


def run_module(*args):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if SIMULATOR else "0")
    strict = ["-W", "error::RuntimeWarning"] if SIMULATOR else []
    return subprocess.run([sys.executable, *strict, "-m", "numba_ce", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("command, lines", [
    ("demo", ["backend: ", "max |loss - reference| over ", "max |grad - reference| over ",
              "time for loss + gradient: "]),
    ("check", ["float32 ", "float16 ", "bfloat16 ", "backend: "]),
])
def test_command_runs_clean(command, lines):
    done = run_module(command)
    assert done.returncode == 0, done.stdout + done.stderr
    if SIMULATOR:
        assert done.stderr == "", done.stderr
    printed = done.stdout.splitlines()
    for start in lines:
        assert any(line.startswith(start) for line in printed), (start, done.stdout)
    assert "FAILED" not in done.stdout
