"""Compiled kernels kept on disk, so that a machine compiles each kernel once, not every process.

Numba compiles a row kernel specialisation in seconds (typing, LLVM, NVVM); a program, or each
worker of a parallel test run, would otherwise pay that again for every specialisation it
launches. The GPU path (numba_ce.launcher) keeps the PTX it loads in one file a
(kernel, argument types, compute capability), under

    $NUMBA_CE_CACHE_DIR       when set (empty: keep nothing on disk)
    $XDG_CACHE_HOME/numba_ce  else, or ~/.cache/numba_ce

The driver keeps its own translation of that PTX to machine code (~/.nv/ComputeCache). A file's
name is a hash of everything its PTX depends on: the kernel's name (its module, factory and the
factory's arguments: :func:`kernel_factory`), the argument types, the compute capability, the
source of every numba_ce module, and the versions of Python, Numba and numba-cuda; so an edit to
any module or an upgrade compiles afresh, and stale files are never read. Not in the name: the
CUDA toolkit's NVVM, which Numba does not report; after changing it, empty the folder. Kernels
made by a factory without :func:`kernel_factory` (their name says ``<locals>``) are never kept,
as their name does not tell them apart.

Files are written whole (a temporary file renamed over the name), so processes compiling the same
kernel at once each write a complete file and readers never see a partial one. A cache that
cannot be read or written is skipped: it only saves time.
"""
import functools
import hashlib
import inspect
import os
import pathlib
import sys
import tempfile

import numba

PACKAGE = pathlib.Path(__file__).resolve().parent


def kernel_factory(make):
    """Decorator of a function returning a Numba kernel for its (hashable) arguments: made once
    for each set of arguments (as functools.lru_cache), and named for the on-disk cache by the
    arguments' values, defaults included, so that one kernel has one name however it is asked
    for."""
    parameters = inspect.signature(make)

    @functools.lru_cache(maxsize=None)
    @functools.wraps(make)
    def factory(*args, **kwargs):
        bound = parameters.bind(*args, **kwargs)
        bound.apply_defaults()
        kernel = make(*args, **kwargs)
        arguments = ", ".join(f"{name}={value!r}" for name, value in bound.arguments.items())
        kernel.cache_name = f"{make.__module__}.{make.__qualname__}({arguments})"
        return kernel

    return factory


def kernel_name(kernel):
    """The name the on-disk cache knows ``kernel`` (a Numba dispatcher) by, or None if it
    cannot be told apart from other kernels made by the same code."""
    name = getattr(kernel, "cache_name", None)
    if name is not None:
        return name
    function = kernel.py_func
    return None if "<locals>" in function.__qualname__ else (
        f"{function.__module__}.{function.__qualname__}")


def directory():
    """Where the files go, or None when the cache is off (NUMBA_CE_CACHE_DIR set empty)."""
    chosen = os.environ.get("NUMBA_CE_CACHE_DIR")
    if chosen is not None:
        return pathlib.Path(chosen) if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "numba_ce"


def cached_text(parts, make, suffix=".ptx"):
    """The text kept for ``parts`` (strings naming what it depends on, beyond numba_ce's source
    and the compilers' versions), else ``make()``, kept for the next time."""
    folder = directory()
    if folder is None:
        return make()
    path = folder / (_digest(parts) + suffix)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        pass
    text = make()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as file:
            file.write(text)
        os.replace(file.name, path)
    except OSError:
        pass
    return text


def _digest(parts):
    digest = hashlib.sha256(_environment().encode())
    for part in parts:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _environment():
    """The versions and numba_ce's source, as one string's hash."""
    digest = hashlib.sha256()
    for module in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(module.relative_to(PACKAGE)).encode() + b"\0" + module.read_bytes())
    import numba_cuda
    return repr((sys.version, numba.__version__, numba_cuda.__version__)) + digest.hexdigest()
