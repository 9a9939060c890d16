"""``alignline report``: a self-contained HTML page from a hand-written fake run directory."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from alignline.errors import ConfigError
from alignline.report import html as report

EVIL = '<script>alert("x")</script>'


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def manifest(path, stage, **extra):
    write_json(path / "manifest.json", {"stage": stage, "status": "complete",
                                        "written_at": extra.pop("written_at", "2026-01-01T00:00:00"), **extra})


def fake_runs(root):
    """sft -> dpo (policies), rm, score (ranked sets, one response holding a <script> tag), annotate pairs,
    two best-of-n runs (one per policy) and an injection-suite run."""
    manifest(root / "sft", "sft", steps=3, seconds=12.5, counts={"examples": 6}, model_dir=str(root / "sft/model"),
             final_metrics={"loss": 1.0}, written_at="2026-01-01T00:00:01")
    write_jsonl(root / "sft/metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, "not json",
                                             {"step": 3, "loss": 1.0}, {"step": 3, "eval/loss": 1.2}])
    (root / "sft/metrics.jsonl").write_text((root / "sft/metrics.jsonl").read_text().replace('"not json"', "{bad"))
    manifest(root / "dpo", "dpo", steps=2, train_seconds=5.0, reference_seconds=1.0, model_dir=str(root / "dpo/model"),
             final_metrics={"loss": 0.6, "rewards/margin": 0.4, "rewards/accuracy": 0.75},
             written_at="2026-01-01T00:00:02")
    write_jsonl(root / "dpo/metrics.jsonl", [
        {"step": s, "loss": 0.7 - 0.05 * s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
         "rewards/margin": 0.2 * s, "rewards/accuracy": 0.5 + 0.1 * s} for s in (1, 2)])
    manifest(root / "rm", "rm", steps=2, seconds=3.0)
    write_json(root / "rm/eval.json", {
        "pairs": 4, "accuracy": 0.75, "split": "eval", "score_mean_chosen": 1.0, "score_mean_rejected": 0.0,
        "score_std": 0.5, "margin_mean": 1.0,
        "accuracy_by_rating": {"significantly": {"pairs": 2, "accuracy": 1.0}, "slightly": {"pairs": 2, "accuracy": 0.5}}})
    manifest(root / "score", "score", counts={"ranked_sets": 2})
    sets = [{"prompt": {"id": f"q{i}", "messages": [{"role": "user", "content": f"Question {i} {EVIL}"}]},
             "scorer": "rm", "responses": [
                 {"prompt_id": f"q{i}", "sample_idx": k, "text": EVIL if k == 0 else f"answer {k}", "source": "t",
                  "scores": {"rm": 2.0 - k}, "rank": k + 1} for k in range(3)]} for i in range(2)]
    write_jsonl(root / "score/ranked-000-of-001-00000.jsonl", sets)
    manifest(root / "annotate", "annotate", counts={"pairs": 1})
    write_jsonl(root / "annotate/pairs-00000.jsonl", [
        {"id": "p0", "prompt": [{"role": "user", "content": "Pick one"}], "chosen": "good <b>bold</b>",
         "rejected": '"><img src=x onerror=alert(1)>', "rating": "better", "reason": f"judge says {EVIL}"}])
    for name, model, gold in (("bon_sft", root / "sft/model", 0.4), ("bon_dpo", root / "dpo/model", 0.6)):
        manifest(root / name, "bestofn", config={"model": str(model), "reward_model": "rm"})
        write_json(root / name / "bestofn.json", {"rows": [
            {"n": 1, "gold_of_rm_best": gold - 0.1, "gold_oracle_best": gold - 0.1, "rm_score_of_best": 0.0,
             "prompts": 2},
            {"n": 2, "gold_of_rm_best": gold, "gold_oracle_best": gold + 0.2, "rm_score_of_best": 0.5, "prompts": 2}]})
    versions = [{"version": 0, "path": str(root / "dpo/model")}] + [
        {"version": k, "path": str(root / f"tso/versions/v{k}"), "pairs": 2} for k in (1, 2)]
    manifest(root / "tso", "tso", versions=versions, timings=[{"minibatch": 1, "reference_seconds": 1.0,
                                                              "train_seconds": 2.0}], written_at="2026-01-01T00:00:03")
    for k in (1, 2):
        manifest(root / f"tso/iter-{k}", "tso-minibatch", minibatch=k, steps=2,
                 final_metrics={"loss": 0.5 / k, "rewards/margin": 0.5 * k, "rewards/accuracy": 0.8})
        write_jsonl(root / f"tso/iter-{k}/metrics.jsonl", [
            {"step": s, "loss": 0.5 / k, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
             "rewards/margin": 0.2 * s, "rewards/accuracy": 0.8} for s in (1, 2)])
    manifest(root / "inj", "eval_injection")
    write_json(root / "inj/results.json", {"judge": "llm:x", "clean_outputs": 4, "clean_parse_failures": 0, "cases": {
        "fake_verdict": {"doc": "d", "flip_rate": 0.5, "flips": 1, "clean_target_lost": 2, "parse_failure_rate": 0.0,
                         "mean_shift": 0.875, "attacked_target_win_rate": 0.5}}})
    return root


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = fake_runs(tmp_path_factory.mktemp("runs"))
    out = report.report_cli(str(root), ["max_samples=5"])
    return root, out, out.read_text()


def section(text, key):
    return text[text.index(f'<section id="{key}">'): text.index("</section>", text.index(f'<section id="{key}">'))]


def test_sections_and_embedded_figures(page):
    """Figures: sft loss (1), dpo and tso (its two mini-batches on one axis) loss + rewards (plots.py) + accuracy
    (2 x 3), rm accuracy bars (1), score by rank (1), best-of-n x 2 (2), evolution (1) = 12 PNG data URIs."""
    root, out, text = page
    assert out == root / "report.html"
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 12 and all(base64.b64decode(u).startswith(b"\x89PNG") for u in uris)
    assert text.count("<img") == 12  # the pair's '<img src=x ...>' text is escaped, not an image
    for key in ("stages", "training", "rm", "score", "bestofn", "evolution", "injection", "samples"):
        assert "Omitted" not in section(text, key), key
    stages = section(text, "stages")  # steps, then seconds (dpo: 5 train + 1 reference)
    assert "<td>2026-01-01T00:00:02</td><td>2</td><td>6.0</td>" in stages and "<td>3</td><td>12.5</td>" in stages
    assert "<td>tso/iter-2</td><td>tso-minibatch</td>" in stages
    rm = section(text, "rm")
    assert "<td>significantly</td><td>2</td><td>1.000</td>" in rm and "<td>0.750</td>" in rm
    evo = section(text, "evolution")
    # header + sft + dpo + tso v1 + tso v2 (final margins 0.5 and 1.0 from the mini-batch manifests)
    assert evo.count("<tr>") == 5 and "<td>tso v2</td><td>tso</td>" in evo
    assert "<td>2</td><td>0.250</td><td>1.000</td><td>0.800</td>" in evo  # v2: steps, loss 0.5/2, margin, accuracy
    assert "<td>0.400</td><td>0.600 (n=2)</td>" in evo  # sft: best-of-2 gold 0.4, oracle 0.6
    training = section(text, "training")
    assert "sft/metrics.jsonl: 1 unreadable line(s) skipped" in training
    assert "<h3>tso <small>" in training and "<h3>tso/iter" not in training


def test_text_is_escaped_and_page_is_self_contained(page):
    _, _, text = page
    assert "alert(" in text and '<script>alert("x")' not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert text.count("<script") == 1  # the table filter
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    samples = section(text, "samples")
    assert samples.count("<tr>") == 1 + 1 + 2  # header, 1 pair, 2 ranked sets


def test_missing_pieces_are_notes_and_no_manifest_is_an_error(tmp_path, capsys):
    manifest(tmp_path / "only", "sample", seconds=1.0)
    out = report.run(report.ReportConfig(run_dir=str(tmp_path / "only"), output=str(tmp_path / "r.html")))
    assert capsys.readouterr().out.strip() == str(out) and out == tmp_path / "r.html"
    text = out.read_text()
    assert "Omitted: no reward-model run" in text and "<img" not in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no manifest.json under"):
        report.run(report.ReportConfig(run_dir=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="max_samples"):
        report.report_cli(str(tmp_path / "only"), ["max_samples=-1"])


def find_browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chromium-headless-shell"):
        if path := shutil.which(name):
            return path
    return None


def no_browser_reason() -> str:
    """Why there is no browser: `make test`'s `browser` target writes why it could not install one."""
    note = os.environ.get("ALIGNLINE_BROWSER_NOTE")
    why = Path(note).read_text().strip() if note and Path(note).is_file() else ""
    return ("no chromium / chrome binary on PATH" + (f"; {why}" if why else
                                                     "; `make browser` installs one (apt-get, as root or sudo)"))


def screenshot(page_path, png) -> None:
    subprocess.run([find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", "--window-size=1200,1600", page_path.resolve().as_uri()],
                   check=True, timeout=120, capture_output=True)


@pytest.mark.skipif(find_browser() is None, reason=no_browser_reason())
def test_headless_screenshot_is_not_blank(page, tmp_path):
    from PIL import Image

    _, out, _ = page
    png = tmp_path / "shot.png"
    screenshot(out, png)
    colours = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 16


@pytest.mark.skipif(find_browser() is None, reason=no_browser_reason())
def test_headless_screenshot_leads_with_the_progression_table(tmp_path):
    """A pipeline's page: the progression table's header (its own background, #ffeeb0) is drawn in the top
    quarter of the first screen, under the title."""
    from PIL import Image
    from tests.test_progression import fake_pipeline_run

    fake_pipeline_run(tmp_path / "root")
    out = report.build_report(report.ReportConfig(run_dir=str(tmp_path / "root")))
    png = tmp_path / "shot.png"
    screenshot(out, png)
    shot = Image.open(png).convert("RGB")
    width, height = shot.size
    pixels = shot.load()
    header_rows = [y for y in range(height) if sum(pixels[x, y] == (255, 238, 176) for x in range(0, width, 2)) > 100]
    assert header_rows and header_rows[0] < height // 4, header_rows[:3]
