"""``alignline dpo``: preference optimisation on Pair records (DPO, IPO, cDPO, RSO hinge, TSO dual-clip).

Reference log-probs are computed once, in one no-grad pass, before training and stored in the run
directory (``ref_logps.json``, keyed by the reference model and the data); no second model is held in
memory while training. Pairs are trained in the prefix-shared layout (prompt computed once per pair) and
log-probs are taken only at response positions.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from alignline import losses
from alignline.config import Section
from alignline.data.chat import ensure_chat_template
from alignline.data.io import atomic_write_json, fingerprint, read_pairs
from alignline.models import LoraSettings, load_causal_lm, load_tokenizer, resolve_model
from alignline.report.plots import plot_reward_curves
from alignline.stages.common import RunDir, console, record_drops, training_dtype
from alignline.train.loop import TrainSettings, make_accelerator, save_trained_model, train
from alignline.train.pairs import collate_pairs, pair_length, pair_logps, plan_bucketed, tokenise_pairs
from alignline.train.telemetry import Telemetry

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected")


class LossSettings(Section):
    """Which preference loss, with its hyper-parameters."""

    type: Literal["dpo", "ipo", "cdpo", "hinge", "dual_clip"] = "dpo"
    """dpo (sigmoid), ipo, cdpo (label smoothing), hinge (RSO), dual_clip (TSO, our reading)."""
    beta: float = Field(0.1, gt=0)
    """beta of DPO/cDPO/hinge/dual-clip; tau of IPO (Xwin and TSO: 0.1)."""
    label_smoothing: float = Field(0.1, ge=0, lt=0.5)
    """cDPO: probability that a preference label is flipped."""
    margin_chosen: float = 20.0
    """dual_clip: the chosen reward is not pushed above this (TSO: 20)."""
    margin_rejected: float = 10.0
    """dual_clip: the rejected reward is not pushed below minus this (TSO: 10)."""
    length_normalize: bool | None = None
    """Average log-probs over response tokens instead of summing; null: on for IPO only (as its paper/TRL)."""
    sft_weight: float = Field(0.0, ge=0)
    """Add this weight times the per-token NLL of the chosen response (0: off)."""

    def bound(self) -> Callable:
        params: dict[str, float] = {"beta": self.beta}
        if self.type == "cdpo":
            params["label_smoothing"] = self.label_smoothing
        if self.type == "dual_clip":
            params.update(margin_chosen=self.margin_chosen, margin_rejected=self.margin_rejected)
        return losses.bind(self.type, **params)

    @property
    def normalize(self) -> bool:
        return self.type == "ipo" if self.length_normalize is None else self.length_normalize


class PairData(Section):
    """Preference pairs and how they are cut."""

    train: str
    """Pairs: JSONL, Parquet or a directory of shards (ours or TRL's prompt/chosen/rejected layouts)."""
    eval: str | None = None
    """Held-out pairs for reward accuracy and loss (optional)."""
    max_length: int = Field(2048, gt=8)
    """Longest prompt + response in tokens; responses are cut to fit, prompts that do not fit are dropped."""
    max_drop_fraction: float = Field(0.1, ge=0, le=1)
    """Error out when more than this fraction of pairs would be dropped."""
    max_examples: int | None = None
    """Use at most this many pairs (the first ones)."""


def default_dpo_train() -> TrainSettings:
    # Xwin-LM DPO: 2 epochs, linear schedule, peak lr 5e-7, 100 warm-up steps, batch 32 (4 x 8 accumulation).
    return TrainSettings(lr=5e-7, epochs=2, schedule="linear", warmup_steps=100, batch_size=4, grad_accum=8)


class DPOConfig(Section):
    """Configuration of ``alignline dpo``."""

    model: str
    """Policy to start from (HF dir, .gguf or alias); Xwin starts DPO from the RS model."""
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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: float32 master weights on every device (bf16 autocast on GPUs: train.mixed_precision); with lora,
    the frozen base in bf16 on GPUs that support it. bfloat16 / float16: the weights themselves in that dtype
    (half the memory, but an update smaller than the weights' precision is lost, e.g. DPO's lr 5e-7)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir."""


# --------------------------------------------------------------------------- pieces shared with `tso`

def pair_step_fn(loss_fn: Callable, *, normalize: bool, sft_weight: float = 0.0):
    """A ``step_fn`` for the training loop: summed pair losses, the pair count, summed metrics."""

    def step(model, batch):
        pc, pr, lc, lr_ = pair_logps(model, batch, length_normalize=normalize)
        rc = batch["ref_chosen"].to(pc.dtype)
        rr = batch["ref_rejected"].to(pc.dtype)
        loss_vec, r_w, r_l = loss_fn(pc, pr, rc, rr)
        if sft_weight:
            raw = pc * lc if normalize else pc
            loss_vec = loss_vec + sft_weight * losses.sft_nll(raw, lc)
        metrics = {
            "rewards/chosen": float(r_w.sum()), "rewards/rejected": float(r_l.sum()),
            "rewards/margin": float((r_w - r_l).sum()), "rewards/accuracy": float((r_w > r_l).float().sum()),
            "logps/chosen": float(pc.detach().sum()), "logps/rejected": float(pr.detach().sum()),
        }
        return loss_vec.sum(), int(pc.shape[0]), metrics

    return step


@torch.no_grad()
def reference_logps(model, examples: list[dict], *, accelerator, pad_id: int, layout: str, normalize: bool,
                    batch_size: int, desc: str = "reference pass", telemetry: Telemetry | None = None
                    ) -> list[tuple[float, float]]:
    """One no-grad pass: (chosen, rejected) reference log-probs per example, sharded across processes; its tokens
    and useful FLOPs are counted into ``telemetry``'s open phases (this process's share)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    order = sorted(range(len(examples)), key=lambda i: pair_length(examples[i], layout))
    mine = order[rank::world]
    out: list[tuple[int, float, float]] = []
    for s in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not accelerator.is_local_main_process):
        ix = mine[s: s + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate_pairs([examples[i] for i in ix], pad_id, layout).items()}
        with accelerator.autocast():
            c, r, _, _ = pair_logps(model, batch, length_normalize=normalize)
        if telemetry is not None:
            telemetry.count_batch(model, batch, grad=False)
        out.extend(zip(ix, c.double().tolist(), r.double().tolist()))
    if world > 1:
        out = gather_object(out)
    model.train(was_training)
    values = {i: (c, r) for i, c, r in out}
    return [values[i] for i in range(len(examples))]


def attach_reference(examples: list[dict], values: list[tuple[float, float]]) -> None:
    for ex, (c, r) in zip(examples, values):
        ex["ref_chosen"], ex["ref_rejected"] = c, r


def cached_reference(path: Path, key: str, compute: Callable[[], list[tuple[float, float]]],
                     examples: list[dict], accelerator) -> None:
    """Reference log-probs from ``path`` if it was computed for the same ``key``; else compute and store."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key and len(stored["values"]) == len(examples):
            attach_reference(examples, [tuple(v) for v in stored["values"]])
            return
    values = compute()
    if accelerator.is_main_process:
        atomic_write_json(path, {"key": key, "ids": [e["id"] for e in examples], "values": values})
    attach_reference(examples, values)


def make_plan(examples: list[dict], settings: TrainSettings, layout: str, processes: int = 1):
    lengths = [pair_length(e, layout) for e in examples]

    def plan(epoch: int):
        # batches are drawn per optimizer step (over all processes), so neither accumulation nor the number
        # of processes changes which pairs share a step
        return plan_bucketed(lengths, settings.batch_size * settings.grad_accum * processes, settings.seed, epoch,
                             micro_batch_size=settings.batch_size)

    return plan


def pair_eval_fn(examples: list[dict], loss_fn, *, accelerator, pad_id, layout, normalize, batch_size):
    def evaluate(model) -> dict[str, float]:
        total = Counter()
        for s in range(0, len(examples), batch_size):
            batch = {k: v.to(accelerator.device) for k, v in
                     collate_pairs(examples[s: s + batch_size], pad_id, layout).items()}
            with accelerator.autocast():
                loss_sum, n, m = pair_step_fn(loss_fn, normalize=normalize)(model, batch)
            total["loss"] += float(loss_sum)
            total["n"] += n
            for k, v in m.items():
                total[k] += v
        n = max(total.pop("n"), 1)
        return {k: v / n for k, v in total.items()}

    return evaluate


def empty_response(obj: dict) -> str | None:
    """Why a pair record is dropped on read: an empty (blank) chosen or rejected response."""
    blank = [k for k in ("chosen", "rejected") if isinstance(obj.get(k), str) and not obj[k].strip()]
    return f"empty {' and '.join(blank)} response" if blank else None


def load_pairs_for(data: PairData, tokenizer, counts: Counter, *, keep_tail: bool = False
                   ) -> tuple[list[dict], list[dict]]:
    """Tokenised training pairs (drops counted, capped by data.max_drop_fraction) and eval pairs. A pair with an
    empty response is dropped when read (counted as dropped_empty_response, its file:line in dropped_lines)."""
    empty: list[str] = []
    pairs = read_pairs(data.train, drop=empty_response, dropped=empty)[: data.max_examples]
    record_drops(counts, "dropped_empty_response", empty, "pair(s) with an empty response")
    examples = tokenise_pairs(pairs, tokenizer, max_length=data.max_length, counts=counts, keep_tail=keep_tail,
                              max_drop_fraction=data.max_drop_fraction, where=data.train, dropped_on_read=len(empty))
    if not examples:
        from alignline.errors import DataError

        raise DataError(f"no usable pairs ({dict(counts)})", path=data.train)
    eval_examples = []
    if data.eval:
        eval_examples = tokenise_pairs(read_pairs(data.eval, drop=empty_response), tokenizer, max_length=data.max_length,
                                       counts=Counter(), max_drop_fraction=1.0, where=data.eval, keep_tail=keep_tail)
    return examples, eval_examples


def stage_tokenizer(model: str, trust_remote_code: bool):
    """(resolved model path, its tokenizer with a chat template)."""
    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    ensure_chat_template(tokenizer)
    return model_path, tokenizer


# --------------------------------------------------------------------------- the stage

def run(cfg: DPOConfig) -> Path:
    rd = RunDir("dpo", cfg, cfg.output_dir, {"model": cfg.model, "reference": cfg.reference,
                                             "train": cfg.data.train, "eval": cfg.data.eval})
    if rd.up_to_date():
        console.print(f"[green]dpo: {rd.path} is up to date[/green]; nothing to do")
        return rd.path
    accelerator = make_accelerator(cfg.train, rd.path)
    rd.start(accelerator.wait_for_everyone)
    model_path, tokenizer = stage_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id, layout, normalize = tokenizer.pad_token_id, cfg.pair_layout, cfg.loss.normalize
    counts: Counter = Counter()
    examples, eval_examples = load_pairs_for(cfg.data, tokenizer, counts)

    device_dtype = training_dtype(cfg.dtype, cfg.lora)
    model = load_causal_lm(model_path, dtype=device_dtype, trust_remote_code=cfg.trust_remote_code, lora=cfg.lora)
    model.to(accelerator.device)
    # the reference in the policy's dtype: the same checkpoint must give rewards of exactly 0 at step 0
    ref_model = model if cfg.reference is None else load_causal_lm(
        resolve_model(cfg.reference), dtype=device_dtype, trust_remote_code=cfg.trust_remote_code).to(accelerator.device)
    ref_source = resolve_model(cfg.reference) if cfg.reference else model_path
    key = fingerprint({"reference": fingerprint(str(ref_source)), "dtype": str(next(ref_model.parameters()).dtype),
                       "data": fingerprint(cfg.data.train),
                       "eval": cfg.data.eval and fingerprint(cfg.data.eval), "max_length": cfg.data.max_length,
                       "normalize": normalize, "n": len(examples), "n_eval": len(eval_examples)})
    both = examples + eval_examples

    tel = Telemetry(accelerator.device)

    def compute():
        return reference_logps(ref_model, both, accelerator=accelerator, pad_id=pad_id, layout=layout,
                               normalize=normalize, batch_size=cfg.ref_batch_size, telemetry=tel)

    with tel.phase("reference") as ref_phase:
        cached_reference(rd.path / "ref_logps.json", key, compute, both, accelerator)
    ref_seconds = ref_phase["seconds"]
    if ref_model is not model:
        del ref_model  # no second model in memory while training

    loss_fn = cfg.loss.bound()
    result = train(
        model, accelerator=accelerator, settings=cfg.train, out_dir=rd.path, plan=make_plan(examples, cfg.train, layout, accelerator.num_processes),
        collate=lambda ix: collate_pairs([examples[i] for i in ix], pad_id, layout),
        count_units=lambda b: int(b["n_pairs"]),
        step_fn=pair_step_fn(loss_fn, normalize=normalize, sft_weight=cfg.loss.sft_weight),
        evaluate=pair_eval_fn(eval_examples, loss_fn, accelerator=accelerator, pad_id=pad_id, layout=layout,
                              normalize=normalize, batch_size=cfg.ref_batch_size) if eval_examples else None,
        metric_keys=PAIR_METRICS, resume=cfg.resume and not rd.fresh, desc=f"dpo ({cfg.loss.type})", telemetry=tel,
    )
    if result.stopped_early:
        console.print(f"dpo: stopped after step {result.steps} as asked; rerun to resume")
        return rd.path
    with tel.phase("save_model"):
        save_trained_model(accelerator, model, tokenizer, rd.path / "model")
    if accelerator.is_main_process:
        plot_reward_curves([rd.path / "metrics.jsonl"], rd.path / "reward_curves.png",
                           title=f"{cfg.loss.type}: implicit rewards")
    accelerator.wait_for_everyone()
    rd.finish(counts, steps=result.steps, train_seconds=result.seconds, reference_seconds=ref_seconds,
              final_metrics=result.last_metrics, eval_metrics=result.eval_metrics,
              eval_metrics_start=result.eval_metrics_start, model_dir=str(rd.path / "model"), phases=tel.summary())
    m = result.last_metrics
    console.print(
        f"[green]dpo done[/green] ({cfg.loss.type}): {result.steps} steps; reference pass {ref_seconds:.0f}s, "
        f"training {result.seconds:.0f}s; last step loss {m.get('loss', float('nan')):.4f}, "
        f"reward margin {m.get('rewards/margin', float('nan')):.4f}, accuracy {m.get('rewards/accuracy', float('nan')):.2f}\n"
        f"  model: {rd.path / 'model'}\n  metrics: {rd.path / 'metrics.jsonl'}\n"
        f"  reward curves: {rd.path / 'reward_curves.png'}\n  counts: {dict(counts)}"
    )
    return rd.path
