"""Issue 28: one process per output directory, a full disk, a damaged model file, a failing reward function, a
server answering non-JSON, and the small ones (SIGTERM, a prompt too long, failed judge calls, a dropped pair).

Each test builds the situation (a second process, a disk that fills, a cut file, a raising function) and checks
the clear error, the exit code, the manifest and that nothing is lost or done twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


# ------------------------------------------------------------------------------ 4. a damaged model file

def _cut(path, keep: int) -> int:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return len(data)


def test_cut_model_file_is_a_model_error_naming_file_size_and_problem(tmp_path, tiny_model_dir):
    """`alignline sample` on a model whose model.safetensors lost its last 1000 bytes: exit 2, the file, its size
    and how many bytes are missing, no traceback."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    full = _cut(weights, weights.stat().st_size - 1000)
    write_prompts(tmp_path / "prompts.jsonl", 2)
    res = alignline("sample", *sample_args(tmp_path, model, tmp_path / "out", 4))
    said = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{weights} ({full - 1000:,} bytes) is damaged: it is cut short: its tensors need {full:,} bytes, " \
           "1,000 more than it holds" in said


@pytest.mark.parametrize("damage", ["header", "tail", "padded", "tiny"])
def test_every_loader_names_a_damaged_weight_file(damage, tmp_path, tiny_model, tiny_tokenizer):
    """Causal LM, reward model and a LoRA adapter's own file: a ModelError naming the file before transformers,
    peft or safetensors open it."""
    from alignline.errors import ModelError
    from alignline.models import LoraSettings, apply_lora, load_causal_lm, load_reward_model, save_model

    plain = save_model(tiny_model, tiny_tokenizer, tmp_path / "plain")
    adapter = save_model(apply_lora(tiny_model, LoraSettings(r=2)), tiny_tokenizer, tmp_path / "adapter")
    for path, load in ((plain / "model.safetensors", load_causal_lm), (plain / "model.safetensors", load_reward_model),
                       (adapter / "adapter_model.safetensors", load_causal_lm)):
        good = path.read_bytes()
        expected = {"header": "announce a", "tail": "cut short: its tensors need", "tiny": "too small",
                    "padded": "bytes after its last tensor"}[damage]
        path.write_bytes({"header": good[:100], "tail": good[:-1], "tiny": good[:5], "padded": good + b"\0" * 7}[damage])
        with pytest.raises(ModelError, match=f"{path.name} .* bytes\\) is damaged: .*{expected}"):
            load(path.parent)
        path.write_bytes(good)


# ------------------------------------------------------------------------------ 5. a server answering non-JSON

class HtmlEverywhere(BaseHTTPRequestHandler):
    """HTTP 200 with a JSON content type and an HTML body, for every GET (counted)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.gets += 1
        body = b"<html><head><title>Sign in</title></head><body>proxy login</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_connection_check_names_url_and_body_of_a_non_json_200(tmp_path, monkeypatch, capsys):
    """`GET /models` answered 200 with HTML: retried (1 + max_retries), then exit 2 naming the URL and the body's
    first bytes; no AttributeError from the client's parser."""
    from tests.test_reliability import cli

    srv = ThreadingHTTPServer(("127.0.0.1", 0), HtmlEverywhere)
    srv.gets = 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/v1"
    write_prompts(tmp_path / "prompts.jsonl", 2)
    try:
        code, err = cli(monkeypatch, capsys, "sample", f"prompts={tmp_path / 'prompts.jsonl'}", "engine=openai",
                        "model=fake", f"openai.base_url={url}", "openai.max_retries=2", "openai.backoff_base_s=0",
                        f"output_dir={tmp_path / 'out'}")
    finally:
        srv.shutdown()
    said = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and "AttributeError" not in err, err
    assert f"the endpoint at {url} answered GET {url}/models with HTTP 200 and a body that is not JSON (72 bytes, " \
           "starting b'<html><head><title>Sign in</title>" in said
    assert srv.gets == 3
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------------------ 3. a reward function that raises

FAILING_REWARD = textwrap.dedent("""
    def score(prompt, texts):
        if prompt.id == {bad!r}:
            raise KeyError(prompt.id)
        return [float(len(t)) for t in texts]

    def fails_on_one_prompt(prompts, responses):
        return [score(p, ts) for p, ts in zip(prompts, responses)]
""")


def test_reward_function_that_raises_names_function_prompt_iteration_and_keeps_its_traceback(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    """rl with a `module:callable` reward that raises on one prompt of iteration 1 (iteration 0 does not draw it):
    exit 2, the error names the function, the prompt and the iteration with the user's traceback lines (file, line,
    code) below, the manifest says failed; after the fix the same command finishes, reusing iteration 0's rollout."""
    from tests.test_reliability import cli
    from tests.test_rl import write_prompts as write_rl_prompts

    from alignline.stages.rl import RLConfig
    from alignline.train.rollout import draw_prompts

    seed = RLConfig.model_validate({"model": "m", "prompts": "p"}).train.seed
    first, second = (set(draw_prompts(8, 4, seed, it)) for it in (0, 1))
    bad = f"p{min(second - first)}"
    module = tmp_path / "round3_rewards.py"
    module.write_text(FAILING_REWARD.format(bad=bad))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "rl"
    argv = ["rl", f"model={tiny_model_dir}", f"prompts={write_rl_prompts(tmp_path / 'prompts.jsonl')}",
            f"output_dir={out}", "iterations=2", "rollout.prompts=4", "rollout.group_size=2",
            "rollout.sampling.max_new_tokens=4", "train.batch_size=8", "train.grad_accum=1",
            'reward=[{type: function, function: "round3_rewards:fails_on_one_prompt"}]']
    code, err = cli(monkeypatch, capsys, *argv)
    said = " ".join(err.split())
    assert code == 2, err
    assert f"reward function round3_rewards:fails_on_one_prompt raised KeyError: '{bad}' on prompt '{bad}' in rl " \
           "iteration 1" in said
    assert f'File "{module}", line 4, in score raise KeyError(prompt.id) KeyError: \'{bad}\'' in said
    assert "alignline/stages" not in err and "alignline/rewards.py" not in err  # the user's frames only
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "round3_rewards:fails_on_one_prompt" in manifest["error"]
    first_rollout = (out / "rollouts" / "iter-00000.jsonl").read_bytes()
    assert not (out / "rollouts" / "iter-00001.jsonl").exists()

    module.write_text(FAILING_REWARD.format(bad="none"))
    sys.modules.pop("round3_rewards", None)
    code, err = cli(monkeypatch, capsys, *argv)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert (out / "rollouts" / "iter-00000.jsonl").read_bytes() == first_rollout


# ------------------------------------------------------------------------------ 6. the small ones

def test_eval_winrate_whose_judge_calls_all_fail_ends_failed(tmp_path, monkeypatch, capsys):
    """Every judge call answered 200 with HTML (retried, then failed): 2 of 2 prompts without an outcome is more
    than max_failure_fraction=0.5, so exit 2 and a failed manifest, with results.json written; at 1.0 the same
    outputs are accepted (the setting is not part of the fingerprint: the rerun reuses the run)."""
    from tests.test_reliability import FakeOpenAI, cli
    from tests.test_reliability import write_prompts as write_q_prompts

    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    srv.mode, srv.seen = "nonjson", []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    prompts = write_q_prompts(tmp_path / "prompts.jsonl")
    for name in ("model", "reference"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"prompt_id": f"q{i}", "sample_idx": 0, "text": f"{name} answer {i}", "source": name}) + "\n"
            for i in range(2)))
    argv = ["eval", "winrate", f"prompts={prompts}", f"model.responses={tmp_path / 'model.jsonl'}", "model.name=m",
            f"reference.responses={tmp_path / 'reference.jsonl'}", "reference.name=r", "judge.engine=openai",
            "judge.model=fake", f"judge.openai.base_url=http://127.0.0.1:{srv.server_port}/v1",
            "judge.openai.max_retries=0", "judge.openai.backoff_base_s=0", f"output_dir={tmp_path / 'winrate'}"]
    try:
        code, err = cli(monkeypatch, capsys, *argv)
        assert code == 2, err
        assert "eval winrate: 2 of 2 judged prompts failed (100%), more than max_failure_fraction=0.5" in " ".join(err.split())
        manifest = json.loads((tmp_path / "winrate" / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "TooManyFailuresError" in manifest["error"]
        assert json.loads((tmp_path / "winrate" / "results.json").read_text())["judge_failures"] == 2
        code, err = cli(monkeypatch, capsys, *argv, "max_failure_fraction=1.0")
        assert code == 0, err
    finally:
        srv.shutdown()


def test_prompt_longer_than_the_context_is_named_by_id_and_file_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The tiny model's context is 1024 tokens; the byte-level prompt on line 3 has over 1100: the error names the
    file, line 3 and the prompt's id, not its index in a batch."""
    from tests.test_reliability import cli

    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": "x" * (1100 if i == 2 else 5)}]} for i in range(4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = cli(monkeypatch, capsys, "sample", *sample_args(tmp_path, tiny_model_dir, tmp_path / "out", 4))
    said = " ".join(err.split())
    assert code == 2, err
    assert f"{tmp_path / 'prompts.jsonl'}:3, field 'messages': prompt 'p2' has " in said
    assert "which fills the model's context of 1024 tokens" in said


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


def test_identical_pair_is_dropped_with_its_file_and_line(tmp_path, tiny_tokenizer):
    """Line 2 of the pairs file has chosen == rejected (after stripping): dropped when read, counted as
    dropped_identical_text and listed as file:2 in dropped_lines."""
    from collections import Counter

    from alignline.train.preference import PairData, load_pairs_for

    rows = [{"id": f"x{i}", "prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    rows[1]["rejected"] = "good 1 "
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = Counter()
    train, _ = load_pairs_for(PairData(train=str(path), max_length=128, max_drop_fraction=0.5), tiny_tokenizer, counts)
    assert [p.id for p in train] == ["x0", "x2", "x3"]
    assert counts["dropped_identical_text"] == 1
    assert counts["dropped_lines"] == [f"{path}:2: chosen and rejected are the same text"]


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


def test_annotate_whose_judge_never_parses_ends_failed(tmp_path, monkeypatch):
    """A judge whose 6 outputs all fail to parse: 6 of 6 prompts without a verdict > max_failure_fraction 0.5, so
    the run raises TooManyFailuresError and its manifest says failed; failures.jsonl lists all 6."""
    from tests.test_annotate import llm_cfg, setup_llm

    from alignline.errors import TooManyFailuresError
    from alignline.stages import annotate
    from alignline.stages.common import failures_recorded

    setup_llm(tmp_path, monkeypatch, lambda text: "I refuse.")
    with pytest.raises(TooManyFailuresError, match=r"annotate: 6 of 6 judged prompts failed \(100%\), more than "
                                                   "max_failure_fraction=0.5"), failures_recorded():
        annotate.run(llm_cfg(tmp_path))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "failed"
    assert len((tmp_path / "out" / "failures.jsonl").read_text().splitlines()) == 6
