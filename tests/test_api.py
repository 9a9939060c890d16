"""The Python API (``import alignline``): cheap to import, configs by name, stages and pipelines run through the
command line's runners (up to date, failures recorded in the manifest, the same exceptions), results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from tests.conftest import conversation

import alignline
from alignline.api import final_metrics
from alignline.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_is_cheap_and_a_config_loads_its_stage():
    """``import alignline`` and the run functions, result classes and errors import no torch or transformers;
    a config class loads its stage module (and so torch)."""
    code = ("import sys, alignline\n"
            "alignline.run, alignline.run_pipeline, alignline.RunResult, alignline.PipelineRun, alignline.DataError\n"
            "alignline.stage_names()\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
            "alignline.DPOConfig\n"
            "print('alignline.stages.dpo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr


def test_every_stage_config_is_offered():
    from alignline.stages.registry import STAGES

    assert {spec.target.rsplit(":", 1)[1]: spec.key for spec in STAGES} == alignline.CONFIGS
    assert alignline.stage_names() == [spec.key for spec in STAGES]
    assert alignline.SFTConfig.__name__ == "SFTConfig" and "DPOConfig" in dir(alignline)
    with pytest.raises(AttributeError, match="no attribute 'NopeConfig'"):
        alignline.NopeConfig  # noqa: B018


@pytest.fixture
def convs(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(8)))
    return path


def sft_settings(model, out, data) -> dict:
    return {"model": str(model), "output_dir": str(out), "data": {"train": str(data), "max_length": 128},
            "train": {"epochs": 1, "batch_size": 4}}


def test_a_stage_from_a_config_a_file_or_a_mapping(tmp_path, tiny_model_dir, convs):
    settings = sft_settings(tiny_model_dir, tmp_path / "sft", convs)
    cfg = alignline.SFTConfig.model_validate(settings)
    first = alignline.run(cfg, overrides=["train.lr=1e-3"])
    assert first.status == "complete" and first.stage == "sft" and first.config.train.lr == 1e-3
    assert first.config.train.epochs == 1 and cfg.train.lr != 1e-3  # the overrides made a new config
    assert first.manifest == json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert first.metrics["loss"] == first.manifest["final_metrics"]["loss"]
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(settings))
    again = alignline.run("sft", tmp_path / "sft.yaml", overrides=["train.lr=1e-3"])  # the same settings
    assert again.manifest["written_at"] == first.manifest["written_at"]  # up to date: nothing done
    assert alignline.run("sft", settings | {"train": {"epochs": 1, "batch_size": 4, "lr": 1e-3}}).manifest == \
        first.manifest
    assert alignline.run(cfg, overrides="train.lr=1e-3").manifest == first.manifest  # one string: one override


def test_wrong_stage_names_and_configs(tmp_path, tiny_model_dir, convs):
    with pytest.raises(ConfigError, match="unknown stage 'dpoo'; did you mean 'dpo'"):
        alignline.run("dpoo")
    cfg = alignline.SFTConfig.model_validate(sft_settings(tiny_model_dir, tmp_path / "x", convs))
    with pytest.raises(ConfigError, match="stage 'dpo' takes a DPOConfig, not a SFTConfig"):
        alignline.run("dpo", cfg)
    with pytest.raises(ConfigError, match="unknown setting 'train.lrr'"):
        alignline.run(cfg, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="setting 'data' is required"):
        alignline.run("sft", {"model": "m"})
    assert not (tmp_path / "x").exists()  # invalid settings: nothing started


def test_a_failure_is_raised_and_recorded_in_the_manifest(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conversation(0)) + "\n" + '{"id": "x", "messages": "hello"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2, field 'messages'"):
        alignline.run("sft", sft_settings(tiny_model_dir, tmp_path / "sft", bad))
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("DataError: ") and "bad.jsonl:2" in \
        manifest["error"]


def test_a_pipeline_its_results_and_its_failure(tmp_path, tiny_model_dir, convs, monkeypatch):
    import alignline.pipeline.cards as cards

    refreshed = []
    monkeypatch.setattr(cards, "refresh_model_cards", lambda doc, rows: refreshed.append(rows) or [])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"id": "p", "prompt": 3}\n')
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump({"name": "t", "output_root": "out", "stages": [
        {"name": "sft", "stage": "sft", "config": sft_settings(tiny_model_dir, "out/sft", convs)},
        {"name": "dpo", "stage": "dpo", "config": {"model": "${sft}/model", "data": {"train": "bad.jsonl"}}}]}))
    with pytest.raises(DataError, match="bad.jsonl:1"):
        alignline.run_pipeline("pipe.yaml", report=False)
    doc = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert [s["result"]["status"] for s in doc["stages"]] == ["ran", "failed"] and refreshed == [[]]
    assert json.loads((tmp_path / "out" / "dpo" / "manifest.json").read_text())["status"] == "failed"
    result = alignline.run_pipeline("pipe.yaml", overrides=["sft.train.lr=1e-3"], only="sft", report=False)
    assert result.ok and result.output_dir.name == "out" and result.manifest["overrides"] == ["sft.train.lr=1e-3"]
    assert result.stages["sft"].status == "complete" and result.stages["sft"].model_dir.name == "model"
    assert result.stages["dpo"].status == "failed" and result.metrics == {}  # nothing evaluated: no progression


def test_final_metrics_from_a_manifest():
    """Training metrics as they are; held-out figures under eval/; results flattened; bestofn's largest n."""
    manifest = {"final_metrics": {"loss": 0.5, "step": 3}, "eval_metrics": {"loss": 0.7},
                "eval": {"accuracy": 0.75, "accuracy_by_rating": {"slightly": {"pairs": 4, "accuracy": 0.5}},
                         "split": "eval"},
                "results": {"prompt_level_strict": 0.25}, "score": 6.5, "agreement": {"after": {"mae": 1.0}},
                "rows": [{"n": 1, "gold_of_rm_best": 0.1}, {"n": 4, "gold_of_rm_best": 0.4}]}
    assert final_metrics(manifest) == {
        "loss": 0.5, "step": 3, "eval/loss": 0.7, "eval/accuracy": 0.75, "eval/accuracy_by_rating/slightly/pairs": 4,
        "eval/accuracy_by_rating/slightly/accuracy": 0.5, "prompt_level_strict": 0.25, "after/mae": 1.0,
        "score": 6.5, "bestofn/n": 4, "bestofn/gold_of_rm_best": 0.4}
