"""The vocab-parallel building blocks' speed on one GPU (issue 23): each pass's bytes per second
against the fused kernel's, side by side in one run.

    python -m bench.vocab_parallel [--shapes 8192x128256,4096x256000] [--out DIR]
    python -m bench.vocab_parallel --smoke      # CPU: a small shape in the CUDA simulator

On bf16 logits (N, V), one slice holding all V classes (a world of one), through the CuPy API on
torch's stream, validate=False (and the gradient pass given n_classes=V: no read of the merged
state's bounds, which waits for the device; the 2026-12-07 rows before this was so include it):

    pass              call                                   bytes (harness.minimum_bytes)
    fused             numba_ce.cross_entropy_with_grad       2 N V itemsize (read, write)
    loss              numba_ce.cross_entropy                 N V itemsize
    states            numba_ce.softmax_state                 N V itemsize   (pass 1)
    slice-gradient    numba_ce.slice_cross_entropy_with_grad 2 N V itemsize (pass 2)
    two-pass          states, merge_softmax_states, pass 2   3 N V itemsize

The target: states and slice-gradient each within 10% of the fused kernel's bytes per second.
Rows are appended to bench/results/vocab_parallel.csv (and OUT/bench/: bench.report).
"""
import argparse
from pathlib import Path

from . import harness, results
from .report import Report, platform, run_timed

MEASUREMENT = ("pass", "n", "v", "dtype", "reps", "ms_p20", "ms_p50", "ms_p80", "tbps",
               "vs_fused")
COLUMNS = results.ENVIRONMENT + MEASUREMENT
PASS_BYTES = {"fused": 2, "loss": 1, "states": 1, "slice-gradient": 2, "two-pass": 3}
SMOKE_SHAPES = "6x37"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.vocab_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8192x128256,4096x256000")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU only: the CUDA simulator, float32, wall-clock timing")
    parser.add_argument("--out", type=Path, help="also write vocab_parallel.csv and .log here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes = SMOKE_SHAPES
    args.shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
    return args


def pass_steps(numba_ce, logits, target, stream):
    """{pass: Step} on array views ``logits`` and ``target``. The gradient pass is given V
    (n_classes), so that it reads nothing back: no wait for the device inside a timed call (the
    merge of the two-pass step still reads the slices' bounds)."""
    v = logits.shape[1]
    merged = numba_ce.merge_softmax_states(
        numba_ce.softmax_state(logits, target, vocab_start=0)[None])

    def two_pass():
        state = numba_ce.softmax_state(logits, target, vocab_start=0)
        both = numba_ce.merge_softmax_states(state[None])
        return numba_ce.slice_cross_entropy_with_grad(logits, target, both, vocab_start=0,
                                                      validate=False, n_classes=v).loss
    calls = {
        "fused": lambda: numba_ce.cross_entropy_with_grad(logits, target, validate=False).loss,
        "loss": lambda: numba_ce.cross_entropy(logits, target, validate=False),
        "states": lambda: numba_ce.softmax_state(logits, target, vocab_start=0)[0],
        "slice-gradient": lambda: numba_ce.slice_cross_entropy_with_grad(
            logits, target, merged, vocab_start=0, validate=False, n_classes=v).loss,
        "two-pass": two_pass}

    def on_stream(call):
        def run():
            with stream:
                return call()
        return run
    return {name: harness.Step(on_stream(call) if stream else call)
            for name, call in calls.items()}


def main(argv=None):
    args = parse_args(argv)
    torch, device, dtype = platform(args.smoke)
    import numpy as np

    import numba_ce
    from bench.providers import array_view

    xp = np if args.smoke else __import__("cupy")
    stream = None
    if not args.smoke:
        from numba_ce.torch.tensors import cupy_stream
        stream = cupy_stream(torch.device("cuda", torch.cuda.current_device()))
    report = Report("vocab_parallel", args.out, args.smoke, torch)
    say, env = report.say, report.env
    timer = harness.WallTimer() if args.smoke else harness.CudaTimer(torch)
    repetitions = harness.SMOKE if args.smoke else harness.FULL
    rows, losses_agree = [], True
    for n, v in args.shapes:
        generator = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(n, v, generator=generator, device=device).mul_(2).to(dtype)
        target = torch.randint(0, v, (n,), generator=generator, device=device)
        steps = pass_steps(numba_ce, array_view(xp, logits), array_view(xp, target), stream)
        timings = harness.measure_side_by_side(steps, timer, repetitions)
        fused = timings["fused"]
        say(f"--- {n} x {v} {dtype}: ms p50 (p20, p80), TB/s, bytes per second vs fused")
        for name, timing in timings.items():
            if isinstance(timing, Exception):
                raise timing
            nbytes = PASS_BYTES[name] * n * v * logits.element_size()
            speed = harness.tbps(nbytes, timing.ms[1])
            ratio = speed / harness.tbps(2 * n * v * logits.element_size(), fused.ms[1])
            if name in ("slice-gradient", "two-pass", "loss"):
                losses_agree &= abs(timing.loss - fused.loss) <= 1e-5 * abs(fused.loss)
            rows.append(dict(env, **{"pass": name}, n=n, v=v, dtype=str(dtype).split(".")[-1],
                             reps=timing.reps, ms_p20=f"{timing.ms[0]:.4f}",
                             ms_p50=f"{timing.ms[1]:.4f}", ms_p80=f"{timing.ms[2]:.4f}",
                             tbps=f"{speed:.3f}", vs_fused=f"{ratio:.3f}"))
            say(f"{name:>15}: {timing.ms[1]:8.4f} ({timing.ms[0]:.4f}, {timing.ms[2]:.4f}) "
                f"{speed:6.3f} TB/s  {ratio:5.2f}x fused's")
    if not losses_agree:
        say("LOSS OFF: a pass's loss differs from the fused kernel's")
    report.save(rows, COLUMNS)
    return 0 if losses_agree else 1


if __name__ == "__main__":
    run_timed(main, "bench.vocab_parallel")
