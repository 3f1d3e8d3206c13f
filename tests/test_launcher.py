"""numba_ce.launcher's stream override, which the torch adapter's launches go through: it nests,
restores what it replaced (also when one context object is entered twice) and belongs to the
thread that entered it (the autograd engine runs backward on its own threads); on a GPU, a launch
from a thread that CUDA has not run on yet."""
import threading

import numpy as np
import pytest

from numba_ce import devices, execution, launcher


def chosen():
    """The override in force on this thread, or None (then launches follow CuPy's stream)."""
    return getattr(launcher._chosen, "stream", None)


def test_on_stream_nests_and_restores():
    outer, inner = launcher.on_stream(0, 11), launcher.on_stream(1, 22)
    assert chosen() is None
    with outer:
        assert launcher.current_stream() == (0, 11)
        with inner:
            with inner:  # the same object twice
                assert launcher.current_stream() == (1, 22)
            assert launcher.current_stream() == (1, 22)
        assert launcher.current_stream() == (0, 11)
    assert chosen() is None


def test_on_stream_is_per_thread():
    seen = []
    with launcher.on_stream(0, 11):
        worker = threading.Thread(target=lambda: seen.append(chosen()))
        worker.start()
        worker.join()
        assert launcher.current_stream() == (0, 11)
    assert seen == [None]


def test_on_stream_restores_after_an_exception():
    try:
        with launcher.on_stream(0, 11):
            raise KeyError("inside")
    except KeyError:
        pass
    assert chosen() is None


@pytest.mark.gpu
@pytest.mark.skipif(not devices.gpu_available(), reason="needs a CUDA GPU and CuPy")
def test_a_launch_from_a_thread_cuda_has_not_run_on(rng):
    """torch's autograd device thread may run a backward whose first CUDA call is numba_ce's
    launch (the adapter's scaling, on torch's stream): no context is current on that thread
    yet, and the launch must bind the device's own."""
    from cupy_backends.cuda.api import driver

    cupy = devices.cupy
    grad = cupy.asarray(rng.standard_normal((3, 40)).astype(np.float32))
    upstream = cupy.asarray(np.float32([2.5]))
    expected = grad.get() * np.float32(2.5)
    device_id = cupy.cuda.Device().id
    seen = []

    def backward_like():
        seen.append(driver.ctxGetCurrent())
        try:
            with launcher.on_stream(device_id, 0):  # the legacy default stream, as torch's
                execution.scale_rows(grad, "float32", upstream, False)
        except Exception as exc:  # re-raised on the test's thread
            seen.append(exc)

    worker = threading.Thread(target=backward_like)
    worker.start()
    worker.join()
    assert seen[0] == 0, "the new thread already had a current context: nothing is tested"
    if len(seen) > 1:
        raise seen[1]
    cupy.cuda.Device().synchronize()
    assert np.array_equal(grad.get(), expected)
