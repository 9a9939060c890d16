"""``alignline judge-sft``: fine-tune an evaluator on scored feedback (TSO evaluation correction).

Every feedback record becomes a conversation: the user turn is the evaluator prompt for its (question,
answer, criterion) (:data:`~alignline.judges.evaluator.EVALUATOR_TEMPLATE`), the assistant turn is
``Evaluation evidence: <evidence>\\nScore: <x>``. Those go to ``conversations.jsonl`` and are trained by the SFT
stage (``sft/``: the shared loop, loss on the assistant turn only, checkpoints and exact resume). A
conversation longer than ``max_length`` tokens is dropped (counted) rather than cut, because a cut target
would teach the evaluator to stop before its score.

Before and after training the evaluator (greedy) scores every held-out record, and its agreement with the
gold scores is written to ``agreement.json`` as ``{before, after}``: Spearman correlation, mean absolute
error, pairwise accuracy (pairs of answers to the same question and criterion with different gold scores,
ordered the same way) and the parse-failure rate. Evaluator outputs are cached in ``eval_cache.jsonl`` (keyed
by the model's files), and each one's parse is in ``evaluations_before.jsonl`` / ``evaluations_after.jsonl``.
"""

from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.config import Section
from alignline.data.chat import ensure_chat_template, tokenise_conversation
from alignline.data.io import (
    atomic_write_json,
    fingerprint,
    read_manifest,
    read_records,
    write_records,
)
from alignline.data.records import Conversation
from alignline.errors import ConfigError
from alignline.generate.base import SamplingParams
from alignline.generate.engines import EngineSettings, LazyEngine
from alignline.judges.cache import JudgeCache, ask_judge
from alignline.judges.evaluator import (
    EVALUATOR_VERSION,
    FeedbackRecord,
    agreement,
    diagnose_evaluation,
    evaluator_prompt,
    format_evaluation,
    parse_evaluation,
    question_key,
)
from alignline.models.card import markdown_table, update_card_section
from alignline.models.loading import LoraSettings, load_tokenizer, resolve_model
from alignline.stages import sft
from alignline.stages.common import Dtype, RunDir, console
from alignline.stages.feedback import EVAL_FILE, TRAIN_FILE
from alignline.train.loop import TrainSettings


def default_eval_sampling() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=256)


class JudgeSFTConfig(Section):
    """Configuration of ``alignline judge-sft``."""

    model: str = "smollm2-135m-instruct"
    """The evaluator's starting checkpoint: a local HF directory, a .gguf file, an alias, or a Hub id."""
    feedback: str
    """Training feedback: a run directory of ``alignline feedback`` (its feedback.jsonl and feedback_eval.jsonl)
    or a file of feedback records."""
    eval_feedback: str | None = None
    """Held-out feedback records for the agreement check (default: feedback_eval.jsonl of the feedback run)."""
    output_dir: str = "runs/judge_sft"
    """conversations.jsonl, sft/ (model/, checkpoints, metrics), agreement.json, evaluations_*.jsonl, manifest."""
    max_length: int = Field(2048, gt=8)
    """Longest training conversation in tokens; longer ones are dropped (counted), never cut."""
    packing: bool = True
    """Padding-free packing of short examples (as in sft)."""
    max_examples: int | None = Field(None, ge=1)
    """Train on at most this many feedback records (the first ones)."""
    eval_max_items: int | None = Field(None, ge=1)
    """Evaluate agreement on at most this many held-out records (the first ones)."""
    eval_sampling: SamplingParams = Field(default_factory=default_eval_sampling)
    """How the evaluator answers in the agreement check (default greedy, 256 new tokens)."""
    eval_batch_size: int = Field(8, gt=0)
    """Held-out evaluator prompts per engine call."""
    train: TrainSettings = Field(default_factory=sft.default_sft_train)
    """Optimiser and loop settings (sft defaults)."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights (merged into the saved model)."""
    dtype: Dtype = "auto"
    """Weights dtype for loading (training and the agreement check)."""
    chat_template: Literal["model", "fallback"] = "model"
    """The tokenizer's own chat template, or alignline's fallback (always used when the model has none)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory (off unless you trust it)."""
    resume: bool = True
    """Continue training from the newest complete checkpoint in output_dir/sft if there is one."""


def feedback_paths(cfg: JudgeSFTConfig) -> tuple[Path, Path]:
    src = Path(cfg.feedback)
    if not src.exists():
        raise ConfigError(f"feedback {src} not found; give a run directory of `alignline feedback` or a JSONL file")
    train = src / TRAIN_FILE if src.is_dir() else src
    held = Path(cfg.eval_feedback) if cfg.eval_feedback else (src / EVAL_FILE if src.is_dir() else None)
    if not train.exists():
        raise ConfigError(f"feedback {src} is a directory without {TRAIN_FILE}; is it a run of `alignline feedback`?")
    if held is None or not held.exists():
        raise ConfigError(f"no held-out feedback for the agreement check ({held or 'eval_feedback not set'}); set "
                          "eval_feedback=PATH, or run `alignline feedback` with eval_fraction > 0")
    return train, held


def to_conversation(rec: FeedbackRecord) -> Conversation:
    return Conversation(id=rec.id, messages=[
        {"role": "user", "content": evaluator_prompt(rec.question, rec.answer, rec.criterion)},
        {"role": "assistant", "content": format_evaluation(rec.evidence, rec.score)}],
        meta={"criterion": rec.criterion, "score": rec.score, "source": rec.source})


def build_conversations(cfg: JudgeSFTConfig, records: list[FeedbackRecord], counts: Counter,
                        where: str) -> list[Conversation]:
    """Conversations that fit in max_length tokens under the model's (or the fallback) chat template."""
    tokenizer = load_tokenizer(resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template == "fallback":
        tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    out = []
    for rec in records:
        conv = to_conversation(rec)
        ex = tokenise_conversation(tokenizer, conv.messages, train_on="last", where=f"{where}: record {rec.id}")
        if len(ex.input_ids) > cfg.max_length:
            counts["dropped_over_length"] += 1
            continue
        out.append(conv)
    return out


def evaluate(model_path: Path, cfg: JudgeSFTConfig, held: list[FeedbackRecord], cache: JudgeCache,
             out_file: Path) -> dict:
    """Agreement of the evaluator at ``model_path`` with the held-out gold scores."""
    engine = LazyEngine(EngineSettings(engine="hf", model=str(model_path), dtype=cfg.dtype,
                                       trust_remote_code=cfg.trust_remote_code))
    texts = [evaluator_prompt(r.question, r.answer, r.criterion) for r in held]
    try:
        outputs, calls = ask_judge(engine, texts, cfg.eval_sampling, cache, judge_id=f"hf:{fingerprint(model_path)}",
                                   template_version=EVALUATOR_VERSION, batch_size=cfg.eval_batch_size)
    finally:
        engine.close()
        del engine
        gc.collect()
        _empty_cuda_cache()
    rows, pred = [], []
    for rec, raw in zip(held, outputs):
        parsed = parse_evaluation(raw)
        pred.append(None if parsed is None else parsed.score)
        rows.append({"id": rec.id, "criterion": rec.criterion, "gold": rec.score,
                     "score": None if parsed is None else parsed.score,
                     "failure": None if parsed is not None else diagnose_evaluation(raw), "output": raw})
    write_records(out_file, rows)
    groups = [(question_key(r.question), r.criterion) for r in held]
    return {**agreement(groups, [r.score for r in held], pred), "model": str(model_path), "evaluator_calls": calls}


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def agreement_table(result: dict) -> str:
    keys = ("spearman", "mae", "pairwise_accuracy", "parse_failure_rate")
    lines = [f"{'':20s}{'before':>10s}{'after':>10s}"]
    for k in keys:
        lines.append(f"{k:20s}{_fmt(result['before'][k]):>10s}{_fmt(result['after'][k]):>10s}")
    lines.append(f"{'pairs':20s}{result['before']['pairs']:>10d}{result['after']['pairs']:>10d}")
    return "\n".join(lines)


def agreement_card_section(cfg: JudgeSFTConfig, result: dict, held: int) -> str:
    """The evaluator's card section: its agreement with the held-out feedback before and after, and the
    judge-sft command (the card's own command reproduces only the inner sft run)."""
    def figure(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    rows = {m: f"{figure(result['before'].get(m))} -> {figure(result['after'].get(m))}"
            for m in ("spearman", "mae", "pairwise_accuracy", "parse_failure_rate")}
    return (f"## Evaluator agreement ({held} held-out feedback records, before -> after)\n\n"
            f"{markdown_table(rows, ('metric', 'value'))}\n\nThe whole judge-sft stage (feedback to conversations, "
            f"training, agreement):\n\n```bash\nalignline judge-sft {Path(cfg.output_dir) / 'config.yaml'}\n```")


def read_feedback(cfg: JudgeSFTConfig, train_path, held_path, counts: Counter
                  ) -> tuple[list[FeedbackRecord], list[FeedbackRecord]]:
    """The training and held-out feedback records (each cut to its limit), counted; a question in both is
    counted and said (the agreement after training is then optimistic)."""
    records = read_records(train_path, FeedbackRecord)
    if cfg.max_examples is not None:
        records = records[: cfg.max_examples]
    held = read_records(held_path, FeedbackRecord)
    if cfg.eval_max_items is not None:
        held = held[: cfg.eval_max_items]
    if not held:
        raise ConfigError(f"{held_path} holds no feedback records; the agreement check needs some")
    leaked = {question_key(r.question) for r in records} & {question_key(r.question) for r in held}
    counts["train_records"], counts["eval_records"], counts["questions_in_both"] = len(records), len(held), len(leaked)
    if leaked:
        console.print(f"[yellow]judge-sft: {len(leaked)} held-out questions also appear in the training feedback; "
                      "the agreement after training is optimistic[/yellow]")
    return records, held


def run(cfg: JudgeSFTConfig) -> Path:
    train_path, held_path = feedback_paths(cfg)
    rd = RunDir("judge_sft", cfg, cfg.output_dir, {"model": cfg.model, "feedback": train_path,
                                                   "eval_feedback": held_path})
    if rd.skip_if_done():
        return rd.path
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    rd.start(state.wait_for_everyone)  # every process reads the old manifest before it is replaced
    counts: Counter = Counter()
    records, held = read_feedback(cfg, train_path, held_path, counts)
    convs = build_conversations(cfg, records, counts, str(train_path))
    if not convs:
        raise ConfigError(f"{train_path}: no feedback record fits in max_length={cfg.max_length} tokens "
                          f"({dict(counts)}); raise max_length")
    conv_path = rd.path / "conversations.jsonl"
    write_records(conv_path, convs)
    counts["conversations"] = len(convs)

    result: dict = {"template": EVALUATOR_VERSION, "held_out": str(held_path),
                    "eval_sampling": cfg.eval_sampling.model_dump(mode="json")}
    if state.is_main_process:
        with JudgeCache(rd.path / "eval_cache.jsonl") as cache:
            result["before"] = evaluate(resolve_model(cfg.model), cfg, held, cache, rd.path / "evaluations_before.jsonl")
    state.wait_for_everyone()

    sft_cfg = sft.SFTConfig(
        model=cfg.model, output_dir=str(rd.path / "sft"), train=cfg.train, lora=cfg.lora, dtype=cfg.dtype,
        chat_template=cfg.chat_template, trust_remote_code=cfg.trust_remote_code, resume=cfg.resume,
        data=sft.SFTData(train=str(conv_path), max_length=cfg.max_length, long_examples="truncate", train_on="last",
                         packing=cfg.packing))
    sft_dir = sft.run(sft_cfg, stage="judge_sft_train")
    trained = read_manifest(sft_dir)
    if not trained or trained.get("status") != "complete":
        console.print("judge-sft: training stopped before the end (train.stop_after_step); rerun to resume")
        return rd.path
    model_dir = sft_dir / "model"
    if state.is_main_process:
        with JudgeCache(rd.path / "eval_cache.jsonl") as cache:
            result["after"] = evaluate(model_dir, cfg, held, cache, rd.path / "evaluations_after.jsonl")
        atomic_write_json(rd.path / "agreement.json", result)
        update_card_section(model_dir, "judge-sft", agreement_card_section(cfg, result, len(held)))
        rd.finish(counts, model_dir=str(model_dir), steps=trained.get("steps"), agreement={
            k: {m: result[k][m] for m in ("spearman", "mae", "pairwise_accuracy", "parse_failure_rate")}
            for k in ("before", "after")})
        console.print(f"evaluator agreement with {len(held)} held-out feedback records:\n{agreement_table(result)}")
        console.print(f"[green]judge-sft done[/green]: {dict(counts)}\n  evaluator (HF format): {model_dir}\n"
                      f"  agreement: {rd.path / 'agreement.json'}")
    state.wait_for_everyone()
    return rd.path
