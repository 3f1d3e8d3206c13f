"""numba_ce.kernel_cache: compiled PTX kept on disk, named by what it depends on."""
import pytest
from numba import cuda

from numba_ce import kernel_cache, kernels, rounding, scale_kernel
from helpers import run_offline


def made_text(calls, text="ptx text"):
    """A make() for cached_text that counts its calls in ``calls``."""
    def make():
        calls.append(text)
        return text
    return make


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_a_kernel_has_one_name_however_its_factory_is_asked():
    by_position = kernels.row_kernel("bfloat16", 4, True)
    by_keyword = kernels.row_kernel(fmt="bfloat16", pack=4, with_grad=True, capped=False)
    assert by_position.cache_name == by_keyword.cache_name == (
        "numba_ce.kernels.row_kernel(fmt='bfloat16', pack=4, with_grad=True, capped=False, "
        "smoothing=0, argmax=False, targets=0)")
    assert kernels.row_kernel("bfloat16", 4, True) is by_position  # made once
    names = {kernels.row_kernel("bfloat16", 4, True, argmax=True).cache_name,
             kernels.row_kernel("float16", 4, True).cache_name, by_position.cache_name,
             scale_kernel.scale_kernel("bfloat16", 4).cache_name,
             rounding.round_kernel("bfloat16").cache_name}
    assert len(names) == 5


def test_module_kernels_go_by_their_name_and_anonymous_closures_are_not_kept():
    assert kernel_cache.kernel_name(kernels.target_stats) == "numba_ce.kernels.target_stats"
    assert kernel_cache.kernel_name(scale_kernel.scale_kernel("float32", 2)) == (
        "numba_ce.scale_kernel.scale_kernel(fmt='float32', pack=2)")

    def factory(n):
        @cuda.jit
        def kernel(out):
            out[0] = n
        return kernel

    assert kernel_cache.kernel_name(factory(1)) is None


def test_text_is_made_once_and_then_read(cache_dir):
    calls = []
    assert kernel_cache.cached_text(("kernel a", "types"), made_text(calls)) == "ptx text"
    assert kernel_cache.cached_text(("kernel a", "types"), made_text(calls, "other")) == "ptx text"
    assert calls == ["ptx text"]
    [kept] = cache_dir.iterdir()
    assert kept.suffix == ".ptx" and kept.read_text() == "ptx text"


def test_each_part_names_its_own_file(cache_dir):
    calls = []
    for parts in [("a", "b"), ("a", "c"), ("ab",), ("a", "b", "")]:
        kernel_cache.cached_text(parts, made_text(calls, repr(parts)))
    assert len(calls) == 4 and len(list(cache_dir.iterdir())) == 4


def test_an_empty_cache_dir_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CE_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path)
    calls = []
    for _ in range(2):
        assert kernel_cache.cached_text(("a",), made_text(calls)) == "ptx text"
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_the_default_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_cache.directory() == tmp_path / "numba_ce"


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("NUMBA_CE_CACHE_DIR", str(blocker / "cache"))
    calls = []
    for _ in range(2):
        assert kernel_cache.cached_text(("a",), made_text(calls)) == "ptx text"
    assert len(calls) == 2


COMPILE_SCALE_KERNEL = """
import json
from numba import types
from numba_ce.inspection.compiler import compile_signature
from numba_ce.scale_kernel import scale_kernel
signature = (types.int32[:, ::1], types.float32[::1], types.int32)
print(json.dumps(compile_signature(scale_kernel("bfloat16", 2), signature, (9, 0))))
"""


def test_a_second_process_reads_what_the_first_compiled(cache_dir):
    """The GPU path's compile (launcher.compile_ptx) keeps its PTX, edits included, and the next
    process loads that file instead of compiling: a mark put in the file comes back."""
    ptx, entry = run_offline(COMPILE_SCALE_KERNEL)
    [kept] = cache_dir.iterdir()
    assert kept.read_text() == ptx and ".maxntid 1024, 1, 1" in ptx and entry in ptx
    kept.write_text(ptx + "// marked\n")
    assert run_offline(COMPILE_SCALE_KERNEL) == [ptx + "// marked\n", entry]
