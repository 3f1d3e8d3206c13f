"""The teaching variants against the float64 reference, and WALKTHROUGH.md's code run as tests."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from numba_ce import reference, teaching
from helpers import assert_close, random_logits, random_target

ROOT = pathlib.Path(__file__).resolve().parents[1]
WALKTHROUGH = pathlib.Path(teaching.__file__).with_name("WALKTHROUGH.md")


def step_name(step):
    return step.__name__.rsplit(".", 1)[1]


# V above the simulator's 32 threads (each thread strides over the row) and below it (idle
# threads take part in the reductions with empty partial results).
@pytest.mark.parametrize("n_rows,n_classes", [(3, 67), (2, 5)])
@pytest.mark.parametrize("step", teaching.STEPS, ids=step_name)
def test_step_matches_reference(rng, step, n_rows, n_classes):
    logits = random_logits(rng, n_rows, n_classes)
    target = random_target(rng, n_rows, n_classes)
    loss, grad = step.cross_entropy_with_grad(logits, target)
    expected = reference.cross_entropy_with_grad(logits, target)
    assert_close(loss, expected.loss, 2e-5, 1e-6, f"{step_name(step)} loss")
    assert_close(grad, expected.grad, 2e-5, 1e-6 * np.abs(expected.grad).max(),
                 f"{step_name(step)} grad")


def test_each_step_moves_fewer_bytes():
    assert [step.DRAM_ARRAYS for step in teaching.STEPS] == [4, 3, 2]


def test_teaching_variants_take_fp32_logits_only(rng):
    with pytest.raises(ValueError, match="float32 logits"):
        teaching.naive.cross_entropy_with_grad(random_logits(rng, 2, 5, "float16"), [0, 1])


# The simulator does not type the kernels, so float64 creeping into them would go unseen there:
# compile the teaching kernels for sm_90 in a process without the simulator.
COMPILE_TEACHING_KERNELS = """
import numba
import numpy as np
from numba_ce.inspection.compiler import compile_signature
from numba_ce.teaching import naive, online

rows, row_values, targets = (numba.typeof(np.zeros(shape, dtype)) for shape, dtype in
                             [((2, 2), np.float32), (2, np.float32), (2, np.int64)])
for kernel, signature in [
        (naive.row_max, (rows, row_values)), (naive.row_lse, (rows, row_values, row_values)),
        (naive.gradient, (rows, targets, row_values, numba.float32, row_values, rows)),
        (online.row_lse, (rows, row_values))]:
    ptx, _ = compile_signature(kernel, signature, (9, 0))
    doubles = [line for line in ptx.splitlines() if ".f64" in line]
    assert not doubles, f"{kernel.__name__}: float64 in its PTX: {doubles[:3]}"
print("compiled")
"""


def test_teaching_kernels_compile_for_sm90_without_float64():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", COMPILE_TEACHING_KERNELS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stdout + done.stderr


def code_blocks(language):
    """The fenced code blocks of WALKTHROUGH.md in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", WALKTHROUGH.read_text(), re.M | re.S)


def test_walkthrough_python_blocks_run():
    blocks = code_blocks("python")
    assert len(blocks) >= 8, f"expected the walkthrough's python blocks, found {len(blocks)}"
    namespace = {"__name__": "walkthrough"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"WALKTHROUGH.md python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"WALKTHROUGH.md python block {number} failed: {error!r}\n{block}") from error


def test_walkthrough_quotes_lines_that_are_in_the_code():
    blocks = code_blocks("py")
    assert blocks, "expected the walkthrough's quotes of the kernels"
    for block in blocks:
        first, *lines = block.splitlines()
        path = ROOT / first.removeprefix("# ")
        assert path.is_file(), f"a py block must start with '# <file>' (got {first!r})"
        source = {line.strip() for line in path.read_text().splitlines()}
        missing = [line.strip() for line in lines if line.strip() not in source]
        assert not missing, (f"WALKTHROUGH.md quotes lines that are no longer in {first[2:]}: "
                             f"{missing}; update the quote")
