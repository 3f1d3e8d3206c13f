"""numba_ce's cross-entropy in Hugging Face transformers' causal language models.

    from numba_ce.integrations.transformers import patch_causal_lm
    model = AutoModelForCausalLM.from_pretrained(...)   # Llama, Mistral, Qwen2, Qwen3, Gemma 2
    patch_causal_lm(model)   # training calls with labels: fused linear cross-entropy, no logits

    model.loss_function = causal_lm_loss   # or keep the logits: numba_ce's kernel as the loss

Both give transformers' loss (labels shifted, "mean" over the counted tokens, or the sum divided by
the Trainer's num_items_in_batch for exact gradient accumulation). See :mod:`.loss` and
:mod:`.patch`.
"""
try:
    import transformers  # noqa: F401  (the modules below need it: say how to install it first)
except ModuleNotFoundError as missing:
    if missing.name != "transformers":
        raise
    raise ModuleNotFoundError(
        "numba_ce.integrations.transformers needs Hugging Face transformers, which is not "
        "installed: pip install 'numba_ce[transformers]'", name="transformers") from missing

from .loss import causal_lm_linear_loss, causal_lm_loss
from .patch import patch_causal_lm, unpatch_causal_lm

__all__ = ["causal_lm_loss", "causal_lm_linear_loss", "patch_causal_lm", "unpatch_causal_lm"]
