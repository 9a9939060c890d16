"""Pairwise win rate against a reference system (AlpacaEval / Arena-Hard style), raw and length-controlled.

Outcome of one prompt. The judge sees every prompt twice: the model's output as response A and the
reference's as B, then the other way round. Each order gives a *vote*: ``model`` or ``reference`` (the
side the verdict names), or ``tie`` when the verdict's degree is one of ``tie_degrees`` (default
``["unsure"]``: the template tells the judge to say "unsure" when it cannot tell). The prompt is a

* win (1) when both votes are ``model``,
* loss (0) when both votes are ``reference``,
* tie (0.5) otherwise: the two orders disagree (position bias) or either vote is ``tie``.

A prompt whose judge output in either order cannot be parsed, or whose judge call failed at the engine,
is a *failure*: counted, listed, reported with its rate and excluded from every score. A prompt where the
model's or the reference's own response failed at its engine is excluded the same way (counted apart).

Win rate = 100 * mean outcome over the judged prompts; its standard error is
100 * sd(outcomes, ddof=1) / sqrt(n) (the usual standard error of a mean; None below two prompts).

Length control, in the manner of AlpacaEval 2.0 (Dubois et al., 2024). Judges favour longer answers, so
the raw win rate mixes quality with verbosity. Per judged prompt i let ``d_i`` = len(model output) -
len(reference output) in **characters** (tokenizer-free, so it is the same for every judge and engine),
``x_i = tanh(d_i / sd(d))`` (population sd over the judged prompts; ``x = 0`` when sd is 0: no length
variation to explain) and ``y_i`` the outcome (ties are targets of 0.5, the same as half a win and half a
loss). We fit ``P(model wins) = sigmoid(theta + phi * x)`` by maximum likelihood with a small L2 penalty
``lam / 2 * (theta^2 + phi^2)`` (default ``lam = 1e-3``): the negative log-likelihood
``sum(log(1 + exp(z)) - y * z)`` with ``z = theta + phi * x`` is convex in (theta, phi), so Newton's method
(IRLS) with gradient ``X^T (p - y) + lam * w`` and Hessian ``X^T diag(p (1 - p)) X + lam * I`` (``X`` has
the columns 1 and x) converges; a backtracking line search keeps every step downhill. The penalty only
matters when the outcomes are *separable* (all wins, all losses, or a length threshold with every win on
one side, every loss on the other and every tie exactly on it; :func:`separable`): the likelihood then has
no maximum, the penalty keeps the fit finite, and the result is flagged ``separable``, because the
length-controlled number is then not meaningful (typical of a handful of prompts). The LC win
rate is the model's predicted win rate with the length term zeroed, averaged over prompts:
``mean_i 100 * sigmoid(theta)`` = ``100 * sigmoid(theta)`` (this model has no per-prompt term).

Export: both systems' outputs in AlpacaEval's format, a JSON list of ``{instruction, output, generator}``
(``instruction`` is the single user message, or the rendered conversation for multi-turn or system
prompts), so ``alpaca_eval --model_outputs model_outputs.json --reference_outputs reference_outputs.json``
can judge the same data with its own annotators.

Systems. A compared system (and the model of ``eval verifiable``) is either a file of Response records
(from ``alignline sample``; per prompt the first response by ``sample_idx`` whose status is ok, else the
first one) or an engine (:class:`~alignline.generate.engines.EngineSettings`) that answers now; generated
responses are saved with a fingerprint of (engine settings, model files, sampling, prompts) and reused
by a rerun with the same fingerprint, unless some of them failed at the engine (then a rerun generates
them again).
"""

from __future__ import annotations

import gc
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from alignline.data.io import atomic_write_text, fingerprint, read_records, write_records
from alignline.data.records import Prompt, Response
from alignline.errors import ConfigError, DataError
from alignline.generate.base import SamplingParams
from alignline.generate.engines import EngineSettings
from alignline.judges.pairwise import PairwiseVerdict, render_conversation

#: Votes of one judged order.
MODEL, REFERENCE, TIE = "model", "reference", "tie"

# ---------------------------------------------------------------------------------------------------------
# Outcomes and the raw win rate
# ---------------------------------------------------------------------------------------------------------


def order_vote(verdict: PairwiseVerdict, model_position: str, tie_degrees: Sequence[str]) -> str:
    """The vote of one order: ``tie`` for a degree in ``tie_degrees``, else the side the verdict names."""
    if verdict.degree in tie_degrees:
        return TIE
    return MODEL if verdict.winner == model_position else REFERENCE


def prompt_outcome(votes: Sequence[str]) -> float:
    """1 when every vote is ``model``, 0 when every vote is ``reference``, else 0.5 (a tie)."""
    if not votes:
        raise ValueError("a prompt outcome needs at least one vote")
    if all(v == MODEL for v in votes):
        return 1.0
    if all(v == REFERENCE for v in votes):
        return 0.0
    return 0.5


def win_rate(outcomes: Sequence[float]) -> tuple[float | None, float | None]:
    """(win rate in percent, its standard error in percent); None where undefined (no / one outcome)."""
    y = np.asarray(outcomes, dtype=float)
    if y.size == 0:
        return None, None
    se = float(100 * y.std(ddof=1) / math.sqrt(y.size)) if y.size > 1 else None
    return float(100 * y.mean()), se


# ---------------------------------------------------------------------------------------------------------
# Length-controlled win rate
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthFit:
    """The fitted length model ``P(win) = sigmoid(theta + phi * tanh(len_diff / scale))``."""

    theta: float
    phi: float
    scale: float  # sd of len_diff (0: no length variation, the length term is off)
    lam: float
    iterations: int
    separable: bool
    lc_win_rate: float  # percent

    def as_dict(self) -> dict:
        return asdict(self)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def _penalised_nll(w: np.ndarray, X: np.ndarray, y: np.ndarray, lam: float) -> float:
    z = X @ w
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * lam * w @ w)


def separable(x: Sequence[float], y: Sequence[float]) -> bool:
    """Whether the outcomes can be fitted perfectly in the limit, so the likelihood has no maximum.

    That is a direction (theta, phi) != 0 along which no prompt's fit gets worse and some prompt's gets
    better. In one dimension: a boundary b with every win at x >= b, every loss at x <= b and every tie
    (any target strictly between 0 and 1) exactly at b, and some prompt off b, or the mirror image; all
    wins or all losses (without ties) also qualify."""
    pts = [(float(a), float(b)) for a, b in zip(x, y)]
    ties = {a for a, b in pts if 0.0 < b < 1.0}
    if not pts or len(ties) > 1:
        return False
    for sign in (1.0, -1.0):
        wins = [sign * a for a, b in pts if b >= 1.0]
        losses = [sign * a for a, b in pts if b <= 0.0]
        lo, hi = max(losses, default=-math.inf), min(wins, default=math.inf)
        if not ties and lo < hi:
            return True  # a strict separator (or a boundary beyond every prompt: all wins / all losses)
        b = sign * next(iter(ties)) if ties else lo
        if lo <= b <= hi and (any(w > b for w in wins) or any(v < b for v in losses)):
            return True
    return False


def fit_length_model(outcomes: Sequence[float], len_diffs: Sequence[float], lam: float = 1e-3,
                     max_iter: int = 200, tol: float = 1e-10) -> LengthFit | None:
    """Newton/IRLS fit of ``theta, phi`` (see the module docstring); None when there are no outcomes."""
    y = np.asarray(outcomes, dtype=float)
    d = np.asarray(len_diffs, dtype=float)
    if y.size == 0:
        return None
    if y.shape != d.shape:
        raise ValueError(f"{y.size} outcomes but {d.size} length differences")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    scale = float(d.std())
    x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
    X = np.column_stack([np.ones_like(x), x])
    w = np.zeros(2)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        p = _sigmoid(X @ w)
        grad = X.T @ (p - y) + lam * w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + lam * np.eye(2)
        # lstsq: with lam = 0 and x all 0 the Hessian is singular (phi is not identified); take the min-norm step
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        f0, t = _penalised_nll(w, X, y, lam), 1.0
        while _penalised_nll(w - t * step, X, y, lam) > f0 - 1e-4 * t * float(grad @ step) and t > 1e-12:
            t *= 0.5
        w = w - t * step
        if np.max(np.abs(t * step)) < tol:
            break
    theta, phi = float(w[0]), float(w[1])
    return LengthFit(theta=theta, phi=phi, scale=scale, lam=lam, iterations=it, separable=separable(x, y),
                     lc_win_rate=float(100 * _sigmoid(np.array(theta))))


# ---------------------------------------------------------------------------------------------------------
# AlpacaEval export
# ---------------------------------------------------------------------------------------------------------


def instruction_text(prompt: Prompt) -> str:
    """AlpacaEval's ``instruction``: the user message of a one-turn prompt, else the rendered conversation."""
    if len(prompt.messages) == 1:
        return prompt.messages[0].content
    return render_conversation(prompt.messages)


def alpaca_eval_records(prompts: Sequence[Prompt], outputs: dict[str, str], generator: str) -> list[dict]:
    """``[{instruction, output, generator}]`` for the prompts (in order) that have an output."""
    return [{"instruction": instruction_text(p), "output": outputs[p.id], "generator": generator}
            for p in prompts if p.id in outputs]


# ---------------------------------------------------------------------------------------------------------
# Systems: responses from a file, or generated now
# ---------------------------------------------------------------------------------------------------------


def default_eval_sampling() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=512)


class SystemSettings(EngineSettings):
    """A system under evaluation: a file of its responses, or an engine that answers now (set one of the two)."""

    model: str | None = None
    """Generate now: hf: a local HF checkpoint dir, .gguf file or alias; openai: the served model name."""
    responses: str | None = None
    """Use existing Response records (a file or a shard directory from ``alignline sample``); per prompt the
    first response by sample_idx whose status is ok (else the first one)."""
    name: str | None = None
    """Display and AlpacaEval ``generator`` name (default: the model, or the responses' most common source)."""
    sampling: SamplingParams = Field(default_factory=default_eval_sampling)
    """Sampling when generating now (default greedy, 512 new tokens)."""


def check_system(side: SystemSettings, label: str) -> None:
    """A ConfigError unless exactly one of ``responses`` and ``model`` is set."""
    if (side.responses is None) == (side.model is None):
        both = "both are set" if side.responses else "neither is set"
        raise ConfigError(f"{label}: set exactly one of {label}.responses (a Response file from alignline sample) "
                          f"and {label}.model (generate now with {label}.engine); {both}")


def engine_settings(side: SystemSettings) -> EngineSettings:
    return EngineSettings.model_validate(side.model_dump(include=set(EngineSettings.model_fields)))


def system_name(side: SystemSettings, responses: Sequence[Response]) -> str:
    if side.name:
        return side.name
    if side.model:
        return side.model
    sources = Counter(r.source for r in responses)
    return sources.most_common(1)[0][0] if sources else Path(side.responses or "responses").name


def _ids(ids: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def pick_responses(prompts: Sequence[Prompt], responses: Sequence[Response], where: str,
                   known_ids: set[str], label: str = "the") -> dict[str, Response]:
    """One response per prompt (first ok by sample_idx, else the first); DataErrors name ``where`` and ids.

    ``known_ids`` are all ids of the prompts file: responses to other prompts are an error (a file sampled
    from another prompt set), and every prompt in ``prompts`` must have a response."""
    if not responses:
        raise DataError(f"{label} responses: the file holds no Response records", path=where,
                        expected="one response per prompt (the output of alignline sample on the prompts file)")
    unknown = sorted({r.prompt_id for r in responses} - known_ids)
    if unknown:
        raise DataError(f"{label} responses: {len(unknown)} prompt id(s) are not in the prompts file: "
                        f"{_ids(unknown)}", path=where, field="prompt_id",
                        expected="responses sampled from the same prompts file")
    best: dict[str, Response] = {}
    for r in responses:
        cur = best.get(r.prompt_id)
        if cur is None or (r.status == "ok", -r.sample_idx) > (cur.status == "ok", -cur.sample_idx):
            best[r.prompt_id] = r
    missing = [p.id for p in prompts if p.id not in best]
    if missing:
        raise DataError(f"{label} responses: no response for {len(missing)} of the {len(prompts)} prompts evaluated: "
                        f"{_ids(missing)}",
                        path=where, field="prompt_id",
                        expected="a response for every prompt (sample the same prompts file, or lower max_prompts)")
    return {p.id: best[p.id] for p in prompts}


def generate_responses(side: SystemSettings, label: str, prompts: Sequence[Prompt], out_dir: Path,
                       build: Callable[[EngineSettings], object]) -> tuple[list[Response], str]:
    """Responses of ``side``'s engine, saved as ``<label>_responses.jsonl`` and reused when nothing changed.

    Returns (responses, path). ``build`` makes the engine (``build_engine``; tests pass a fake)."""
    settings = engine_settings(side)
    path = out_dir / f"{label}_responses.jsonl"
    stamp = out_dir / f"{label}_responses.fingerprint"
    key = fingerprint({"engine": settings.model_dump(mode="json"), "model_files": fingerprint(str(settings.model)),
                       "sampling": side.sampling.model_dump(mode="json"),
                       "prompts": [p.model_dump(mode="json") for p in prompts]})
    if path.exists() and stamp.exists() and stamp.read_text().strip() == key:
        return read_records(path, Response), str(path)
    stamp.unlink(missing_ok=True)
    engine = build(settings)
    rows = engine.generate(list(prompts), 1, side.sampling)
    responses = [row[0] for row in rows]
    del engine, rows
    gc.collect()  # a second in-process model (the other system, the judge) may follow
    name = side.name or settings.model
    for r in responses:
        r.source = name
    write_records(path, responses)
    if all(r.status == "ok" for r in responses):  # else a rerun generates again (retrying the failures)
        atomic_write_text(stamp, key + "\n")
    return responses, str(path)


def system_responses(side: SystemSettings, label: str, prompts: Sequence[Prompt], known_ids: set[str],
                     out_dir: Path, build: Callable[[EngineSettings], object]) -> tuple[dict[str, Response], str]:
    """(one response per prompt, the system's name) from ``side``'s file or engine."""
    check_system(side, label)
    if side.responses is not None:
        responses = read_records(side.responses, Response)
        where = side.responses
    else:
        responses, where = generate_responses(side, label, prompts, out_dir, build)
    return pick_responses(prompts, responses, where, known_ids, label), system_name(side, responses)
