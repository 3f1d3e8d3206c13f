"""Time every provider on every case, in one process, and record the results. The providers of
a case and mode are timed side by side, in rounds (harness.measure_side_by_side).

    python -m bench.run                        # the full run (meant to take ~4 minutes on an H200)
    python -m bench.run --quick                # two shapes, plain options, few repetitions
    python -m bench.run --providers numba_ce-cupy,liger --shapes 8192x128256 --modes fwd_bwd
    python -m bench.run --smoke --out DIR      # CPU only: CUDA simulator, one tiny shape
    python -m bench.run --baseline .baseline   # also an earlier numba_ce (bench.baseline)

Prints the copy ceiling, one line per measurement and the markdown tables; appends the rows to
bench/results/results.csv (--results; never with --smoke). With --out DIR it also writes
DIR/bench/{results.csv, run.log, tables.md}: this run's rows, everything printed plus the
traceback of any failed measurement, and the tables of every option set.

Providers that cannot run here (Liger not installed, numba_ce.torch not importable, no GPU in
--smoke) are skipped with a note; --smoke runs numba_ce-numpy and torch-eager unless --providers
names others. A measurement that raises is reported and the run goes on; the exit status is
then 1.
"""
import argparse
import itertools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

# None of these imports numba: the simulator switch in main() must come before numba is imported.
from . import cases, harness, results, table
from .baseline import load as load_baseline

LOSS_TOLERANCE = 1e-2  # relative, against the fp32 reference: bf16 logits round the loss to 2^-9
SMOKE_CEILING_BYTES = 64 << 20


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="two main shapes, plain options, no sweep, 5-20 timed calls")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU only: CUDA simulator, NumPy arrays, torch eager on the CPU, "
                             "wall-clock timing; writes only under --out (default: a temp dir)")
    parser.add_argument("--providers", type=lambda text: [p.strip() for p in text.split(",")],
                        help="comma-separated names, as in the results (default: all)")
    parser.add_argument("--shapes", type=cases.shapes_argument,
                        help="comma-separated NxV, instead of the main shapes (no V sweep)")
    parser.add_argument("--dtypes", type=cases.names_argument(cases.DTYPES), help="comma-separated")
    parser.add_argument("--options", type=cases.names_argument(cases.OPTIONS),
                        help=f"comma-separated, from {list(cases.OPTIONS)}")
    parser.add_argument("--modes", type=cases.names_argument(cases.MODES),
                        help=f"comma-separated, from {list(cases.MODES)}")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the V sweep")
    parser.add_argument("--no-validate", action="store_true",
                        help="numba_ce with validate=False (no host read of the target check)")
    parser.add_argument("--baseline", type=Path,
                        help="also time the earlier numba_ce that python -m bench.baseline REF "
                             "wrote into this folder, as numba_ce-cupy@REF")
    parser.add_argument("--out", type=Path, help="also write results.csv, run.log, tables.md "
                                                 "under OUT/bench")
    parser.add_argument("--results", type=Path, default=results.COMMITTED,
                        help="the CSV to append to (default: %(default)s)")
    return parser.parse_args(argv)


class Log:
    """Prints, and keeps everything (tracebacks too) in a log file when there is one."""

    def __init__(self, path):
        self.file = open(path, "w") if path else None

    def say(self, text=""):
        print(text, flush=True)
        self.detail(text)

    def detail(self, text):
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()


class Run:
    """The state one run's measurements share: device, timer, environment, ceiling, log."""

    def __init__(self, args, log):
        import torch
        self.torch, self.log = torch, log
        self.simulator = args.smoke
        if not self.simulator and not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU is visible to torch: run with --smoke on a CPU")
        self.device = "cpu" if self.simulator else "cuda"
        self.timer = harness.WallTimer() if self.simulator else harness.CudaTimer(torch)
        self.repetitions = (harness.SMOKE if self.simulator
                            else harness.QUICK if args.quick else harness.FULL)
        self.pool = None if self.simulator else _cupy_pool()
        if self.simulator:
            self.env = results.environment("cpu (CUDA simulator)", "")
        else:
            self.env = results.environment(torch.cuda.get_device_name(), results.nvidia_driver())
        self.ceiling = harness.copy_ceiling(
            torch, self.device, self.timer,
            SMOKE_CEILING_BYTES if self.simulator else harness.CEILING_BYTES)
        harness.free_device_memory(torch, self.pool)
        self.failures = 0

    def measure(self, providers, spec, mode, inputs, target, expected):
        """One row per provider: ``providers`` in ``mode`` on ``spec``, timed side by side
        (harness.measure_side_by_side); a provider that raised is reported and has no row."""
        steps = {}  # (making a step reads no logits: each turn restores them first)
        for provider in providers:
            try:
                steps[provider] = provider.step(mode, inputs, target, spec.options)
            except Exception as exc:
                self._failed(provider, spec, mode, exc)
        timings = harness.measure_side_by_side(steps, self.timer, self.repetitions,
                                               before_each=inputs.restore)
        rows = []
        for provider, step in steps.items():
            timing = timings[provider]
            try:
                if isinstance(timing, Exception):
                    raise timing
                inputs.restore()
                peak = (None if self.simulator
                        else harness.peak_extra_bytes(step, self.torch, self.pool))
            except Exception as exc:
                self._failed(provider, spec, mode, exc)
                continue
            finally:
                if step.reset:
                    step.reset()  # drop the last gradient before the next measurement
            rows.append(self._row(provider, spec, mode, timing, peak, expected))
        return rows

    def _failed(self, provider, spec, mode, exc):
        self.failures += 1
        self.log.say(f"{_label(provider, spec, mode)} FAILED {type(exc).__name__}: {exc}")
        self.log.detail("".join(traceback.format_exception(exc)))
        harness.free_device_memory(self.torch, self.pool)

    def _row(self, provider, spec, mode, timing, peak, expected):
        nbytes = harness.minimum_bytes(mode, spec.n, spec.v, cases.DTYPES[spec.dtype])
        p20, p50, p80 = timing.ms
        speed = harness.tbps(nbytes, p50)
        rel_err = abs(timing.loss - expected) / max(abs(expected), 1e-12)
        row = dict(self.env, provider=provider.name, n=spec.n, v=spec.v, dtype=spec.dtype,
                   options=spec.options.name, mode=mode, reps=timing.reps,
                   ms_p20=f"{p20:.4f}", ms_p50=f"{p50:.4f}", ms_p80=f"{p80:.4f}",
                   first_ms=f"{timing.first_ms:.1f}", min_bytes=nbytes, tbps=f"{speed:.3f}",
                   ceiling_tbps=f"{self.ceiling:.3f}",
                   peak_extra_mb="" if peak is None else f"{peak / 1e6:.1f}",
                   loss=f"{timing.loss:.6g}", loss_rel_err=f"{rel_err:.1e}")
        memory = "" if peak is None else f"  peak +{peak / 1e9:.2f} GB"
        check = "" if rel_err <= LOSS_TOLERANCE else f"  LOSS OFF: expected {expected:.6g}"
        label = _label(provider, spec, mode)
        self.log.say(f"{label} {p50:8.3f} ms [{p20:.3f}, {p80:.3f}] x{timing.reps:<3d}"
                     f" {speed:5.2f} TB/s{memory}  first {timing.first_ms:.0f} ms"
                     f"  loss {timing.loss:.5g} (rel err {rel_err:.0e}){check}")
        return {column: str(value) for column, value in row.items()}


def _label(provider, spec, mode):
    return (f"{provider.name:28s} {spec.shape:>12s} {spec.dtype} {spec.options.name:9s}"
            f" {mode:8s}")


def _cupy_pool():
    try:
        import cupy
    except ImportError:
        return None
    return cupy.get_default_memory_pool()


def _select(all_providers, names, smoke, log):
    """The providers asked for (by default all; with --smoke those marked smoke_default) that can
    run here; a note for each other one not excluded by name."""
    unknown = set(names or ()) - {provider.name for provider in all_providers}
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; "
                         f"choose from {[provider.name for provider in all_providers]}")
    chosen = []
    for provider in all_providers:
        if names and provider.name not in names:
            continue
        if smoke and not names and not provider.smoke_default:
            reason = "not in --smoke by default (name it in --providers)"
        else:
            reason = provider.unavailable()
        if reason:
            log.say(f"skipped {provider.name}: {reason}")
        else:
            chosen.append(provider)
    return chosen


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        if "numba" in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            raise SystemExit("--smoke needs the CUDA simulator, but numba is already imported")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        sys.setswitchinterval(5e-4)  # simulated threads are Python threads: cheap barriers
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if args.smoke else None)
    out_dir = out / "bench" if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "run.log" if out_dir else None)
    started = time.perf_counter()

    from . import providers  # imports torch: after the switch, like everything else

    run = Run(args, log)
    for key, value in run.env.items():
        log.say(f"{key}: {value}")
    log.say(f"byte model: loss = N*V*itemsize, fwd_bwd and accum = 2*N*V*itemsize; "
            f"copy ceiling {run.ceiling:.3f} TB/s (torch copy_, bytes read + written)")
    specs = cases.plan(shapes=args.shapes, dtypes=args.dtypes, options=args.options,
                       modes=args.modes, sweep=not args.no_sweep, quick=args.quick,
                       smoke=args.smoke)
    baseline = None
    if args.baseline:
        module, label = load_baseline(args.baseline)
        baseline = (module.__name__, label)
        log.say(f"baseline: numba_ce {label} from {Path(module.__file__).parent}")
    chosen = _select(providers.all_providers(run.simulator, validate=not args.no_validate,
                                             baseline=baseline),
                     args.providers, args.smoke, log)
    log.say(f"{len(specs)} cases, providers: {', '.join(p.name for p in chosen)}")

    rows = []
    for (n, v, dtype), group in itertools.groupby(specs, key=lambda s: (s.n, s.v, s.dtype)):
        shape_started = time.perf_counter()
        inputs = cases.Inputs(n, v, dtype, run.device)
        for spec in group:
            target = inputs.target(spec.options)
            expected = providers.reference_loss(inputs, target, spec.options)
            for mode in spec.modes:
                here = [p for p in chosen if p.applies(spec) and mode in p.modes]
                rows += run.measure(here, spec, mode, inputs, target, expected)
        del inputs, target
        harness.free_device_memory(run.torch, run.pool)
        log.say(f"-- {n}x{v} {dtype}: {time.perf_counter() - shape_started:.1f} s")

    if rows and not args.smoke:
        results.append(args.results, rows)
        log.say(f"appended {len(rows)} rows to {args.results}")
    if rows and out_dir:
        results.append(out_dir / "results.csv", rows)
        log.say(f"wrote {out_dir / 'results.csv'}")
    option_names = list(dict.fromkeys(row["options"] for row in rows))
    if "plain" in option_names:
        log.say("\n" + table.markdown(rows, "plain"))
    if out_dir:
        (out_dir / "tables.md").write_text("\n".join(table.markdown(rows, name)
                                                     for name in option_names))
    if run.failures:
        log.say(f"{run.failures} measurements FAILED (tracebacks in the log)")
    log.say(f"{len(rows)} measurements in {time.perf_counter() - started:.1f} s")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
