"""The code style setup.cfg configures ([flake8]), checked with the suite so CI enforces it."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flake8_reports_nothing():
    # the GPU machine's scripts/gpu installs no linters; scripts/setup-env test does
    pytest.importorskip("flake8",
                        reason="flake8 is not installed (scripts/setup-env test installs it)")
    done = subprocess.run([sys.executable, "-m", "flake8", "numba_ce", "tests", "bench",
                           "examples"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"flake8:\n{done.stdout}{done.stderr}"
