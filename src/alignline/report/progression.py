"""The policy progression of a pipeline: one row per evaluated policy, in pipeline order, with its parent.

Read from the pipeline itself (``pipeline.json``'s stage entries: name, stage type, output_dir, config), never
from stage names. A *policy* is a stage whose output holds a model that an ``eval.bestofn`` stage evaluates
(its ``model`` lies in that stage's output_dir, e.g. ``tso/versions/v2``) and whose samples an
``eval.verifiable`` stage checks. Its *parent* is the stage whose output its own ``model`` setting points into
(none for a base-model alias). Per policy:

* best-of-1: the strict instruction-level pass rate of sample 0 (the verify stage's results) and its count of
  instructions;
* best-of-N (RM pick) and oracle best-of-N: the eval stage's ``bestofn.json`` at its largest n: the mean over
  prompts of the fraction of the prompt's instructions followed (strict), of the RM's pick / the best sample;
* change vs parent: the mean per-instruction paired difference of strict pass (this policy's sample 0 minus the
  parent's, same held-out prompt and instruction, from ``verifications.jsonl``) with its paired standard error
  sd(differences) / sqrt(n); flagged when |change| > 2 SE.

The terminal summary of ``alignline run`` and the report's first section both print these rows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

BESTOFN = ("eval.bestofn", "bestofn")
VERIFIABLE = ("eval.verifiable", "eval_verifiable", "verifiable")


@dataclass
class Policy:
    """Which stages make one row: the policy's own, its evaluation, its verification and its parent's."""

    name: str
    """The row's label: the stage's name, plus the model's path inside it when the stage has several."""
    stage_name: str
    stage: str
    """The stage type (sft, rs, dpo, tso, rl, ...)."""
    model: str
    """The evaluated model directory (as the pipeline wrote it)."""
    eval_dir: str
    verify_dir: str
    parent_model: str | None = None
    """What the policy's own ``model`` setting names (a model directory or a base-model alias)."""
    parent_stage: str | None = None
    """The stage whose output holds parent_model; None for a base-model alias."""
    parent: str | None = None
    """The parent's row name; None for a base model or a parent stage that is not itself evaluated."""


@dataclass
class ProgressionRow:
    policy: Policy
    best_of_1: float | None = None
    n_instructions: int | None = None
    top_n: int | None = None
    rm_pick: float | None = None
    oracle: float | None = None
    change: float | None = None
    se: float | None = None
    n_paired: int = 0
    root: str | None = None
    """The first policy of this row's lineage (parent of parent of ...); set on the final row only."""
    root_change: float | None = None
    root_se: float | None = None

    @property
    def flagged(self) -> bool:
        """|change| > 2 paired SE: more than the noise of this many instructions explains."""
        return self.change is not None and self.se is not None and abs(self.change) > 2 * self.se

    @property
    def best_of_1_se(self) -> float | None:
        """Binomial SE of best-of-1, sqrt(p (1 - p) / n): the chart's error bars are +-2 of it."""
        if self.best_of_1 is None or not self.n_instructions:
            return None
        return math.sqrt(self.best_of_1 * (1 - self.best_of_1) / self.n_instructions)


def _norm(p) -> str:
    """A path made comparable: absolute (relative ones against the working directory, so two relative paths of
    one pipeline compare as they did where it ran) and normalised."""
    return os.path.normpath(os.path.abspath(str(p)))


def _inside(path, directory) -> bool:
    a, d = _norm(path), _norm(directory)
    return a == d or a.startswith(d.rstrip(os.sep) + os.sep)


def model_setting(config: dict) -> str | None:
    """The model a stage reads: ``model`` as a path, or ``model.model`` of a system block."""
    m = (config or {}).get("model")
    if isinstance(m, dict):
        m = m.get("model")
    return m if isinstance(m, str) and m else None


def responses_setting(config: dict) -> str:
    """An eval.verifiable stage's ``model.responses`` (the samples it checks); "" when it generates its own."""
    m = (config or {}).get("model")
    r = m.get("responses") if isinstance(m, dict) else None
    return r if isinstance(r, str) else ""


def owner(path: str | None, stages: list[dict], before: int) -> dict | None:
    """The stage (among the first ``before``) whose output_dir holds ``path``; the deepest one wins."""
    if not path:
        return None
    hits = [s for s in stages[:before] if _inside(path, s["output_dir"])]
    return max(hits, key=lambda s: len(_norm(s["output_dir"])), default=None)


def find_policies(stages: list[dict]) -> list[Policy]:
    """The policies of a pipeline's stage entries (dicts with name, stage, output_dir, config), in pipeline order.

    A stage with several evaluated models (e.g. two TSO versions) gives one row per model, named
    ``stage path-inside-it``; a policy evaluated twice keeps its first evaluation.
    """
    index = {s["name"]: i for i, s in enumerate(stages)}
    found: dict[str, tuple[str, dict, dict, dict]] = {}  # model -> (as written, policy, eval and verify stages)
    for i, ev in enumerate(stages):
        if ev["stage"] not in BESTOFN or not (model := model_setting(ev.get("config"))):
            continue
        policy = owner(model, stages, i)
        verify = next((v for v in stages[i + 1:] if v["stage"] in VERIFIABLE
                       and (r := responses_setting(v.get("config"))) and _inside(r, ev["output_dir"])), None)
        if policy is not None and verify is not None and _norm(model) not in found:
            found[_norm(model)] = (model, policy, ev, verify)
    per_stage: dict[str, int] = {}
    for _, policy, _, _ in found.values():
        per_stage[policy["name"]] = per_stage.get(policy["name"], 0) + 1
    rows = []
    for model, policy, ev, verify in sorted(found.values(), key=lambda f: (index[f[1]["name"]], index[f[2]["name"]])):
        name = policy["name"]
        if per_stage[name] > 1:
            name = f"{name} {os.path.relpath(_norm(model), _norm(policy['output_dir']))}"
        rows.append(Policy(name, policy["name"], policy["stage"], model, ev["output_dir"], verify["output_dir"],
                           parent_model=model_setting(policy.get("config"))))
    by_model = {_norm(r.model): r for r in rows}
    for r in rows:
        parent_stage = owner(r.parent_model, stages, index[r.stage_name])
        if parent_stage is None:
            continue
        r.parent_stage = parent_stage["name"]
        exact = by_model.get(_norm(r.parent_model))
        same_stage = [p for p in rows if p.stage_name == parent_stage["name"]]
        parent = exact or (same_stage[-1] if same_stage else None)
        r.parent = parent.name if parent is not None and parent is not r else None
    return rows


def paired_change(child: dict[tuple[str, int], bool], parent: dict[tuple[str, int], bool]
                  ) -> tuple[float | None, float | None, int]:
    """Mean of child - parent strict pass over the (prompt id, instruction index) keys both hold, its paired
    standard error sd / sqrt(n) (sample sd, n - 1), and n. (None, None, 0) without common keys."""
    keys = [k for k in child if k in parent]
    diffs = [float(child[k]) - float(parent[k]) for k in keys]
    n = len(diffs)
    if not n:
        return None, None, 0
    mean = sum(diffs) / n
    if n < 2:
        return mean, None, n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean, sd / math.sqrt(n), n


def read_passes(verify_dir: Path) -> dict[tuple[str, int], bool]:
    """(prompt id, instruction index) -> strict pass, from a verify stage's ``verifications.jsonl``."""
    from alignline.report.common import read_jsonl

    path = verify_dir / "verifications.jsonl"
    out: dict[tuple[str, int], bool] = {}
    for rec in read_jsonl(path, []) if path.exists() else []:
        if isinstance(rec.get("strict"), list):
            out.update({(str(rec.get("prompt_id")), i): bool(ok) for i, ok in enumerate(rec["strict"])})
    return out


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def relocate(path: str, output_root: str, root: Path) -> Path:
    """A path the pipeline wrote (relative to the directory it ran in) as seen from its output root ``root``
    now: the report may read a run directory that was moved or is read from elsewhere."""
    if _inside(path, output_root):
        return root / os.path.relpath(_norm(path), _norm(output_root))
    return Path(path)


def progression(pipeline: dict, root: Path | None = None) -> list[ProgressionRow]:
    """The rows for a pipeline.json-shaped mapping (``stages`` entries; ``output_root``), reading each eval and
    verify stage's outputs under ``root`` (default: the output root itself). Missing files leave cells empty."""
    output_root = str(pipeline.get("output_root") or ".")
    root = Path(root) if root is not None else Path(output_root)
    policies = find_policies([s for s in pipeline.get("stages") or [] if isinstance(s, dict)])
    passes = {p.name: read_passes(relocate(p.verify_dir, output_root, root)) for p in policies}
    rows = []
    for p in policies:
        row = ProgressionRow(p)
        res = _read_json(relocate(p.verify_dir, output_root, root) / "results.json")
        row.best_of_1, row.n_instructions = _number(res.get("instruction_level_strict")), res.get("n_instructions")
        curve = _read_json(relocate(p.eval_dir, output_root, root) / "bestofn.json").get("rows")
        points = [x for x in curve or [] if isinstance(x, dict) and _number(x.get("n")) is not None]
        if points:
            top = max(points, key=lambda x: x["n"])
            row.top_n, row.rm_pick, row.oracle = top["n"], _number(top.get("gold_of_rm_best")), _number(
                top.get("gold_oracle_best"))
        if p.parent is not None:
            row.change, row.se, row.n_paired = paired_change(passes[p.name], passes[p.parent])
        rows.append(row)
    if rows:
        final = rows[-1]
        final.root = lineage_root(final.policy, policies)
        if final.root not in (None, final.policy.name, final.policy.parent):
            final.root_change, final.root_se, _ = paired_change(passes[final.policy.name], passes[final.root])
    return rows


def lineage_root(policy: Policy, policies: list[Policy]) -> str | None:
    """The name of the first evaluated ancestor of ``policy`` (itself when it has no evaluated parent): the
    demo's question is whether the last policy beats the first, not only its parent."""
    by_name = {p.name: p for p in policies}
    seen = {policy.name}
    while policy.parent is not None and policy.parent in by_name and policy.parent not in seen:
        policy = by_name[policy.parent]
        seen.add(policy.name)
    return policy.name


def rows_json(rows: list[ProgressionRow]) -> list[dict]:
    """The rows as pipeline.json records them."""
    return [{"policy": r.policy.name, "stage": r.policy.stage, "model": r.policy.model, "parent": r.policy.parent,
             "parent_stage": r.policy.parent_stage, "parent_model": r.policy.parent_model, "eval": r.policy.eval_dir, "verify": r.policy.verify_dir,
             "best_of_1": r.best_of_1, "n_instructions": r.n_instructions, "n": r.top_n, "rm_pick": r.rm_pick,
             "oracle": r.oracle, "change": r.change, "paired_se": r.se, "n_paired": r.n_paired,
             "beyond_2se": r.flagged, "root": r.root, "change_vs_root": r.root_change,
             "paired_se_vs_root": r.root_se} for r in rows]


def _f(x: float | None, sign: bool = False) -> str:
    return "-" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")


def headers(rows: list[ProgressionRow]) -> list[str]:
    """Column headers; N is named when every row's curve ends at the same n."""
    ns = {r.top_n for r in rows if r.top_n is not None}
    n = f"{ns.pop()}" if len(ns) == 1 else "N"
    return ["policy", "best-of-1 (instr.)", f"best-of-{n} (RM pick)", f"oracle best-of-{n}",
            "change vs parent +- SE"]


def cells(rows: list[ProgressionRow]) -> list[list[str]]:
    """Each row's cells as plain text (the terminal and the report show the same)."""
    same_n = len({r.top_n for r in rows if r.top_n is not None}) <= 1
    out = []
    for r in rows:
        n_note = "" if same_n or r.top_n is None else f" (n={r.top_n})"
        if r.policy.parent_stage is None:
            change = "- (from the base model)"
        elif r.policy.parent is None:
            change = f"- ({r.policy.parent_stage} not evaluated)"
        elif r.change is None:
            change = f"- vs {r.policy.parent}"
        else:
            change = (f"{_f(r.change, True)} +- {_f(r.se)}{' *' if r.flagged else ''} vs {r.policy.parent}")
        first = "-" if r.best_of_1 is None else f"{r.best_of_1:.3f} ({r.n_instructions})"
        out.append([r.policy.name, first, _f(r.rm_pick) + n_note, _f(r.oracle) + n_note, change])
    return out


QUANTITY = ("best-of-1: strict instruction-level pass rate of sample 0 (instructions counted); best-of-N: mean "
            "fraction of a prompt's instructions followed (strict) by the reward model's pick / the best of the "
            "first N samples; change: paired difference of strict pass per instruction vs the parent's sample 0, "
            "+- its paired SE; * beyond 2 SE.")


def no_effect_line(rows: list[ProgressionRow]) -> str | None:
    """The policies whose change over their parent is within 2 paired SE: said, not hidden."""
    within = [r.policy.name for r in rows if r.change is not None and r.se is not None and not r.flagged]
    if not within:
        return None
    return (f"within 2 SE of their parent (no measurable change at this size): {', '.join(within)}")


def final_line(rows: list[ProgressionRow]) -> str | None:
    """The last policy against the first of its lineage (e.g. rl vs sft), when that is not its parent row."""
    final = rows[-1] if rows else None
    if final is None or final.root_change is None or final.root_se is None:
        return None
    beyond = "beyond" if abs(final.root_change) > 2 * final.root_se else "within"
    return (f"final policy {final.policy.name} vs {final.root}: {final.root_change:+.3f} +- {final.root_se:.3f} "
            f"paired SE ({beyond} 2 SE)")


def section_progression(doc: dict | None, root: Path, notes: list[str]) -> str:
    """The report's first section: the progression table (the numbers ``alignline run`` prints) and a chart of
    best-of-1 per policy with +-2 SE error bars beside the best-of-N points; "" without pipeline.json."""
    from alignline.report.common import esc, img, table

    if not doc:
        return ""
    rows = progression(doc, root)
    if not rows:
        notes.append("pipeline.json names no evaluated policy (an eval.bestofn stage on a stage's model, with an "
                     "eval.verifiable stage on its samples)")
        return ""
    html_rows = [[esc(c) for c in row] for row in cells(rows)]
    said = "".join(f"<p><b>{esc(line)}</b></p>" for line in (final_line(rows), no_effect_line(rows)) if line)
    return (table(headers(rows), html_rows, "progression-table") + said + f"<p>{esc(QUANTITY)}</p>"
            + (img(progression_chart(rows), "best-of-1 per policy (+-2 SE) and best-of-N")
               if any(r.best_of_1 is not None for r in rows) else ""))


def progression_chart(rows: list[ProgressionRow]) -> str:
    from alignline.report.common import _plt, fig_uri

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = list(range(len(rows)))
    first = [(x, r.best_of_1, 2 * (r.best_of_1_se or 0.0)) for x, r in zip(xs, rows) if r.best_of_1 is not None]
    ax.errorbar([p[0] for p in first], [p[1] for p in first], yerr=[p[2] for p in first], fmt="o", capsize=4,
                label="best-of-1 (+-2 SE)")
    for key, label, marker in (("rm_pick", "best-of-N, RM pick", "s"), ("oracle", "oracle best-of-N", "^")):
        pts = [(x, getattr(r, key)) for x, r in zip(xs, rows) if getattr(r, key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="none", label=label)
    ax.set_xticks(xs, [r.policy.name[-16:] for r in rows])
    ax.set_ylabel("held-out instructions followed")
    ax.set_title("policy progression (pipeline order)")
    ax.legend(fontsize=8)
    return fig_uri(fig)
