"""``alignline sample``: whole-prompt shards, SIGKILL and rerun gives the same texts with no duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from alignline.config import load_config
from alignline.data.io import iter_jsonl
from alignline.errors import ConfigError
from alignline.stages import sample


def write_prompts(path, n):
    path.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me {i}"}]})
                            + "\n" for i in range(n)))


def read_responses(out):
    # iter_jsonl splits on b"\n" only (str.splitlines would also split on U+2028 etc. inside strings)
    rows = [obj for p in sorted(out.glob("responses-*.jsonl")) for _, obj in iter_jsonl(p)]
    return {(r["prompt_id"], r["sample_idx"]): r for r in rows}, len(rows)


def args(tmp_path, model_dir, out, n_tokens=24):
    return [f"prompts={tmp_path / 'prompts.jsonl'}", f"model={model_dir}", f"output_dir={out}", "n=3",
            "sampling.temperature=1.0", f"sampling.max_new_tokens={n_tokens}", "prompts_per_shard=2", "sampling.seed=5"]


def test_sample_kill_and_resume_gives_identical_texts(tmp_path, tiny_model_dir):
    write_prompts(tmp_path / "prompts.jsonl", 30)
    full_out = tmp_path / "full"
    sample.run(load_config(sample.SampleConfig, None, args(tmp_path, tiny_model_dir, full_out, 40)))
    full, n_full = read_responses(full_out)
    assert n_full == 90 and len(full) == 90
    assert {r["finish_reason"] for r in full.values()} <= {"stop", "length"}

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "alignline", "sample", *args(tmp_path, tiny_model_dir, out, 40)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("responses-*.jsonl"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial, _ = read_responses(out)
    assert 0 < len(partial) < 90 and len(partial) % 3 == 0  # whole prompts only
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed, n_rows = read_responses(out)
    assert n_rows == 90 and set(resumed) == set(full)  # no duplicates, none missing
    assert all(resumed[k]["text"] == full[k]["text"] for k in full)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["resumed_prompts"] == len(partial) // 3


def test_seed_changes_text(tmp_path, tiny_model_dir):
    write_prompts(tmp_path / "prompts.jsonl", 2)
    a = sample.run(load_config(sample.SampleConfig, None, args(tmp_path, tiny_model_dir, tmp_path / "a")))
    b = sample.run(load_config(sample.SampleConfig, None, [*args(tmp_path, tiny_model_dir, tmp_path / "b"),
                                                           "sampling.seed=6"]))
    ra, _ = read_responses(a)
    rb, _ = read_responses(b)
    assert [ra[k]["text"] for k in sorted(ra)] != [rb[k]["text"] for k in sorted(rb)]


def test_bad_settings(tmp_path, tiny_model_dir):
    write_prompts(tmp_path / "prompts.jsonl", 2)
    with pytest.raises(ConfigError, match="n"):
        load_config(sample.SampleConfig, None, [*args(tmp_path, tiny_model_dir, tmp_path / "x"), "n=0"])
    from alignline.errors import ModelError

    with pytest.raises(ModelError, match="not found"):
        sample.run(load_config(sample.SampleConfig, None, [*args(tmp_path, tiny_model_dir, tmp_path / "y"),
                                                           "model=no-such-model"]))


def test_openai_engine_with_no_server_fails_before_sampling(tmp_path):
    """Nothing listens on the port: the stage stops with a clear error naming the URL and writes no shards,
    instead of recording every response as failed and marking the stage complete."""
    import socket

    from alignline.errors import AlignlineError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    write_prompts(tmp_path / "prompts.jsonl", 2)
    cfg = load_config(sample.SampleConfig, None, [
        f"prompts={tmp_path / 'prompts.jsonl'}", "model=served-model", "engine=openai", f"output_dir={tmp_path / 'o'}",
        f"openai.base_url=http://127.0.0.1:{port}/v1", "openai.api_key_env=NO_SUCH_KEY_VAR_SET", "openai.timeout_s=2"])
    os.environ["NO_SUCH_KEY_VAR_SET"] = "k"
    try:
        with pytest.raises(AlignlineError, match=f"127.0.0.1:{port}"):
            sample.run(cfg)
    finally:
        del os.environ["NO_SUCH_KEY_VAR_SET"]
    assert not list((tmp_path / "o").glob("responses-*.jsonl"))
