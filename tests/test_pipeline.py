"""``alignline run PIPELINE.yaml``: a tiny select -> rs -> dpo pipeline on hand-built ranked sets.

The completed run is built once (module fixture) with relative paths, and each test works on its own copy,
so the copies keep the same configs and fingerprints as the original.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from alignline.errors import ConfigError
from alignline.pipeline import STAGES, load_pipeline, run_pipeline

ROOT = Path("runs/p")


def ranked(pid: str, scores: list[float]) -> dict:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return {"prompt": {"id": pid, "messages": [{"role": "user", "content": f"q {pid}"}]}, "scorer": "rm",
            "responses": [{"prompt_id": pid, "sample_idx": i, "text": f"answer {pid} {i}", "source": "m",
                           "scores": {"rm": scores[i]}, "rank": r + 1} for r, i in enumerate(order)]}


def pipeline_doc(model_dir) -> dict:
    return {
        "name": "tiny",
        "output_root": "runs/${tag}",
        "vars": {"tag": "p", "model": str(model_dir), "steps": 2},
        "stages": [
            {"name": "pick", "stage": "select", "config": {"ranked": "data/ranked.jsonl", "mode": "rs"}},
            {"name": "pairs", "stage": "select", "config": ["conf/pairs.yaml", {"seed": 1}]},
            {"name": "rs", "stage": "rs", "config": {
                "model": "${model}", "data": {"train": "${pick}/rs.jsonl", "packing": False, "max_length": 256},
                "train": {"epochs": 1, "batch_size": 1, "lr": 1e-3, "max_steps": "${steps}"}}},
            {"name": "dpo", "stage": "dpo",
             "config": {"model": "${rs}/model", "data": {"train": "${pairs}/pairs.jsonl", "max_length": 128},
                        "train": {"epochs": 1, "batch_size": 1, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 0}},
             "overrides": {"loss.beta": 0.5}},
        ],
    }


def write_project(d: Path, doc: dict) -> Path:
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "conf").mkdir(exist_ok=True)
    sets = [ranked("a", [4.0, 1.0, 3.0, 2.0]), ranked("b", [2.0, 0.0, 1.0, 1.5])]
    (d / "data" / "ranked.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sets))
    # output_dir in a referenced stage YAML is replaced by <output_root>/<name>
    (d / "conf" / "pairs.yaml").write_text(yaml.safe_dump({"ranked": "data/ranked.jsonl", "mode": "pairs",
                                                           "strategy": "best_worst", "output_dir": "elsewhere"}))
    (d / "pipe.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return d / "pipe.yaml"


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_model_dir):
    """A project whose pipeline ran once to the end (report included), and the first run's result."""
    d = tmp_path_factory.mktemp("project")
    write_project(d, pipeline_doc(tiny_model_dir))
    old = os.getcwd()
    os.chdir(d)
    try:
        result = run_pipeline("pipe.yaml")
    finally:
        os.chdir(old)
    return d, result


@pytest.fixture
def project(done, tmp_path, monkeypatch):
    """A private copy of the completed project, as the working directory."""
    d = tmp_path / "copy"
    shutil.copytree(done[0], d)
    monkeypatch.chdir(d)
    return d


def manifest(stage: str) -> dict:
    return json.loads((ROOT / stage / "manifest.json").read_text())


def statuses(result) -> dict[str, str]:
    return {r.name: r.status for r in result.results}


def stamps() -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in ROOT.rglob("*") if p.is_file() and p.parent != ROOT}


def test_first_run_then_rerun_skips_everything(done, project):
    """Counts: 2 ranked sets -> 2 rs conversations; best_worst pairs a (4.0 vs 1.0) and b (2.0 vs 0.0) -> 2;
    rs: 2 conversations, batch 1 -> 2 steps; dpo: 2 pairs, batch 1 -> 2 steps."""
    first = done[1]
    assert statuses(first) == {"pick": "ran", "pairs": "ran", "rs": "ran", "dpo": "ran"}
    by = {r.name: r for r in first.results}
    assert by["pick"].counts == {"ranked_sets": 2, "conversations": 2}
    assert by["pairs"].counts == {"ranked_sets": 2, "pairs": 2}
    assert manifest("rs")["steps"] == 2 and manifest("dpo")["steps"] == 2
    assert manifest("dpo")["config"]["loss"]["beta"] == 0.5
    assert manifest("pairs")["config"]["output_dir"] == "runs/p/pairs"
    assert manifest("dpo")["inputs"]["model"] == "runs/p/rs/model"
    plan = json.loads((ROOT / "pipeline.json").read_text())
    assert plan["ok"] and [s["name"] for s in plan["stages"]] == ["pick", "pairs", "rs", "dpo"]
    assert plan["stages"][3]["depends_on"] == ["rs", "pairs"]
    assert plan["stages"][2]["result"]["status"] == "ran" and plan["stages"][2]["result"]["seconds"] > 0
    assert (ROOT / "report.html").stat().st_size > 1000

    before = stamps()
    again = run_pipeline("pipe.yaml", report=False)
    assert set(statuses(again).values()) == {"skipped-up-to-date"}
    assert stamps() == before  # nothing in any stage directory was rewritten: nothing trained
    rerun = json.loads((ROOT / "pipeline.json").read_text())
    assert [s["result"]["status"] for s in rerun["stages"]] == ["skipped-up-to-date"] * 4
    assert rerun["stages"][0]["result"]["counts"] == {"ranked_sets": 2, "conversations": 2}


def test_deleted_output_reruns_that_stage_and_an_interrupted_stage_resumes(project, capfd):
    """Deleting rs: rs trains again; stopped after step 1 it is 'incomplete' and dpo does not run; the next run
    resumes rs from its step-1 checkpoint. The resumed model is bit-identical to the first one, so dpo's input
    fingerprint is unchanged and dpo is (rightly) still up to date. Deleting pick: its rs.jsonl comes out
    byte-identical, so rs is not retrained either."""
    model_bytes = (ROOT / "rs" / "model" / "model.safetensors").read_bytes()
    dpo_stamp = (ROOT / "dpo" / "manifest.json").stat().st_mtime_ns
    shutil.rmtree(ROOT / "rs")
    stopped = run_pipeline("pipe.yaml", ["rs.train.stop_after_step=1"], report=False)
    assert statuses(stopped) == {"pick": "skipped-up-to-date", "pairs": "skipped-up-to-date", "rs": "incomplete",
                                 "dpo": "not-run"}
    assert not stopped.ok and json.loads((ROOT / "pipeline.json").read_text())["ok"] is False
    capfd.readouterr()
    resumed = run_pipeline("pipe.yaml", report=False)
    assert "resuming from" in capfd.readouterr().out
    assert statuses(resumed) == {"pick": "skipped-up-to-date", "pairs": "skipped-up-to-date", "rs": "ran",
                                 "dpo": "skipped-up-to-date"}
    assert (ROOT / "rs" / "model" / "model.safetensors").read_bytes() == model_bytes
    assert (ROOT / "dpo" / "manifest.json").stat().st_mtime_ns == dpo_stamp

    shutil.rmtree(ROOT / "pick")
    again = run_pipeline("pipe.yaml", report=False)
    assert statuses(again) == {"pick": "ran", "pairs": "skipped-up-to-date", "rs": "skipped-up-to-date",
                               "dpo": "skipped-up-to-date"}


def test_changed_upstream_output_reruns_its_dependents(project, capfd):
    """pick.rank=2 makes pick write other responses (rank 2: 'answer a 2', 'answer b 3'), so rs trains on new
    data, its new weights change dpo's model fingerprint and dpo retrains; pairs does not read pick: skipped.
    rs and dpo hold complete checkpoints of their first runs: they must start afresh, not resume from those."""
    old_rs = (ROOT / "rs" / "model" / "model.safetensors").read_bytes()
    old_dpo = (ROOT / "dpo" / "model" / "model.safetensors").read_bytes()
    run_pipeline("pipe.yaml", ["pick.rank=2"], dry_run=True)
    assert "settings changed: rank" in capfd.readouterr().out
    result = run_pipeline("pipe.yaml", ["pick.rank=2"], report=False)
    assert statuses(result) == {"pick": "ran", "pairs": "skipped-up-to-date", "rs": "ran", "dpo": "ran"}
    rows = [json.loads(ln) for ln in (ROOT / "pick" / "rs.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == ["answer a 2", "answer b 3"]
    assert (ROOT / "rs" / "model" / "model.safetensors").read_bytes() != old_rs
    assert (ROOT / "dpo" / "model" / "model.safetensors").read_bytes() != old_dpo


def test_a_shard_stage_redone_with_other_settings_starts_its_shards_over(tmp_path, monkeypatch, tiny_model_dir):
    """sample resumes from the shards it finds, but only those of a run with the same settings: redone with
    another seed it must sample every prompt again, not keep the first run's texts."""
    monkeypatch.chdir(tmp_path)
    prompts = [{"id": f"x{i}", "messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    doc = {"output_root": "runs/s", "stages": [{"name": "gen", "stage": "sample", "config": {
        "prompts": "prompts.jsonl", "model": str(tiny_model_dir), "n": 2, "prompts_per_shard": 1,
        "sampling": {"max_new_tokens": 6, "temperature": 1.0}}}]}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(doc))

    def texts():
        return sorted((r["prompt_id"], r["sample_idx"], r["text"]) for f in sorted(Path("runs/s/gen").glob("responses-*.jsonl"))
                      for r in map(json.loads, f.read_bytes().split(b"\n")[:-1]))

    assert statuses(run_pipeline("pipe.yaml", report=False)) == {"gen": "ran"}
    first = texts()
    assert statuses(run_pipeline("pipe.yaml", ["gen.sampling.seed=5"], report=False)) == {"gen": "ran"}
    second = texts()
    assert len(second) == len(first) == 6 and second != first
    assert statuses(run_pipeline("pipe.yaml", ["gen.sampling.seed=5"], report=False)) == {"gen": "skipped-up-to-date"}


def test_from_and_only(project, capsys):
    """--from rs: pick and pairs are left out (complete), rs and dpo are up to date. --only pairs after deleting
    it: only pairs runs. Missing prerequisites are errors before anything runs."""
    r = run_pipeline("pipe.yaml", from_stage="rs", report=False)
    assert statuses(r) == {"pick": "excluded", "pairs": "excluded", "rs": "skipped-up-to-date",
                           "dpo": "skipped-up-to-date"}
    assert r.results[0].counts == {"ranked_sets": 2, "conversations": 2}  # an excluded stage's earlier result
    shutil.rmtree(ROOT / "pairs")
    r = run_pipeline("pipe.yaml", only="pairs", report=False)
    assert statuses(r) == {"pick": "excluded", "pairs": "ran", "rs": "excluded", "dpo": "excluded"}

    shutil.rmtree(ROOT / "pick")
    before = stamps()
    with pytest.raises(ConfigError, match=r"--from dpo: stage 'pick' has no complete run in runs/p/pick"):
        run_pipeline("pipe.yaml", from_stage="dpo", report=False)
    with pytest.raises(ConfigError, match=r"--only rs: stage 'pick' has no complete run"):
        run_pipeline("pipe.yaml", only="rs", report=False)
    run_pipeline("pipe.yaml", only="dpo", report=False)  # dpo reads rs and pairs only, both complete
    with pytest.raises(ConfigError, match=r"--only rss: no such stage; did you mean 'rs'\?"):
        run_pipeline("pipe.yaml", only="rss", report=False)
    assert stamps() == before

    capsys.readouterr()
    plan = run_pipeline("pipe.yaml", dry_run=True)
    out = capsys.readouterr().out
    assert [x.status for x in plan.results] == ["planned"] * 4
    assert "runs/p/dpo" in out and "not run" in out and "beta: 0.5" in out
    assert stamps() == before


def test_vars_references_and_overrides_resolve(tmp_path, monkeypatch, tiny_model_dir):
    """A whole-string ${steps} keeps the var's type (int 2); ${pick}/rs.jsonl is pick's output_dir plus the
    file; $${x} is a literal ${x}; NAME.key=value addresses a stage; vars.tag=q moves the output root."""
    monkeypatch.chdir(tmp_path)
    doc = pipeline_doc(tiny_model_dir)
    doc["stages"][1]["config"][1]["output_dir"] = "out/$${pairs}"
    write_project(tmp_path, doc)
    plan = load_pipeline("pipe.yaml", ["vars.tag=q", "rs.train.lr=5e-5", "dpo.output_dir=${rs}-dpo"])
    s = {p.name: p for p in plan.stages}
    assert plan.output_root == "runs/q"
    assert s["rs"].cfg.train.max_steps == 2 and s["rs"].cfg.train.lr == 5e-5
    assert s["rs"].cfg.data.train == "runs/q/pick/rs.jsonl" and s["rs"].depends_on == ["pick"]
    assert s["pairs"].output_dir == "out/${pairs}" and s["pairs"].cfg.strategy == "best_worst"
    assert s["dpo"].output_dir == "runs/q/rs-dpo" and s["dpo"].cfg.model == "runs/q/rs/model"
    assert s["pick"].depends_on == []


def test_extends_builds_on_another_pipeline(tmp_path, monkeypatch, tiny_model_dir):
    """A file in another directory extends pipe.yaml: the base's stages first (conf/pairs.yaml still found
    next to the base), then its own stage, reading a base stage's output; vars updated; name and output_root
    its own (runs/<its file name>), not the base's."""
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, pipeline_doc(tiny_model_dir))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "extra.yaml").write_text(yaml.safe_dump({
        "extends": "../pipe.yaml", "vars": {"steps": 3},
        "stages": [{"name": "again", "stage": "select", "config": {"ranked": "${pick}/../x.jsonl", "mode": "rs"}}]}))
    plan = load_pipeline("more/extra.yaml")
    assert [p.name for p in plan.stages] == ["pick", "pairs", "rs", "dpo", "again"]
    s = {p.name: p for p in plan.stages}
    assert plan.name == "extra" and plan.output_root == "runs/extra"
    assert s["rs"].cfg.train.max_steps == 3 and s["pairs"].cfg.strategy == "best_worst"
    assert s["again"].depends_on == ["pick"] and s["again"].cfg.ranked == "runs/extra/pick/../x.jsonl"

    (tmp_path / "more" / "loop.yaml").write_text(yaml.safe_dump({"extends": "loop2.yaml"}))
    (tmp_path / "more" / "loop2.yaml").write_text(yaml.safe_dump({"extends": "loop.yaml"}))
    with pytest.raises(ConfigError, match="extend each other in a cycle"):
        load_pipeline("more/loop.yaml")
    (tmp_path / "more" / "gone.yaml").write_text(yaml.safe_dump({"extends": "nope.yaml"}))
    with pytest.raises(ConfigError, match=r"gone.yaml: extends nope.yaml: no such file"):
        load_pipeline("more/gone.yaml")


def error_for(tmp_path, tiny_model_dir, edit, overrides=()) -> str:
    doc = pipeline_doc(tiny_model_dir)
    edit(doc)
    write_project(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        run_pipeline("pipe.yaml", list(overrides), report=False)
    assert not (tmp_path / "runs").exists()  # raised before the first stage ran
    assert "pipe.yaml" in str(info.value)
    return str(info.value)


def test_errors_before_anything_runs(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    stages = lambda d: d["stages"]  # noqa: E731

    msg = error_for(tmp_path, tiny_model_dir, lambda d: stages(d)[2].update(stage="rss"))
    assert "stage 'rs' (stage 3), setting 'stage': unknown stage type 'rss'; did you mean 'rs'?" in msg

    msg = error_for(tmp_path, tiny_model_dir, lambda d: stages(d)[3]["config"].update(model="${rs_out}/model"))
    assert "stage 'dpo' (dpo), setting 'model': ${rs_out} is neither an earlier stage nor a var" in msg

    msg = error_for(tmp_path, tiny_model_dir, lambda d: stages(d)[2]["config"]["data"].update(eval="${dpo}/x.jsonl"))
    assert "stage 'rs' (rs), setting 'data.eval': ${dpo} refers to stage 'dpo', which comes later (stage 4" in msg

    msg = error_for(tmp_path, tiny_model_dir, lambda d: stages(d)[0]["config"].update(ranked="${pick}/r.jsonl"))
    assert "${pick} refers to this stage itself" in msg

    msg = error_for(tmp_path, tiny_model_dir, lambda d: stages(d)[3].update(name="pick"))
    assert "stage 'pick' (stage 4): the name 'pick' is already used by stage 1" in msg

    msg = error_for(tmp_path, tiny_model_dir, lambda d: stages(d)[3]["overrides"].update({"loss.betta": 1}))
    assert "invalid DPOConfig from pipe.yaml, stage 'dpo' (dpo)" in msg and "unknown setting 'loss.betta'" in msg

    msg = error_for(tmp_path, tiny_model_dir, lambda d: None, ["rs.train.lr=-1"])
    assert "stage 'rs' (rs)" in msg and "setting 'train.lr'" in msg

    msg = error_for(tmp_path, tiny_model_dir, lambda d: None, ["sfft.train.lr=1"])
    assert "pipe.yaml: override 'sfft.train.lr=1': 'sfft' is not a stage of the pipeline" in msg

    msg = error_for(tmp_path, tiny_model_dir, lambda d: stages(d)[1]["config"].append({"output_dir": "runs/p/pick/x"}))
    assert "stages 'pick' and 'pairs' write into the same or nested directories" in msg


def test_stage_table_is_the_cli_registry():
    """Every stage command of the CLI, with its config class and help text, is in pipeline.STAGES."""
    from alignline import cli

    def registered(group) -> dict:
        return {c.name: (inspect.getclosurevars(c.callback).nonlocals["cls_path"], c.callback.__doc__)
                for c in group.registered_commands if "cls_path" in inspect.getclosurevars(c.callback).nonlocals}

    assert registered(cli.app) == {s.name: (s.target, s.doc) for s in STAGES if s.group is None}
    assert registered(cli.eval_app) == {s.name: (s.target, s.doc) for s in STAGES if s.group == "eval"}


def test_a_setting_added_since_at_null_is_not_a_change():
    """{"a": 1} -> {"a": 1, "new": None}: unchanged (a setting added later, at its old-behaviour default);
    {"a": 1} -> {"a": 1, "new": 0}: changed; {"a": 1, "old": None} -> {"a": 1}: changed (a setting went away)."""
    from alignline.pipeline import _changed_settings

    assert _changed_settings({"a": 1}, {"a": 1, "new": None}, ()) == []
    assert _changed_settings({"a": 1}, {"a": 1, "new": 0}, ()) == ["new"]
    assert _changed_settings({"a": 1, "old": None}, {"a": 1}, ()) == ["old"]
    assert _changed_settings({"t": {"x": 1}}, {"t": {"x": 2, "y": None}}, ()) == ["t.x"]
