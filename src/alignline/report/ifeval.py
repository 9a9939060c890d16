"""IFEval per policy: one row per ``eval.ifeval`` stage of a pipeline, in pipeline order.

A row is named after the stage whose output holds the evaluated model (its ``model`` setting, or the
``responses`` it checks), or after the model itself when no stage made it (a base-model alias). Per row:
instruction- and prompt-level strict with their standard errors (``results.json``; instruction level
clustered by prompt, :mod:`alignline.evaluate.clustered`) and the mean answer length in words. The last row
is compared with the first, paired on the prompts both evaluated (``verdicts.jsonl``): the difference of
each strict rate with its paired SE, marked ``*`` beyond 2 SE. The terminal summary of ``alignline run``
and the report's first section show the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignline.evaluate import clustered
from alignline.report.progression import model_setting, owner, relocate

IFEVAL = ("eval.ifeval", "eval_ifeval", "ifeval")
LEVELS = ("instruction_level_strict", "prompt_level_strict")


@dataclass
class IFEvalRow:
    name: str
    """The policy: the stage holding the evaluated model; for a model from outside the pipeline, the eval
    stage's ``name`` setting, else the model itself."""
    eval_stage: str
    results: dict = field(default_factory=dict)
    verdicts: dict[str, list[bool]] = field(default_factory=dict)
    """Strict verdicts by prompt id."""


@dataclass
class FinalVsFirst:
    final: str
    first: str
    n_prompts: int
    differences: dict[str, clustered.Estimate]

    def beyond(self, level: str) -> bool:
        e = self.differences[level]
        return e.value is not None and e.se is not None and abs(e.value) > 2 * e.se


def _read(path: Path) -> dict:
    from alignline.report.common import read_json

    return read_json(path) or {}


def _verdicts(path: Path) -> dict[str, list[bool]]:
    from alignline.report.common import read_jsonl

    rows = read_jsonl(path, []) if path.exists() else []
    return {str(r["prompt_id"]): [bool(x) for x in r["strict"]] for r in rows
            if isinstance(r.get("strict"), list) and "prompt_id" in r}


def ifeval_rows(pipeline: dict, root: Path | None = None) -> list[IFEvalRow]:
    """The rows of a pipeline.json-shaped mapping, reading each stage's outputs under ``root`` (default: the
    output root); a stage without results.json (not run yet) gives no row."""
    output_root = str(pipeline.get("output_root") or ".")
    root = Path(root) if root is not None else Path(output_root)
    stages = [s for s in pipeline.get("stages") or [] if isinstance(s, dict)]
    rows = []
    for i, s in enumerate(stages):
        if s.get("stage") not in IFEVAL:
            continue
        config = s.get("config") or {}
        evaluated = model_setting(config) or config.get("responses")
        made_by = owner(evaluated, stages, i)
        out = relocate(s["output_dir"], output_root, root)
        results = _read(out / "results.json")
        if results:
            # a model from outside the pipeline goes by the stage's display name when it has one, not its path
            name = made_by["name"] if made_by is not None else str(config.get("name") or evaluated or s["name"])
            rows.append(IFEvalRow(name, s["name"], results, _verdicts(out / "verdicts.jsonl")))
    return rows


def final_vs_first(rows: list[IFEvalRow]) -> FinalVsFirst | None:
    """The last row minus the first, paired on the prompts both hold with the same number of instructions;
    None with fewer than two rows or no prompt in common."""
    if len(rows) < 2:
        return None
    first, final = rows[0], rows[-1]
    common = [k for k in final.verdicts if len(first.verdicts.get(k, ())) == len(final.verdicts[k])]
    if not common:
        return None
    a, b = [final.verdicts[k] for k in common], [first.verdicts[k] for k in common]
    return FinalVsFirst(final.name, first.name, len(common), {
        "instruction_level_strict": clustered.paired_instruction_level(a, b),
        "prompt_level_strict": clustered.paired_prompt_level(a, b)})


def _pct(value, se=None, sign=False) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    text = f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"
    return text + (f" +- {100 * se:.1f}" if isinstance(se, (int, float)) else "")


HEADERS = ["policy", "instruction-level strict %", "prompt-level strict %", "prompts", "answer words"]


def cells(rows: list[IFEvalRow]) -> list[list[str]]:
    out = []
    for r in rows:
        res = r.results
        words = res.get("mean_answer_words")
        out.append([r.name, _pct(res.get("instruction_level_strict"), res.get("instruction_level_strict_se")),
                    _pct(res.get("prompt_level_strict"), res.get("prompt_level_strict_se")),
                    str(res.get("n_prompts", "-")), f"{words:.0f}" if isinstance(words, (int, float)) else "-"])
    return out


def comparison_line(cmp: FinalVsFirst | None) -> str | None:
    """"final policy rl vs sft on IFEval (200 prompts, paired): instruction-level strict +0.7 +- 2.3 points,
    prompt-level strict -1.0 +- 2.0 (* beyond 2 SE)"."""
    if cmp is None:
        return None
    parts = []
    for level in LEVELS:
        e = cmp.differences[level]
        parts.append(f"{level.replace('_level_', '-level ')} {_pct(e.value, e.se, True)}"
                     + (" *" if cmp.beyond(level) else ""))
    return (f"IFEval, final policy {cmp.final} vs {cmp.first} ({cmp.n_prompts} prompts, paired): "
            f"{', '.join(parts)} points (* beyond 2 SE)")


QUANTITY = ("IFEval (Zhou et al. 2023, Google's checker): strict instruction-level rate (+- SE clustered by "
            "prompt) and prompt-level rate (+- SE), on the prompts each eval.ifeval stage evaluated.")


def section_ifeval(doc: dict | None, root: Path) -> str:
    """The report's IFEval table and comparison line; "" without eval.ifeval results."""
    from alignline.report.common import esc, table

    rows = ifeval_rows(doc, root) if doc else []
    if not rows:
        return ""
    line = comparison_line(final_vs_first(rows))
    return ("<h3>IFEval</h3>" + table(HEADERS, [[esc(c) for c in row] for row in cells(rows)], "ifeval-table")
            + (f"<p><b>{esc(line)}</b></p>" if line else "") + f"<p>{esc(QUANTITY)}</p>")


def rows_json(rows: list[IFEvalRow]) -> list[dict]:
    """The rows as pipeline.json records them (without the per-prompt verdicts)."""
    cmp = final_vs_first(rows)
    out = [{"policy": r.name, "stage": r.eval_stage, **{k: r.results.get(k) for k in (
        "instruction_level_strict", "instruction_level_strict_se", "prompt_level_strict", "prompt_level_strict_se",
        "n_prompts", "n_instructions", "mean_answer_words")}} for r in rows]
    if cmp is not None:
        out[-1]["vs_first"] = {"first": cmp.first, "n_prompts": cmp.n_prompts, **{
            level: {"difference": e.value, "se": e.se, "beyond_2se": cmp.beyond(level)}
            for level, e in cmp.differences.items()}}
    return out
