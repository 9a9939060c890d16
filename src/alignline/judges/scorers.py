"""The three judges of ``alignline score`` behind one interface: reward model, verifier, LLM evaluator.

:class:`JudgeSettings` is the judge's settings section (``score`` composes it into its config, ``tso-loop`` and
``self-reward`` into their ``score`` section) and :func:`make_scorer` is the only place, besides the section's
own check, that reads its ``judge``.
``score.run`` keeps the run directory, sharding, resuming and ranking, and asks its :class:`Scorer`, in this order:

* ``inputs``: the judge's own model, fingerprinted with the run's other inputs;
* ``load(device)``: load what the judge runs on (the reward model), before any record is read;
* ``check(prompts)``: a problem with the prompts of this shard, raised before any shard file is touched;
* ``prepare(todo, run_dir, shard, counts)``: the work done for the whole shard at once (the evaluator's calls,
  batched and cached; resumed prompts come from the cache at no cost);
* ``score(prompt, responses, counts, tel)``: the prompt's responses with their score under ``scorer.id``
  (unsorted), or None to leave the prompt out.

The reward model's scoring (:class:`alignline.judges.reward.RewardModelJudge`) and the evaluator's judge id
(:func:`alignline.judges.cache.llm_judge_id`) are the ones the rl rewards and tso use too.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from alignline.config import Section
from alignline.data.io import write_records
from alignline.data.records import Prompt, Response, Scored
from alignline.errors import AlignlineError, DataError
from alignline.generate.base import SamplingParams
from alignline.generate.engines import EngineSettings, LazyEngine
from alignline.judges.cache import JudgeCache, ask_judge, llm_judge_id
from alignline.judges.evaluator import (
    DEFAULT_CRITERIA,
    EVALUATOR_VERSION,
    diagnose_evaluation,
    distinct_criteria,
    evaluator_prompt,
    parse_evaluation,
)

if TYPE_CHECKING:
    from alignline.telemetry import Telemetry

Todo = list[tuple[Prompt, list[Response]]]
"""The prompts of one shard with their usable responses."""
Evaluation = dict[tuple[str, int], dict[str, float | None]]
"""{(prompt id, sample idx): {criterion: score, or None when the evaluator's output did not parse}}."""


class JudgeSettings(Section):
    """Which judge scores responses, and its own settings."""

    judge: Literal["reward_model", "evaluator", "verifier"] = "reward_model"
    """reward_model: a trained RM scores each response; evaluator: an LLM evaluator scores it per criterion;
    verifier: the fraction of the prompt's verifiable instructions it follows (no model)."""
    reward_model: str | None = None
    """reward_model: an RM saved by ``alignline rm`` (or any AutoModelForSequenceClassification with 1 label)."""
    evaluator: EngineSettings | None = None
    """evaluator: its engine (engine hf|openai, model, openai settings, dtype, max_batch)."""
    criteria: list[str] = Field(default_factory=lambda: list(DEFAULT_CRITERIA))
    """evaluator: the criteria each response is scored on (one call each); its score is their mean."""
    evaluator_sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=512))
    """evaluator: sampling (default greedy, 512 new tokens)."""
    evaluator_batch_size: int = Field(8, gt=0)
    """evaluator: prompts per engine call."""
    scorer_id: str | None = None
    """Key of the score in each response's ``scores``; null: 'rm', 'evaluator' or 'verifier' (the judge)."""
    max_length: int = Field(4096, gt=8)
    """prompt + response beyond this many tokens: the response is cut (counted)."""
    chunk: int = Field(16, gt=0)
    """Responses per forward pass (all share one prompt cache)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory."""

    _criteria = field_validator("criteria")(distinct_criteria)

    @model_validator(mode="after")
    def _judge_settings_given(self) -> JudgeSettings:
        """The judge's own setting, checked with the config (so ``alignline run --dry-run`` sees it)."""
        if self.judge == "reward_model" and not self.reward_model:
            raise ValueError("reward_model is required for judge=reward_model (a directory saved by `alignline rm`); "
                             "or set judge=evaluator evaluator.model=PATH")
        if self.judge == "evaluator" and self.evaluator is None:
            raise ValueError("evaluator is required for judge=evaluator, e.g. evaluator.model=PATH (a model trained "
                             "by `alignline judge-sft`) or evaluator.engine=openai evaluator.model=NAME")
        return self


def with_score(r: Response, scorer: str, value: float) -> Scored:
    """``r`` as a Scored record, its earlier scores kept and ``scorer``'s added."""
    return Scored(**r.model_dump(), scores={**dict(getattr(r, "scores", {}) or {}), scorer: value})


class Scorer:
    """One judge of ``alignline score``; the hooks a judge does not need do nothing."""

    judge: ClassVar[str]
    """The ``judge`` setting this class implements (recorded in the manifest)."""
    default_id: ClassVar[str]
    """The key of the score when ``scorer_id`` is null."""

    def __init__(self, cfg: JudgeSettings, *, prompts: Any = None, responses: Any = None):
        """``prompts``, ``responses``: the files of the records it scores, named in its errors."""
        self.cfg = cfg
        self.id = cfg.scorer_id or self.default_id
        self.prompts, self.responses = prompts, responses

    title: str = ""
    """Title of score_by_rank.png."""

    @property
    def inputs(self) -> dict[str, str | None]:
        return {}

    @property
    def manifest(self) -> dict[str, Any]:
        """What the manifest records about the judge beyond ``judge``."""
        return {}

    def load(self, device) -> None:
        return None

    def check(self, prompts: list[Prompt]) -> None:
        return None

    def prepare(self, todo: Todo, run_dir: Path, shard: tuple[int, int], counts: Counter) -> None:
        return None

    def score(self, prompt: Prompt, responses: list[Response], counts: Counter, tel: Telemetry) -> list[Scored] | None:
        raise NotImplementedError


class RewardModelScorer(Scorer):
    """A trained reward model: the prompt is computed once and its key/value cache reused for every response."""

    judge, default_id = "reward_model", "rm"
    title = "Mean reward-model score at each rank (Xwin Fig. 5)"

    @property
    def inputs(self) -> dict[str, str | None]:
        return {"reward_model": self.cfg.reward_model}

    def load(self, device) -> None:
        from alignline.judges.reward import RewardModelJudge

        cfg = self.cfg
        self.judge_model = RewardModelJudge.load(cfg.reward_model, device=device, dtype=cfg.dtype,
                                                 trust_remote_code=cfg.trust_remote_code, max_length=cfg.max_length,
                                                 chunk=cfg.chunk)

    def score(self, prompt: Prompt, responses: list[Response], counts: Counter, tel: Telemetry) -> list[Scored] | None:
        """None when the prompt alone fills max_length (counted); responses beyond it are cut (counted)."""
        pid = prompt.id
        scores = self.judge_model.score(prompt.messages, [r.text for r in responses],
                                        [f"{self.responses}: prompt {pid} sample {r.sample_idx}" for r in responses],
                                        counts, tel)
        if scores is None:
            return None
        counts.setdefault("responses_cut", 0)  # the manifest says how many were cut, none included
        for r, s in zip(responses, scores):
            if not math.isfinite(s):
                raise DataError(f"the reward model gave a non-finite score ({s}) for prompt {pid} sample "
                                f"{r.sample_idx}; check the model ({self.cfg.reward_model})", path=self.responses)
        return [with_score(r, self.id, s) for r, s in zip(responses, scores)]


class VerifierScorer(Scorer):
    """The fraction of the prompt's verifiable instructions (``meta.instructions``) a response follows, strict."""

    judge, default_id = "verifier", "verifier"
    title = "Mean fraction of instructions followed at each rank"

    def check(self, prompts: list[Prompt]) -> None:
        from alignline.judges.verifiable import VerifierJudge

        self.verifier = VerifierJudge()
        missing = [p.id for p in prompts if not p.meta.get("instructions")]
        if missing:  # a clear error now, not mid-run
            raise DataError(f"judge=verifier needs verifiable instructions on every prompt it scores; {len(missing)} "
                            f"have none (first: '{missing[0]}'); attach them with prepare's instructions setting",
                            path=self.prompts, field="meta.instructions")

    def score(self, prompt: Prompt, responses: list[Response], counts: Counter, tel: Telemetry) -> list[Scored] | None:
        return [with_score(r, self.id, self.verifier.score(prompt, r.text)) for r in responses]


class EvaluatorScorer(Scorer):
    """An LLM evaluator, once per response and criterion; a response's score is the mean of its parsed criteria.

    All calls of a shard are made in :meth:`prepare` (batched, through the judge cache under
    ``<run>/evaluator/``, outside the top level where every .jsonl is read as ranked sets by the next stage)."""

    judge, default_id = "evaluator", "evaluator"

    @property
    def inputs(self) -> dict[str, str | None]:
        return {"evaluator": self.cfg.evaluator.model if self.cfg.evaluator.engine == "hf" else None}

    @property
    def title(self) -> str:
        return f"Mean evaluator score ({', '.join(self.cfg.criteria)}) at each rank"

    @property
    def manifest(self) -> dict[str, Any]:
        return {"template": EVALUATOR_VERSION, "criteria": self.cfg.criteria}

    def load(self, device) -> None:
        self.device = device if self.cfg.evaluator.engine == "hf" else None

    def prepare(self, todo: Todo, run_dir: Path, shard: tuple[int, int], counts: Counter) -> None:
        """Evaluate every response of the shard; failures go to ``evaluator/failures*.jsonl``. Raises when a call
        failed at the engine (a rerun retries only those)."""
        index, total = shard
        aux = run_dir / "evaluator"
        suffix = "" if total == 1 else f"-{index:03d}-of-{total:03d}"
        failures: list[dict] = []
        engine = LazyEngine(self.cfg.evaluator, device=self.device)
        try:
            with JudgeCache(aux / f"judge_cache{suffix}.jsonl") as cache:
                self.evaluation = evaluate_responses(self.cfg, todo, engine, cache, counts, failures)
        finally:
            engine.close()
        write_records(aux / f"failures{suffix}.jsonl", failures)
        if counts["evaluator_call_failures"]:
            raise AlignlineError(f"{counts['evaluator_call_failures']} evaluator calls failed at the engine "
                                 f"(see {aux / f'failures{suffix}.jsonl'}); run the same command again to retry "
                                 "only those (the rest come from the cache)")

    def score(self, prompt: Prompt, responses: list[Response], counts: Counter, tel: Telemetry) -> list[Scored] | None:
        """None when no response has a parsed criterion (counted)."""
        scored = evaluator_scored(responses, self.evaluation, self.id, counts)
        if not scored:
            counts["skipped_prompts_without_scores"] += 1
            return None
        return scored


def evaluate_responses(cfg: JudgeSettings, todo: Todo, engine, cache: JudgeCache, counts: Counter,
                       failures: list[dict]) -> Evaluation:
    """Every (response, criterion) of ``todo`` asked of the evaluator (uncached calls only); failures recorded."""
    jobs = [(p, r, c) for p, rs in todo for r in rs for c in cfg.criteria]
    texts = [evaluator_prompt(p.messages, r.text, c) for p, r, c in jobs]
    outputs, calls = ask_judge(engine, texts, cfg.evaluator_sampling, cache, judge_id=llm_judge_id(cfg.evaluator),
                               template_version=EVALUATOR_VERSION, batch_size=cfg.evaluator_batch_size)
    counts["evaluator_calls"] += calls
    out: Evaluation = defaultdict(dict)
    for (p, r, c), raw in zip(jobs, outputs):
        parsed = parse_evaluation(raw)
        out[(p.id, r.sample_idx)][c] = None if parsed is None else parsed.score
        if raw is None:
            counts["evaluator_call_failures"] += 1
            failures.append({"prompt_id": p.id, "sample_idx": r.sample_idx, "criterion": c,
                             "reason": "the evaluator call failed at the engine", "output": None})
        elif parsed is None:
            counts["evaluator_parse_failures"] += 1
            failures.append({"prompt_id": p.id, "sample_idx": r.sample_idx, "criterion": c,
                             "reason": diagnose_evaluation(raw), "output": raw[:2000]})
    return out


def evaluator_scored(responses: list[Response], evaluation: Evaluation, scorer: str, counts: Counter) -> list[Scored]:
    """Responses with the mean of their parsed criteria; one with no parsed criterion is left out."""
    out = []
    for r in responses:
        per = evaluation[(r.prompt_id, r.sample_idx)]
        ok = {c: v for c, v in per.items() if v is not None}
        if len(ok) < len(per):
            counts["responses_with_failed_criteria"] += 1
        if not ok:
            counts["responses_unscored"] += 1
            continue
        scores = {**dict(getattr(r, "scores", {}) or {}), scorer: sum(ok.values()) / len(ok),
                  **{f"{scorer}/{c}": v for c, v in ok.items()}}
        out.append(Scored(**r.model_dump(), scores=scores))
    return out


SCORERS: dict[str, type[Scorer]] = {s.judge: s for s in (RewardModelScorer, VerifierScorer, EvaluatorScorer)}


def make_scorer(cfg: JudgeSettings, *, prompts: Any = None, responses: Any = None) -> Scorer:
    """The scorer of ``cfg.judge`` (its section has already checked that the judge's settings are given);
    ``prompts``, ``responses``: the files of the records it scores, named in its errors."""
    return SCORERS[cfg.judge](cfg, prompts=prompts, responses=responses)
