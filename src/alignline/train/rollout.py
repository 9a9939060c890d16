"""One rollout of ``alignline rl``: sample G responses per prompt, score them, take the no-grad passes,
compute advantages, write the shard.

A rollout is a list of records, one per response (``iteration``, ``prompt_id``, ``sample_idx``, ``prompt`` and
``response`` token ids, ``text``, ``finish_reason``, ``reward`` and its parts, per-token ``advantages``, and
where the run needs them per-token ``old_logps`` (the sampling policy), ``ref_logps`` (the reference),
``old_values`` and ``returns`` (PPO)). It is written as ``rollouts/iter-NNNNN.jsonl`` in one atomic rename,
after its statistics (``iter-NNNNN.stats.json``); a rerun reads an existing shard instead of sampling again,
so a resumed run trains on exactly the rollouts of the uninterrupted one.

The trained response tokens are the sampled ones plus the end token when the policy emitted it (finish
reason ``stop`` without stop strings), as TRL does, so the policy learns to stop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from alignline.advantages import KL_ESTIMATORS, Estimator
from alignline.data.io import atomic_write_bytes, atomic_write_json, iter_jsonl, jsonl_bytes
from alignline.data.records import Prompt
from alignline.generate.base import sample_seed
from alignline.train.groups import collate_groups, group_token_logps, group_token_values


class ActorCritic(torch.nn.Module):
    """The policy and PPO's critic as one module, so the one training loop optimises and checkpoints both."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def get_input_embeddings(self):  # what the loop's telemetry reads of a causal LM
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        for m in (self.policy, self.critic):
            m.gradient_checkpointing_enable(**kwargs)


def policy_and_critic(model):
    return (model.policy, model.critic) if isinstance(model, ActorCritic) else (model, None)


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


def read_rollout(root: Path, iteration: int) -> tuple[list[dict], dict] | None:
    path = shard_path(root, iteration)
    if not path.exists():
        return None
    import json

    stats = json.loads(path.with_suffix(".stats.json").read_text())
    return [obj for _, obj in iter_jsonl(path)], stats


def write_rollout(root: Path, iteration: int, records: list[dict], stats: dict) -> None:
    path = shard_path(root, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path.with_suffix(".stats.json"), stats)
    atomic_write_bytes(path, jsonl_bytes(records))  # the shard is the completion marker, written last


class RolloutSample(NamedTuple):
    """One sampled response as the rollout trains on it."""

    ids: list[int]
    """Response token ids, an emitted end token included."""
    text: str
    finish_reason: str
    logprobs: list[float] | None
    """The sampling policy's log-prob of each of ``ids`` (from the engine), or None: the run computes them."""


def sample_hf(engine, prompt_ids: list[list[int]], prompt_keys: list[str], G: int, sampling, iteration: int,
              end_id: int, *, logprobs: bool = False) -> list[list[RolloutSample]]:
    """A :class:`RolloutSample` per sample, per prompt. Sample i of prompt p in iteration k is seeded by
    ``sample_seed(seed, p, k * G + i)``. One engine call: its continuous batching keeps ``max_batch`` samples
    decoding until the whole rollout is done. The end token kept is the one drawn (``end_id`` where the engine
    does not say); ``logprobs`` asks the engine for the log-probs, which its fallback path does not give (None).
    """
    seeds = [[sample_seed(sampling.seed, key, iteration * G + i) for i in range(G)] for key in prompt_keys]
    out = []
    for samples in engine.sample_prompts(prompt_ids, seeds, sampling, logprobs=logprobs):
        group = []
        for x in samples:
            ended = x.finish_reason == "stop" and not sampling.stop
            ids = list(x.token_ids) + ([end_id if x.end_token is None else x.end_token] if ended else [])
            logps = None if x.logprobs is None else x.logprobs[: len(ids)]
            assert logps is None or len(logps) == len(ids), "the engine gives one log-prob per token"
            group.append(RolloutSample(ids, x.text, x.finish_reason, logps))
        out.append(group)
    return out


def sample_openai(engine, prompts: Sequence[Prompt], tokenizer, G: int, sampling, iteration: int
                  ) -> list[list[RolloutSample]]:
    """The same through an OpenAI-compatible server: texts are tokenised back with the chat template (no
    log-probs: the run computes them in its own pass)."""
    from alignline.data.chat import tokenise_prompt_response
    from alignline.errors import AlignlineError

    seeded = sampling.model_copy(update={"seed": sample_seed(sampling.seed, "rl-iteration", iteration)})
    out = []
    for p, responses in zip(prompts, engine.generate(list(prompts), G, seeded)):
        group = []
        for r in responses:
            if r.status != "ok":
                raise AlignlineError(f"the rollout server failed on prompt '{p.id}': {r.error}; check the server "
                                     "(engine openai settings)")
            _, ids = tokenise_prompt_response(tokenizer, p.messages, r.text, where=f"prompt {p.id}")
            group.append(RolloutSample(ids[:-1] if r.finish_reason == "length" else ids, r.text,
                                       r.finish_reason or "stop", None))
        out.append(group)
    return out


@torch.no_grad()
def token_passes(policy, ref, critic, groups: list[dict], *, pad_id: int, batch: int, want_old: bool
                 ) -> dict[str, list[list[float]]]:
    """Per-response token lists from the no-grad passes over prefix-shared group rows: ``old_logps`` (the
    policy, if ``want_old``), ``ref_logps`` (if ``ref``), ``old_values`` (if ``critic``)."""
    models = {"old_logps": policy if want_old else None, "ref_logps": ref, "old_values": critic}
    out: dict[str, list[list[float]]] = {k: [] for k, m in models.items() if m is not None}
    for s in range(0, len(groups), batch):
        chunk = groups[s: s + batch]
        b = {k: v.to(policy.device) for k, v in collate_groups(chunk, pad_id).items()}
        lengths = [len(r) for g in chunk for r in g["responses"]]
        for key, m in models.items():
            if m is None:
                continue
            was = m.training
            m.eval()
            flat = group_token_values(m, b) if key == "old_values" else group_token_logps(m, b)[0]
            m.train(was)
            out[key] += [t.tolist() for t in flat.double().cpu().split(lengths)]
    return out


def padded(lists: Sequence[Sequence[float]], P: int, G: int, T: int) -> torch.Tensor:
    x = torch.zeros(P * G, T, dtype=torch.float64)
    for i, v in enumerate(lists):
        x[i, : len(v)] = torch.tensor(v, dtype=torch.float64)
    return x.view(P, G, T)


def advantages_for(estimator: Estimator, params: dict, scores: list[list[float]], records: list[dict],
                   kl_coef: float, kl_name: str, kl_in_reward: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(advantages [P, G, T], returns or None, total rewards [P, G]) for one rollout (``records`` in prompt-major
    order). A KL penalty in the reward is ``-coef * kl_t`` at every token; the score sits at the last token."""
    P, G = len(scores), len(scores[0])
    lengths = [len(r["response"]) for r in records]
    T = max(lengths)
    mask = padded([[1.0] * n for n in lengths], P, G, T)
    token_rewards = torch.zeros(P * G, T, dtype=torch.float64)
    if kl_in_reward and kl_coef:
        kl = KL_ESTIMATORS[kl_name](padded([r["old_logps"] for r in records], P, G, T),
                                    padded([r["ref_logps"] for r in records], P, G, T))
        token_rewards -= kl_coef * (kl * mask).view(P * G, T)
    flat_scores = torch.tensor([x for row in scores for x in row], dtype=torch.float64)
    token_rewards[torch.arange(P * G), torch.tensor(lengths) - 1] += flat_scores
    token_rewards = token_rewards.view(P, G, T)
    totals = token_rewards.sum(-1)
    values = padded([r["old_values"] for r in records], P, G, T) if estimator.critic else torch.zeros_like(mask)
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


def all_followed(prompt: Prompt, text: str) -> bool | None:
    """Whether ``text`` follows every verifiable instruction of ``prompt`` (strict), None without any."""
    from alignline.judges.verifiable import verify

    found = prompt.meta.get("instructions")
    return verify(text, found, "strict").all_followed if found else None

