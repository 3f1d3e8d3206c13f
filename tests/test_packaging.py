"""What a user installing the package meets first: the extras that errors name."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_torch_adapter_without_torch_names_the_torch_extra():
    """`import numba_ce.torch` where torch cannot be imported (a None in sys.modules stands for
    a missing package)."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; import numba_ce.torch"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "ModuleNotFoundError: numba_ce.torch needs PyTorch, which is not installed: "
        "pip install 'numba_ce[torch]'")
