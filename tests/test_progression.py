"""The policy progression (``alignline run``'s terminal summary and the report's first section), the report's
pipeline order, and the warning about a held-out evaluation too small to measure anything.

A hand-made pipeline run: ``base`` (sft from a base-model alias) -> ``zeta`` (a tso, evaluated at its
``versions/v2``) -> ``alpha`` (an rl started from zeta's v2), each with an eval.bestofn and an eval.verifiable
stage; a ``sample`` stage reads base's model too (not a policy: nothing evaluates it). The names sort the other
way round (alpha < base < zeta), so the order and the parents can only come from the pipeline itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from alignline.pipeline import load_pipeline, run_pipeline
from alignline.pipeline.checks import small_evaluations, warning_text
from alignline.pipeline.running import print_summary
from alignline.pipeline.summary import WIDTH, summary_text
from alignline.report import html as report
from alignline.report.progression import (
    cells,
    final_line,
    headers,
    no_effect_line,
    paired_change,
    progression,
)

T, F = True, False
# strict pass of sample 0 per held-out prompt (2 instructions each)
PASSES = {"base": [[T, F], [F, F], [T, T]], "zeta": [[F, F], [F, F], [F, T]], "alpha": [[T, T], [T, T], [T, T]]}
OUT = "runs/demo"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def stage(name, kind, config, status="ran") -> dict:
    return {"name": name, "stage": kind, "output_dir": f"{OUT}/{name}", "config": config,
            "result": {"status": status, "seconds": 1.0, "counts": {}}}


def policy_stages(name: str, kind: str, model_from: str, evaluated: str) -> list[dict]:
    return [stage(name, kind, {"model": model_from}),
            stage(f"eval_{name}", "eval.bestofn", {"model": evaluated, "prompts": f"{OUT}/prepare/eval.jsonl"}),
            stage(f"verify_{name}", "eval.verifiable", {"model": {"responses": f"{OUT}/eval_{name}/samples"}})]


def fake_pipeline_run(root: Path) -> dict:
    """The output root of the pipeline above (its pipeline.json, manifests, verify and eval outputs)."""
    stages = [stage("prepare", "prepare", {}),
              *policy_stages("base", "sft", "some-base-alias", f"{OUT}/base/model"),
              stage("sample_base", "sample", {"model": f"{OUT}/base/model"}),
              *policy_stages("zeta", "tso", f"{OUT}/base/model", f"{OUT}/zeta/versions/v2"),
              *policy_stages("alpha", "rl", f"{OUT}/zeta/versions/v2", f"{OUT}/alpha/model")]
    doc = {"name": "demo", "output_root": OUT, "stages": stages, "wall_seconds": 754.0, "disk_bytes": 3_210_000_000}
    write(root / "pipeline.json", json.dumps(doc))
    for i, s in enumerate(stages):
        d = root / s["name"]
        write(d / "manifest.json", json.dumps({"stage": s["stage"].replace("eval.", ""), "status": "complete",
                                               "written_at": f"2026-01-01T00:00:{59 - i:02d}", "seconds": 1.0,
                                               "config": s["config"]}))
        if s["stage"] in ("sft", "tso", "rl"):  # tso's curves: one metrics.jsonl per mini-batch
            write(d / ("iter-1/metrics.jsonl" if s["stage"] == "tso" else "metrics.jsonl"), "".join(json.dumps({"step": k, "loss": 1.0 / k}) + "\n" for k in (1, 2)))
    for name, passes in PASSES.items():
        rows = [{"prompt_id": f"p{i}", "status": "ok", "instructions": ["a", "b"], "strict": ok, "loose": ok}
                for i, ok in enumerate(passes)]
        write(root / f"verify_{name}/verifications.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        rate = sum(map(sum, passes)) / 6
        write(root / f"verify_{name}/results.json", json.dumps({"instruction_level_strict": rate,
                                                                "n_instructions": 6}))
        write(root / f"eval_{name}/bestofn.json", json.dumps({"rows": [
            {"n": 1, "gold_of_rm_best": rate, "gold_oracle_best": rate},
            {"n": 2, "gold_of_rm_best": rate + 0.05, "gold_oracle_best": min(1.0, rate + 0.25)}]}))
    return doc


@pytest.fixture
def run_root(tmp_path):
    return tmp_path / "root", fake_pipeline_run(tmp_path / "root")


def test_progression_rows_parents_and_paired_change(run_root):
    """Per instruction (p0a, p0b, p1a, p1b, p2a, p2b):

    base  T F  F F  T T   best-of-1 3/6 = 0.500; parent none (a base-model alias)
    zeta  F F  F F  F T   1/6 = 0.167; minus base: -1 0 0 0 -1 0, mean -1/3;
          sd^2 = (2 (2/3)^2 + 4 (1/3)^2) / 5 = 4/15, SE = sqrt(4/15) / sqrt(6) = 0.211: |change| < 2 SE
    alpha T T  T T  T T   6/6 = 1.000; minus zeta: 1 1 1 1 1 0, mean 5/6 = 0.833;
          sd^2 = (5 (1/6)^2 + (5/6)^2) / 5 = 1/6, SE = sqrt(1/6) / sqrt(6) = 1/6 = 0.167: beyond 2 SE
    """
    root, doc = run_root
    rows = progression(doc, root)
    assert [r.policy.name for r in rows] == ["base", "zeta", "alpha"]  # pipeline order, not the names' order
    assert [r.policy.parent for r in rows] == [None, "base", "zeta"]
    assert [r.best_of_1 for r in rows] == pytest.approx([0.5, 1 / 6, 1.0])
    assert rows[1].change == pytest.approx(-1 / 3) and rows[1].se == pytest.approx(0.21082, abs=1e-5)
    assert rows[2].change == pytest.approx(5 / 6) and rows[2].se == pytest.approx(1 / 6)
    assert [r.flagged for r in rows] == [False, False, True] and rows[2].n_paired == 6
    assert [r.top_n for r in rows] == [2, 2, 2] and rows[0].oracle == pytest.approx(0.75)
    assert headers(rows)[2:4] == ["best-of-2 (RM pick)", "oracle best-of-2"]
    assert cells(rows) == [
        ["base", "0.500 (6)", "0.550", "0.750", "- (from the base model)"],
        ["zeta", "0.167 (6)", "0.217", "0.417", "-0.333 +- 0.211 vs base"],
        ["alpha", "1.000 (6)", "1.050", "1.000", "+0.833 +- 0.167 * vs zeta"]]
    assert paired_change({("p", 0): True}, {("q", 0): True}) == (None, None, 0)  # nothing in common


def test_final_policy_against_the_first_and_the_changes_within_noise(run_root):
    """alpha (last) vs base (first of its lineage), per instruction: 1-1, 1-0, 1-0, 1-0, 1-1, 1-1 = 0 1 1 1 0 0,
    mean 1/2; sd^2 = 6 (1/2)^2 / 5 = 0.3, SE = sqrt(0.3 / 6) = 0.2236: 0.5 > 2 x 0.2236 = 0.447, beyond.
    zeta's change (-0.333 +- 0.211) is within 2 SE and is named; alpha's (+0.833 +- 0.167) is not."""
    root, doc = run_root
    rows = progression(doc, root)
    assert rows[-1].root == "base" and rows[-1].root_change == pytest.approx(0.5)
    assert rows[-1].root_se == pytest.approx(0.22361, abs=1e-5)
    assert final_line(rows) == "final policy alpha vs base: +0.500 +- 0.224 paired SE (beyond 2 SE)"
    assert no_effect_line(rows) == "within 2 SE of their parent (no measurable change at this size): zeta"
    assert final_line(rows[:2]) is None  # zeta's first ancestor is its parent: the table already says it


def test_summary_fits_100_columns(run_root, capsys, monkeypatch):
    root, doc = run_root
    rows = progression(doc, root)
    long_dir = "runs/" + "a-very-long-output-root-name/" * 5
    doc["stages"][2]["result"] = {"status": "failed", "error": "RuntimeError: " + "much went wrong " * 20}
    text = summary_text("demo", rows, doc["stages"], pipeline_json=long_dir + "pipeline.json",
                        report=long_dir + "report.html", wall_seconds=754.0, disk_bytes=3_210_000_000, root=long_dir)
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH, [line for line in lines if len(line) > WIDTH]
    assert any(re.search(r"alpha +1\.000 \(6\) +1\.050 +1\.000 +\+0\.833 \+- 0\.167 \* vs zeta", x) for x in lines)
    assert "stage eval_base failed: RuntimeError" in text and "wall time 12 min 34 s" in text
    assert "3.2 GB" in text and "seconds" not in lines[1]  # no per-stage bookkeeping in the table
    monkeypatch.setenv("COLUMNS", "300")  # a wide terminal still gets 100 columns
    monkeypatch.chdir(root.parent)
    (root.parent / "runs").mkdir()
    (root.parent / OUT).symlink_to(root)
    print_summary(doc, Path(OUT) / "report.html")
    out = capsys.readouterr().out
    assert "+0.833 +- 0.167 * vs zeta" in out and max(map(len, out.splitlines())) <= WIDTH


def test_report_leads_with_the_result_and_follows_the_pipeline(run_root):
    root, _ = run_root
    text = report.build_report(report.ReportConfig(run_dir=str(root))).read_text()
    keys = re.findall(r'<section id="(\w+)">', text)
    assert keys[0] == "progression" and keys[-1] == "stages"
    first = text[text.index('<section id="progression">'):text.index('<section id="training">')]
    assert "<td>alpha</td><td>1.000 (6)</td>" in first and "+0.833 +- 0.167 * vs zeta" in first
    assert first.count("<img") == 1  # the chart
    training = text[text.index('<section id="training">'):text.index('<section id="rm">')]
    assert re.findall(r"<h3>(\w+) <small>", training) == ["base", "zeta", "alpha"]
    stages = text[text.index('<section id="stages">'):]
    assert [n for n in re.findall(r"<tr><td>(\w+)</td>", stages)][:4] == ["prepare", "base", "eval_base",
                                                                         "verify_base"]


def write_pipeline(d: Path, eval_records: int, max_prompts: int | None = None) -> Path:
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "data" / "answers.jsonl").write_text("")
    doc = {"name": "small", "stages": [
        {"name": "prepare", "stage": "prepare", "config": {
            "splits": {"eval": {"fraction": 0.5, "max_records": eval_records}},
            "instructions": {"splits": ["eval"], "k_min": 2, "k_max": 2}}},
        {"name": "verify", "stage": "eval.verifiable", "config": {
            "prompts": "${prepare}/eval.jsonl", "model": {"responses": "data/answers.jsonl"},
            **({"max_prompts": max_prompts} if max_prompts else {})}}]}
    (d / "pipe.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return d / "pipe.yaml"


def test_a_too_small_evaluation_warns_and_continues(tmp_path, monkeypatch, capfd):
    """8 prompts x 2 instructions: SE of a rate near 0.5 = sqrt(0.25 / 16) = 0.125; max_prompts 4 (smaller than
    the split) -> sqrt(0.25 / 8) = 0.177."""
    monkeypatch.chdir(tmp_path)
    result = run_pipeline(write_pipeline(tmp_path, 8), dry_run=True)
    err = capfd.readouterr().err
    assert result.status("verify") == "planned"  # it warns and goes on
    assert re.search(r"warning:.*stage 'verify' evaluates 8 held-out prompt", " ".join(err.split()))
    assert "standard error of about 0.125" in " ".join(err.split())
    (small,) = small_evaluations(load_pipeline(write_pipeline(tmp_path, 8, 4)))
    assert small.prompts == 4 and "0.177 (sqrt(0.25 / 8))" in warning_text([small])
    run_pipeline(write_pipeline(tmp_path, 16), dry_run=True)
    assert "warning" not in capfd.readouterr().err


def test_reward_model_accuracy_says_which_pairs(tmp_path):
    """Held out only when the rm stage had data.eval (eval.json split 'eval'); otherwise labelled training pairs."""
    for name, split in (("rm_heldout", "eval"), ("rm_train", "train (no data.eval given)")):
        write(tmp_path / name / "manifest.json", json.dumps({"stage": "rm", "status": "complete"}))
        write(tmp_path / name / "eval.json", json.dumps({"pairs": 4, "accuracy": 0.75, "split": split,
                                                         "accuracy_by_rating": {"better": {"pairs": 4,
                                                                                           "accuracy": 0.75}}}))
    text = report.build_report(report.ReportConfig(run_dir=str(tmp_path))).read_text()
    rm = text[text.index('<section id="rm">'):text.index('<section id="score">')]
    assert "<h3>rm_heldout</h3><p>accuracy on held-out pairs (the rm stage&#x27;s data.eval): <b>0.750</b>" in rm
    assert "<h3>rm_train</h3><p>accuracy on training pairs, not held out (train (no data.eval given))" in rm
