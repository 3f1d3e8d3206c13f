"""What is measured: the shapes, the loss options, the modes, and the input tensors of a shape.

Nothing here imports torch at module level, so that :mod:`bench.table` and :mod:`bench.plot`
can use the case lists on a machine without it.
"""
import argparse
import dataclasses
import itertools

IGNORE_INDEX = -100
GRAD_ACCUM_STEPS = 8  # "accum" mode backpropagates loss / 8: an upstream gradient of 1/8

MODES = {
    "loss": "loss only, no gradient (torch.no_grad, or numba_ce.cross_entropy)",
    "fwd_bwd": "loss and gradient of the logits: loss.backward(), what a training step runs",
    "accum": f"as fwd_bwd with (loss / {GRAD_ACCUM_STEPS}).backward(): gradient accumulation",
}

DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}  # name -> bytes per element


@dataclasses.dataclass(frozen=True)
class Options:
    """Loss options of a case; every provider maps them onto its own arguments."""
    name: str
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    ignore_fraction: float = 0.0  # this share of rows gets target = IGNORE_INDEX
    argmax_outputs: bool = False  # also token accuracy and predicted tokens (numba_ce only)


OPTIONS = {o.name: o for o in (
    Options("plain"),
    Options("smooth_z", label_smoothing=0.1, z_loss=1e-4),
    Options("ignore30", ignore_fraction=0.3),
    Options("softcap", softcap=30.0),
    Options("outputs", argmax_outputs=True),
)}

# (N, V, dtype): Llama-2, Llama-3, Gemma and Qwen-2 vocabularies; fp32 once, at the Llama-3 shape.
MAIN_CASES = (
    (4096, 32000, "bf16"),
    (8192, 128256, "bf16"),
    (4096, 256000, "bf16"),
    (16384, 151936, "bf16"),
    (8192, 128256, "fp32"),
)
QUICK_CASES = MAIN_CASES[:2]
# The V sweep for the plot: fused forward + backward only, bf16, plain options.
SWEEP_N = 4096
SWEEP_V = (8192, 32768, 65536, 131072, 262144)
SWEEP_DTYPE, SWEEP_OPTIONS, SWEEP_MODES = "bf16", "plain", ("fwd_bwd",)
# --smoke: small enough for the CUDA simulator on a CPU, where a call costs about 0.3 s whatever
# the shape; every mode with plain options, fwd_bwd alone with the others.
SMOKE_CASE = (8, 128, "bf16")
SMOKE_OTHER_MODES = ("fwd_bwd",)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One shape, dtype and option set, measured in each of ``modes`` by every provider."""
    n: int
    v: int
    dtype: str
    options: Options
    modes: tuple
    sweep: bool = False  # part of the V sweep (torch.compile skips these)

    @property
    def shape(self):
        return f"{self.n}x{self.v}"


def parse_shape(text):
    """'4096x32000' -> (4096, 32000)."""
    try:
        n, v = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a shape is written NxV, e.g. 4096x32000 (got {text!r})") from None
    return n, v


def names_argument(known):
    """An argparse type: a comma-separated list of names from ``known``."""
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {sorted(known)}")
        return names
    return parse


def shapes_argument(text):
    """An argparse type: comma-separated NxV shapes, as (N, V) pairs."""
    try:
        return [parse_shape(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def plan(shapes=None, dtypes=None, options=None, modes=None, sweep=True, quick=False,
         smoke=False):
    """The specs of one run, grouped by (N, V, dtype) so that each input is made once.

    ``shapes``: (N, V) pairs to run instead of the main cases (each in ``dtypes``, default bf16,
    and no sweep); ``dtypes``, ``options``, ``modes``: names to keep; ``quick``: two main shapes,
    plain options, no sweep; ``smoke``: the one tiny simulator case.
    """
    options = options or (["plain"] if quick else list(OPTIONS))
    modes = tuple(m for m in MODES if not modes or m in modes)
    if smoke:
        other_modes = tuple(m for m in modes if m in SMOKE_OTHER_MODES)
        specs = [Spec(*SMOKE_CASE, OPTIONS[o], modes if o == "plain" else other_modes)
                 for o in options]
        return [s for s in specs if s.modes]
    if shapes:
        cases, sweep = [(n, v, d) for n, v in shapes for d in (dtypes or ["bf16"])], False
    else:
        cases = list(QUICK_CASES if quick else MAIN_CASES)
        sweep = sweep and not quick
    specs = [Spec(n, v, d, OPTIONS[o], modes) for (n, v, d), o in itertools.product(cases, options)
             if not dtypes or d in dtypes]
    if sweep and SWEEP_OPTIONS in options and (not dtypes or SWEEP_DTYPE in dtypes):
        sweep_modes = tuple(m for m in SWEEP_MODES if m in modes)
        specs += [Spec(SWEEP_N, v, SWEEP_DTYPE, OPTIONS[SWEEP_OPTIONS], sweep_modes, sweep=True)
                  for v in SWEEP_V if (SWEEP_N, v, SWEEP_DTYPE) not in cases]
    return [s for s in specs if s.modes]


class Inputs:
    """Random logits (N, V) of one dtype on one device, and targets per option set.

    ``logits`` is what providers read; ``restore()`` copies the untouched ``pristine`` values back
    after a provider wrote its gradient into the logits (Liger, numba_ce in-place).
    """

    def __init__(self, n, v, dtype, device, seed=0):
        import torch
        self.n, self.v = n, v
        self.generator = torch.Generator(device=device).manual_seed(seed)
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        # std 2: the softmax is neither uniform nor one-hot, as for a trained language model
        self.pristine = torch.randn(n, v, generator=self.generator, device=device,
                                    dtype=torch_dtype).mul_(2)
        self.logits = self.pristine.clone()
        self._targets = {}

    def target(self, options):
        """int64 (N,) class indices; ``options.ignore_fraction`` of the rows, at random, ignored."""
        import torch
        fraction = options.ignore_fraction
        if fraction not in self._targets:
            device = self.pristine.device
            target = torch.randint(0, self.v, (self.n,), generator=self.generator, device=device)
            order = torch.rand(self.n, generator=self.generator, device=device).argsort()
            target[order[:round(fraction * self.n)]] = IGNORE_INDEX  # a random share of rows
            self._targets[fraction] = target
        return self._targets[fraction]

    def restore(self):
        self.logits.copy_(self.pristine)
