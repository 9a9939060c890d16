"""``alignline sft``: supervised fine-tuning on conversations, loss on assistant tokens only (Xwin step 1)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.config import Section
from alignline.data.chat import ensure_chat_template, fit_to_length, tokenise_conversation
from alignline.data.datasets_source import RecordsSource
from alignline.data.drops import record_drops
from alignline.data.io import read_conversations
from alignline.errors import ConfigError
from alignline.models.card import CardFacts
from alignline.models.loading import (
    LoraSettings,
    load_causal_lm,
    load_tokenizer,
    merged_on_save,
    resolve_model,
)
from alignline.stages.cards import stage_card, training_evaluation
from alignline.stages.common import RunDir, TrainingDtype, console, training_dtype
from alignline.telemetry import Telemetry
from alignline.train.accelerator import make_accelerator
from alignline.train.batching import collate_packed, collate_padded, count_targets, plan_packed, plan_padded
from alignline.train.checkpoint import save_trained_model
from alignline.train.lm import causal_lm_loss
from alignline.train.loop import TrainResult, TrainSettings, train


class SFTData(Section):
    """Where the conversations come from and how they become training examples."""

    train: RecordsSource
    """Conversations (JSONL, Parquet, a directory of shards, a Hub dataset ``hf:ORG/NAME``, a save_to_disk
    directory or an Arrow file; ours or TRL's ``messages`` / prompt-completion layouts)."""
    eval: RecordsSource | None = None
    """Held-out conversations for the evaluation loss (optional)."""
    max_length: int = Field(4096, gt=8)
    """Longest example in tokens (Xwin: 4096)."""
    long_examples: Literal["blocks", "truncate"] = "blocks"
    """Over-long conversations: cut into consecutive blocks (Xwin) or keep only the first block."""
    train_on: Literal["all", "last"] = "all"
    """Train on every assistant turn, or on the last one only (rejection-sampling fine-tuning)."""
    packing: bool = True
    """Padding-free packing of short examples into rows of max_length tokens; false pads each batch."""
    max_examples: int | None = None
    """Use at most this many conversations (the first ones), e.g. for a quick run."""
    max_record_chars: int | None = Field(1_000_000, gt=0)
    """A conversation whose messages hold more characters than this (about 250k tokens of English) is skipped and
    counted (dropped_over_max_record_chars; its file:line in dropped_lines); null: no limit. With
    long_examples=truncate only the first max_length tokens' worth of text is tokenised anyway."""


def default_sft_train() -> TrainSettings:
    # Xwin-LM SFT: AdamW (0.9, 0.999, 1e-8, wd 0), cosine, peak lr 2e-5, 3 epochs.
    return TrainSettings(lr=2e-5, epochs=3, adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0,
                         schedule="cosine", warmup_ratio=0.0)


class SFTConfig(Section):
    """Configuration of ``alignline sft``."""

    model: str = "smollm2-135m-instruct"
    """Starting checkpoint: a local HF directory (safetensors), a .gguf file, an alias, or a Hub id
    (org/name[@revision])."""
    output_dir: str = "runs/sft"
    """Run directory: model/, checkpoints/, metrics.jsonl, config.yaml, manifest.json."""
    data: SFTData
    """Training data."""
    train: TrainSettings = Field(default_factory=default_sft_train)
    """Optimiser and loop settings."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights (merged into the saved model)."""
    dtype: TrainingDtype
    chat_template: Literal["model", "fallback"] = "model"
    """The tokenizer's own chat template, or alignline's fallback (always used when the model has none)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory (off unless you trust it)."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir if there is one."""


def tokenise_all(convs, tokenizer, max_length: int, mode: str, train_on: str, counts: Counter, where: str):
    examples = []
    for conv in convs:
        # truncate: tokenise only a prefix large enough for max_length (bounded work, whatever the record's size)
        ex = tokenise_conversation(tokenizer, conv.messages, train_on=train_on, where=f"{where}: conversation {conv.id}",
                                   max_tokens=max_length if mode == "truncate" else None)
        ex.source_id = conv.id
        if ex.n_trained == 0 and not ex.truncated:
            counts["dropped_no_trained_tokens"] += 1
            continue
        for block in fit_to_length(ex, max_length, mode, counts):
            examples.append({"input_ids": block.input_ids, "labels": block.labels})
    return examples


def over_size(limit: int | None) -> Callable[[dict], str | None] | None:
    """The read-time check of data.max_record_chars: a reason for a conversation whose texts are longer."""
    if limit is None:
        return None

    def check(obj: dict) -> str | None:
        messages = obj.get("messages")
        chars = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)) \
            if isinstance(messages, list) else 0
        return f"{chars:,} characters, over data.max_record_chars={limit:,}" if chars > limit else None

    return check


def sft_tokenizer(cfg: SFTConfig):
    """(resolved model path, its tokenizer with the chat template ``cfg.chat_template`` asks for)."""
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template == "fallback":
        tokenizer.chat_template = None
    if ensure_chat_template(tokenizer):
        console.print("sft: the model has no chat template; using alignline's fallback template")
    return model_path, tokenizer


def load_examples(data: SFTData, tokenizer, counts: Counter) -> tuple[list[dict], list[dict]]:
    """Training and eval examples (input_ids, labels); what was read, dropped and kept is counted."""
    skipped: list[str] = []
    convs = read_conversations(data.train, drop=over_size(data.max_record_chars), dropped=skipped)
    if data.max_examples is not None:
        convs = convs[: data.max_examples]
    counts["conversations"] = len(convs)
    record_drops(counts, "dropped_over_max_record_chars", skipped, "conversation(s) over data.max_record_chars")
    examples = tokenise_all(convs, tokenizer, data.max_length, data.long_examples, data.train_on, counts, data.train)
    counts["examples"] = len(examples)
    if not examples:
        raise ConfigError(f"data.train {data.train}: no usable examples ({dict(counts)})")
    eval_examples = []
    if data.eval:
        eval_examples = tokenise_all(read_conversations(data.eval, drop=over_size(data.max_record_chars)),
                                     tokenizer, data.max_length, data.long_examples, data.train_on, Counter(), data.eval)
    counts["trained_tokens"] = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    counts["tokens"] = sum(len(e["input_ids"]) for e in examples)
    return examples, eval_examples


def batching(cfg: SFTConfig, examples: list[dict], pad_id: int) -> tuple[Callable, Callable]:
    """The loop's ``plan(epoch)`` and ``collate``: packed rows of max_length tokens, or padded batches."""
    lengths = [len(e["input_ids"]) for e in examples]
    s = cfg.train
    if cfg.data.packing:
        def plan(epoch):
            return plan_packed(lengths, cfg.data.max_length, s.batch_size, s.seed, epoch)

        def collate(rows):
            return collate_packed([[examples[i] for i in row] for row in rows], pad_id)
    else:
        def plan(epoch):
            return plan_padded(lengths, s.batch_size, s.seed, epoch)

        def collate(ix):
            return collate_padded([examples[i] for i in ix], pad_id)
    return plan, collate


def lm_eval_fn(eval_examples: list[dict], batch_size: int, pad_id: int, device) -> Callable:
    """The loop's ``evaluate(model)``: the mean loss per trained token over ``eval_examples``."""

    def evaluate(m) -> dict[str, float]:
        total, n = 0.0, 0
        for i in range(0, len(eval_examples), batch_size):
            b = collate_padded(eval_examples[i: i + batch_size], pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            loss_sum, units, _ = causal_lm_loss(m, b)
            total, n = total + float(loss_sum), n + units
        return {"loss": total / max(n, 1)}

    return evaluate


def report(stage: str, rd: RunDir, result: TrainResult, counts: Counter) -> None:
    console.print(
        f"[green]{stage} done[/green]: {result.steps} steps in {result.seconds:.0f}s, "
        f"final loss {result.last_metrics.get('loss', float('nan')):.4f}"
        + (f"; eval loss {result.eval_metrics_start['loss']:.4f} -> {result.eval_metrics['loss']:.4f}"
           if result.eval_metrics_start and result.eval_metrics else "")
        + "\n"
        f"  checkpoint (HF format): {rd.path / 'model'}\n  metrics: {rd.path / 'metrics.jsonl'}\n"
        f"  resolved config: {rd.path / 'config.yaml'}\n  counts: {dict(counts)}"
    )


CARD_KINDS = {"sft": ("sft", "Supervised fine-tuning (loss on assistant tokens)", ["sft"]),
              "rs": ("rs", "Rejection-sampling fine-tuning (SFT on selected responses)", ["rs", "rejection-sampling",
                                                                                          "sft"]),
              "judge_sft_train": ("sft", "Evaluator fine-tuning on scored feedback (TSO judge-sft)",
                                  ["sft", "judge", "evaluator"])}
"""The card's command, method and tags for each stage that trains through :func:`run`."""


def sft_card(cfg: SFTConfig, stage: str, counts: Counter, result: TrainResult) -> CardFacts:
    command, method, tags = CARD_KINDS.get(stage, CARD_KINDS["sft"])
    return stage_card(command, cfg, method=method, tags=tags, data={"train": cfg.data.train, "eval": cfg.data.eval},
                      counts=counts, settings=("data.max_length", "data.packing", "data.train_on",
                                               "data.long_examples"),
                      evaluation=training_evaluation(result))


def run(cfg: SFTConfig, stage: str = "sft") -> Path:
    rd = RunDir(stage, cfg, cfg.output_dir, {"model": cfg.model, "train": cfg.data.train, "eval": cfg.data.eval})
    if rd.skip_if_done():
        return rd.path
    accelerator = make_accelerator(cfg.train, rd.path)
    rd.start(accelerator.wait_for_everyone)
    model_path, tokenizer = sft_tokenizer(cfg)
    counts: Counter = Counter()
    examples, eval_examples = load_examples(cfg.data, tokenizer, counts)
    pad_id = tokenizer.pad_token_id
    plan, collate = batching(cfg, examples, pad_id)
    model = load_causal_lm(model_path, dtype=training_dtype(cfg.dtype, cfg.lora),
                           trust_remote_code=cfg.trust_remote_code, lora=cfg.lora)
    evaluate = lm_eval_fn(eval_examples, cfg.train.batch_size, pad_id, accelerator.device)
    tel = Telemetry(accelerator.device)
    result = train(
        model, accelerator=accelerator, settings=cfg.train, out_dir=rd.path, plan=plan, collate=collate,
        count_units=count_targets, step_fn=causal_lm_loss, evaluate=evaluate if eval_examples else None,
        resume=cfg.resume and not rd.fresh, desc=stage, telemetry=tel,
    )
    if result.stopped_early:
        console.print(f"{stage}: stopped after step {result.steps} as asked (train.stop_after_step); rerun to resume")
        return rd.path
    with tel.phase("save_model"):
        save_trained_model(accelerator, model, tokenizer, rd.path / "model",
                           merge_lora=merged_on_save(cfg.lora), card=sft_card(cfg, stage, counts, result))
    rd.finish(counts, steps=result.steps, seconds=result.seconds, final_metrics=result.last_metrics,
              eval_metrics=result.eval_metrics, eval_metrics_start=result.eval_metrics_start, model_dir=str(rd.path / "model"),
              phases=tel.summary())
    report(stage, rd, result, counts)
    return rd.path
