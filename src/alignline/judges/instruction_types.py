"""The verifiable instruction types: IFEval's 25 and one of this project's own, each with its arguments,
its seeded builder and its check.

A type's id and argument names are IFEval's (``length_constraints:number_words`` with ``num_words`` and
``relation``), so a stored instruction can be checked by the official checker too; its wordings
(:mod:`alignline.judges.instruction_wordings`) and word lists are this project's. ``startend:start_checker``
is the one type IFEval lacks. The checks are in :mod:`alignline.judges.instruction_checks`.

A builder draws its arguments from a seeded :class:`random.Random` within an *answer budget* (the most
words an answer may have): counts that need room (sentences, paragraphs, bullets, ...) are capped to fit,
and a type's ``min_words`` says how long an answer its cheapest instance needs, so a short budget can
leave the long-answer types out (:func:`alignline.judges.verifiable.resolve_types`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from alignline.errors import DataError
from alignline.judges import instruction_checks as checks
from alignline.judges import instruction_wordings as words

__all__ = ["REGISTRY", "UNLIMITED", "Instruction", "InstructionArgs", "InstructionType"]

UNLIMITED = 10**9
"""The answer budget when none is set."""

Relation = Literal["less than", "at least"]


def _plain(value: str) -> str:
    value = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9' -]*", value):
        raise ValueError(f"{value!r} must be a word or phrase of letters, digits, spaces, ' and -")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("it is blank")
    return value.strip()


def _marker(value: str) -> str:
    value = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9.: ]+", value):
        raise ValueError(f"{value!r} must be made of letters, digits, '.', ':' and spaces (e.g. P.S.)")
    return value


Word = Annotated[str, AfterValidator(_plain)]
Text = Annotated[str, AfterValidator(_not_blank)]
Count = Annotated[int, Field(ge=1)]


class Instruction(BaseModel):
    """One verifiable instruction as stored in ``Prompt.meta["instructions"]``: JSON-serialisable. ``id`` and
    ``kwargs`` are IFEval's (for the 25 IFEval types); ``text`` is the wording the prompt was given."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    text: str = ""


class InstructionArgs(BaseModel):
    """Base of every type's arguments: strict types (``5``, not ``"5"``), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _NoArgs(InstructionArgs):
    pass


class _Keywords(InstructionArgs):
    keywords: list[Word] = Field(min_length=1)


class _Frequency(InstructionArgs):
    keyword: Word
    frequency: Count
    relation: Relation


class _Forbidden(InstructionArgs):
    forbidden_words: list[Word] = Field(min_length=1)


class _Letter(InstructionArgs):
    letter: Annotated[str, Field(pattern=r"^[a-z]$")]
    let_frequency: Count
    let_relation: Relation


class _Language(InstructionArgs):
    language: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]{2})?$")]


class _Sentences(InstructionArgs):
    num_sentences: Count
    relation: Relation


class _Paragraphs(InstructionArgs):
    num_paragraphs: Count


class _Words(InstructionArgs):
    num_words: Count
    relation: Relation


class _NthParagraph(InstructionArgs):
    num_paragraphs: Count
    nth_paragraph: Count
    first_word: Word

    @model_validator(mode="after")
    def _nth_within(self) -> _NthParagraph:
        if self.nth_paragraph > self.num_paragraphs:
            raise ValueError(f"nth_paragraph {self.nth_paragraph} is past num_paragraphs {self.num_paragraphs}")
        return self


class _Placeholders(InstructionArgs):
    num_placeholders: Count


class _Postscript(InstructionArgs):
    postscript_marker: Annotated[str, AfterValidator(_marker)]


class _Bullets(InstructionArgs):
    num_bullets: Count


class _Highlights(InstructionArgs):
    num_highlights: Count


class _Sections(InstructionArgs):
    section_spliter: Annotated[str, Field(pattern=r"^[A-Za-z]+$")]
    num_sections: Count


class _Repeat(InstructionArgs):
    prompt_to_repeat: Text


class _End(InstructionArgs):
    end_phrase: Text


class _Start(InstructionArgs):
    start_phrase: Text


class _CapitalFrequency(InstructionArgs):
    capital_frequency: Count
    capital_relation: Relation


def _field_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------------------------------------------------
# Drawing arguments and rendering wordings
# ---------------------------------------------------------------------------------------------------------


def _upto(rng: random.Random, lo: int, hi: int, budget: int, words_each: int) -> int:
    """A count in lo..hi, with hi lowered so that ``count * words_each`` fits the budget (never below lo)."""
    return rng.randint(lo, max(lo, min(hi, budget // words_each)))


def _relation(rng: random.Random, at_least_share: float = 0.6) -> str:
    return "at least" if rng.random() < at_least_share else "less than"


def _number(rng: random.Random, n: int) -> str:
    """``n`` in digits, or (small numbers, 40 % of the time) in words."""
    return words.NUMBER_WORDS[n] if n < len(words.NUMBER_WORDS) and rng.random() < 0.4 else str(n)


def _quote_list(items: list[str], joiner: str) -> str:
    quoted = [f'"{w}"' for w in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" {joiner} " + quoted[-1]


def _fields(kind: InstructionType, kwargs: Mapping[str, Any], rng: random.Random) -> dict[str, str]:
    """The template fields of ``kwargs`` (see the module docstring of instruction_wordings)."""
    yes, no, maybe = checks.CONSTRAINED_OPTIONS
    out = {"yes": yes, "no": no, "maybe": maybe}
    if kind.count_key:
        n = kwargs[kind.count_key]
        out.update(n=_number(rng, n), n1=_number(rng, n - 1), s="s" * (n != 1), s1="s" * (n - 1 != 1))
    for key, name in (("keyword", "keyword"), ("letter", "letter"), ("section_spliter", "splitter")):
        if key in kwargs:
            out[name] = kwargs[key]
    if "keywords" in kwargs:
        out.update(keywords=_quote_list(kwargs["keywords"], "and"), s="s" * (len(kwargs["keywords"]) > 1))
    if "forbidden_words" in kwargs:
        ws = kwargs["forbidden_words"]
        out.update(words=_quote_list(ws, "or"), s="s" * (len(ws) > 1))
    if "language" in kwargs:
        out["language"] = words.LANGUAGES.get(kwargs["language"], kwargs["language"])
    if "first_word" in kwargs:
        word, nth = kwargs["first_word"], kwargs["nth_paragraph"]
        out.update(word=word.capitalize() if rng.random() < 0.5 else word, k=str(nth),
                   nth=words.ORDINALS[nth] if nth < len(words.ORDINALS) else f"number {nth}")
    if "postscript_marker" in kwargs:
        marker = kwargs["postscript_marker"]
        out["marker"] = "P.P.S." if marker == "P.P.S" else marker
    for key in ("end_phrase", "start_phrase"):
        if key in kwargs:
            out["phrase"] = kwargs[key]
    return out


@dataclass(frozen=True)
class InstructionType:
    """One kind of verifiable instruction.

    ``check_fn(text, **kwargs)`` is the check of one text; ``draw(rng, budget, request)`` draws kwargs for an
    answer of at most ``budget`` words to a request ``request``; ``min_words`` is the least an answer
    following the cheapest instance needs; ``count_key``/``relation_key`` name the kwargs the wordings use;
    ``applies(request)`` says whether the type can be asked of this request at all."""

    id: str
    summary: str
    args_model: type[InstructionArgs]
    check_fn: Callable[..., bool]
    draw: Callable[[random.Random, int, str], dict[str, Any]]
    min_words: int
    count_key: str | None = None
    relation_key: str | None = None
    ifeval: bool = True
    applies: Callable[[str], bool] = lambda request: True

    @property
    def wordings(self) -> tuple[str, ...]:
        """Every template of this type (all relations)."""
        found = words.WORDINGS[self.id]
        return found if isinstance(found, tuple) else tuple(t for group in found.values() for t in group)

    def render(self, kwargs: Mapping[str, Any], rng: random.Random) -> str:
        """A wording of these arguments, picked and filled by ``rng``."""
        templates = words.WORDINGS[self.id]
        if isinstance(templates, dict):
            templates = templates[kwargs[self.relation_key]]
        return rng.choice(templates).format(**_fields(self, kwargs, rng))

    def build(self, rng: random.Random, budget: int = UNLIMITED, request: str = "") -> Instruction:
        """A seeded random instance: arguments drawn from ``rng`` and one of the type's wordings."""
        kwargs = self.draw(rng, budget, request)
        self.parse_args(kwargs)
        return Instruction(id=self.id, kwargs=kwargs, text=self.render(kwargs, rng))

    def parse_args(self, kwargs: Any, *, field: str = "kwargs") -> InstructionArgs:
        """Validated arguments; a malformed value raises DataError naming this id and the field."""
        if isinstance(kwargs, self.args_model):
            return kwargs
        if not isinstance(kwargs, Mapping):
            raise DataError(f"instruction '{self.id}' has malformed arguments", field=field,
                            expected="a JSON object of arguments", found=type(kwargs).__name__)
        try:
            return self.args_model.model_validate(dict(kwargs))
        except ValidationError as exc:
            err = exc.errors()[0]
            name = _field_path(err["loc"])
            where = f"{field}.{name}" if name else field
            known = ", ".join(self.args_model.model_fields) or "none"
            if err["type"] == "missing":
                raise DataError(f"instruction '{self.id}' is missing its argument '{name}'", field=where,
                                expected=f"the arguments: {known}") from None
            if err["type"] == "extra_forbidden":
                raise DataError(f"instruction '{self.id}' got an unknown argument '{name}'", field=where,
                                expected=f"only the arguments: {known}") from None
            msg = err["msg"].removeprefix("Value error, ")
            raise DataError(f"instruction '{self.id}' has an invalid argument '{name}': {msg}", field=where,
                            found=repr(err.get("input"))) from None

    def follows(self, text: str, args: InstructionArgs) -> bool:
        """Whether one text follows the instruction (no loose variants; see verifiable.check)."""
        return self.check_fn(text, **args.model_dump())


# ---------------------------------------------------------------------------------------------------------
# The types
# ---------------------------------------------------------------------------------------------------------


def _draw_frequency(rng, budget, request):
    relation = _relation(rng)
    n = _upto(rng, 2, 4, budget, 12) if relation == "at least" else rng.randint(2, 4)
    return {"keyword": rng.choice(words.KEYWORDS), "frequency": n, "relation": relation}


def _draw_letter(rng, budget, request):
    if rng.random() < 0.6:
        return {"letter": rng.choice("etaoinshr"), "let_frequency": _upto(rng, 3, 12, budget, 4),
                "let_relation": "at least"}
    return {"letter": rng.choice(words.RATIONED_LETTERS), "let_frequency": rng.randint(2, 5),
            "let_relation": "less than"}


def _draw_sentences(rng, budget, request):
    relation = _relation(rng)
    n = _upto(rng, 2, 10, budget, 12) if relation == "at least" else rng.randint(2, 8)
    return {"num_sentences": n, "relation": relation}


def _draw_words(rng, budget, request):
    hi = min(300, budget * 8 // 100 * 10)  # at most 80 % of the budget, in tens
    if hi >= 30 and rng.random() < 0.5:
        return {"num_words": rng.randrange(30, hi + 1, 10), "relation": "at least"}
    return {"num_words": rng.randrange(20, 301, 10), "relation": "less than"}


def _draw_nth(rng, budget, request):
    n = _upto(rng, 2, 5, budget, 20)
    return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": rng.choice(words.FIRST_WORDS)}


def _draw_capital(rng, budget, request):
    relation = _relation(rng)
    n = _upto(rng, 2, 10, budget, 5) if relation == "at least" else rng.randint(3, 10)
    return {"capital_frequency": n, "capital_relation": relation}


def _none(rng, budget, request):
    return {}


REPEATABLE_REQUEST_WORDS = 40
"""``combination:repeat_prompt`` is only asked of requests of at most this many words."""


def _repeatable(request: str) -> bool:
    return bool(request.strip()) and checks.count_words(request) <= REPEATABLE_REQUEST_WORDS


_TYPES = (
    InstructionType(
        "keywords:existence", "every keyword appears (case-insensitive, also inside longer words)",
        _Keywords, checks.keywords_existence, lambda rng, b, r: {"keywords": rng.sample(words.KEYWORDS, rng.randint(1, 3))},
        min_words=10),
    InstructionType(
        "keywords:frequency", "a keyword appears at least / less than n times (as in existence)",
        _Frequency, checks.keyword_frequency, _draw_frequency, min_words=10, count_key="frequency",
        relation_key="relation"),
    InstructionType(
        "keywords:forbidden_words", "none of the words appears as a whole word (any case)",
        _Forbidden, checks.forbidden_words,
        lambda rng, b, r: {"forbidden_words": rng.sample(words.FORBIDDEN_WORDS, rng.randint(1, 3))}, min_words=1),
    InstructionType(
        "keywords:letter_frequency", "a letter (any case) appears at least / less than n times",
        _Letter, checks.letter_frequency, _draw_letter, min_words=5, count_key="let_frequency",
        relation_key="let_relation"),
    InstructionType(
        "language:response_language", "langdetect names the language (undetectable text passes)",
        _Language, checks.response_language, lambda rng, b, r: {"language": rng.choice(list(words.LANGUAGES))},
        min_words=10),
    InstructionType(
        "length_constraints:number_sentences", "at least / less than n sentences (Punkt)",
        _Sentences, checks.number_sentences, _draw_sentences, min_words=5, count_key="num_sentences",
        relation_key="relation"),
    InstructionType(
        "length_constraints:number_paragraphs", "exactly n paragraphs separated by *** dividers",
        _Paragraphs, checks.number_paragraphs, lambda rng, b, r: {"num_paragraphs": _upto(rng, 2, 5, b, 20)},
        min_words=40, count_key="num_paragraphs"),
    InstructionType(
        "length_constraints:number_words", "at least / less than n words (runs of \\w)",
        _Words, checks.number_words, _draw_words, min_words=5, count_key="num_words", relation_key="relation"),
    InstructionType(
        "length_constraints:nth_paragraph_first_word",
        "exactly n paragraphs separated by blank lines, the k-th starting with a word",
        _NthParagraph, checks.nth_paragraph_first_word, _draw_nth, min_words=40, count_key="num_paragraphs"),
    InstructionType(
        "detectable_content:number_placeholders", "at least n [placeholders] in square brackets",
        _Placeholders, checks.number_placeholders,
        lambda rng, b, r: {"num_placeholders": _upto(rng, 1, 4, b, 5)}, min_words=5, count_key="num_placeholders"),
    InstructionType(
        "detectable_content:postscript", "the marker (P.S. or P.P.S) appears anywhere, any case",
        _Postscript, checks.postscript,
        lambda rng, b, r: {"postscript_marker": rng.choice(words.POSTSCRIPT_MARKERS)}, min_words=10),
    InstructionType(
        "detectable_format:number_bullet_lists", "exactly n lines starting with * (not **) or -",
        _Bullets, checks.number_bullet_lists, lambda rng, b, r: {"num_bullets": _upto(rng, 2, 6, b, 6)},
        min_words=12, count_key="num_bullets"),
    InstructionType(
        "detectable_format:constrained_response", 'contains "My answer is yes.", "...no." or "...maybe."',
        _NoArgs, checks.constrained_response, _none, min_words=4),
    InstructionType(
        "detectable_format:number_highlighted_sections", "at least n *highlighted* or **bold** spans",
        _Highlights, checks.number_highlighted_sections,
        lambda rng, b, r: {"num_highlights": _upto(rng, 1, 4, b, 8)}, min_words=8, count_key="num_highlights"),
    InstructionType(
        "detectable_format:multiple_sections", "at least n headers '<splitter> <number>' (case-sensitive)",
        _Sections, checks.multiple_sections,
        lambda rng, b, r: {"section_spliter": rng.choice(words.SECTION_SPLITTERS),
                           "num_sections": _upto(rng, 2, 5, b, 20)}, min_words=40, count_key="num_sections"),
    InstructionType(
        "detectable_format:json_format", "the whole text (``` fences allowed) parses as JSON",
        _NoArgs, checks.json_format, _none, min_words=5),
    InstructionType(
        "detectable_format:title", "a non-blank title in <<double angle brackets>>",
        _NoArgs, checks.title, _none, min_words=3),
    InstructionType(
        "combination:two_responses", "two different answers separated by ******",
        _NoArgs, checks.two_responses, _none, min_words=40),
    InstructionType(
        "combination:repeat_prompt", "starts with the request, repeated (any case)",
        _Repeat, checks.repeat_prompt, lambda rng, b, r: {"prompt_to_repeat": r.strip()}, min_words=60,
        applies=_repeatable),
    InstructionType(
        "startend:end_checker", "ends with the phrase (any case; a closing \" ignored)",
        _End, checks.end_checker, lambda rng, b, r: {"end_phrase": rng.choice(words.END_PHRASES)}, min_words=3),
    InstructionType(
        "change_case:capital_word_frequency", "at least / less than n ALL-CAPS word tokens",
        _CapitalFrequency, checks.capital_word_frequency, _draw_capital, min_words=5,
        count_key="capital_frequency", relation_key="capital_relation"),
    InstructionType(
        "change_case:english_capital", "no lowercase letter and langdetect says English",
        _NoArgs, checks.english_capital, _none, min_words=10),
    InstructionType(
        "change_case:english_lowercase", "no capital letter and langdetect says English",
        _NoArgs, checks.english_lowercase, _none, min_words=10),
    InstructionType(
        "punctuation:no_comma", "no ',' anywhere",
        _NoArgs, checks.no_comma, _none, min_words=1),
    InstructionType(
        "startend:quotation", 'the stripped text starts and ends with "',
        _NoArgs, checks.quotation, _none, min_words=2),
    InstructionType(
        "startend:start_checker", "starts with the phrase (any case; an opening \" ignored); not in IFEval",
        _Start, checks.start_checker, lambda rng, b, r: {"start_phrase": rng.choice(words.START_PHRASES)},
        min_words=3, ifeval=False),
)

REGISTRY: dict[str, InstructionType] = {t.id: t for t in _TYPES}
"""Every instruction type by id (ids are stable: they are stored in prompt files)."""
