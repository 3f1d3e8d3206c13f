"""numba_ce.integrations.transformers against transformers itself: the loss function against
transformers' ForCausalLMLoss. The labels have ignored (-100) positions at the start of one
sequence (a prompt) and the end of another (padding).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'numba_ce[transformers]')")

from transformers.loss.loss_utils import ForCausalLMLoss
from numba_ce.integrations.transformers import causal_lm_loss
from numba_ce.portable import SIMULATOR
from helpers import HALF_ULP, assert_close
from torch_helpers import from_torch

DEVICE = "cpu" if SIMULATOR else "cuda"
VOCAB = 96  # not a power of two
FLOAT32_LOSS = (1e-5, 1e-6)  # rtol, atol: the same float32 math summed in another order


def tokens_and_labels(batch, length, ignored):
    """Random tokens, and labels equal to them but -100 at the positions ``ignored`` (b, t)."""
    input_ids = torch.randint(0, VOCAB, (batch, length), device=DEVICE)
    labels = input_ids.clone()
    for b, t in ignored:
        labels[b, t] = -100
    return input_ids, labels


def prompt_and_padding(length):
    """A prompt of 3 ignored labels in sequence 0, padding of the last 4 in sequence 1."""
    return [(0, t) for t in range(3)] + [(1, t) for t in range(length - 4, length)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items_in_batch", [None, 13])
def test_causal_lm_loss_is_transformers_loss(dtype, num_items_in_batch):
    """Against ForCausalLMLoss (which upcasts to float32): the loss, and the gradient that
    reaches the logits in their dtype: rounded once by transformers; by numba_ce once for the
    mean, twice for a sum divided by num_items_in_batch (the kernel rounds the gradient of the
    sum, the backward rounds it as it divides)."""
    input_ids, labels = tokens_and_labels(2, 10, prompt_and_padding(10))
    logits = (3 * torch.randn(2, 10, VOCAB, device=DEVICE)).to(dtype)
    results = []
    for loss_function in (causal_lm_loss, ForCausalLMLoss):
        leaf = logits.clone().requires_grad_()
        loss = loss_function(leaf, labels, VOCAB, num_items_in_batch=num_items_in_batch)
        loss.backward()
        results.append((from_torch(loss), from_torch(leaf.grad)))
    (loss, grad), (expected_loss, expected_grad) = results
    assert_close(loss, expected_loss, *FLOAT32_LOSS, "loss")
    roundings = 2 if num_items_in_batch is None else 3
    rtol = roundings * HALF_ULP["bfloat16"] if dtype == torch.bfloat16 else 1e-5
    assert_close(grad, expected_grad, rtol, 1e-6 * np.abs(expected_grad).max(), "gradient")


def test_causal_lm_loss_takes_shift_labels_as_given():
    """Context parallelism passes labels already shifted: they are used as they are."""
    logits = torch.randn(2, 10, VOCAB, device=DEVICE)
    _, shift_labels = tokens_and_labels(2, 10, prompt_and_padding(10))
    loss = causal_lm_loss(logits, None, VOCAB, shift_labels=shift_labels)
    expected = ForCausalLMLoss(logits, None, VOCAB, shift_labels=shift_labels)
    assert_close(from_torch(loss), from_torch(expected), *FLOAT32_LOSS, "loss")
