"""The body of ``alignline rl``: the settings are :mod:`alignline.stages.rl.config`, one rollout
:mod:`alignline.stages.rl.rollout` (engine side: :mod:`alignline.stages.rl.sampling`), the loss step, the plan
and the collate :mod:`alignline.stages.rl.step`.

Read top to bottom (:func:`run`): check the inputs (before any model is loaded where possible), load the policy
(and the frozen reference, and PPO's critic), build the rollout source, run the one training loop with the
iterations as its epochs (the source's ``start_iteration`` is the loop's per-epoch hook: it reads the
iteration's shard or samples a new rollout with the weights the loop holds then), then write the model,
``iterations.jsonl`` and the curves.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from alignline.advantages import ESTIMATORS
from alignline.data.drops import record_drops
from alignline.data.io import adapt_prompt, atomic_write_bytes, iter_jsonl, iter_records, jsonl_bytes
from alignline.data.records import Prompt
from alignline.errors import ConfigError, DataError
from alignline.rewards import build_reward, combine
from alignline.stages.common import RunDir, console, models_when_set, training_dtype
from alignline.stages.rl.config import RLConfig, metric_names
from alignline.stages.rl.evaluation import eval_fn, paired_change
from alignline.stages.rl.rollout import RolloutModels, RolloutSource, read_rollout
from alignline.stages.rl.sampling import RolloutSampler, make_rollout_engine
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
        row = dict(stored.stats)
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


def run_dir(cfg: RLConfig) -> RunDir:
    """The run directory, fingerprinted by the config and every model and data input."""
    return RunDir("rl", cfg, cfg.output_dir, {
        "model": cfg.model, "prompts": cfg.prompts, "eval": cfg.eval.prompts,
        **models_when_set(reference=cfg.kl.reference, critic=cfg.ppo.critic,
                          **{f"reward_model:{i}": r.model for i, r in enumerate(cfg.reward) if r.type == "rm"},
                          **{f"reward_judge:{i}": r.judge.model for i, r in enumerate(cfg.reward)
                             if r.type == "judge" and r.judge is not None and r.judge.engine == "hf"})})


def load_models(cfg: RLConfig, model_path, tokenizer, device) -> tuple[RolloutModels, object]:
    """The policy, the rollout engine over it (an unreachable server fails here, before the other models
    load), the frozen reference (kl.coef > 0) and PPO's critic."""
    from alignline.models.loading import load_causal_lm, load_reward_model, resolve_model

    dtype, trust = training_dtype(cfg.dtype), cfg.trust_remote_code
    policy = load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust).to(device)
    engine = make_rollout_engine(cfg, policy, tokenizer)
    ref = None
    if cfg.kl.coef > 0:
        ref = load_causal_lm(resolve_model(cfg.kl.reference) if cfg.kl.reference else model_path, dtype=dtype,
                             trust_remote_code=trust).to(device).eval().requires_grad_(False)
    critic = None
    if ESTIMATORS[cfg.loss.estimator].critic:
        critic = load_reward_model(resolve_model(cfg.ppo.critic) if cfg.ppo.critic else model_path, dtype=dtype,
                                   trust_remote_code=trust).to(device)
    return RolloutModels(policy, ref, critic), engine


def train_iterations(cfg: RLConfig, rd: RunDir, accelerator, models: RolloutModels, source: RolloutSource,
                     pad_id: int, evaluate, tel):
    """The one training loop over ``iterations`` epochs: the source's ``start_iteration`` makes (or reads back)
    each iteration's rollout before its first step, and the collate takes the responses the plan names."""
    from alignline.train.loop import train

    model = ActorCritic(models.policy, models.critic) if models.critic is not None else models.policy
    agg, max_new = cfg.loss.aggregation_name, cfg.rollout.sampling.max_new_tokens

    def collate(refs):
        return collate_rollout(source.responses(refs), pad_id, agg, max_new)

    return train(model, accelerator=accelerator, settings=cfg.train.model_copy(update={"epochs": cfg.iterations}),
                 out_dir=rd.path, plan=make_plan(cfg), collate=collate, count_units=lambda b: int(b["units"]),
                 step_fn=rl_step_fn(cfg), evaluate=evaluate, metric_keys=metric_names(cfg),
                 resume=cfg.resume and not rd.fresh, desc=f"rl ({cfg.loss.estimator})", telemetry=tel,
                 epoch_start=source.start_iteration)


def run(cfg: RLConfig) -> Path:
    from alignline.stages.common import stage_tokenizer
    from alignline.telemetry import Telemetry
    from alignline.train.accelerator import make_accelerator

    rd = run_dir(cfg)
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
    reward_fn = combine([(s.label(), s.weight, build_reward(s, i, out_dir=rd.path, counts=counts, device=device))
                         for i, s in enumerate(cfg.reward)])
    evaluate = eval_fn(cfg, tokenizer, rd.path) if cfg.eval.prompts else None
    models, engine = load_models(cfg, model_path, tokenizer, device)
    tel = Telemetry(device)
    sampler = RolloutSampler(cfg, engine, models.policy, tokenizer, rd.path,
                             logprobs=cfg.needs_old_logps and cfg.rollout.engine_logprobs)
    source = RolloutSource(cfg, rd.path, prompts, ids, sampler, models, reward_fn, counts, tel)
    result = train_iterations(cfg, rd, accelerator, models, source, tokenizer.pad_token_id, evaluate, tel)
    if result.stopped_early:
        console.print(f"rl: stopped after step {result.steps} as asked; rerun to resume")
        return rd.path
    finish(cfg, rd, accelerator, models, tokenizer, result, counts, tel)
    return rd.path


def finish(cfg: RLConfig, rd: RunDir, accelerator, models: RolloutModels, tokenizer, result, counts: Counter,
           tel) -> None:
    """The trained model (and critic) with their cards, iterations.jsonl, the curves, the manifest."""
    from alignline.report.plots import plot_rl_curves
    from alignline.train.checkpoint import save_trained_model

    change = paired_change(rd.path)
    policy_card, critic_card = rl_cards(cfg, counts, result, change)
    with tel.phase("save_model"):
        save_trained_model(accelerator, models.policy, tokenizer, rd.path / "model", card=policy_card)
        if models.critic is not None:
            save_trained_model(accelerator, models.critic, tokenizer, rd.path / "critic", card=critic_card)
    rows = iteration_rows(rd.path, cfg.iterations)
    atomic_write_bytes(rd.path / "iterations.jsonl", jsonl_bytes(rows))
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
