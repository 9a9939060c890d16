"""The report's sample table: pair records and ranked sets, filterable, every text escaped and cut."""

from __future__ import annotations

from collections.abc import Callable

from alignline.report.common import StageRun, esc, fmt, num, read_jsonl, table

NOT_SAMPLES = {"metrics.jsonl", "judge_cache.jsonl", "failures.jsonl", "verdicts.jsonl"}
"""JSONL files of a run dir that are never sample records."""
MAX_TEXT = 4000
"""Characters of one response or prompt shown in the sample table (the rest is cut, with a note)."""


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
