"""``alignline rm``: the Xwin reward model: SFT backbone + a new linear head, Bradley-Terry loss.

Each pair is one prefix-shared row (prompt + chosen + rejected, the rejected part unable to see the chosen
one), so the prompt is computed once per pair; the score of a response is read at its last token. The
evaluation reports accuracy overall and per rating level (Xwin Table 3) and score statistics.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from rich.table import Table

from alignline import losses
from alignline.config import Section
from alignline.data.io import atomic_write_json
from alignline.data.records import RATINGS
from alignline.evaluate.clustered import ratio_estimate
from alignline.judges.reward import pair_rewards
from alignline.models.card import CardFacts
from alignline.models.loading import LoraSettings, load_reward_model
from alignline.stages.cards import stage_card, training_evaluation
from alignline.stages.common import (
    RunDir,
    TrainingDtype,
    TrustRemoteCode,
    console,
    stage_tokenizer,
    training_dtype,
)
from alignline.telemetry import Telemetry
from alignline.train.accelerator import make_accelerator
from alignline.train.checkpoint import save_trained_model
from alignline.train.loop import TrainSettings, train
from alignline.train.pairs import TokenisedPair, collate_pairs
from alignline.train.preference import PairData, load_pairs_for, make_plan

RM_METRICS = ("accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin")


def default_rm_train() -> TrainSettings:
    # Xwin-RM: 1 epoch, lr 1e-5, cosine to 0, 3 % warm-up, 128-256 pairs per batch (8 x 16 here).
    return TrainSettings(lr=1e-5, epochs=1, schedule="cosine", warmup_ratio=0.03, batch_size=8, grad_accum=16)


def default_margins() -> dict[str, float]:
    return {"significantly": 1.0, "better": 2 / 3, "slightly": 1 / 3, "negligibly": 0.0, "unsure": 0.0}


class RMConfig(Section):
    """Configuration of ``alignline rm``."""

    model: str
    """The SFT checkpoint the backbone comes from (its LM head is dropped, a scalar head is added)."""
    output_dir: str = "runs/rm"
    """Run directory: model/ (loads with AutoModelForSequenceClassification), eval.json, metrics.jsonl."""
    data: PairData
    """Preference pairs (Xwin-Pair), with optional ratings; data.eval for the held-out accuracy."""
    margin_by_rating: bool = False
    """Subtract a rating-dependent margin inside the loss (Llama-2 style); margins below."""
    margins: dict[str, float] = Field(default_factory=default_margins)
    """Margin per rating level when margin_by_rating is on (pairs without a rating: 0)."""
    train: TrainSettings = Field(default_factory=default_rm_train)
    """Loop settings (defaults: Xwin-RM)."""
    pair_layout: Literal["shared", "separate"] = "shared"
    """Prefix-shared pair rows, or two rows per pair."""
    eval_batch_size: int = 8
    """Pairs per forward pass in evaluation."""
    lora: LoraSettings | None = None
    """Train LoRA adapters (+ the head), merged into the saved model."""
    dtype: TrainingDtype
    trust_remote_code: TrustRemoteCode
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir."""


def rm_step_fn(model, batch):
    scores_chosen, scores_rejected = pair_rewards(model, batch)
    loss_vec, chosen, rejected = losses.bradley_terry_loss(scores_chosen, scores_rejected, batch.get("margin"))
    metrics = {"accuracy": float((chosen > rejected).float().sum()), "rewards/chosen": float(chosen.sum()),
               "rewards/rejected": float(rejected.sum()), "rewards/margin": float((chosen - rejected).sum())}
    return loss_vec.sum(), int(scores_chosen.shape[0]), metrics


@torch.no_grad()
def evaluate_rm(model, pairs: list[TokenisedPair], *, pad_id: int, layout: str, batch_size: int, device) -> dict:
    """Accuracy overall and per rating level, and score statistics, on ``pairs``."""
    model.eval()
    chosen, rejected, ratings = [], [], []
    for s in range(0, len(pairs), batch_size):
        part = pairs[s: s + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(part, pad_id, layout).items()}
        scores_chosen, scores_rejected = pair_rewards(model, batch)
        chosen += scores_chosen.tolist()
        rejected += scores_rejected.tolist()
        ratings += [pair.rating or "unrated" for pair in part]
    return summarize_scores(chosen, rejected, ratings)


def summarize_scores(chosen: list[float], rejected: list[float], ratings: list[str]) -> dict:
    """Accuracy (chosen scored above rejected) overall and per rating level, each with its standard error over
    pairs, and score statistics."""
    scores = chosen + rejected
    bad = sum(1 for x in scores if not math.isfinite(x))
    right = [float(c > r) for c, r in zip(chosen, rejected)]
    by: dict[str, list[float]] = defaultdict(list)
    for hit, rating in zip(right, ratings):
        by[rating].append(hit)

    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    def se(hits: list[float]) -> float | None:  # the standard error of a mean (None below two pairs)
        return ratio_estimate(hits, [1] * len(hits)).se

    order = (*RATINGS, "unrated")
    score_mean = mean(scores)  # once, not once per score inside the deviations below
    return {
        "pairs": len(chosen), "non_finite_scores": bad,
        "accuracy": mean(right), "accuracy_se": se(right),
        "accuracy_by_rating": {k: {"pairs": len(v), "accuracy": mean(v), "se": se(v)}
                               for k, v in sorted(by.items(), key=lambda kv: order.index(kv[0]))},
        "score_mean_chosen": mean(chosen), "score_mean_rejected": mean(rejected),
        "score_std": math.sqrt(mean([(x - score_mean) ** 2 for x in scores])),
        "margin_mean": mean([c - r for c, r in zip(chosen, rejected)]),
    }


def rm_card(cfg: RMConfig, counts: Counter, result, final: dict) -> CardFacts:
    """The reward model's card: its pairwise accuracy (overall and per rating) on the held-out pairs."""
    evaluation = {**training_evaluation(result, ("loss", "accuracy")), "accuracy split": final["split"],
                  "pairs evaluated": final["pairs"], "pairwise accuracy": final["accuracy"],
                  **{f"accuracy ({k})": v["accuracy"] for k, v in final["accuracy_by_rating"].items()}}
    return stage_card("rm", cfg, method="Reward model (Bradley-Terry on preference pairs, scalar head)",
                      tags=["reward-model", "reward-trainer"], data={"train": cfg.data.train, "eval": cfg.data.eval},
                      counts=counts, settings=("data.max_length", "margin_by_rating", "pair_layout"),
                      evaluation=evaluation, pipeline_tag="text-classification")


def run(cfg: RMConfig) -> Path:
    rd = RunDir("rm", cfg, cfg.output_dir, {"model": cfg.model, "train": cfg.data.train, "eval": cfg.data.eval})
    if rd.skip_if_done():
        return rd.path
    accelerator = make_accelerator(cfg.train, rd.path)
    rd.start(accelerator.wait_for_everyone)
    model_path, tokenizer = stage_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id, layout = tokenizer.pad_token_id, cfg.pair_layout
    counts: Counter = Counter()
    train_pairs, eval_pairs = load_pairs_for(cfg.data, tokenizer, counts, keep_tail=True)
    if cfg.margin_by_rating:
        train_pairs = [replace(pair, margin=cfg.margins.get(pair.rating or "", 0.0)) for pair in train_pairs]
    counts["ratings"] = dict(Counter(pair.rating or "unrated" for pair in train_pairs))

    device_dtype = training_dtype(cfg.dtype, cfg.lora)
    model = load_reward_model(model_path, dtype=device_dtype, trust_remote_code=cfg.trust_remote_code, lora=cfg.lora)
    model.to(accelerator.device)

    latest: dict = {}  # the loop's newest evaluation in full, so the final one is not computed twice

    def evaluate(m) -> dict[str, float]:
        ev = evaluate_rm(m, eval_pairs, pad_id=pad_id, layout=layout, batch_size=cfg.eval_batch_size,
                         device=accelerator.device)
        flat = {k: v for k, v in ev.items() if isinstance(v, (int, float))}
        flat.update({f"accuracy/{k}": v["accuracy"] for k, v in ev["accuracy_by_rating"].items()})
        latest.update(full=ev, flat=flat)
        return flat

    tel = Telemetry(accelerator.device)
    result = train(
        model, accelerator=accelerator, settings=cfg.train, out_dir=rd.path, plan=make_plan(train_pairs, cfg.train, layout, accelerator.num_processes),
        collate=lambda ix: collate_pairs([train_pairs[i] for i in ix], pad_id, layout),
        count_units=lambda b: int(b["n_pairs"]), step_fn=rm_step_fn,
        evaluate=evaluate if eval_pairs else None, metric_keys=RM_METRICS, resume=cfg.resume and not rd.fresh, desc="rm",
        telemetry=tel, count_logits=lambda b: 2 * int(b["n_pairs"]),  # the scalar head reads each response's last token
    )
    if result.stopped_early:
        console.print(f"rm: stopped after step {result.steps} as asked; rerun to resume")
        return rd.path
    with tel.phase("final_eval"):
        # the loop evaluated the trained model last (its end-of-run evaluation) unless it never stepped or resumed
        # past its end: reuse that one, else evaluate now
        final = latest["full"] if result.eval_metrics and latest.get("flat") is result.eval_metrics else evaluate_rm(
            accelerator.unwrap_model(model), eval_pairs or train_pairs, pad_id=pad_id, layout=layout,
            batch_size=cfg.eval_batch_size, device=accelerator.device)
    final["split"] = "eval" if eval_pairs else "train (no data.eval given)"
    with tel.phase("save_model"):
        save_trained_model(accelerator, model, tokenizer, rd.path / "model", card=rm_card(cfg, counts, result, final))
    if accelerator.is_main_process:
        atomic_write_json(rd.path / "eval.json", final)
    accelerator.wait_for_everyone()
    rd.finish(counts, steps=result.steps, seconds=result.seconds, final_metrics=result.last_metrics,
              eval=final, model_dir=str(rd.path / "model"), phases=tel.summary())
    table = Table(title=f"reward model accuracy ({final['split']})")
    for col in ("rating", "pairs", "accuracy", "SE"):
        table.add_column(col, justify="right")
    for k, v in final["accuracy_by_rating"].items():
        table.add_row(k, str(v["pairs"]), f"{v['accuracy']:.3f}", "-" if v["se"] is None else f"{v['se']:.3f}")
    overall_se = final["accuracy_se"]
    table.add_row("all", str(final["pairs"]), f"{final['accuracy']:.3f}", "-" if overall_se is None else f"{overall_se:.3f}")
    console.print(table)
    console.print(
        f"[green]rm done[/green]: {result.steps} steps; scores chosen {final['score_mean_chosen']:.3f} / rejected "
        f"{final['score_mean_rejected']:.3f} (std {final['score_std']:.3f})\n  model: {rd.path / 'model'}\n"
        f"  eval: {rd.path / 'eval.json'}\n  counts: {dict(counts)}"
    )
    return rd.path
