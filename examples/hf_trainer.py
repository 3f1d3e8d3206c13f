"""Train a tiny Llama with the Hugging Face Trainer, its loss from numba_ce's fused linear
cross-entropy; the Trainer prints each step's loss:

    python examples/hf_trainer.py     # pip install 'numba_ce[transformers]'

A model built from a config (random weights: nothing is downloaded) learns random tokens whose
first 1 to 4 positions are masked out with -100 (as a prompt would be), one sequence a
micro-batch, with gradient accumulation over 4: the Trainer passes num_items_in_batch, the counted
tokens of all 4, so their summed gradients are those of one batch of the 4 sequences. Without a
GPU, numba_ce's kernels run in Numba's CUDA simulator on the CPU (slowly: a step takes seconds).
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # read when numba_ce first imports numba

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from numba_ce.integrations.transformers import patch_causal_lm  # noqa: E402

VOCAB, LENGTH, PROMPT = 96, 8, 4


def tiny_llama(seed=0):
    """A one-layer Llama of hidden size 32, randomly initialised from ``seed``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2))


def random_tokens(n_sequences, seed=0):
    """Sequences of LENGTH random tokens; the first 1 to PROMPT labels of each are -100."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_sequences):
        input_ids = torch.randint(0, VOCAB, (LENGTH,), generator=generator)
        labels = input_ids.clone()
        labels[:int(torch.randint(1, PROMPT + 1, (), generator=generator))] = -100
        samples.append(dict(input_ids=input_ids, labels=labels))
    return samples


def train(model, dataset, max_steps):
    """Trains ``model`` for ``max_steps`` optimizer steps; the loss logged at each."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=1,
            gradient_accumulation_steps=4, learning_rate=1e-2, logging_steps=1,
            save_strategy="no", report_to=[], disable_tqdm=True,
            use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main():
    model = tiny_llama()
    patch_causal_lm(model)
    train(model, random_tokens(16), max_steps=4)


if __name__ == "__main__":
    main()
