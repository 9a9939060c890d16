"""Issue 17: a finished stage keeps its final model, not its resumable checkpoints (nor tso's intermediate
versions) unless asked; an interrupted or failed stage keeps them and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import conversation
from tests.test_dpo import make_pairs, tso_cfg

from alignline.config import load_config
from alignline.stages import sft, tso
from alignline.stages.common import failures_recorded


def manifest(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def same_weights(a, b) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.fixture
def sft_config(tmp_path, tiny_model_dir):
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(conversation(i, turns=1 + i % 2)) + "\n" for i in range(8)))

    def make(name: str, *overrides: str) -> sft.SFTConfig:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(tiny_model_dir), "output_dir": str(tmp_path / name),
            "data": {"train": str(data), "max_length": 128, "packing": False},
            "train": {"epochs": 1, "max_steps": 4, "batch_size": 2, "lr": 1e-3, "save_every": 1,
                      "mixed_precision": "no"}}))
        return load_config(sft.SFTConfig, path, list(overrides))

    return make


def test_finished_sft_drops_its_checkpoints_and_lists_them(sft_config, capsys):
    out = sft.run(sft_config("run"))
    assert (out / "model" / "model.safetensors").exists() and not (out / "checkpoints").exists()
    m = manifest(out)
    assert m["status"] == "complete"
    [entry] = m["dropped"]
    assert entry["path"] == "checkpoints" and entry["bytes"] > 0
    assert entry["kept_with"] == "train.keep_checkpoints_when_done=true"
    said = capsys.readouterr().err
    assert "removed checkpoints/" in said and "train.keep_checkpoints_when_done=true keeps them" in said
    # the setting is not part of the result: asking for the checkpoints afterwards finds the run up to date
    stamp = (out / "manifest.json").stat().st_mtime_ns
    sft.run(sft_config("run", "train.keep_checkpoints_when_done=true"))
    assert "up to date" in capsys.readouterr().err
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and not (out / "checkpoints").exists()


def test_finished_sft_keeps_its_checkpoints_when_asked(sft_config):
    out = sft.run(sft_config("kept", "train.keep_checkpoints_when_done=true", "train.keep_checkpoints=2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]
    assert "dropped" not in manifest(out)


def test_stopped_or_failed_sft_keeps_its_checkpoints_and_resumes_exactly(sft_config, monkeypatch):
    whole = sft.run(sft_config("whole"))
    stopped = sft.run(sft_config("part", "train.stop_after_step=2"))
    assert (stopped / "checkpoints" / "step-0000002" / "COMPLETE").exists() and not (stopped / "model").exists()

    calls = {"n": 0}
    real_loss = sft.causal_lm_loss

    def failing_at_step_4(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step after the resume: step 4
            raise RuntimeError("killed")
        return real_loss(model, batch)

    monkeypatch.setattr(sft, "causal_lm_loss", failing_at_step_4)
    with pytest.raises(RuntimeError, match="killed"), failures_recorded():
        sft.run(sft_config("part"))
    assert manifest(stopped)["status"] == "failed"
    assert (stopped / "checkpoints" / "step-0000003" / "COMPLETE").exists()
    monkeypatch.setattr(sft, "causal_lm_loss", real_loss)
    resumed = sft.run(sft_config("part"))
    same_weights(whole / "model", resumed / "model")
    assert not (resumed / "checkpoints").exists() and manifest(resumed)["dropped"][0]["path"] == "checkpoints"


def test_finished_tso_keeps_only_its_final_version(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(16)))
    out = tso.run(tso_cfg(tmp_path / "a", tiny_model_dir, pairs, minibatches=2))
    assert (out / "versions" / "v2" / "model.safetensors").exists() and not (out / "versions" / "v1").exists()
    assert not list(out.glob("iter-*/checkpoints")) and (out / "iter-1" / "metrics.jsonl").exists()
    m = manifest(out)
    # mini-batch 1's final checkpoint is where mini-batch 2 would resume from; the last one writes none
    assert {e["path"]: e["kept_with"] for e in m["dropped"]} == {
        "versions/v1": "keep_versions=true", "iter-1/checkpoints": "train.keep_checkpoints_when_done=true"}
    assert m["model_dir"] == str(out / "versions" / "v2")
    rows = json.loads((out / "versions.json").read_text())
    assert [r.get("removed", False) for r in rows] == [False, True, False]

    kept = tso.run(tso_cfg(tmp_path / "b", tiny_model_dir, pairs, minibatches=2, keep_versions="true",
                           **{"train.keep_checkpoints_when_done": "true"}))
    assert all((kept / "versions" / f"v{k}" / "model.safetensors").exists() for k in (1, 2))
    assert len(list(kept.glob("iter-*/checkpoints/step-*"))) == 2 and "dropped" not in manifest(kept)
    same_weights(out / "versions" / "v2", kept / "versions" / "v2")


def test_interrupted_tso_keeps_its_versions_and_resumes_exactly(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(16)))
    whole = tso.run(tso_cfg(tmp_path / "a", tiny_model_dir, pairs, minibatches=2))
    part = tso.run(tso_cfg(tmp_path / "b", tiny_model_dir, pairs, minibatches=2, stop_at="[2, 1]"))
    assert (part / "versions" / "v1" / "model.safetensors").exists()
    assert list(part.glob("iter-1/checkpoints/step-*")) and list(part.glob("iter-2/checkpoints/step-*"))
    resumed = tso.run(tso_cfg(tmp_path / "b", tiny_model_dir, pairs, minibatches=2))
    same_weights(whole / "versions" / "v2", resumed / "versions" / "v2")
    assert not (resumed / "versions" / "v1").exists() and not list(resumed.glob("iter-*/checkpoints"))


def test_lora_stage_can_save_its_adapter_alone(sft_config, tiny_model_dir):
    """lora.save=adapter: model/ holds the adapter alone (no full model.safetensors); loading it gives the base
    weights plus the trained update, W + (alpha / r) B A (alpha 32, r 4: scale 8), checked on one projection."""
    from alignline.models import load_causal_lm

    out = sft.run(sft_config("adapter", "lora.r=4", "lora.save=adapter"))
    assert (out / "model" / "adapter_model.safetensors").exists()
    assert not (out / "model" / "model.safetensors").exists()
    loaded = load_causal_lm(out / "model", dtype="float32").state_dict()
    base = load_causal_lm(tiny_model_dir, dtype="float32").state_dict()
    lora = load_file(str(out / "model" / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    [a] = [v for k, v in lora.items() if name in k and "lora_A" in k]
    [b] = [v for k, v in lora.items() if name in k and "lora_B" in k]
    assert b.abs().max() > 0  # trained: the update is not the zero it starts from
    torch.testing.assert_close(loaded[f"{name}.weight"], base[f"{name}.weight"] + 8.0 * b @ a, rtol=0, atol=1e-5)
