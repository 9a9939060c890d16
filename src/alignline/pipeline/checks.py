"""Checks of a loaded plan that warn and let it run: a held-out evaluation too small to measure anything."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from alignline.pipeline.spec import Plan, PlannedStage

MIN_EVAL_PROMPTS = 16
"""Fewer held-out prompts than this: a rate near 0.5 has a standard error of 0.09 or more at 2 instructions
per prompt, as large as the differences between the policies of a short pipeline."""
EVAL_STAGES = ("eval.bestofn", "eval.verifiable")


@dataclass
class EvalSize:
    stage: str
    prompts: int
    instructions_per_prompt: float
    source: str
    """Where the prompt count comes from, in words."""

    @property
    def instructions(self) -> float:
        return self.prompts * self.instructions_per_prompt

    @property
    def standard_error(self) -> float:
        """Of a rate near 0.5 over all the instructions: sqrt(0.25 / n_instructions)."""
        return math.sqrt(0.25 / self.instructions)


def _inside(path: str, directory: str) -> bool:
    a, d = os.path.normpath(path), os.path.normpath(directory)
    return a == d or a.startswith(d.rstrip(os.sep) + os.sep)


def _prepare_split(plan: Plan, ps: PlannedStage, prompts: str) -> tuple[str, object] | None:
    """(split name, the prepare stage's config) when ``prompts`` is a split file of an earlier prepare stage."""
    for src in reversed(plan.stages[: ps.index]):
        if src.spec.key == "prepare" and _inside(prompts, src.output_dir):
            name = Path(prompts).name.split(".")[0]
            if name in (getattr(src.cfg, "splits", None) or {}):
                return name, src
    return None


def eval_size(plan: Plan, ps: PlannedStage) -> EvalSize | None:
    """How many held-out prompts (and instructions per prompt) an evaluation stage will see, where the plan
    says: its ``max_prompts`` or its prepare split's ``max_records``, whichever is smaller; None when neither
    is known (the count depends on a file the plan does not make)."""
    cfg = ps.cfg
    prompts = getattr(cfg, "prompts", None)
    counts: list[tuple[int, str]] = []
    if getattr(cfg, "max_prompts", None):
        counts.append((cfg.max_prompts, f"max_prompts {cfg.max_prompts}"))
    per_prompt = 1.0
    split = _prepare_split(plan, ps, prompts) if isinstance(prompts, str) else None
    if split is not None:
        name, src = split
        spec = src.cfg.splits[name]
        if spec.max_records is not None:
            counts.append((spec.max_records, f"split '{name}' of stage '{src.name}': max_records {spec.max_records}"))
        ins = src.cfg.instructions
        if name in ins.splits:
            per_prompt = (ins.k_min + ins.k_max) / 2
    if not counts:
        return None
    n, source = min(counts)
    return EvalSize(ps.name, n, per_prompt, source)


def small_evaluations(plan: Plan) -> list[EvalSize]:
    """The plan's eval.bestofn / eval.verifiable stages over fewer than MIN_EVAL_PROMPTS prompts."""
    sizes = [eval_size(plan, ps) for ps in plan.stages if ps.spec.key in EVAL_STAGES]
    return [s for s in sizes if s is not None and s.prompts < MIN_EVAL_PROMPTS]


def warning_text(sizes: list[EvalSize]) -> str:
    """One warning for stages of one size (the eval and verify stages of every policy usually share it)."""
    size = sizes[0]
    names = ", ".join(f"'{s.stage}'" for s in sizes)
    who = f"stage {names} evaluates" if len(sizes) == 1 else f"stages {names} evaluate"
    per = f"{size.instructions_per_prompt:g}"
    return (f"{who} {size.prompts} held-out prompt(s) ({size.source}) x {per} "
            f"instruction(s) each: a rate near 0.5 gets a standard error of about {size.standard_error:.3f} "
            f"(sqrt(0.25 / {size.instructions:g})), too large to tell policies apart; give it at least "
            f"{MIN_EVAL_PROMPTS} prompts. Continuing.")


def warn_small_evaluations(plan: Plan) -> list[EvalSize]:
    """Warn about each too-small evaluation (the plan still runs), stages of one size in one warning; the sizes
    warned about."""
    from rich.markup import escape

    from alignline.stages.common import console

    small = small_evaluations(plan)
    groups: dict[tuple, list[EvalSize]] = {}
    for size in small:
        groups.setdefault((size.prompts, size.instructions_per_prompt, size.source), []).append(size)
    for sizes in groups.values():
        console.print(f"[yellow]warning:[/yellow] {escape(warning_text(sizes))}")
    return small
