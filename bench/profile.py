"""Nsight Compute profiles of the providers' kernels, side by side: for every kernel of one call,
its time, DRAM bytes, L2 hit rate, issue activity, occupancy and launch shape (issue 22: profile
quack's kernel and ours before changing code).

    python -m bench.profile --out DIR        # numba_ce-cupy-novalidate and quack, fwd_bwd,
                                             # the large main shapes (three bf16 and fp32)
    python -m bench.profile --providers numba_ce-cupy-novalidate,liger --shapes 8192x128256 \\
        --dtypes bf16 --modes fwd_bwd,loss

Each (shape, dtype, mode, provider) runs in a child process under ncu (``--profile-from-start
off``): the child warms its call up (compilation, autotuning), then runs it once between
cudaProfilerStart and cudaProfilerStop, so that ncu replays every kernel of that call and no
other (the copy that restores an in-place provider's logits comes before the start). The call
is the benchmark's (bench.providers, plain options): numba_ce-cupy's three launches, quack's
fused kernel and the mean that bench.run adds to it, and so on.

ncu holds the SM clock at its base (``--clock-control base``, its default): durations read about
1.1x bench.run's. Compare kernels within one profile, not with the benchmark's figures.

Writes DIR/bench/profile.csv (every metric ncu reported, a row each, with the run's date, GPU
and ncu version) and DIR/bench/profile.log (a line of the SUMMARY metrics a kernel).
"""
import argparse
import csv
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import cases

DEFAULT_PROVIDERS = ("numba_ce-cupy-novalidate", "quack")
DEFAULT_CASES = tuple(case for case in cases.MAIN_CASES if case[:2] != (4096, 32000))
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "LaunchStats", "Occupancy",
            "SchedulerStats", "WarpStateStats")
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sector_hit_rate.pct",
           "sm__inst_executed.sum")
# (ncu's metric name, the log's column): what a kernel line of profile.log shows
SUMMARY = (("Duration", "time"), ("dram__bytes_read.sum", "DRAM read"),
           ("dram__bytes_write.sum", "DRAM written"), ("DRAM Throughput", "DRAM peak"),
           ("lts__t_sector_hit_rate.pct", "L2 hits"), ("Issued Warp Per Scheduler", "issued/cycle"),
           ("Achieved Occupancy", "occupancy"), ("Registers Per Thread", "registers"),
           ("Block Size", "block"), ("Grid Size", "grid"), ("Cluster Size", "cluster"),
           ("Dynamic Shared Memory Per Block", "dynamic shared"),
           ("sm__inst_executed.sum", "warp instructions"))
WARMUP_CALLS = 3
CHILD_TIMEOUT_SECONDS = 600
COLUMNS = ("date", "gpu", "ncu", "provider", "n", "v", "dtype", "mode", "kernel_id", "kernel",
           "section", "metric", "unit", "value")
NCU_PLACES = ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu")


def find_ncu():
    """The ncu executable: on PATH, or where CUDA installs it; SystemExit when there is none."""
    found = shutil.which("ncu") or next((p for p in NCU_PLACES if os.access(p, os.X_OK)), None)
    if found is None:
        raise SystemExit(f"no ncu (Nsight Compute) on PATH or at {', '.join(NCU_PLACES)}")
    return found


def ncu_command(ncu, report, provider, n, v, dtype, mode):
    """The ncu command line that profiles one call of ``provider`` into the CSV file ``report``."""
    sections = [argument for section in SECTIONS for argument in ("--section", section)]
    return [ncu, "--profile-from-start", "off", "--target-processes", "all", *sections,
            "--metrics", ",".join(METRICS), "--csv", "--page", "details", "--log-file",
            str(report), sys.executable, "-m", "bench.profile", "--child", provider,
            f"{n}x{v}", dtype, mode]


def read_report(lines):
    """The metric rows of ncu's CSV details page (``--csv --page details``), as dicts; ncu's own
    messages (lines starting "==") and the profiled program's output are skipped."""
    rows = csv.reader(line for line in lines if line.startswith('"'))
    header = next(rows, None)
    if header is None:
        return []
    return [dict(zip(header, row)) for row in rows if len(row) == len(header)]


def summary_lines(metric_rows):
    """A line per kernel (in launch order): its name and the SUMMARY metrics it has."""
    kernels = {}
    for row in metric_rows:
        kernel = kernels.setdefault(row["ID"], {"name": row["Kernel Name"]})
        kernel[row["Metric Name"]] = f"{row['Metric Value']} {row['Metric Unit']}".strip()
    lines = []
    for kernel in kernels.values():
        shown = [f"{label} {kernel[metric]}" for metric, label in SUMMARY if metric in kernel]
        lines.append(f"  {kernel['name'][:70]}\n      " + "; ".join(shown))
    return lines


def run_child(provider_name, shape, dtype, mode):
    """Warm up one call of the provider, then run it once between cudaProfilerStart and Stop."""
    import torch

    from . import providers
    n, v = cases.parse_shape(shape)
    chosen = [p for p in providers.all_providers(simulator=False, validate=False)
              if p.name == provider_name]
    if not chosen:
        raise SystemExit(f"unknown provider {provider_name}")
    problem = chosen[0].unavailable()
    if problem:
        raise SystemExit(f"{provider_name}: {problem}")
    inputs = cases.Inputs(n, v, dtype, "cuda")
    options = cases.OPTIONS["plain"]
    step = chosen[0].step(mode, inputs, inputs.target(options), options)

    def prepared():
        inputs.restore()  # (an in-place provider overwrote them with its gradient)
        if step.reset:
            step.reset()
        torch.cuda.synchronize()

    for _ in range(WARMUP_CALLS):
        prepared()
        step.run()
    prepared()
    torch.cuda.profiler.start()
    step.run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", type=lambda text: [p.strip() for p in text.split(",")],
                        default=list(DEFAULT_PROVIDERS),
                        help="comma-separated names from bench.run's providers with validate="
                             "False (default: %(default)s)")
    parser.add_argument("--shapes", type=cases.shapes_argument, help="comma-separated NxV")
    parser.add_argument("--dtypes", type=cases.names_argument(cases.DTYPES), help="comma-separated")
    parser.add_argument("--modes", type=cases.names_argument(cases.MODES), default=["fwd_bwd"],
                        help="comma-separated (default: fwd_bwd)")
    parser.add_argument("--out", type=Path, default=Path("gpu-out"),
                        help="writes OUT/bench/profile.csv and profile.log (default: %(default)s)")
    parser.add_argument("--child", nargs=4, metavar=("PROVIDER", "SHAPE", "DTYPE", "MODE"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def profiled_cases(args):
    """(n, v, dtype) to profile: --shapes with --dtypes (default bf16), else DEFAULT_CASES."""
    if args.shapes:
        return [(n, v, dtype) for n, v in args.shapes for dtype in (args.dtypes or ["bf16"])]
    return [case for case in DEFAULT_CASES if not args.dtypes or case[2] in args.dtypes]


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(*args.child)
        return 0
    ncu = find_ncu()
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible to torch")
    out_dir = args.out / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.split("\n")
    run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "gpu": torch.cuda.get_device_name(),
           "ncu": next((line for line in reversed(version) if line.strip()), "ncu")}
    failures = 0
    with open(out_dir / "profile.csv", "w", newline="") as table, \
            open(out_dir / "profile.log", "w") as log:
        writer = csv.DictWriter(table, COLUMNS)
        writer.writeheader()

        def say(text):
            print(text, flush=True)
            log.write(text + "\n")

        say(f"{run['date']} {run['gpu']}, {run['ncu']}; SM clock held at base by ncu")
        for (n, v, dtype), mode, provider in [(case, mode, provider)
                                              for case in profiled_cases(args)
                                              for mode in args.modes
                                              for provider in args.providers]:
            say(f"{provider} {n} x {v} {dtype} {mode}:")
            with tempfile.TemporaryDirectory() as scratch:
                report = Path(scratch) / "report.csv"
                done = subprocess.run(ncu_command(ncu, report, provider, n, v, dtype, mode),
                                      capture_output=True, text=True,
                                      timeout=CHILD_TIMEOUT_SECONDS)
                metric_rows = read_report(report.read_text().splitlines()
                                          if report.exists() else [])
            if done.returncode or not metric_rows:
                failures += 1
                say(f"  failed (exit {done.returncode}, {len(metric_rows)} metrics):\n"
                    + (done.stdout + done.stderr)[-2000:])
                continue
            for line in summary_lines(metric_rows):
                say(line)
            for row in metric_rows:
                writer.writerow({**run, "provider": provider, "n": n, "v": v, "dtype": dtype,
                                 "mode": mode, "kernel_id": row["ID"],
                                 "kernel": row["Kernel Name"], "section": row["Section Name"],
                                 "metric": row["Metric Name"], "unit": row["Metric Unit"],
                                 "value": row["Metric Value"]})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
