"""Every benchmark script runs end to end in its smoke mode (``--smoke``: a tiny random model, a handful of
examples, peers included where installed), so an API change that breaks a benchmark fails ``make test``.
Nothing is timed here: the scripts' figures are only checked for being there and sane, never against a speed.
The scripts run side by side (each is mostly process start-up), which shortens the wall time on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.common import SMOKE_PENDING, SMOKE_SCRIPTS, peer_installed

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def test_every_benchmark_script_is_smoke_tested_or_excused():
    scripts = {p.name for p in BENCH.glob("*_throughput.py")}
    assert scripts <= set(SMOKE_SCRIPTS) | set(SMOKE_PENDING), scripts - set(SMOKE_SCRIPTS) - set(SMOKE_PENDING)
    assert not set(SMOKE_SCRIPTS) & set(SMOKE_PENDING)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """All smoke scripts started at once; {script: (return code, output, result JSON or None)}."""
    root = tmp_path_factory.mktemp("bench-smoke")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    procs = {}
    for script in SMOKE_SCRIPTS:
        work, out = root / script.removesuffix(".py"), root / f"{script}.json"
        cmd = [sys.executable, str(BENCH / script), "--smoke", "--threads", "1", "--work-dir", str(work),
               "--out", str(out)]
        procs[script] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True), out)
    runs = {}
    for script, (proc, out) in procs.items():
        try:
            output, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        runs[script] = (proc.returncode, output, json.loads(out.read_text()) if out.exists() else None)
    return runs


@pytest.mark.parametrize("script", SMOKE_SCRIPTS)
def test_benchmark_smoke_mode_runs(smoke_runs, script):
    code, output, result = smoke_runs[script]
    assert code == 0, output[-4000:]
    assert result is not None and not result.get("failures")
    rows = result.get("results") or result.get("rows")
    assert rows
    if "limit" in result:  # a training benchmark: share of the measured matmul limit, peers included
        assert result["limit"]["flops_per_s"] > 0
        for row in rows:
            assert row["share_of_limit"] > 0 and row["peak_rss_gb"] > 0, row["config"]
        assert any(r["config"].startswith("alignline") for r in rows)
        assert any(r["config"].startswith("trl") for r in rows) == peer_installed("trl")
        for row in (r for r in rows if r["config"].startswith("alignline")):  # read from the stage's own record
            phases = row["details"]["phases"]
            assert phases["train"]["seconds"] > 0 and phases["train"]["flops"] == sum(
                s["flops"] for s in row["per_step"])


def test_a_retried_row_is_a_fresh_run_of_its_stage(tmp_path):
    """Issue 31: a retried row once ran in the directory where its first attempt had left a complete run; the
    stage found itself up to date, did nothing in 0.4 s, and that attempt was kept. Here ``--force-retry`` measures
    the alignline RL row twice and keeps the second attempt: it must be a real run of the stage (2 smoke
    iterations = 2 optimizer steps) in a directory of its own, the first attempt's run beside it untouched."""
    work, out = tmp_path / "work", tmp_path / "rl.json"
    cmd = [sys.executable, str(BENCH / "rl_throughput.py"), "--smoke", "--threads", "1", "--configs", "alignline",
           "--force-retry", "--work-dir", str(work), "--keep-work-dir", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["failures"] == {}
    (row,) = result["rows"]
    assert row["attempt"] == 2 and row["train_steps"] == 2
    runs = sorted((work / "runs").iterdir())
    assert [r.name.split("-")[1] for r in runs] == ["attempt1", "attempt2"]
    assert row["run_dir"] == str(runs[1])
    first, kept = (json.loads((r / "manifest.json").read_text()) for r in runs)
    assert first["status"] == kept["status"] == "complete" and first["steps"] == kept["steps"] == 2
    assert kept["phases"]["train"]["seconds"] > 0 and kept["written_at"] >= first["written_at"]


def test_stage_refusal_tells_a_skipped_or_short_run(tmp_path):
    """The manifest a stage leaves, as :func:`benchmarks.harness.stage_refusal` reads it: none, still running,
    written before the attempt started (the stage skipped itself: an earlier run's manifest), fewer steps than
    configured, and a run that did the work (written in the attempt's own second, 3 steps of 3)."""
    import time

    from benchmarks.harness import stage_refusal

    def manifest(**fields):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(fields.pop("at")))
        (tmp_path / "manifest.json").write_text(json.dumps({"status": "complete", "steps": 3, "written_at": stamp,
                                                            **fields}))

    started = time.time()
    assert "no readable" in stage_refusal(tmp_path, started, 3)
    manifest(at=started, status="running")
    assert "'running'" in stage_refusal(tmp_path, started, 3)
    manifest(at=started - 60)
    assert "skipped itself" in stage_refusal(tmp_path, started, 3)
    manifest(at=started, steps=2)
    assert "records 2 optimizer steps" in stage_refusal(tmp_path, started, 3)
    manifest(at=started)
    assert stage_refusal(tmp_path, started, 3) is None
