"""The body of ``alignline rl`` (settings, loss step and plan: :mod:`alignline.stages.rl`).

Read top to bottom: check the inputs (before any model is loaded where possible), load the policy (and the
frozen reference, and PPO's critic), build the rollout source the plan pulls from, run the one training loop
with the iterations as its epochs, then write the model, ``iterations.jsonl`` and the curves.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from alignline.advantages import ESTIMATORS
from alignline.data.io import (
    adapt_prompt,
    atomic_write_bytes,
    iter_jsonl,
    iter_records,
    jsonl_bytes,
    read_prompts,
)
from alignline.data.records import Prompt
from alignline.errors import AlignlineError, ConfigError, DataError, RewardFunctionError
from alignline.rewards import build_reward, combine
from alignline.stages.common import RunDir, console, models_when_set, record_drops, training_dtype
from alignline.stages.rl import (
    RLConfig,
    collate_rollout,
    estimator_params,
    make_plan,
    metric_names,
    rl_step_fn,
)
from alignline.train import rollout as ro


def load_prompts(cfg: RLConfig, tokenizer, counts: Counter) -> tuple[list, list[list[int]]]:
    """Training prompts and their token ids; the verifier reward needs instructions on every prompt."""
    from alignline.data.chat import prompt_ids

    located = list(iter_records(cfg.prompts, Prompt, adapt_prompt))
    prompts = [p for _, _, p in located]
    verifier = [i for i, r in enumerate(cfg.reward) if r.type == "verifier"]
    bare = [p.id for p in prompts if not p.meta.get("instructions")]
    if verifier and bare:
        raise DataError(f"reward[{verifier[0]}].type=verifier, but {len(bare)} of {len(prompts)} prompts carry no "
                        f"verifiable instructions (e.g. '{bare[0]}')", path=cfg.prompts, field="meta.instructions",
                        expected="prompts from prepare with instructions attached, or another reward type")
    kept, ids, too_long = [], [], []
    for file, line, p in located:
        x = prompt_ids(tokenizer, p.messages)
        if len(x) > cfg.max_prompt_tokens:
            too_long.append(f"{file}:{line}: prompt '{p.id}' has {len(x)} tokens, more than max_prompt_tokens")
            continue
        kept.append(p)
        ids.append(x)
    record_drops(counts, "dropped_prompt_too_long", too_long, "prompt(s) longer than max_prompt_tokens")
    if len(kept) < cfg.rollout.prompts:
        raise DataError(f"{len(kept)} usable prompts, fewer than rollout.prompts={cfg.rollout.prompts} "
                        f"({dict(counts)})", path=cfg.prompts)
    counts["prompts"] = len(kept)
    return kept, ids


def make_rollout_engine(cfg: RLConfig, policy, tokenizer):
    from alignline.generate.engines import EngineSettings, build_engine

    settings = EngineSettings(engine=cfg.engine, model=cfg.model, openai=cfg.openai,
                              max_batch=cfg.rollout.max_batch, decode_step=cfg.rollout.decode_step)
    engine = build_engine(settings, loaded=(policy, tokenizer))
    if cfg.engine == "openai":
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
        drawn = ro.draw_prompts(len(prompts), P, cfg.train.seed, it)
        chosen = [prompts[i] for i in drawn]
        t0 = time.perf_counter()
        if cfg.engine == "hf":
            groups = ro.sample_hf(engine, [ids[i] for i in drawn], [p.id for p in chosen], G, sampling, it, end_id,
                                  logprobs=engine_logps)
        else:
            if it > 0:
                push_weights(cfg, policy, tokenizer, root / "served_policy")
            groups = ro.sample_openai(engine, chosen, tokenizer, G, sampling, it)
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
                                "passed": ro.all_followed(p, x.text)})
        t1 = time.perf_counter()
        groups_ids = [{"prompt": records[pi * G]["prompt"], "responses": [r["response"] for r in records[pi * G: (pi + 1) * G]]}
                      for pi in range(P)]
        sampled_logps = [x.logprobs for g in groups for x in g]
        from_engine = want_old and all(v is not None for v in sampled_logps)
        if from_engine:  # the sampling policy's log-probs came with the tokens: no pass of the policy
            for r, v in zip(records, sampled_logps):
                r["old_logps"] = v
        passes = ro.token_passes(policy, ref, critic, groups_ids, pad_id=tokenizer.pad_token_id,
                                 batch=cfg.rollout.pass_batch, want_old=want_old and not from_engine)
        for key, lists in passes.items():
            for r, v in zip(records, lists):
                r[key] = v
        t_pass = time.perf_counter() - t1
        adv, returns, totals = ro.advantages_for(
            est, estimator_params(cfg), [[records[pi * G + i]["score"] for i in range(G)] for pi in range(P)],
            records, cfg.kl.coef, cfg.kl.estimator, cfg.kl.where == "reward")
        lengths = [len(r["response"]) for r in records]
        mask = ro.padded([[1.0] * n for n in lengths], P, G, max(lengths))
        if est.critic and cfg.ppo.whiten:
            adv = whiten(adv, mask)
        for k, r in enumerate(records):
            r["reward"] = float(totals.flatten()[k])
            r["advantages"] = adv.view(P * G, -1)[k, : lengths[k]].tolist()
            if returns is not None:
                r["returns"] = returns.view(P * G, -1)[k, : lengths[k]].tolist()
        stats = {"iteration": it, **ro.group_stats(totals, [r["passed"] for r in records], lengths,
                                                   [r["finish_reason"] for r in records]),
                 "rollout_tokens": sum(lengths), "rollout_seconds": t_sample,
                 "rollout_tokens_per_s": sum(lengths) / max(t_sample, 1e-9), "pass_seconds": t_pass,
                 "old_logps_from": "engine" if from_engine else ("pass" if want_old else None)}
        ro.write_rollout(root, it, records, stats)
        counts["rollouts"] += 1
        pr = "" if stats["pass_rate"] is None else f", pass rate {stats['pass_rate']:.3f}"
        console.print(f"rl iteration {it}: reward {stats['reward_mean']:.4f} +- {stats['reward_se']:.4f}{pr}, "
                      + ("" if G < 2 else f"zero-variance groups {stats['zero_variance_groups']}/{P}, ")
                      + f"{stats['rollout_tokens_per_s']:.0f} rollout tok/s")
        return records

    def get(it: int) -> list[dict]:
        if it not in cache:
            cache.clear()
            stored = ro.read_rollout(root, it)
            if stored is not None:
                cache[it] = stored[0]
            else:
                with tel.phase("rollout"):
                    cache[it] = make(it)
        return cache[it]

    return get


def eval_fn(cfg: RLConfig, tokenizer, root: Path):
    """The loop's evaluation: greedy answers on held-out prompts, verifier pass rates with standard errors;
    the per-instruction results of the first and the latest call go to eval_start.jsonl / eval_last.jsonl."""
    from alignline.generate.base import SamplingParams
    from alignline.generate.hf import HFEngine
    from alignline.judges.verifiable import verify
    from alignline.train.rollout import policy_and_critic

    prompts = read_prompts(cfg.eval.prompts)[: cfg.eval.max_prompts]
    bare = [p.id for p in prompts if not p.meta.get("instructions")]
    if bare:
        raise DataError(f"{len(bare)} eval prompts carry no verifiable instructions (e.g. '{bare[0]}')",
                        path=cfg.eval.prompts, field="meta.instructions")
    greedy = SamplingParams(temperature=0, max_new_tokens=cfg.eval.max_new_tokens)

    def evaluate(model) -> dict[str, float]:
        policy, _ = policy_and_critic(model)
        answers = HFEngine(policy, tokenizer, max_batch=cfg.rollout.max_batch,
                           decode_step=cfg.rollout.decode_step).generate(prompts, 1, greedy)
        rows = []
        for p, (a,) in zip(prompts, answers):
            s, lo = verify(a.text, p.meta["instructions"], "strict"), verify(a.text, p.meta["instructions"], "loose")
            rows.append({"prompt_id": p.id, "strict": s.followed, "loose": lo.followed, "text": a.text})
        inst = [x for r in rows for x in r["strict"]]
        rate = sum(inst) / len(inst)
        start = root / "eval_start.jsonl"
        atomic_write_bytes(root / ("eval_last.jsonl" if start.exists() else "eval_start.jsonl"), jsonl_bytes(rows))
        return {"instruction_strict": rate, "instruction_strict_se": math.sqrt(rate * (1 - rate) / len(inst)),
                "instruction_loose": sum(x for r in rows for x in r["loose"]) / len(inst),
                "prompt_strict": sum(all(r["strict"]) for r in rows) / len(rows), "instructions": len(inst),
                "response_words": mean_words(rows)}

    return evaluate


def paired_change(root: Path) -> dict | None:
    """Instruction-level strict pass rate, last eval minus first, with its paired standard error."""
    a, b = root / "eval_start.jsonl", root / "eval_last.jsonl"
    if not (a.exists() and b.exists()):
        return None
    x = [v for _, row in iter_jsonl(a) for v in row["strict"]]
    y = [v for _, row in iter_jsonl(b) for v in row["strict"]]
    if len(x) != len(y):
        raise DataError(f"{len(x)} instructions checked at the start, {len(y)} at the end: the two evaluations "
                        "are not of the same prompts", path=str(b))
    d = [float(q) - float(p) for p, q in zip(x, y)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    return {"start": sum(x) / n, "end": sum(y) / n, "change": mean, "paired_se": sd / math.sqrt(n), "n": n,
            "start_words": mean_words(r for _, r in iter_jsonl(a)), "end_words": mean_words(r for _, r in iter_jsonl(b))}


def mean_words(rows) -> float:
    """Mean length in words of the answers (beside a pass rate: a policy that stops answering passes many
    instructions vacuously)."""
    lengths = [len(r["text"].split()) for r in rows]
    return sum(lengths) / max(len(lengths), 1)


def iteration_rows(root: Path, iterations: int) -> list[dict]:
    """One row per iteration: the rollout's statistics and the per-token means of its optimizer steps."""
    steps = [row for _, row in iter_jsonl(root / "metrics.jsonl")]
    rows = []
    for it in range(iterations):
        stored = ro.read_rollout(root, it)
        if stored is None:
            continue
        row = dict(stored[1])
        mine = [s for s in steps if s.get("epoch") == it and "units" in s]
        tokens = sum(s["response_tokens"] * s["units"] for s in mine)
        for key in ("pg_loss", "kl", "clipped", "entropy", "value_loss", "ratio"):
            if tokens and any(key in s for s in mine):
                row[key if key != "clipped" else "clip_fraction"] = sum(s.get(key, 0) * s["units"] for s in mine) / tokens
        seconds = sum(s["tokens"] / s["tokens_per_s"] for s in mine if s.get("tokens_per_s"))
        row["train_tokens_per_s"] = sum(s["tokens"] for s in mine) / seconds if seconds else None
        row["train_seconds"] = seconds
        rows.append(row)
    return rows


ESTIMATOR_TAGS = {"grpo": ["grpo"], "dr_grpo": ["dr-grpo", "grpo"], "rloo": ["rloo"], "reinforce_pp": ["reinforce++"],
                  "gae": ["ppo"]}
"""Hub tags of each advantage estimator (``loss.estimator``); ``rl`` is added to all."""


def rl_cards(cfg: RLConfig, counts: Counter, result, change: dict | None):
    """The policy's card (its held-out strict instruction pass rate, start -> end, with the paired SE) and the
    critic's (PPO's value model)."""
    from alignline.stages.cards import stage_card, training_evaluation

    evaluation = training_evaluation(result, ("loss", "reward_mean", "kl"))
    if change:
        evaluation |= {"held-out strict instruction pass rate": f"{change['start']:.3f} -> {change['end']:.3f}",
                       "held-out change (paired SE)": f"{change['change']:+.3f} ({change['paired_se']:.3f})",
                       "held-out instructions": change["n"]}
    rewards = ", ".join(f"{s.label()} x{s.weight:g}" for s in cfg.reward)
    common = dict(data={"prompts": cfg.prompts, "eval": cfg.eval.prompts}, counts=counts,
                  settings=("iterations", "loss.estimator", "rollout.prompts", "rollout.group_size",
                            "rollout.sampling.temperature", "kl.coef", "kl.estimator", "kl.reference"))
    tags = [*ESTIMATOR_TAGS[cfg.loss.estimator], "rl"]
    policy = stage_card("rl", cfg, method=f"Online RL ({cfg.loss.estimator}; rewards: {rewards})", tags=tags,
                        evaluation=evaluation, **common)
    critic = stage_card("rl", cfg, method=f"Value model (critic) of an online RL run ({cfg.loss.estimator})",
                        tags=[*tags, "value-model"], evaluation={"steps": result.steps},
                        pipeline_tag="text-classification", parent=cfg.ppo.critic or cfg.model, **common)
    return policy, critic


def run(cfg: RLConfig) -> Path:
    from alignline.models.loading import load_causal_lm, load_reward_model, resolve_model
    from alignline.stages.common import stage_tokenizer
    from alignline.telemetry import Telemetry
    from alignline.train.accelerator import make_accelerator
    from alignline.train.checkpoint import save_trained_model
    from alignline.train.loop import train

    rd = RunDir("rl", cfg, cfg.output_dir, {
        "model": cfg.model, "prompts": cfg.prompts, "eval": cfg.eval.prompts,
        **models_when_set(reference=cfg.kl.reference, critic=cfg.ppo.critic,
                          **{f"reward_model:{i}": r.model for i, r in enumerate(cfg.reward) if r.type == "rm"},
                          **{f"reward_judge:{i}": r.judge.model for i, r in enumerate(cfg.reward)
                             if r.type == "judge" and r.judge is not None and r.judge.engine == "hf"})})
    if rd.skip_if_done():
        return rd.path
    accelerator = make_accelerator(cfg.train, rd.path)
    if accelerator.num_processes > 1:
        raise ConfigError("rl runs in one process for now (the rollout engine shares the policy object); "
                          "run it without accelerate launch")
    rd.start()
    if rd.fresh:
        shutil.rmtree(rd.path / "rollouts", ignore_errors=True)
        for name in ("eval_start.jsonl", "eval_last.jsonl"):  # else the new start would be compared to the old
            (rd.path / name).unlink(missing_ok=True)
    model_path, tokenizer = stage_tokenizer(cfg.model, cfg.trust_remote_code)
    counts: Counter = Counter()
    prompts, ids = load_prompts(cfg, tokenizer, counts)
    device = accelerator.device
    terms = [(s.label(), s.weight, build_reward(s, i, out_dir=rd.path, counts=counts, device=device))
             for i, s in enumerate(cfg.reward)]
    evaluate = eval_fn(cfg, tokenizer, rd.path) if cfg.eval.prompts else None
    dtype = training_dtype(cfg.dtype)
    policy = load_causal_lm(model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(device)
    engine = make_rollout_engine(cfg, policy, tokenizer)
    ref = None
    if cfg.kl.coef > 0:
        ref = load_causal_lm(resolve_model(cfg.kl.reference) if cfg.kl.reference else model_path, dtype=dtype,
                             trust_remote_code=cfg.trust_remote_code).to(device).eval().requires_grad_(False)
    critic, model = None, policy
    if ESTIMATORS[cfg.loss.estimator].critic:
        critic = load_reward_model(resolve_model(cfg.ppo.critic) if cfg.ppo.critic else model_path, dtype=dtype,
                                   trust_remote_code=cfg.trust_remote_code).to(device)
        model = ro.ActorCritic(policy, critic)
    tel = Telemetry(device)
    get = rollout_source(cfg, rd.path, prompts, ids, tokenizer, policy, ref, critic, engine, combine(terms), counts,
                         tel)
    n = cfg.rollout.prompts * cfg.rollout.group_size
    agg, max_new = cfg.loss.aggregation_name, cfg.rollout.sampling.max_new_tokens

    def collate(ix: list[int]):
        return collate_rollout(get(ix[0] // n), [i % n for i in ix], tokenizer.pad_token_id, agg, max_new)

    result = train(model, accelerator=accelerator, settings=cfg.train.model_copy(update={"epochs": cfg.iterations}),
                   out_dir=rd.path, plan=make_plan(cfg), collate=collate, count_units=lambda b: int(b["units"]),
                   step_fn=rl_step_fn(cfg), evaluate=evaluate, metric_keys=metric_names(cfg),
                   resume=cfg.resume and not rd.fresh, desc=f"rl ({cfg.loss.estimator})", telemetry=tel)
    if result.stopped_early:
        console.print(f"rl: stopped after step {result.steps} as asked; rerun to resume")
        return rd.path
    change = paired_change(rd.path)
    policy_card, critic_card = rl_cards(cfg, counts, result, change)
    with tel.phase("save_model"):
        save_trained_model(accelerator, policy, tokenizer, rd.path / "model", card=policy_card)
        if critic is not None:
            save_trained_model(accelerator, critic, tokenizer, rd.path / "critic", card=critic_card)
    rows = iteration_rows(rd.path, cfg.iterations)
    atomic_write_bytes(rd.path / "iterations.jsonl", jsonl_bytes(rows))
    from alignline.report.plots import plot_rl_curves

    plot_rl_curves(rows, rd.path / "rl_curves.png", title=f"rl ({cfg.loss.estimator})")
    rd.finish(counts, steps=result.steps, train_seconds=result.seconds, final_metrics=result.last_metrics,
              eval_metrics=result.eval_metrics, eval_metrics_start=result.eval_metrics_start,
              eval_change=change, model_dir=str(rd.path / "model"), phases=tel.summary())
    last = rows[-1] if rows else {}
    console.print(f"[green]rl done[/green] ({cfg.loss.estimator}): {cfg.iterations} iterations, {result.steps} steps; "
                  f"last reward {last.get('reward_mean', float('nan')):.4f}"
                  + (f"; held-out strict instruction pass rate {change['start']:.3f} -> {change['end']:.3f} "
                     f"({change['change']:+.3f} +- {change['paired_se']:.3f} paired SE, n={change['n']}; answers "
                     f"{change['start_words']:.1f} -> {change['end_words']:.1f} words)" if change else "")
                  + f"\n  model: {rd.path / 'model'}\n  iterations: {rd.path / 'iterations.jsonl'}")
    return rd.path
