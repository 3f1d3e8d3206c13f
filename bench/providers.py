"""The implementations compared, one class each. A provider turns (mode, inputs, target, options)
into a :class:`bench.harness.Step`; one that cannot run here says why in ``unavailable()``.

All of them read the same torch tensors: numba_ce's array API through zero-copy CuPy (or, in the
simulator, NumPy) views, on torch's current stream.
"""
import importlib.util

import numpy as np
import torch
import torch.nn.functional as F

from .cases import GRAD_ACCUM_STEPS, IGNORE_INDEX, MODES
from .harness import Step

COMPILE_OPTIONS = ("plain",)  # torch.compile compiles per shape and option set: bound its cost


def torch_loss(logits, target, options):
    """Mean cross-entropy with the options in plain PyTorch ops: the eager provider, what
    torch.compile compiles, and (on fp32 logits) the reference of the loss check. z-loss as in
    Liger and flash-attn: z * lse**2 averaged over the rows that are not ignored."""
    x = logits
    if options.softcap is not None:
        x = options.softcap * torch.tanh(x / options.softcap)
    loss = F.cross_entropy(x, target, ignore_index=IGNORE_INDEX,
                           label_smoothing=options.label_smoothing)
    if options.z_loss:
        kept = target != IGNORE_INDEX
        lse = torch.logsumexp(x, dim=-1).float()
        loss = loss + options.z_loss * (lse.square() * kept).sum() / kept.sum()
    return loss


def autograd_step(loss_fn, inputs, target, mode):
    """The Step of a differentiable ``loss_fn(logits, target)`` on torch tensors."""
    x = inputs.logits.detach().requires_grad_(mode != "loss")  # a fresh leaf on the same memory
    if mode == "loss":
        def run():
            with torch.no_grad():
                return loss_fn(x, target)
        return Step(run)

    def run():
        loss = loss_fn(x, target)
        (loss if mode == "fwd_bwd" else loss / GRAD_ACCUM_STEPS).backward()
        return loss.detach()

    def reset():
        x.grad = None

    return Step(run, reset)


def _reason(exc):
    return f"{type(exc).__name__}: {exc}"


def _import_problem(module, label):
    """None when ``module`` imports, else why not."""
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{label} does not import ({_reason(exc)})"
    return None


class Provider:
    """Base: every mode, every case, always available."""
    name = ""
    modes = tuple(MODES)
    smoke_default = False  # run by --smoke unless --providers says otherwise
    argmax_outputs = False  # whether it returns token accuracy and predicted tokens

    def unavailable(self):
        """None, or why this provider cannot run here."""
        return None

    def applies(self, spec):
        return self.argmax_outputs or not spec.options.argmax_outputs

    def step(self, mode, inputs, target, options):
        raise NotImplementedError


class NumbaArrays(Provider):
    """numba_ce.cross_entropy / cross_entropy_with_grad on CuPy views of the torch tensors, on
    torch's current stream (NumPy views of CPU tensors in the simulator). Not in place.
    ``baseline``: (package name, label) of an earlier numba_ce loaded by bench.baseline, timed
    beside this one as provider ``numba_ce-cupy@label``."""
    smoke_default = True
    argmax_outputs = True

    def __init__(self, simulator, validate, baseline=None):
        self.simulator, self.validate = simulator, validate
        self.package, label = baseline or ("numba_ce", None)
        self.name = ("numba_ce-numpy" if simulator else "numba_ce-cupy") + (
            "" if validate else "-novalidate") + (f"@{label}" if label else "")
        self.argmax_outputs = baseline is None  # an earlier numba_ce may not have them

    def unavailable(self):
        devices = f"{self.package}.devices"
        problem = _import_problem(devices, self.package)
        if problem or self.simulator:
            return problem
        return None if importlib.import_module(devices).gpu_available() else (
            "needs CuPy and a GPU")

    def step(self, mode, inputs, target, options):
        numba_ce = importlib.import_module(self.package)
        xp = np if self.simulator else importlib.import_module("cupy")
        logits, target = array_view(xp, inputs.logits), array_view(xp, target)
        kwargs = dict(ignore_index=IGNORE_INDEX, label_smoothing=options.label_smoothing,
                      z_loss=options.z_loss, softcap=options.softcap, validate=self.validate)
        outputs = dict(return_token_accuracy=True, return_predicted_tokens=True) if (
            options.argmax_outputs) else {}  # (an earlier numba_ce may not take them)
        if mode == "loss" and not options.argmax_outputs:
            def call():
                return numba_ce.cross_entropy(logits, target, **kwargs)
        else:  # (the loss-only entry point has no argmax outputs: the gradient's in "loss")
            grad_output = 1.0 / GRAD_ACCUM_STEPS if mode == "accum" else None

            def call():
                return numba_ce.cross_entropy_with_grad(logits, target, grad_output=grad_output,
                                                        **kwargs, **outputs).loss
        if self.simulator:
            return Step(call)
        from numba_ce.torch.tensors import cupy_stream
        stream = cupy_stream(inputs.logits.device)

        def run():
            with stream:
                return call()
        return Step(run)


def array_view(xp, tensor):
    """A NumPy or CuPy array sharing ``tensor``'s memory; bf16 through its 16-bit pattern
    (neither library reads torch's bf16 type), as an ml_dtypes.bfloat16 array."""
    if tensor.dtype != torch.bfloat16:
        return xp.asarray(tensor)
    import ml_dtypes
    return xp.asarray(tensor.view(torch.int16)).view(ml_dtypes.bfloat16)


class NumbaTorch(Provider):
    """The PyTorch adapter numba_ce.torch.cross_entropy: one fused kernel computes loss and
    gradient in the forward; backward scales the saved gradient. ``inplace``: the gradient
    overwrites the logits (inplace_backward=True), as Liger always does. CUDA tensors, or CPU
    tensors in the simulator. ``plain_only``: the main shapes with plain options alone (the
    adapter without the target check, next to the default, shows what the check's host read
    costs where host time dominates)."""

    def __init__(self, validate, inplace, plain_only=False):
        self.validate, self.inplace, self.plain_only = validate, inplace, plain_only
        self.name = "numba_ce-torch" + ("-inplace" if inplace else "") + (
            "" if validate else "-novalidate")
        if inplace:  # loss-only calls are the same as without inplace
            self.modes = tuple(m for m in MODES if m != "loss")

    def unavailable(self):
        return _import_problem("numba_ce.torch", "numba_ce.torch")

    argmax_outputs = True

    def applies(self, spec):
        return super().applies(spec) and (
            not self.plain_only or (not spec.sweep and spec.options.name == "plain"))

    def step(self, mode, inputs, target, options):
        nce = importlib.import_module("numba_ce.torch")
        outputs = dict(return_token_accuracy=True, return_predicted_tokens=True) if (
            options.argmax_outputs) else {}

        def loss_fn(x, t):
            if self.inplace and x.requires_grad:  # a model's logits, not the leaf they are here
                x = _ComputedLogits.apply(x)
            loss = nce.cross_entropy(x, t, ignore_index=IGNORE_INDEX,
                                     label_smoothing=options.label_smoothing,
                                     z_loss=options.z_loss, softcap=options.softcap,
                                     inplace_backward=self.inplace, validate=self.validate,
                                     **outputs)
            return loss.loss if outputs else loss
        return autograd_step(loss_fn, inputs, target, mode)


class _ComputedLogits(torch.autograd.Function):
    """The benchmark's leaf logits as a model hands its logits over: the same memory, not a leaf
    (inplace_backward=True refuses a leaf that requires grad, which it would overwrite), at the
    cost of an identity's autograd node and no copy."""

    @staticmethod
    def forward(ctx, logits):
        return logits.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


class TorchEager(Provider):
    """torch.nn.functional.cross_entropy (plus softcap and z-loss in torch ops), eager."""
    name = "torch-eager"
    smoke_default = True

    def step(self, mode, inputs, target, options):
        return autograd_step(lambda x, t: torch_loss(x, t, options), inputs, target, mode)


class TorchCompile(Provider):
    """torch.compile(dynamic=False) of the eager function: main shapes, COMPILE_OPTIONS only.
    One compilation per shape and option set, and one more for loss-only (no-grad) calls; the
    first call of each, where it compiles, is reported as first_ms."""
    name = "torch-compile"

    def __init__(self, simulator):
        self.simulator = simulator
        self._key, self._compiled = None, None

    def unavailable(self):
        if self.simulator:
            return "GPU only (Inductor on the CPU compiles C++ for minutes)"
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        return None

    def applies(self, spec):
        return not spec.sweep and spec.options.name in COMPILE_OPTIONS

    def step(self, mode, inputs, target, options):
        key = (tuple(inputs.logits.shape), inputs.logits.dtype, options)
        if key != self._key:
            torch._dynamo.reset()  # drop the previous shape's graphs: no recompile limit reached

            def loss_fn(x, t):
                return torch_loss(x, t, options)
            self._key, self._compiled = key, torch.compile(loss_fn, dynamic=False)
        return autograd_step(self._compiled, inputs, target, mode)


class Liger(Provider):
    """Liger-Kernel's liger_cross_entropy (Triton): computes the gradient in the forward and
    writes it into the logits; backward multiplies it by grad_output unless that is 1."""
    name = "liger"

    def __init__(self, simulator):
        self.simulator = simulator

    def unavailable(self):
        if self.simulator:
            return "GPU only"
        return _import_problem("liger_kernel.transformers.functional", "liger-kernel")

    def step(self, mode, inputs, target, options):
        from liger_kernel.transformers.functional import liger_cross_entropy

        def loss_fn(x, t):
            return liger_cross_entropy(x, t, ignore_index=IGNORE_INDEX,
                                       label_smoothing=options.label_smoothing,
                                       lse_square_scale=options.z_loss, softcap=options.softcap)
        return autograd_step(loss_fn, inputs, target, mode)


class Quack(Provider):
    """quack-kernels (CuTe DSL; scripts/quack-wheels brings it to a GPU machine). ``autograd``
    False: its one kernel that writes each row's loss and gradient (``cross_entropy_fwd(...,
    return_dx=True)``: the fused kernel's job, beside numba_ce-cupy); True: its autograd
    ``cross_entropy`` (a forward kernel, then a backward kernel that reads the logits again,
    beside numba_ce-torch). quack has ignore_index and class weights, not label smoothing, z-loss
    or softcap: the cases with those are not its."""

    def __init__(self, simulator, autograd):
        self.simulator, self.autograd = simulator, autograd
        self.name = "quack-torch" if autograd else "quack"

    def unavailable(self):
        if self.simulator:
            return "GPU only"
        return _import_problem("quack.cross_entropy", "quack-kernels")

    def applies(self, spec):
        options = spec.options
        return (options.label_smoothing == 0 and options.z_loss == 0 and options.softcap is None
                and not options.argmax_outputs)

    def step(self, mode, inputs, target, options):
        from quack.cross_entropy import cross_entropy, cross_entropy_fwd
        if self.autograd:
            return autograd_step(lambda x, t: cross_entropy(x, t, ignore_index=IGNORE_INDEX),
                                 inputs, target, mode)
        x, counted = inputs.logits, (target != IGNORE_INDEX).sum()

        def run():  # the rows' losses (and gradients), then their mean as the others report it
            returned = cross_entropy_fwd(x, target, ignore_index=IGNORE_INDEX,
                                         return_dx=mode != "loss")
            row_loss = returned[0] if mode != "loss" else returned
            return row_loss.sum() / counted
        return Step(run)


def all_providers(simulator, validate=True, baseline=None):
    """Every provider, in the order of the results table; ``baseline``: (package, label) of an
    earlier numba_ce (bench.baseline) to time beside the working tree's."""
    return [
        NumbaArrays(simulator, validate),
        *([NumbaArrays(simulator, validate, baseline)] if baseline else []),
        NumbaTorch(validate, inplace=False),
        NumbaTorch(validate, inplace=True),
        *([NumbaTorch(False, inplace=False, plain_only=True)] if validate else []),
        TorchEager(),
        TorchCompile(simulator),
        Liger(simulator),
        Quack(simulator, autograd=False),
        Quack(simulator, autograd=True),
    ]


def reference_loss(inputs, target, options):
    """The loss of the untouched logits in fp32 torch ops, for checking every provider's."""
    with torch.no_grad():
        return float(torch_loss(inputs.pristine.float(), target, options))
