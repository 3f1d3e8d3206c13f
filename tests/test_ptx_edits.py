"""numba_ce.ptx_edits and the instructions the GPU path counts on finding in the PTX it loads:
an edit that stops applying fails here, offline (no GPU)."""
import pytest

from numba_ce.ptx_edits import PtxEditFailed, with_max_threads
from helpers import run_offline

PTX = """\
.visible .entry kernel(
\t.param .u64 kernel_param_0,
\t.param .f32 kernel_param_1
)
{
\tret;
}
"""


def test_the_thread_bound_goes_between_the_parameters_and_the_body():
    assert with_max_threads(PTX, 512) == PTX.replace(")\n{", ")\n.maxntid 512, 1, 1\n{")


def test_an_edit_that_finds_nothing_to_change_raises():
    with pytest.raises(PtxEditFailed, match="no '.entry name"):
        with_max_threads(PTX.replace(".entry", ".func"))


COMPILE_LOSS_KERNEL = """
import json
from numba_ce.inspection import compiled
print(json.dumps(compiled("loss", "float32", "sm_90", (4, 8)).ptx))
"""


def test_the_loaded_ptx_has_the_ftz_exp2_and_the_thread_bound():
    """The loss kernel as the GPU path compiles it (launcher.compile_ptx): every exp2 is the
    flush-to-zero ex2 (portable.exp2) and the entry is bounded to 1024 threads (ptx_edits)."""
    ptx = run_offline(COMPILE_LOSS_KERNEL)
    assert "ex2.approx.ftz.f32" in ptx
    assert "ex2.approx.f32" not in ptx, "an exp2 with subnormal fix-ups"
    assert ptx.count(".maxntid 1024, 1, 1") == 1
