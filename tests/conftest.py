"""Test set-up: without a GPU the suite runs in Numba's CUDA simulator; with one, on the GPU.

The backend is fixed when numba is first imported, so this runs before any test module.
Set NUMBA_CE_TEST_SEED to replay a run's random inputs (the seed is printed in the header and
above the summary's last lines). Set NUMBA_CE_TEST_LOG to a file to have each test's outcome and
duration appended to it as it finishes (scripts/gpu: a run cut off by a time limit still says
which tests failed and which took the time).
"""
import os
import sys


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


def pytest_runtest_logreport(report):
    """With NUMBA_CE_TEST_LOG set: one line a test phase that failed, and one a finished test."""
    log = os.environ.get("NUMBA_CE_TEST_LOG")
    if not log or os.environ.get("PYTEST_XDIST_WORKER"):  # the controller writes for workers
        return
    if report.failed or report.when == "call" or (report.when == "setup" and report.skipped):
        with open(log, "a") as file:
            file.write(f"{report.outcome:8} {report.duration:8.2f} s  {report.nodeid}"
                       f"{'' if report.when == 'call' else f' ({report.when})'}\n")
            if report.failed:
                file.write(report.longreprtext[-3000:] + "\n")


@pytest.fixture
def rng(request):
    """A generator seeded from the run's seed and the test's name: fresh each run, replayable."""
    return np.random.default_rng([SEED, *request.node.nodeid.encode()])


@pytest.fixture(autouse=True)
def torch_seed(request):
    """torch's global generator seeded the same way, for tests that draw with torch.rand*."""
    if "torch" in sys.modules:
        seed = np.random.default_rng([SEED, *request.node.nodeid.encode(), 1]).integers(2**63)
        sys.modules["torch"].manual_seed(int(seed))
