"""transformers' causal-LM loss, computed by numba_ce.torch.

    causal_lm_loss         logits (B, T, V) -> loss: a drop-in for transformers' ForCausalLMLoss
                           (model.loss_function = causal_lm_loss), through numba_ce's fused kernel
    causal_lm_linear_loss  hidden states (B, T, H) and the head's weight (V, H) -> the same loss
                           through numba_ce's linear cross-entropy: no B x T x V logits are stored
                           (patch_causal_lm's forward calls it)

Both score position t against labels[t + 1] (the last position is ignored), as transformers does,
unless the caller passes shift_labels, and both reduce as its ``fixed_cross_entropy``: the mean
over the counted tokens, or, when num_items_in_batch is given, the sum divided by it. The Trainer
passes the number of counted tokens of all the micro-batches of one optimizer step, so the
gradients summed over a gradient-accumulation step are those of one batch of all its tokens; a
mean per micro-batch would weigh the tokens of a micro-batch with fewer of them more
(Liger-Kernel issue 802).

No upcast: numba_ce reads fp32, fp16 and bf16 logits as they are and its math is fp32 either way.
The gradient reaches bf16 or fp16 logits rounded once for the mean, as through transformers'
``logits.float()``, and twice for the sum divided by num_items_in_batch: the kernel rounds the
gradient of the sum, the backward rounds it again as it divides (within 1.5 ulp of transformers').
"""
from functools import partial

import torch
import torch.nn.functional as F

import numba_ce.torch as nce


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None,
                   ignore_index: int = -100, shift_labels: torch.Tensor | None = None,
                   **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (same signature) on numba_ce's fused kernel.

    Parameters
    ----------
    logits : (B, T, V) tensor, float32, float16 or bfloat16 (V = ``vocab_size``).
    labels : (B, T) int tensor, or None when ``shift_labels`` is given.
    num_items_in_batch : counted tokens to divide the summed loss by (the Trainer's); None: mean.
    ignore_index : label of positions that count for nothing.
    shift_labels : (B, T) labels already aligned with the logits (context parallelism).
    kwargs : the model's other keyword arguments, ignored (transformers passes them all).
    """
    targets = _next_token_targets(labels, shift_labels, ignore_index).to(logits.device)
    return _token_mean(partial(nce.cross_entropy, logits.reshape(-1, vocab_size), targets,
                               ignore_index=ignore_index), num_items_in_batch)


def causal_lm_linear_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor,
                          labels: torch.Tensor | None, *,
                          lm_head_bias: torch.Tensor | None = None,
                          softcap: float | None = None,
                          num_items_in_batch: torch.Tensor | int | None = None,
                          ignore_index: int = -100, shift_labels: torch.Tensor | None = None,
                          **kwargs) -> torch.Tensor:
    """:func:`causal_lm_loss` of the logits ``hidden_states @ lm_head_weight.T + lm_head_bias``
    (capped by ``softcap``: Gemma 2's final_logit_softcapping), computed by
    :func:`numba_ce.torch.linear_cross_entropy` without storing them.

    Parameters
    ----------
    hidden_states : (B, T, H) tensor, the model's last hidden states (or (N, H) rows).
    lm_head_weight : (V, H) tensor. lm_head_bias : (V,) tensor or None.
    softcap : float or None: logits x become softcap * tanh(x / softcap) before the loss.
    labels, num_items_in_batch, ignore_index, shift_labels, kwargs : as :func:`causal_lm_loss`.
    """
    targets = _next_token_targets(labels, shift_labels, ignore_index).to(hidden_states.device)
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    return _token_mean(partial(nce.linear_cross_entropy, rows, lm_head_weight, targets,
                               linear_bias=lm_head_bias, ignore_index=ignore_index,
                               softcap=softcap), num_items_in_batch)


def _next_token_targets(labels, shift_labels, ignore_index):
    """(B * T,) targets: ``shift_labels`` as given, else labels[t + 1] for position t and
    ``ignore_index`` for the last position (which has no next token)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _token_mean(loss, num_items_in_batch):
    """``loss(reduction=...)`` averaged over the counted tokens: of this call ("mean"), or of the
    whole accumulated batch (its "sum" divided by ``num_items_in_batch``)."""
    if num_items_in_batch is None:
        return loss(reduction="mean")
    total = loss(reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
