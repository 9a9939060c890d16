"""What a pipeline file says: its schema, the resolved plan, and ``${name}`` interpolation."""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from alignline.config import Section, _set_dotted
from alignline.errors import ConfigError
from alignline.stages.registry import StageSpec

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*$"
RESERVED = ("vars", "output_root", "name")
"""Top-level keys a command-line override can address, so no stage may be called that."""
_REF = re.compile(r"\$(\$?)\{([^{}]*)\}")


class PipelineStage(Section):
    """One entry of ``stages:``."""

    name: str = Field(pattern=NAME_PATTERN)
    """Unique name: ``${name}`` is this stage's output_dir, and ``name.key=value`` overrides its settings."""
    stage: str
    """Stage type, as on the command line: sft, select, rs, dpo, ..., eval.bestofn (bare bestofn also works)."""
    config: str | dict[str, Any] | list[str | dict[str, Any]] | None = None
    """A stage YAML file (relative to the pipeline file), an inline mapping of settings, or a list of them
    merged in order."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted setting -> value (e.g. ``train.lr: 1e-5``), applied after config."""


class PipelineFile(Section):
    """A pipeline file."""

    extends: str | None = None
    """Another pipeline file (relative to this one) this one builds on: its stages come first (their config
    files still relative to it), then this file's; this file's vars update its vars. name and output_root are
    not inherited (default runs/<this file's name>; give two files one output_root to share stage outputs).
    Chains are allowed, cycles are not."""
    name: str | None = None
    """Pipeline name; default: the file name without its suffix."""
    output_root: str | None = None
    """Where stage outputs, pipeline.json and report.html go; default runs/<name>."""
    vars: dict[str, str | int | float | bool | None | dict[str, Any]] = Field(default_factory=dict)
    """Values for ``${NAME}`` in string settings; a var may use earlier vars. A mapping (or null) stands for a
    whole settings block where a setting is exactly ``"${NAME}"`` (e.g. ``lora: "${rs_lora}"``)."""
    stages: list[PipelineStage] = Field(min_length=1)
    """The stages, run in this order; a stage may only refer to earlier ones."""


@dataclass
class PlannedStage:
    index: int
    name: str
    spec: StageSpec
    cfg: BaseModel
    output_dir: str
    depends_on: list[str]


@dataclass
class Plan:
    path: Path
    name: str
    output_root: str
    vars: dict[str, Any]
    stages: list[PlannedStage]
    overrides: list[str] = field(default_factory=list)

    def stage(self, name: str, option: str) -> PlannedStage:
        for s in self.stages:
            if s.name == name:
                return s
        close = difflib.get_close_matches(name, [s.name for s in self.stages], n=1)
        raise ConfigError(f"{self.path}: {option} {name}: no such stage"
                          + (f"; did you mean '{close[0]}'?" if close else "")
                          + f" (stages: {', '.join(s.name for s in self.stages)})")


def dotted_tree(flat: dict[str, Any]) -> dict:
    """``{"train.lr": 1e-5}`` -> ``{"train": {"lr": 1e-5}}`` (values copied)."""
    tree: dict = {}
    for key, value in flat.items():
        _set_dotted(tree, str(key), copy.deepcopy(value))
    return tree


class Resolver:
    """Replaces ``${name}`` in string values: earlier stages' output dirs and vars; records what was used."""

    def __init__(self, path: Path, values: dict[str, Any], where: str, *, stage_dirs: dict[str, str] | None = None,
                 later: dict[str, int] | None = None, index: int = -1):
        self.path, self.values, self.where, self.index = path, values, where, index
        self.stage_dirs, self.later = stage_dirs or {}, later or {}
        self.stages_used: list[str] = []

    def _lookup(self, name: str, setting: str) -> Any:
        if name in self.stage_dirs:
            if name not in self.stages_used:
                self.stages_used.append(name)
            return self.stage_dirs[name]
        if name in self.values:
            return self.values[name]
        head = f"{self.path}: {self.where}, setting '{setting}': ${{{name}}}"
        if name in self.later:
            j = self.later[name]
            if j == self.index:
                raise ConfigError(f"{head} refers to this stage itself; a stage can only use earlier stages' outputs")
            raise ConfigError(f"{head} refers to stage '{name}', which comes later (stage {j + 1}, this is stage "
                              f"{self.index + 1}); move '{name}' before it: a stage can only use earlier stages' "
                              "outputs")
        known = [*self.stage_dirs, *self.values]
        close = difflib.get_close_matches(name, known, n=1)
        raise ConfigError(f"{head} is neither an earlier stage nor a var"
                          + (f"; did you mean '${{{close[0]}}}'?" if close else "")
                          + f" (earlier stages: {', '.join(self.stage_dirs) or 'none'}; "
                          f"vars: {', '.join(self.values) or 'none'}; write $${{...}} for a literal ${{...}})")

    def __call__(self, value: Any, setting: str = "") -> Any:
        if isinstance(value, dict):
            return {k: self(v, f"{setting}.{k}" if setting else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v, f"{setting}.{i}") for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value
        whole = _REF.fullmatch(value)
        if whole and not whole.group(1):
            return self._lookup(whole.group(2).strip(), setting)  # keeps a var's type: n: ${n} stays an int

        def one(m: re.Match) -> str:
            return "${" + m.group(2) + "}" if m.group(1) else str(self._lookup(m.group(2).strip(), setting))

        return _REF.sub(one, value)
