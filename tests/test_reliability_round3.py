"""Issue 28: one process per output directory, a full disk, a damaged model file, a failing reward function, a
server answering non-JSON, and the small ones (SIGTERM, a prompt too long, failed judge calls, a dropped pair).

Each test builds the situation (a second process, a disk that fills, a cut file, a raising function) and checks
the clear error, the exit code, the manifest and that nothing is lost or done twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from tests.test_sample import args as sample_args
from tests.test_sample import read_responses, write_prompts

from alignline.config import load_config
from alignline.data.dirlock import directory_lock, lock_path
from alignline.errors import DirectoryBusyError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _wait_for_exit(procs: list[subprocess.Popen], limit_s: float = 600) -> subprocess.Popen:
    """The first of ``procs`` to exit (``limit_s`` only guards against a hang)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                return p
        time.sleep(0.05)
    raise AssertionError("no process exited")


# ------------------------------------------------------------------------------ 1. one process per directory

GATED_SAMPLE = textwrap.dedent("""
    import pathlib, sys, time
    import alignline.stages.sample as sample
    from alignline.cli import main

    real, gate = sample.run, pathlib.Path(sys.argv[1])

    def gated(cfg):  # holds the lock (taken by the stage runner) until the test opens the gate
        while not gate.exists():
            time.sleep(0.05)
        return real(cfg)

    sample.run = gated
    sys.argv = ["alignline", *sys.argv[2:]]
    main()
""")


def test_two_samples_in_one_directory_one_is_refused_the_other_equals_a_lone_run(tmp_path, tiny_model_dir):
    """Two `alignline sample` into one output_dir started together: the one that gets the lock waits (inside the
    stage, lock held) until the other has exited, so the refusal is certain; the other's shards equal a lone run's
    (no prompt twice, none missing, the same texts)."""
    from alignline.stages import sample

    write_prompts(tmp_path / "prompts.jsonl", 6)
    driver = tmp_path / "gated.py"
    driver.write_text(GATED_SAMPLE)
    out, gate = tmp_path / "together", tmp_path / "go"
    cmd = [sys.executable, str(driver), str(gate), "sample", *sample_args(tmp_path, tiny_model_dir, out, 8)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    refused = _wait_for_exit(procs)
    holder = procs[1 - procs.index(refused)]
    gate.touch()
    _, err = refused.communicate()
    holder_out, holder_err = holder.communicate(timeout=600)
    assert refused.returncode == 2, err[-2000:]
    assert f"{out} is in use by another alignline process (pid {holder.pid} on host" in " ".join(err.split())
    assert "--wait-lock" in err and "Traceback" not in err
    assert holder.returncode == 0, holder_err[-2000:]

    lone = sample.run(load_config(sample.SampleConfig, None, sample_args(tmp_path, tiny_model_dir, tmp_path / "lone", 8)))
    together, rows = read_responses(out)
    alone, lone_rows = read_responses(lone)
    assert rows == lone_rows == 18 and together == alone
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not lock_path(out).exists()  # released and removed


HOLD = textwrap.dedent("""
    import sys, time
    from alignline.data.dirlock import directory_lock
    with directory_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


def _holder(directory) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    """The lock is the kernel's: SIGKILL releases it, and the file it leaves behind blocks nothing."""
    proc = _holder(tmp_path / "run")
    with pytest.raises(DirectoryBusyError, match=f"pid {proc.pid} on host .* running since"), \
            directory_lock(tmp_path / "run", wait=False):
        pass
    proc.kill()
    proc.wait()
    assert lock_path(tmp_path / "run").exists()
    with directory_lock(tmp_path / "run", wait=False):
        assert json.loads(lock_path(tmp_path / "run").read_text())["pid"] == os.getpid()


def test_wait_lock_waits_for_the_holder_then_runs(tmp_path, tiny_tokenizer_dir):
    """`--wait-lock`: the second process says whom it waits for, runs once the first lets go, and exits 0."""
    from tests.test_prepare import sharegpt_file

    sharegpt_file(tmp_path / "sg.json")
    out = tmp_path / "prep"
    proc = _holder(out)
    cmd = [sys.executable, "-m", "alignline", "prepare", f"path={tmp_path / 'sg.json'}", f"output_dir={out}",
           f"tokenizer={tiny_tokenizer_dir}", "--wait-lock"]
    waiter = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = waiter.stderr.readline()
    assert f"waiting for {out}: in use by pid {proc.pid}" in said
    assert waiter.poll() is None
    proc.kill()
    proc.wait()
    _, err = waiter.communicate(timeout=600)
    assert waiter.returncode == 0, err[-2000:]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_lock_is_reentrant_in_a_process_and_left_to_the_main_process_of_a_launch(tmp_path, monkeypatch):
    """A composition holding its directory runs a sub-stage there without deadlock; the other processes of an
    accelerate launch (RANK > 0) take no lock (their main process holds it for the launch)."""
    with directory_lock(tmp_path), directory_lock(tmp_path / "."):
        assert lock_path(tmp_path).exists()
    assert not lock_path(tmp_path).exists()
    proc = _holder(tmp_path)
    monkeypatch.setenv("RANK", "1")
    with directory_lock(tmp_path, wait=False):  # no refusal: not the launch's main process
        pass
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DirectoryBusyError), directory_lock(tmp_path, wait=False):
        pass
    proc.kill()
    proc.wait()


def test_a_lock_file_changes_no_fingerprint(tmp_path):
    from alignline.data.io import fingerprint

    (tmp_path / "a.jsonl").write_text("{}\n")
    before = fingerprint(tmp_path)
    lock_path(tmp_path).write_text('{"pid": 1}')
    assert fingerprint(tmp_path) == before


def test_pipeline_refuses_an_output_root_in_use(tmp_path):
    """A second `alignline run` of a pipeline is refused at its output root before any stage or pipeline.json."""
    from alignline.pipeline import run_pipeline

    (tmp_path / "p.yaml").write_text(f"output_root: {tmp_path / 'root'}\nstages:\n"
                                     "  - {name: prep, stage: prepare, overrides: {tokenizer: null}}\n")
    proc = _holder(tmp_path / "root")
    with pytest.raises(DirectoryBusyError, match="root is in use"):
        run_pipeline(tmp_path / "p.yaml", [], report=False)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "root" / "pipeline.json").exists() and not (tmp_path / "root" / "prep").exists()
