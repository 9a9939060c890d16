"""``alignline dpo``: preference optimisation on Pair records (DPO, IPO, cDPO, RSO hinge, TSO dual-clip).

Reference log-probs are computed once, in one no-grad pass, before training and stored in the run
directory (``ref_logps.json``, keyed by the reference model and the data); no second model is held in
memory while training. Pairs are trained in the prefix-shared layout (prompt computed once per pair) and
log-probs are taken only at response positions. The pieces shared with ``tso`` and ``rm`` live in
:mod:`alignline.train.preference`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.config import Section
from alignline.data.io import fingerprint
from alignline.models.loading import LoraSettings, load_causal_lm, merged_on_save, resolve_model
from alignline.report.plots import plot_reward_curves
from alignline.stages.cards import LOSS_TAGS, PREFERENCE_SETTINGS, stage_card, training_evaluation
from alignline.stages.common import (
    RunDir,
    TrainingDtype,
    TrustRemoteCode,
    console,
    input_fingerprint,
    stage_tokenizer,
    training_dtype,
)
from alignline.telemetry import Telemetry
from alignline.train.accelerator import make_accelerator
from alignline.train.checkpoint import save_trained_model
from alignline.train.loop import TrainResult, TrainSettings, train
from alignline.train.pairs import TokenisedPair, collate_pairs
from alignline.train.preference import (
    PAIR_METRICS,
    LossSettings,
    PairData,
    cached_reference,
    load_pairs_for,
    make_plan,
    pair_eval_fn,
    pair_step_fn,
    reference_logps,
)


def default_dpo_train() -> TrainSettings:
    # Xwin-LM DPO: 2 epochs, linear schedule, peak lr 5e-7, 100 warm-up steps, batch 32 (4 x 8 accumulation).
    return TrainSettings(lr=5e-7, epochs=2, schedule="linear", warmup_steps=100, batch_size=4, grad_accum=8)


class DPOConfig(Section):
    """Configuration of ``alignline dpo``."""

    model: str
    """Policy to start from (HF dir, .gguf, alias or Hub id); Xwin starts DPO from the RS model."""
    reference: str | None = None
    """Reference model; null: the starting policy (its log-probs are computed before training)."""
    output_dir: str = "runs/dpo"
    """Run directory."""
    data: PairData
    """Preference pairs."""
    loss: LossSettings = Field(default_factory=LossSettings)
    """The preference loss."""
    train: TrainSettings = Field(default_factory=default_dpo_train)
    """Optimiser and loop settings (defaults: Xwin DPO)."""
    pair_layout: Literal["shared", "separate"] = "shared"
    """shared: prompt + chosen + rejected in one row (prompt computed once); separate: two rows per pair."""
    ref_batch_size: int = 8
    """Pairs per forward pass in the reference pass."""
    lora: LoraSettings | None = None
    """Train LoRA adapters (merged into the saved model)."""
    dtype: TrainingDtype
    trust_remote_code: TrustRemoteCode
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir."""


# --------------------------------------------------------------------------- the stage's steps

def load_reference(cfg: DPOConfig, model, model_path, device_dtype: str, device):
    """(reference model, where it comes from): the policy itself unless ``cfg.reference`` names another model."""
    if cfg.reference is None:
        return model, model_path
    # the reference in the policy's dtype: the same checkpoint must give rewards of exactly 0 at step 0
    ref_source = resolve_model(cfg.reference)
    ref_model = load_causal_lm(ref_source, dtype=device_dtype, trust_remote_code=cfg.trust_remote_code).to(device)
    return ref_model, ref_source


def reference_key(cfg: DPOConfig, ref_source, ref_model, n_train: int, n_eval: int) -> str:
    """What the stored reference log-probs were computed from: reuse them only when all of it is the same."""
    return fingerprint({"reference": fingerprint(str(ref_source)), "dtype": str(next(ref_model.parameters()).dtype),
                        "data": input_fingerprint(cfg.data.train),
                        "eval": cfg.data.eval and input_fingerprint(cfg.data.eval), "max_length": cfg.data.max_length,
                        "normalize": cfg.loss.normalize, "n": n_train, "n_eval": n_eval})


def with_reference_logps(cfg: DPOConfig, path: Path, key: str, ref_model, train_pairs: list[TokenisedPair],
                         eval_pairs: list[TokenisedPair], *, accelerator, pad_id: int, telemetry: Telemetry
                         ) -> tuple[list[TokenisedPair], list[TokenisedPair]]:
    """Training and eval pairs with their reference log-probs: one pass over both, or the ones stored at ``path``."""
    both = train_pairs + eval_pairs
    referenced = cached_reference(
        path, key,
        lambda: reference_logps(ref_model, both, accelerator=accelerator, pad_id=pad_id, layout=cfg.pair_layout,
                                normalize=cfg.loss.normalize, batch_size=cfg.ref_batch_size, telemetry=telemetry),
        both, accelerator)
    return referenced[: len(train_pairs)], referenced[len(train_pairs):]


def report(cfg: DPOConfig, rd: RunDir, result: TrainResult, ref_seconds: float, counts: Counter) -> None:
    m = result.last_metrics
    console.print(
        f"[green]dpo done[/green] ({cfg.loss.type}): {result.steps} steps; reference pass {ref_seconds:.0f}s, "
        f"training {result.seconds:.0f}s; last step loss {m.get('loss', float('nan')):.4f}, "
        f"reward margin {m.get('rewards/margin', float('nan')):.4f}, accuracy {m.get('rewards/accuracy', float('nan')):.2f}\n"
        f"  model: {rd.path / 'model'}\n  metrics: {rd.path / 'metrics.jsonl'}\n"
        f"  reward curves: {rd.path / 'reward_curves.png'}\n  counts: {dict(counts)}"
    )


# --------------------------------------------------------------------------- the stage

def run(cfg: DPOConfig) -> Path:
    rd = RunDir("dpo", cfg, cfg.output_dir, {"model": cfg.model, "reference": cfg.reference,
                                             "train": cfg.data.train, "eval": cfg.data.eval})
    if rd.skip_if_done():
        return rd.path
    accelerator = make_accelerator(cfg.train, rd.path)
    rd.start(accelerator.wait_for_everyone)
    model_path, tokenizer = stage_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id, layout, normalize = tokenizer.pad_token_id, cfg.pair_layout, cfg.loss.normalize
    counts: Counter = Counter()
    train_pairs, eval_pairs = load_pairs_for(cfg.data, tokenizer, counts)

    device_dtype = training_dtype(cfg.dtype, cfg.lora)
    model = load_causal_lm(model_path, dtype=device_dtype, trust_remote_code=cfg.trust_remote_code, lora=cfg.lora)
    model.to(accelerator.device)
    ref_model, ref_source = load_reference(cfg, model, model_path, device_dtype, accelerator.device)
    key = reference_key(cfg, ref_source, ref_model, len(train_pairs), len(eval_pairs))
    tel = Telemetry(accelerator.device)
    with tel.phase("reference") as ref_phase:
        train_pairs, eval_pairs = with_reference_logps(cfg, rd.path / "ref_logps.json", key, ref_model, train_pairs,
                                                       eval_pairs, accelerator=accelerator, pad_id=pad_id,
                                                       telemetry=tel)
    ref_seconds = ref_phase["seconds"]
    del ref_model  # no second model in memory while training (when the reference is another model)

    loss_fn = cfg.loss.bound()
    result = train(
        model, accelerator=accelerator, settings=cfg.train, out_dir=rd.path,
        plan=make_plan(train_pairs, cfg.train, layout, accelerator.num_processes),
        collate=lambda ix: collate_pairs([train_pairs[i] for i in ix], pad_id, layout),
        count_units=lambda b: int(b["n_pairs"]),
        step_fn=pair_step_fn(loss_fn, normalize=normalize, sft_weight=cfg.loss.sft_weight),
        evaluate=pair_eval_fn(eval_pairs, loss_fn, accelerator=accelerator, pad_id=pad_id, layout=layout,
                              normalize=normalize, batch_size=cfg.ref_batch_size) if eval_pairs else None,
        metric_keys=PAIR_METRICS, resume=cfg.resume and not rd.fresh, desc=f"dpo ({cfg.loss.type})", telemetry=tel,
    )
    if result.stopped_early:
        console.print(f"dpo: stopped after step {result.steps} as asked; rerun to resume")
        return rd.path
    with tel.phase("save_model"):
        card = stage_card("dpo", cfg, method=f"Preference optimisation ({cfg.loss.type}, beta {cfg.loss.beta})",
                          tags=LOSS_TAGS[cfg.loss.type], data={"train": cfg.data.train, "eval": cfg.data.eval},
                          counts=counts, settings=PREFERENCE_SETTINGS,
                          evaluation=training_evaluation(result, ("loss", *PAIR_METRICS)))
        save_trained_model(accelerator, model, tokenizer, rd.path / "model", merge_lora=merged_on_save(cfg.lora),
                           card=card)
    if accelerator.is_main_process:
        plot_reward_curves([rd.path / "metrics.jsonl"], rd.path / "reward_curves.png",
                           title=f"{cfg.loss.type}: implicit rewards")
    accelerator.wait_for_everyone()
    rd.finish(counts, steps=result.steps, train_seconds=result.seconds, reference_seconds=ref_seconds,
              final_metrics=result.last_metrics, eval_metrics=result.eval_metrics,
              eval_metrics_start=result.eval_metrics_start, model_dir=str(rd.path / "model"), phases=tel.summary())
    report(cfg, rd, result, ref_seconds, counts)
    return rd.path
