"""Issue 28: one process per output directory, a full disk, and a stop signal.

Each test builds the situation (a second process or launch, a disk that fills, a SIGTERM) and checks the clear
error, the exit code, the manifest and that nothing is lost or done twice. The bad inputs of the same issue are in
test_reliability_round3_inputs.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from tests.conftest import conversation
from tests.test_sample import args as sample_args
from tests.test_sample import read_responses, write_prompts
from tests.test_sft_cli import alignline

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
    with directory_lock(sys.argv[1], part=sys.argv[2] if len(sys.argv) > 2 else None):
        print("locked", flush=True)
        time.sleep(600)
""")


def _holder(directory, *part: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), *part], env=ENV, stdout=subprocess.PIPE,
                            text=True)
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
    said = ""
    while "waiting for" not in said and waiter.poll() is None:  # lines before it: warnings at import, if any
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


def test_shares_of_a_sharded_sample_lock_apart(tmp_path):
    """sample's shard=i/N: machines filling one directory hold their own share's lock, so share 1/2 runs beside a
    holder of share 0/2 while a second 0/2 is refused."""
    proc = _holder(tmp_path, "0/2")
    with directory_lock(tmp_path, part="1/2", wait=False):
        assert lock_path(tmp_path, "1/2").name == ".alignline.1-2.lock"
    with pytest.raises(DirectoryBusyError, match=".alignline.0-2.lock"), directory_lock(tmp_path, part="0/2", wait=False):
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


def test_a_filesystem_that_cannot_lock_warns_and_runs(tmp_path, monkeypatch, capsys):
    """flock refused by the filesystem (ENOLCK, as some network mounts answer): a warning naming the directory, and
    the stage runs unguarded rather than not at all."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with directory_lock(tmp_path / "run", wait=False):
        pass
    said = " ".join(capsys.readouterr().err.split())
    assert f"warning: cannot lock {tmp_path / 'run'} (No locks available)" in said


# ------------------------------------------------------------------------------ 2. a full disk

@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(kb)``: a tmpfs of that size (skipped where mounting is not allowed); ``grow(path, kb)``."""
    mounted = []

    def mount(kb: int):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(d)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _grow(disk, kb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kb}k", str(disk)], check=True)


def test_a_read_only_output_directory_is_a_config_error(small_disk):
    """An output_dir on a read-only filesystem: a ConfigError naming it (root ignores permission bits, not this)."""
    from alignline.errors import ConfigError

    disk = small_disk(64)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(ConfigError, match=f"cannot write the output directory {disk / 'run'} \\(Read-only file system\\)"), \
            directory_lock(disk / "run", wait=False):
        pass


def sft_config_file(tmp_path, model_dir):
    """sft on 16 conversations, batch 2 (8 steps), a checkpoint every 2 steps."""
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(conversation(i, turns=1 + i % 2)) + "\n" for i in range(16)))
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"model": str(model_dir), "data": {"train": str(data), "max_length": 128},
                                    "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "save_every": 2}}))
    return path


def test_sft_checkpoint_on_a_full_disk_is_a_clear_error_and_resumes_once_there_is_room(tmp_path, tiny_model_dir,
                                                                                     small_disk):
    """A 1 MB disk takes config, manifest and metrics but not a checkpoint of the tiny model (463 kB of weights +
    2 x 463 kB of Adam moments = 1.39 MB): exit 2, the error names the directory, the checkpoint and its size, the
    partial checkpoint is gone and the manifest says failed; with room, the same command finishes."""

    cfg = sft_config_file(tmp_path, tiny_model_dir)
    disk = small_disk(1024)
    out = disk / "sft"
    res = alignline("sft", cfg, f"output_dir={out}")
    said = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert f"no space left on the disk of {out / 'checkpoints'} while writing checkpoint step-0000002 " \
           "(weights and optimizer state): it needs about 1.4 MB" in said
    assert not any((out / "checkpoints").glob("step-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "DiskFullError" in manifest["error"]
    _grow(disk, 16384)
    res = alignline("sft", cfg, f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # nothing logged twice


def test_appended_jsonl_on_a_full_disk_keeps_whole_lines(small_disk):
    """The append-only logs (metrics.jsonl, judge caches): the line that does not fit is cut back off, so the file
    still reads whole, and the error names the file and the line's size."""
    from alignline.errors import DiskFullError
    from alignline.judges.cache import JudgeCache

    disk = small_disk(64)
    with JudgeCache(disk / "judge_cache.jsonl") as cache, pytest.raises(DiskFullError) as caught:
        for i in range(100_000):
            cache.put(f"k{i}", "x" * 1000)
    assert f"{disk} while writing judge_cache.jsonl: it needs about 1.0 kB" in str(caught.value)
    lines = (disk / "judge_cache.jsonl").read_bytes().split(b"\n")
    assert len(lines) > 10 and lines[-1] == b"" and all(json.loads(line)["output"] == "x" * 1000 for line in lines[:-1])


def _enospc(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_shard_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    """ENOSPC in the middle of a shard (simulated: half the bytes written, then the error): no temporary file is
    left and the error names the directory, the shard and its size; the next writer resumes after the last whole
    shard."""
    from pathlib import Path

    from alignline.data.io import ShardedWriter
    from alignline.errors import DiskFullError

    real = Path.write_bytes

    def half_then_full(self, data):
        real(self, data[: len(data) // 2])
        _enospc()

    with ShardedWriter(tmp_path, "responses", shard_size=2, key=lambda o: o["id"]) as w:
        w.add({"id": 1})
        w.add({"id": 2})
    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    w = ShardedWriter(tmp_path, "responses", shard_size=2, key=lambda o: o["id"])
    w.add({"id": 3})
    with pytest.raises(DiskFullError, match=f"disk of {tmp_path} while writing responses-00001.jsonl: it needs about "
                                            "20 bytes"):
        w.add({"id": 4})  # 2 x 10 bytes: {"id": 3} and a newline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["responses-00000.jsonl"]
    monkeypatch.undo()
    assert ShardedWriter(tmp_path, "responses", key=lambda o: o["id"]).done_keys() == {1, 2}


def test_model_dir_on_a_full_disk_is_a_clear_error(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... No space left on device"); save_model names the
    directory, model/ and the weights' size, and leaves no partial directory (the old model/ stays)."""
    from pathlib import Path

    import safetensors
    import transformers.modeling_utils as mu

    from alignline.errors import DiskFullError
    from alignline.models import save_model

    save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          'message: "No space left on device" })')

    monkeypatch.setattr(mu, "safe_save_file", full)
    needed = sum(p.numel() * 4 for p in tiny_model.state_dict().values())
    with pytest.raises(DiskFullError, match=f"disk of {tmp_path} while writing the model model/"):
        save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
    assert needed > 400_000


# ------------------------------------------------------------------------------ 6. SIGTERM, and a second launch

SIGTERMED_SAMPLE = textwrap.dedent("""
    import pathlib, sys, time
    import alignline.stages.sample as sample
    from alignline.cli import main

    flag = pathlib.Path(sys.argv[1])

    def stuck_engine(cfg, device=None):  # the run has started (manifest "running"): wait to be stopped
        flag.touch()
        while True:
            time.sleep(0.05)

    sample.make_engine = stuck_engine
    sys.argv = ["alignline", *sys.argv[2:]]
    main()
""")


def test_sigterm_records_interrupted_with_the_signal_and_the_rerun_resumes(tmp_path, tiny_model_dir):
    """SIGTERM while a stage runs: exit 143 (128 + 15), the manifest says interrupted (signal SIGTERM) with the
    run's fingerprints, the lock is gone, and the same command then completes."""
    driver = tmp_path / "stuck.py"
    driver.write_text(SIGTERMED_SAMPLE)
    write_prompts(tmp_path / "prompts.jsonl", 2)
    out, flag = tmp_path / "out", tmp_path / "started"
    argv = ["sample", *sample_args(tmp_path, tiny_model_dir, out, 4)]
    proc = subprocess.Popen([sys.executable, str(driver), str(flag), *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "rerun the same command to resume" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["signal"] == "SIGTERM"
    assert manifest["config_fingerprint"] and not lock_path(out).exists()
    res = alignline(*argv)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_a_second_launch_is_refused_by_its_main_process_and_writes_nothing(tmp_path, tiny_model_dir):
    """A 2-process torchrun launch of `sample` into a directory another process holds: its main process is refused
    (naming the holder), its other process never writes (it waits at its first collective for the main process
    and is stopped with the launch), so the directory holds no manifest or shard."""
    write_prompts(tmp_path / "prompts.jsonl", 4)
    out = tmp_path / "out"
    holder = _holder(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_endpoint=localhost:0",
           "--rdzv_backend=c10d", "-m", "alignline", "sample", *sample_args(tmp_path, tiny_model_dir, out, 4)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode != 0
    assert f"{out} is in use by another alignline process (pid {holder.pid} on host" in " ".join(res.stderr.split())
    assert sorted(p.name for p in out.iterdir()) == [lock_path(out).name]  # the killed holder's lock file only
