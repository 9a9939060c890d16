"""``alignline tso``: mini-batch iterative DPO (TSO, Chen et al. 2024).

The pairs are split (seeded) into K mini-batches of equal size (sizes differ by at most one). For
k = 1..K the reference is the policy after mini-batch k-1 (k = 1: the starting model): its log-probs on
mini-batch k are computed in one no-grad pass with the *current* weights just before training on it, so
no second model is ever held. Each mini-batch is a run of the shared loop in ``iter-k/`` (own schedule,
checkpoints, exact resume) and its result is saved as version ``versions/v{k}``. Dual-clip is the default
loss; any loss of ``alignline dpo`` works.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field
from safetensors.torch import load_model

from alignline.config import Section
from alignline.data.chat import ensure_chat_template
from alignline.data.io import atomic_write_json, fingerprint, read_manifest, read_pairs, write_manifest
from alignline.errors import ConfigError
from alignline.models import LoraSettings, load_causal_lm, load_tokenizer, resolve_model, save_model
from alignline.report.plots import plot_reward_curves
from alignline.stages.common import RunDir, console
from alignline.stages.dpo import (
    PAIR_METRICS,
    LossSettings,
    PairData,
    cached_reference,
    make_plan,
    pair_step_fn,
    reference_logps,
)
from alignline.train.loop import TrainSettings, complete_checkpoints, make_accelerator, train
from alignline.train.pairs import collate_pairs, tokenise_pairs


def default_tso_loss() -> LossSettings:
    return LossSettings(type="dual_clip", beta=0.1, margin_chosen=20.0, margin_rejected=10.0)


def default_tso_train() -> TrainSettings:
    # TSO: 2 epochs per iteration, Adam (0.9, 0.95), weight decay 0.05, gradient clipping 1.0.
    return TrainSettings(lr=5e-7, epochs=2, adam_betas=(0.9, 0.95), weight_decay=0.05, max_grad_norm=1.0,
                         schedule="linear", warmup_ratio=0.1, batch_size=4, grad_accum=8)


class TSOConfig(Section):
    """Configuration of ``alignline tso``."""

    model: str
    """Starting policy (and the first reference)."""
    output_dir: str = "runs/tso"
    """Run directory: iter-k/ (one loop run per mini-batch), versions/v{k}/, versions.json."""
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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for loading."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory."""
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


def run(cfg: TSOConfig) -> Path:
    rd = RunDir("tso", cfg, cfg.output_dir, {"model": cfg.model, "train": cfg.data.train}, ("resume", "stop_at"))
    if rd.up_to_date():
        console.print(f"[green]tso: {rd.path} is up to date[/green]; nothing to do")
        return rd.path
    rd.start()
    accelerator = make_accelerator(cfg.train, rd.path)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    ensure_chat_template(tokenizer)
    pad_id, layout, normalize = tokenizer.pad_token_id, cfg.pair_layout, cfg.loss.normalize

    counts: Counter = Counter()
    pairs = read_pairs(cfg.data.train)[: cfg.data.max_examples]
    examples = tokenise_pairs(pairs, tokenizer, max_length=cfg.data.max_length, counts=counts,
                              max_drop_fraction=cfg.data.max_drop_fraction, where=cfg.data.train)
    if len(examples) < cfg.minibatches:
        raise ConfigError(f"{len(examples)} usable pairs cannot fill minibatches={cfg.minibatches}; "
                          "lower minibatches or add pairs")
    parts = split_minibatches(len(examples), cfg.minibatches, cfg.split_seed)
    atomic_write_json(rd.path / "minibatches.json", {"ids": [[examples[i]["id"] for i in p] for p in parts]})

    device_dtype = "float32" if accelerator.device.type == "cpu" else cfg.dtype
    model = load_causal_lm(model_path, dtype=device_dtype, trust_remote_code=cfg.trust_remote_code, lora=cfg.lora)
    model.to(accelerator.device)
    loss_fn = cfg.loss.bound()
    versions = [{"version": 0, "path": str(model_path)}]
    metrics_files, timings = [], []
    loaded = 0  # the version the in-memory weights hold
    for k, part in enumerate(parts, start=1):
        it_dir = rd.path / f"iter-{k}"
        version_dir = rd.path / "versions" / f"v{k}"
        done = read_manifest(it_dir)
        if cfg.resume and done and done.get("status") == "complete" and (version_dir / "model.safetensors").exists():
            versions.append({"version": k, "path": str(version_dir), "pairs": len(part)})
            metrics_files.append(it_dir / "metrics.jsonl")
            continue
        if loaded != k - 1:
            # resuming: the policy after mini-batch k-1 (its final checkpoint, written by this same code) is
            # both the starting point and the reference of mini-batch k
            last = complete_checkpoints(rd.path / f"iter-{k - 1}")[-1]
            load_model(accelerator.unwrap_model(model), str(last / "model.safetensors"))
        loaded = k
        mb = [dict(examples[i]) for i in part]
        prev = versions[-1]["path"]
        key = fingerprint({"reference": fingerprint(prev), "pairs": [e["id"] for e in mb], "normalize": normalize,
                           "max_length": cfg.data.max_length})
        t0 = time.perf_counter()
        cached_reference(
            it_dir / "ref_logps.json", key,
            lambda mb=mb, k=k: reference_logps(model, mb, accelerator=accelerator, pad_id=pad_id, layout=layout,
                                          normalize=normalize, batch_size=cfg.ref_batch_size,
                                          desc=f"reference pass {k}/{cfg.minibatches}"),
            mb, accelerator,
        )
        ref_s = time.perf_counter() - t0
        settings = cfg.train
        if cfg.stop_at is not None and cfg.stop_at[0] == k:
            settings = settings.model_copy(update={"stop_after_step": cfg.stop_at[1]})
        result = train(
            accelerator.unwrap_model(model), accelerator=accelerator, settings=settings, out_dir=it_dir,
            plan=make_plan(mb, settings, layout), collate=lambda ix, mb=mb: collate_pairs([mb[i] for i in ix], pad_id, layout),
            count_units=lambda b: int(b["n_pairs"]), step_fn=pair_step_fn(loss_fn, normalize=normalize,
                                                                           sft_weight=cfg.loss.sft_weight),
            metric_keys=PAIR_METRICS, resume=cfg.resume, desc=f"tso {k}/{cfg.minibatches} ({cfg.loss.type})",
        )
        accelerator.free_memory()
        if result.stopped_early:
            console.print(f"tso: stopped in mini-batch {k} after step {result.steps} as asked; rerun to resume")
            return rd.path
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model), tokenizer, version_dir, merge_lora=True)
            write_manifest(it_dir, stage="tso-minibatch", status="complete", minibatch=k, pairs=len(part),
                           reference=prev, steps=result.steps, reference_seconds=ref_s,
                           train_seconds=result.seconds, final_metrics=result.last_metrics)
        accelerator.wait_for_everyone()
        versions.append({"version": k, "path": str(version_dir), "pairs": len(part)})
        metrics_files.append(it_dir / "metrics.jsonl")
        timings.append({"minibatch": k, "reference_seconds": ref_s, "train_seconds": result.seconds})
    if accelerator.is_main_process:
        atomic_write_json(rd.path / "versions.json", versions)
        plot_reward_curves(metrics_files, rd.path / "reward_curves.png",
                           title=f"TSO mini-batch iterative ({cfg.loss.type}); dotted: reference updates")
    rd.finish(counts, versions=versions, timings=timings, model_dir=versions[-1]["path"])
    console.print(
        f"[green]tso done[/green]: {cfg.minibatches} mini-batches, versions:\n"
        + "\n".join(f"  v{v['version']}: {v['path']}" for v in versions)
        + f"\n  reward curves: {rd.path / 'reward_curves.png'}"
    )
    return rd.path
