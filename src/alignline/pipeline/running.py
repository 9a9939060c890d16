"""Running a loaded plan: what each stage will find (up to date, rerun, resume, new), the stages in order,
pipeline.json, the report and the summary (the policy progression) at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignline.data.dirlock import directory_lock
from alignline.data.io import MANIFEST, atomic_write_json, read_manifest
from alignline.errors import ConfigError
from alignline.pipeline.checks import warn_small_evaluations
from alignline.pipeline.loading import load_pipeline
from alignline.pipeline.spec import Plan, PlannedStage
from alignline.stages.common import ALWAYS_IGNORED

FINGERPRINT_IGNORED = (*ALWAYS_IGNORED, "stop_at")
"""Settings the stages leave out of their config fingerprint (RunDir's ALWAYS_IGNORED + tso's stop_at)."""
RESUME_IGNORED = FINGERPRINT_IGNORED
"""Settings that may change between an interrupted run and the run that resumes it."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _changed_settings(old: dict, new: dict, ignored: tuple[str, ...]) -> list[str]:
    """Settings whose value differs; one that the old config lacks and the new one leaves at null is a
    setting added since, at the default that keeps the old behaviour (the stages fingerprint it so)."""
    a, b = _flat(old), _flat(new)
    return [k for k in dict.fromkeys([*b, *a]) if k not in ignored and a.get(k, ...) != b.get(k, ...)
            and not (k not in a and b[k] is None)]


def predict(ps: PlannedStage) -> tuple[str, str]:
    """What the stage's own run(cfg) will find, from its output dir: (kind, why) with kind one of
    up-to-date, rerun (a complete or unfinished run of other settings or inputs), resume, new."""
    from alignline.stages.common import input_fingerprints

    now = ps.cfg.model_dump(mode="json")
    m = read_manifest(ps.output_dir)
    if m and m.get("status") == "complete":
        changed = _changed_settings(m.get("config") or {}, now, FINGERPRINT_IGNORED)
        if changed:
            return "rerun", "settings changed: " + ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        recorded = m.get("input_fingerprints") or {}
        moved = [k for k, v in input_fingerprints(m.get("inputs") or {}).items() if v != recorded.get(k)]
        if moved:
            return "rerun", "inputs changed: " + ", ".join(moved)
        return "up-to-date", "complete, up to date"
    if not Path(ps.output_dir).exists():
        return "new", "not run yet"
    saved = Path(ps.output_dir) / "config.yaml"  # RunDir.start saves it before the work begins
    try:
        before = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.exists() else None
    except (OSError, yaml.YAMLError):
        before = None
    if isinstance(before, dict):
        changed = _changed_settings(before, now, RESUME_IGNORED)
        if changed:
            return "rerun", "an unfinished run with other settings: " + ", ".join(changed[:4])
    return "resume", "unfinished: continues where it stopped"


@dataclass
class StageResult:
    name: str
    stage: str
    status: str
    """ran, skipped-up-to-date, failed, interrupted, incomplete (stopped before its manifest, e.g.
    train.stop_after_step), excluded (left out by --from/--only; its earlier result is kept), not-run
    (after a failure), or planned (--dry-run)."""
    output_dir: str
    seconds: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PipelineResult:
    plan: Plan
    results: list[StageResult]

    @property
    def ok(self) -> bool:
        return all(r.status in ("ran", "skipped-up-to-date", "excluded", "planned") for r in self.results)

    def status(self, name: str) -> str:
        return next(r.status for r in self.results if r.name == name)


def _manifest_bytes(out_dir: str) -> bytes | None:
    p = Path(out_dir) / MANIFEST
    return p.read_bytes() if p.exists() else None


def _counts(out_dir: str) -> dict[str, Any]:
    m = read_manifest(out_dir) or {}
    return dict(m.get("counts") or {}) if m.get("status") == "complete" else {}


def _require_complete(plan: Plan, needed: list[PlannedStage], option: str) -> None:
    from alignline.stages.common import console

    for ps in needed:
        m = read_manifest(ps.output_dir)
        if not m or m.get("status") != "complete":
            raise ConfigError(f"{plan.path}: {option}: stage '{ps.name}' has no complete run in {ps.output_dir} "
                              f"({predict(ps)[1]}), and {option} would not run it; run the pipeline without "
                              f"{option} (or with --from {ps.name}) first")
        kind, why = predict(ps)
        if kind != "up-to-date":
            console.print(f"[yellow]warning:[/yellow] {option}: stage '{ps.name}' is used as it is in {ps.output_dir}, "
                          f"but it is out of date ({why}); run without {option} to redo it")


def _selected(plan: Plan, from_stage: str | None, only: str | None) -> list[PlannedStage]:
    """The stages this run runs (--from, --only); those it leaves out but reads must have completed."""
    if from_stage is not None and only is not None:
        raise ConfigError("give --from or --only, not both")
    if only is not None:
        target = plan.stage(only, "--only")
        _require_complete(plan, [plan.stage(d, "--only") for d in target.depends_on], f"--only {only}")
        return [target]
    if from_stage is not None:
        start = plan.stage(from_stage, "--from").index
        _require_complete(plan, plan.stages[:start], f"--from {from_stage}")
        return plan.stages[start:]
    return list(plan.stages)


def _plan_json(result: PipelineResult, started: str, option: dict) -> dict:
    plan = result.plan
    by_name = {r.name: r for r in result.results}
    return {
        "pipeline": str(plan.path.resolve()), "name": plan.name, "output_root": plan.output_root,
        "vars": plan.vars, "overrides": plan.overrides, **option, "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ok": result.ok,
        "stages": [{
            "name": ps.name, "stage": ps.spec.key, "config_class": ps.spec.target, "output_dir": ps.output_dir,
            "depends_on": ps.depends_on, "config": ps.cfg.model_dump(mode="json"),
            "result": {k: v for k, v in vars(by_name[ps.name]).items() if k not in ("name", "stage", "output_dir")},
        } for ps in plan.stages],
    }


def print_summary(doc: dict, report: Path | None) -> None:
    """The end-of-run summary (:func:`alignline.pipeline.summary.summary_text`) of a pipeline.json document,
    at most 100 columns (fewer on a narrower terminal)."""
    from rich.console import Console

    from alignline.pipeline.summary import WIDTH, summary_text
    from alignline.report.ifeval import ifeval_rows
    from alignline.report.progression import progression

    root = doc["output_root"]
    width = min(WIDTH, Console().width) if Console().is_terminal else WIDTH
    print(summary_text(doc["name"], progression(doc), doc["stages"], pipeline_json=str(Path(root) / "pipeline.json"),
                       report=str(report) if report else None, wall_seconds=doc["wall_seconds"],
                       disk_bytes=doc["disk_bytes"], root=root, width=width, ifeval_rows=ifeval_rows(doc)),
          flush=True)


def print_plan(plan: Plan, selected: set[str]) -> None:
    """The --dry-run output: each stage, what it will find, and its settings other than the defaults."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)
    table = Table(title=f"pipeline {plan.name} ({plan.path}), output root {plan.output_root}")
    for col in ("#", "stage", "type", "output", "uses", "now", "this run"):
        table.add_column(col, overflow="fold")
    states = {ps.name: predict(ps)[1] for ps in plan.stages}
    for ps in plan.stages:
        table.add_row(str(ps.index + 1), escape(ps.name), ps.spec.key, escape(ps.output_dir),
                      escape(", ".join(ps.depends_on)), escape(states[ps.name]),
                      "run" if ps.name in selected else "excluded")
    console.print(table)
    for ps in plan.stages:
        changed = ps.cfg.model_dump(mode="json", exclude_defaults=True)
        console.print(f"[bold]{escape(ps.name)}[/bold] ({ps.spec.key}) now: {escape(states[ps.name])}; "
                      "settings other than the defaults:")
        console.print(escape(yaml.safe_dump(changed, sort_keys=False, allow_unicode=True).rstrip()), highlight=False)


def _build_report(root: str) -> Path | None:
    """report.html under the output root; None (with a warning) when it could not be built."""
    from alignline.stages.common import console

    try:
        from alignline.report.html import ReportConfig, build_report

        return build_report(ReportConfig(run_dir=root))
    except Exception as exc:  # noqa: BLE001 (the stages' results stand without their report)
        console.print(f"[yellow]warning:[/yellow] the HTML report for {root} could not be built: "
                      f"{type(exc).__name__}: {exc}; try `alignline report {root}`")
        return None


def _run_one(ps: PlannedStage) -> tuple[StageResult, BaseException | None]:
    """One selected stage through the stage table's runner; its result, and the exception it raised."""
    from alignline.stages.common import console

    console.print(f"[bold]== {ps.name}[/bold] ({ps.spec.key}) -> {ps.output_dir}")
    before = _manifest_bytes(ps.output_dir)
    t0 = time.perf_counter()
    try:
        ps.spec.run(ps.cfg)
    except BaseException as exc:  # noqa: BLE001 (recorded in pipeline.json, then re-raised by run_pipeline)
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        return StageResult(ps.name, ps.spec.key, status, ps.output_dir, time.perf_counter() - t0,
                           error=f"{type(exc).__name__}: {exc}"), exc
    seconds = time.perf_counter() - t0
    m = read_manifest(ps.output_dir) or {}
    if m.get("status") != "complete":
        status = "incomplete"  # e.g. train.stop_after_step: the next run resumes it
    elif _manifest_bytes(ps.output_dir) == before:
        status = "skipped-up-to-date"  # a stage that reruns always writes a new manifest
    else:
        status = "ran"
    return StageResult(ps.name, ps.spec.key, status, ps.output_dir, seconds, _counts(ps.output_dir)), None


def _run_stages(plan: Plan, names: set[str]) -> tuple[list[StageResult], BaseException | None]:
    """The selected stages in order, until one fails or stops before its manifest."""
    results: list[StageResult] = []
    failure: BaseException | None = None
    for ps in plan.stages:
        if failure is not None or (results and results[-1].status == "incomplete"):
            results.append(StageResult(ps.name, ps.spec.key, "not-run", ps.output_dir))
        elif ps.name not in names:
            results.append(StageResult(ps.name, ps.spec.key, "excluded", ps.output_dir, counts=_counts(ps.output_dir)))
        else:
            result, failure = _run_one(ps)
            results.append(result)
    return results, failure


def run_pipeline(path: str | Path, overrides: list[str] | None = None, *, from_stage: str | None = None,
                 only: str | None = None, dry_run: bool = False, report: bool = True) -> PipelineResult:
    """Validate every stage of the pipeline file, then run them in order (each skips itself when up to date).

    ``overrides``: ``STAGE.setting=value`` (e.g. ``sft.train.lr=1e-5``), ``vars.NAME=value``, ``output_root=DIR``.
    ``from_stage``: leave out the stages before it (they must have completed); ``only``: run just that stage
    (the stages it reads must have completed). A failing stage stops the pipeline and its error is re-raised
    after pipeline.json is written. ``dry_run``: print the plan (:func:`print_plan`) and run nothing.
    Either way a held-out evaluation too small to measure anything is warned about first
    (:func:`~alignline.pipeline.checks.warn_small_evaluations`). At the end pipeline.json (with the policy
    progression, wall seconds and disk bytes) and report.html are written and :func:`print_summary` prints
    the progression table, the report's path, the wall time and the disk used.
    """
    t0 = time.perf_counter()
    plan = load_pipeline(path, overrides)
    names = {ps.name for ps in _selected(plan, from_stage, only)}
    warn_small_evaluations(plan)
    if dry_run:
        print_plan(plan, names)
        return PipelineResult(plan, [StageResult(ps.name, ps.spec.key, "planned" if ps.name in names else "excluded",
                                                 ps.output_dir) for ps in plan.stages])

    from alignline.pipeline.cards import refresh_model_cards
    from alignline.pipeline.summary import disk_usage
    from alignline.report.ifeval import ifeval_rows
    from alignline.report.ifeval import rows_json as ifeval_json
    from alignline.report.progression import progression, rows_json
    from alignline.stages.common import console

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with directory_lock(plan.output_root):  # pipeline.json and the report are the root's; each stage locks its own
        results, failure = _run_stages(plan, names)
        result = PipelineResult(plan, results)
        doc = _plan_json(result, started, {"from": from_stage, "only": only})
        rows = progression(doc)
        doc["progression"] = rows_json(rows)
        refresh_model_cards(doc, rows)
        doc["ifeval"] = ifeval_json(ifeval_rows(doc))
        doc["wall_seconds"] = round(time.perf_counter() - t0, 1)
        doc["disk_bytes"] = disk_usage(plan.output_root)  # before report.html (a few MB at most) is written
        atomic_write_json(Path(plan.output_root) / "pipeline.json", doc)
        built = _build_report(plan.output_root) if report and not isinstance(failure, KeyboardInterrupt) else None
    print_summary(doc, built)
    if failure is not None:
        raise failure
    if not result.ok:
        console.print("[yellow]the pipeline stopped before its end[/yellow]; rerun the same command to continue")
    return result
