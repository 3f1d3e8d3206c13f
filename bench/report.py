"""What the single-measurement benchmark scripts (bench.linear, bench.hf_step,
bench.compiled_step, bench.vocab_parallel) share: a log that prints as it goes and starts with
the run's environment, and where the rows and the log are written.

    torch, device, dtype = platform(smoke)   # the simulator on the CPU in float32, or the GPU
    report = Report("linear", args.out, smoke, torch)   # prints the environment
    report.say("...")
    report.save(rows, COLUMNS)   # bench/results/linear.csv (not in a smoke run), and with an
                                 # out folder OUT/bench/linear.csv and OUT/bench/linear.log

and the command line of the steps that build a model of a few integer sizes
(:func:`step_arguments`).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import results

SIMULATED_GPU = "CPU (CUDA simulator)"


def platform(smoke):
    """(torch, device, dtype) of a run: with ``smoke`` the CUDA simulator (switched on here,
    before anything imports numba), CPU tensors and float32; else the GPU and bfloat16."""
    if smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import torch
    return torch, ("cpu" if smoke else "cuda"), (torch.float32 if smoke else torch.bfloat16)


def step_arguments(argv, name, description, sizes, smoke_sizes, smoke_help):
    """The parsed command line of bench.NAME: an integer option --SIZE for each of ``sizes``
    ({size: default}), --smoke (``smoke_help``; it sets ``smoke_sizes``) and --out."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for size, default in sizes.items():
        parser.add_argument(f"--{size}", type=int, default=default)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, help=f"also write {name}.csv and {name}.log here")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(smoke_sizes)
    return args


class Report:
    """One script's log lines, environment (``env``: the rows' ENVIRONMENT columns) and output
    folder (``out``: as given, or a temporary one in a smoke run)."""

    def __init__(self, name, out, smoke, torch):
        self.name, self.smoke, self.lines = name, smoke, []
        self.out = out or (Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) if smoke else None)
        gpu = SIMULATED_GPU if smoke else torch.cuda.get_device_name()
        self.env = results.environment(gpu, "" if smoke else results.nvidia_driver())
        for key, value in self.env.items():
            self.say(f"{key}: {value}")

    def say(self, text):
        print(text, flush=True)
        self.lines.append(text)

    def save(self, rows, columns):
        """Append ``rows`` to the committed bench/results/NAME.csv (never from a smoke run) and
        to OUT/bench/NAME.csv, and write the log to OUT/bench/NAME.log."""
        if not self.smoke:
            results.append(results.COMMITTED.parent / f"{self.name}.csv", rows, columns)
        if self.out:
            out_dir = self.out / "bench"
            out_dir.mkdir(parents=True, exist_ok=True)
            results.append(out_dir / f"{self.name}.csv", rows, columns)
            (out_dir / f"{self.name}.log").write_text("\n".join(self.lines) + "\n")


def run_timed(main, label):
    """Exit with ``main()``'s code after printing how long it took (a script's __main__)."""
    started = time.perf_counter()
    code = main()
    print(f"{label}: {time.perf_counter() - started:.1f} s")
    sys.exit(code)
