"""``alignline select``: training data from ranked sets (Xwin-Set).

* ``mode: rs``: the response at rank ``rank`` (default the top-1) becomes the last assistant turn of a
  Conversation (rejection-sampling fine-tuning data; train with ``alignline rs``).
* ``mode: pairs``: DPO pairs, chosen = rank ``rank`` (default top-1), rejected by ``strategy``:
  - ``fixed_rank``: rank ``rejected_rank``;
  - ``policy_matched`` (Xwin): the rank whose mean score over all sets is closest to the mean score of the
    current policy's own samples (``policy_scores``: ranked sets of the policy's samples on ``policy_prompts``
    prompts, scored by the same reward model; paper: 500 prompts);
  - ``best_worst``: rank 1 vs the last rank;
  - ``rso``: statistical rejection sampling (Liu et al. 2023): candidates are drawn in a seeded random
    order and accepted with probability ``exp((r - max r) / rso_beta)`` until ``rso_accept`` are accepted;
    the accepted ones are paired by reward order (best with worst, then the next ones).
Pairs with equal scores are dropped and counted.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.config import Section
from alignline.data.io import atomic_write_json, read_records, write_records
from alignline.data.records import Conversation, Pair, RankedSet
from alignline.errors import ConfigError, DataError
from alignline.stages.common import RunDir, console


class SelectConfig(Section):
    """Configuration of ``alignline select``."""

    ranked: str
    """Ranked sets from ``alignline score`` (a shard directory or file)."""
    output_dir: str = "runs/select"
    """Writes rs.jsonl (mode rs) or pairs.jsonl (mode pairs), selection.json and manifest.json."""
    mode: Literal["rs", "pairs"] = "pairs"
    """rs: one conversation per prompt; pairs: one preference pair per prompt (more for rso)."""
    rank: int = Field(1, ge=1)
    """The rank taken for RS, or as the chosen response of a pair."""
    strategy: Literal["fixed_rank", "policy_matched", "best_worst", "rso"] = "policy_matched"
    """How the rejected response is picked (pairs mode)."""
    rejected_rank: int | None = Field(None, ge=1)
    """fixed_rank: the rejected response's rank."""
    policy_scores: str | None = None
    """policy_matched: ranked sets of the current policy's own samples, scored by the same reward model."""
    policy_prompts: int = Field(500, ge=1)
    """policy_matched: use the first this many prompts of policy_scores (paper: 500)."""
    rso_beta: float = Field(0.5, gt=0)
    """rso: temperature of the acceptance probability exp((r - max r) / beta)."""
    rso_accept: int = Field(2, ge=2)
    """rso: accepted samples per prompt (paired best-with-worst)."""
    seed: int = 0
    """Seed of the rso draws."""


def _scores(rs: RankedSet) -> list[float]:
    return [r.scores[rs.scorer] for r in rs.responses]


def mean_score_by_rank(sets: list[RankedSet]) -> list[float]:
    """Mean score at each rank 1..N (N: the smallest set size)."""
    n = min(len(s.responses) for s in sets)
    return [sum(_scores(s)[k] for s in sets) / len(sets) for k in range(n)]


def policy_matched_rank(sets: list[RankedSet], policy_mean: float, chosen_rank: int) -> int:
    """The rank below ``chosen_rank`` whose mean score is closest to the policy's mean score."""
    means = mean_score_by_rank(sets)
    candidates = range(chosen_rank, len(means))  # 0-based indices of ranks chosen_rank+1..N
    if not candidates:
        raise ConfigError(f"no rank below rank={chosen_rank} in sets of {len(means)} responses")
    return 1 + min(candidates, key=lambda k: (abs(means[k] - policy_mean), k))


def rso_pairs(rs: RankedSet, beta: float, accept: int, rng: random.Random) -> list[tuple[int, int]]:
    """Indices (into rs.responses) of (chosen, rejected) pairs drawn by statistical rejection sampling."""
    scores = _scores(rs)
    top = max(scores)
    accepted: list[int] = []
    order = list(range(len(scores)))
    for _ in range(20):  # bounded: passes over the candidates
        rng.shuffle(order)
        for i in order:
            if i not in accepted and rng.random() < math.exp((scores[i] - top) / beta):
                accepted.append(i)
                if len(accepted) == accept:
                    break
        if len(accepted) == accept:
            break
    accepted.sort(key=lambda i: -scores[i])
    return [(accepted[j], accepted[-1 - j]) for j in range(len(accepted) // 2)]


def _pair(rs: RankedSet, ci: int, ri: int, strategy: str) -> Pair:
    c, r = rs.responses[ci], rs.responses[ri]
    return Pair(id=f"{rs.prompt.id}#{c.sample_idx}-{r.sample_idx}", prompt=rs.prompt.messages, chosen=c.text,
                rejected=r.text, provenance={
                    "strategy": strategy, "chosen_rank": c.rank, "rejected_rank": r.rank,
                    "chosen_score": c.scores[rs.scorer], "rejected_score": r.scores[rs.scorer],
                    "chosen_source": c.source, "rejected_source": r.source, "scorer": rs.scorer})


def run(cfg: SelectConfig) -> Path:
    rd = RunDir("select", cfg, cfg.output_dir, {"ranked": cfg.ranked, "policy_scores": cfg.policy_scores})
    if rd.up_to_date():
        console.print(f"[green]select: {rd.path} is up to date[/green]; nothing to do")
        return rd.path
    rd.start()
    sets = read_records(cfg.ranked, RankedSet)
    if not sets:
        raise DataError("no ranked sets", path=cfg.ranked)
    n_min = min(len(s.responses) for s in sets)
    counts: Counter = Counter(ranked_sets=len(sets))
    info: dict = {"mean_score_by_rank": mean_score_by_rank(sets)}
    if cfg.rank > n_min:
        raise ConfigError(f"rank={cfg.rank} but the smallest ranked set has {n_min} responses; pick rank <= {n_min}")
    if cfg.mode == "rs":
        convs = [Conversation(id=s.prompt.id, messages=[*s.prompt.messages, {"role": "assistant",
                              "content": s.responses[cfg.rank - 1].text}],
                              meta={"rank": cfg.rank, "score": _scores(s)[cfg.rank - 1], "scorer": s.scorer})
                 for s in sets]
        write_records(rd.path / "rs.jsonl", convs)
        counts["conversations"] = len(convs)
    else:
        rejected_rank = None
        if cfg.strategy == "fixed_rank":
            if cfg.rejected_rank is None:
                raise ConfigError("strategy=fixed_rank needs rejected_rank (e.g. rejected_rank=32)")
            rejected_rank = cfg.rejected_rank
        elif cfg.strategy == "best_worst":
            rejected_rank = n_min
        elif cfg.strategy == "policy_matched":
            if cfg.policy_scores is None:
                raise ConfigError("strategy=policy_matched needs policy_scores: ranked sets of the current policy's "
                                  "own samples scored by the same reward model")
            policy = read_records(cfg.policy_scores, RankedSet)[: cfg.policy_prompts]
            all_scores = [x for s in policy for x in _scores(s)]
            if not all_scores:
                raise DataError("no scored responses", path=cfg.policy_scores)
            info["policy_mean_score"] = sum(all_scores) / len(all_scores)
            info["policy_prompts"] = len(policy)
            rejected_rank = policy_matched_rank(sets, info["policy_mean_score"], cfg.rank)
        if rejected_rank is not None:
            if rejected_rank > n_min:
                raise ConfigError(f"rejected rank {rejected_rank} but the smallest ranked set has {n_min} responses")
            if rejected_rank == cfg.rank:
                raise ConfigError(f"the rejected rank equals the chosen rank ({cfg.rank})")
            info["rejected_rank"] = rejected_rank
        rng = random.Random(cfg.seed)
        pairs = []
        for s in sets:
            idx = rso_pairs(s, cfg.rso_beta, cfg.rso_accept, rng) if cfg.strategy == "rso" \
                else [(cfg.rank - 1, rejected_rank - 1)]
            if not idx:
                counts["rso_not_enough_accepted"] += 1
            for ci, ri in idx:
                sc = _scores(s)
                if sc[ci] == sc[ri] or s.responses[ci].text.strip() == s.responses[ri].text.strip():
                    counts["dropped_ties"] += 1
                    continue
                pairs.append(_pair(s, ci, ri, cfg.strategy))
        write_records(rd.path / "pairs.jsonl", pairs)
        counts["pairs"] = len(pairs)
    atomic_write_json(rd.path / "selection.json", info)
    rd.finish(counts, selection=info)
    console.print(f"[green]select done[/green] ({cfg.mode}{'' if cfg.mode == 'rs' else ', ' + cfg.strategy}): "
                  f"{dict(counts)}" + (f", rejected rank {info['rejected_rank']}" if "rejected_rank" in info else "")
                  + f"\n  output: {rd.path}")
    return rd.path
