"""A pipeline file read, merged with its ``extends`` chain and the command-line overrides, resolved and
validated into a :class:`~alignline.pipeline.spec.Plan`; nothing runs."""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from alignline.config import _merge, config_error, parse_overrides, read_yaml_mapping
from alignline.errors import ConfigError
from alignline.pipeline.spec import (
    RESERVED,
    PipelineFile,
    PipelineStage,
    Plan,
    PlannedStage,
    Resolver,
    dotted_tree,
)
from alignline.stages.registry import STAGE_BY_NAME, STAGES, stage_spec


def split_overrides(path: Path, items: list[str], stage_names: list[str]) -> tuple[dict, dict[str, dict]]:
    """Command-line ``key=value`` items -> (top-level settings, {stage name: nested settings})."""
    top: dict = {}
    per_stage: dict[str, dict] = {}
    for item in items:
        tree = parse_overrides([item])
        (head, value), = tree.items()
        if head in RESERVED:
            if head == "vars" and not isinstance(value, dict):
                raise ConfigError(f"{path}: override '{item}': write vars.NAME=VALUE")
            top = _merge(top, tree)
        elif head in stage_names:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: override '{item}': name a setting of stage '{head}', "
                                  f"e.g. {head}.output_dir=DIR")
            per_stage[head] = _merge(per_stage.get(head, {}), value)
        else:
            close = difflib.get_close_matches(head, [*stage_names, *RESERVED], n=1)
            raise ConfigError(
                f"{path}: override '{item}': '{head}' is not a stage of the pipeline"
                + (f"; did you mean '{close[0]}'?" if close else "")
                + f" (write STAGE.setting=value with STAGE one of {', '.join(stage_names)}, or vars.NAME=value, "
                "output_root=DIR)")
    return top, per_stage


def check_dirs(path: Path, root: str, stages: list[PlannedStage]) -> None:
    """Stage output dirs must be distinct and not nested: a directory input is fingerprinted as a whole."""
    resolved = [(s, Path(s.output_dir).resolve()) for s in stages]
    root_dir = Path(root).resolve()
    for i, (a, pa) in enumerate(resolved):
        if pa == root_dir:
            raise ConfigError(f"{path}: stage '{a.name}', setting 'output_dir': {a.output_dir} is the output root "
                              "itself (pipeline.json and report.html go there); give it a directory of its own")
        for b, pb in resolved[i + 1:]:
            if pa == pb or pa in pb.parents or pb in pa.parents:
                raise ConfigError(f"{path}: stages '{a.name}' and '{b.name}' write into the same or nested "
                                  f"directories ({a.output_dir}, {b.output_dir}); give each its own output_dir")


def _rebase(config: Any, base_dir: Path, here: Path) -> Any:
    """A stage's ``config`` from a file in ``base_dir`` with its file paths made relative to ``here``."""
    if isinstance(config, list):
        return [_rebase(c, base_dir, here) for c in config]
    if isinstance(config, str) and not Path(config).is_absolute():
        return os.path.relpath(base_dir / config, here)
    return config


def read_pipeline_mapping(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The pipeline file's mapping with its ``extends`` chain merged in (see :class:`PipelineFile`)."""
    raw = read_yaml_mapping(path, "pipeline")
    base_ref = raw.get("extends")
    if base_ref is None:
        return raw
    if not isinstance(base_ref, str) or not base_ref.strip():
        raise ConfigError(f"{path}: setting 'extends': expected the path of another pipeline file, found {base_ref!r}")
    base_path = path.parent / base_ref
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: extends {base_ref}: the files extend each other in a cycle "
                          f"({' -> '.join(str(p) for p in (*chain, base_path.resolve()))})")
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends {base_ref}: no such file ({base_path}); give a path relative to {path}")
    base = read_pipeline_mapping(base_path, chain)
    stages = []
    for entry in base.get("stages") or []:
        if isinstance(entry, dict) and "config" in entry:
            entry = {**entry, "config": _rebase(entry["config"], base_path.parent, path.parent)}
        stages.append(entry)
    for key in ("vars", "stages"):
        if raw.get(key) is not None and not isinstance(raw[key], dict if key == "vars" else list):
            raise ConfigError(f"{path}: setting '{key}': expected a {'mapping' if key == 'vars' else 'list'}")
    # name and output_root are this file's own (default: from this file's name), never the base's
    merged = {**{k: v for k, v in base.items() if k not in ("name", "output_root")},
              **{k: v for k, v in raw.items() if k not in ("vars", "stages")}}
    merged["vars"] = {**(base.get("vars") or {}), **(raw.get("vars") or {})}
    merged["stages"] = [*stages, *(raw.get("stages") or [])]
    return merged


def _check_entries(path: Path, spec: PipelineFile) -> None:
    """Stage names unique, not reserved, not a var's; stage types known."""
    seen: dict[str, int] = {}
    for i, entry in enumerate(spec.stages):
        where = f"stage '{entry.name}' (stage {i + 1})"
        if entry.name in seen:
            raise ConfigError(f"{path}: {where}: the name '{entry.name}' is already used by stage "
                              f"{seen[entry.name] + 1}; stage names must be unique")
        if entry.name in RESERVED:
            raise ConfigError(f"{path}: {where}: '{entry.name}' is reserved ({', '.join(RESERVED)}); rename the stage")
        if entry.name in spec.vars:
            raise ConfigError(f"{path}: {where}: a var is also called '{entry.name}', so ${{{entry.name}}} would be "
                              "ambiguous; rename one of them")
        if stage_spec(entry.stage) is None:
            close = difflib.get_close_matches(entry.stage, list(STAGE_BY_NAME), n=1)
            raise ConfigError(f"{path}: {where}, setting 'stage': unknown stage type '{entry.stage}'"
                              + (f"; did you mean '{close[0]}'?" if close else "")
                              + f" (known: {', '.join(s.key for s in STAGES)})")
        seen[entry.name] = i


def _stage_settings(path: Path, entry: PipelineStage, where: str, command_line: dict) -> dict:
    """A stage's settings before interpolation: its config chunks merged in order, then its overrides, then
    the command line's."""
    data: dict = {}
    chunks = entry.config if isinstance(entry.config, list) else [] if entry.config is None else [entry.config]
    for chunk in chunks:
        if isinstance(chunk, str):
            chunk_path = path.parent / chunk
            chunk = read_yaml_mapping(chunk_path, f"{path}: {where}, setting 'config':")
            chunk.pop("output_dir", None)  # the pipeline decides where its stages write (see the package doc)
        data = _merge(data, copy.deepcopy(chunk))
    data = _merge(data, dotted_tree(entry.overrides))
    return _merge(data, command_line)


def _plan_stage(path: Path, entries: list[PipelineStage], i: int, values: dict[str, Any], output_root: str,
                command_line: dict, stage_dirs: dict[str, str]) -> PlannedStage:
    """Stage ``i`` resolved (``${...}`` of vars and of the earlier ``stage_dirs``) and validated."""
    entry = entries[i]
    s = stage_spec(entry.stage)
    assert s is not None
    where = f"stage '{entry.name}' ({s.key})"
    data = _stage_settings(path, entry, where, command_line)
    if data.get("output_dir") is None:
        data["output_dir"] = f"{output_root}/{entry.name}"
    resolver = Resolver(path, values, where, stage_dirs=stage_dirs, index=i,
                        later={e.name: j for j, e in enumerate(entries) if j >= i})
    data = resolver(data)
    try:
        cls, _ = s.load()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {where}: {exc}") from None
    try:
        cfg = cls.model_validate(data)
    except ValidationError as exc:
        raise config_error(cls, exc, f"{path}, {where}") from None
    return PlannedStage(i, entry.name, s, cfg, str(cfg.output_dir), list(resolver.stages_used))


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Read, resolve and validate a pipeline file; nothing runs. Errors name the file, stage and setting."""
    path = Path(path)
    raw = read_pipeline_mapping(path)
    stage_names = [s.get("name") for s in raw.get("stages") or [] if isinstance(s, dict)]
    top, per_stage = split_overrides(path, list(overrides or []), [n for n in stage_names if isinstance(n, str)])
    try:
        spec = PipelineFile.model_validate(_merge(raw, top))
    except ValidationError as exc:
        raise config_error(PipelineFile, exc, str(path) + (" + overrides" if top else "")) from None
    _check_entries(path, spec)

    values: dict[str, Any] = {}
    for key, value in spec.vars.items():
        values[key] = Resolver(path, values, "vars")(value, f"vars.{key}")
    name = spec.name or path.stem
    root_value = spec.output_root if spec.output_root is not None else f"runs/{name}"
    output_root = str(Resolver(path, values, "the top level")(root_value, "output_root"))

    planned: list[PlannedStage] = []
    stage_dirs: dict[str, str] = {}
    for i, entry in enumerate(spec.stages):
        ps = _plan_stage(path, spec.stages, i, values, output_root, per_stage.get(entry.name, {}), stage_dirs)
        planned.append(ps)
        stage_dirs[entry.name] = ps.output_dir
    check_dirs(path, output_root, planned)
    return Plan(path, name, output_root, values, planned, list(overrides or []))
