"""Reward functions of ``alignline rl``: plain callables, built from settings.

A reward function takes the iteration's prompts and, per prompt, its G response texts, and returns one float
per response::

    fn(prompts: Sequence[Prompt], responses: Sequence[Sequence[str]]) -> list[list[float]]

Built in: ``verifier`` (the share of the prompt's verifiable instructions the response follows, strict or
loose; :mod:`alignline.judges.verifiable`), ``rm`` (a reward model from ``alignline rm``, each prompt
prefilled once for its G responses, cut at ``max_length``, in the device's dtype:
:class:`alignline.judges.reward.RewardModelJudge`, as ``score`` scores), ``judge`` (an LLM evaluator's 2-10
score through the judge cache, keyed as ``score``'s evaluator is; :mod:`alignline.judges.evaluator`) and
``function`` (any
``module:callable`` with the signature above). :func:`combine` makes their weighted sum. Adding a reward
means writing such a callable; the stage and the loop do not change.
"""

from __future__ import annotations

import importlib
import math
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignline.config import Section
from alignline.data.records import Prompt
from alignline.errors import ConfigError, DataError, RewardFunctionError
from alignline.generate.base import SamplingParams
from alignline.generate.engines import EngineSettings

RewardFn = Callable[[Sequence[Prompt], Sequence[Sequence[str]]], list[list[float]]]


class RewardSpec(Section):
    """One reward term; the stage's reward is the weighted sum of its terms."""

    type: Literal["verifier", "rm", "judge", "function"] = "verifier"
    """verifier: share of the prompt's verifiable instructions followed; rm: a reward model's score; judge: an
    LLM evaluator's 2-10 score (judge cache); function: a Python callable ``module:name``."""
    weight: float = 1.0
    """Weight of this term in the sum."""
    mode: Literal["strict", "loose"] = "strict"
    """verifier: strict or loose checking (see judges/verifiable.py)."""
    min_words: int = Field(0, ge=0)
    """verifier: a response of fewer words scores 0. The instructions constrain an answer; a near-empty reply
    ("<<my title>>") follows most of them vacuously, and that is the first thing a small policy learns."""
    model: str | None = None
    """rm: the reward model directory (from ``alignline rm``)."""
    max_length: int = Field(4096, gt=8)
    """rm: prompt + response beyond this many tokens: the response is cut before scoring (counted)."""
    judge: EngineSettings | None = None
    """judge: the evaluator's engine (hf model in process, or an OpenAI-compatible server)."""
    criterion: str = "instruction_following"
    """judge: the evaluator criterion (judges/evaluator.py CRITERIA)."""
    judge_sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0, max_new_tokens=256))
    """judge: sampling of the evaluator (greedy by default, so the cache is reused)."""
    judge_failure_score: float = 2.0
    """judge: reward of a response whose evaluation could not be parsed (counted)."""
    function: str | None = None
    """function: ``package.module:callable`` taking (prompts, responses per prompt) and returning floats."""

    @model_validator(mode="after")
    def _needs(self):
        """The setting each type needs, checked with the config (so --dry-run sees it)."""
        needed = {"rm": ("model", "the reward model directory (from alignline rm)"),
                  "judge": ("judge", "the evaluator's engine settings (engine, model, ...)"),
                  "function": ("function", "'package.module:callable'")}.get(self.type)
        if needed and getattr(self, needed[0]) is None:
            raise ValueError(f"type={self.type} needs {needed[0]}: give {needed[1]}")
        return self

    def label(self) -> str:
        return {"verifier": f"verifier_{self.mode}", "rm": "rm", "judge": f"judge_{self.criterion}",
                "function": (self.function or "function").rsplit(":", 1)[-1]}[self.type]


def verifier_reward(mode: str = "strict", min_words: int = 0) -> RewardFn:
    from alignline.judges.verifiable import VerifierJudge

    judge = VerifierJudge(mode)

    def score(prompt, text: str) -> float:
        return judge.score(prompt, text) if len(text.split()) >= min_words else 0.0

    def reward(prompts, responses):
        return [[score(p, text) for text in texts] for p, texts in zip(prompts, responses, strict=True)]

    return reward


def rm_reward(spec: RewardSpec, where: str, counts: Counter, device=None) -> RewardFn:
    """The reward model's score (:class:`alignline.judges.reward.RewardModelJudge`, the one ``score`` uses too)."""
    from alignline.judges.reward import RewardModelJudge

    assert spec.model is not None  # (RewardSpec._needs)
    judge = RewardModelJudge.load(spec.model, device=device, max_length=spec.max_length)

    def reward(prompts, responses):
        out = []
        for p, texts in zip(prompts, responses, strict=True):
            scores = judge.score(p.messages, texts, [f"prompt {p.id}"] * len(texts), counts)
            if scores is None:
                raise ConfigError(f"{where}.max_length: prompt '{p.id}' alone fills its {spec.max_length} tokens, "
                                  "leaving the reward model no room for the response; raise it above the longest "
                                  "prompt (in the reward model's tokens)")
            out.append(scores)
        return out

    return reward


def judge_reward(spec: RewardSpec, cache_path: Path, counts: Counter) -> RewardFn:
    from alignline.generate.engines import LazyEngine
    from alignline.judges.cache import JudgeCache, ask_judge, llm_judge_id
    from alignline.judges.evaluator import EVALUATOR_VERSION, evaluator_prompt, parse_evaluation

    assert spec.judge is not None  # (RewardSpec._needs)
    engine = LazyEngine(spec.judge)
    judge_id = llm_judge_id(spec.judge)

    def reward(prompts, responses):
        texts = [evaluator_prompt(p.messages, t, spec.criterion) for p, ts in zip(prompts, responses) for t in ts]
        with JudgeCache(cache_path) as cache:
            outputs, calls = ask_judge(engine, texts, spec.judge_sampling, cache, judge_id=judge_id,
                                       template_version=EVALUATOR_VERSION)
        counts["judge_calls"] = counts.get("judge_calls", 0) + calls
        flat = []
        for out in outputs:
            parsed = parse_evaluation(out)
            if parsed is None:
                counts["judge_parse_failures"] = counts.get("judge_parse_failures", 0) + 1
            flat.append(spec.judge_failure_score if parsed is None else parsed.score)
        it = iter(flat)
        return [[next(it) for _ in ts] for ts in responses]

    return reward


def import_function(dotted: str, setting: str) -> RewardFn:
    module_name, _, name = dotted.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{setting}: cannot import '{dotted}' ({exc}); give 'package.module:callable' on the "
                          "Python path") from None
    if not callable(fn):
        raise ConfigError(f"{setting}: '{dotted}' is not callable")
    return user_function(dotted, fn)


def user_function(dotted: str, fn: RewardFn) -> RewardFn:
    """``fn`` whose exceptions become a :class:`RewardFunctionError` naming ``dotted``, the prompt it failed on
    and the function's own traceback lines. To find the prompt, a call that raised is repeated on each prompt
    alone, in order (a function whose failure depends on more than its input may not fail again: then the
    error names every prompt of the call)."""

    def reward(prompts, responses):
        try:
            return fn(prompts, responses)
        except Exception as exc:  # noqa: BLE001 (the user's code: any error, reported with its own traceback)
            culprit = _failing_prompt(fn, prompts, responses)
            ids = [p.id for p in prompts]
            where = (f"on prompt '{culprit}'" if culprit is not None else
                     "on the prompts " + ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else ""))
            raise RewardFunctionError(dotted, where, f"{type(exc).__name__}: {exc}", _user_traceback(exc)) from None

    return reward


def _failing_prompt(fn: RewardFn, prompts, responses) -> str | None:
    if len(prompts) == 1:
        return prompts[0].id
    for p, texts in zip(prompts, responses):
        try:
            fn([p], [texts])
        except Exception:  # noqa: BLE001 (the search for the prompt the user's function fails on)
            return p.id
    return None


def _user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback from the user's function down (this module's frame left out)."""
    tb = traceback.TracebackException.from_exception(exc)
    frames = [f for f in tb.stack if Path(f.filename).resolve() != Path(__file__).resolve()]
    return ("Traceback (most recent call last):\n" + "".join(traceback.StackSummary.from_list(frames).format())
            + "".join(tb.format_exception_only())).rstrip("\n")


def build_reward(spec: RewardSpec, index: int, *, out_dir: Path, counts: Counter, device=None) -> RewardFn:
    """The callable for one term (checks its settings first: errors name ``reward[i].setting``)."""
    where = f"reward[{index}]"
    if spec.type == "verifier":
        return verifier_reward(spec.mode, spec.min_words)
    if spec.type == "rm":  # (the settings each type needs: RewardSpec._needs)
        assert spec.model is not None
        if not Path(spec.model).exists():
            raise ConfigError(f"{where}.model: reward model '{spec.model}' does not exist; train one with "
                              "alignline rm or fix the path")
        return rm_reward(spec, where, counts, device=device)
    if spec.type == "judge":
        return judge_reward(spec, out_dir / f"judge_cache_{index}.jsonl", counts)
    assert spec.function is not None
    return import_function(spec.function, f"{where}.function")


def combine(terms: Sequence[tuple[str, float, RewardFn]]) -> Callable[..., tuple[list[list[float]], dict]]:
    """The weighted sum of ``(label, weight, fn)`` terms: returns (rewards per prompt, {label: per-prompt
    values}). A term that returns a non-finite value or the wrong shape is an error naming it."""

    def reward(prompts, responses):
        parts = {}
        total = [[0.0] * len(ts) for ts in responses]
        for label, weight, fn in terms:
            values = fn(prompts, responses)
            if len(values) != len(responses) or any(len(v) != len(ts) for v, ts in zip(values, responses)):
                raise DataError(f"reward '{label}' returned the wrong shape", field="reward",
                                expected="one list of G floats per prompt")
            for p, v in zip(prompts, values):
                bad = [x for x in v if not isinstance(x, int | float) or not math.isfinite(x)]
                if bad:
                    raise DataError(f"reward '{label}' returned {bad[0]!r} for prompt '{p.id}'", field="reward",
                                    expected="a finite number for every response (check the reward function)")
            parts[label] = values
            for row, v in zip(total, values):
                for j, x in enumerate(v):
                    row[j] += weight * float(x)
        return total, parts

    return reward
