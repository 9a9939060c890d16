"""The ``rl`` section of ``alignline report``: an online-RL run's per-iteration curves and its held-out evaluation.

From a run directory of ``alignline rl``: ``iterations.jsonl`` (one row per rollout: reward mean / SE, verifier
pass rate, zero-variance groups, KL, clip fraction, entropy, response length, tokens per second) drawn with
:func:`alignline.report.plots.plot_rl_curves` and listed in a table, and the manifest's held-out evaluation
(``eval_metrics_start``, ``eval_metrics``, ``eval_change``: greedy answers' verifier pass rates at the start and
at the end, the change with its paired standard error). Every text from the data is escaped (``common.esc``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alignline.report.common import StageRun, esc, fmt, img, num, png_uri, read_jsonl, table
from alignline.report.plots import RL_SE, plot_rl_curves

ITERATION_COLUMNS = (("reward_mean", "reward mean"), ("pass_rate", "pass rate"), ("kl", "KL"),
                     ("clip_fraction", "clip fraction"), ("entropy", "entropy"), ("response_length_mean", "tokens"),
                     ("rollout_tokens_per_s", "rollout tok/s"), ("train_tokens_per_s", "train tok/s"))
"""Per-iteration table columns (key in iterations.jsonl, heading); the first two are shown +- SE (plots.RL_SE)."""


def iteration_rows(run: StageRun, notes: list[str]) -> list[dict]:
    path = run.path / "iterations.jsonl"
    if not path.exists():
        notes.append(f"{run.rel}: no iterations.jsonl (the run has not finished)")
        return []
    return sorted((r for r in read_jsonl(path, notes) if isinstance(r.get("iteration"), int)),
                  key=lambda r: r["iteration"])


def with_se(value, se) -> str:
    return fmt(value) + (f" &plusmn; {fmt(se)}" if num(se) is not None else "")


def iterations_table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        zero = (f"{fmt(r['zero_variance_groups'])}/{fmt(r.get('groups'))}"
                if r.get("zero_variance_groups") is not None else "&mdash;")  # (None for groups of one)
        cells.append([fmt(r["iteration"]), *[with_se(r.get(k), r.get(RL_SE[k])) for k, _ in ITERATION_COLUMNS[:2]],
                      zero, *[fmt(r.get(k), 1 if k.endswith("_per_s") else 3) for k, _ in ITERATION_COLUMNS[2:]]])
    headers = ["iteration", *[h for _, h in ITERATION_COLUMNS[:2]], "zero-variance groups",
               *[h for _, h in ITERATION_COLUMNS[2:]]]
    return f"<details><summary>per iteration ({len(rows)})</summary>{table(headers, cells)}</details>"


def eval_table(run: StageRun, notes: list[str]) -> str:
    """Start vs end of the held-out greedy evaluation, the change (paired SE for the strict instruction-level
    rate, from eval_start.jsonl / eval_last.jsonl), and the counts."""
    m = run.manifest
    start = m.get("eval_metrics_start") if isinstance(m.get("eval_metrics_start"), dict) else {}
    end = m.get("eval_metrics") if isinstance(m.get("eval_metrics"), dict) else {}
    change = m.get("eval_change") if isinstance(m.get("eval_change"), dict) else {}
    if not (start or end or change):
        notes.append(f"{run.rel}: no held-out evaluation (eval.prompts not set)")
        return ""
    prompts = len(read_jsonl(run.path / "eval_start.jsonl", notes)) if (run.path / "eval_start.jsonl").exists() \
        else None
    n_inst = change.get("n", end.get("instructions", start.get("instructions")))

    def diff(key):
        a, b = num(start.get(key)), num(end.get(key))
        return None if a is None or b is None else b - a

    strict = [with_se(change.get("start", start.get("instruction_strict")), start.get("instruction_strict_se")),
              with_se(change.get("end", end.get("instruction_strict")), end.get("instruction_strict_se")),
              fmt(change.get("change", diff("instruction_strict"))), fmt(change.get("paired_se")), fmt(n_inst)]
    rows = [["instruction-level strict", *strict],
            ["instruction-level loose", fmt(start.get("instruction_loose")), fmt(end.get("instruction_loose")),
             fmt(diff("instruction_loose")), "&mdash;", fmt(n_inst)],
            ["prompt-level strict", fmt(start.get("prompt_strict")), fmt(end.get("prompt_strict")),
             fmt(diff("prompt_strict")), "&mdash;", fmt(prompts)]]
    note = ""
    if num(change.get("change")) is not None and num(change.get("paired_se")):
        note = (f"<p>strict instruction-level change {fmt(change['change'])} = "
                f"{fmt(change['change'] / change['paired_se'], 1)} paired SE (n = {fmt(change.get('n'))} "
                "instructions, the same prompts and greedy decoding at both ends).</p>")
    return (table(["held-out (greedy, verifier)", "start", "end", "change", "paired SE", "n"], rows) + note)


def summary(run: StageRun, rows: list[dict]) -> str:
    cfg = run.manifest.get("config") if isinstance(run.manifest.get("config"), dict) else {}
    loss, rollout, kl = (cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("loss", "rollout", "kl"))
    rewards = cfg.get("reward") if isinstance(cfg.get("reward"), list) else []
    terms = ", ".join(f"{r.get('type', '?')}" + (f" x {r['weight']}" if r.get("weight", 1.0) != 1.0 else "")
                      for r in rewards if isinstance(r, dict))
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return (f"<p>estimator {esc(loss.get('estimator', '?'))}, {fmt(len(rows))} of {fmt(cfg.get('iterations'))} "
            f"iterations, {fmt(rollout.get('prompts'))} prompts x {fmt(rollout.get('group_size'))} responses each; "
            f"reward {esc(terms or '?')}; KL coef {fmt(kl.get('coef'))}. Reward mean "
            f"{with_se(first.get('reward_mean'), first.get('reward_se'))} (iteration {fmt(first.get('iteration'))}) "
            f"&rarr; {with_se(last.get('reward_mean'), last.get('reward_se'))} "
            f"(iteration {fmt(last.get('iteration'))}).</p>")


def section_rl(runs: list[StageRun], notes: list[str]) -> str:
    parts = []
    for r in runs:
        if r.stage != "rl":
            continue
        rows = iteration_rows(r, notes)
        fig = ""
        if rows:
            with tempfile.TemporaryDirectory() as tmp:
                png = plot_rl_curves(rows, Path(tmp) / "rl.png", title=f"{r.rel} (rl)")
                fig = img(png_uri(png), f"{r.rel}: per-iteration reward, pass rate, KL, clipping, entropy, length")
        parts.append(f"<h3>{esc(r.rel)} <small>rl</small></h3>" + summary(r, rows) + fig
                     + (iterations_table(rows) if rows else "") + eval_table(r, notes))
    return "".join(parts)
