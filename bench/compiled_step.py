"""Cross-entropy inside compiled training steps (issue 19): numba_ce, Liger-Kernel and torch's own
F.cross_entropy, each eager, under torch.compile and under torch.compile(mode="reduce-overhead")
(CUDA graphs), side by side in one run. numba_ce runs with validate=False under CUDA graphs, as
a user must (its target check's host read cannot be captured), and with the default elsewhere.

    python -m bench.compiled_step [--tokens 4096 --vocab 32000 --hidden 512] [--out DIR]
    python -m bench.compiled_step --smoke     # CPU: a tiny head in the CUDA simulator

Two measurements, both bf16 on the GPU:

- ``step``: a small LM head's training step, embedding (V, H) -> linear (H, V) -> loss on N
  tokens (a tenth of the labels -100), forward + backward + a fused AdamW step. What changes
  between providers is the loss only; every provider trains its own copy of one model. Its
  first call's wall time (``first_ms``) is the compile time, with and without numba_ce in the
  compiled graph.
- ``loss``: the loss alone, forward + backward on N x V logits (a leaf), in the same modes and
  in ``graph``: the eager calls captured once by torch.cuda.graph and replayed, the GPU work of
  a CUDA-graph step with no host work a call (reduce-overhead's replays carry cudagraph trees'
  Python, which at this size outweighs the kernels: torch's own loss too). Against
  ``kernels``, the same loss and gradient through numba_ce's array API (the kernels, no torch).
  Issue 19's target: numba_ce's graph <= 1.15 x kernels at 4096 x 32000. Liger's loss reads
  its counted rows to the host (``.item()``), which a capture cannot do: its graph row is
  skipped with that reason.

ms are CUDA-event medians (harness.measure_side_by_side: p20 / p50 / p80). Rows are appended to
bench/results/compiled_step.csv (and OUT/bench/: bench.report).
"""
import copy

from . import harness, results
from .cases import IGNORE_INDEX, OPTIONS
from .report import Report, platform, run_timed, step_arguments

MEASUREMENT = ("what", "provider", "mode", "tokens", "vocab", "hidden", "reps", "ms_p20",
               "ms_p50", "ms_p80", "first_ms", "loss")
COLUMNS = results.ENVIRONMENT + MEASUREMENT
SMOKE_SHAPE = dict(tokens=12, vocab=40, hidden=8)
CUDA_GRAPH_MODES = ("reduce-overhead", "graph")
LOSS_TOLERANCE = 2e-2  # between providers' first losses (bf16 logits round them to 2^-9)


def parse_args(argv):
    return step_arguments(
        argv, "compiled_step", __doc__, dict(tokens=4096, vocab=32000, hidden=512), SMOKE_SHAPE,
        "CPU only: a tiny float32 head in the CUDA simulator, torch.compile with the aot_eager "
        "backend, wall-clock timing")


def losses(torch, mode):
    """{provider: loss(logits, labels), or the exception that says why it cannot run} for a
    compile ``mode``. Under CUDA graphs (reduce-overhead, graph) numba_ce runs with
    validate=False, as a user must: its target check reads back to the host, which a capture
    cannot do (it says so). Liger's loss reads its counted rows to the host (``.item()``), which
    torch.cuda.graph cannot capture."""
    import torch.nn.functional as F

    import numba_ce.torch as nce
    validate = mode not in CUDA_GRAPH_MODES
    found = {"torch": lambda x, t: F.cross_entropy(x, t, ignore_index=IGNORE_INDEX),
             "numba_ce": lambda x, t: nce.cross_entropy(x, t, ignore_index=IGNORE_INDEX,
                                                        validate=validate)}
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
        found["liger"] = lambda x, t: liger_cross_entropy(x, t, ignore_index=IGNORE_INDEX)
    except Exception as exc:
        found["liger"] = exc
    if mode == "graph" and not isinstance(found["liger"], Exception):
        found["liger"] = RuntimeError("its loss reads the batch's counted rows to the host "
                                      "(.item()): no CUDA-graph capture")
    return found


def compiler(torch, smoke):
    """{mode: function -> its compiled form}: eager, torch.compile, and (GPU) reduce-overhead."""
    backend = "aot_eager" if smoke else "inductor"
    modes = {"eager": lambda fn: fn,
             "compile": lambda fn: torch.compile(fn, backend=backend, fullgraph=True)}
    if not smoke:
        modes["reduce-overhead"] = lambda fn: torch.compile(fn, mode="reduce-overhead",
                                                            fullgraph=True)
    return modes


def lm_head(torch, args, dtype, device):
    """Embedding (V, H) then a linear head (H, V), seed 0."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(args.vocab, args.hidden),
                               torch.nn.Linear(args.hidden, args.vocab, bias=False)
                               ).to(device=device, dtype=dtype)


def tokens(torch, args, device):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=generator)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = IGNORE_INDEX
    return ids.to(device), labels.to(device)


def replayed(torch, mode, run):
    """``run`` for a harness Step: under reduce-overhead each call begins a new CUDA-graph step
    and returns a copy of the loss, as the graph's next replay overwrites its outputs."""
    if mode != "reduce-overhead":
        return run

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        return run().clone()
    return step


def training_step(torch, model, loss_fn, mode, compile_mode, ids, labels, smoke):
    def forward(ids, labels):
        return loss_fn(model(ids), labels)
    compiled = compile_mode(forward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not smoke)

    def run():
        loss = compiled(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return harness.Step(replayed(torch, mode, run))


def captured(torch, run):
    """``run`` (which makes its gradients anew) for a harness Step as CUDA-graph replays: the
    first call warms it up on a side stream, as torch asks before a capture, and captures one
    call with torch.cuda.graph; every call replays that, overwriting the captured outputs."""
    graph = torch.cuda.CUDAGraph()
    loss = []

    def step():
        if not loss:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                loss.append(run())
        graph.replay()
        return loss[0]
    return step


def loss_step(torch, logits, loss_fn, mode, compile_mode, labels):
    x = logits.detach().requires_grad_()
    compiled = compile_mode(loss_fn)

    def run():
        loss = compiled(x, labels)
        loss.backward()
        return loss.detach()

    def reset():
        x.grad = None

    if mode == "graph":
        def anew():
            reset()
            return run()
        return harness.Step(captured(torch, anew))
    return harness.Step(replayed(torch, mode, run), reset)


def kernels_step(logits, labels, smoke):
    """numba_ce.cross_entropy_with_grad on array views of the tensors, on torch's stream:
    bench.run's numba_ce-cupy provider (NumPy views in the simulator), validate=False."""
    from types import SimpleNamespace

    from .providers import NumbaArrays
    provider = NumbaArrays(simulator=smoke, validate=False)
    return provider.step("fwd_bwd", SimpleNamespace(logits=logits), labels, OPTIONS["plain"])


def main(argv=None):
    args = parse_args(argv)
    torch, device, dtype = platform(args.smoke)
    report = Report("compiled_step", args.out, args.smoke, torch)
    say, env = report.say, report.env
    say(f"{args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, {dtype}")
    modes = compiler(torch, args.smoke)
    loss_modes = modes if args.smoke else {**modes, "graph": lambda fn: fn}
    loss_fns = {mode: losses(torch, mode) for mode in loss_modes}
    ids, labels = tokens(torch, args, device)
    base = lm_head(torch, args, dtype, device)
    with torch.no_grad():
        logits = base(ids)

    timer = harness.WallTimer() if args.smoke else harness.CudaTimer(torch)
    repetitions = harness.SMOKE if args.smoke else harness.FULL
    rows, failed = [], False
    for what in ("step", "loss"):
        steps, problems = {}, {}
        for provider in loss_fns["eager"]:
            for mode, compile_mode in (modes if what == "step" else loss_modes).items():
                key, loss_fn = (provider, mode), loss_fns[mode][provider]
                if isinstance(loss_fn, Exception):
                    problems[key] = loss_fn
                elif what == "step":
                    steps[key] = training_step(torch, copy.deepcopy(base), loss_fn, mode,
                                               compile_mode, ids, labels, args.smoke)
                else:
                    steps[key] = loss_step(torch, logits, loss_fn, mode, compile_mode, labels)
        if what == "loss":
            steps[("numba_ce", "kernels")] = kernels_step(logits, labels, args.smoke)
        timings = {**harness.measure_side_by_side(steps, timer, repetitions), **problems}
        reference = timings.get(("torch", "eager"))
        say(f"--- {what}: ms p50 (p20, p80), first call ms, loss")
        for (provider, mode), timing in timings.items():
            if isinstance(timing, Exception):
                say(f"{provider:>9} {mode:>15}: skipped ({type(timing).__name__}: "
                    f"{str(timing).splitlines()[0][:200]})")
                failed |= provider != "liger"
                continue
            off = isinstance(reference, harness.Timing) and (
                abs(timing.loss - reference.loss) > LOSS_TOLERANCE * abs(reference.loss))
            failed |= off
            rows.append(dict(env, what=what, provider=provider, mode=mode, tokens=args.tokens,
                             vocab=args.vocab, hidden=args.hidden, reps=timing.reps,
                             ms_p20=f"{timing.ms[0]:.4f}", ms_p50=f"{timing.ms[1]:.4f}",
                             ms_p80=f"{timing.ms[2]:.4f}", first_ms=f"{timing.first_ms:.1f}",
                             loss=f"{timing.loss:.6f}"))
            say(f"{provider:>9} {mode:>15}: {timing.ms[1]:8.4f} ({timing.ms[0]:.4f}, "
                f"{timing.ms[2]:.4f}); first {timing.first_ms:9.1f}; loss {timing.loss:.5f}"
                f"{'  LOSS OFF' if off else ''}")
        for step in steps.values():
            if step.reset:
                step.reset()
        torch._dynamo.reset()
    report.save(rows, COLUMNS)
    return 1 if failed else 0


if __name__ == "__main__":
    run_timed(main, "bench.compiled_step")
