"""Verifiable instructions: the ``verifier`` judge (design section 5), deterministic and model-free.

A *verifiable instruction* is a constraint on the form of a response that a few lines of Python can check
("answer in at most 80 words", "do not use commas", "wrap the answer in double quotes"), in the spirit of
IFEval (Zhou et al., 2023). The wording, word lists and checkers here are this project's own.

How the pieces fit:

* Every instruction type is an :class:`InstructionType` in :data:`REGISTRY`, keyed by a stable snake_case
  id. A type has a pydantic model of its arguments (``args_model``), a builder ``build(rng)`` that draws
  arguments from a seeded :class:`random.Random` and writes the instruction in plain English, and a checker
  ``check(response, args, mode)``.
* :func:`attach_instructions` picks 1-3 mutually compatible types for a prompt (seeded by a base seed and
  the prompt id, so the choice does not depend on processing order or sharding), appends their texts to
  the last user turn and stores them in ``prompt.meta["instructions"]`` as ``[{"id", "kwargs", "text"}]``.
  Pairs that cannot (or should not) be asked together are listed in :data:`CONFLICTS`.
* :func:`verify` checks a response against such a list and returns a :class:`VerifyResult` (one boolean
  per instruction and the fraction followed); :class:`VerifierJudge` does the same for a Prompt record;
  :func:`aggregate` computes IFEval-style prompt-level and instruction-level accuracies.

Strict and loose mode. In ``strict`` mode the response is checked as it is. ``loose`` mode forgives the
usual wrapping of an otherwise compliant answer: the response counts as following an instruction if any
of these variants does: the response itself, without its first line, without its last line, without both,
and each of those four with every markdown emphasis character ``*`` removed. Loose is therefore never
stricter than strict. A blank response, or a blank variant, never follows any instruction (an empty
answer trivially "uses no commas" but follows nothing).

Text conventions shared by the checkers: a *word* is a run of letters/digits (with inner ``'`` or ``-``),
so markdown symbols are not words; keyword matches are case-insensitive and whole-word; a *sentence*
ends at ``.``, ``!`` or ``?`` followed by whitespace or the end of the line, or at a line break; a
*paragraph* is a non-blank block between blank lines or lines made of ``***``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alignline.data.records import Prompt
from alignline.errors import ConfigError, DataError

__all__ = [
    "CONFLICTS",
    "END_PHRASES",
    "FILLER_WORDS",
    "KEYWORDS",
    "MODES",
    "POSTSCRIPT_MARKERS",
    "REGISTRY",
    "START_PHRASES",
    "Instruction",
    "InstructionArgs",
    "InstructionType",
    "VerifierJudge",
    "VerifyResult",
    "aggregate",
    "attach_instructions",
    "compatible",
    "count_words",
    "instruction_seed",
    "loose_variants",
    "split_paragraphs",
    "split_sentences",
    "verify",
]

Mode = Literal["strict", "loose"]
MODES: tuple[str, ...] = ("strict", "loose")

# ---------------------------------------------------------------------------------------------------------
# Word lists for the builders. Keywords and filler words are disjoint, and no phrase below contains a comma
# or a filler word, so no two instructions drawn from them can contradict each other.
# ---------------------------------------------------------------------------------------------------------

KEYWORDS: tuple[str, ...] = (
    "balance", "garden", "morning", "journey", "patience", "window", "river", "habit", "coffee", "music",
    "puzzle", "lesson", "community", "energy", "history", "future", "curious", "practical", "simple",
    "friendly", "bridge", "season", "kitchen", "library",
)
"""Words that fit most chat topics; used by ``include_keywords`` and ``keyword_frequency``."""

FILLER_WORDS: tuple[str, ...] = (
    "very", "really", "basically", "actually", "just", "literally", "obviously", "definitely", "honestly",
    "stuff", "thing", "quite",
)
"""Filler words a good answer can always avoid; used by ``exclude_words``."""

START_PHRASES: tuple[str, ...] = (
    "Great question", "In short", "Here is my answer", "To start with", "Let me explain", "Good news",
)
END_PHRASES: tuple[str, ...] = (
    "Is there anything else I can help with?", "Let me know if you have more questions.", "Hope this helps!",
    "That is all for now.", "Thanks for reading.",
)
POSTSCRIPT_MARKERS: tuple[str, ...] = ("P.S.", "P.P.S.")

# ---------------------------------------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e", "cf", "fig"})
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n|^[ \t]*\*{3,}[ \t]*$", re.M)
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.M)
_HIGHLIGHT = re.compile(r"\*(?=[^\s*])[^\n*]*?[^\s*]\*|\*[^\s*]\*")
_TITLE = re.compile(r"<<([^\n<>]+)>>")
_FENCE = re.compile(r"\A```[ \t]*(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\Z", re.S | re.I)
_QUOTE_PAIRS = (('"', '"'), ("“", "”"))


def count_words(text: str) -> int:
    """Number of words: runs of letters/digits, with inner apostrophes or hyphens (``don't``, ``well-known``)."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ``.``/``!``/``?`` (plus closing quotes or brackets) that is followed
    by whitespace or the end of the line, and at every line break. Fragments without a word character are
    dropped; decimals (``3.5``) and a few abbreviations (``e.g.``, ``Dr.``) do not end a sentence."""
    out: list[str] = []
    for line in text.split("\n"):
        start = 0
        for m in _SENTENCE_END.finditer(line):
            before = line[start: m.start()].split()
            last = before[-1].lower() if before else ""
            if m.group().startswith(".") and m.group().rstrip("\"'”’)]") == "." and last in _ABBREVIATIONS:
                continue
            chunk = line[start: m.end()]
            if re.search(r"\w", chunk):
                out.append(chunk.strip())
            start = m.end()
        rest = line[start:]
        if re.search(r"\w", rest):
            out.append(rest.strip())
    return out


def split_paragraphs(text: str) -> list[str]:
    """Non-blank blocks of ``text`` between blank lines or divider lines made of three or more ``*``."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern for a word or phrase (any whitespace between its words)."""
    body = r"\s+".join(re.escape(part) for part in phrase.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.I)


def _count_phrase(text: str, phrase: str) -> int:
    return len(_phrase_pattern(phrase).findall(text))


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _has_cased_letter(text: str) -> bool:
    return any(c.lower() != c.upper() for c in text)


def loose_variants(response: str) -> list[str]:
    """The texts loose mode tries, strict text first: the response, without its first line, without its last
    line, without both, each also with every ``*`` removed (duplicates and blank variants dropped)."""
    lines = response.split("\n")
    bases = [response, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    out: list[str] = []
    for base in bases:
        for variant in (base, base.replace("*", "")):
            if variant.strip() and variant not in out:
                out.append(variant)
    return out


def _quote_list(words: Sequence[str], joiner: str) -> str:
    quoted = [f'"{w}"' for w in words]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + f" {joiner} " + quoted[-1]


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


class Instruction(BaseModel):
    """One verifiable instruction as stored in ``Prompt.meta["instructions"]``: JSON-serialisable."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    text: str = ""


class VerifyResult(BaseModel):
    """Per-instruction outcome of :func:`verify`; ``score`` is the fraction of instructions followed."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode
    ids: list[str]
    followed: list[bool]
    score: float

    @property
    def all_followed(self) -> bool:
        return all(self.followed)


class InstructionArgs(BaseModel):
    """Base of every type's argument model: strict types (``5``, not ``"5"``), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _NoArgs(InstructionArgs):
    pass


class _RelationArgs(InstructionArgs):
    relation: Literal["at_least", "at_most"]
    n: int = Field(ge=1)


class _CountArgs(InstructionArgs):
    n: int = Field(ge=1)


def _clean_words(v: list[str]) -> list[str]:
    cleaned = [w.strip() for w in v]
    for i, w in enumerate(cleaned):
        if not re.search(r"\w", w):
            raise ValueError(f"entry {i} ({w!r}) has no letter or digit")
    return cleaned


class _KeywordsArgs(InstructionArgs):
    keywords: list[str] = Field(min_length=1)

    @field_validator("keywords")
    @classmethod
    def _clean(cls, v: list[str]) -> list[str]:
        return _clean_words(v)


class _WordsArgs(InstructionArgs):
    words: list[str] = Field(min_length=1)

    @field_validator("words")
    @classmethod
    def _clean(cls, v: list[str]) -> list[str]:
        return _clean_words(v)


class _FrequencyArgs(InstructionArgs):
    keyword: str
    n: int = Field(ge=1)

    @field_validator("keyword")
    @classmethod
    def _clean(cls, v: str) -> str:
        return _clean_words([v])[0]


class _PhraseArgs(InstructionArgs):
    phrase: str

    @field_validator("phrase")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the phrase is blank")
        return v.strip()


class _MarkerArgs(InstructionArgs):
    marker: str = "P.S."

    @field_validator("marker")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the marker is blank")
        return v.strip()


# ---------------------------------------------------------------------------------------------------------
# Instruction types
# ---------------------------------------------------------------------------------------------------------


def _field_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class InstructionType:
    """One kind of verifiable instruction. Subclasses set ``id`` and ``args_model`` and implement
    ``_make(rng) -> (kwargs, text)`` and ``follows(text, args) -> bool`` (the check of one text)."""

    id: ClassVar[str]
    args_model: ClassVar[type[InstructionArgs]] = _NoArgs

    def build(self, rng: random.Random) -> Instruction:
        """A seeded random instance: arguments drawn from ``rng`` and the instruction's English text."""
        kwargs, text = self._make(rng)
        self.parse_args(kwargs)
        return Instruction(id=self.id, kwargs=kwargs, text=text)

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

    def check(self, response: str, args: InstructionArgs | Mapping[str, Any], mode: Mode = "strict") -> bool:
        """Whether ``response`` follows the instruction; ``loose`` also tries :func:`loose_variants`."""
        parsed = self.parse_args(args)
        if mode == "strict":
            return bool(response.strip()) and self.follows(response, parsed)
        if mode == "loose":
            return any(self.follows(v, parsed) for v in loose_variants(response))
        raise ConfigError(f"verifier mode must be one of {', '.join(MODES)}, got {mode!r}")

    def _make(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        raise NotImplementedError

    def follows(self, text: str, args: Any) -> bool:
        raise NotImplementedError


class WordCount(InstructionType):
    """``word_count``: at least / at most ``n`` words (:func:`count_words`). Builder: ``at_least`` 30-200,
    ``at_most`` 50-300, both in steps of 10."""

    id = "word_count"
    args_model = _RelationArgs

    def _make(self, rng):
        relation = rng.choice(("at_least", "at_most"))
        if relation == "at_least":
            n = rng.randrange(30, 201, 10)
            text = rng.choice(("Answer in at least {n} words.", "Write no fewer than {n} words.",
                               "Make your response at least {n} words long."))
        else:
            n = rng.randrange(50, 301, 10)
            text = rng.choice(("Answer in at most {n} words.", "Keep your response to {n} words or fewer.",
                               "Use no more than {n} words."))
        return {"relation": relation, "n": n}, text.format(n=n)

    def follows(self, text, args):
        count = count_words(text)
        return count >= args.n if args.relation == "at_least" else count <= args.n


class SentenceCount(InstructionType):
    """``sentence_count``: at least / at most ``n`` sentences (:func:`split_sentences`). Builder:
    ``at_least`` 3-8, ``at_most`` 2-6."""

    id = "sentence_count"
    args_model = _RelationArgs

    def _make(self, rng):
        relation = rng.choice(("at_least", "at_most"))
        if relation == "at_least":
            n = rng.randint(3, 8)
            text = rng.choice(("Write at least {n} sentences.", "Your answer should have {n} or more sentences."))
        else:
            n = rng.randint(2, 6)
            text = rng.choice(("Answer in at most {n} sentences.", "Use no more than {n} sentences."))
        return {"relation": relation, "n": n}, text.format(n=n)

    def follows(self, text, args):
        count = len(split_sentences(text))
        return count >= args.n if args.relation == "at_least" else count <= args.n


class ParagraphCount(InstructionType):
    """``paragraph_count``: exactly ``n`` paragraphs, separated by blank lines or ``***`` divider lines
    (:func:`split_paragraphs`). Builder: 2-5."""

    id = "paragraph_count"
    args_model = _CountArgs

    def _make(self, rng):
        n = rng.randint(2, 5)
        text = rng.choice((
            "Write exactly {n} paragraphs, separated from each other by a blank line.",
            "Structure your answer as exactly {n} paragraphs, separated by blank lines or by a line "
            "containing only ***.",
            "Your response must consist of exactly {n} paragraphs; separate them with the markdown divider ***.",
        ))
        return {"n": n}, text.format(n=n)

    def follows(self, text, args):
        return len(split_paragraphs(text)) == args.n


class IncludeKeywords(InstructionType):
    """``include_keywords``: every keyword appears (whole word, any case). Builder: 1-3 of :data:`KEYWORDS`."""

    id = "include_keywords"
    args_model = _KeywordsArgs

    def _make(self, rng):
        words = rng.sample(KEYWORDS, rng.randint(1, 3))
        if len(words) == 1:
            text = rng.choice(('Use the word "{w}" somewhere in your answer.',
                               'Make sure your response contains the word "{w}".')).format(w=words[0])
        else:
            text = rng.choice(("Include the keywords {ws} in your response.",
                               "Make sure to use the words {ws} somewhere in your answer.")).format(
                ws=_quote_list(words, "and"))
        return {"keywords": words}, text

    def follows(self, text, args):
        return all(_count_phrase(text, kw) > 0 for kw in args.keywords)


class ExcludeWords(InstructionType):
    """``exclude_words``: none of the words appears (whole word, any case). Builder: 1-3 of
    :data:`FILLER_WORDS`."""

    id = "exclude_words"
    args_model = _WordsArgs

    def _make(self, rng):
        words = rng.sample(FILLER_WORDS, rng.randint(1, 3))
        listed = _quote_list(words, "or")
        text = rng.choice(("Do not use the word{s} {ws} anywhere in your response.",
                           "Avoid the word{s} {ws} entirely.")).format(s="s" if len(words) > 1 else "", ws=listed)
        return {"words": words}, text

    def follows(self, text, args):
        return not any(_count_phrase(text, w) for w in args.words)


class KeywordFrequency(InstructionType):
    """``keyword_frequency``: ``keyword`` appears at least ``n`` times (whole word, any case). Builder: a word
    of :data:`KEYWORDS`, ``n`` 2-4."""

    id = "keyword_frequency"
    args_model = _FrequencyArgs

    def _make(self, rng):
        keyword = rng.choice(KEYWORDS)
        n = rng.randint(2, 4)
        text = rng.choice(('Use the word "{k}" at least {n} times.',
                           'The word "{k}" should appear at least {n} times in your response.'))
        return {"keyword": keyword, "n": n}, text.format(k=keyword, n=n)

    def follows(self, text, args):
        return _count_phrase(text, args.keyword) >= args.n


class StartWith(InstructionType):
    """``start_with``: the response (leading whitespace ignored) begins with ``phrase``, any case, and the
    phrase is not the start of a longer word. Builder: one of :data:`START_PHRASES`."""

    id = "start_with"
    args_model = _PhraseArgs

    def _make(self, rng):
        phrase = rng.choice(START_PHRASES)
        text = rng.choice(('Begin your response with the exact phrase "{p}".',
                           'Start your answer with the words "{p}".'))
        return {"phrase": phrase}, text.format(p=phrase)

    def follows(self, text, args):
        body, phrase = text.lstrip(), args.phrase
        if body[: len(phrase)].lower() != phrase.lower():
            return False
        return len(body) == len(phrase) or not (_is_word_char(phrase[-1]) and _is_word_char(body[len(phrase)]))


class EndWith(InstructionType):
    """``end_with``: the response (trailing whitespace ignored) ends with ``phrase``, any case, with nothing
    after it. Builder: one of :data:`END_PHRASES`."""

    id = "end_with"
    args_model = _PhraseArgs

    def _make(self, rng):
        phrase = rng.choice(END_PHRASES)
        text = rng.choice(('Finish your response with the exact phrase "{p}" and write nothing after it.',
                           'End your answer with the words "{p}"; nothing else may follow.'))
        return {"phrase": phrase}, text.format(p=phrase)

    def follows(self, text, args):
        body, phrase = text.rstrip(), args.phrase
        cut = len(body) - len(phrase)
        if cut < 0 or body[cut:].lower() != phrase.lower():
            return False
        return cut == 0 or not (_is_word_char(phrase[0]) and _is_word_char(body[cut - 1]))


class AllLowercase(InstructionType):
    """``all_lowercase``: no capital letters, and at least one lowercase letter."""

    id = "all_lowercase"

    def _make(self, rng):
        return {}, rng.choice(("Write your entire response in lowercase letters; do not use any capitals.",
                               "Use only lowercase letters in your answer, with no capital letters at all."))

    def follows(self, text, args):
        return text == text.lower() and _has_cased_letter(text)


class AllUppercase(InstructionType):
    """``all_uppercase``: no lowercase letters, and at least one capital letter."""

    id = "all_uppercase"

    def _make(self, rng):
        return {}, rng.choice(("Write your entire response in capital letters.",
                               "Your whole answer must be in uppercase letters only."))

    def follows(self, text, args):
        return text == text.upper() and _has_cased_letter(text)


class NoCommas(InstructionType):
    """``no_commas``: no comma (``,`` or the full-width ``，``) anywhere."""

    id = "no_commas"

    def _make(self, rng):
        return {}, rng.choice(("Do not use any commas in your response.",
                               "Write your answer without a single comma."))

    def follows(self, text, args):
        return "," not in text and "，" not in text


class JsonFormat(InstructionType):
    """``json_format``: the whole response is one JSON object or array, optionally inside a markdown code
    fence (```` ```json ... ``` ````); no other text."""

    id = "json_format"

    def _make(self, rng):
        return {}, rng.choice((
            "Format your entire output as JSON; you may wrap it in a ```json code block, but add no other text.",
            "Reply with valid JSON only (an object or an array) and nothing outside it.",
        ))

    def follows(self, text, args):
        body = text.strip()
        fenced = _FENCE.match(body)
        if fenced:
            body = fenced.group(1).strip()
        try:
            value = json.loads(body)
        except ValueError:
            return False
        return isinstance(value, dict | list)


class BulletCount(InstructionType):
    """``bullet_count``: exactly ``n`` markdown bullet lines (starting with ``* `` or ``- ``, any indent).
    Builder: 2-6."""

    id = "bullet_count"
    args_model = _CountArgs

    def _make(self, rng):
        n = rng.randint(2, 6)
        text = rng.choice(('Include exactly {n} bullet points, each on its own line starting with "* " or "- ".',
                           'Your answer must contain exactly {n} markdown bullet points (lines that start '
                           'with "* ").'))
        return {"n": n}, text.format(n=n)

    def follows(self, text, args):
        return len(_BULLET.findall(text)) == args.n


class HighlightedSections(InstructionType):
    """``highlighted_sections``: at least ``n`` markdown-highlighted spans ``*like this*`` (``**bold**``
    counts too); a span stays on one line and does not start or end with a space. Builder: 1-4."""

    id = "highlighted_sections"
    args_model = _CountArgs

    def _make(self, rng):
        n = rng.randint(1, 4)
        text = rng.choice(("Highlight at least {n} section{s} of your answer with markdown, for example "
                           "*an important part*.",
                           "Mark at least {n} key part{s} of your response in italics using asterisks, "
                           "like *this*."))
        return {"n": n}, text.format(n=n, s="s" if n > 1 else "")

    def follows(self, text, args):
        return len(_HIGHLIGHT.findall(text)) >= args.n


class Title(InstructionType):
    """``title``: a non-blank title wrapped in double angle brackets, ``<<like this>>``, anywhere."""

    id = "title"

    def _make(self, rng):
        return {}, rng.choice(("Give your answer a title wrapped in double angle brackets, such as "
                               "<<a short title>>.",
                               "Put a title at the top of your response inside double angle brackets, "
                               "like <<my title>>."))

    def follows(self, text, args):
        return any(m.group(1).strip() for m in _TITLE.finditer(text))


class Postscript(InstructionType):
    """``postscript``: a line that starts with ``marker`` (default ``P.S.``, any case) followed by some text.
    Builder: one of :data:`POSTSCRIPT_MARKERS`."""

    id = "postscript"
    args_model = _MarkerArgs

    def _make(self, rng):
        marker = rng.choice(POSTSCRIPT_MARKERS)
        text = rng.choice(('At the end of your response, add a postscript that starts with "{m}".',
                           'Close with a postscript beginning with "{m}".'))
        return {"marker": marker}, text.format(m=marker)

    def follows(self, text, args):
        return re.search(rf"^[ \t]*{re.escape(args.marker)}[ \t]*\S", text, re.M | re.I) is not None


class Quoted(InstructionType):
    """``quoted``: the whole response (surrounding whitespace ignored) is wrapped in double quotation marks,
    straight (``"..."``) or curly (``“...”``), with something inside."""

    id = "quoted"

    def _make(self, rng):
        return {}, rng.choice(("Wrap your entire response in double quotation marks.",
                               "Put your whole answer inside double quotes."))

    def follows(self, text, args):
        body = text.strip()
        return len(body) > 2 and any(body[0] == a and body[-1] == b for a, b in _QUOTE_PAIRS) \
            and bool(body[1:-1].strip())


REGISTRY: dict[str, InstructionType] = {
    t.id: t
    for t in (
        WordCount(), SentenceCount(), ParagraphCount(), IncludeKeywords(), ExcludeWords(), KeywordFrequency(),
        StartWith(), EndWith(), AllLowercase(), AllUppercase(), NoCommas(), JsonFormat(), BulletCount(),
        HighlightedSections(), Title(), Postscript(), Quoted(),
    )
}
"""Every instruction type by id (ids are stable: they are stored in prompt files)."""

_JSON_REASON = "a JSON-only response has no room for this"
CONFLICTS: dict[frozenset[str], str] = {
    frozenset(pair): reason
    for pair, reason in (
        (("all_lowercase", "all_uppercase"), "a response cannot be all lowercase and all uppercase"),
        *((("json_format", other), _JSON_REASON) for other in (
            "bullet_count", "title", "postscript", "quoted", "paragraph_count", "highlighted_sections",
            "start_with", "end_with", "sentence_count")),
        (("json_format", "no_commas"), "JSON with more than one field needs commas"),
        (("start_with", "quoted"), "a quoted response starts with the quotation mark"),
        (("end_with", "quoted"), "a quoted response ends with the quotation mark"),
        (("bullet_count", "quoted"), "the opening quotation mark would spoil the first bullet"),
        (("start_with", "title"), "a title conventionally opens the response"),
        (("end_with", "postscript"), "a postscript conventionally closes the response"),
        (("sentence_count", "paragraph_count"), "a sentence limit fights a paragraph count"),
        (("sentence_count", "bullet_count"), "every bullet line counts as a sentence"),
    )
}
"""Pairs of types that :func:`attach_instructions` never combines, with the reason."""


def compatible(a: str, b: str) -> bool:
    """Whether two instruction types may be attached to the same prompt (distinct and not in CONFLICTS)."""
    return a != b and frozenset((a, b)) not in CONFLICTS


# ---------------------------------------------------------------------------------------------------------
# Attaching instructions to prompts
# ---------------------------------------------------------------------------------------------------------


def instruction_seed(rng_seed: str | int, prompt_id: str) -> int:
    """The per-prompt seed: sha256 of the base seed and the prompt id (independent of order and sharding).

    The base seed is used through ``str()``, so ``1234`` and ``"1234"`` give the same draw. (All seeded hashes:
    docs/architecture.md.)"""
    digest = hashlib.sha256(f"alignline.verifiable\x00{rng_seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _known_ids() -> str:
    return ", ".join(REGISTRY)


def _unknown_id_hint(name: Any) -> str:
    close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _choose_types(rng: random.Random, k: int, pool: Sequence[str]) -> list[str]:
    order = list(pool)
    rng.shuffle(order)
    chosen: list[str] = []
    for t in order:
        if len(chosen) == k:
            break
        if all(compatible(t, c) for c in chosen):
            chosen.append(t)
    return chosen


def attach_instructions(prompt: Prompt, rng_seed: str | int, k_min: int = 1, k_max: int = 3,
                        types: Sequence[str] | None = None) -> Prompt:
    """A copy of ``prompt`` with ``k_min..k_max`` compatible verifiable instructions attached.

    The random draw is seeded by :func:`instruction_seed` (``rng_seed`` and ``prompt.id``), so a prompt gets
    the same instructions whatever the order or sharding. Their texts are appended to the last user turn
    (``"\\n\\n" + " ".join(texts)``) and the instructions are stored in ``meta["instructions"]`` as
    ``[{"id", "kwargs", "text"}]``. ``types`` restricts the choice (default: every type in REGISTRY); when too
    few compatible types are left, fewer than ``k_min`` (at least one) are attached. A prompt that already
    has ``meta["instructions"]`` is returned unchanged (as a copy), so attaching twice is harmless.
    """
    if k_min < 1 or k_max < k_min:
        raise ConfigError(f"instructions need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if types is None:
        pool = list(REGISTRY)
    else:
        if not types:
            raise ConfigError(f"instruction types is empty; leave it unset or pick from: {_known_ids()}")
        unknown = [t for t in types if t not in REGISTRY]
        if unknown:
            raise ConfigError(f"unknown instruction type '{unknown[0]}'{_unknown_id_hint(unknown[0])}; "
                              f"known types: {_known_ids()}")
        pool = [t for t in REGISTRY if t in set(types)]
    if prompt.meta.get("instructions"):
        return prompt.model_copy(deep=True)
    rng = random.Random(instruction_seed(rng_seed, prompt.id))
    chosen = _choose_types(rng, rng.randint(k_min, k_max), pool)
    instructions = [REGISTRY[t].build(rng) for t in chosen]
    data = prompt.model_dump()
    last = data["messages"][-1]
    last["content"] = last["content"].rstrip() + "\n\n" + " ".join(i.text for i in instructions)
    data["meta"] = {**data["meta"], "instructions": [i.model_dump() for i in instructions]}
    return Prompt.model_validate(data)


# ---------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------


def _parse_instructions(instructions: Sequence[Mapping[str, Any] | Instruction],
                        ) -> list[tuple[InstructionType, InstructionArgs]]:
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
        if name not in REGISTRY:
            raise DataError(f"unknown instruction id '{name}'{_unknown_id_hint(name)}", field=f"{where}.id",
                            expected=f"one of {_known_ids()}")
        kind = REGISTRY[name]
        parsed.append((kind, kind.parse_args(item.get("kwargs", {}), field=f"{where}.kwargs")))
    return parsed


def verify(response: str, instructions: Sequence[Mapping[str, Any] | Instruction],
           mode: Mode = "strict") -> VerifyResult:
    """Check ``response`` against instructions (``[{"id", "kwargs", "text"}]``, as in ``meta["instructions"]``).

    Returns one boolean per instruction and ``score`` = the fraction followed. An unknown id or malformed
    arguments raise DataError naming the instruction's position, id and field.
    """
    if mode not in MODES:
        raise ConfigError(f"verifier mode must be one of {', '.join(MODES)}, got {mode!r}")
    parsed = _parse_instructions(instructions)
    followed = [kind.check(response, args, mode) for kind, args in parsed]
    return VerifyResult(mode=mode, ids=[kind.id for kind, _ in parsed], followed=followed,
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
