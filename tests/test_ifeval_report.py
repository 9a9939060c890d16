"""IFEval in the pipeline's terminal summary and report: one row per eval.ifeval stage, named after the policy
that made the evaluated model, and the final policy against the first, paired, by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignline.pipeline.summary import WIDTH, summary_text
from alignline.report import html as report
from alignline.report.ifeval import cells, comparison_line, final_vs_first, ifeval_rows, rows_json

T, F = True, False
OUT = "runs/demo"
VERDICTS = {"base": [[T, F], [F], [F, F, T], [T]], "sft": [[T, F], [F], [F, F, F], [T]],
            "rl": [[T, T], [T], [F, F, T], [F]]}
RESULTS = {"instruction_level_strict": 0.5, "instruction_level_strict_se": 0.1, "prompt_level_strict": 0.25,
           "prompt_level_strict_se": 0.2, "n_prompts": 4, "n_instructions": 7, "mean_answer_words": 12.4}


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def stage(name, kind, config) -> dict:
    return {"name": name, "stage": kind, "output_dir": f"{OUT}/{name}", "config": config,
            "result": {"status": "ran", "seconds": 1.0, "counts": {}}}


def fake_run(root: Path) -> dict:
    """sft from a base alias, rl from sft; IFEval of the alias, of sft's model and of rl's sampled responses."""
    stages = [stage("ifeval_base", "eval.ifeval", {"model": "smollm2"}),
              stage("sft", "sft", {"model": "smollm2"}),
              stage("ifeval_sft", "eval.ifeval", {"model": f"{OUT}/sft/model"}),
              stage("rl", "rl", {"model": f"{OUT}/sft/model"}),
              stage("ifeval_rl", "eval.ifeval", {"responses": f"{OUT}/rl/samples"})]
    doc = {"name": "demo", "output_root": OUT, "stages": stages, "wall_seconds": 60.0, "disk_bytes": 1000}
    write(root / "pipeline.json", json.dumps(doc))
    for policy, verdicts in VERDICTS.items():
        d = root / f"ifeval_{policy}"
        write(d / "results.json", json.dumps(RESULTS | {"model": policy}))
        write(d / "verdicts.jsonl", "".join(json.dumps({"prompt_id": str(i), "strict": v}) + "\n"
                                            for i, v in enumerate(verdicts)))
        write(d / "manifest.json", json.dumps({"stage": "eval_ifeval", "status": "complete", "config": {}}))
    return doc


def test_rows_and_final_against_first_by_hand(tmp_path):
    """rl minus base per prompt, instruction level: D = (2-1, 1-0, 1-1, 0-1) = (1, 1, 0, -1), m = (2, 1, 3, 1):
    mean 1/7 = 0.1429; residuals D - m/7 = (5, 6, -3, -8)/7, squares 134/49; SE = sqrt(4/3 * 134/49) / 7
    = 0.2728. Prompt level: all followed rl (1, 1, 0, 0), base (0, 0, 0, 1): d = (1, 1, 0, -1), mean 0.25,
    sd(ddof=1) = sqrt(2.75 / 3) = 0.9574, SE = 0.4787. Neither beyond 2 SE."""
    doc = fake_run(tmp_path)
    rows = ifeval_rows(doc, tmp_path)
    assert [r.name for r in rows] == ["smollm2", "sft", "rl"]
    assert cells(rows)[1] == ["sft", "50.0 +- 10.0", "25.0 +- 20.0", "4", "12"]
    cmp = final_vs_first(rows)
    inst, prompt = cmp.differences["instruction_level_strict"], cmp.differences["prompt_level_strict"]
    assert (cmp.final, cmp.first, cmp.n_prompts) == ("rl", "smollm2", 4)
    assert inst.value == pytest.approx(1 / 7) and inst.se == pytest.approx((4 / 3 * 134 / 49) ** 0.5 / 7)
    assert prompt.value == pytest.approx(0.25) and prompt.se == pytest.approx((2.75 / 3) ** 0.5 / 2)
    assert not cmp.beyond("instruction_level_strict") and not cmp.beyond("prompt_level_strict")
    assert comparison_line(cmp) == ("IFEval, final policy rl vs smollm2 (4 prompts, paired): instruction-level "
                                    "strict +14.3 +- 27.3, prompt-level strict +25.0 +- 47.9 points (* beyond 2 SE)")
    assert rows_json(rows)[-1]["vs_first"]["prompt_level_strict"]["beyond_2se"] is False
    assert final_vs_first(rows[:1]) is None


def test_a_model_from_outside_the_pipeline_goes_by_the_stage_name_setting(tmp_path):
    """An eval.ifeval stage of a model no stage of this pipeline made (another pipeline's SFT model) is named by
    its ``name`` setting when it has one (a long path would wrap the summary's first column), else the path."""
    doc = fake_run(tmp_path)
    doc["stages"][0]["config"] = {"model": "runs/other/sft/model", "name": "sft-of-other"}
    assert ifeval_rows(doc, tmp_path)[0].name == "sft-of-other"
    doc["stages"][0]["config"] = {"model": "runs/other/sft/model"}
    assert ifeval_rows(doc, tmp_path)[0].name == "runs/other/sft/model"


def test_summary_and_report_show_ifeval(tmp_path):
    doc = fake_run(tmp_path)
    rows = ifeval_rows(doc, tmp_path)
    text = summary_text("demo", [], doc["stages"], pipeline_json="p.json", report=None, wall_seconds=60.0,
                        disk_bytes=1000, root=OUT, ifeval_rows=rows)
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH
    assert any(re.search(r"rl +50\.0 \+- 10\.0 +25\.0 \+- 20\.0 +4 +12", line) for line in lines)
    assert "final policy rl vs smollm2" in text and "no evaluated policy" not in text
    html = report.build_report(report.ReportConfig(run_dir=str(tmp_path))).read_text()
    first = html[html.index('<section id="progression">'):html.index('<section id="training">')]
    assert "<td>rl</td><td>50.0 +- 10.0</td>" in first and "final policy rl vs smollm2" in first


def test_a_pipeline_of_two_ifeval_stages(tmp_path, monkeypatch, capsys):
    """Two eval.ifeval stages in a pipeline (answers from files, no model): the second compares itself with the
    first (compare_to=${first}); pipeline.json's ifeval rows and the terminal summary show both and the final
    against the first. Answers on our own 2-prompt benchmark, strict: first [F], [F]; second [T], [T]:
    instruction level +1.0 with SE 0 (every prompt moved by 1): beyond 2 SE."""
    import yaml

    from alignline.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    bench = [{"key": k, "prompt": f"Answer question {k} without commas.", "instruction_id_list":
              ["punctuation:no_comma"], "kwargs": [{}]} for k in (1, 2)]
    write(tmp_path / "bench.jsonl", "".join(json.dumps(r) + "\n" for r in bench))
    for name, text in (("first", "yes, no"), ("second", "yes and no")):
        write(tmp_path / f"{name}.jsonl", "".join(json.dumps({"prompt": r["prompt"], "response": text}) + "\n"
                                                   for r in bench))
    stages = [{"name": "first", "stage": "eval.ifeval", "config": {"benchmark": "bench.jsonl",
                                                                   "responses": "first.jsonl"}},
              {"name": "second", "stage": "eval.ifeval", "config": {
                  "benchmark": "bench.jsonl", "responses": "second.jsonl", "compare_to": "${first}"}}]
    write(tmp_path / "pipe.yaml", yaml.safe_dump({"name": "ife", "output_root": "runs/ife", "stages": stages}))
    run_pipeline("pipe.yaml", report=False)
    doc = json.loads((tmp_path / "runs/ife/pipeline.json").read_text())
    assert [r["policy"] for r in doc["ifeval"]] == ["first.jsonl", "second.jsonl"]
    assert doc["ifeval"][-1]["vs_first"]["instruction_level_strict"] == {"difference": 1.0, "se": 0.0,
                                                                         "beyond_2se": True}
    second = json.loads((tmp_path / "runs/ife/second/results.json").read_text())
    assert second["compare_to"]["prompt_level_strict"]["difference"] == 1.0
    out = capsys.readouterr().out
    assert "final policy second.jsonl vs first.jsonl (2 prompts, paired): instruction-level strict +100.0 +- 0.0 *" \
        in " ".join(out.split())
