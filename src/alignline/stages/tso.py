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
from alignline.models import LoraSettings, load_causal_lm, load_tokenizer, resolve_model, save_model
from alignline.report.plots import plot_reward_curves
from alignline.stages.common import RunDir, console, training_dtype
from alignline.stages.dpo import (
    PAIR_METRICS,
    LossSettings,
    PairData,
    cached_reference,
    load_pairs_for,
    make_plan,
    pair_step_fn,
    reference_logps,
    stage_tokenizer,
)
from alignline.train.loop import TrainSettings, complete_checkpoints, is_sharded, make_accelerator, train
from alignline.train.pairs import collate_pairs, tokenise_pairs


def self_pairs(model, tokenizer, prompts: list[Prompt], settings: RegenerateSettings, version: int,
               counts: Counter) -> list[Pair]:
    """Best-vs-worst pairs from ``model``'s own samples, ranked by the reward model."""
    from alignline.data.chat import tokenise_prompt_response
    from alignline.generate.hf import HFEngine
    from alignline.judges.reward import score_responses
    from alignline.models import load_reward_model

    was_training = model.training
    model.eval()
    samples = HFEngine(model, tokenizer, source=f"policy-v{version}").generate(prompts, settings.n, settings.sampling)
    model.train(was_training)
    rm_path = resolve_model(settings.reward_model)
    rm_tok = load_tokenizer(rm_path)
    ensure_chat_template(rm_tok)
    rm = load_reward_model(rm_path, device=next(model.parameters()).device).eval()
    out = []
    for prompt, responses in zip(prompts, samples):
        ok = [r for r in responses if r.text.strip()]
        if len(ok) < 2:
            counts["regenerate_too_few_samples"] += 1
            continue
        ids = [tokenise_prompt_response(rm_tok, prompt.messages, r.text, keep_tail=True) for r in ok]
        scores = score_responses(rm, ids[0][0], [x[1] for x in ids], pad_id=rm_tok.pad_token_id)
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

    prompts: str
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
    """auto: float32 master weights on every device (bf16 autocast on GPUs: train.mixed_precision); with lora,
    the frozen base in bf16 on GPUs that support it. bfloat16 / float16: the weights themselves in that dtype
    (half the memory, but an update smaller than the weights' precision is lost, e.g. DPO's lr 5e-7)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory."""
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


def run(cfg: TSOConfig) -> Path:
    rd = RunDir("tso", cfg, cfg.output_dir, {"model": cfg.model, "train": cfg.data.train}, ("resume", "stop_at"))
    if rd.up_to_date():
        console.print(f"[green]tso: {rd.path} is up to date[/green]; nothing to do")
        return rd.path
    accelerator = make_accelerator(cfg.train, rd.path)
    rd.start(accelerator.wait_for_everyone)
    if is_sharded(accelerator):
        raise ConfigError("tso does not run under FSDP yet: each mini-batch recomputes the reference with the "
                          "policy being trained, split by data across processes. Launch it data parallel "
                          "(configs/gpu/accelerate_ddp.yaml)")
    model_path, tokenizer = stage_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id, layout, normalize = tokenizer.pad_token_id, cfg.pair_layout, cfg.loss.normalize
    counts: Counter = Counter()
    examples, _ = load_pairs_for(cfg.data.model_copy(update={"eval": None}), tokenizer, counts)
    if len(examples) < cfg.minibatches:
        raise ConfigError(f"{len(examples)} usable pairs cannot fill minibatches={cfg.minibatches}; "
                          "lower minibatches or add pairs")
    parts = split_minibatches(len(examples), cfg.minibatches, cfg.split_seed)
    atomic_write_json(rd.path / "minibatches.json", {"ids": [[examples[i]["id"] for i in p] for p in parts]})

    regen_parts: list[list[Prompt]] = []
    if cfg.regenerate is not None:
        regen_prompts = read_prompts(cfg.regenerate.prompts)
        regen_parts = [[regen_prompts[i] for i in p]
                       for p in split_minibatches(len(regen_prompts), cfg.minibatches, cfg.split_seed)]
    device_dtype = training_dtype(cfg.dtype, cfg.lora)
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
        # a run redone with other settings or inputs (rd.fresh) reuses nothing, not even finished mini-batches
        if (cfg.resume and not rd.fresh and done and done.get("status") == "complete"
                and (version_dir / "model.safetensors").exists()):
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
        if cfg.regenerate is not None and k > 1:
            cache = it_dir / "self_pairs.jsonl"
            if cache.exists():
                fresh = read_pairs(cache)
            else:
                fresh = self_pairs(accelerator.unwrap_model(model), tokenizer, regen_parts[k - 1], cfg.regenerate,
                                   k - 1, counts)
                write_records(cache, fresh)
            mb += tokenise_pairs(fresh, tokenizer, max_length=cfg.data.max_length, counts=counts,
                                 max_drop_fraction=1.0, where=str(cache))
        prev = versions[-1]["path"]
        key = fingerprint({"reference": fingerprint(prev), "data": fingerprint(cfg.data.train),
                           "pairs": [e["id"] for e in mb], "normalize": normalize, "max_length": cfg.data.max_length})
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
            plan=make_plan(mb, settings, layout, accelerator.num_processes), collate=lambda ix, mb=mb: collate_pairs([mb[i] for i in ix], pad_id, layout),
            count_units=lambda b: int(b["n_pairs"]), step_fn=pair_step_fn(loss_fn, normalize=normalize,
                                                                           sft_weight=cfg.loss.sft_weight),
            metric_keys=PAIR_METRICS, resume=cfg.resume and not rd.fresh, desc=f"tso {k}/{cfg.minibatches} ({cfg.loss.type})",
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
