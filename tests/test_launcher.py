"""numba_ce.launcher's stream override, which the torch adapter's launches go through: it nests,
restores what it replaced (also when one context object is entered twice) and belongs to the
thread that entered it (the autograd engine runs backward on its own threads)."""
import threading

from numba_ce import launcher


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
