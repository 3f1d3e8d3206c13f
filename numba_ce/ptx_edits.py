"""The edits numba_ce makes to the PTX that Numba compiles, before the GPU path loads it: one.

``.maxntid MAX_THREADS, 1, 1`` on the kernel's entry (numba_ce.limits): every launch has at most
1024 threads a block, so ptxas keeps to 65536 / 1024 = 64 registers a thread and 1024 threads
(two blocks of 512, or one of 1024) fit a multiprocessor.

numba-cuda can say this itself (``cuda.compile_ptx(..., launch_bounds=1024)``, as NVVM IR
metadata), but then NVVM also optimises with the bound, and its PTX differs (numba-cuda 0.30.4,
NVVM 13.0): fewer registers in most specialisations, more local memory in a few, the plain fused
kernels among them (bench/NOTES.md). The directive alone tells ptxas and leaves NVVM's code as
it is; changing that is a measurement to make on a GPU.

An edit raises :class:`PtxEditFailed` where it finds nothing to change, so that PTX of another
shape fails at compile time instead of going unedited; tests/test_ptx_edits.py compiles a kernel
offline and checks that the directive is there.
"""
import re

from .limits import MAX_THREADS


class PtxEditFailed(RuntimeError):
    """The PTX does not have the form an edit expects."""


def with_max_threads(ptx, max_threads=MAX_THREADS):
    """``ptx`` with ``.maxntid max_threads, 1, 1`` between its entry's parameter list and body."""
    edited, count = _ENTRY_BODY.subn(rf"\1.maxntid {max_threads}, 1, 1\n{{", ptx, count=1)
    if count != 1:
        raise PtxEditFailed("found no '.entry name(...) {' to put .maxntid before: the PTX that "
                            "Numba compiles has changed form")
    return edited


_ENTRY_BODY = re.compile(r"(\.entry\s[^{]*\)\s*)\{")
