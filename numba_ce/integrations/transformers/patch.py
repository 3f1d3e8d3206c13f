"""patch_causal_lm(model): a loaded causal LM whose training calls with labels take their loss
from numba_ce's fused linear cross-entropy and never form the B x T x V logits.

What the patch is: an instance attribute ``model.forward`` (a :class:`FusedLossForward`) that
shadows the class's forward for that one model object; the class, and every other model of it,
keep theirs. ``unpatch_causal_lm(model)`` removes it (what ``model.forward`` was before comes
back); patching a patched model changes nothing. ``inspect.signature(model.forward)`` is the
original's, which the Trainer reads to keep the dataset's columns and to pass num_items_in_batch.

What a call does:

    model.training and labels given   the steps of the original forward with the loss moved
                                      before the head: the base model (model.model) with the same
                                      arguments, its last hidden states sliced by logits_to_keep,
                                      then causal_lm_linear_loss of them, lm_head.weight (and
                                      bias) and the config's final_logit_softcapping (Gemma 2),
                                      with the same keyword arguments (num_items_in_batch). The
                                      output is the original's class with that loss, logits None,
                                      and the base model's cache, hidden states and attentions
                                      (return_dict=False: the original's tuple, None in the
                                      logits' place).
    anything else                     the original forward, untouched (eval with labels, as
                                      Trainer.evaluate, keeps its logits for metrics; generation)

Why a forward and not only ``model.loss_function``: transformers' forward forms the logits before
it calls the loss function, so only a forward that stops at the hidden states saves their memory.
Why a list of classes: the fused path rewrites the original's last steps, so it is right only for
forwards known to be exactly "base model, slice, lm_head, optional softcap, loss"; a class that
adds to them (a router loss, a logit scale) or overrides them in a subclass is refused.
"""
import inspect

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers 5.17: its forwards slice in place, an int or 1-D positions
    def slice_logits_to_keep(hidden_states, logits_to_keep):
        positions = (slice(-logits_to_keep, None) if isinstance(logits_to_keep, int)
                     else logits_to_keep)
        return hidden_states[:, positions, :]

from .loss import causal_lm_linear_loss

# The forwards read line by line (transformers 5.25) and tested (tests/test_transformers.py, with
# 5.25 and 5.17).
SUPPORTED_FORWARDS = frozenset(f"{family}ForCausalLM.forward"
                               for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma2"))


def patch_causal_lm(model: torch.nn.Module) -> None:
    """Make ``model``'s training calls with labels compute their loss with
    :func:`numba_ce.torch.linear_cross_entropy` from the last hidden states, without logits
    (``outputs.logits`` is None there); every other call runs the original forward. Patching
    twice is patching once; :func:`unpatch_causal_lm` undoes it.

    Raises TypeError for a model whose forward is not one of :data:`SUPPORTED_FORWARDS` or whose
    ``lm_head`` is not a plain ``torch.nn.Linear`` (quantised or adapter-wrapped heads).
    """
    if isinstance(model.forward, FusedLossForward):
        return
    forward = type(model).forward.__qualname__
    if forward not in SUPPORTED_FORWARDS:
        raise TypeError(
            f"patch_causal_lm supports the forwards {', '.join(sorted(SUPPORTED_FORWARDS))} "
            f"(got {type(model).__name__}, whose forward is {forward})")
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear:
        raise TypeError("patch_causal_lm needs model.lm_head to be a torch.nn.Linear, whose "
                        f"weight gives the logits (got {type(head).__name__})")
    model.forward = FusedLossForward(model)


def unpatch_causal_lm(model: torch.nn.Module) -> None:
    """Give ``model`` back the forward it had before :func:`patch_causal_lm`; a model that is not
    patched is left as it is."""
    patched = vars(model).get("forward")
    if not isinstance(patched, FusedLossForward):
        return
    if patched.original_was_own:
        model.forward = patched.original
    else:
        del model.forward  # the class's forward again


class FusedLossForward:
    """``model.forward`` of a patched model (see the module docstring). Holds the model and the
    forward it replaced, both plain attributes, so that ``copy.deepcopy`` of the model gives a
    copy patched the same way (bound to the copy)."""

    def __init__(self, model):
        self.model = model
        self.original = model.forward  # the class's forward bound to model, or a replacement
        self.original_was_own = "forward" in vars(model)  # such as accelerate's hooks
        self.__wrapped__ = self.original  # inspect.signature reads the original's parameters

    def __call__(self, *args, **kwargs):
        arguments = inspect.signature(self.original).bind(*args, **kwargs).arguments
        if arguments.get("labels") is None or not self.model.training:
            return self.original(*args, **kwargs)
        labels = arguments.pop("labels")
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        kwargs = arguments.pop("kwargs", {})  # the originals' **kwargs
        return _forward_without_logits(self.model, labels, logits_to_keep, arguments, **kwargs)


def _forward_without_logits(model, labels, logits_to_keep, named_arguments, **kwargs):
    """The supported forwards' steps, the loss taken from the hidden states instead of the
    logits. ``named_arguments``: the call's named arguments for the base model; ``kwargs``: the
    rest, which the originals pass to both the base model and the loss function, less
    return_dict (the originals' can_return_tuple takes it, or the config's)."""
    return_dict = kwargs.pop("return_dict", None)
    outputs = model.model(**named_arguments, **kwargs)
    hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    head = model.lm_head
    loss = causal_lm_linear_loss(
        hidden_states, head.weight, labels, lm_head_bias=head.bias,
        softcap=getattr(model.config, "final_logit_softcapping", None), **kwargs)
    output = CausalLMOutputWithPast(loss=loss, **{name: value for name, value in outputs.items()
                                                  if name != "last_hidden_state"})
    if return_dict is None:
        return_dict = model.config.return_dict
    if return_dict:
        return output
    # the original's tuple (its fields that are not None) with the logits' place kept, None:
    # code that reads out[1] as the logits must not get the cache
    return (loss, None, *output.to_tuple()[1:])
