"""Cross-field config checks live in the stage config models, so ``alignline run --dry-run`` reports them before
anything runs, with the same message as the stage's own command."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import yaml

#: name, stage and settings of a pipeline that validates: sample -> score -> select, and annotate.
STAGES = [
    {"name": "gen", "stage": "sample", "config": {"prompts": "prompts.jsonl", "model": "tiny-model"}},
    {"name": "rank", "stage": "score", "config": {"prompts": "prompts.jsonl", "responses": "samples",
                                                  "reward_model": "rm"}},
    {"name": "pick", "stage": "select", "config": {"ranked": "ranked", "strategy": "fixed_rank",
                                                   "rejected_rank": 4}},
    {"name": "judge", "stage": "annotate", "config": {"prompts": "prompts.jsonl", "responses": "samples"}},
]

#: stage -> (a mistake only the config model can see, the message that names the setting and the fix)
MISTAKES = {
    "sample": ({"matrix": "matrix.yaml"}, "sample needs exactly one of model=... (one model) or matrix=MATRIX.yaml"),
    "score": ({"judge": "evaluator"}, "evaluator is required for judge=evaluator, e.g. evaluator.model=PATH"),
    "select": ({"rejected_rank": None}, "strategy=fixed_rank needs rejected_rank (e.g. rejected_rank=32)"),
    "annotate": ({"judge": {"type": "llm"}}, "judge.model is required for judge.type=llm"),
}


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``alignline ARGS`` through the console entry point: (exit code, stderr)."""
    from alignline.cli import main

    for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")):
        monkeypatch.setenv(key, os.environ.get(key, value))  # main() sets them; restored after the test
    monkeypatch.setattr(sys, "argv", ["alignline", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def message_line(text: str, expected: str) -> str:
    """The error line holding ``expected``, from there on (before it the source, which differs between a pipeline
    and a stage command), without a ``(got ...)`` echo of the input."""
    [line] = [ln for ln in " ".join(text.split("\n  ")).splitlines() if expected in ln]
    return line[line.index(expected):].split(" (got ")[0]


def write_pipeline(tmp_path, stages) -> str:
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump({"name": "checks", "stages": stages}, sort_keys=False))
    return "pipe.yaml"


def test_the_pipeline_without_mistakes_validates(tmp_path, monkeypatch):
    from alignline.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    result = run_pipeline(write_pipeline(tmp_path, STAGES), dry_run=True, report=False)
    assert [r.status for r in result.results] == ["planned"] * 4
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage", sorted(MISTAKES))
def test_dry_run_and_the_stage_command_report_the_config_mistake(stage, tmp_path, monkeypatch, capsys):
    from alignline.errors import ConfigError
    from alignline.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    change, expected = MISTAKES[stage]
    stages = copy.deepcopy(STAGES)
    [entry] = [s for s in stages if s["stage"] == stage]
    entry["config"].update(change)
    pipe = write_pipeline(tmp_path, stages)

    with pytest.raises(ConfigError) as info:
        run_pipeline(pipe, dry_run=True, report=False)
    assert f"stage '{entry['name']}' ({stage})" in str(info.value) and expected in str(info.value)
    code, piped = cli(monkeypatch, capsys, "run", pipe, "--dry-run")
    assert code == 2 and expected in piped
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written

    (tmp_path / "stage.yaml").write_text(yaml.safe_dump({**entry["config"], "output_dir": "out"}))
    code, direct = cli(monkeypatch, capsys, stage, "stage.yaml")
    assert code == 2 and message_line(direct, expected) == message_line(piped, expected)
    assert not (tmp_path / "out").exists()  # raised while loading the config, before the run directory
