"""``python -m numba_ce demo`` and ``check``, the commands the README starts with, run in the
simulator as a user runs them: a fresh interpreter without the test suite's warning filters,
RuntimeWarnings made errors, stderr clean. The simulator's NumPy scalars warn where the GPU's
float32 arithmetic silently gives +-inf, which the kernels count on: the demo used to print
such a warning on every run. (On a GPU, scripts/gpu runs both commands as steps of their own.)
Without NUMBA_ENABLE_CUDASIM and without a usable GPU, the commands choose the simulator
themselves; both end with a one-line verdict."""
import os
import re
import subprocess
import sys
import types

import pytest

import numba_ce.api
import numba_ce.demo
from numba_ce import devices
from numba_ce.__main__ import main
from numba_ce.demo import FAILED, PASSED
from numba_ce.portable import SIMULATOR

pytestmark = pytest.mark.skipif(not SIMULATOR, reason="simulator only: scripts/gpu runs check and "
                                "demo as steps of their own on a GPU")

COMMAND_LINES = {
    "demo": ["backend: ", "max |loss - reference| over ", "max |grad - reference| over ",
             "time for loss + gradient: "],
    "check": ["backend: ", "float32 ", "float16 ", "bfloat16 "],
}
SIMULATOR_CHOSEN = re.compile(
    r"no usable CUDA GPU \((.+)\): running in the CUDA simulator on the CPU")


def run_command(command, env):
    """The command's stdout lines, after checking that it exited 0 with nothing on stderr."""
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "numba_ce", command],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    printed = done.stdout.splitlines()
    for start in COMMAND_LINES[command]:
        assert any(line.startswith(start) for line in printed), (start, done.stdout)
    assert printed[-1] == PASSED, done.stdout
    assert "FAILED" not in done.stdout
    return printed


@pytest.mark.parametrize("command", COMMAND_LINES)
def test_command_runs_clean(command):
    printed = run_command(command, dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))
    assert not any(SIMULATOR_CHOSEN.fullmatch(line) for line in printed), printed


@pytest.mark.parametrize("command", COMMAND_LINES)
def test_command_without_a_gpu_chooses_the_simulator(command):
    """No NUMBA_ENABLE_CUDASIM and no GPU visible: one line says why, then the simulator runs,
    where the command used to end in a traceback asking for NUMBA_ENABLE_CUDASIM=1."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    printed = run_command(command, dict(env, CUDA_VISIBLE_DEVICES=""))
    assert SIMULATOR_CHOSEN.fullmatch(printed[0]), printed
    assert SIMULATOR_CHOSEN.fullmatch(printed[0]).group(1) in (
        "CuPy is not installed", "no CUDA GPU is visible")
    assert printed[1] == "backend: Numba CUDA simulator (CPU)", printed


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"numba_ce {numba_ce.__version__}\n"


@pytest.mark.parametrize("command", COMMAND_LINES)
def test_command_reports_a_disagreement(command, monkeypatch, capsys):
    """Kernels whose gradient is 5% off: the closing line says FAILED, the exit status is 1."""
    real = numba_ce.api.cross_entropy_with_grad

    def off(*args, **kwargs):
        res = real(*args, **kwargs)
        return res._replace(grad=res.grad * 1.05)

    monkeypatch.setattr(numba_ce.api, "cross_entropy_with_grad", off)
    monkeypatch.setattr(numba_ce.demo, "cross_entropy_with_grad", off)
    assert main([command]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == FAILED


@pytest.mark.parametrize("cupy, visible, reason", [
    (None, True, "CuPy is not installed"),
    (types.SimpleNamespace(), False, "no CUDA GPU is visible"),
])
def test_why_there_is_no_usable_gpu(monkeypatch, cupy, visible, reason):
    """The reason the commands give for the simulator, and the library's error in a process
    without it (which names the extras only where CuPy is missing)."""
    monkeypatch.setattr(devices, "SIMULATOR", False)
    monkeypatch.setattr(devices, "cupy", cupy)
    monkeypatch.setattr(devices, "cuda", types.SimpleNamespace(is_available=lambda: visible))
    assert devices.gpu_problem() == reason
    install = ("; pip install 'numba_ce[gpu]' for a CUDA 13 driver, 'numba_ce[gpu-cuda12]' for "
               "CUDA 12") if cupy is None else ""
    with pytest.raises(RuntimeError, match=re.escape(
            f"numba_ce needs a CUDA GPU with CuPy ({reason}{install}), or the CUDA simulator: to "
            "run on the CPU, set NUMBA_ENABLE_CUDASIM=1 before importing numba.")):
        devices.require_backend()
