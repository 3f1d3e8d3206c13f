"""numba_ce.integrations.transformers against transformers itself: tiny randomly initialised
causal LMs built from configs (nothing downloaded), each patched copy checked against the same
weights unpatched, and the loss function against transformers' ForCausalLMLoss. The labels have
ignored (-100) positions at the start of one sequence (a prompt) and the end of another (padding).
"""
import copy
import importlib.util
import inspect
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'numba_ce[transformers]')")

from transformers.loss.loss_utils import ForCausalLMLoss
from numba_ce.integrations.transformers import (causal_lm_loss, patch_causal_lm,
                                                unpatch_causal_lm)
from numba_ce.portable import SIMULATOR
from helpers import HALF_ULP, assert_close
from torch_helpers import from_torch

DEVICE = "cpu" if SIMULATOR else "cuda"
ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 96  # not a power of two
# Small enough for the simulator (a 2 x 10 batch is 20 rows of 96 classes: about a second), with
# weights large enough (initializer_range) that the softmax is far from uniform.
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2)
# Gemma 2's cap of 2 bends its logits (up to about 6 here) far more than the tolerances.
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {}),
    "gemma2": (transformers.Gemma2Config, dict(final_logit_softcapping=2.0)),
}
LOSS_TOLERANCE = (1e-5, 1e-6)  # rtol, atol: float32, the same math summed in another order
# rtol, and atol relative to the model's largest gradient entry: some gradients are rounding noise
# only (k_proj's bias: adding it shifts all of a query's scores alike, which the softmax ignores)
GRAD_TOLERANCE = (1e-5, 1e-6)


def tiny_model(family, dtype=torch.float32):
    config_class, options = FAMILIES[family]
    model = transformers.AutoModelForCausalLM.from_config(config_class(**TINY, **options))
    return model.to(DEVICE, dtype).train()


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


def assert_same_gradients(model, reference, unpatched=None):
    """Every parameter's gradient of ``model`` as ``reference``'s, worst element reported; with
    ``unpatched`` (transformers' own loss, the gradients reached another way, as ``model``'s
    were), each parameter may also be twice as far off as that one is."""
    expected = {name: from_torch(p.grad) for name, p in reference.named_parameters()}
    theirs = {} if unpatched is None else {
        name: from_torch(p.grad) for name, p in unpatched.named_parameters()}
    rtol, atol = GRAD_TOLERANCE
    atol *= max(np.abs(grad).max() for grad in expected.values())
    for name, parameter in model.named_parameters():
        their_error = np.abs(theirs[name] - expected[name]).max() if theirs else 0.0
        assert_close(from_torch(parameter.grad), expected[name], rtol, atol + 2 * their_error,
                     f"gradient of {name}")


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
    assert_close(loss, expected_loss, *LOSS_TOLERANCE, "loss")
    roundings = 2 if num_items_in_batch is None else 3
    rtol = roundings * HALF_ULP["bfloat16"] if dtype == torch.bfloat16 else 1e-5
    assert_close(grad, expected_grad, rtol, 1e-6 * np.abs(expected_grad).max(), "gradient")


def test_causal_lm_loss_takes_shift_labels_as_given():
    """Context parallelism passes labels already shifted: they are used as they are."""
    logits = torch.randn(2, 10, VOCAB, device=DEVICE)
    _, shift_labels = tokens_and_labels(2, 10, prompt_and_padding(10))
    loss = causal_lm_loss(logits, None, VOCAB, shift_labels=shift_labels)
    expected = ForCausalLMLoss(logits, None, VOCAB, shift_labels=shift_labels)
    assert_close(from_torch(loss), from_torch(expected), *LOSS_TOLERANCE, "loss")


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_gradient_match_the_unpatched_model(family):
    reference = tiny_model(family)
    model = copy.deepcopy(reference)
    patch_causal_lm(model)
    input_ids, labels = tokens_and_labels(2, 10, prompt_and_padding(10))

    output = model(input_ids=input_ids, labels=labels)
    expected = reference(input_ids=input_ids, labels=labels)
    output.loss.backward()
    expected.loss.backward()

    assert output.logits is None, "the fused path formed the logits"
    assert_close(from_torch(output.loss), from_torch(expected.loss), *LOSS_TOLERANCE, "loss")
    assert_same_gradients(model, reference)


def test_a_bf16_model_is_as_close_to_float32_as_unpatched():
    """A bf16 Llama's gradients carry bf16 rounding through every layer's backward (about 1% of
    the largest entry here, in transformers' own too), so patched and unpatched bf16 may be two
    such errors apart: each of ours is checked against the float32 model's instead, within twice
    transformers' bf16 error of that parameter. The losses come from the same bf16 logits."""
    reference = tiny_model("llama", torch.bfloat16)
    model, float32 = copy.deepcopy(reference), copy.deepcopy(reference).float()
    patch_causal_lm(model)
    input_ids, labels = tokens_and_labels(2, 10, prompt_and_padding(10))
    losses = []
    for m in (model, reference, float32):
        loss = m(input_ids=input_ids, labels=labels).loss
        loss.backward()
        losses.append(from_torch(loss))
    assert_close(losses[0], losses[1], 2.0**-8, 0.0, "loss vs unpatched bf16")

    exact = {name: from_torch(p.grad) for name, p in float32.named_parameters()}
    theirs = {name: from_torch(p.grad) for name, p in reference.named_parameters()}
    scale = max(np.abs(grad).max() for grad in exact.values())
    for name, parameter in model.named_parameters():
        their_error = np.abs(theirs[name] - exact[name]).max()
        assert_close(from_torch(parameter.grad), exact[name], 0.0,
                     2 * their_error + 1e-6 * scale, f"gradient of {name} vs float32")


def test_gemma2s_cap_is_applied():
    """The softcap the Gemma 2 case checks bends its logits: leaving it out would fail there."""
    model = tiny_model("gemma2")
    input_ids, _ = tokens_and_labels(2, 10, [])
    with torch.no_grad():
        capped = model(input_ids=input_ids).logits
        uncapped = model.lm_head(model.model(input_ids=input_ids).last_hidden_state)
    assert (capped - uncapped).abs().max() > 1.0


@pytest.mark.parametrize("how", ["patch_causal_lm", "loss_function"])
def test_gradient_accumulation_equals_one_batch(how):
    """4 micro-batches with 0, 3, 7 and 14 ignored labels of 16, each loss divided by the
    counted tokens of all 4 (num_items_in_batch, counted as the Trainer does: labels[..., 1:]),
    their gradients summed: the loss and gradients of the one batch of all 4 (Liger-Kernel issue
    802: a mean per micro-batch weighs the micro-batch with 2 counted tokens most). Summed over
    micro-batches, float32 gradients differ from the one batch's by rounding (on a GPU up to
    ~2e-6 of the largest entry), as transformers' own accumulated gradients do: that much more
    is allowed; a wrong weighting is off by a good fraction of the gradient."""
    reference = tiny_model("llama")
    model, unpatched = copy.deepcopy(reference), copy.deepcopy(reference)
    if how == "patch_causal_lm":
        patch_causal_lm(model)
    else:
        model.loss_function = causal_lm_loss
    ignored = [[], [(0, 1), (1, 0), (1, 7)], [(0, t) for t in range(7)], [(b, t) for b in range(2)
                                                                          for t in range(7)]]
    micro_batches = [tokens_and_labels(2, 8, positions) for positions in ignored]
    num_items_in_batch = sum((labels[..., 1:] != -100).sum() for _, labels in micro_batches)

    def accumulate(m):
        """The micro-batches' losses summed, their gradients accumulated in ``m``."""
        total = 0.0
        for input_ids, labels in micro_batches:
            loss = m(input_ids=input_ids, labels=labels, num_items_in_batch=num_items_in_batch).loss
            loss.backward()
            total = total + loss.detach()
        return total

    accumulated_loss = accumulate(model)
    accumulate(unpatched)
    one_batch = reference(input_ids=torch.cat([ids for ids, _ in micro_batches]),
                          labels=torch.cat([labels for _, labels in micro_batches]))
    one_batch.loss.backward()

    assert_close(from_torch(accumulated_loss), from_torch(one_batch.loss), *LOSS_TOLERANCE, "loss")
    assert_same_gradients(model, reference, unpatched)


def test_calls_without_labels_or_in_eval_mode_run_the_original_forward():
    reference = tiny_model("gemma2")
    model = copy.deepcopy(reference)
    patch_causal_lm(model)
    input_ids, labels = tokens_and_labels(2, 10, prompt_and_padding(10))
    assert torch.equal(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)
    model.eval()
    reference.eval()
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels)
        expected = reference(input_ids=input_ids, labels=labels)
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.loss, expected.loss)


@pytest.mark.parametrize("use_cache", [False, True])
def test_the_fused_path_returns_the_originals_tuple_for_return_dict_false(use_cache):
    """The original's tuple, (loss, logits, past_key_values) with a cache: the same places, the
    logits' holding None (ModelOutput.to_tuple would drop it, and out[1] would be the cache)."""
    reference = tiny_model("llama")
    model = copy.deepcopy(reference)
    patch_causal_lm(model)
    input_ids, labels = tokens_and_labels(1, 6, [])
    output = model(input_ids, labels=labels, use_cache=use_cache, return_dict=False)
    expected = reference(input_ids, labels=labels, use_cache=use_cache, return_dict=False)
    assert isinstance(output, tuple) and len(output) == len(expected) == 2 + use_cache
    assert output[1] is None and expected[1].shape == (1, 6, VOCAB)
    assert [type(part) for part in output[2:]] == [type(part) for part in expected[2:]]
    assert torch.allclose(output[0], expected[0], rtol=1e-5)


def test_patching_twice_is_patching_once_and_unpatching_restores_the_forward():
    model = tiny_model("qwen3")
    signature = inspect.signature(model.forward)
    patch_causal_lm(model)
    patched = model.forward
    patch_causal_lm(model)
    assert model.forward is patched
    assert inspect.signature(model.forward) == signature  # what the Trainer reads
    copied = copy.deepcopy(model)
    assert copied.forward.model is copied and copied.forward.original.__self__ is copied

    unpatch_causal_lm(model)
    assert "forward" not in vars(model)
    unpatch_causal_lm(model)  # not patched: nothing to do
    input_ids, labels = tokens_and_labels(1, 6, [])
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_unsupported_models_are_refused():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(TypeError, match=r"supports the forwards .* \(got GPT2LMHeadModel, "
                                        r"whose forward is GPT2LMHeadModel.forward\)"):
        patch_causal_lm(transformers.GPT2LMHeadModel(config))
    model = tiny_model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match=r"lm_head to be a torch.nn.Linear.*\(got Sequential\)"):
        patch_causal_lm(model)


def test_the_trainer_example_trains_as_without_the_patch():
    """examples/hf_trainer.py's Trainer, 2 steps of 4 accumulated micro-batches: the same logged
    losses patched and unpatched. The Trainer finds the patched forward's parameters (it keeps
    the dataset's columns and passes num_items_in_batch by them), and the second step's loss
    shows that the first step's gradients were the same."""
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples/hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    dataset = example.random_tokens(8)
    patched = example.tiny_llama()
    patch_causal_lm(patched)
    losses = example.train(patched, dataset, max_steps=2)
    expected = example.train(example.tiny_llama(), dataset, max_steps=2)
    assert len(losses) == 2
    assert_close(np.array(losses), np.array(expected), *LOSS_TOLERANCE, "logged losses")
