"""An earlier numba_ce beside the working tree's, in one benchmark process: how a change is
measured against the code before it, side by side (same machine, same run, interleaved rounds).

    python -m bench.baseline 7c6f9f1           # writes .baseline/ (git-ignored) from that commit
    python -m bench.run --baseline .baseline   # adds provider numba_ce-cupy@7c6f9f1

The snapshot is the package at a commit (``git archive``), loaded under the top-level name
``numba_ce_baseline``: numba_ce imports its own modules relatively, so the two copies do not
share a module, a compiled kernel or a cache entry. A device run carries the folder (it is
git-ignored: name it in the device tool's carry).
"""
import argparse
import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "numba_ce_baseline"
LABEL_FILE = "LABEL"  # the commit the snapshot came from, as git names it briefly


def snapshot(ref, folder):
    """Write numba_ce as it was at ``ref`` into ``folder`` (replacing what was there), with a
    LABEL file naming the commit; returns the label."""
    label = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", label, "numba_ce"], cwd=ROOT,
                             check=True, capture_output=True).stdout
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / LABEL_FILE).write_text(label + "\n")
    return label


def load(folder):
    """(the snapshot's numba_ce as module ``numba_ce_baseline``, its label)."""
    folder = Path(folder)
    # The working tree's numba_ce first: Numba and numba-cuda are then imported with its NumPy
    # mend (numba_ce.numpy_compat), which a snapshot older than the mend does not have.
    importlib.import_module("numba_ce")
    if PACKAGE not in sys.modules:
        init = folder / "numba_ce" / "__init__.py"
        if not init.is_file():
            raise FileNotFoundError(f"no numba_ce package under {folder} (expected {init}); "
                                    "make one with python -m bench.baseline REF")
        spec = importlib.util.spec_from_file_location(
            PACKAGE, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACKAGE]
            raise
    return sys.modules[PACKAGE], (folder / LABEL_FILE).read_text().strip()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="a commit, branch or tag")
    parser.add_argument("--into", type=Path, default=ROOT / ".baseline",
                        help="the folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    label = snapshot(args.ref, args.into)
    print(f"numba_ce at {label} in {args.into}: python -m bench.run --baseline {args.into}")


if __name__ == "__main__":
    main()
