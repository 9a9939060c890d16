"""Preference training on tokenised pairs, shared by ``dpo``, ``tso`` and ``rm``: the settings of the pairs and the
loss, reading the pairs, the loop's plan, step and evaluation, and the reference log-probs with their cache.

Reference log-probs are computed in one no-grad pass (sharded across processes) and stored as
``{"key", "ids", "values"}`` JSON, ``values`` holding one ``[chosen, rejected]`` per pair; a stored file is reused
when its key (the stage's fingerprint of the reference and the data) and its length match.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from alignline import losses
from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.drops import record_drops
from alignline.data.io import atomic_write_json, read_pairs
from alignline.errors import DataError
from alignline.telemetry import Telemetry
from alignline.train.loop import TrainSettings
from alignline.train.pairs import (
    TokenisedPair,
    collate_pairs,
    pair_length,
    pair_logps,
    plan_bucketed,
    tokenise_pairs,
)

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected")

ReferenceValues = list[tuple[float, float]]
"""(chosen, rejected) reference log-probs, one per pair, in the pairs' order."""


class LossSettings(Section):
    """Which preference loss, with its hyper-parameters."""

    type: Literal["dpo", "ipo", "cdpo", "hinge", "dual_clip"] = "dpo"
    """dpo (sigmoid), ipo, cdpo (label smoothing), hinge (RSO), dual_clip (TSO, our reading)."""
    beta: float = Field(0.1, gt=0)
    """beta of DPO/cDPO/hinge/dual-clip; tau of IPO (Xwin and TSO: 0.1)."""
    label_smoothing: float = Field(0.1, ge=0, lt=0.5)
    """cDPO: probability that a preference label is flipped."""
    margin_chosen: float = 20.0
    """dual_clip: the chosen reward is not pushed above this (TSO: 20)."""
    margin_rejected: float = 10.0
    """dual_clip: the rejected reward is not pushed below minus this (TSO: 10)."""
    length_normalize: bool | None = None
    """Average log-probs over response tokens instead of summing; null: on for IPO only (as its paper/TRL)."""
    sft_weight: float = Field(0.0, ge=0)
    """Add this weight times the per-token NLL of the chosen response (0: off)."""

    def bound(self) -> Callable:
        params: dict[str, float] = {"beta": self.beta}
        if self.type == "cdpo":
            params["label_smoothing"] = self.label_smoothing
        if self.type == "dual_clip":
            params.update(margin_chosen=self.margin_chosen, margin_rejected=self.margin_rejected)
        return losses.bind(self.type, **params)

    @property
    def normalize(self) -> bool:
        return self.type == "ipo" if self.length_normalize is None else self.length_normalize


class PairData(Section):
    """Preference pairs and how they are cut."""

    train: RecordsSource
    """Pairs: JSONL, Parquet, a directory of shards, a Hub dataset ``hf:ORG/NAME``, a save_to_disk directory or
    an Arrow file (ours or TRL's prompt/chosen/rejected layouts)."""
    eval: RecordsSource | None = None
    """Held-out pairs for reward accuracy and loss (optional)."""
    max_length: int = Field(2048, gt=8)
    """Longest prompt + response in tokens; responses are cut to fit, prompts that do not fit are dropped."""
    max_drop_fraction: float = Field(0.1, ge=0, le=1)
    """Error out when more than this fraction of pairs would be dropped."""
    max_examples: int | None = None
    """Use at most this many pairs (the first ones)."""


# --------------------------------------------------------------------------- reading the pairs

IDENTICAL_TEXT = "chosen and rejected are the same text"


def unusable_pair(obj: dict) -> str | None:
    """Why a pair record is dropped on read: an empty (blank) chosen or rejected response, or chosen and rejected
    the same text (nothing to prefer; counted as dropped_identical_text)."""
    blank = [k for k in ("chosen", "rejected") if isinstance(obj.get(k), str) and not obj[k].strip()]
    if blank:
        return f"empty {' and '.join(blank)} response"
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() == rejected.strip():
        return IDENTICAL_TEXT
    return None


def load_pairs_for(data: PairData, tokenizer, counts: Counter, *, keep_tail: bool = False
                   ) -> tuple[list[TokenisedPair], list[TokenisedPair]]:
    """Tokenised training pairs (drops counted, capped by data.max_drop_fraction) and eval pairs. A pair with an
    empty response, or whose chosen and rejected texts are the same, is dropped when read (counted as
    dropped_empty_response / dropped_identical_text, its file:line in dropped_lines)."""
    dropped: list[str] = []
    pairs = read_pairs(data.train, drop=unusable_pair, dropped=dropped)[: data.max_examples]
    same = [line for line in dropped if line.endswith(IDENTICAL_TEXT)]
    record_drops(counts, "dropped_empty_response", [line for line in dropped if line not in same],
                 "pair(s) with an empty response")
    record_drops(counts, "dropped_identical_text", same, "pair(s) whose chosen and rejected are the same text")
    train_pairs = tokenise_pairs(pairs, tokenizer, max_length=data.max_length, counts=counts, keep_tail=keep_tail,
                                 max_drop_fraction=data.max_drop_fraction, where=data.train,
                                 dropped_on_read=len(dropped))
    if not train_pairs:
        raise DataError(f"no usable pairs ({dict(counts)})", path=data.train)
    eval_pairs = []
    if data.eval:
        eval_pairs = tokenise_pairs(read_pairs(data.eval, drop=unusable_pair), tokenizer, max_length=data.max_length,
                                    counts=Counter(), max_drop_fraction=1.0, where=data.eval, keep_tail=keep_tail)
    return train_pairs, eval_pairs


# --------------------------------------------------------------------------- the loop's pieces

def make_plan(pairs: list[TokenisedPair], settings: TrainSettings, layout: str, processes: int = 1):
    """The loop's ``plan(epoch)``: length-bucketed micro-batches of pair indices."""
    lengths = [pair_length(p, layout) for p in pairs]

    def plan(epoch: int):
        # batches are drawn per optimizer step (over all processes), so neither accumulation nor the number
        # of processes changes which pairs share a step
        return plan_bucketed(lengths, settings.batch_size * settings.grad_accum * processes, settings.seed, epoch,
                             micro_batch_size=settings.batch_size)

    return plan


def pair_step_fn(loss_fn: Callable, *, normalize: bool, sft_weight: float = 0.0):
    """A ``step_fn`` for the training loop: summed pair losses, the pair count, summed metrics."""

    def step(model, batch):
        policy = pair_logps(model, batch, length_normalize=normalize)
        reference_chosen = batch["ref_chosen"].to(policy.chosen.dtype)
        reference_rejected = batch["ref_rejected"].to(policy.chosen.dtype)
        loss_vec, reward_chosen, reward_rejected = loss_fn(policy.chosen, policy.rejected,
                                                           reference_chosen, reference_rejected)
        if sft_weight:
            chosen_sum = policy.chosen * policy.chosen_lengths if normalize else policy.chosen
            loss_vec = loss_vec + sft_weight * losses.sft_nll(chosen_sum, policy.chosen_lengths)
        metrics = {
            "rewards/chosen": float(reward_chosen.sum()), "rewards/rejected": float(reward_rejected.sum()),
            "rewards/margin": float((reward_chosen - reward_rejected).sum()),
            "rewards/accuracy": float((reward_chosen > reward_rejected).float().sum()),
            "logps/chosen": float(policy.chosen.detach().sum()),
            "logps/rejected": float(policy.rejected.detach().sum()),
        }
        return loss_vec.sum(), int(policy.chosen.shape[0]), metrics

    return step


def pair_eval_fn(pairs: list[TokenisedPair], loss_fn, *, accelerator, pad_id, layout, normalize, batch_size):
    """The loop's ``evaluate(model)``: the step's loss and metrics, averaged over ``pairs``."""
    step = pair_step_fn(loss_fn, normalize=normalize)

    def evaluate(model) -> dict[str, float]:
        total = Counter()
        for s in range(0, len(pairs), batch_size):
            batch = {k: v.to(accelerator.device) for k, v in
                     collate_pairs(pairs[s: s + batch_size], pad_id, layout).items()}
            with accelerator.autocast():
                loss_sum, n, metrics = step(model, batch)
            total["loss"] += float(loss_sum)
            total["n"] += n
            for k, v in metrics.items():
                total[k] += v
        n = max(total.pop("n"), 1)
        return {k: v / n for k, v in total.items()}

    return evaluate


# --------------------------------------------------------------------------- reference log-probs

@torch.no_grad()
def reference_logps(model, pairs: list[TokenisedPair], *, accelerator, pad_id: int, layout: str, normalize: bool,
                    batch_size: int, desc: str = "reference pass", telemetry: Telemetry | None = None
                    ) -> ReferenceValues:
    """One no-grad pass: (chosen, rejected) reference log-probs per pair, sharded across processes; its tokens
    and useful FLOPs are counted into ``telemetry``'s open phases (this process's share)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    order = sorted(range(len(pairs)), key=lambda i: pair_length(pairs[i], layout))
    mine = order[rank::world]
    out: list[tuple[int, float, float]] = []  # (pair index, chosen, rejected)
    for s in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not accelerator.is_local_main_process):
        ix = mine[s: s + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate_pairs([pairs[i] for i in ix], pad_id, layout).items()}
        with accelerator.autocast():
            logps = pair_logps(model, batch, length_normalize=normalize)
        if telemetry is not None:
            telemetry.count_batch(model, batch, grad=False)
        out.extend(zip(ix, logps.chosen.double().tolist(), logps.rejected.double().tolist()))
    if world > 1:
        out = gather_object(out)
    model.train(was_training)
    values = {i: (chosen, rejected) for i, chosen, rejected in out}
    return [values[i] for i in range(len(pairs))]


def with_reference(pairs: list[TokenisedPair], values: ReferenceValues) -> list[TokenisedPair]:
    """``pairs`` carrying their reference log-probs."""
    return [replace(p, reference_chosen=chosen, reference_rejected=rejected)
            for p, (chosen, rejected) in zip(pairs, values)]


def cached_reference(path: Path, key: str, compute: Callable[[], ReferenceValues], pairs: list[TokenisedPair],
                     accelerator) -> list[TokenisedPair]:
    """``pairs`` with reference log-probs from ``path`` if they were computed for the same ``key``; else computed
    and stored there."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key and len(stored["values"]) == len(pairs):
            return with_reference(pairs, [tuple(v) for v in stored["values"]])
    values = compute()
    if accelerator.is_main_process:
        atomic_write_json(path, {"key": key, "ids": [p.id for p in pairs], "values": values})
    return with_reference(pairs, values)
