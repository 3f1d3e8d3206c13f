"""One training step of a Hugging Face Llama (forward + backward, bf16), its loss computed by
transformers itself, by numba_ce's patch (fused linear cross-entropy, no logits) and by
Liger-Kernel's patch (its fused linear cross-entropy only), side by side in one run.

    python -m bench.hf_step [--layers 8 --hidden 512 --vocab 128256 --batch 8 --length 1024]
                            [--out DIR]
    python -m bench.hf_step --smoke             # CPU: a tiny model in the CUDA simulator

The default model has ~155M parameters, two thirds of them in the embedding and the head of a
Llama-3 vocabulary: the size at which the logits (N x V, N = batch x length tokens) dominate a
step's memory. Each provider trains its own copy of one randomly initialised model on the same
tokens (a tenth of the labels -100, as padding). Per provider: ms of a step (CUDA events, p20 /
p50 / p80, harness.measure_side_by_side), peak extra memory of a step (torch's allocator and
CuPy's pool, including the parameter gradients the step leaves), and the loss, which must agree
with transformers' to 1e-2. Rows are appended to bench/results/hf_step.csv (and OUT/bench/).
"""
import copy

from . import harness, results
from .report import Report, platform, run_timed, step_arguments

MEASUREMENT = ("provider", "params_m", "layers", "hidden", "vocab", "batch", "length", "reps",
               "ms_p20", "ms_p50", "ms_p80", "first_ms", "peak_extra_mb", "loss",
               "loss_rel_err")
COLUMNS = results.ENVIRONMENT + MEASUREMENT
LOSS_TOLERANCE = 1e-2  # relative to transformers' own loss (bf16 logits round it to 2^-9)
SMOKE_SHAPE = dict(layers=1, hidden=32, vocab=96, batch=2, length=8)


def parse_args(argv):
    return step_arguments(
        argv, "hf_step", __doc__, dict(layers=8, hidden=512, vocab=128256, batch=8, length=1024),
        SMOKE_SHAPE, "CPU only: a tiny float32 model in the CUDA simulator, wall-clock timing; "
        "writes only under --out (default: a temp dir)")


def llama(torch, args, dtype, device):
    """A randomly initialised Llama of the asked size (seed 0), in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=args.length)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def tokens(torch, args, device):
    """(input_ids, labels): random tokens, a tenth of the labels -100."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = -100
    return input_ids.to(device), labels.to(device)


def patched_by_numba_ce(model):
    from numba_ce.integrations.transformers import patch_causal_lm
    patch_causal_lm(model)
    return model


def patched_by_liger(model):
    """Liger's fused linear cross-entropy on this model alone (its other kernels left out, so
    that the step differs by the loss only); refused if Liger patched the class instead, which
    would change every other provider's model too."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    original = type(model).forward
    apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                rms_norm=False, swiglu=False, model=model)
    if type(model).forward is not original:
        type(model).forward = original
        raise RuntimeError("Liger patched LlamaForCausalLM itself, not this model: it would "
                           "change the other providers' models (undone)")
    return model


PROVIDERS = {"transformers": lambda model: model, "numba_ce-patch": patched_by_numba_ce,
             "liger-patch": patched_by_liger}


def training_step(model, input_ids, labels):
    """A harness Step: the model's loss with labels, backward; the parameters' gradients are
    dropped before each call."""
    def run():
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        return loss.detach()

    def reset():
        model.zero_grad(set_to_none=True)

    return harness.Step(run, reset)


def main(argv=None):
    args = parse_args(argv)
    torch, device, dtype = platform(args.smoke)
    report = Report("hf_step", args.out, args.smoke, torch)
    say, env = report.say, report.env
    base = llama(torch, args, dtype, device)
    params_m = sum(p.numel() for p in base.parameters()) / 1e6
    input_ids, labels = tokens(torch, args, device)
    say(f"Llama {params_m:.4g}M parameters ({args.layers} layers, hidden {args.hidden}, vocab "
        f"{args.vocab}), {args.batch} x {args.length} tokens, {dtype}")

    steps, problems = {}, {}
    for name, patch in PROVIDERS.items():
        try:
            steps[name] = training_step(patch(copy.deepcopy(base)), input_ids, labels)
        except Exception as exc:  # e.g. Liger not installed: the others still run
            problems[name] = exc
    timer = harness.WallTimer() if args.smoke else harness.CudaTimer(torch)
    repetitions = harness.SMOKE if args.smoke else harness.FULL
    timings = {**harness.measure_side_by_side(steps, timer, repetitions), **problems}

    rows, reference = [], timings.get("transformers")
    for name, timing in timings.items():
        if isinstance(timing, Exception):
            say(f"{name:>16}: skipped ({type(timing).__name__}: {timing})")
            continue
        peak = None if args.smoke else harness.peak_extra_bytes(steps[name], torch)
        error = (abs(timing.loss - reference.loss) / abs(reference.loss)
                 if isinstance(reference, harness.Timing) else float("nan"))
        rows.append(dict(env, provider=name, params_m=f"{params_m:.4g}", layers=args.layers,
                         hidden=args.hidden, vocab=args.vocab, batch=args.batch,
                         length=args.length, reps=timing.reps, ms_p20=f"{timing.ms[0]:.3f}",
                         ms_p50=f"{timing.ms[1]:.3f}", ms_p80=f"{timing.ms[2]:.3f}",
                         first_ms=f"{timing.first_ms:.1f}",
                         peak_extra_mb="" if peak is None else f"{peak / 2**20:.1f}",
                         loss=f"{timing.loss:.6f}", loss_rel_err=f"{error:.2e}"))
        peak_text = "" if peak is None else f", peak extra {peak / 2**30:.2f} GiB"
        off = "  LOSS OFF" if error > LOSS_TOLERANCE else ""
        say(f"{name:>16}: {timing.ms[1]:9.3f} ms (p20 {timing.ms[0]:.3f}, p80 "
            f"{timing.ms[2]:.3f}){peak_text}; loss {timing.loss:.6f} (rel. error "
            f"{error:.1e}){off}")
        steps[name].reset()

    report.save(rows, COLUMNS)
    return 1 if problems.keys() - {"liger-patch"} or any(
        float(row["loss_rel_err"]) > LOSS_TOLERANCE for row in rows) else 0


if __name__ == "__main__":
    run_timed(main, "bench.hf_step")
