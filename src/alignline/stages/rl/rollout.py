"""One rollout of ``alignline rl``: sample G responses per prompt, score them, take the no-grad passes,
compute advantages, write the shard.

A rollout is a :class:`Rollout`: per drawn prompt, its G :class:`RolloutRecord` (token ids, text, score and
reward, per-token advantages and, where the run needs them, the sampling policy's, the reference's and the
critic's per-token values). It is written as ``rollouts/iter-NNNNN.jsonl`` (one record per line, prompt-major)
in one atomic rename, after its statistics (``iter-NNNNN.stats.json``); a rerun reads an existing shard
instead of sampling again, so a resumed run trains on exactly the rollouts of the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from alignline.advantages import ESTIMATORS, KL_ESTIMATORS, Estimator, whiten
from alignline.data.io import atomic_write_bytes, atomic_write_json, iter_jsonl, jsonl_bytes
from alignline.data.records import Prompt
from alignline.errors import RewardFunctionError
from alignline.stages.common import console
from alignline.stages.rl.config import RLConfig, estimator_params
from alignline.stages.rl.sampling import RolloutSample, RolloutSampler
from alignline.train.groups import token_passes

_ONLY_WHEN_NEEDED = ("old_logps", "ref_logps", "old_values", "returns")


@dataclass
class RolloutRecord:
    """One sampled response of a rollout, as a line of its shard holds it."""

    iteration: int
    prompt_id: str
    sample_idx: int
    """Which of the prompt's G samples (seeded by it)."""
    prompt: list[int]
    """Prompt token ids (chat template applied)."""
    response: list[int]
    """Trained response token ids (an emitted end token included)."""
    text: str
    finish_reason: str
    score: float
    """The weighted reward terms minus the length penalty."""
    parts: dict[str, float]
    """Each reward term's value, by its label."""
    passed: bool | None
    """All of the prompt's verifiable instructions followed (strict); None without any."""
    old_logps: list[float] | None = None
    """The sampling policy's per-token log-probs (only when the run needs them)."""
    ref_logps: list[float] | None = None
    """The reference's per-token log-probs (kl.coef > 0)."""
    old_values: list[float] | None = None
    """The critic's per-token values at sampling (PPO)."""
    reward: float = 0.0
    """Total reward: the score plus any per-token KL penalty (kl.where: reward)."""
    advantages: list[float] = dataclasses.field(default_factory=list)
    """Per-token advantages from the estimator."""
    returns: list[float] | None = None
    """Per-token returns, the value loss's target (PPO)."""

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        return {k: v for k, v in row.items() if v is not None or k not in _ONLY_WHEN_NEEDED}


class ResponseRef(NamedTuple):
    """A plan item: response ``sample`` of the ``prompt``-th prompt drawn in ``iteration``."""

    iteration: int
    prompt: int
    sample: int


@dataclass
class Rollout:
    """One iteration's rollout: ``groups[p][g]`` is response g of the p-th drawn prompt."""

    iteration: int
    groups: list[list[RolloutRecord]]
    stats: dict
    """What ``iter-NNNNN.stats.json`` holds (and iterations.jsonl starts from)."""

    @property
    def records(self) -> list[RolloutRecord]:
        return [r for group in self.groups for r in group]

    def responses(self, refs: Sequence[ResponseRef]) -> list[RolloutRecord]:
        assert all(ref.iteration == self.iteration for ref in refs), "a plan item of another iteration"
        return [self.groups[ref.prompt][ref.sample] for ref in refs]


def draw_prompts(n_prompts: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """Indices of the prompts of ``iteration``: the prompts are walked through in a seeded order, reshuffled
    each time all have been drawn (so no prompt repeats before every other prompt was used)."""
    out = []
    for j in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, at = divmod(j, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[at])
    return out


def shard_path(root: Path, iteration: int) -> Path:
    return root / "rollouts" / f"iter-{iteration:05d}.jsonl"


def read_rollout(root: Path, iteration: int) -> Rollout | None:
    """The rollout of ``iteration`` from its shard (a prompt's group starts at its sample 0), None if unwritten."""
    path = shard_path(root, iteration)
    if not path.exists():
        return None
    stats = json.loads(path.with_suffix(".stats.json").read_text())
    groups: list[list[RolloutRecord]] = []
    for _, obj in iter_jsonl(path):
        record = RolloutRecord(**obj)
        if record.sample_idx == 0:
            groups.append([])
        groups[-1].append(record)
    return Rollout(iteration, groups, stats)


def write_rollout(root: Path, rollout: Rollout) -> None:
    path = shard_path(root, rollout.iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path.with_suffix(".stats.json"), rollout.stats)
    atomic_write_bytes(path, jsonl_bytes(r.to_json() for r in rollout.records))  # the completion marker, last


def padded(lists: Sequence[Sequence[float]], P: int, G: int, T: int) -> torch.Tensor:
    x = torch.zeros(P * G, T, dtype=torch.float64)
    for i, v in enumerate(lists):
        x[i, : len(v)] = torch.tensor(v, dtype=torch.float64)
    return x.view(P, G, T)


def advantages_for(estimator: Estimator, params: dict, groups: list[list[RolloutRecord]], kl_coef: float,
                   kl_name: str, kl_in_reward: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(advantages [P, G, T], returns or None, total rewards [P, G]) for one rollout. A KL penalty in the
    reward is ``-coef * kl_t`` at every token; the score sits at the last token."""
    P, G = len(groups), len(groups[0])
    records = [r for group in groups for r in group]
    lengths = [len(r.response) for r in records]
    T = max(lengths)
    mask = padded([[1.0] * n for n in lengths], P, G, T)
    token_rewards = torch.zeros(P * G, T, dtype=torch.float64)
    if kl_in_reward and kl_coef:
        kl = KL_ESTIMATORS[kl_name](padded([r.old_logps for r in records], P, G, T),
                                    padded([r.ref_logps for r in records], P, G, T))
        token_rewards -= kl_coef * (kl * mask).view(P * G, T)
    flat_scores = torch.tensor([r.score for r in records], dtype=torch.float64)
    token_rewards[torch.arange(P * G), torch.tensor(lengths) - 1] += flat_scores
    token_rewards = token_rewards.view(P, G, T)
    totals = token_rewards.sum(-1)
    values = padded([r.old_values for r in records], P, G, T) if estimator.critic else torch.zeros_like(mask)
    adv, returns = estimator.fn(totals, token_rewards, values, mask, **params)
    return adv, returns, totals


def group_stats(totals: torch.Tensor, passed: list[bool | None], lengths: list[int], finish: list[str]) -> dict:
    """Rollout statistics with counts and standard errors (zero-variance groups: None for groups of one)."""
    flat = totals.flatten()
    n = flat.numel()
    zero_var = int((totals.max(-1).values == totals.min(-1).values).sum()) if totals.shape[-1] > 1 else None
    checked = [p for p in passed if p is not None]
    rate = sum(checked) / len(checked) if checked else None
    return {
        "responses": n, "reward_mean": float(flat.mean()), "reward_std": float(flat.std()) if n > 1 else 0.0,
        "reward_se": float(flat.std() / math.sqrt(n)) if n > 1 else 0.0,
        "groups": totals.shape[0], "zero_variance_groups": zero_var,
        "zero_variance_share": None if zero_var is None else zero_var / totals.shape[0],
        "pass_rate": rate, "pass_rate_se": math.sqrt(rate * (1 - rate) / len(checked)) if checked else None,
        "pass_rate_n": len(checked),
        "response_length_mean": sum(lengths) / n, "cut_by_length": sum(f == "length" for f in finish),
    }


def guard_stats(records: Sequence[RolloutRecord], min_words: int) -> dict:
    """How often the short-answer guard fired: responses under the verifier's ``min_words`` (they score 0 on
    that term), and how many of them the verifier alone would have passed (what the guard took away)."""
    if not min_words:
        return {}
    short = [r for r in records if len(r.text.split()) < min_words]
    return {"under_min_words": len(short), "under_min_words_passed": sum(bool(r.passed) for r in short)}


def all_followed(prompt: Prompt, text: str) -> bool | None:
    """Whether ``text`` follows every verifiable instruction of ``prompt`` (strict), None without any."""
    from alignline.judges.verifiable import verify

    found = prompt.meta.get("instructions")
    return verify(text, found, "strict").all_followed if found else None


def progress_line(stats: dict, prompts: int, group_size: int) -> str:
    pass_rate = "" if stats["pass_rate"] is None else f", pass rate {stats['pass_rate']:.3f}"
    return (f"rl iteration {stats['iteration']}: reward {stats['reward_mean']:.4f} +- {stats['reward_se']:.4f}"
            f"{pass_rate}, "
            + ("" if group_size < 2 else f"zero-variance groups {stats['zero_variance_groups']}/{prompts}, ")
            + ("" if "under_min_words" not in stats else f"under min_words {stats['under_min_words']}, ")
            + f"{stats['rollout_tokens_per_s']:.0f} rollout tok/s")


@dataclass
class RolloutModels:
    """The models a rollout's no-grad passes run: the policy, the frozen reference and PPO's critic."""

    policy: torch.nn.Module
    ref: torch.nn.Module | None
    critic: torch.nn.Module | None


class RolloutSource:
    """Each iteration's rollout for the training loop. :meth:`start_iteration` is the loop's per-iteration hook:
    it reads the iteration's shard, or makes a new rollout from the weights the loop holds at that moment;
    :meth:`responses` gives the collate the records its plan items name."""

    def __init__(self, cfg: RLConfig, root: Path, prompts: list[Prompt], prompt_ids: list[list[int]],
                 sampler: RolloutSampler, models: RolloutModels, reward_fn: Callable, counts: Counter, tel):
        self.cfg, self.root, self.prompts, self.prompt_ids = cfg, root, prompts, prompt_ids
        self.sampler, self.models, self.reward_fn, self.counts, self.tel = sampler, models, reward_fn, counts, tel
        self.current: Rollout | None = None

    def start_iteration(self, iteration: int) -> None:
        self.current = read_rollout(self.root, iteration)
        if self.current is None:
            with self.tel.phase("rollout"):
                self.current = self.make(iteration)

    def responses(self, refs: Sequence[ResponseRef]) -> list[RolloutRecord]:
        assert self.current is not None, "start_iteration runs before the iteration's first micro-batch"
        return self.current.responses(refs)

    def make(self, iteration: int) -> Rollout:
        """Sample, score, pass, estimate, write: one new rollout."""
        cfg = self.cfg
        drawn = draw_prompts(len(self.prompts), cfg.rollout.prompts, cfg.train.seed, iteration)
        prompts, prompt_ids = [self.prompts[i] for i in drawn], [self.prompt_ids[i] for i in drawn]
        t0 = time.perf_counter()
        samples = self.sampler.sample(iteration, prompts, prompt_ids)
        t_sample = time.perf_counter() - t0
        groups = self.scored(iteration, prompts, prompt_ids, samples)
        t1 = time.perf_counter()
        old_logps_from = self.add_token_passes(groups, samples)
        t_pass = time.perf_counter() - t1
        totals = self.add_advantages(groups)
        records = [r for group in groups for r in group]
        lengths = [len(r.response) for r in records]
        stats = {"iteration": iteration, **group_stats(totals, [r.passed for r in records], lengths,
                                                       [r.finish_reason for r in records]),
                 **guard_stats(records, cfg.min_words_guard),
                 "rollout_tokens": sum(lengths), "rollout_seconds": t_sample,
                 "rollout_tokens_per_s": sum(lengths) / max(t_sample, 1e-9), "pass_seconds": t_pass,
                 "old_logps_from": old_logps_from}
        rollout = Rollout(iteration, groups, stats)
        write_rollout(self.root, rollout)
        self.counts["rollouts"] += 1
        console.print(progress_line(stats, cfg.rollout.prompts, cfg.rollout.group_size))
        return rollout

    def scored(self, iteration: int, prompts: list[Prompt], prompt_ids: list[list[int]],
               samples: list[list[RolloutSample]]) -> list[list[RolloutRecord]]:
        """The samples as records with their rewards (minus the length penalty) and verifier outcome."""
        penalty, max_new = self.cfg.length_penalty, self.cfg.rollout.sampling.max_new_tokens
        try:
            scores, parts = self.reward_fn(prompts, [[x.text for x in group] for group in samples])
        except RewardFunctionError as exc:
            exc.iteration = iteration
            raise
        return [[RolloutRecord(iteration=iteration, prompt_id=p.id, sample_idx=i, prompt=ids, response=x.ids,
                               text=x.text, finish_reason=x.finish_reason,
                               score=scores[pi][i] - penalty * len(x.ids) / max_new,
                               parts={k: v[pi][i] for k, v in parts.items()}, passed=all_followed(p, x.text))
                 for i, x in enumerate(group)]
                for pi, (p, ids, group) in enumerate(zip(prompts, prompt_ids, samples))]

    def add_token_passes(self, groups: list[list[RolloutRecord]], samples: list[list[RolloutSample]]) -> str | None:
        """Per-token old_logps, ref_logps, old_values as the run needs them; returns where old_logps came from
        (engine: with the tokens, no pass of the policy; pass; None: not needed)."""
        want_old = self.cfg.needs_old_logps
        records, sampled = [r for g in groups for r in g], [x.logprobs for g in samples for x in g]
        from_engine = want_old and all(v is not None for v in sampled)
        if from_engine:
            for r, v in zip(records, sampled):
                r.old_logps = v
        rows = [{"prompt": g[0].prompt, "responses": [r.response for r in g]} for g in groups]
        m = self.models
        passes = token_passes(m.policy, m.ref, m.critic, rows, pad_id=self.sampler.tokenizer.pad_token_id,
                              batch=self.cfg.rollout.pass_batch, want_old=want_old and not from_engine)
        for key, lists in passes.items():
            for r, v in zip(records, lists):
                setattr(r, key, v)
        return "engine" if from_engine else ("pass" if want_old else None)

    def add_advantages(self, groups: list[list[RolloutRecord]]) -> torch.Tensor:
        """Each record's reward, advantages (whitened over the rollout's tokens for PPO when asked) and returns;
        returns the total rewards [P, G]."""
        cfg = self.cfg
        est = ESTIMATORS[cfg.loss.estimator]
        adv, returns, totals = advantages_for(est, estimator_params(cfg), groups, cfg.kl.coef, cfg.kl.estimator,
                                              cfg.kl.where == "reward")
        if est.critic and cfg.ppo.whiten:
            lengths = [len(r.response) for g in groups for r in g]
            adv = whiten(adv, padded([[1.0] * n for n in lengths], len(groups), len(groups[0]), max(lengths)))
        for p, group in enumerate(groups):
            for g, r in enumerate(group):
                n = len(r.response)
                r.reward = float(totals[p, g])
                r.advantages = adv[p, g, :n].tolist()
                if returns is not None:
                    r.returns = returns[p, g, :n].tolist()
        return totals
