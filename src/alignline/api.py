"""alignline from Python: run a stage or a pipeline and get its output directory, manifest and final metrics.

Both functions go through the runners the command line uses (:meth:`StageSpec.run
<alignline.stages.registry.StageSpec.run>` and :func:`alignline.pipeline.run_pipeline`): the same up-to-date
check, the same manifest (a failure leaves it ``failed`` with the error), the same exceptions
(:class:`~alignline.errors.AlignlineError` and its subclasses for bad settings, data or models). Loading this
module imports neither torch nor transformers; running a stage does.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from alignline.config import config_error, load_config, with_overrides
from alignline.data.io import read_manifest
from alignline.errors import ConfigError
from alignline.stages.registry import STAGE_BY_NAME, STAGE_BY_TARGET, STAGES, StageSpec

_HELD_OUT = ("eval_metrics", "eval", "eval_change")
"""Manifest keys holding a stage's held-out figures (training stages, rm, rl)."""
_RESULTS = ("results", "summary", "agreement")
"""Manifest keys holding an evaluation stage's results (verifiable, winrate, injection, judge-sft)."""


def set_process_defaults() -> None:
    """What the command line sets before any stage runs, unless already set: no tokenizer threads fighting
    forked workers, and CUDA's expandable segments (batches of varying width fragment the caching allocator: a
    DPO run reserved 36 GB for 6 GB of tensors on an H100). Hub access is left to HF_HUB_OFFLINE as the user set
    it: a Hub id is fetched only when one is given."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def _numbers(tree: Any, prefix: str) -> dict[str, float]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def final_metrics(manifest: Mapping[str, Any]) -> dict[str, float]:
    """A run's final figures from its manifest, flat: the last training step's metrics (``final_metrics``), its
    held-out figures as ``eval/...`` (the loop's eval, rm's accuracy, rl's held-out change), an evaluation
    stage's results (``results``, ``summary``, ``agreement``; mtbench's ``score``; bestofn's largest n)."""
    out = {k: v for k, v in _numbers(dict(manifest.get("final_metrics") or {}), "").items()}
    for key in _HELD_OUT:
        out |= _numbers(manifest.get(key) or {}, "eval/")
    for key in _RESULTS:
        out |= _numbers(manifest.get(key) or {}, "")
    out |= _numbers({"score": manifest.get("score")}, "")
    rows = [r for r in manifest.get("rows") or [] if isinstance(r, dict)]
    if rows:
        out |= _numbers(max(rows, key=lambda r: r.get("n", 0)), "bestofn/")
    return out


@dataclass
class RunResult:
    """What one stage run left: where, its manifest and its final figures."""

    stage: str
    """The stage's key (``sft``, ``eval.bestofn``)."""
    output_dir: Path
    manifest: dict[str, Any]
    """``manifest.json`` as the run left it (``{}`` when there is none)."""
    config: BaseModel | None = None
    """The config it ran with (None for a stage of a pipeline: see the manifest's ``config``)."""

    @property
    def status(self) -> str | None:
        """``complete``; ``running`` for a run stopped before its end on purpose (``train.stop_after_step``)."""
        return self.manifest.get("status")

    @property
    def metrics(self) -> dict[str, float]:
        """The run's final figures (:func:`final_metrics`)."""
        return final_metrics(self.manifest)

    @property
    def model_dir(self) -> Path | None:
        """The model the stage wrote (with its card, README.md), if it wrote one."""
        return Path(self.manifest["model_dir"]) if self.manifest.get("model_dir") else None


@dataclass
class PipelineRun:
    """What a pipeline run left: its output root, pipeline.json, the policy progression and each stage's run."""

    output_dir: Path
    manifest: dict[str, Any]
    """``pipeline.json`` (``{}`` after a dry run)."""
    stages: dict[str, RunResult] = field(default_factory=dict)
    """Each stage's run, by its name in the pipeline."""
    ok: bool = True
    """Every stage ran or was up to date."""

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        """The pipeline's final figures: each evaluated policy's progression row, by policy name."""
        return {row["policy"]: row for row in self.manifest.get("progression") or []}


def stage_names() -> list[str]:
    """Every stage's key, as :func:`run` and pipeline files take it."""
    return [spec.key for spec in STAGES]


def _spec_named(name: str) -> StageSpec:
    spec = STAGE_BY_NAME.get(name) or STAGE_BY_NAME.get(name.replace("_", "-"))
    if spec is None:
        close = difflib.get_close_matches(name, stage_names(), n=1)
        raise ConfigError(f"unknown stage '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
                          + f" (stages: {', '.join(stage_names())})")
    return spec


def _spec_of(cfg: BaseModel) -> StageSpec:
    spec = STAGE_BY_TARGET.get(f"{type(cfg).__module__}:{type(cfg).__qualname__}")
    if spec is None:
        raise ConfigError(f"{type(cfg).__name__} is not a stage's config; give one of alignline's stage configs "
                          f"(e.g. alignline.SFTConfig) or a stage name with a config file")
    return spec


def _config(spec: StageSpec, config: str | Path | Mapping | BaseModel | None, overrides: list[str]) -> BaseModel:
    cls, _ = spec.load()
    if isinstance(config, BaseModel):
        if not isinstance(config, cls):
            raise ConfigError(f"stage '{spec.key}' takes a {cls.__name__}, not a {type(config).__name__}")
        return with_overrides(config, overrides)
    if isinstance(config, Mapping):
        try:
            return with_overrides(cls.model_validate(dict(config)), overrides)
        except ValidationError as exc:
            raise config_error(cls, exc, "the mapping given") from None
    return load_config(cls, config, overrides)


def run(stage: str | BaseModel, config: str | Path | Mapping | BaseModel | None = None, *,
        overrides: Sequence[str] = ()) -> RunResult:
    """Run one stage, as ``alignline STAGE CONFIG.yaml key=value ...`` does.

    ``run(cfg)`` with a stage config (``alignline.DPOConfig(...)``), or ``run("dpo", config)`` with a stage
    name and a YAML file, a mapping of settings, a config or None (only ``overrides``). ``overrides``:
    ``key=value`` strings (``train.lr=1e-6``; one string is one override), applied last. An up-to-date run does nothing; an error leaves
    the run's manifest ``failed`` with the error and is raised.
    """
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if isinstance(stage, BaseModel):
        if config is not None:
            raise ConfigError("give the config once: run(cfg) or run(stage_name, cfg)")
        spec, config = _spec_of(stage), stage
    else:
        spec = _spec_named(stage)
    cfg = _config(spec, config, overrides)
    set_process_defaults()
    out = Path(spec.run(cfg))
    return RunResult(spec.key, out, read_manifest(out) or {}, cfg)


def run_pipeline(path: str | Path, overrides: Sequence[str] = (), *, from_stage: str | None = None,
                 only: str | None = None, dry_run: bool = False, report: bool = True) -> PipelineRun:
    """Run a pipeline file, as ``alignline run PIPELINE.yaml [overrides] [--from S] [--only S]`` does: each stage
    skips itself when up to date; at the end pipeline.json, the progression (also in each evaluated policy's
    model card) and report.html. A failing stage's error is raised after pipeline.json records it."""
    from alignline.pipeline import run_pipeline as run_plan

    set_process_defaults()
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    result = run_plan(path, overrides, from_stage=from_stage, only=only, dry_run=dry_run, report=report)
    root = Path(result.plan.output_root)
    doc = {} if dry_run else (_read_json(root / "pipeline.json") or {})
    stages = {r.name: RunResult(r.stage, Path(r.output_dir), read_manifest(r.output_dir) or {})
              for r in result.results}
    return PipelineRun(root, doc, stages, result.ok)


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
