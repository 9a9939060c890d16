"""Verifiable instructions: the ``verifier`` judge (design section 5), deterministic and model-free.

A *verifiable instruction* is a constraint on the form of a response that a few lines of Python can check
("answer in fewer than 80 words", "do not use commas", "wrap the answer in double quotes"). The taxonomy is
IFEval's (Zhou et al., 2023): its 25 instruction types, with their ids, argument names and the official
checker's semantics, plus one type of this project's own (``startend:start_checker``). The wordings and word
lists are this project's.

How the pieces fit:

* :mod:`alignline.judges.instruction_types` holds :data:`REGISTRY`: per type, its arguments (a pydantic
  model), a seeded builder that draws arguments within an answer budget and picks one of at least three
  wordings (:mod:`alignline.judges.instruction_wordings`), and its check
  (:mod:`alignline.judges.instruction_checks`).
* :func:`resolve_types` turns a configuration (``types: all``, a list of ids or short names, ``exclude``,
  ``max_answer_words``) into the pool of types to draw from; :data:`ALIASES` keeps the short names of
  earlier versions (``no_commas``, ``start_with``, ...) working.
* :func:`attach_instructions` picks 1-3 mutually compatible types for a prompt (seeded by a base seed and
  the prompt id only, so the choice does not depend on processing order, sharding or hash seeds), appends
  their wordings to the last user turn and stores them in ``prompt.meta["instructions"]`` as
  ``[{"id", "kwargs", "text"}]`` (IFEval's id and kwargs, and the wording used). Pairs that cannot (or
  should not) be asked together are listed in :data:`CONFLICTS`.
* :func:`verify` checks a response against such a list and returns a :class:`VerifyResult`;
  :class:`VerifierJudge` does the same for a Prompt record; :func:`aggregate` computes IFEval's
  prompt-level and instruction-level accuracies.

Strict and loose mode are the official ones. ``strict``: the response as it is. ``loose``: the response
follows an instruction if any of these variants does: the response, the response without its first line,
without its last line, without both (those three stripped), and each of the four with every ``*``
removed. A blank response or variant never follows any instruction.
"""

from __future__ import annotations

import difflib
import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from alignline.data.records import Prompt
from alignline.errors import ConfigError, DataError
from alignline.judges.instruction_checks import count_words, split_sentences
from alignline.judges.instruction_types import (
    REGISTRY,
    UNLIMITED,
    Instruction,
    InstructionArgs,
    InstructionType,
)

__all__ = [
    "ALIASES",
    "CONFLICTS",
    "MODES",
    "REGISTRY",
    "Instruction",
    "InstructionArgs",
    "InstructionType",
    "VerifierJudge",
    "VerifyResult",
    "aggregate",
    "attach_instructions",
    "canonical_id",
    "canonical_instructions",
    "check",
    "compatible",
    "count_words",
    "instruction_seed",
    "loose_variants",
    "resolve_types",
    "split_sentences",
    "verify",
]

Mode = Literal["strict", "loose"]
MODES: tuple[str, ...] = ("strict", "loose")

ALIASES: dict[str, str] = {
    "word_count": "length_constraints:number_words",
    "sentence_count": "length_constraints:number_sentences",
    "paragraph_count": "length_constraints:number_paragraphs",
    "include_keywords": "keywords:existence",
    "exclude_words": "keywords:forbidden_words",
    "keyword_frequency": "keywords:frequency",
    "start_with": "startend:start_checker",
    "end_with": "startend:end_checker",
    "all_lowercase": "change_case:english_lowercase",
    "all_uppercase": "change_case:english_capital",
    "no_commas": "punctuation:no_comma",
    "bullet_count": "detectable_format:number_bullet_lists",
    "highlighted_sections": "detectable_format:number_highlighted_sections",
    "quoted": "startend:quotation",
    **{t.split(":", 1)[1]: t for t in REGISTRY},  # the part after the colon: title, json_format, ...
}
"""Short names accepted wherever a type id is: the ids of alignline before the IFEval taxonomy (stored in
older prompt files, still in configs) and each id's part after the colon."""

# Older prompt files store these ids with other argument names; verify() translates them.
_LEGACY_KEYS: dict[str, dict[str, str]] = {
    "word_count": {"n": "num_words"}, "sentence_count": {"n": "num_sentences"},
    "paragraph_count": {"n": "num_paragraphs"}, "exclude_words": {"words": "forbidden_words"},
    "keyword_frequency": {"n": "frequency"}, "start_with": {"phrase": "start_phrase"},
    "end_with": {"phrase": "end_phrase"}, "bullet_count": {"n": "num_bullets"},
    "highlighted_sections": {"n": "num_highlights"}, "postscript": {"marker": "postscript_marker"},
}

# ---------------------------------------------------------------------------------------------------------
# Conflicts
# ---------------------------------------------------------------------------------------------------------

_ANSWERS_ONLY_WITH: dict[str, tuple[tuple[str, ...], str]] = {
    "detectable_format:constrained_response": ((), "the answer is one fixed sentence"),
    "detectable_format:json_format": (
        ("keywords:existence", "keywords:forbidden_words"), "a JSON-only response has no room for it"),
    "combination:two_responses": (
        ("keywords:existence", "keywords:forbidden_words", "language:response_language",
         "detectable_format:title", "punctuation:no_comma"), "it is unclear which of the two answers it binds"),
    "combination:repeat_prompt": (
        ("keywords:existence", "detectable_format:title"),
        "the repeated request fixes the start and its wording (commas, case, language)"),
}
_PAIRS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("language:response_language",
     ("keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
      "startend:end_checker", "startend:start_checker", "change_case:english_capital",
      "change_case:english_lowercase", "change_case:capital_word_frequency",
      "detectable_format:multiple_sections", "length_constraints:nth_paragraph_first_word"),
     "it asks for English words, letters, capitals or headers in another language"),
    ("change_case:english_lowercase", ("change_case:english_capital", "change_case:capital_word_frequency",
                                       "detectable_format:multiple_sections"),
     "lowercase rules out capitals (and the section headers have one)"),
    ("change_case:english_capital", ("change_case:capital_word_frequency", "detectable_format:multiple_sections"),
     "all-capitals fixes the capital-word count (and some section headers are not capitals)"),
    ("length_constraints:number_paragraphs", ("length_constraints:nth_paragraph_first_word",
                                              "length_constraints:number_sentences"),
     "two paragraph definitions, or a sentence count fighting a paragraph count"),
    ("detectable_format:multiple_sections", ("detectable_format:number_highlighted_sections",
                                             "length_constraints:nth_paragraph_first_word"),
     "headers are often highlighted, and a header would open the paragraph"),
    ("startend:quotation", ("detectable_format:title", "detectable_format:number_bullet_lists"),
     "the opening quotation mark spoils a leading title or the first bullet"),
    ("startend:start_checker", ("detectable_format:title", "length_constraints:nth_paragraph_first_word"),
     "both fix how the response opens"),
)


def _conflicts() -> dict[frozenset[str], str]:
    out: dict[frozenset[str], str] = {}
    for exclusive, (allowed, reason) in _ANSWERS_ONLY_WITH.items():
        for other in REGISTRY:
            if other != exclusive and other not in allowed:
                out.setdefault(frozenset((exclusive, other)), reason)
    for first, others, reason in _PAIRS:
        for other in others:
            out.setdefault(frozenset((first, other)), reason)
    return out


CONFLICTS: dict[frozenset[str], str] = _conflicts()
"""Pairs of types that :func:`attach_instructions` never combines, with the reason."""


def compatible(a: str, b: str) -> bool:
    """Whether two instruction types may be attached to the same prompt (distinct and not in CONFLICTS)."""
    return a != b and frozenset((a, b)) not in CONFLICTS


# ---------------------------------------------------------------------------------------------------------
# Choosing the pool of types
# ---------------------------------------------------------------------------------------------------------


def _known_ids() -> str:
    return ", ".join(REGISTRY)


def _unknown_id_hint(name: Any) -> str:
    close = difflib.get_close_matches(str(name), [*REGISTRY, *ALIASES], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def canonical_id(name: str) -> str | None:
    """The registry id of a type id or short name (``no_commas`` -> ``punctuation:no_comma``); None if unknown."""
    return name if name in REGISTRY else ALIASES.get(name)


def _resolve_names(names: Sequence[str], setting: str) -> list[str]:
    out = []
    for name in names:
        found = canonical_id(str(name))
        if found is None:
            raise ConfigError(f"{setting}: unknown instruction type '{name}'{_unknown_id_hint(name)}; known "
                              f"types: all, ifeval, {_known_ids()} (or a short name such as no_comma)")
        out.append(found)
    return out


def resolve_types(types: str | Sequence[str] | None = None, exclude: Sequence[str] = (),
                  max_answer_words: int | None = None) -> list[str]:
    """The type ids to draw from, in registry order.

    ``types``: ``None`` or ``"all"`` (every type), ``"ifeval"`` (IFEval's 25), or a list of ids / short names;
    ``exclude``: ids or short names to leave out; ``max_answer_words``: leave out the types whose
    ``min_words`` exceeds this answer budget. Raises ConfigError naming the setting when a name is unknown
    or nothing is left."""
    if types is None or types == "all":
        chosen = set(REGISTRY)
    elif types == "ifeval":
        chosen = {t for t, kind in REGISTRY.items() if kind.ifeval}
    elif isinstance(types, str):
        raise ConfigError(f"instructions.types is {types!r}; give all, ifeval or a list of type ids")
    else:
        if not types:
            raise ConfigError(f"instructions.types is empty; leave it unset (all) or pick from: {_known_ids()}")
        chosen = set(_resolve_names(types, "instructions.types"))
    chosen -= set(_resolve_names(exclude, "instructions.exclude"))
    if max_answer_words is not None:
        chosen = {t for t in chosen if REGISTRY[t].min_words <= max_answer_words}
    if not chosen:
        raise ConfigError(f"no instruction type is left to draw from (types={types!r}, exclude={list(exclude)}, "
                          f"max_answer_words={max_answer_words}); widen types or raise max_answer_words")
    return [t for t in REGISTRY if t in chosen]


# ---------------------------------------------------------------------------------------------------------
# Attaching instructions to prompts
# ---------------------------------------------------------------------------------------------------------


def instruction_seed(rng_seed: str | int, prompt_id: str) -> int:
    """The per-prompt seed: sha256 of the base seed and the prompt id (independent of order and sharding).

    The base seed is used through ``str()``, so ``1234`` and ``"1234"`` give the same draw. (All seeded hashes:
    docs/architecture.md.)"""
    digest = hashlib.sha256(f"alignline.verifiable\x00{rng_seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _choose_types(rng: random.Random, k: int, pool: Sequence[str], request: str) -> list[str]:
    order = list(pool)
    rng.shuffle(order)
    chosen: list[str] = []
    for t in order:
        if len(chosen) == k:
            break
        if REGISTRY[t].applies(request) and all(compatible(t, c) for c in chosen):
            chosen.append(t)
    return chosen


_WORD_LIMIT = "length_constraints:number_words"


def _build(rng: random.Random, chosen: list[str], budget: int, request: str) -> list[Instruction]:
    """Instances of the chosen types. A word limit ("less than n words") is drawn first and lowers the budget
    of the others, so that their counts (bullets, sentences, paragraphs, ...) fit in n - 1 words."""
    out = []
    for type_id in sorted(chosen, key=lambda t: t != _WORD_LIMIT):
        inst = REGISTRY[type_id].build(rng, budget, request)
        if type_id == _WORD_LIMIT and inst.kwargs["relation"] == "less than":
            budget = min(budget, inst.kwargs["num_words"] - 1)
        out.append(inst)
    return out


def attach_instructions(prompt: Prompt, rng_seed: str | int, k_min: int = 1, k_max: int = 3,
                        types: str | Sequence[str] | None = None, *, exclude: Sequence[str] = (),
                        max_answer_words: int | None = None) -> Prompt:
    """A copy of ``prompt`` with ``k_min..k_max`` compatible verifiable instructions attached.

    The draw is seeded by :func:`instruction_seed` (``rng_seed`` and ``prompt.id``), so a prompt gets the same
    instructions whatever the order or sharding (only ``combination:repeat_prompt`` also looks at the request:
    it is skipped for requests of more than 40 words). Their wordings are appended to the last user turn
    (``"\\n\\n" + " ".join(texts)``) and the instructions are stored in ``meta["instructions"]`` as
    ``[{"id", "kwargs", "text"}]``. ``types``/``exclude``/``max_answer_words`` choose the pool
    (:func:`resolve_types`); counts are drawn to fit ``max_answer_words`` and a drawn word limit. When too few compatible types are
    left, fewer than ``k_min`` (at least one) are attached. A prompt that already has ``meta["instructions"]``
    is returned unchanged (as a copy), so attaching twice is harmless.
    """
    if k_min < 1 or k_max < k_min:
        raise ConfigError(f"instructions need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    pool = resolve_types(types, exclude, max_answer_words)
    if prompt.meta.get("instructions"):
        return prompt.model_copy(deep=True)
    request = prompt.messages[-1].content
    rng = random.Random(instruction_seed(rng_seed, prompt.id))
    chosen = _choose_types(rng, rng.randint(k_min, k_max), pool, request)
    instructions = _build(rng, chosen, UNLIMITED if max_answer_words is None else max_answer_words, request)
    data = prompt.model_dump()
    last = data["messages"][-1]
    last["content"] = last["content"].rstrip() + "\n\n" + " ".join(i.text for i in instructions)
    data["meta"] = {**data["meta"], "instructions": [i.model_dump() for i in instructions]}
    return Prompt.model_validate(data)


# ---------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------


class VerifyResult(BaseModel):
    """Per-instruction outcome of :func:`verify`; ``score`` is the fraction of instructions followed. ``ids``
    are the ids as stored (an older short id stays as it was)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode
    ids: list[str]
    followed: list[bool]
    score: float

    @property
    def all_followed(self) -> bool:
        return all(self.followed)


def loose_variants(response: str) -> list[str]:
    """The texts loose mode tries, the response first: the response, without its first line, without its last
    line, without both (those three stripped), each also with every ``*`` removed. Duplicates and blank
    variants are dropped (a blank variant follows nothing)."""
    lines = response.split("\n")
    bases = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    out: list[str] = []
    for base in bases:
        for variant in (base, base.replace("*", "")):
            if variant.strip() and variant not in out:
                out.append(variant)
    return out


def check(kind: InstructionType, response: str, args: InstructionArgs | Mapping[str, Any],
          mode: Mode = "strict") -> bool:
    """Whether ``response`` follows one instruction of type ``kind`` in ``mode``."""
    parsed = kind.parse_args(args)
    if mode == "strict":
        return bool(response.strip()) and kind.follows(response, parsed)
    if mode == "loose":
        return any(kind.follows(v, parsed) for v in loose_variants(response))
    raise ConfigError(f"verifier mode must be one of {', '.join(MODES)}, got {mode!r}")


def _legacy_kwargs(name: str, kwargs: Any) -> Any:
    """Arguments of an older short id in today's names (``word_count`` ``at_most n`` -> ``less than n+1``)."""
    if name not in _LEGACY_KEYS or not isinstance(kwargs, Mapping):
        return kwargs
    keys = _LEGACY_KEYS[name]
    out = {keys.get(k, k): v for k, v in kwargs.items()}
    if name == "keyword_frequency":
        out.setdefault("relation", "at least")
    count_key = keys.get("n")
    if name in ("word_count", "sentence_count") and isinstance(out.get(count_key), int):
        if out.get("relation") == "at_most":
            out.update(relation="less than", **{count_key: out[count_key] + 1})
        elif out.get("relation") == "at_least":
            out["relation"] = "at least"
    return out


def _parse_instructions(instructions: Sequence[Mapping[str, Any] | Instruction],
                        ) -> list[tuple[str, InstructionType, InstructionArgs]]:
    if isinstance(instructions, str | bytes | Mapping) or not isinstance(instructions, Sequence):
        raise DataError("instructions must be a list", field="instructions",
                        expected='a list of {"id", "kwargs", "text"} objects', found=type(instructions).__name__)
    if not instructions:
        raise DataError("there are no instructions to verify", field="instructions",
                        expected="at least one instruction")
    parsed = []
    for i, item in enumerate(instructions):
        where = f"instructions[{i}]"
        if isinstance(item, Instruction):
            item = item.model_dump()
        if not isinstance(item, Mapping):
            raise DataError("an instruction must be an object", field=where,
                            expected='{"id", "kwargs", "text"}', found=type(item).__name__)
        name = item.get("id")
        found = canonical_id(name) if isinstance(name, str) else None
        if found is None:
            raise DataError(f"unknown instruction id '{name}'{_unknown_id_hint(name)}", field=f"{where}.id",
                            expected=f"one of {_known_ids()}")
        kind = REGISTRY[found]
        kwargs = _legacy_kwargs(name, item.get("kwargs", {}))
        parsed.append((name, kind, kind.parse_args(kwargs, field=f"{where}.kwargs")))
    return parsed


def canonical_instructions(instructions: Sequence[Mapping[str, Any] | Instruction]) -> list[tuple[str, dict]]:
    """(type id, arguments) of each instruction in today's ids and argument names (an older short id such as
    ``no_commas`` becomes ``punctuation:no_comma``); malformed ones raise DataError as in :func:`verify`."""
    return [(kind.id, args.model_dump()) for _, kind, args in _parse_instructions(instructions)]


def verify(response: str, instructions: Sequence[Mapping[str, Any] | Instruction],
           mode: Mode = "strict") -> VerifyResult:
    """Check ``response`` against instructions (``[{"id", "kwargs", "text"}]``, as in ``meta["instructions"]``).

    Returns one boolean per instruction and ``score`` = the fraction followed. An unknown id or malformed
    arguments raise DataError naming the instruction's position, id and field.
    """
    if mode not in MODES:
        raise ConfigError(f"verifier mode must be one of {', '.join(MODES)}, got {mode!r}")
    parsed = _parse_instructions(instructions)
    followed = [check(kind, response, args, mode) for _, kind, args in parsed]
    return VerifyResult(mode=mode, ids=[name for name, _, _ in parsed], followed=followed,
                        score=sum(followed) / len(followed))


class VerifierJudge:
    """The ``verifier`` judge: scores a response by the verifiable instructions in its prompt's meta.

    ``score`` is the fraction of instructions followed (0..1) in ``mode`` (``strict`` by default).
    """

    id = "verifier"

    def __init__(self, mode: Mode = "strict"):
        if mode not in MODES:
            raise ConfigError(f"verifier mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode: Mode = mode

    def instructions(self, prompt: Prompt) -> list[Any]:
        found = prompt.meta.get("instructions")
        if not found:
            raise DataError(f"prompt '{prompt.id}' has no verifiable instructions; attach instructions with "
                            "prepare's instructions setting", field="meta.instructions")
        return found

    def score_detail(self, prompt: Prompt, response: str, mode: Mode | None = None) -> VerifyResult:
        """Per-instruction result for one response (``mode`` overrides the judge's mode)."""
        instructions = self.instructions(prompt)
        try:
            return verify(response, instructions, mode or self.mode)
        except DataError as exc:
            raise DataError(f"prompt '{prompt.id}' has malformed meta.instructions: {exc}") from None

    def score(self, prompt: Prompt, response: str) -> float:
        """Fraction of the prompt's instructions that ``response`` follows."""
        return self.score_detail(prompt, response).score


def aggregate(results: Sequence[tuple[VerifyResult, VerifyResult]]) -> dict[str, Any]:
    """IFEval-style accuracies from ``(strict, loose)`` results, one pair per (prompt, response).

    ``prompt_level_*``: fraction of responses that follow all their instructions; ``instruction_level_*``:
    fraction of all instructions followed; ``per_type``: instruction-level accuracy per instruction id.
    """
    if not results:
        raise DataError("aggregate needs at least one (strict, loose) result pair")
    n_inst = 0
    prompt_ok = {"strict": 0, "loose": 0}
    inst_ok = {"strict": 0, "loose": 0}
    per_type: dict[str, dict[str, float]] = {}
    for i, (strict, loose) in enumerate(results):
        if strict.mode != "strict" or loose.mode != "loose" or strict.ids != loose.ids:
            raise DataError("each result must be a (strict, loose) pair for the same instructions",
                            field=f"results[{i}]", found=f"modes ({strict.mode}, {loose.mode})")
        n_inst += len(strict.ids)
        for key, res in (("strict", strict), ("loose", loose)):
            prompt_ok[key] += res.all_followed
            inst_ok[key] += sum(res.followed)
        for name, s, lo in zip(strict.ids, strict.followed, loose.followed):
            row = per_type.setdefault(name, {"n": 0, "strict": 0, "loose": 0})
            row["n"] += 1
            row["strict"] += s
            row["loose"] += lo
    n = len(results)
    return {
        "n_prompts": n,
        "n_instructions": n_inst,
        "prompt_level_strict": prompt_ok["strict"] / n,
        "prompt_level_loose": prompt_ok["loose"] / n,
        "instruction_level_strict": inst_ok["strict"] / n_inst,
        "instruction_level_loose": inst_ok["loose"] / n_inst,
        "per_type": {k: {"n": int(v["n"]), "strict": v["strict"] / v["n"], "loose": v["loose"] / v["n"]}
                     for k, v in sorted(per_type.items())},
    }
