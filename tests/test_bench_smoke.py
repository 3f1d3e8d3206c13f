"""The benchmark harness's code paths, without a GPU: ``python -m bench.run --smoke`` runs numba_ce
(NumPy arrays, CUDA simulator) and torch eager on the CPU, and must leave the committed results
file alone."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "results.csv"
# The run takes about 9 s on an idle 2-core machine (12 simulated calls of ~0.3 s, imports); the
# limit only stops a hung run, since a machine busy with other simulator tests is 3-4x slower.
TIMEOUT_SECONDS = 120


def test_smoke_run_prints_rows_and_writes_only_under_out(tmp_path):
    pytest.importorskip("torch")  # the harness times torch eager beside numba_ce
    committed_before = COMMITTED.read_bytes()
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_SECONDS)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    printed = [line for line in proc.stdout.splitlines() if " ms [" in line]
    assert any(line.startswith("numba_ce-numpy") and " fwd_bwd " in line for line in printed)
    assert any(line.startswith("torch-eager") and " fwd_bwd " in line for line in printed)
    assert "LOSS OFF" not in proc.stdout
    assert "skipped liger" in proc.stdout and "skipped quack" in proc.stdout
    assert "| 8 x 128 bf16 |" in proc.stdout  # the markdown tables

    with open(tmp_path / "bench" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["provider"], r["mode"]) for r in rows} >= {
        (p, m) for p in ("numba_ce-numpy", "torch-eager") for m in ("loss", "fwd_bwd", "accum")}
    options = {"plain", "smooth_z", "ignore30", "softcap", "outputs"}
    assert {r["options"] for r in rows} == options
    assert all(float(r["ms_p50"]) > 0 and r["gpu"] for r in rows)
    assert (tmp_path / "bench" / "run.log").stat().st_size > 0
    assert COMMITTED.read_bytes() == committed_before


def test_a_baseline_snapshot_is_timed_beside_the_working_tree(tmp_path):
    """python -m bench.baseline writes numba_ce as it was at a commit; bench.run --baseline loads
    it under its own package name and times it beside the working tree's, in one run."""
    pytest.importorskip("torch")
    snapshot = tmp_path / "baseline"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1")
    made = subprocess.run([sys.executable, "-m", "bench.baseline", "HEAD", "--into",
                           str(snapshot)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_SECONDS)
    assert made.returncode == 0, made.stdout + made.stderr
    label = (snapshot / "LABEL").read_text().strip()
    assert (snapshot / "numba_ce" / "kernels.py").is_file()
    baseline = f"numba_ce-numpy@{label}"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path),
                           "--baseline", str(snapshot), "--providers",
                           f"numba_ce-numpy,{baseline}", "--options", "plain", "--modes",
                           "fwd_bwd"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_SECONDS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "bench" / "results.csv", newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"numba_ce-numpy", baseline}
    assert rows["numba_ce-numpy"]["loss"] == rows[baseline]["loss"]  # the same code, twice
    assert f"baseline: numba_ce {label} from {snapshot / 'numba_ce'}" in proc.stdout


def test_a_missing_baseline_says_how_to_make_one(tmp_path):
    from bench import baseline
    with pytest.raises(FileNotFoundError, match="make one with python -m bench.baseline REF"):
        baseline.load(tmp_path / "missing")


def run_smoke(name, tmp_path):
    """(stdout, rows of OUT/bench/NAME.csv) of ``python -m bench.NAME --smoke --out tmp_path``,
    which must exit 0 and leave the committed bench/results/NAME.csv as it was."""
    committed = ROOT / "bench" / "results" / f"{name}.csv"
    before = committed.read_bytes() if committed.exists() else None
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--smoke", "--out",
                           str(tmp_path)], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (committed.read_bytes() if committed.exists() else None) == before
    with open(tmp_path / "bench" / f"{name}.csv", newline="") as f:
        return proc.stdout, list(csv.DictReader(f))


def test_rows_carry_the_commit_given_for_a_device_copy(monkeypatch):
    """A device machine's copy of the tree may keep an older .git: NUMBA_CE_COMMIT, where set,
    is the commit every row records; unset, it is the clone's own (git's short hash)."""
    from bench import results
    monkeypatch.delenv("NUMBA_CE_COMMIT", raising=False)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert results.environment("CPU", "").get("commit", "").startswith(head)
    monkeypatch.setenv("NUMBA_CE_COMMIT", "8dae400")
    assert results.environment("CPU", "")["commit"] == "8dae400"


def test_hf_step_smoke_trains_each_patch_to_the_same_loss(tmp_path):
    """python -m bench.hf_step --smoke: a tiny Llama's training step with transformers' own loss
    and numba_ce's patch, in the simulator; Liger (not installed here) is skipped with a note;
    the committed results stay as they were."""
    pytest.importorskip("transformers")
    stdout, rows = run_smoke("hf_step", tmp_path)
    rows = {r["provider"]: r for r in rows}
    assert set(rows) == {"transformers", "numba_ce-patch"}
    assert float(rows["numba_ce-patch"]["loss_rel_err"]) < 1e-5  # float32 in the smoke run
    assert "LOSS OFF" not in stdout


def test_compiled_step_smoke_runs_each_loss_eager_and_compiled(tmp_path):
    """python -m bench.compiled_step --smoke: torch's and numba_ce's loss in an LM head's
    training step and alone, eager and under torch.compile (aot_eager on the CPU), all at the
    same first loss; numba_ce's kernels alone beside them; the committed results untouched."""
    pytest.importorskip("torch")
    _, rows = run_smoke("compiled_step", tmp_path)
    found = {(r["what"], r["provider"], r["mode"]) for r in rows}
    assert found == {(what, provider, mode) for what in ("step", "loss")
                     for provider in ("torch", "numba_ce") for mode in ("eager", "compile")
                     } | {("loss", "numba_ce", "kernels")}
    assert len({r["loss"] for r in rows}) == 1, rows  # float32: every provider's first loss


def test_vocab_parallel_smoke_times_every_pass_at_the_fused_loss(tmp_path):
    """python -m bench.vocab_parallel --smoke: the fused kernel, the loss-only kernel and the
    vocab-parallel passes of a world of one, in the simulator, their losses equal (it exits 1
    when one is off); the committed results untouched."""
    pytest.importorskip("torch")
    _, rows = run_smoke("vocab_parallel", tmp_path)
    assert [r["pass"] for r in rows] == ["fused", "loss", "states", "slice-gradient",
                                         "two-pass"]
    assert float(rows[0]["vs_fused"]) == 1.0
