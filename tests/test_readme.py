"""The README's quick starts run as written (they allocate 2 GB on a GPU, so the GPU only), but
for the one that downloads a model."""
import pathlib
import re

import pytest

from numba_ce.portable import SIMULATOR
from helpers import INDUCTOR_WARNINGS

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="the quick starts use CuPy and CUDA tensors")
@pytest.mark.parametrize("index", [
    pytest.param(i, marks=INDUCTOR_WARNINGS if "torch.compile" in block else ())
    for i, block in enumerate(BLOCKS)])
def test_quick_start_runs(index):
    if "from_pretrained(" in BLOCKS[index]:
        pytest.skip("downloads a model (examples/hf_trainer.py, which the suite runs, builds one)")
    namespace = {}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    loss = namespace["loss"]
    loss = loss.detach() if hasattr(loss, "detach") else loss  # a torch loss requires grad
    assert float(loss) > 0
