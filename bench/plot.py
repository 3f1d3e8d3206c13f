"""Plot effective TB/s against the vocabulary size V, one line per provider, from the results CSV.

    python -m bench.plot [--csv PATH] [--run DATE] [--out PNG]

Fused forward + backward, bf16, plain options, N = 4096 (the V sweep plus the main shapes with
that N); bars span the 20% and 80% quantiles; the dashed line is the run's copy ceiling.
Needs matplotlib.
"""
import argparse
import sys
from pathlib import Path

from . import results
from .cases import SWEEP_DTYPE, SWEEP_MODES, SWEEP_N, SWEEP_OPTIONS
from .harness import tbps

DEFAULT_PNG = results.COMMITTED.parent / "tbps_vs_v.png"


def sweep_rows(rows, run=None):
    """The rows the plot shows, from run ``run`` (a date) or the latest run that has any."""
    rows = [r for r in rows if int(r["n"]) == SWEEP_N and r["dtype"] == SWEEP_DTYPE
            and r["mode"] in SWEEP_MODES and r["options"] == SWEEP_OPTIONS]
    return [r for r in rows if r["date"] == run] if run else results.latest_run(rows)


def draw(rows, path):
    """Write the PNG of ``rows`` (from :func:`sweep_rows`) to ``path``."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        points = sorted((int(r["v"]), r) for r in rows if r["provider"] == provider)
        v = [p[0] for p in points]
        median = [float(r["tbps"]) for _, r in points]
        # the slower p80 time gives the lower bandwidth
        low = [tbps(int(r["min_bytes"]), float(r["ms_p80"])) for _, r in points]
        high = [tbps(int(r["min_bytes"]), float(r["ms_p20"])) for _, r in points]
        ax.errorbar(v, median, yerr=[[m - lo for m, lo in zip(median, low)],
                                     [hi - m for m, hi in zip(median, high)]],
                    marker="o", capsize=3, label=provider)
    first = rows[0]
    ax.axhline(float(first["ceiling_tbps"]), color="grey", linestyle="--",
               label=f"copy ceiling {float(first['ceiling_tbps']):.2f} TB/s")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1024:g}k"))
    ax.set_xlabel("V (classes per row)")
    ax.set_ylabel("effective TB/s = 2 N V itemsize / median time")
    ax.set_ylim(bottom=0)
    ax.set_title(f"cross-entropy forward + backward, {SWEEP_DTYPE}, N = {SWEEP_N}\n"
                 f"{first['gpu']}, run {first['date']}, commit {first['commit'] or '?'}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=results.COMMITTED,
                        help="results CSV (default: %(default)s)")
    parser.add_argument("--run",
                        help="the run's date column (default: the latest run with sweep rows)")
    parser.add_argument("--out", type=Path, default=DEFAULT_PNG, help="PNG (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = sweep_rows(results.read(args.csv), args.run)
    if not rows:
        print(f"no fwd_bwd {SWEEP_DTYPE} plain rows with N = {SWEEP_N} in {args.csv}")
        return 1
    draw(rows, args.out)
    print(f"wrote {args.out} ({len(rows)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
