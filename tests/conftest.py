"""Test set-up: without a GPU the suite runs in Numba's CUDA simulator; with one, on the GPU.

The backend is fixed when numba is first imported, so this runs before any test module.
Set NUMBA_CE_TEST_SEED to replay a run's random inputs (the seed is printed in the header and
above the summary's last lines). Set NUMBA_CE_TEST_LOG to a file to have each test's outcome and
duration appended to it as it starts and finishes (scripts/gpu: a run cut off by a time limit
still says which tests failed, which took the time and which never ended).
"""
import os
import sys
import time


def _gpu_present():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _gpu_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba.cuda" in sys.modules:
        raise RuntimeError("numba.cuda was imported before the test set-up: "
                           "run with NUMBA_ENABLE_CUDASIM=1 in the environment")
    if "numba.core.config" in sys.modules:  # a plugin imported numba's config: read it again
        sys.modules["numba.core.config"].reload_config()

# Simulated threads are Python threads: switch between them often so that barriers are cheap.
sys.setswitchinterval(5e-4)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from numba_ce import devices  # noqa: E402

SEED = int(os.environ.get("NUMBA_CE_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
# pytest-xdist's workers start after this runs in the main process and inherit its environment,
# so every worker draws from the seed that the summary prints.
os.environ["NUMBA_CE_TEST_SEED"] = str(SEED)


def pytest_report_header(config):
    return [f"numba_ce backend: {devices.backend_name()}", f"NUMBA_CE_TEST_SEED={SEED}"]


def pytest_terminal_summary(terminalreporter):
    """The seed again at the end of the report, where -q (no header) still shows it."""
    terminalreporter.write_line(f"replay these inputs with NUMBA_CE_TEST_SEED={SEED}")


def _test_log():
    """The file named by NUMBA_CE_TEST_LOG, in the process that reports (with pytest-xdist, the
    controller, for every worker), else None."""
    log = os.environ.get("NUMBA_CE_TEST_LOG")
    return None if not log or os.environ.get("PYTEST_XDIST_WORKER") else log


def _log_line(text):
    with open(_test_log(), "a") as file:
        file.write(f"{time.monotonic() - _STARTED:7.1f} s  {text}\n")


_STARTED = time.monotonic()


def pytest_runtest_logstart(nodeid, location):
    """With NUMBA_CE_TEST_LOG set: a line as a test starts (one that never ends hangs)."""
    if _test_log():
        _log_line(f"started  {nodeid}")


def pytest_runtest_logreport(report):
    """With NUMBA_CE_TEST_LOG set: a line for each test phase that failed and each finished
    test, with its duration; a failure's report follows its line."""
    if not _test_log():
        return
    if report.failed or report.when == "call" or (report.when == "setup" and report.skipped):
        phase = "" if report.when == "call" else f" ({report.when})"
        _log_line(f"{report.outcome:8} {report.nodeid}{phase} in {report.duration:.2f} s")
        if report.failed:
            with open(_test_log(), "a") as file:
                file.write(report.longreprtext[-3000:] + "\n")


@pytest.fixture
def rng(request):
    """A generator seeded from the run's seed and the test's name: fresh each run, replayable."""
    return np.random.default_rng([SEED, *request.node.nodeid.encode()])


@pytest.fixture
def torch_device():
    """The tensors a test makes (factories, modules) on the backend's device: CPU tensors in the
    simulator, CUDA tensors on a GPU, so that one test checks both."""
    import torch
    with torch.device("cpu" if devices.SIMULATOR else "cuda"):
        yield


@pytest.fixture(autouse=True)
def torch_seed(request):
    """torch's global generator seeded the same way, for tests that draw with torch.rand*."""
    if "torch" in sys.modules:
        seed = np.random.default_rng([SEED, *request.node.nodeid.encode(), 1]).integers(2**63)
        sys.modules["torch"].manual_seed(int(seed))
