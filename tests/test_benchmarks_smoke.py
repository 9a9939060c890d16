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
