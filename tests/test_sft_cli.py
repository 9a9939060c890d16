"""The SFT stage through its command line, end to end on a tiny model; and bad input through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from tests.conftest import conversation


def alignline(*args, cwd=None, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "alignline", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture
def sft_setup(tmp_path, tiny_model_dir):
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(conversation(i, turns=1 + i % 2)) + "\n" for i in range(16)))
    cfg = {
        "model": str(tiny_model_dir),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(data), "eval": str(data), "max_length": 128},
        "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "save_every": 2},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tmp_path, path


def test_sft_cli_end_to_end(sft_setup):
    tmp_path, cfg = sft_setup
    res = alignline("sft", cfg, "train.lr=5e-4")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    assert (run / "model" / "model.safetensors").exists()
    assert not list((run / "model").glob("*.bin"))
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 5e-4 and resolved["train"]["adam_betas"] == [0.9, 0.999]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["conversations"] == 16
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "eval/loss" in metrics[0]  # the starting point
    assert any("eval/loss" in m for m in metrics[1:]) and all(m["step"] >= 1 for m in metrics if "loss" in m)
    assert str(run / "model") in res.stderr  # prints where the checkpoint is
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "model", use_safetensors=True)

    again = alignline("sft", cfg, "train.lr=5e-4")
    assert again.returncode == 0 and "up to date" in again.stderr


def test_sft_cli_help_config_lists_every_field():
    res = alignline("sft", "--help-config")
    assert res.returncode == 0
    for name in ("data.max_length", "data.packing", "train.lr", "train.warmup_ratio", "lora"):
        assert name in res.stdout


def test_cli_lists_stages():
    res = alignline("--help")
    assert res.returncode == 0 and "prepare" in res.stdout and "sft" in res.stdout


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]', "malformed JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}], "id": "x"}', "last message must be an assistant turn"),
        ('{"id": "x", "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}]}',
         "messages[0].role is 'assistant' but 'user' was expected"),
        ('{"id": "x", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
         "messages[1].role is 'user' but 'assistant' was expected"),
        ('{"id": "x", "messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}',
         "content is empty"),
        ('{"id": "x", "mesages": []}', "missing field"),
    ],
)
def test_bad_conversation_line_names_file_and_line(sft_setup, line, expected):
    tmp_path, cfg = sft_setup
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(conversation(1))
    bad.write_text(good + "\n" + line + "\n")
    res = alignline("sft", cfg, f"data.train={bad}")
    assert res.returncode == 2
    assert f"{bad}:2" in res.stderr and expected in res.stderr
    assert "Traceback" not in res.stderr


def test_non_utf8_bytes(sft_setup):
    tmp_path, cfg = sft_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(conversation(1)).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    res = alignline("sft", cfg, f"data.train={bad}")
    assert res.returncode == 2 and f"{bad}:2" in res.stderr and "not UTF-8" in res.stderr


def test_missing_model_path(sft_setup):
    tmp_path, cfg = sft_setup
    res = alignline("sft", cfg, f"model={tmp_path / 'nope'}")
    assert res.returncode == 2 and "not found" in res.stderr and "Traceback" not in res.stderr


def test_bad_setting_names_field_and_fix(sft_setup):
    _, cfg = sft_setup
    res = alignline("sft", cfg, "train.lrr=1")
    assert res.returncode == 2 and "unknown setting 'train.lrr'" in res.stderr and "did you mean 'train.lr'" in res.stderr
    res = alignline("sft", cfg, "train.batch_size=0")
    assert res.returncode == 2 and "train.batch_size" in res.stderr


def test_over_long_examples_are_cut_and_counted(sft_setup):
    tmp_path, cfg = sft_setup
    res = alignline("sft", cfg, "data.max_length=24", "data.long_examples=truncate")
    assert res.returncode == 2 and "no usable examples" in res.stderr  # every response would be cut away
    res = alignline("sft", cfg, "data.max_length=60", "data.long_examples=truncate")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["counts"]["over_length"] == 16
    assert manifest["counts"]["examples"] + manifest["counts"].get("dropped_no_response_after_truncation", 0) == 16
