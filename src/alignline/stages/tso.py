"""``alignline tso``: mini-batch iterative DPO (TSO, Chen et al. 2024).

The pairs are split (seeded) into K mini-batches of equal size (sizes differ by at most one). For
k = 1..K the reference is the policy after mini-batch k-1 (k = 1: the starting model): its log-probs on
mini-batch k are computed in one no-grad pass with the *current* weights just before training on it, so
no second model is ever held. Each mini-batch is a run of the shared loop in ``iter-k/`` (own schedule,
checkpoints, exact resume) and its result is saved as version ``versions/v{k}``. Dual-clip is the default
loss; any loss of ``alignline dpo`` works. Once the run is complete only the final version is kept (the
intermediate ones serve the run itself: the next mini-batch's reference), unless ``keep_versions``; the
mini-batches' checkpoints go too, unless ``train.keep_checkpoints_when_done``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field
from safetensors.torch import load_model

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import (
    atomic_write_json,
    fingerprint,
    read_manifest,
    read_pairs,
    read_prompts,
    write_manifest,
    write_records,
)
from alignline.data.records import Pair, Prompt
from alignline.errors import ConfigError
from alignline.generate.base import SamplingParams
from alignline.models import LoraSettings, load_causal_lm, save_model
from alignline.models.card import CardFacts
from alignline.report.plots import plot_reward_curves
from alignline.stages.cards import LOSS_TAGS, PREFERENCE_SETTINGS, stage_card, training_evaluation
from alignline.stages.common import (
    RunDir,
    TrainingDtype,
    TrustRemoteCode,
    console,
    input_fingerprint,
    models_when_set,
    stage_tokenizer,
    training_dtype,
)
from alignline.train.accelerator import make_accelerator
from alignline.train.checkpoint import complete_checkpoints, dropped_entry, is_sharded
from alignline.train.loop import TrainResult, TrainSettings, train
from alignline.train.pairs import TokenisedPair, collate_pairs, tokenise_pairs
from alignline.train.preference import (
    PAIR_METRICS,
    LossSettings,
    PairData,
    cached_reference,
    load_pairs_for,
    make_plan,
    pair_step_fn,
    reference_logps,
)


def self_pairs(model, tokenizer, prompts: list[Prompt], settings: RegenerateSettings, version: int,
               counts: Counter, max_length: int) -> list[Pair]:
    """Best-vs-worst pairs from ``model``'s own samples, ranked by the reward model (each prompt + response cut at
    ``max_length`` tokens, the pairs' own limit)."""
    from alignline.generate.hf import HFEngine
    from alignline.judges.reward import RewardModelJudge

    was_training = model.training
    model.eval()
    samples = HFEngine(model, tokenizer, source=f"policy-v{version}").generate(prompts, settings.n, settings.sampling)
    model.train(was_training)
    rm = RewardModelJudge.load(settings.reward_model, device=next(model.parameters()).device, max_length=max_length)
    out = []
    for prompt, responses in zip(prompts, samples):
        ok = [r for r in responses if r.text.strip()]
        if len(ok) < 2:
            counts["regenerate_too_few_samples"] += 1
            continue
        scores = rm.score(prompt.messages, [r.text for r in ok], ["pair"] * len(ok), counts)
        if scores is None:
            continue
        best = max(range(len(ok)), key=lambda i: scores[i])
        worst = min(range(len(ok)), key=lambda i: scores[i])
        if scores[best] - scores[worst] <= settings.min_gap or ok[best].text.strip() == ok[worst].text.strip():
            counts["regenerate_no_gap"] += 1
            continue
        out.append(Pair(id=f"{prompt.id}@v{version}", prompt=prompt.messages, chosen=ok[best].text,
                        rejected=ok[worst].text, provenance={
                            "source": f"policy-v{version}", "chosen_sample": ok[best].sample_idx,
                            "rejected_sample": ok[worst].sample_idx, "scores": [scores[best], scores[worst]],
                            "reward_model": settings.reward_model}))
    del rm
    counts["regenerated_pairs"] += len(out)
    return out


def default_tso_loss() -> LossSettings:
    return LossSettings(type="dual_clip", beta=0.1, margin_chosen=20.0, margin_rejected=10.0)


def default_tso_train() -> TrainSettings:
    # TSO: 2 epochs per iteration, Adam (0.9, 0.95), weight decay 0.05, gradient clipping 1.0.
    return TrainSettings(lr=5e-7, epochs=2, adam_betas=(0.9, 0.95), weight_decay=0.05, max_grad_norm=1.0,
                         schedule="linear", warmup_ratio=0.1, batch_size=4, grad_accum=8)


class RegenerateSettings(Section):
    """Between mini-batches, sample the current policy's own responses, rank them with a reward model and
    add best-vs-worst pairs to the next mini-batch (TSO: the base model's responses are regenerated)."""

    prompts: RecordsSource
    """Prompt records; split into K parts like the pairs, part k feeds mini-batch k (k >= 2)."""
    reward_model: str
    """Reward model that ranks the samples (e.g. from ``alignline rm``)."""
    n: int = Field(4, ge=2)
    """Samples per prompt; the best and the worst by reward make one pair."""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    """Sampling of the policy's responses."""
    min_gap: float = Field(0.0, ge=0)
    """Skip prompts whose best and worst scores differ by no more than this (counted)."""


class TSOConfig(Section):
    """Configuration of ``alignline tso``."""

    model: str
    """Starting policy (and the first reference)."""
    output_dir: str = "runs/tso"
    """Run directory: iter-k/ (one loop run per mini-batch), versions/v{k}/, versions.json."""
    keep_versions: bool = False
    """Keep every versions/v{k} once the run is complete; false keeps only the final v{K} (each version is a whole
    merged model: 0.5 GB for a 135M model in fp32). Ask for it to evaluate or sample an intermediate version."""
    data: PairData
    """Preference pairs, split into the mini-batches."""
    minibatches: int = Field(3, ge=1)
    """K: number of mini-batches, i.e. of reference updates (TSO: 3)."""
    loss: LossSettings = Field(default_factory=default_tso_loss)
    """The preference loss (default: TSO dual-clip, beta 0.1, margins 20 / 10)."""
    train: TrainSettings = Field(default_factory=default_tso_train)
    """Loop settings, applied to each mini-batch (epochs are per mini-batch)."""
    split_seed: int = 0
    """Seed of the split into mini-batches."""
    pair_layout: Literal["shared", "separate"] = "shared"
    """Prefix-shared pair rows, or two rows per pair."""
    ref_batch_size: int = 8
    """Pairs per forward pass in each reference pass."""
    lora: LoraSettings | None = None
    """Train LoRA adapters (merged into each saved version)."""
    dtype: TrainingDtype
    trust_remote_code: TrustRemoteCode
    regenerate: RegenerateSettings | None = None
    """Regenerate and rescore the policy's own responses between mini-batches (null: off)."""
    stop_at: tuple[int, int] | None = None
    """(mini-batch, step): stop there as if interrupted; for testing resume."""
    resume: bool = True
    """Continue an interrupted run (completed mini-batches are kept, the current one resumes exactly)."""


def split_minibatches(n: int, k: int, seed: int) -> list[list[int]]:
    """Indices 0..n-1 shuffled with ``seed`` and cut into ``k`` contiguous parts of sizes differing by <= 1."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [order[bounds[i]: bounds[i + 1]] for i in range(k)]


# --------------------------------------------------------------------------- the stage's steps

@dataclass
class Progress:
    """What the mini-batches done so far leave behind: versions.json's rows, their metrics files and timings."""

    versions: list[dict]
    metrics_files: list[Path] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)

    def add(self, k: int, version_dir: Path, it_dir: Path, pairs: int) -> None:
        self.versions.append({"version": k, "path": str(version_dir), "pairs": pairs})
        self.metrics_files.append(it_dir / "metrics.jsonl")


def load_minibatches(cfg: TSOConfig, tokenizer, counts: Counter, run_dir: Path
                     ) -> tuple[list[TokenisedPair], list[list[int]]]:
    """The tokenised pairs and their split into mini-batches (indices), recorded in ``minibatches.json``."""
    pairs, _ = load_pairs_for(cfg.data.model_copy(update={"eval": None}), tokenizer, counts)
    if len(pairs) < cfg.minibatches:
        raise ConfigError(f"{len(pairs)} usable pairs cannot fill minibatches={cfg.minibatches}; "
                          "lower minibatches or add pairs")
    parts = split_minibatches(len(pairs), cfg.minibatches, cfg.split_seed)
    atomic_write_json(run_dir / "minibatches.json", {"ids": [[pairs[i].id for i in p] for p in parts]})
    return pairs, parts


def regenerate_prompt_parts(cfg: TSOConfig) -> list[list[Prompt]]:
    """The regenerate prompts split like the pairs (part k feeds mini-batch k); none without ``regenerate``."""
    if cfg.regenerate is None:
        return []
    prompts = read_prompts(cfg.regenerate.prompts)
    return [[prompts[i] for i in p] for p in split_minibatches(len(prompts), cfg.minibatches, cfg.split_seed)]


def minibatch_done(it_dir: Path, version_dir: Path, resume: bool) -> bool:
    # a run redone with other settings or inputs (RunDir.fresh: resume False) reuses nothing, not even
    # finished mini-batches
    done = read_manifest(it_dir)
    return bool(resume and done and done.get("status") == "complete" and (version_dir / "model.safetensors").exists())


def with_self_pairs(cfg: TSOConfig, k: int, pairs: list[TokenisedPair], policy, tokenizer,
                    prompt_parts: list[list[Prompt]], counts: Counter, it_dir: Path) -> list[TokenisedPair]:
    """Mini-batch k's pairs, plus (with ``regenerate``, k >= 2) the policy's own best-vs-worst pairs, sampled once
    and kept in ``iter-k/self_pairs.jsonl``."""
    if cfg.regenerate is None or k == 1:
        return pairs
    cache = it_dir / "self_pairs.jsonl"
    if cache.exists():
        fresh = read_pairs(cache)
    else:
        fresh = self_pairs(policy, tokenizer, prompt_parts[k - 1], cfg.regenerate, k - 1, counts,
                           cfg.data.max_length)
        write_records(cache, fresh)
    return pairs + tokenise_pairs(fresh, tokenizer, max_length=cfg.data.max_length, counts=counts,
                                  max_drop_fraction=1.0, where=str(cache))


def with_reference(cfg: TSOConfig, k: int, pairs: list[TokenisedPair], reference_path: str, model, accelerator,
                   pad_id: int, it_dir: Path) -> tuple[list[TokenisedPair], float]:
    """Mini-batch k's pairs with the current weights' log-probs as reference (or the stored ones), and the seconds
    it took."""
    key = fingerprint({"reference": fingerprint(reference_path), "data": input_fingerprint(cfg.data.train),
                       "pairs": [p.id for p in pairs], "normalize": cfg.loss.normalize,
                       "max_length": cfg.data.max_length})
    t0 = time.perf_counter()
    referenced = cached_reference(
        it_dir / "ref_logps.json", key,
        lambda: reference_logps(model, pairs, accelerator=accelerator, pad_id=pad_id, layout=cfg.pair_layout,
                                normalize=cfg.loss.normalize, batch_size=cfg.ref_batch_size,
                                desc=f"reference pass {k}/{cfg.minibatches}"),
        pairs, accelerator,
    )
    return referenced, time.perf_counter() - t0


def train_minibatch(cfg: TSOConfig, k: int, pairs: list[TokenisedPair], loss_fn: Callable, model, accelerator,
                    pad_id: int, it_dir: Path, resume: bool) -> TrainResult:
    """One run of the loop on mini-batch k in ``iter-k/`` (stopping where ``stop_at`` says)."""
    settings = cfg.train
    if cfg.stop_at is not None and cfg.stop_at[0] == k:
        settings = settings.model_copy(update={"stop_after_step": cfg.stop_at[1]})
    result = train(
        accelerator.unwrap_model(model), accelerator=accelerator, settings=settings, out_dir=it_dir,
        plan=make_plan(pairs, settings, cfg.pair_layout, accelerator.num_processes),
        collate=lambda ix: collate_pairs([pairs[i] for i in ix], pad_id, cfg.pair_layout),
        count_units=lambda b: int(b["n_pairs"]),
        step_fn=pair_step_fn(loss_fn, normalize=cfg.loss.normalize, sft_weight=cfg.loss.sft_weight),
        metric_keys=PAIR_METRICS, resume=resume, desc=f"tso {k}/{cfg.minibatches} ({cfg.loss.type})",
        final_checkpoint=k < cfg.minibatches,  # mini-batch k+1 resumes from it (run, above)
    )
    accelerator.free_memory()
    return result


def version_card(cfg: TSOConfig, k: int, counts: Counter, result: TrainResult, parent: str, pairs: int) -> CardFacts:
    """The card of ``versions/v{k}``: its parent is the version before it (the mini-batch's reference)."""
    return stage_card("tso", cfg, method=f"TSO mini-batch iterative preference optimisation, version {k} of "
                      f"{cfg.minibatches} ({cfg.loss.type}, beta {cfg.loss.beta})",
                      tags=["tso", *LOSS_TAGS[cfg.loss.type]], data={"train": cfg.data.train},
                      counts={**counts, "minibatch": k, "minibatch_pairs": pairs}, parent=parent,
                      settings=("minibatches", *PREFERENCE_SETTINGS),
                      evaluation=training_evaluation(result, ("loss", *PAIR_METRICS)))


def save_version(k: int, model, tokenizer, accelerator, it_dir: Path, version_dir: Path, *, pairs: int,
                 reference_path: str, result: TrainResult, reference_seconds: float, card: CardFacts) -> None:
    """``versions/v{k}`` (LoRA merged, with its ``card``) and the mini-batch's manifest, which marks it complete."""
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, version_dir, merge_lora=True, card=card)
        write_manifest(it_dir, stage="tso-minibatch", status="complete", minibatch=k, pairs=pairs,
                       reference=reference_path, steps=result.steps, reference_seconds=reference_seconds,
                       train_seconds=result.seconds, final_metrics=result.last_metrics)
    accelerator.wait_for_everyone()


def intermediate_versions(cfg: TSOConfig, rd: RunDir, progress: Progress) -> list[dict]:
    """The ``dropped`` entries of v1..v{K-1} (none with ``keep_versions``); their versions.json rows are marked
    ``removed``."""
    if cfg.keep_versions:
        return []
    dropped = []
    for row in progress.versions[1:-1]:  # [0] is the starting model, [-1] the final version
        if Path(row["path"]).is_dir():
            dropped.append(dropped_entry(Path(row["path"]), rd.path, "intermediate TSO version (a whole model)",
                                         "keep_versions=true"))
            row["removed"] = True
    return dropped


def finish(cfg: TSOConfig, rd: RunDir, progress: Progress, counts: Counter, accelerator) -> None:
    dropped = intermediate_versions(cfg, rd, progress)  # measured by every process before any removes them
    if accelerator.is_main_process:
        atomic_write_json(rd.path / "versions.json", progress.versions)
        plot_reward_curves(progress.metrics_files, rd.path / "reward_curves.png",
                           title=f"TSO mini-batch iterative ({cfg.loss.type}); dotted: reference updates")
    rd.finish(counts, versions=progress.versions, timings=progress.timings, model_dir=progress.versions[-1]["path"],
              dropped=dropped)
    console.print(
        f"[green]tso done[/green]: {cfg.minibatches} mini-batches, versions:\n"
        + "\n".join(f"  v{v['version']}: {v['path']}" + (" (removed)" if v.get("removed") else "")
                    for v in progress.versions)
        + f"\n  reward curves: {rd.path / 'reward_curves.png'}"
    )


# --------------------------------------------------------------------------- the stage

def run(cfg: TSOConfig) -> Path:
    regenerate = cfg.regenerate
    rd = RunDir("tso", cfg, cfg.output_dir, {
        "model": cfg.model, "train": cfg.data.train,
        **models_when_set(regenerate_prompts=regenerate and regenerate.prompts,
                          regenerate_reward_model=regenerate and regenerate.reward_model)}, ("resume", "stop_at"))
    if rd.skip_if_done():
        return rd.path
    accelerator = make_accelerator(cfg.train, rd.path)
    rd.start(accelerator.wait_for_everyone)
    if is_sharded(accelerator):
        raise ConfigError("tso does not run under FSDP yet: each mini-batch recomputes the reference with the "
                          "policy being trained, split by data across processes. Launch it data parallel "
                          "(configs/gpu/accelerate_ddp.yaml)")
    model_path, tokenizer = stage_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id, resume = tokenizer.pad_token_id, cfg.resume and not rd.fresh
    counts: Counter = Counter()
    pairs, parts = load_minibatches(cfg, tokenizer, counts, rd.path)
    prompt_parts = regenerate_prompt_parts(cfg)
    model = load_causal_lm(model_path, dtype=training_dtype(cfg.dtype, cfg.lora),
                           trust_remote_code=cfg.trust_remote_code, lora=cfg.lora)
    model.to(accelerator.device)
    loss_fn = cfg.loss.bound()
    progress = Progress(versions=[{"version": 0, "path": str(model_path)}])
    loaded = 0  # the version the in-memory weights hold
    for k, part in enumerate(parts, start=1):
        it_dir, version_dir = rd.path / f"iter-{k}", rd.path / "versions" / f"v{k}"
        if minibatch_done(it_dir, version_dir, resume):
            progress.add(k, version_dir, it_dir, len(part))
            continue
        if loaded != k - 1:
            # resuming: the policy after mini-batch k-1 (its final checkpoint, written by this same code) is
            # both the starting point and the reference of mini-batch k
            last = complete_checkpoints(rd.path / f"iter-{k - 1}")[-1]
            load_model(accelerator.unwrap_model(model), str(last / "model.safetensors"))
        loaded = k
        minibatch = with_self_pairs(cfg, k, [pairs[i] for i in part], accelerator.unwrap_model(model), tokenizer,
                                    prompt_parts, counts, it_dir)
        reference_path = progress.versions[-1]["path"]
        minibatch, ref_seconds = with_reference(cfg, k, minibatch, reference_path, model, accelerator, pad_id, it_dir)
        result = train_minibatch(cfg, k, minibatch, loss_fn, model, accelerator, pad_id, it_dir, resume)
        if result.stopped_early:
            console.print(f"tso: stopped in mini-batch {k} after step {result.steps} as asked; rerun to resume")
            return rd.path
        card = version_card(cfg, k, counts, result, cfg.model if k == 1 else reference_path, len(part))
        save_version(k, model, tokenizer, accelerator, it_dir, version_dir, pairs=len(part),
                     reference_path=reference_path, result=result, reference_seconds=ref_seconds, card=card)
        progress.add(k, version_dir, it_dir, len(part))
        progress.timings.append({"minibatch": k, "reference_seconds": ref_seconds, "train_seconds": result.seconds})
    finish(cfg, rd, progress, counts, accelerator)
    return rd.path
