"""The backward scale kernel of the PyTorch adapter: grad *= upstream, rounded once, in place."""
import numpy as np
import pytest

from numba_ce.portable import SIMULATOR
from numba_ce.execution import scale_rows
from helpers import DTYPES, random_logits

pytestmark = pytest.mark.skipif(
    not SIMULATOR, reason="these tests hand the kernel NumPy buffers (read-only ones among them), "
    "which only the simulator runs on; on a GPU tests/test_torch_gpu.py covers the scale kernel")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [24, 23])  # 8-byte words, and one element a word
@pytest.mark.parametrize("per_row", [False, True])
def test_scale_matches_numpy_rounding(rng, dtype, n_classes, per_row):
    """Bit for bit what NumPy gives: decode to float32, multiply, round to nearest even."""
    grad = random_logits(rng, 3, n_classes, dtype, scale=0.1)
    upstream = (np.array([0.37, 1.0, -3.0]) if per_row else np.array([0.37])).astype(np.float32)
    expected = (grad.astype(np.float32) * upstream[:, None]).astype(grad.dtype)
    scale_rows(grad, dtype, upstream, per_row)
    assert (grad.view(np.uint8) == expected.view(np.uint8)).all()


@pytest.mark.parametrize("per_row", [False, True])
def test_upstream_of_one_writes_nothing(rng, per_row):
    """loss.backward() passes 1: the blocks return before touching the gradient (a read-only
    buffer would raise on any store)."""
    grad = random_logits(rng, 3, 24)
    grad.flags.writeable = False
    upstream = np.ones(3 if per_row else 1, np.float32)
    scale_rows(grad, "float32", upstream, per_row)


def test_a_store_into_read_only_memory_is_seen(rng):
    """The check above means something: a store into the read-only buffer does raise."""
    grad = random_logits(rng, 3, 24)
    grad.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        scale_rows(grad, "float32", np.full(1, 2.0, np.float32), False)
