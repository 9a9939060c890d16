"""``alignline report RUN_DIR``: one self-contained HTML page about a run directory.

RUN_DIR is a stage's run directory or a directory of them: it is searched recursively for
``manifest.json``. The page holds what it finds: the stages' summaries (status, counts, seconds), training
curves from ``metrics.jsonl`` (loss; chosen/rejected rewards and margin for DPO, TSO and the reward model),
the reward model's accuracy per rating (``eval.json``), the mean score by rank of ranked sets (``score``),
best-of-n curves (``bestofn.json``), online-RL runs (``rl``: per-iteration curves from ``iterations.jsonl`` and
the held-out evaluation, :mod:`alignline.report.rl`), the evolution across policy versions when there are
several, the judge injection suite's table (``eval_injection``), and a filterable table of sample records
(pairs and ranked sets). A piece whose files are missing or unreadable is left out with a note; the page never
fails for it.

The page needs nothing else: figures are PNGs inside ``data:`` URIs, the CSS is inline, and the only script
is a few lines that filter the sample tables. Every text from the data is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from alignline.config import Section
from alignline.data.io import MANIFEST, atomic_write_text
from alignline.errors import ConfigError

POLICY_STAGES = ("sft", "rs", "dpo", "tso", "rl")
"""Stages whose output is a new policy: the rows of the evolution table."""
NOT_SAMPLES = {"metrics.jsonl", "judge_cache.jsonl", "failures.jsonl", "verdicts.jsonl"}
"""JSONL files of a run dir that are never sample records."""
MAX_TEXT = 4000
"""Characters of one response or prompt shown in the sample table (the rest is cut, with a note)."""


class ReportConfig(Section):
    """Configuration of ``alignline report``."""

    run_dir: str
    """A stage's run directory, or a directory of them (searched recursively for manifest.json)."""
    output: str | None = None
    """Where the page goes; default RUN_DIR/report.html."""
    max_samples: int = Field(30, ge=0)
    """At most this many records per run in the sample table (0: no sample table)."""
    title: str | None = None
    """Page title; default 'alignline report: <RUN_DIR name>'."""


@dataclass
class StageRun:
    path: Path
    rel: str
    """Path relative to RUN_DIR, as shown on the page."""
    manifest: dict

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage", "?"))


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def find_runs(root: Path) -> list[StageRun]:
    """Every directory under ``root`` (itself included) holding a manifest.json, sorted by path."""
    if not root.is_dir():
        raise ConfigError(f"run_dir {root} is not a directory; give a stage's output_dir or a directory of them")
    runs = []
    for m in sorted(root.rglob(MANIFEST)):
        try:
            manifest = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            manifest = {"stage": "?", "status": f"unreadable manifest ({type(exc).__name__})"}
        if not isinstance(manifest, dict):
            manifest = {"stage": "?", "status": "unreadable manifest (not a JSON object)"}
        rel = m.parent.relative_to(root).as_posix()
        runs.append(StageRun(path=m.parent, rel=rel if rel != "." else ".", manifest=manifest))
    if not runs:
        raise ConfigError(f"no {MANIFEST} under {root}: it is not a run directory (a stage writes {MANIFEST} "
                          "when it finishes); point run_dir at a stage's output_dir or at a directory of them")
    return runs


# ----------------------------------------------------------------------------------------------- figures

def _plt():
    from alignline.report.plots import _plt as plt

    return plt()


def fig_uri(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'


def line_plot(series: list[tuple[str, list, list]], title: str, xlabel: str, ylabel: str,
              vlines: list[float] = (), log2_x: bool = False) -> str:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, xs, ys in series:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 20 else None, markersize=3)
    xs_all = sorted({x for _, xs, _ in series for x in xs})
    if log2_x and xs_all:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, ranks and n are whole numbers
    for v in vlines:
        ax.axvline(v, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return fig_uri(fig)


# ----------------------------------------------------------------------------------------------- reading

def read_jsonl(path: Path, notes: list[str], limit: int | None = None) -> list[dict]:
    """Objects of a JSONL file; unreadable lines are skipped and noted (a report never stops for them)."""
    out, bad = [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad += 1
                continue
            if isinstance(obj, dict):
                out.append(obj)
            else:
                bad += 1
            if limit is not None and len(out) >= limit:
                break
    if bad:
        notes.append(f"{path.parent.name}/{path.name}: {bad} unreadable line(s) skipped")
    return out


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt(x, digits: int = 3) -> str:
    v = num(x)
    if v is None:
        return "&mdash;" if x is None else esc(x)
    return str(x) if isinstance(x, int) else f"{v:.{digits}f}"


def metrics_files(run: StageRun) -> list[Path]:
    if run.stage == "tso":
        iters = [p for p in run.path.glob("iter-*/metrics.jsonl") if p.parent.name[5:].isdigit()]
        return sorted(iters, key=lambda p: int(p.parent.name[5:]))
    return [run.path / "metrics.jsonl"] if (run.path / "metrics.jsonl").exists() else []


def concat_metrics(files: list[Path], notes: list[str]) -> tuple[list[dict], list[float]]:
    """Rows of several metrics files on one step axis (each file continues after the previous one's last
    step), and the step where each file after the first starts."""
    rows, bounds, offset = [], [], 0
    for i, f in enumerate(files):
        part = read_jsonl(f, notes)
        if i:
            bounds.append(offset)
        for r in part:
            if num(r.get("step")) is not None:
                rows.append({**r, "step": offset + r["step"]})
        offset += max((r["step"] for r in part if num(r.get("step")) is not None), default=0)
    return rows, bounds


def series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], num(r.get(key))) for r in rows if num(r.get(key)) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


# ----------------------------------------------------------------------------------------------- sections

def table(headers: list[str], rows: list[list[str]], table_id: str = "") -> str:
    """``rows`` cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    attr = f' id="{table_id}"' if table_id else ""
    return f'<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


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
        acc = [(k, *series(rows, k)) for k in ("accuracy", "rewards/accuracy", "eval/accuracy")
               if series(rows, k)[0]]
        if acc:
            figs.append(img(line_plot(acc, f"{r.rel} ({r.stage}): accuracy", "optimizer step", "accuracy", bounds),
                            f"{r.rel}: pair accuracy"))
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
        rows = [[esc(k), fmt(v.get("pairs")), fmt(v.get("accuracy"))] for k, v in by.items()]
        rows.append(["<b>all</b>", fmt(ev.get("pairs")), fmt(ev.get("accuracy"))])
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = list(by)
        ax.bar(names, [num(by[k].get("accuracy")) or 0.0 for k in names], color="tab:blue")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{r.rel}: accuracy per rating ({ev.get('split', '?')})")
        stats = (f"scores: chosen {fmt(ev.get('score_mean_chosen'))}, rejected {fmt(ev.get('score_mean_rejected'))}, "
                 f"std {fmt(ev.get('score_std'))}, mean margin {fmt(ev.get('margin_mean'))}")
        parts.append(f"<h3>{esc(r.rel)}</h3><p>split: {esc(ev.get('split', '?'))}; {stats}</p>"
                     + table(["rating", "pairs", "accuracy"], rows) + img(fig_uri(fig), f"{r.rel}: RM accuracy"))
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
    cols = {"final loss": [], "final reward margin": [], "final reward accuracy": [], "best-of-N gold (RM pick)": []}
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


def section_rl(runs: list[StageRun], notes: list[str]) -> str:
    from alignline.report.rl import section_rl as build  # (report/rl.py builds on this module's helpers)

    return build(runs, notes)


def text_block(text, label: str = "") -> str:
    s = str(text)
    cut = f'<span class="note"> &hellip; ({len(s) - MAX_TEXT} more characters)</span>' if len(s) > MAX_TEXT else ""
    head = f"<b>{esc(label)}</b> " if label else ""
    return f'<div class="txt">{head}{esc(s[:MAX_TEXT])}{cut}</div>'


def prompt_cell(messages) -> str:
    if isinstance(messages, str):
        return text_block(messages)
    if not isinstance(messages, list) or not messages:
        return "&mdash;"
    last = messages[-1]
    body = text_block(last.get("content", "") if isinstance(last, dict) else last)
    if len(messages) > 1:
        earlier = "".join(text_block(m.get("content", ""), str(m.get("role", "")).upper() + ":")
                          for m in messages[:-1] if isinstance(m, dict))
        body = f"<details><summary>{len(messages) - 1} earlier turn(s)</summary>{earlier}</details>" + body
    return body


def pair_row(run: StageRun, obj: dict) -> list[str]:
    prov = obj.get("provenance") if isinstance(obj.get("provenance"), dict) else {}
    scores = {k: v for k, v in prov.items() if "score" in k and not isinstance(v, (dict, list))}
    if isinstance(prov.get("scores"), dict):
        scores.update({f"{k}": v for k, v in prov["scores"].items()})
    score_html = "<br>".join(f"{esc(k)}: {fmt(v)}" for k, v in scores.items())
    rating = f"rating: {esc(obj['rating'])}<br>" if obj.get("rating") else ""
    return [esc(run.rel), esc(obj.get("id", "")), prompt_cell(obj.get("prompt") or obj.get("messages")),
            text_block(obj.get("chosen", ""), "chosen:") + text_block(obj.get("rejected", ""), "rejected:"),
            rating + (score_html or ""), text_block(obj.get("reason") or "") if obj.get("reason") else ""]


def ranked_row(run: StageRun, obj: dict) -> list[str]:
    prompt = obj.get("prompt") if isinstance(obj.get("prompt"), dict) else {}
    scorer = str(obj.get("scorer", ""))
    resp = [x for x in obj.get("responses", []) if isinstance(x, dict)]

    def one(x):
        score = (x.get("scores") or {}).get(scorer)
        return text_block(x.get("text", ""), f"#{x.get('rank', '?')} (sample {x.get('sample_idx', '?')}, "
                                             f"{scorer} {fmt(score)}):")

    shown = resp if len(resp) <= 3 else [resp[0], resp[-1]]
    cell = "".join(one(x) for x in shown)
    if len(resp) > 3:
        cell += f"<details><summary>all {len(resp)} responses</summary>{''.join(one(x) for x in resp)}</details>"
    vals = [num((x.get("scores") or {}).get(scorer)) for x in resp]
    vals = [v for v in vals if v is not None]
    score_html = (f"{esc(scorer)}: {fmt(max(vals))} .. {fmt(min(vals))}<br>{len(resp)} responses" if vals else "")
    reasons = "".join(text_block(x["reason"], f"#{x.get('rank', '?')}:") for x in resp if x.get("reason"))
    return [esc(run.rel), esc(prompt.get("id", "")), prompt_cell(prompt.get("messages")), cell, score_html, reasons]


def sample_kind(obj: dict) -> Callable[[StageRun, dict], list[str]] | None:
    if "chosen" in obj and "rejected" in obj:
        return pair_row
    if isinstance(obj.get("prompt"), dict) and isinstance(obj.get("responses"), list):
        return ranked_row
    return None


def section_samples(runs: list[StageRun], notes: list[str], max_samples: int) -> str:
    if max_samples == 0:
        return ""
    rows = []
    for r in runs:
        taken = 0
        for f in sorted(r.path.glob("*.jsonl")):
            if f.name in NOT_SAMPLES or taken >= max_samples:
                continue
            objs = read_jsonl(f, notes, limit=max_samples - taken)
            make = sample_kind(objs[0]) if objs else None
            if make is None:
                continue
            for obj in objs:
                rows.append(make(r, obj))
            taken += len(objs)
    if not rows:
        return ""
    return ('<p><input type="search" placeholder="filter rows (any text)" data-filter="samples" '
            'aria-label="filter sample rows"></p>'
            + table(["run", "id", "prompt", "responses", "scores", "judge reasons"], rows, "samples"))


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1b1f24;background:#fff}
h1{font-size:1.6em;border-bottom:3px solid #2f6fb2;padding-bottom:.3em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ccd;padding-bottom:.2em;color:#2f6fb2}
h3{font-size:1.05em;margin-bottom:.3em}h3 small{color:#667;font-weight:normal}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccd;padding:.3em .55em;vertical-align:top;text-align:left}
th{background:#e8eef7}tbody tr:nth-child(even){background:#f6f8fb}
#samples td{max-width:420px}
.txt{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;
margin:.2em 0;padding:.25em .4em;background:#fbfbf4;border-left:3px solid #d8d3a8}
.note{color:#7a5b00}ul.notes li{color:#7a5b00}
figure{margin:.6em 0;display:inline-block}figure img{max-width:min(100%,760px);border:1px solid #dde}
figcaption{font-size:.8em;color:#667}
.st-complete{color:#1d7a32;font-weight:600}.st-stale,.st-running,.st-unreadable{color:#b3261e;font-weight:600}
nav a{margin-right:1em}input[type=search]{width:24em;padding:.3em}
"""

SCRIPT = """<script>
document.querySelectorAll("input[data-filter]").forEach(function (box) {
  box.addEventListener("input", function () {
    var q = box.value.toLowerCase();
    document.querySelectorAll("#" + box.dataset.filter + " tbody tr").forEach(function (tr) {
      tr.style.display = tr.textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none";
    });
  });
});
</script>"""

SECTIONS = (
    ("stages", "Stages", section_stages, "no stage summaries"),
    ("training", "Training curves", section_training,
     "no metrics.jsonl (sft, rs, dpo, tso, rm or rl runs write one)"),
    ("rm", "Reward model accuracy per rating", section_rm, "no reward-model run (rm writes eval.json)"),
    ("score", "Reward-model score by rank", section_score_by_rank, "no score run with ranked sets"),
    ("bestofn", "Best-of-n", section_bestofn, "no best-of-n run (alignline eval bestofn)"),
    ("rl", "Online RL", section_rl, "no rl run (alignline rl)"),
    ("evolution", "Across policy versions", section_evolution, "needs two or more policy runs or versions"),
    ("injection", "Judge robustness (injection suite)", section_injection, "no eval_injection run"),
)


def build_html(root: Path, runs: list[StageRun], *, title: str, max_samples: int) -> str:
    body, nav, all_notes = [], [], []
    builders = [*SECTIONS, ("samples", "Samples", lambda rs, ns: section_samples(rs, ns, max_samples),
                            "no pair or ranked-set records" if max_samples else "max_samples=0")]
    for key, heading, build, missing in builders:
        notes: list[str] = []
        try:
            content = build(runs, notes)
        except Exception as exc:  # noqa: BLE001 (one unreadable piece must not cost the whole page)
            content = ""
            notes.append(f"this section could not be built: {type(exc).__name__}: {exc}")
        all_notes += [f"{heading}: {n}" for n in notes]
        nav.append(f'<a href="#{key}">{esc(heading)}</a>')
        body.append(f'<section id="{key}"><h2>{esc(heading)}</h2>'
                    + (content or f'<p class="note">Omitted: {esc(missing)}.</p>')
                    + "".join(f'<p class="note">{esc(n)}</p>' for n in notes) + "</section>")
    stages = sorted({r.stage for r in runs})
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p>{len(runs)} stage run(s) under <code>{esc(root)}</code> "
        f"({esc(', '.join(stages))}); generated {esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}.</p>"
        f"<nav>{''.join(nav)}</nav>{''.join(body)}{SCRIPT}</body></html>\n"
    )


def run(cfg: ReportConfig) -> Path:
    root = Path(cfg.run_dir)
    runs = find_runs(root)
    out = Path(cfg.output) if cfg.output else root / "report.html"
    page = build_html(root, runs, title=cfg.title or f"alignline report: {root.resolve().name}",
                      max_samples=cfg.max_samples)
    atomic_write_text(out, page)
    print(out)
    return out


def report_cli(run_dir: str, overrides: list[str]) -> Path:
    """``alignline report RUN_DIR [key=value ...]``: RUN_DIR is taken as is (never YAML-parsed)."""
    from pydantic import ValidationError

    from alignline.config import config_error, parse_overrides

    data = parse_overrides(overrides)
    data["run_dir"] = str(run_dir)
    try:
        cfg = ReportConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(ReportConfig, exc, "the command line") from None
    return run(cfg)
