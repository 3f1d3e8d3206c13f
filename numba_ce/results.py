"""The result types of :func:`numba_ce.cross_entropy_with_grad` and of the linear variant."""
from typing import Any, NamedTuple

# A NumPy or CuPy array (in the simulator NumPy only): the public API takes and returns either.
Array = Any


class CrossEntropyResult(NamedTuple):
    """loss: float32, 0-d ("mean"/"sum") or (N,) ("none").  grad: like the logits.
    z_loss: the z-loss part of ``loss``, reduced the same way.
    lse: float32 (N,), 0 for ignored rows.
    token_accuracy: with return_token_accuracy, the share of counted rows whose argmax is their
    target, reduced as the loss (float32; per row 1 or 0 for "none"), else None.
    predicted_tokens: with return_predicted_tokens, each row's argmax (int64 (N,), -1 for
    ignored rows), else None."""
    loss: Any
    grad: Any
    z_loss: Any
    lse: Any
    token_accuracy: Any = None
    predicted_tokens: Any = None


class CrossEntropyOutput(NamedTuple):
    """What numba_ce.torch.cross_entropy returns with return_token_accuracy or
    return_predicted_tokens (as Liger-Kernel's): each field None unless asked."""
    loss: Any
    z_loss: Any = None
    token_accuracy: Any = None
    predicted_tokens: Any = None


def returned_fields(options):
    """The buffers.RowOutputs fields that :func:`returned` gives back as (loss, z_loss,
    token_accuracy): the reduced values, or the per-row ones for "none"."""
    return (("loss", "z_loss", "token_accuracy") if options.reduced
            else ("row_loss", "row_z", "row_correct"))


def returned(outputs, options):
    """(loss, z_loss, token_accuracy, predicted_tokens) of a call's buffers.RowOutputs: 0-d
    views of the reduced values, or the per-row ones for "none"; the last two None unless the
    options ask for them."""
    loss, z_part, accuracy = (getattr(outputs, name) for name in returned_fields(options))
    if not options.return_token_accuracy:
        accuracy = None
    if options.reduced:
        loss, z_part = loss.reshape(()), z_part.reshape(())
        accuracy = None if accuracy is None else accuracy.reshape(())
    predicted = outputs.predicted if options.return_predicted_tokens else None
    return loss, z_part, accuracy, predicted


class LinearCrossEntropyResult(NamedTuple):
    """The result of :func:`numba_ce.linear_cross_entropy_with_grad`. loss, z_loss,
    token_accuracy and predicted_tokens as in CrossEntropyResult; each gradient has the shape
    and dtype of what it differentiates (None for an absent bias, or one not asked for)."""
    loss: Any
    grad_input: Any
    grad_linear_weight: Any
    grad_linear_bias: Any
    z_loss: Any
    token_accuracy: Any = None
    predicted_tokens: Any = None
