"""The report's sections about stage results: training curves, reward-model accuracy (held-out pairs, or
training pairs labelled as such), score by rank, best-of-n, the evolution across policy versions, the injection
suite and the stages' summaries (counts and timings). Each takes the runs and a list
for notes and returns HTML ("" when there is nothing to show)."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from alignline.report.common import (
    StageRun,
    _plt,
    concat_metrics,
    esc,
    fig_uri,
    fmt,
    img,
    line_plot,
    metrics_files,
    num,
    png_uri,
    read_json,
    read_jsonl,
    series,
    table,
)

POLICY_STAGES = ("sft", "rs", "dpo", "tso", "rl")
"""Stages whose output is a new policy: the rows of the evolution table."""


ACCURACY_SERIES = (("accuracy", "training pairs (accuracy)"), ("rewards/accuracy", "training pairs (rewards/accuracy)"),
                   ("eval/accuracy", "eval pairs (eval/accuracy)"))
"""Metrics keys of pair accuracy and their labels: the training batches' accuracy is named as such."""


def rm_split_label(split) -> str:
    """eval.json's ``split`` in words: held out (the rm stage's data.eval) or the training pairs themselves."""
    if split == "eval":
        return "held-out pairs (the rm stage's data.eval)"
    return f"training pairs, not held out ({split or 'split not recorded'}): an optimistic figure"


def seconds_of(m: dict) -> float | None:
    if num(m.get("seconds")) is not None:
        return m["seconds"]
    if num(m.get("train_seconds")) is not None:
        return m["train_seconds"] + (num(m.get("reference_seconds")) or 0.0)
    timings = m.get("timings")
    if isinstance(timings, list) and timings:
        return sum((num(t.get("train_seconds")) or 0.0) + (num(t.get("reference_seconds")) or 0.0)
                   for t in timings if isinstance(t, dict))
    return None


def counts_html(counts) -> str:
    if not isinstance(counts, dict) or not counts:
        return "&mdash;"
    return "<br>".join(f"{esc(k)}: {esc(json.dumps(v) if isinstance(v, (dict, list)) else v)}"
                       for k, v in counts.items())


def section_stages(runs: list[StageRun], notes: list[str]) -> str:
    rows = []
    for r in runs:
        m = r.manifest
        status = str(m.get("status", "?"))
        word = (status.split() or ["?"])[0]
        rows.append([esc(r.rel), esc(r.stage), f'<span class="st-{esc(word)}">{esc(status)}</span>',
                     esc(m.get("written_at", "")), fmt(m.get("steps")), fmt(seconds_of(m), 1),
                     counts_html(m.get("counts"))])
    return table(["run", "stage", "status", "written", "steps", "seconds", "counts"], rows)


def section_training(runs: list[StageRun], notes: list[str]) -> str:
    from alignline.report.plots import plot_reward_curves

    parts = []
    for r in runs:
        files = metrics_files(r)
        if r.stage == "tso-minibatch" or not files:
            continue  # a TSO mini-batch is drawn with its TSO run, on one axis
        rows, bounds = concat_metrics(files, notes)
        loss = series(rows, "loss")
        figs = []
        if loss[0]:
            curves = [("train loss", *loss)]
            ev = series(rows, "eval/loss")
            if ev[0]:
                curves.append(("eval loss", *ev))
            figs.append(img(line_plot(curves, f"{r.rel} ({r.stage}): loss", "optimizer step", "loss", bounds),
                            f"{r.rel}: loss per step"))
        has_rewards = any(num(x.get("rewards/chosen")) is not None for x in rows)
        if has_rewards and r.stage in ("dpo", "tso"):
            with tempfile.TemporaryDirectory() as tmp:
                png = plot_reward_curves(files, Path(tmp) / "rewards.png", title=f"{r.rel}: implicit rewards")
                figs.append(img(png_uri(png), f"{r.rel}: chosen / rejected implicit rewards and margin"))
        elif has_rewards:
            curves = [(k.split("/")[1], *series(rows, k)) for k in ("rewards/chosen", "rewards/rejected",
                                                                  "rewards/margin")]
            figs.append(img(line_plot(curves, f"{r.rel} ({r.stage}): scores", "optimizer step", "score"),
                            f"{r.rel}: chosen / rejected scores and margin"))
        acc = [(label, *series(rows, k)) for k, label in ACCURACY_SERIES if series(rows, k)[0]]
        if acc:
            figs.append(img(line_plot(acc, f"{r.rel} ({r.stage}): accuracy", "optimizer step", "accuracy", bounds),
                            f"{r.rel}: pair accuracy (training pairs; eval: the stage's data.eval pairs)"))
        if figs:
            parts.append(f"<h3>{esc(r.rel)} <small>{esc(r.stage)}</small></h3>" + "".join(figs))
        else:
            notes.append(f"{r.rel}: metrics.jsonl holds no loss or reward values")
    return "".join(parts)


def section_rm(runs: list[StageRun], notes: list[str]) -> str:
    parts = []
    for r in runs:
        if r.stage != "rm":
            continue
        ev = read_json(r.path / "eval.json") or (r.manifest.get("eval") if isinstance(r.manifest.get("eval"), dict)
                                                 else None)
        if not ev or not isinstance(ev.get("accuracy_by_rating"), dict):
            notes.append(f"{r.rel}: no eval.json with accuracy per rating")
            continue
        by = {k: v for k, v in ev["accuracy_by_rating"].items() if isinstance(v, dict)}
        rows = [[esc(k), fmt(v.get("pairs")), fmt(v.get("accuracy")), fmt(v.get("se"))] for k, v in by.items()]
        rows.append(["<b>all</b>", fmt(ev.get("pairs")), fmt(ev.get("accuracy")), fmt(ev.get("accuracy_se"))])
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = list(by)
        ax.bar(names, [num(by[k].get("accuracy")) or 0.0 for k in names], color="tab:blue")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        held_out = ev.get("split") == "eval"
        ax.set_title(f"{r.rel}: accuracy per rating ({'held-out' if held_out else 'training'} pairs)")
        stats = (f"scores: chosen {fmt(ev.get('score_mean_chosen'))}, rejected {fmt(ev.get('score_mean_rejected'))}, "
                 f"std {fmt(ev.get('score_std'))}, mean margin {fmt(ev.get('margin_mean'))}")
        parts.append(f"<h3>{esc(r.rel)}</h3><p>accuracy on {esc(rm_split_label(ev.get('split')))}: "
                     f"<b>{fmt(ev.get('accuracy'))}</b> over {fmt(ev.get('pairs'))} pairs; {stats}</p>"
                     + table(["rating", "pairs", "accuracy", "SE"], rows) + img(fig_uri(fig), f"{r.rel}: RM accuracy"))
    return "".join(parts)


def ranked_sets(run: StageRun, notes: list[str]) -> list[dict]:
    out = []
    for shard in sorted(run.path.glob("ranked-*.jsonl")):
        out += read_jsonl(shard, notes)
    return [s for s in out if isinstance(s.get("responses"), list)]


def section_score_by_rank(runs: list[StageRun], notes: list[str]) -> str:
    parts = []
    for r in runs:
        if r.stage != "score":
            continue
        by_rank: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        sets = ranked_sets(r, notes)
        for s in sets:
            scorer = str(s.get("scorer", "rm"))
            for x in s["responses"]:
                score = num((x.get("scores") or {}).get(scorer)) if isinstance(x, dict) else None
                if score is not None and isinstance(x.get("rank"), int):
                    by_rank[scorer][x["rank"]].append(score)
        if not by_rank:
            notes.append(f"{r.rel}: no ranked sets with scores")
            continue
        curves = [(f"mean {scorer} score", sorted(ranks), [sum(ranks[k]) / len(ranks[k]) for k in sorted(ranks)])
                  for scorer, ranks in by_rank.items()]
        summary = "; ".join(f"{esc(name)}: rank {xs[0]} {fmt(ys[0])}, rank {xs[-1]} {fmt(ys[-1])}"
                            for name, xs, ys in curves)
        parts.append(f"<h3>{esc(r.rel)}</h3><p>{len(sets)} ranked sets; {summary}</p>"
                     + img(line_plot(curves, f"{r.rel}: mean score at each rank", "rank (1 = best)", "score"),
                           f"{r.rel}: reward-model score by rank"))
    return "".join(parts)


def bestofn_rows(run: StageRun) -> list[dict]:
    data = read_json(run.path / "bestofn.json") or {}
    rows = data.get("rows", run.manifest.get("rows"))
    return [x for x in rows if isinstance(x, dict) and num(x.get("n")) is not None] if isinstance(rows, list) else []


def section_bestofn(runs: list[StageRun], notes: list[str]) -> str:
    parts = []
    for r in runs:
        if r.stage != "bestofn":
            continue
        rows = bestofn_rows(r)
        if not rows:
            notes.append(f"{r.rel}: no bestofn.json rows")
            continue
        cfg = r.manifest.get("config") or {}
        ns = [x["n"] for x in rows]
        curves = [("gold score of RM's best-of-n", ns, [num(x.get("gold_of_rm_best")) for x in rows]),
                  ("oracle best-of-n", ns, [num(x.get("gold_oracle_best")) for x in rows])]
        curves = [(a, b, c) for a, b, c in curves if all(v is not None for v in c)]
        fig = img(line_plot(curves, f"{r.rel}: best-of-n", "n (samples)", "gold judge score", log2_x=True),
                  f"{r.rel}: best-of-n curves") if curves else ""
        parts.append(
            f"<h3>{esc(r.rel)}</h3><p>"
            + (f"ranked sets {esc(cfg['ranked'])}" if cfg.get("ranked") else
               f"policy {esc(cfg.get('model', '?'))}, reward model {esc(cfg.get('reward_model', '?'))}") + "</p>"
            + table(["n", "gold of RM's best", "oracle best", "RM score of best", "prompts"],
                    [[fmt(x.get("n")), fmt(x.get("gold_of_rm_best")), fmt(x.get("gold_oracle_best")),
                      fmt(x.get("rm_score_of_best")), fmt(x.get("prompts"))] for x in rows]) + fig)
    return "".join(parts)


def _same_path(a, b) -> bool:
    return bool(a) and bool(b) and os.path.normpath(str(a)) == os.path.normpath(str(b))


def section_evolution(runs: list[StageRun], notes: list[str]) -> str:
    versions = []  # label, stage, model path, final metrics, steps
    by_iter = {(r.path.parent, r.manifest.get("minibatch")): r for r in runs if r.stage == "tso-minibatch"}
    policies = sorted((r for r in runs if r.stage in POLICY_STAGES), key=lambda r: str(r.manifest.get("written_at")))
    for r in policies:
        m = r.manifest
        if r.stage == "tso" and isinstance(m.get("versions"), list):
            for v in m["versions"]:
                if not isinstance(v, dict) or not v.get("version"):
                    continue  # version 0 is the starting model, already a row of its own stage
                it = by_iter.get((r.path, v["version"]))
                final = (it.manifest.get("final_metrics") if it else None) or {}
                versions.append((f"{r.rel} v{v['version']}", "tso", v.get("path"), final,
                                 it.manifest.get("steps") if it else None))
        else:
            versions.append((r.rel, r.stage, m.get("model_dir"), m.get("final_metrics") or {}, m.get("steps")))
    evals: dict[int, dict] = {}
    extra = []
    for r in runs:
        model = (r.manifest.get("config") or {}).get("model")
        if r.stage != "bestofn" or model is None or not (rows := bestofn_rows(r)):
            continue  # (a curve drawn from ranked sets evaluates no policy version)
        top = max(rows, key=lambda x: x["n"])
        idx = next((i for i, v in enumerate(versions)
                    if _same_path(model, v[2]) or (v[2] and _same_path(model, Path(v[2]).parent))), None)
        if idx is None:
            extra.append((f"{model} (evaluated by {r.rel})", "model", model, {}, None))
            idx = -len(extra)
        evals[idx] = {"n": top["n"], "gold": top.get("gold_of_rm_best"), "oracle": top.get("gold_oracle_best")}
    rows_all = [(i, v) for i, v in enumerate(versions)] + [(-k, v) for k, v in enumerate(extra, start=1)]
    if len(rows_all) < 2:
        return ""
    cols = {"final loss": [], "final reward margin": [], "final reward accuracy (training pairs)": [],
            "best-of-N gold (RM pick)": []}
    trs = []
    for i, (label, stage, path, final, steps) in rows_all:
        ev = evals.get(i, {})
        vals = [num(final.get("loss")), num(final.get("rewards/margin")), num(final.get("rewards/accuracy")),
                num(ev.get("gold"))]
        for k, v in zip(cols, vals):
            cols[k].append(v)
        trs.append([esc(label), esc(stage), esc(path or ""), fmt(steps), *[fmt(v) for v in vals],
                    fmt(ev.get("oracle")) + (f" (n={fmt(ev['n'])})" if ev else "")])
    out = table(["version", "stage", "model", "steps", *cols, "best-of-N oracle"], trs)
    shown = {k: v for k, v in cols.items() if sum(x is not None for x in v) >= 2}
    if shown:
        plt = _plt()
        fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.4 * len(shown)), squeeze=False)
        labels = [v[0] for _, v in rows_all]
        for ax, (name, vals) in zip(axes[:, 0], shown.items()):
            xs = [i for i, v in enumerate(vals) if v is not None]
            ax.plot(xs, [vals[i] for i in xs], marker="o")
            ax.set_ylabel(name, fontsize=8)
            ax.set_xticks(range(len(labels)), [x[-24:] for x in labels], fontsize=7, rotation=20)
        axes[0, 0].set_title("across policy versions (in order of completion)")
        out += img(fig_uri(fig), "metrics across policy versions")
    return out


def section_injection(runs: list[StageRun], notes: list[str]) -> str:
    parts = []
    for r in runs:
        if r.stage != "eval_injection":
            continue
        res = read_json(r.path / "results.json")
        if not res or not isinstance(res.get("cases"), dict):
            notes.append(f"{r.rel}: no results.json")
            continue
        rows = [[esc(k), esc(v.get("doc", "")), f"{fmt(v.get('flip_rate'))} ({fmt(v.get('flips'))}/"
                 f"{fmt(v.get('clean_target_lost'))})", f"{fmt(v.get('parse_failure_rate'))}",
                 fmt(v.get("mean_shift")), fmt(v.get("attacked_target_win_rate"))]
                for k, v in res["cases"].items() if isinstance(v, dict)]
        parts.append(f"<h3>{esc(r.rel)}</h3><p>judge {esc(res.get('judge', '?'))}; clean parse failures "
                     f"{fmt(res.get('clean_parse_failures'))}/{fmt(res.get('clean_outputs'))}</p>"
                     + table(["case", "attack", "flip rate", "parse failure rate", "mean shift",
                              "attacked wins"], rows))
    return "".join(parts)
