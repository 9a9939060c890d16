"""``alignline run PIPELINE.yaml``: several stages in order, each one's outputs feeding the next.

A pipeline file::

    name: xwin-small                  # optional; default: the file name without .yaml
    output_root: runs/xwin-small      # optional; default runs/<name> (relative to the working directory)
    vars:                             # optional; ${NAME} anywhere in a string value
      base: smollm2-135m-instruct
    stages:
      - name: sft                     # unique; letters, digits, _ and -
        stage: sft                    # a stage type as on the command line: sft, dpo, eval.bestofn (or bestofn)
        config: configs/demo/sft.yaml # a stage YAML (relative to this file), an inline mapping, or a list of both
        overrides: {model: "${base}", train.lr: 1e-5}   # dotted keys, applied after config
      - name: dpo
        stage: dpo
        config: {data: {train: data/pairs.jsonl}}
        overrides: {model: "${sft}/model"}  # ${sft}: the sft stage's output_dir

``${stage_name}`` is that (earlier) stage's output_dir. A stage's output_dir is ``<output_root>/<name>``
unless the pipeline file or the command line sets it (an ``output_dir`` inside a referenced stage YAML is
replaced, so that a stage YAML can be reused by several pipelines without them writing into one directory).
Paths inside stage settings are relative to the working directory, as with the single-stage commands.

Everything is resolved and validated (stage types, names, references, every stage's settings) before any
stage runs. Each stage then runs through its own ``run(cfg)``, which does nothing when its manifest records
the same config and the same input fingerprints; inputs are fingerprinted by content, so a stage reruns when
the content of an upstream output it reads changed, not merely because the upstream stage ran again.
An interrupted stage resumes where it stopped (training from its newest checkpoint, sample/score/annotate from
their shards); a stage redone because its settings or inputs changed starts afresh (its RunDir sees that the
directory holds a run of other settings: old checkpoints and shards are not reused).
The results go to ``<output_root>/pipeline.json``, and ``report.html`` is built from the output root.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from alignline.config import Section, _merge, _set_dotted, config_error, parse_overrides, read_yaml_mapping
from alignline.data.io import MANIFEST, atomic_write_json, read_manifest
from alignline.errors import ConfigError
from alignline.stages.common import ALWAYS_IGNORED

# ----------------------------------------------------------------------------------------- stage table

@dataclass(frozen=True)
class StageSpec:
    """One stage type: its command name, its config class (``module:Class``; the module has ``run(cfg)``)."""

    name: str
    target: str
    doc: str
    resumable: bool
    group: str | None = None
    """Command group: ``eval`` for ``alignline eval NAME``; None for top-level commands."""

    @property
    def key(self) -> str:
        """The name a pipeline file uses: ``eval.bestofn`` for ``alignline eval bestofn``."""
        return f"{self.group}.{self.name}" if self.group else self.name

    def load(self) -> tuple[Any, type[BaseModel]]:
        module_name, cls_name = self.target.rsplit(":", 1)
        module = importlib.import_module(module_name)
        return module, getattr(module, cls_name)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("prepare", "alignline.stages.prepare:PrepareConfig",
              "Normalise raw conversations (ShareGPT or JSONL) into disjoint SFT / prompt splits.", False),
    StageSpec("sft", "alignline.stages.sft:SFTConfig",
              "Supervised fine-tuning, loss on assistant tokens (Xwin step 1).", True),
    StageSpec("select", "alignline.stages.select:SelectConfig",
              "From ranked sets: RS data (rank k) or DPO pairs (fixed rank, policy-matched, best/worst, RSO, TSO model "
              "matrix).", False),
    StageSpec("rs", "alignline.stages.rs:RSConfig",
              "Rejection-sampling fine-tuning: SFT on selected responses, loss on the last turn only.", True),
    StageSpec("dpo", "alignline.stages.dpo:DPOConfig",
              "Preference optimisation on pairs: DPO, IPO, cDPO, RSO hinge or TSO dual-clip.", True),
    StageSpec("sample", "alignline.stages.sample:SampleConfig",
              "N responses per prompt from a model or every member of a TSO model matrix (hf in process, or any "
              "OpenAI-compatible server).", False),
    StageSpec("annotate", "alignline.stages.annotate:AnnotateConfig",
              "Xwin-Pair: a judge (verifier or LLM) picks the better of two responses, why and by how much.", False),
    StageSpec("rm", "alignline.stages.rm:RMConfig",
              "Reward model (Xwin-RM): SFT backbone + scalar head, Bradley-Terry loss, accuracy per rating.", True),
    StageSpec("score", "alignline.stages.score:ScoreConfig",
              "Rank each prompt's responses with a reward model (prompt computed once per prompt), or with an LLM "
              "evaluator per criterion (judge=evaluator).", False),
    StageSpec("feedback", "alignline.stages.feedback:FeedbackConfig",
              "TSO scored feedback: a judge (verifier or LLM evaluator) scores each response per criterion; "
              "human corrections replace it; a held-out split.", False),
    StageSpec("judge-sft", "alignline.stages.judge_sft:JudgeSFTConfig",
              "TSO evaluation correction: fine-tune an evaluator on scored feedback; agreement before and after.",
              True),
    StageSpec("bestofn", "alignline.stages.bestofn:BestOfNConfig",
              "Best-of-n curve: gold (verifier) score of the RM's best among n samples, and the oracle's.",
              False, "eval"),
    StageSpec("tso", "alignline.stages.tso:TSOConfig",
              "Mini-batch iterative DPO (TSO): the reference is the policy after the previous mini-batch.", True),
    StageSpec("tso-loop", "alignline.stages.tso_loop:TSOLoopConfig",
              "Multi-stage TSO: each stage samples and scores the policy, mixes model-matrix pairs with its own "
              "pairs, trains mini-batch iterative DPO and registers the new version in the matrix.", False),
    StageSpec("rl", "alignline.stages.rl:RLConfig",
              "Online RL: G samples per prompt from the current policy, verifier / reward model / judge rewards, "
              "GRPO, Dr. GRPO, RLOO, REINFORCE++ or PPO (GAE + critic), KL to a reference.", True),
    StageSpec("self-reward", "alignline.stages.self_reward:SelfRewardConfig",
              "Self-Reward baseline: each stage the policy's samples are scored by a judge, best vs worst become "
              "pairs, DPO with the stage's starting policy as reference.", False),
    StageSpec("mtbench", "alignline.stages.eval_mtbench:MTBenchConfig",
              "MT-bench: answers turn by turn (or a FastChat answer file) graded 1-10 by an LLM judge; "
              "median of repeats.", False, "eval"),
    StageSpec("winrate", "alignline.stages.eval_winrate:WinrateConfig",
              "Pairwise win rate vs a reference (LLM judge, both orders), with AlpacaEval-style length control.",
              False, "eval"),
    StageSpec("verifiable", "alignline.stages.eval_verifiable:VerifiableConfig",
              "IFEval-style accuracy (prompt/instruction level, strict/loose) on prompts with verifiable "
              "instructions.", False, "eval"),
    StageSpec("injection", "alignline.stages.eval_injection:InjectionConfig",
              "Judge robustness: fake verdicts, forged delimiters, pleas and null answers against a pairwise judge.",
              False, "eval"),
)
"""Every stage command, in the order of ``alignline --help``; the CLI and pipelines both read this table."""

# Command names are unique across groups, so a pipeline may also write the bare name ("bestofn").
_BY_NAME: dict[str, StageSpec] = {s.key: s for s in STAGES} | {s.name: s for s in STAGES}
assert len({s.name for s in STAGES}) == len(STAGES), "stage command names must be unique across groups"


def stage_spec(type_name: str) -> StageSpec | None:
    return _BY_NAME.get(type_name)


# ----------------------------------------------------------------------------------------- the file

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
    vars: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    """Values for ``${NAME}`` in string settings; a var may use earlier vars."""
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


def _dotted_tree(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        _set_dotted(tree, str(key), copy.deepcopy(value))
    return tree


def _split_overrides(path: Path, items: list[str], stage_names: list[str]) -> tuple[dict, dict[str, dict]]:
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


class _Resolver:
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


def _check_dirs(path: Path, root: str, stages: list[PlannedStage]) -> None:
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


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Read, resolve and validate a pipeline file; nothing runs. Errors name the file, stage and setting."""
    path = Path(path)
    raw = read_pipeline_mapping(path)
    stage_names = [s.get("name") for s in raw.get("stages") or [] if isinstance(s, dict)]
    top, per_stage = _split_overrides(path, list(overrides or []), [n for n in stage_names if isinstance(n, str)])
    try:
        spec = PipelineFile.model_validate(_merge(raw, top))
    except ValidationError as exc:
        raise config_error(PipelineFile, exc, str(path) + (" + overrides" if top else "")) from None

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
            close = difflib.get_close_matches(entry.stage, list(_BY_NAME), n=1)
            raise ConfigError(f"{path}: {where}, setting 'stage': unknown stage type '{entry.stage}'"
                              + (f"; did you mean '{close[0]}'?" if close else "")
                              + f" (known: {', '.join(s.key for s in STAGES)})")
        seen[entry.name] = i

    values: dict[str, Any] = {}
    for key, value in spec.vars.items():
        values[key] = _Resolver(path, values, "vars")(value, f"vars.{key}")
    name = spec.name or path.stem
    root_value = spec.output_root if spec.output_root is not None else f"runs/{name}"
    output_root = str(_Resolver(path, values, "the top level")(root_value, "output_root"))

    planned: list[PlannedStage] = []
    stage_dirs: dict[str, str] = {}
    for i, entry in enumerate(spec.stages):
        s = stage_spec(entry.stage)
        assert s is not None
        where = f"stage '{entry.name}' ({s.key})"
        data: dict = {}
        chunks = entry.config if isinstance(entry.config, list) else [] if entry.config is None else [entry.config]
        for chunk in chunks:
            if isinstance(chunk, str):
                chunk_path = path.parent / chunk
                chunk = read_yaml_mapping(chunk_path, f"{path}: {where}, setting 'config':")
                chunk.pop("output_dir", None)  # the pipeline decides where its stages write (see module doc)
            data = _merge(data, copy.deepcopy(chunk))
        data = _merge(data, _dotted_tree(entry.overrides))
        data = _merge(data, per_stage.get(entry.name, {}))
        if data.get("output_dir") is None:
            data["output_dir"] = f"{output_root}/{entry.name}"
        resolver = _Resolver(path, values, where, stage_dirs=stage_dirs, index=i,
                             later={e.name: j for j, e in enumerate(spec.stages) if j >= i})
        data = resolver(data)
        module, cls = s.load()
        if not hasattr(module, "run"):
            raise ConfigError(f"{path}: {where}: {s.target} has no run(cfg) function")
        try:
            cfg = cls.model_validate(data)
        except ValidationError as exc:
            raise config_error(cls, exc, f"{path}, {where}") from None
        out = str(cfg.output_dir)
        planned.append(PlannedStage(i, entry.name, s, cfg, out, list(resolver.stages_used)))
        stage_dirs[entry.name] = out
    _check_dirs(path, output_root, planned)
    return Plan(path, name, output_root, values, planned, list(overrides or []))


# ----------------------------------------------------------------------------------------- running

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


STATUS_STYLE = {"ran": "green", "skipped-up-to-date": "cyan", "failed": "bold red", "interrupted": "bold red",
                "incomplete": "yellow", "excluded": "dim", "not-run": "dim", "planned": "white"}


def _short_counts(counts: dict, limit: int = 6) -> str:
    items = [f"{k}={v}" for k, v in counts.items()]
    return ", ".join(items[:limit]) + (f", +{len(items) - limit}" if len(items) > limit else "")


def print_summary(result: PipelineResult, title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("#", "stage", "type", "status", "seconds", "counts", "output"):
        table.add_column(col, overflow="fold")
    for ps, r in zip(result.plan.stages, result.results):
        style = STATUS_STYLE.get(r.status, "white")
        status = r.status if not r.error else f"{r.status}: {r.error}"
        table.add_row(str(ps.index + 1), escape(ps.name), ps.spec.key, f"[{style}]{escape(status)}[/{style}]",
                      f"{r.seconds:.1f}" if r.status in ("ran", "skipped-up-to-date", "failed", "incomplete") else "",
                      escape(_short_counts(r.counts)), escape(r.output_dir))
    Console(soft_wrap=True).print(table)


def print_plan(plan: Plan, selected: set[str]) -> None:
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


def _build_report(root: str) -> None:
    from alignline.stages.common import console

    try:
        from alignline.report.html import ReportConfig
        from alignline.report.html import run as build_report

        build_report(ReportConfig(run_dir=root))
    except Exception as exc:  # noqa: BLE001 (the stages' results stand without their report)
        console.print(f"[yellow]warning:[/yellow] the HTML report for {root} could not be built: "
                      f"{type(exc).__name__}: {exc}; try `alignline report {root}`")


def run_pipeline(path: str | Path, overrides: list[str] | None = None, *, from_stage: str | None = None,
                 only: str | None = None, dry_run: bool = False, report: bool = True) -> PipelineResult:
    """Validate every stage of the pipeline file, then run them in order (each skips itself when up to date).

    ``overrides``: ``STAGE.setting=value`` (e.g. ``sft.train.lr=1e-5``), ``vars.NAME=value``, ``output_root=DIR``.
    ``from_stage``: leave out the stages before it (they must have completed); ``only``: run just that stage
    (the stages it reads must have completed). A failing stage stops the pipeline and its error is re-raised
    after pipeline.json is written.
    """
    plan = load_pipeline(path, overrides)
    if from_stage is not None and only is not None:
        raise ConfigError("give --from or --only, not both")
    if only is not None:
        target = plan.stage(only, "--only")
        selected = [target]
        _require_complete(plan, [plan.stage(d, "--only") for d in target.depends_on], f"--only {only}")
    elif from_stage is not None:
        start = plan.stage(from_stage, "--from").index
        selected = plan.stages[start:]
        _require_complete(plan, plan.stages[:start], f"--from {from_stage}")
    else:
        selected = list(plan.stages)
    names = {ps.name for ps in selected}
    if dry_run:
        print_plan(plan, names)
        return PipelineResult(plan, [StageResult(ps.name, ps.spec.key, "planned" if ps.name in names else "excluded",
                                                 ps.output_dir) for ps in plan.stages])

    from alignline.stages.common import console, failures_recorded

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: list[StageResult] = []
    failure: BaseException | None = None
    for ps in plan.stages:
        if failure is not None or (results and results[-1].status == "incomplete"):
            results.append(StageResult(ps.name, ps.spec.key, "not-run", ps.output_dir))
            continue
        if ps.name not in names:
            results.append(StageResult(ps.name, ps.spec.key, "excluded", ps.output_dir, counts=_counts(ps.output_dir)))
            continue
        console.print(f"[bold]== {ps.name}[/bold] ({ps.spec.key}) -> {ps.output_dir}")
        before = _manifest_bytes(ps.output_dir)
        module, _ = ps.spec.load()
        t0 = time.perf_counter()
        try:
            with failures_recorded():
                module.run(ps.cfg)
        except BaseException as exc:  # noqa: BLE001 (recorded in pipeline.json, then re-raised below)
            failure = exc
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            results.append(StageResult(ps.name, ps.spec.key, status, ps.output_dir, time.perf_counter() - t0,
                                       error=f"{type(exc).__name__}: {exc}"))
            continue
        seconds = time.perf_counter() - t0
        after = _manifest_bytes(ps.output_dir)
        m = read_manifest(ps.output_dir) or {}
        if m.get("status") != "complete":
            status = "incomplete"  # e.g. train.stop_after_step: the next run resumes it
        elif after == before:
            status = "skipped-up-to-date"  # a stage that reruns always writes a new manifest
        else:
            status = "ran"
        results.append(StageResult(ps.name, ps.spec.key, status, ps.output_dir, seconds, _counts(ps.output_dir)))

    result = PipelineResult(plan, results)
    option = {"from": from_stage, "only": only}
    atomic_write_json(Path(plan.output_root) / "pipeline.json", _plan_json(result, started, option))
    print_summary(result, f"pipeline {plan.name}: {Path(plan.output_root) / 'pipeline.json'}")
    if report and not isinstance(failure, KeyboardInterrupt):
        _build_report(plan.output_root)
    if failure is not None:
        raise failure
    if not result.ok:
        console.print("[yellow]the pipeline stopped before its end[/yellow]; rerun the same command to continue")
    return result
