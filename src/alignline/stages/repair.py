"""``alignline repair``: verifier-guided repair of answers into instruction-following training data.

For each prompt with verifiable instructions (``meta.instructions``, attached by ``prepare``) the base answer -
the prompt's ``reference`` (the dataset's original answer) or the first usable sampled response - is optionally
cut to its leading whole sentences, then rewritten by :func:`alignline.judges.instruction_repairs.repair` so that
it follows every instruction, and kept only when the verifier (strict) agrees. Two outputs:

* ``conversations.jsonl``: prompt + repaired answer, for ``sft`` / ``rs`` (loss on the last turn);
* ``pairs.jsonl``: chosen = repaired, rejected = the base answer, where the base did not follow them all: two
  answers that differ only in what the instructions ask for (for ``dpo`` / ``tso``).

Counts per instruction type (repaired, kept as they were, not repairable) go into the manifest, so a reader
sees which types the data teaches. What needs new content (at least n words, another language) is never
invented: such prompts are dropped unless the base already follows them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydantic import Field, model_validator

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import atomic_write_bytes, jsonl_bytes, read_prompts, read_records
from alignline.data.records import Conversation, Pair, Prompt, Response
from alignline.errors import DataError
from alignline.judges.instruction_repairs import leading_sentences, repair
from alignline.judges.verifiable import instruction_seed
from alignline.stages.common import RunDir, console, stage_tokenizer, usable_responses


class RepairConfig(Section):
    """Configuration of ``alignline repair``."""

    prompts: RecordsSource
    """Prompt records with ``meta.instructions`` (prepare's ``instructions:`` splits)."""
    responses: str | None = None
    """Sampled responses to repair (the first usable one per prompt, by sample index); unset: each prompt's
    ``reference`` answer."""
    output_dir: str = "runs/repair"
    """conversations.jsonl, pairs.jsonl, manifest.json."""
    max_answer_words: int | None = Field(None, gt=0)
    """Cut the base answer to its leading whole sentences within this many words before repairing (short answers
    are cheap to train on, and an answer that ends is one a closing phrase or quotation mark can follow);
    unset: the whole answer."""
    tokenizer: str | None = None
    """With max_tokens: the tokenizer (a model dir, alias or Hub id) that counts a conversation's tokens."""
    max_tokens: int | None = Field(None, gt=0)
    """Drop a repaired conversation longer than this (chat template included), so that training never cuts the
    end of an answer off."""
    max_records: int | None = Field(None, gt=0)
    """Keep at most this many conversations (the first, in prompt order); unset: all."""
    seed: int = 0
    """Seed of the added phrases (per prompt, with its id)."""
    trust_remote_code: bool = False
    """Passed to the tokenizer."""

    @model_validator(mode="after")
    def _tokens_need_a_tokenizer(self) -> RepairConfig:
        if self.max_tokens is not None and not self.tokenizer:
            raise ValueError("max_tokens needs tokenizer (e.g. tokenizer=smollm2-135m-instruct); or unset max_tokens")
        return self


def request_of(prompt: Prompt) -> str:
    """The last user turn without the instruction wordings that ``attach_instructions`` appended to it."""
    content = prompt.messages[-1].content
    texts = " ".join(i.get("text", "") for i in prompt.meta["instructions"])
    return content[: len(content) - len(texts)].rstrip() if texts and content.endswith(texts) else content


def base_answers(cfg: RepairConfig, prompts: list[Prompt], counts: Counter) -> list[tuple[Prompt, str]]:
    """(prompt, the answer to repair) for each prompt that has instructions and an answer."""
    missing = [p.id for p in prompts if not p.meta.get("instructions")]
    if missing:
        raise DataError(f"{len(missing)} prompt(s) have no verifiable instructions (first: {missing[0]}); take "
                        "the prompts from a prepare split listed in its instructions.splits",
                        path=str(cfg.prompts), field="meta.instructions", expected="a non-empty list")
    if cfg.responses is None:
        counts["prompts_without_reference"] = sum(not (p.reference or "").strip() for p in prompts)
        return [(p, p.reference) for p in prompts if (p.reference or "").strip()]
    grouped = usable_responses(read_records(cfg.responses, Response), {p.id for p in prompts}, cfg.responses, counts)
    counts["prompts_without_response"] = sum(not grouped.get(p.id) for p in prompts)
    return [(p, grouped[p.id][0].text) for p in prompts if grouped.get(p.id)]


def repair_all(cfg: RepairConfig, items: list[tuple[Prompt, str]], counts: Counter, per_type: dict[str, Counter],
               count_tokens) -> tuple[list[Conversation], list[Pair]]:
    conversations, pairs = [], []
    for prompt, answer in items:
        if cfg.max_records is not None and len(conversations) == cfg.max_records:
            break
        instructions = prompt.meta["instructions"]
        base = leading_sentences(answer, cfg.max_answer_words) if cfg.max_answer_words else answer.strip()
        fixed = repair(base, instructions, request_of(prompt), instruction_seed(cfg.seed, prompt.id))
        outcome = "unrepairable" if fixed is None else "followed" if fixed == base else "repaired"
        for item in instructions:
            per_type[item["id"]][outcome] += 1
        if fixed is None:
            counts["dropped_unrepairable"] += 1
            continue
        messages = [*prompt.messages, {"role": "assistant", "content": fixed}]
        if count_tokens is not None and count_tokens(messages) > cfg.max_tokens:
            counts["dropped_too_long"] += 1
            continue
        conversations.append(Conversation(id=prompt.id, messages=messages))
        counts[f"answers_{outcome}"] += 1
        if fixed != base:
            pairs.append(Pair(id=prompt.id, prompt=prompt.messages, chosen=fixed, rejected=base,
                              reason="verifier-guided repair: the chosen answer is the rejected one rewritten to "
                                     "follow every instruction",
                              provenance={"source": "reference" if cfg.responses is None else "response",
                                          "instructions": [i["id"] for i in instructions]}))
    return conversations, pairs


def token_counter(cfg: RepairConfig):
    if cfg.max_tokens is None:
        return None
    from alignline.data.chat import encode, render

    _, tokenizer = stage_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    return lambda messages: len(encode(tokenizer, render(tokenizer, messages, add_generation_prompt=False)))


def run(cfg: RepairConfig) -> Path:
    rd = RunDir("repair", cfg, cfg.output_dir, {"prompts": cfg.prompts, "responses": cfg.responses})
    if rd.skip_if_done():
        return rd.path
    rd.start()
    counts: Counter = Counter()
    per_type: dict[str, Counter] = {}
    prompts = read_prompts(cfg.prompts, required=True)
    items = base_answers(cfg, prompts, counts)
    for prompt, _ in items:
        for item in prompt.meta["instructions"]:
            per_type.setdefault(item["id"], Counter())
    conversations, pairs = repair_all(cfg, items, counts, per_type, token_counter(cfg))
    if not conversations:
        raise DataError(f"no answer could be repaired ({dict(counts)}): raise max_answer_words or max_tokens, or "
                        "give prompts that carry answers (reference) or responses", path=str(cfg.prompts))
    atomic_write_bytes(rd.path / "conversations.jsonl", jsonl_bytes(conversations))
    atomic_write_bytes(rd.path / "pairs.jsonl", jsonl_bytes(pairs))
    counts.update(conversations=len(conversations), pairs=len(pairs))
    rd.finish(counts, per_type={k: dict(v) for k, v in sorted(per_type.items())})
    console.print(f"[green]repair done[/green]: {len(conversations)} conversations, {len(pairs)} pairs "
                  f"({dict(counts)})\n  {rd.path}")
    return rd.path
