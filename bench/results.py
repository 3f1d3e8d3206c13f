"""The results CSV: its columns, the environment every row records, appending and reading.

bench/results/results.csv (bench.run) and linear.csv (bench.linear) are committed; each run
appends its rows (--smoke never does). A run on the device machine writes its rows under --out
as well; bring them into the committed files with

    python -m bench.results OUT/bench/results.csv OUT/bench/linear.csv
"""
import csv
import datetime
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

COMMITTED = Path(__file__).resolve().parent / "results" / "results.csv"
ROOT = COMMITTED.parents[2]

ENVIRONMENT = ("date", "commit", "gpu", "driver", "numba", "numba_cuda", "cupy", "torch",
               "triton", "liger", "numba_ce")
MEASUREMENT = ("provider", "n", "v", "dtype", "options", "mode", "reps", "ms_p20", "ms_p50",
               "ms_p80", "first_ms", "min_bytes", "tbps", "ceiling_tbps", "peak_extra_mb",
               "loss", "loss_rel_err")
COLUMNS = ENVIRONMENT + MEASUREMENT
# column -> top-level module whose distribution's version is recorded
VERSION_MODULES = {"numba": "numba", "numba_cuda": "numba_cuda", "cupy": "cupy",
                   "torch": "torch", "triton": "triton", "liger": "liger_kernel"}


def environment(gpu_name, driver):
    """The ENVIRONMENT columns of this run; ``date`` (UTC, to the second) identifies the run."""
    import numba_ce
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "commit": _git_commit(), "gpu": gpu_name, "driver": driver,
           "numba_ce": numba_ce.__version__}
    distributions = importlib.metadata.packages_distributions()
    for column, module in VERSION_MODULES.items():
        env[column] = _version(distributions.get(module, ()))
    return env


def _version(distribution_names):
    for name in distribution_names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _git_commit():
    """The checked-out commit, '+dirty' when tracked files differ from it; '' outside a clone.
    NUMBA_CE_COMMIT, where set, instead: a device machine's copy of the working tree may keep
    an older .git (scripts/gpu says how to pass the commit along)."""
    if os.environ.get("NUMBA_CE_COMMIT"):
        return os.environ["NUMBA_CE_COMMIT"]

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short=10", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def nvidia_driver():
    """The NVIDIA driver version from nvidia-smi ('' when it cannot be read)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def append(path, rows, columns=COLUMNS):
    """Append ``rows`` (dicts with ``columns``) to the CSV at ``path``, writing the header to a
    new or empty file; refuses a file whose header is not ``columns``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = tuple(next(csv.reader(f), ()))
        if header != tuple(columns):
            raise ValueError(f"{path} has columns {header}; expected {tuple(columns)}")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read(path):
    """The rows of a results CSV as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_run(rows):
    """The rows of the most recent run (the latest ``date``)."""
    if not rows:
        return []
    last = max(row["date"] for row in rows)
    return [row for row in rows if row["date"] == last]


def main(argv=None):
    """Append the rows of each CSV given to the committed file of the same name (results.csv,
    linear.csv), skipping rows already there."""
    paths = (sys.argv[1:] if argv is None else argv)
    if not paths or paths[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if paths else 2
    for path in paths:
        committed = COMMITTED.parent / Path(path).name
        present = {tuple(row.values()) for row in read(committed)} if committed.exists() else set()
        new = read(path)
        rows = [row for row in new if tuple(row.values()) not in present]
        append(committed, rows, tuple(new[0]) if new else COLUMNS)
        print(f"{path}: {len(rows)} rows added to {committed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
