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
    the accepted ones are paired by reward order (best with worst, then the next ones);
  - ``matrix`` (TSO): per prompt a chosen member drawn from the model matrix's positive mixture and a rejected
    member from its negative mixture (:mod:`alignline.matrix`), mixed with the policy's own best-vs-worst pairs
    from ``ranked`` at ``self_ratio`` (:func:`alignline.matrix.mix_counts`).
Pairs with equal scores are dropped and counted.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import atomic_write_json, read_prompts, read_records, write_records
from alignline.data.records import Conversation, Pair, RankedSet
from alignline.errors import ConfigError, DataError
from alignline.matrix import (
    MatrixConfig,
    draw_pair,
    load_matrix,
    load_member_responses,
    mix_counts,
    normalise,
    prompt_rng,
)
from alignline.stages.common import RunDir, console


class SelectConfig(Section):
    """Configuration of ``alignline select``."""

    ranked: str | None = None
    """Ranked sets from ``alignline score`` (a shard directory or file); strategy matrix: the policy's own
    scored samples, the source of its best-vs-worst self pairs (optional when self_ratio is 0)."""
    output_dir: str = "runs/select"
    """Writes rs.jsonl (mode rs) or pairs.jsonl (mode pairs), selection.json and manifest.json."""
    mode: Literal["rs", "pairs"] = "pairs"
    """rs: one conversation per prompt; pairs: one preference pair per prompt (more for rso)."""
    rank: int = Field(1, ge=1)
    """The rank taken for RS, or as the chosen response of a pair."""
    strategy: Literal["fixed_rank", "policy_matched", "best_worst", "rso", "matrix"] = "policy_matched"
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
    matrix: str | None = None
    """matrix: the model-matrix YAML (members, positive and negative source sets; see alignline.matrix)."""
    prompts: RecordsSource | None = None
    """matrix: the Prompt records pairs are built for (their reference is the member 'human')."""
    responses: str | None = None
    """matrix: an `alignline sample matrix=...` output_dir (one sub-directory of Response records per member)."""
    member_responses: dict[str, str] = Field(default_factory=dict)
    """matrix: member name -> a file or shard directory of its Response records (wins over responses)."""
    self_ratio: float = Field(0.5, ge=0, lt=1)
    """matrix: share of the final pairs that are the policy's own best-vs-worst pairs from ranked (paper: 0.5);
    with M matrix pairs, round(M * r / (1 - r)) self pairs are added (fewer available: matrix pairs are cut
    to keep the share)."""
    seed: int = 0
    """Seed of the rso and matrix draws."""

    @model_validator(mode="after")
    def _inputs_of_the_strategy(self) -> SelectConfig:
        """The settings the mode and strategy need, checked with the config (so ``alignline run --dry-run``
        sees them); what needs the ranked sets (ranks beyond the smallest set) is checked by run()."""
        if self.mode == "pairs" and self.strategy == "matrix":
            if self.matrix is None or self.prompts is None:
                raise ValueError("strategy=matrix needs matrix=MATRIX.yaml (the model matrix) and prompts=PROMPTS "
                                 "(the prompts the member responses answer)")
            if self.self_ratio > 0 and self.ranked is None:
                raise ValueError(f"strategy=matrix with self_ratio={self.self_ratio} needs ranked=... (the policy's "
                                 "own samples ranked by `alignline score`); or set self_ratio=0 for matrix pairs only")
            return self
        if self.ranked is None:
            raise ValueError("select needs ranked=... (ranked sets from `alignline score`)")
        if self.mode == "pairs" and self.strategy == "fixed_rank":
            if self.rejected_rank is None:
                raise ValueError("strategy=fixed_rank needs rejected_rank (e.g. rejected_rank=32)")
            if self.rejected_rank == self.rank:
                raise ValueError(f"the rejected rank equals the chosen rank ({self.rank}): set rejected_rank to "
                                 "another rank than rank")
        if self.mode == "pairs" and self.strategy == "policy_matched" and self.policy_scores is None:
            raise ValueError("strategy=policy_matched needs policy_scores: ranked sets of the current policy's "
                             "own samples scored by the same reward model")
        return self


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


def _matrix_inputs(cfg: SelectConfig) -> tuple[MatrixConfig, dict]:
    matrix = load_matrix(cfg.matrix)
    inputs = {"matrix": cfg.matrix, "prompts": cfg.prompts, "responses": cfg.responses,
              **{f"member:{m.name}": m.responses for m in matrix.used() if m.responses},
              **{f"member_responses:{k}": v for k, v in cfg.member_responses.items()}}
    return matrix, inputs


def _self_pairs(cfg: SelectConfig, counts: Counter) -> list[Pair]:
    """The policy's own best-vs-worst pair of every ranked set (ties and identical texts dropped, counted)."""
    if cfg.ranked is None or cfg.self_ratio == 0:
        return []
    out = []
    for s in read_records(cfg.ranked, RankedSet):
        sc, last = _scores(s), len(s.responses) - 1
        if last < 1:
            counts["self_dropped_too_few_responses"] += 1
        elif sc[0] == sc[last] or s.responses[0].text.strip() == s.responses[last].text.strip():
            counts["self_dropped_ties"] += 1
        else:
            pair = _pair(s, 0, last, "matrix")
            pair.provenance.update(kind="self", seed=cfg.seed)
            out.append(pair)
    return out


def _run_matrix(cfg: SelectConfig, matrix: MatrixConfig, rd: RunDir) -> Path:
    prompts = read_prompts(cfg.prompts)
    if not prompts:
        raise DataError("no prompts", path=cfg.prompts)
    responses, origin = load_member_responses(matrix, prompts, cfg.responses, cfg.member_responses)
    members = matrix.by_name()
    pos, neg = normalise(matrix.positive), normalise(matrix.negative)
    counts: Counter = Counter(prompts=len(prompts), redraws_no_response=0, redraws_same_member=0)
    redraws: Counter = Counter()
    matrix_pairs = []
    for p in prompts:
        rng = prompt_rng(cfg.seed, p.id)
        d = draw_pair(pos, neg, rng, lambda name, pid=p.id: bool(responses[name].get(pid)))
        for side, name, why in d.redraws:
            counts[f"redraws_{why}"] += 1
            redraws[f"{side}:{name}:{why}"] += 1
        if d.chosen is None or d.rejected is None:
            counts["dropped_no_chosen_member" if d.chosen is None else "dropped_no_rejected_member"] += 1
            continue
        c, r = rng.choice(responses[d.chosen][p.id]), rng.choice(responses[d.rejected][p.id])
        if c.text.strip() == r.text.strip():
            counts["dropped_identical"] += 1
            continue
        cm, rm = members[d.chosen], members[d.rejected]
        matrix_pairs.append(Pair(
            id=f"{p.id}#{cm.name}:{c.sample_idx}-{rm.name}:{r.sample_idx}", prompt=p.messages, chosen=c.text,
            rejected=r.text, provenance={
                "strategy": "matrix", "kind": "matrix", "seed": cfg.seed,
                "chosen_member": cm.name, "chosen_version": cm.version, "chosen_size": cm.size,
                "rejected_member": rm.name, "rejected_version": rm.version, "rejected_size": rm.size,
                "chosen_source": c.source, "rejected_source": r.source,
                "chosen_sample_idx": c.sample_idx, "rejected_sample_idx": r.sample_idx,
                "positive_weights": pos, "negative_weights": neg, "redraws": len(d.redraws)}))
    self_all = _self_pairs(cfg, counts)
    n_matrix, n_self = mix_counts(len(matrix_pairs), len(self_all), cfg.self_ratio)
    rng = random.Random(cfg.seed)
    if n_matrix < len(matrix_pairs):
        counts["matrix_pairs_cut_for_ratio"] = len(matrix_pairs) - n_matrix
        console.print(f"[yellow]select: only {len(self_all)} usable self pairs for self_ratio={cfg.self_ratio}: "
                      f"keeping {n_matrix} of {len(matrix_pairs)} matrix pairs to hold the ratio[/yellow]")
        matrix_pairs = [matrix_pairs[i] for i in sorted(rng.sample(range(len(matrix_pairs)), n_matrix))]
    self_pairs = [self_all[i] for i in sorted(rng.sample(range(len(self_all)), n_self))]
    counts.update(Counter(f"chosen:{p.provenance['chosen_member']}" for p in matrix_pairs))
    counts.update(Counter(f"rejected:{p.provenance['rejected_member']}" for p in matrix_pairs))
    counts.update(matrix_pairs=len(matrix_pairs), self_pairs=len(self_pairs), self_pairs_available=len(self_all),
                  pairs=len(matrix_pairs) + len(self_pairs))
    info = {"strategy": "matrix", "positive_weights": pos, "negative_weights": neg, "self_ratio": cfg.self_ratio,
            "seed": cfg.seed, "redraws": dict(redraws),
            "members": {m.name: {**m.describe(), "kind": m.kind, "responses_from": origin[m.name]}
                        for m in matrix.used()}}
    write_records(rd.path / "pairs.jsonl", [*matrix_pairs, *self_pairs])
    atomic_write_json(rd.path / "selection.json", info)
    rd.finish(counts, selection=info)
    console.print(f"[green]select done[/green] (pairs, matrix): {len(matrix_pairs)} matrix + {len(self_pairs)} self "
                  f"pairs; redraws {counts['redraws_no_response']} (no response) + {counts['redraws_same_member']} "
                  f"(same member)\n  output: {rd.path}")
    return rd.path


def rejected_rank_of(cfg: SelectConfig, sets: list[RankedSet], n_min: int, info: dict) -> int | None:
    """The rank of every pair's rejected response (None for rso, which draws its own), checked and recorded in
    ``info`` with what it was derived from."""
    rejected_rank = None
    if cfg.strategy == "fixed_rank":
        rejected_rank = cfg.rejected_rank
    elif cfg.strategy == "best_worst":
        rejected_rank = n_min
    elif cfg.strategy == "policy_matched":
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
    return rejected_rank


def run(cfg: SelectConfig) -> Path:
    matrix, inputs = None, {"ranked": cfg.ranked, "policy_scores": cfg.policy_scores}
    if cfg.mode == "pairs" and cfg.strategy == "matrix":
        matrix, extra = _matrix_inputs(cfg)
        inputs.update(extra)
    rd = RunDir("select", cfg, cfg.output_dir, inputs)
    if rd.skip_if_done():
        return rd.path
    if matrix is not None:
        rd.start()
        return _run_matrix(cfg, matrix, rd)
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
        rejected_rank = rejected_rank_of(cfg, sets, n_min, info)
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
