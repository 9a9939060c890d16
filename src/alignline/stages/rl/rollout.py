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

import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from alignline.advantages import ESTIMATORS, KL_ESTIMATORS, Estimator
from alignline.data.io import atomic_write_bytes, atomic_write_json, iter_jsonl, jsonl_bytes
from alignline.data.records import Prompt
from alignline.errors import AlignlineError, RewardFunctionError
from alignline.generate.base import sample_seed
from alignline.stages.common import console
from alignline.stages.rl.config import RLConfig, estimator_params
from alignline.train.groups import token_passes


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



def make_rollout_engine(cfg: RLConfig, policy, tokenizer):
    if cfg.engine == "hf":
        from alignline.generate.hf import HFEngine

        return HFEngine(policy, tokenizer, max_batch=cfg.rollout.max_batch, decode_step=cfg.rollout.decode_step)
    from alignline.generate.endpoint import OpenAISettings
    from alignline.generate.openai_engine import OpenAIEngine

    engine = OpenAIEngine(OpenAISettings.of(cfg.model, cfg.openai))
    engine.check_connection()  # an unreachable server is an error now, before any training
    return engine


def push_weights(cfg: RLConfig, policy, tokenizer, out: Path) -> None:
    """Save the policy and ask the server to reload it (SGLang's update_weights_from_disk body)."""
    import urllib.request

    from alignline.models.saving import save_model

    save_model(policy, tokenizer, out)
    req = urllib.request.Request(cfg.openai.weights_url, data=json.dumps({"model_path": str(out.resolve())}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        urllib.request.urlopen(req, timeout=600).read()
    except OSError as exc:
        raise AlignlineError(f"openai.weights_url={cfg.openai.weights_url}: the weight reload failed ({exc})") from None


def whiten(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(adv.dtype)
    n = m.sum()
    mean = (adv * m).sum() / n
    var = (((adv - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (adv - mean) / (var.sqrt() + 1e-8) * m


def rollout_source(cfg: RLConfig, root: Path, prompts, ids, tokenizer, policy, ref, critic, engine, reward_fn,
                   counts: Counter, tel):
    """``get(iteration) -> records``: the shard if it exists, else a new rollout from the current weights."""
    from alignline.data.chat import tokenise_prompt_response

    P, G, sampling = cfg.rollout.prompts, cfg.rollout.group_size, cfg.rollout.sampling
    end_id = tokenise_prompt_response(tokenizer, [{"role": "user", "content": "x"}], "y")[1][-1]
    est = ESTIMATORS[cfg.loss.estimator]
    want_old = cfg.steps_per_iteration > 1 or (cfg.kl.coef > 0 and cfg.kl.where == "reward")
    engine_logps = want_old and cfg.rollout.engine_logprobs
    cache: dict[int, list[dict]] = {}

    def make(it: int) -> list[dict]:
        drawn = draw_prompts(len(prompts), P, cfg.train.seed, it)
        chosen = [prompts[i] for i in drawn]
        t0 = time.perf_counter()
        if cfg.engine == "hf":
            groups = sample_hf(engine, [ids[i] for i in drawn], [p.id for p in chosen], G, sampling, it, end_id,
                                  logprobs=engine_logps)
        else:
            if it > 0:
                push_weights(cfg, policy, tokenizer, root / "served_policy")
            groups = sample_openai(engine, chosen, tokenizer, G, sampling, it)
        t_sample = time.perf_counter() - t0
        try:
            scores, parts = reward_fn(chosen, [[x.text for x in g] for g in groups])
        except RewardFunctionError as exc:
            exc.iteration = it
            raise
        records = []
        for pi, (p, g) in enumerate(zip(chosen, groups)):
            for i, x in enumerate(g):
                score = scores[pi][i] - cfg.length_penalty * len(x.ids) / sampling.max_new_tokens
                records.append({"iteration": it, "prompt_id": p.id, "sample_idx": i, "prompt": ids[drawn[pi]],
                                "response": x.ids, "text": x.text, "finish_reason": x.finish_reason,
                                "score": score, "parts": {k: v[pi][i] for k, v in parts.items()},
                                "passed": all_followed(p, x.text)})
        t1 = time.perf_counter()
        groups_ids = [{"prompt": records[pi * G]["prompt"], "responses": [r["response"] for r in records[pi * G: (pi + 1) * G]]}
                      for pi in range(P)]
        sampled_logps = [x.logprobs for g in groups for x in g]
        from_engine = want_old and all(v is not None for v in sampled_logps)
        if from_engine:  # the sampling policy's log-probs came with the tokens: no pass of the policy
            for r, v in zip(records, sampled_logps):
                r["old_logps"] = v
        passes = token_passes(policy, ref, critic, groups_ids, pad_id=tokenizer.pad_token_id,
                                 batch=cfg.rollout.pass_batch, want_old=want_old and not from_engine)
        for key, lists in passes.items():
            for r, v in zip(records, lists):
                r[key] = v
        t_pass = time.perf_counter() - t1
        adv, returns, totals = advantages_for(
            est, estimator_params(cfg), [[records[pi * G + i]["score"] for i in range(G)] for pi in range(P)],
            records, cfg.kl.coef, cfg.kl.estimator, cfg.kl.where == "reward")
        lengths = [len(r["response"]) for r in records]
        mask = padded([[1.0] * n for n in lengths], P, G, max(lengths))
        if est.critic and cfg.ppo.whiten:
            adv = whiten(adv, mask)
        for k, r in enumerate(records):
            r["reward"] = float(totals.flatten()[k])
            r["advantages"] = adv.view(P * G, -1)[k, : lengths[k]].tolist()
            if returns is not None:
                r["returns"] = returns.view(P * G, -1)[k, : lengths[k]].tolist()
        stats = {"iteration": it, **group_stats(totals, [r["passed"] for r in records], lengths,
                                                   [r["finish_reason"] for r in records]),
                 "rollout_tokens": sum(lengths), "rollout_seconds": t_sample,
                 "rollout_tokens_per_s": sum(lengths) / max(t_sample, 1e-9), "pass_seconds": t_pass,
                 "old_logps_from": "engine" if from_engine else ("pass" if want_old else None)}
        write_rollout(root, it, records, stats)
        counts["rollouts"] += 1
        pr = "" if stats["pass_rate"] is None else f", pass rate {stats['pass_rate']:.3f}"
        console.print(f"rl iteration {it}: reward {stats['reward_mean']:.4f} +- {stats['reward_se']:.4f}{pr}, "
                      + ("" if G < 2 else f"zero-variance groups {stats['zero_variance_groups']}/{P}, ")
                      + f"{stats['rollout_tokens_per_s']:.0f} rollout tok/s")
        return records

    def get(it: int) -> list[dict]:
        if it not in cache:
            cache.clear()
            stored = read_rollout(root, it)
            if stored is not None:
                cache[it] = stored[0]
            else:
                with tel.phase("rollout"):
                    cache[it] = make(it)
        return cache[it]

    return get
