"""The body of ``alignline rl`` (settings: :mod:`alignline.stages.rl.config`; one rollout:
:mod:`alignline.stages.rl.rollout`; loss step and plan: :mod:`alignline.stages.rl.step`).

Read top to bottom: check the inputs (before any model is loaded where possible), load the policy (and the
frozen reference, and PPO's critic), build the rollout source the plan pulls from, run the one training loop
with the iterations as its epochs, then write the model, ``iterations.jsonl`` and the curves.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from alignline.advantages import ESTIMATORS
from alignline.data.io import adapt_prompt, atomic_write_bytes, iter_jsonl, iter_records, jsonl_bytes
from alignline.data.records import Prompt
from alignline.errors import ConfigError, DataError
from alignline.rewards import build_reward, combine
from alignline.stages.common import RunDir, console, models_when_set, record_drops, training_dtype
from alignline.stages.rl.config import RLConfig, metric_names
from alignline.stages.rl.evaluation import eval_fn, paired_change
from alignline.stages.rl.rollout import make_rollout_engine, read_rollout, rollout_source
from alignline.stages.rl.step import collate_rollout, make_plan, rl_step_fn
from alignline.train.actor_critic import ActorCritic


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


def iteration_rows(root: Path, iterations: int) -> list[dict]:
    """One row per iteration: the rollout's statistics and the per-token means of its optimizer steps."""
    steps = [row for _, row in iter_jsonl(root / "metrics.jsonl")]
    rows = []
    for it in range(iterations):
        stored = read_rollout(root, it)
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
    from alignline.train.accelerator import make_accelerator
    from alignline.train.checkpoint import save_trained_model
    from alignline.train.loop import train
    from alignline.train.telemetry import Telemetry

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
        model = ActorCritic(policy, critic)
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
