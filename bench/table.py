"""Markdown tables of one run of the results CSV (for the README and bench/NOTES.md).

    python -m bench.table [--csv PATH] [--run DATE] [--options plain]

One table a mode, a row per main shape and dtype, a column per provider:
median ms and, in brackets, effective TB/s; then the peak extra memory of fused forward + backward.
"""
import argparse
import sys

from . import results
from .cases import MAIN_CASES, MODES


def markdown(rows, options="plain"):
    """The tables of ``rows`` (one run) for the option set ``options``, as one markdown string:
    the main shapes when the run has any, else every shape."""
    rows = [r for r in rows if r["options"] == options]
    rows = [r for r in rows if (int(r["n"]), int(r["v"]), r["dtype"]) in MAIN_CASES] or rows
    if not rows:
        return f"(no rows with options {options!r})\n"
    first = rows[0]
    parts = [f"{first['gpu']}, driver {first['driver'] or '?'}, run {first['date']}, "
             f"commit {first['commit'] or '?'}, options {options}; copy ceiling "
             f"{float(first['ceiling_tbps']):.2f} TB/s (read + written)\n"]
    for mode, meaning in MODES.items():
        parts.append(f"\n{mode}: {meaning}. Median ms (effective TB/s)\n\n")
        parts.append(_table(rows, mode,
                            lambda r: f"{float(r['ms_p50']):.3f} ({float(r['tbps']):.2f})"))
    parts.append("\nPeak extra device memory of fwd_bwd, GB\n\n")
    parts.append(_table(rows, "fwd_bwd", lambda r: "-" if r["peak_extra_mb"] == ""
                        else f"{float(r['peak_extra_mb']) / 1e3:.2f}"))
    return "".join(parts)


def _table(rows, mode, cell):
    """Rows: shape and dtype, in order of appearance; columns: providers, in order of appearance."""
    rows = [r for r in rows if r["mode"] == mode]
    if not rows:
        return "(not measured)\n"
    cases = list(dict.fromkeys((r["n"], r["v"], r["dtype"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    cells = {(r["n"], r["v"], r["dtype"], r["provider"]): cell(r) for r in rows}
    lines = ["| shape N x V, dtype | " + " | ".join(providers) + " |",
             "|---|" + "---|" * len(providers)]
    for n, v, dtype in cases:
        lines.append(f"| {n} x {v} {dtype} | " + " | ".join(
            cells.get((n, v, dtype, p), "-") for p in providers) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=results.COMMITTED,
                        help="results CSV (default: %(default)s)")
    parser.add_argument("--run", help="the run's date column (default: the latest run)")
    parser.add_argument("--options", default="plain", help="option set (default: plain)")
    args = parser.parse_args(argv)
    rows = results.read(args.csv)
    rows = [r for r in rows if r["date"] == args.run] if args.run else results.latest_run(rows)
    print(markdown(rows, args.options), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
