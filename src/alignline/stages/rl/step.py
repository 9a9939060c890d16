"""The training side of ``alignline rl``: the loss step, the plan of micro-batches and their collate."""

from __future__ import annotations

import random

import torch

from alignline.advantages import (
    KL_ESTIMATORS,
    clipped_policy_loss,
    clipped_value_loss,
    token_weights,
)
from alignline.stages.rl.config import RLConfig
from alignline.stages.rl.rollout import ResponseRef, RolloutRecord


def rl_step_fn(cfg: RLConfig):
    """``step_fn`` for the loop: the clipped-ratio loss (+ KL in the loss, + PPO's value loss), summed with the
    aggregation's token weights; metrics are sums over the micro-batch's response tokens."""
    from alignline.train.actor_critic import policy_and_critic
    from alignline.train.groups import group_token_logps, group_token_values

    kl_fn = KL_ESTIMATORS[cfg.kl.estimator]
    kl_in_loss = cfg.kl.coef > 0 and cfg.kl.where == "loss"

    def step(model, batch):
        policy, critic = policy_and_critic(model)
        logps, entropy = group_token_logps(policy, batch, entropy=True)
        old = batch["old_logps"].to(logps.dtype) if "old_logps" in batch else logps.detach()
        per_token, clipped = clipped_policy_loss(logps, old, batch["advantages"].to(logps.dtype),
                                                 eps_low=cfg.loss.clip_low, eps_high=cfg.loss.clip_high)
        w = batch["weight"].to(logps.dtype)
        metrics = {"response_tokens": float(w.numel()), "pg_loss": float((per_token.detach()).sum()),
                   "clipped": float(clipped.sum()), "entropy": float(entropy.sum()),
                   "ratio": float(torch.exp(logps.detach() - old).sum())}
        if "ref_logps" in batch:
            kl = kl_fn(logps, batch["ref_logps"].to(logps.dtype))
            metrics["kl"] = float(kl.detach().sum())
            if kl_in_loss:
                per_token = per_token + cfg.kl.coef * kl
        loss = (per_token * w).sum()
        if critic is not None:
            values = group_token_values(critic, batch)
            vl = clipped_value_loss(values, batch["old_values"].to(values.dtype), batch["returns"].to(values.dtype),
                                    clip=cfg.ppo.value_clip)
            metrics["value_loss"] = float(vl.detach().sum())
            loss = loss + cfg.ppo.vf_coef * (vl * w).sum()
        return loss, int(batch["units"]), metrics

    return step


def make_plan(cfg: RLConfig):
    """Micro-batches of iteration k: ``loss.epochs`` passes, each over the prompts in a seeded order with a
    prompt's responses kept together (so they share rows); each item names its response
    (:class:`~alignline.stages.rl.rollout.ResponseRef`)."""
    P, G, mb = cfg.rollout.prompts, cfg.rollout.group_size, cfg.train.batch_size

    def plan(iteration: int) -> list[list[ResponseRef]]:
        out = []
        for epoch in range(cfg.loss.epochs):
            order = list(range(P))
            random.Random(cfg.train.seed * 1_000_003 + iteration * 1_009 + epoch).shuffle(order)
            refs = [ResponseRef(iteration, p, g) for p in order for g in range(G)]
            out += [refs[s: s + mb] for s in range(0, len(refs), mb)]
        return out

    return plan


def collate_rollout(records: list[RolloutRecord], pad_id: int, aggregation: str, max_new_tokens: int
                    ) -> dict[str, torch.Tensor]:
    """Tensors of ``records``: consecutive responses to one prompt share a row; per-token fields flattened in
    the same order as the targets."""
    from alignline.train.groups import collate_groups

    items: list[dict] = []
    for r in records:
        if items and items[-1]["key"] == r.prompt_id:
            items[-1]["responses"].append(r.response)
        else:
            items.append({"key": r.prompt_id, "prompt": r.prompt, "responses": [r.response]})
    batch = collate_groups(items, pad_id)
    lengths = torch.tensor([len(r.response) for r in records])
    w, units = token_weights(aggregation, lengths, max_new_tokens)
    batch["weight"] = w.repeat_interleave(lengths)
    batch["units"] = units.sum()
    for key in ("advantages", "old_logps", "ref_logps", "old_values", "returns"):
        if getattr(records[0], key) is not None:
            batch[key] = torch.tensor([x for r in records for x in getattr(r, key)], dtype=torch.float64)
    return batch
