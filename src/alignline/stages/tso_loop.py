"""``alignline tso-loop``: the multi-stage TSO loop (Chen et al. 2024), built only from existing stages.

Stage s = 1..S starts from the policy v{s-1} (v0: ``model``) and, in ``<output_dir>/stage-s/``:

1. ``sample``: the policy's ``sample.n`` responses per prompt (``policy_samples/``, source
   ``<registration.name>-v{s-1}@v{s-1}``); ``score``: their ranked sets (``scored/``), the policy's own pairs;
2. ``sample matrix=sample_matrix.yaml`` (``members/``): every member in a source set of the current matrix.
   A member is generated once, in the first stage that uses it; later stages name those responses as the
   member's ``responses`` (copied, not generated again). A registered policy version's responses are the
   policy samples of the stage after it was trained (step 1 there: "the base model's responses are
   regenerated"), so no model is sampled twice;
3. ``select strategy=matrix`` (``pairs/``): matrix pairs mixed with the policy's best-vs-worst pairs at
   ``self_ratio``;
4. ``tso`` from v{s-1} (``tso/``: K mini-batches, dual-clip by default); its last version is v{s};
5. register v{s}: ``matrix.yaml`` = the previous matrix plus the member ``<registration.name>-v{s}`` (version
   ``v{s}``, size ``registration.size``, model = the new checkpoint), placed by the rule below;
6. with ``eval_prompts``: ``eval verifiable`` of v{s} (``eval/``; v0 in ``stage-0/eval/``);
7. ``summary.json``: sample, score and pair counts (drops included), training counts and each mini-batch's
   reference, steps and final metrics, the evaluation.

Registration rule (``registration``), the paper's "newest model positive, older ones negative": the new version
joins the ``registration.newest`` set (default positive, weight 1) and the version registered one stage earlier
moves as ``registration.previous`` says (default: out of the positive set into the negative set, weight 1;
``keep``: stays where it is; ``drop``: leaves both sets, still listed). v0 is not a member: its samples
already give the self pairs. The user's members never move.

Top level: ``versions.json`` (every version with its path, the policy it was trained from and the reference
of each mini-batch), ``results.json`` (with eval_prompts: verifier pass rates per stage, comparable with
``alignline self-reward`` on the same prompts) and ``manifest.json``. Every sub-stage config and every
stage's matrix is built and validated before anything runs (an unknown member name is an error then).
Each sub-stage runs through its own ``run(cfg)`` (the stage table's runner,
:mod:`alignline.stages.registry`), which skips it when up to date (and starts afresh over an
out-of-date run of other settings or inputs), so a rerun generates and trains nothing. One process: the
sub-stages are not sharded across processes here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model

from alignline.config import Section, config_error
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import atomic_write_json, atomic_write_text, read_manifest
from alignline.errors import AlignlineError, ConfigError
from alignline.evaluate.winrate import default_eval_sampling
from alignline.generate.base import SamplingParams
from alignline.judges.scorers import make_scorer
from alignline.matrix import MatrixConfig, load_matrix
from alignline.stages.common import RunDir, console
from alignline.stages.eval_verifiable import METRICS, VerifiableConfig
from alignline.stages.registry import stage_spec
from alignline.stages.sample import SampleConfig
from alignline.stages.score import ScoreConfig
from alignline.stages.select import SelectConfig
from alignline.stages.tso import TSOConfig
from alignline.train.preference import PairData


def settings_of(cls: type[Section], name: str, doc: str, exclude: set[str], **fields: Any) -> type[Section]:
    """A section with ``cls``'s fields (types, defaults, docs) less ``exclude``, plus ``fields``.

    The settings of a stage the loop runs, less those the loop sets itself; taken from the stage's own fields
    so that the two cannot drift apart. The stage's own validators run when the loop builds its config,
    before anything runs."""
    own = {k: (f.annotation, f) for k, f in cls.model_fields.items() if k not in exclude}
    return create_model(name, __base__=Section, __doc__=doc, __module__=__name__, **{**own, **fields})


SampleSettings = settings_of(
    SampleConfig, "SampleSettings", "How the policy and every sampled matrix member are sampled (alignline sample).",
    {"prompts", "model", "matrix", "engine", "openai", "output_dir", "source", "shard", "max_prompts"},
    n=(int, Field(4, ge=2, description="Responses per prompt (at least 2: the best and the worst of the policy's "
                                       "own make its pair).")))
ScoreSettings = settings_of(
    ScoreConfig, "ScoreSettings", "The judge that ranks the policy's own samples (alignline score).",
    {"prompts", "responses", "output_dir", "shard"})
PairSettings = settings_of(PairData, "PairSettings", "How each stage's pairs are cut.", {"train", "eval"})
TSOSettings = settings_of(
    TSOConfig, "TSOSettings", "Each stage's training (alignline tso: K mini-batches, dual-clip by default).",
    {"model", "output_dir", "data", "regenerate", "stop_at", "resume"},
    data=(PairSettings, Field(default_factory=PairSettings,
                              description="How the stage's pairs are cut: max_length, max_drop_fraction, max_examples.")))


class IterationBase(Section):
    """Settings shared by ``tso-loop`` and ``self-reward``."""

    prompts: RecordsSource
    """Prompt records the preference pairs are built for (their reference answers are the member 'human')."""
    model: str
    """The starting policy v0 (HF dir, .gguf, alias or Hub id)."""
    stages: int = Field(3, ge=1)
    """S: iterations; each samples the current policy, builds pairs and trains the next version (TSO: 3)."""
    sample: SampleSettings = Field(default_factory=SampleSettings)
    """How the policy (and every sampled matrix member) is sampled: n responses per prompt, sampling, dtype."""
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    """The judge of the policy's own samples: score.reward_model=DIR, score.judge=evaluator
    score.evaluator.model=PATH (an evaluator from alignline judge-sft), or score.judge=verifier (the prompts'
    verifiable instructions)."""
    eval_prompts: RecordsSource | None = None
    """Held-out prompts with verifiable instructions: every version's verifier pass rate goes to results.json
    (null: no evaluation)."""
    eval_sampling: SamplingParams = Field(default_factory=default_eval_sampling)
    """Sampling of the evaluated versions (default greedy, 512 new tokens)."""
    eval_max_prompts: int | None = Field(None, gt=0)
    """Evaluate on the first this many eval prompts only."""


class RegisterSettings(Section):
    """How each trained version joins the model matrix."""

    name: str = "policy"
    """Trained versions become the members '<name>-v1', '<name>-v2', ... (version 'v1', 'v2', ...)."""
    size: str = ""
    """Their size (free text, e.g. "135M")."""
    newest: Literal["positive", "negative", "none"] = "positive"
    """The source set the newest version joins (none: listed, never drawn)."""
    newest_weight: float = Field(1.0, gt=0)
    """Its weight there."""
    previous: Literal["negative", "keep", "drop"] = "negative"
    """The version registered one stage earlier: negative (leaves the positive set, joins the negative one),
    keep (stays where it is) or drop (leaves both sets, still listed)."""
    previous_weight: float = Field(1.0, gt=0)
    """Its weight in the negative set."""


class TSOLoopConfig(IterationBase):
    """Configuration of ``alignline tso-loop``."""

    matrix: str
    """The model-matrix YAML of stage 1 (members, positive and negative sets; see alignline.matrix)."""
    output_dir: str = "runs/tso_loop"
    """stage-s/ per stage, versions.json, results.json, manifest.json."""
    self_ratio: float = Field(0.5, ge=0, lt=1)
    """Share of each stage's pairs that are the policy's own best-vs-worst pairs (paper: 0.5)."""
    seed: int = 0
    """Seed of the matrix draws."""
    tso: TSOSettings = Field(default_factory=TSOSettings)
    """Each stage's training: minibatches (K), loss (dual-clip), train, data.max_length, ..."""
    registration: RegisterSettings = Field(default_factory=RegisterSettings)
    """How each trained version joins the matrix."""


# --------------------------------------------------------------------------- pieces shared with self-reward

@dataclass
class Stage:
    """One stage's sub-stage configs, all built before anything runs."""

    index: int
    start: str
    """The policy it trains from, v{s-1}."""
    new: str
    """Where the trained v{s} will be."""
    dir: Path
    policy_sample: SampleConfig
    score: ScoreConfig
    select: SelectConfig
    train: TSOConfig
    eval: VerifiableConfig | None
    members: SampleConfig | None = None
    sample_matrix: dict | None = None
    registry: dict | None = None


def build(cls: type[Section], where: str, **values: Any) -> Any:
    """A sub-stage's config; a problem is a ConfigError naming the loop setting it came from."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise config_error(cls, exc, f"the loop's {where} settings") from None


def judge_inputs(cfg: IterationBase, score: ScoreConfig) -> dict[str, str | None]:
    """The loop's inputs: its prompts, starting model and the judge's own model (``score``: a stage's score
    config, through :func:`make_scorer` like every reader of the judge)."""
    return {"prompts": cfg.prompts, "model": cfg.model, "eval_prompts": cfg.eval_prompts,
            "reward_model": None, "evaluator": None, **make_scorer(score).inputs}


def policy_configs(cfg: IterationBase, policy: str, source: str, stage_dir: Path) -> tuple[SampleConfig, ScoreConfig]:
    """Sample the policy (``policy_samples/``) and rank its samples (``scored/``)."""
    samples = str(stage_dir / "policy_samples")
    return (build(SampleConfig, "sample", **cfg.sample.model_dump(), prompts=cfg.prompts, model=policy,
                  source=source, output_dir=samples),
            build(ScoreConfig, "score", **cfg.score.model_dump(), prompts=cfg.prompts, responses=samples,
                  output_dir=str(stage_dir / "scored")))


def eval_config(cfg: IterationBase, policy: str, name: str, stage_dir: Path) -> VerifiableConfig | None:
    if cfg.eval_prompts is None:
        return None
    system = {"model": policy, "name": name, "sampling": cfg.eval_sampling.model_dump(), "dtype": cfg.sample.dtype,
              "max_batch": cfg.sample.max_batch, "trust_remote_code": cfg.sample.trust_remote_code,
              "decode_step": cfg.sample.decode_step}
    return build(VerifiableConfig, "eval", prompts=cfg.eval_prompts, model=system, max_prompts=cfg.eval_max_prompts,
                 output_dir=str(stage_dir / "eval"))


def run_sub_stage(key: str, cfg: Any) -> Path:
    """One sub-stage (``key`` in the stage table) through its own ``run(cfg)``, which skips it when up to date."""
    spec = stage_spec(key)
    assert spec is not None, key
    console.print(f"[bold]== {spec.command}[/bold] -> {cfg.output_dir}")
    return spec.run(cfg)


def _counts(cfg: Any) -> dict:
    return dict((read_manifest(cfg.output_dir) or {}).get("counts") or {})


def _minibatches(st: Stage) -> list[dict]:
    return [read_manifest(Path(st.train.output_dir) / f"iter-{k}") or {} for k in range(1, st.train.minibatches + 1)]


def evaluate(ev: VerifiableConfig | None) -> dict | None:
    """The verifier pass rates of one version, or None without eval_prompts."""
    if ev is None:
        return None
    res = json.loads((run_sub_stage("eval.verifiable", ev) / "results.json").read_text())
    keep = (*METRICS, "n_prompts", "n_instructions", "failed_responses")
    return {"model": ev.model.model, **{k: res[k] for k in keep}}


def trained_version(st: Stage, **extra: Any) -> dict:
    """The versions.json entry of the version stage ``st`` trained (read back from the tso manifests)."""
    m = read_manifest(st.train.output_dir) or {}
    if m.get("model_dir") != st.new:
        raise AlignlineError(f"{st.train.output_dir}: the tso stage's final version is {m.get('model_dir')!r}, "
                             f"not {st.new!r} as planned (did its layout change?)")
    return {"version": f"v{st.index}", "stage": st.index, "path": st.new, "trained_from": st.start,
            "references": [it.get("reference") for it in _minibatches(st)], **extra}


def stage_summary(st: Stage, version: dict, evaluation: dict | None) -> dict:
    return {
        "stage": st.index, "version": version,
        "policy_samples": _counts(st.policy_sample), "scores": _counts(st.score),
        **({"members": _counts(st.members)} if st.members is not None else {}),
        "pairs": _counts(st.select),
        "training": {"counts": _counts(st.train), "loss": st.train.loss.type,
                     "minibatches": [{k: it.get(k) for k in ("minibatch", "pairs", "reference", "steps",
                                                             "final_metrics")} for it in _minibatches(st)]},
        "eval": evaluation,
    }


def record(out: Path, method: str, cfg: IterationBase, versions: list[dict], results: dict[str, dict]) -> None:
    atomic_write_json(out / "versions.json", versions)
    if cfg.eval_prompts is not None:
        atomic_write_json(out / "results.json", {"method": method, "eval_prompts": cfg.eval_prompts,
                                                 "metrics": list(METRICS), "stages": results})


def run_stages(cfg: IterationBase, method: str, stages: list[Stage], rd: RunDir,
               between: Callable[[Stage], None] | None = None,
               member: Callable[[Stage], dict] | None = None) -> Path:
    """Evaluate v0, then run every stage in order: ``between(st)`` after its score stage (the matrix sub-stages
    of tso-loop), its select and tso stages, then ``member(st)`` (registration; returns extra version fields)."""
    out = Path(cfg.output_dir)
    versions = [{"version": "v0", "stage": 0, "path": cfg.model}]
    results: dict[str, dict] = {}
    first = evaluate(eval_config(cfg, cfg.model, "v0", out / "stage-0"))
    if first is not None:
        results["0"] = first
    record(out, method, cfg, versions, results)
    for st in stages:
        console.print(f"[bold]{method}: stage {st.index}/{len(stages)}[/bold], from {st.start}")
        run_sub_stage("sample", st.policy_sample)
        run_sub_stage("score", st.score)
        if between is not None:
            between(st)
        run_sub_stage("select", st.select)
        run_sub_stage("tso", st.train)
        version = trained_version(st, **(member(st) if member is not None else {}))
        evaluation = evaluate(st.eval)
        versions.append(version)
        if evaluation is not None:
            results[str(st.index)] = evaluation
        atomic_write_json(st.dir / "summary.json", stage_summary(st, version, evaluation))
        record(out, method, cfg, versions, results)
    rd.finish({"stages": len(stages), "versions": len(versions)}, versions=versions, results=results)
    console.print(f"[green]{method} done[/green]: {len(stages)} stages\n"
                  + "\n".join(f"  {v['version']}: {v['path']}" for v in versions)
                  + "".join(f"\n  stage {s}: prompt-level strict {100 * r['prompt_level_strict']:.1f} %, "
                            f"instruction-level strict {100 * r['instruction_level_strict']:.1f} %"
                            for s, r in results.items()))
    return rd.path


# --------------------------------------------------------------------------- the matrix across stages

def member_name(rule: RegisterSettings, k: int) -> str:
    return f"{rule.name}-v{k}"


def register_version(matrix: dict, member: dict, previous: str | None, rule: RegisterSettings) -> dict:
    """``matrix`` (a MatrixConfig as a dict) with ``member`` added and placed by ``rule``; ``previous`` is the
    member registered one stage earlier (None at stage 1)."""
    out = {"members": [*matrix["members"], member], "positive": dict(matrix["positive"]),
           "negative": dict(matrix["negative"])}
    if previous is not None and rule.previous != "keep":
        out["positive"].pop(previous, None)
        out["negative"].pop(previous, None)
        if rule.previous == "negative":
            out["negative"][previous] = rule.previous_weight
    if rule.newest != "none":
        out[rule.newest][member["name"]] = rule.newest_weight
    return out


def sampling_matrix(registry: dict, sampled_at: dict[str, str]) -> dict:
    """The members of ``registry`` in a source set; one whose responses exist already (``sampled_at``: name ->
    directory) names them as its ``responses`` instead of its model, so it is copied, not sampled again."""
    used = set(registry["positive"]) | set(registry["negative"])
    members = []
    for m in registry["members"]:
        if m["name"] not in used:
            continue
        if m["name"] in sampled_at:
            m = {**{k: m[k] for k in ("name", "version", "size") if k in m}, "responses": sampled_at[m["name"]]}
        members.append(m)
    return {"members": members, "positive": dict(registry["positive"]), "negative": dict(registry["negative"])}


def _valid_matrix(obj: dict, what: str) -> dict:
    try:
        MatrixConfig.model_validate(obj)
    except ValidationError as exc:
        raise config_error(MatrixConfig, exc, what) from None
    return obj


def _dump(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


def plan(cfg: TSOLoopConfig, matrix: MatrixConfig) -> list[Stage]:
    """Every stage's sub-stage configs and matrices, validated; nothing is run or written."""
    rule = cfg.registration
    listed = {m.name for m in matrix.members}
    for s in range(0, cfg.stages + 1):
        if member_name(rule, s) in listed:
            raise ConfigError(f"{cfg.matrix}: member '{member_name(rule, s)}' has the name the loop gives trained "
                              f"version v{s}; rename that member or set registration.name to another prefix")
    registry = matrix.model_dump(mode="json", exclude_none=True)
    sampled_at: dict[str, str] = {}
    stages, start = [], cfg.model
    for s in range(1, cfg.stages + 1):
        d = Path(cfg.output_dir) / f"stage-{s}"
        policy_sample, score = policy_configs(cfg, start, f"{member_name(rule, s - 1)}@v{s - 1}", d)
        if s > 1:  # the version trained in stage s-1 is answered by this stage's policy samples
            sampled_at[member_name(rule, s - 1)] = policy_sample.output_dir
        sm = _valid_matrix(sampling_matrix(registry, sampled_at), f"the stage-{s} sampling matrix from {cfg.matrix}")
        members_dir = d / "members"
        for m in sm["members"]:
            if "engine" in m:
                sampled_at[m["name"]] = str(members_dir / m["name"])
        new = str(d / "tso" / "versions" / f"v{cfg.tso.minibatches}")
        engine = {"model": new, **cfg.sample.model_dump(include={"dtype", "max_batch", "trust_remote_code", "decode_step"})}
        registry = _valid_matrix(register_version(
            registry, {"name": member_name(rule, s), "version": f"v{s}", "size": rule.size, "engine": engine},
            member_name(rule, s - 1) if s > 1 else None, rule), f"the stage-{s} matrix (registration rule, {cfg.matrix})")
        stages.append(Stage(
            index=s, start=start, new=new, dir=d, policy_sample=policy_sample, score=score,
            members=build(SampleConfig, "sample", **cfg.sample.model_dump(), prompts=cfg.prompts,
                          matrix=str(d / "sample_matrix.yaml"), output_dir=str(members_dir)),
            select=build(SelectConfig, "select", ranked=score.output_dir, mode="pairs", strategy="matrix",
                         matrix=str(d / "sample_matrix.yaml"), prompts=cfg.prompts, responses=str(members_dir),
                         self_ratio=cfg.self_ratio, seed=cfg.seed, output_dir=str(d / "pairs")),
            train=build(TSOConfig, "tso", **cfg.tso.model_dump(exclude={"data"}), model=start,
                        data={**cfg.tso.data.model_dump(), "train": str(d / "pairs" / "pairs.jsonl")},
                        output_dir=str(d / "tso")),
            eval=eval_config(cfg, new, f"v{s}", d), sample_matrix=sm, registry=registry))
        start = new
    return stages


def run(cfg: TSOLoopConfig) -> Path:
    matrix = load_matrix(cfg.matrix)  # an unknown member name is a ConfigError here, before anything runs
    stages = plan(cfg, matrix)
    inputs = {**judge_inputs(cfg, stages[0].score), "matrix": cfg.matrix,
              **{f"member:{m.name}": m.responses or (m.engine.model if m.engine else None) for m in matrix.members}}
    rd = RunDir("tso_loop", cfg, cfg.output_dir, inputs)
    if rd.skip_if_done():
        return rd.path
    rd.start()

    def members(st: Stage) -> None:
        atomic_write_text(st.dir / "sample_matrix.yaml", _dump(st.sample_matrix))
        run_sub_stage("sample", st.members)

    def register(st: Stage) -> dict:
        atomic_write_text(st.dir / "matrix.yaml", _dump(st.registry))
        return {"member": member_name(cfg.registration, st.index), "matrix": str(st.dir / "matrix.yaml")}

    return run_stages(cfg, "tso-loop", stages, rd, between=members, member=register)
