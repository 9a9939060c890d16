"""``alignline report`` on ``alignline rl`` runs: hand-written files (exact values, escaping) and a tiny real run
through ``alignline run`` (pipeline.json records the stage; report.html shows its curves and evaluation)."""

from __future__ import annotations

import base64
import json
import re

import yaml

from alignline.pipeline import run_pipeline
from alignline.report import html as report

EVIL = '<script>alert("x")</script>'


def section(text, key):
    start = text.index(f'<section id="{key}">')
    return text[start: text.index("</section>", start)]


def pngs(text):
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert all(base64.b64decode(u).startswith(b"\x89PNG") for u in uris)
    return uris


def write_fake_rl(root):
    """Three iterations, KL and clipping logged; eval at start and end of 4 prompts x 2 instructions."""
    run = root / "rl"
    run.mkdir(parents=True)
    rows = [{"iteration": k, "reward_mean": 0.2 + 0.1 * k, "reward_se": 0.05, "pass_rate": 0.25 * k,
             "pass_rate_se": 0.1, "groups": 4, "zero_variance_groups": 3 - k, "kl": 0.01 * k, "clip_fraction": 0.1,
             "entropy": 2.0, "response_length_mean": 12.5, "rollout_tokens_per_s": 100.0, "train_tokens_per_s": 50.0}
            for k in range(3)]
    (run / "iterations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    (run / "eval_start.jsonl").write_text("".join(
        json.dumps({"prompt_id": f"e{i}", "strict": [False, i < 2], "loose": [False, True], "text": EVIL}) + "\n"
        for i in range(4)))
    manifest = {
        "stage": "rl", "status": "complete", "steps": 6, "train_seconds": 30.0, "model_dir": str(run / "model"),
        "counts": {"prompts": 8, "rollouts": 3},
        "config": {"iterations": 3, "rollout": {"prompts": 4, "group_size": 4}, "loss": {"estimator": "grpo"},
                   "kl": {"coef": 0.05}, "reward": [{"type": "verifier", "weight": 1.0},
                                                    {"type": EVIL, "weight": 0.5}]},
        "eval_metrics_start": {"instruction_strict": 0.25, "instruction_strict_se": 0.15, "instruction_loose": 0.5,
                               "prompt_strict": 0.0, "instructions": 8},
        "eval_metrics": {"instruction_strict": 0.5, "instruction_strict_se": 0.18, "instruction_loose": 0.625,
                         "prompt_strict": 0.25, "instructions": 8},
        "eval_change": {"start": 0.25, "end": 0.5, "change": 0.25, "paired_se": 0.125, "n": 8}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_rl_section_from_written_files(tmp_path):
    write_fake_rl(tmp_path)
    text = report.report_cli(str(tmp_path), ["max_samples=5"]).read_text()
    rl = section(text, "rl")
    assert "Omitted" not in rl and len(pngs(rl)) == 1
    assert "iterations.jsonl: 1 unreadable line(s) skipped" in rl
    assert "estimator grpo, 3 of 3 iterations, 4 prompts x 4 responses each" in rl
    assert "0.200 &plusmn; 0.050 (iteration 0) &rarr; 0.400 &plusmn; 0.050 (iteration 2)" in rl
    # per iteration: reward +- SE, pass rate +- SE, zero-variance groups, KL, clip, entropy, tokens, tok/s
    assert ("<td>1</td><td>0.300 &plusmn; 0.050</td><td>0.250 &plusmn; 0.100</td><td>2/4</td><td>0.010</td>"
            "<td>0.100</td><td>2.000</td><td>12.500</td><td>100.0</td><td>50.0</td>") in rl
    # held-out: start / end / change / paired SE / n (instructions; prompts from eval_start.jsonl)
    assert ("<td>instruction-level strict</td><td>0.250 &plusmn; 0.150</td><td>0.500 &plusmn; 0.180</td>"
            "<td>0.250</td><td>0.125</td><td>8</td>") in rl
    assert "<td>prompt-level strict</td><td>0.000</td><td>0.250</td><td>0.250</td><td>&mdash;</td><td>4</td>" in rl
    assert "= 2.0 paired SE (n = 8 instructions" in rl
    assert '<script>alert("x")' not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; x 0.5" in rl
    assert "<td>rl</td><td>rl</td>" in section(text, "stages")


def test_rl_without_evaluation_or_iterations_is_a_note(tmp_path):
    run = write_fake_rl(tmp_path)
    (run / "iterations.jsonl").unlink()
    m = json.loads((run / "manifest.json").read_text())
    for k in ("eval_metrics_start", "eval_metrics", "eval_change"):
        m.pop(k)
    (run / "manifest.json").write_text(json.dumps(m))
    rl = section(report.report_cli(str(tmp_path), []).read_text(), "rl")
    assert "<img" not in rl and "rl: no iterations.jsonl" in rl and "rl: no held-out evaluation" in rl


def write_prompts(path, n, prefix):
    inst = [{"id": "no_commas", "kwargs": {}, "text": "No commas."},
            {"id": "all_lowercase", "kwargs": {}, "text": "Lowercase only."}]
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"say {i}"}],
                                        "meta": {"instructions": inst}}) + "\n" for i in range(n)))
    return str(path)


def test_tiny_rl_stage_in_a_pipeline(tmp_path, monkeypatch, tiny_model_dir):
    """Two GRPO iterations with the verifier reward and a held-out evaluation, run by ``alignline run``:
    pipeline.json records the stage and its counts; report.html has its curves and its evaluation table."""
    monkeypatch.chdir(tmp_path)
    doc = {"name": "tiny-rl", "output_root": "runs/r", "stages": [{"name": "grpo", "stage": "rl", "config": {
        "model": str(tiny_model_dir), "prompts": write_prompts(tmp_path / "train.jsonl", 4, "p"), "iterations": 2,
        "rollout": {"prompts": 2, "group_size": 4, "sampling": {"max_new_tokens": 6}},
        "train": {"batch_size": 4, "grad_accum": 2, "lr": 1e-3},
        "eval": {"prompts": write_prompts(tmp_path / "eval.jsonl", 3, "e"), "max_new_tokens": 6}}}]}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(doc))
    result = run_pipeline("pipe.yaml")
    assert result.ok and result.status("grpo") == "ran"
    recorded = json.loads((tmp_path / "runs/r/pipeline.json").read_text())["stages"][0]
    assert recorded["stage"] == "rl" and recorded["result"]["status"] == "ran"
    assert recorded["result"]["counts"]["rollouts"] == 2 and recorded["result"]["counts"]["prompts"] == 4
    manifest = json.loads((tmp_path / "runs/r/grpo/manifest.json").read_text())
    assert manifest["eval_change"]["n"] == 6  # 3 held-out prompts x 2 instructions
    text = (tmp_path / "runs/r/report.html").read_text()
    rl = section(text, "rl")
    assert len(pngs(rl)) == 1 and "Omitted" not in rl and "2 of 2 iterations" in rl
    assert rl.count("<td>instruction-level strict</td>") == 1 and "<td>6</td>" in rl and "<td>3</td>" in rl
    assert "per iteration (2)" in rl
