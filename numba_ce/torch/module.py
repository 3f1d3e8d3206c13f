"""The module forms: ``CrossEntropyLoss`` of :func:`numba_ce.torch.cross_entropy`,
``LinearCrossEntropyLoss`` of :func:`numba_ce.torch.linear_cross_entropy` and
``VocabParallelCrossEntropyLoss`` of :func:`numba_ce.torch.vocab_parallel_cross_entropy`."""
from dataclasses import fields

import torch

from .. import validation
from ..linear import check_memory
from ..options import Options, check_flag
from ..vocab_parallel import check_n_classes, check_smoothing_style, check_vocab_start
from ..results import CrossEntropyOutput
from . import collectives, forms, linear_forms
from .functional import cross_entropy
from .linear import linear_cross_entropy
from .vocab_parallel import vocab_parallel_cross_entropy

OPTION_NAMES = tuple(field.name for field in fields(Options))


class _LossOptions:
    """The fields of an Options as attributes of the module, as torch's loss modules keep theirs
    (``crit.reduction``), checked when the module is built: bad options fail where they were
    written, not at the first call."""

    def _keep(self, options):
        for name in OPTION_NAMES:
            setattr(self, name, getattr(options, name))

    def _options(self):
        """The keyword arguments of the entry point, from the attributes."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    def _describe(self):
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in OPTION_NAMES)


class CrossEntropyLoss(_LossOptions, torch.nn.Module):
    """As :class:`torch.nn.CrossEntropyLoss` (the same positional parameters and legacy
    ``size_average`` / ``reduce``, which set ``self.reduction`` by torch's rule and warning; the
    class weights are a buffer, so they follow ``.to(device)`` and the state dict), plus z-loss,
    softcap, in-place backward, the target check and the outputs of
    :func:`numba_ce.torch.cross_entropy`, keyword-only; ``crit(input, target)`` calls it with
    these options.
    """

    weight: torch.Tensor | None  # a buffer

    def __init__(self, weight: torch.Tensor | None = None, size_average: bool | None = None,
                 ignore_index: int = -100, reduce: bool | None = None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: float | None = None, inplace_backward: bool = False,
                 return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, validate: bool = True) -> None:
        super().__init__()
        reduction = forms.reduction_of(size_average, reduce, reduction)
        self._keep(Options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                           return_token_accuracy, return_predicted_tokens))
        self.inplace_backward = check_flag("inplace_backward", inplace_backward)
        self.return_z_loss = check_flag("return_z_loss", return_z_loss)
        self.validate = check_flag("validate", validate)
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
        return cross_entropy(input, target, self.weight, **self._options(),
                             inplace_backward=self.inplace_backward,
                             return_z_loss=self.return_z_loss, validate=self.validate)

    def extra_repr(self):
        return (f"{self._describe()}, inplace_backward={self.inplace_backward}, "
                f"return_z_loss={self.return_z_loss}")


class LinearCrossEntropyLoss(_LossOptions, torch.nn.Module):
    """As :class:`torch.nn.LinearCrossEntropyLoss` (torch 2.13): owns the head ``self.linear``
    (an nn.Linear from ``in_features`` to ``num_classes``) and returns the cross-entropy of its
    logits, ``crit(input, target)``, through :func:`numba_ce.torch.linear_cross_entropy`; plus
    z-loss, softcap, chunk_size, memory (the design), the target check and the outputs of that
    function (``return_z_loss``: (loss, z_loss), as CrossEntropyLoss). torch's
    ignore_index=None, options and out_features=() are taken as that function and
    numba_ce.torch.linear_forms take them."""

    weight: torch.Tensor | None  # a buffer

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, reduction: str = "mean",
                 weight: torch.Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0,
                 options: linear_forms.TorchOptions | None = None,
                 z_loss: float = 0.0, softcap: float | None = None,
                 chunk_size: int | None = None, memory: str = "low",
                 return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, validate: bool = True) -> None:
        super().__init__()
        linear_forms.check_out_features(out_features)
        self._keep(Options(linear_forms.ignore_index_of(ignore_index), reduction,
                           label_smoothing, z_loss, softcap, return_token_accuracy,
                           return_predicted_tokens))
        validation.check_chunk_size(chunk_size)
        if options is not None:
            linear_forms.check_options(options, chunk_size)
        check_memory(memory)
        self.chunk_size, self.memory, self.options = chunk_size, memory, options
        self.return_z_loss = check_flag("return_z_loss", return_z_loss)
        self.validate = check_flag("validate", validate)
        self.num_classes, self.out_features = num_classes, out_features  # torch's attributes
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            **self._options(), options=self.options, chunk_size=self.chunk_size,
            memory=self.memory, return_z_loss=self.return_z_loss, validate=self.validate)

    def extra_repr(self):
        return (f"{self._describe()}, chunk_size={self.chunk_size}, memory={self.memory!r}, "
                f"return_z_loss={self.return_z_loss}"
                + ("" if self.options is None else f", options={self.options!r}"))


class VocabParallelCrossEntropyLoss(torch.nn.Module):
    """:func:`numba_ce.torch.vocab_parallel_cross_entropy` as a module: ``crit(local_logits,
    target)`` with the options given here (checked here: bad options fail where they were
    written). ``weight``, this rank's slice of the class weights, is a buffer, as
    CrossEntropyLoss's. With ``vocab_start`` None the slices' sizes are exchanged at the first
    call of each slice size and kept, with V: with ``validate=False`` a call then reads nothing
    back from the device."""

    weight: torch.Tensor | None  # a buffer

    def __init__(self, group: torch.distributed.ProcessGroup | None = None,
                 vocab_start: int | None = None, weight: torch.Tensor | None = None,
                 ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, n_classes: int | None = None,
                 label_smoothing_style: str = "torch",
                 z_loss: float = 0.0, softcap: float | None = None,
                 inplace_backward: bool = False, return_z_loss: bool = False,
                 validate: bool = True) -> None:
        super().__init__()
        options = Options(ignore_index, reduction, label_smoothing, z_loss, softcap)
        check_smoothing_style(label_smoothing_style)
        if vocab_start is not None:
            check_vocab_start(vocab_start, 0)
        if n_classes is not None:
            check_n_classes(n_classes)
        self.group, self.vocab_start, self.n_classes = group, vocab_start, n_classes
        self.options = {"ignore_index": options.ignore_index, "reduction": options.reduction,
                        "label_smoothing": options.label_smoothing,
                        "label_smoothing_style": label_smoothing_style,
                        "z_loss": options.z_loss, "softcap": options.softcap,
                        "inplace_backward": check_flag("inplace_backward", inplace_backward),
                        "return_z_loss": check_flag("return_z_loss", return_z_loss),
                        "validate": check_flag("validate", validate)}
        self.register_buffer("weight", weight)
        self._found: dict[int, collectives.SliceBounds] = {}  # {slice size: its bounds}

    def forward(self, local_logits: torch.Tensor, target: torch.Tensor
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        start, n_classes = self._bounds(local_logits, target)
        return vocab_parallel_cross_entropy(local_logits, target, group=self.group,
                                            vocab_start=start, n_classes=n_classes,
                                            weight=self.weight, **self.options)

    def _bounds(self, local_logits, target):
        """(vocab_start, n_classes) as given, or found by the first call with this slice size
        (the slices' sizes exchanged once, not every call)."""
        n_columns = local_logits.shape[-1]
        if self.vocab_start is not None:
            return self.vocab_start, self.n_classes
        if n_columns not in self._found:
            self._found[n_columns] = collectives.slice_bounds(
                self.group, n_columns, target.numel(), None, self.n_classes,
                local_logits.device)
        return self._found[n_columns]

    def extra_repr(self):
        return f"vocab_start={self.vocab_start}, n_classes={self.n_classes}, " + ", ".join(
            f"{name}={value!r}" for name, value in self.options.items())
