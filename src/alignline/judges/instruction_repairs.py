"""Verifier-guided repair: the smallest rewrite of a response that makes it follow its verifiable instructions.

A repair edits the form of an answer and keeps its content: it lower-cases, drops commas, wraps the text in
quotes or JSON, splits it into ``***`` paragraphs, bullets or numbered sections, adds a title, a
postscript, an opening or closing phrase, highlights, placeholders or missing keywords, and cuts whole
sentences to meet an upper limit on words or sentences. What needs new content (at least n words or
sentences, another language, a letter quota) is not invented: such an instruction is repaired only when
the response already follows it.

:func:`repair` applies one rewrite per instruction, in an order where a later rewrite cannot undo an
earlier one (content first, then layout, then the opening and closing, then case and punctuation, then
the wrappers), and then checks the result with the verifier in strict mode: a repair that does not follow
every instruction is dropped (``None``), never returned. A response that already follows everything is
returned unchanged.

The pair (repaired, original) differs only in what the instructions ask for, which is what a preference
pair for instruction following should teach (the minimal-edit refinement pairs of SPaR, Cheng et al. 2025,
made here by the verifier instead of a model). Every added phrase is this project's own wording.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from alignline.judges import instruction_checks as checks
from alignline.judges.verifiable import canonical_instructions, verify

__all__ = ["REPAIR_ORDER", "leading_sentences", "repair"]

_KEYWORD_SENTENCES = (
    "A word worth keeping in mind here is {kw}.",
    "It also helps to think about {kw}.",
    "This ties in with {kw} as well.",
    "Keep {kw} in mind too.",
)
_PLACEHOLDER_NAMES = ("name", "date", "address", "company", "email", "phone number", "city", "amount")
_POSTSCRIPTS = (
    "I can go into more detail on any part of this.",
    "Tell me if you would like a shorter version.",
    "Feel free to send follow-up questions.",
    "I hope the overview above is useful.",
)
_SPLIT_PARAGRAPHS = re.compile(r"\n\s*\n")
_WORD = re.compile(r"\w+")


def _sentences(text: str) -> list[str]:
    """The text's sentences (the verifier's own splitter), with line breaks inside each turned to spaces."""
    return [" ".join(s.split()) for s in checks.split_sentences(text) if s.strip()]


def _groups(items: Sequence[str], n: int) -> list[list[str]] | None:
    """``items`` cut into ``n`` consecutive non-empty groups of near-equal size, or None if too few."""
    if n < 1 or len(items) < n:
        return None
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(list(items[start:end]))
        start = end
    return out


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _cut_to(text: str, fits: Callable[[str], bool]) -> str | None:
    """The longest run of leading whole sentences that ``fits`` (None when not even the first does)."""
    sentences = _sentences(text)
    for end in range(len(sentences), 0, -1):
        candidate = " ".join(sentences[:end])
        if fits(candidate):
            return candidate
    return None


def leading_sentences(text: str, max_words: int) -> str:
    """The text's leading whole sentences that fit ``max_words`` (whitespace-separated words; the first sentence
    is kept whatever its length), line breaks inside a sentence kept as they are."""
    out = ""
    for sentence in checks.split_sentences(text):
        if not sentence.strip():
            continue
        longer = f"{out} {sentence.strip()}" if out else sentence.strip()
        if out and len(longer.split()) > max_words:
            break
        out = longer
    return out


def _only_if_followed(check: Callable[..., bool]) -> Callable[[str, Mapping[str, Any], random.Random, str], str | None]:
    return lambda text, kw, rng, request: text if check(text, **kw) else None


def _forbidden(text, kw, rng, request):
    for word in kw["forbidden_words"]:
        text = re.sub(rf"\s*\b{re.escape(word)}\b", "", text, flags=re.I)
    return text.strip()


def _existence(text, kw, rng, request):
    missing = [k for k in kw["keywords"] if not re.search(re.escape(k), text, re.I)]
    added = [rng.choice(_KEYWORD_SENTENCES).format(kw=k) for k in missing]
    return " ".join([text, *added]) if added else text


def _frequency(text, kw, rng, request):
    found = len(re.findall(re.escape(kw["keyword"]), text, re.I))
    if checks.compare(found, kw["relation"], kw["frequency"]):
        return text
    if kw["relation"] != "at least":
        return None
    added = [rng.choice(_KEYWORD_SENTENCES).format(kw=kw["keyword"]) for _ in range(kw["frequency"] - found)]
    return " ".join([text, *added])


def _length_limit(count: Callable[[str], int], key: str):
    def fix(text, kw, rng, request):
        if checks.compare(count(text), kw["relation"], kw[key]):
            return text
        if kw["relation"] != "less than":
            return None
        return _cut_to(text, lambda t: count(t) < kw[key])
    return fix


def _placeholders(text, kw, rng, request):
    n = kw["num_placeholders"] - len(re.findall(r"\[.*?\]", text))
    if n <= 0:
        return text
    names = rng.sample(_PLACEHOLDER_NAMES, min(n, len(_PLACEHOLDER_NAMES)))
    return text + "\n\nFill in: " + " ".join(f"[{name}]" for name in names)


def _highlights(text, kw, rng, request):
    """``*...*`` around the first words (up to four, on one line) of each of the first n sentences, in place."""
    plain = text.replace("*", "")
    out, pos, done = [], 0, 0
    for sentence in checks.split_sentences(plain):
        start = plain.find(sentence.strip(), pos)
        if start < 0 or done == kw["num_highlights"]:
            break
        words = list(re.finditer(r"\S+", plain[start:].split("\n", 1)[0]))[:4]
        if words:
            end = start + words[-1].end()
            out += [plain[pos:start], "*", plain[start:end], "*"]
            pos, done = end, done + 1
    return "".join([*out, plain[pos:]]) if done == kw["num_highlights"] else None


def _bullets(text, kw, rng, request):
    """The last n sentences as ``* `` bullets after the rest as an opening line (existing markers removed)."""
    plain = re.sub(r"^\s*(?:[*-]|\d+[.)])\s+", "", text.replace("**", ""), flags=re.M)
    sentences = _sentences(plain)
    if len(sentences) < kw["num_bullets"]:
        return None
    intro = sentences[: len(sentences) - kw["num_bullets"]] if len(sentences) > kw["num_bullets"] else []
    items = sentences[len(intro):]
    return "\n".join(([" ".join(intro), ""] if intro else []) + [f"* {s}" for s in items])


def _paragraphs(separator: str):
    def fix(text, kw, rng, request):
        groups = _groups(_sentences(text.replace("***", "")), kw["num_paragraphs"])
        if groups is None:
            return None
        blocks = [" ".join(g) for g in groups]
        if "first_word" in kw:
            k = kw["nth_paragraph"] - 1
            blocks[k] = kw["first_word"].capitalize() + ", " + _lower_first(blocks[k])
        return separator.join(blocks)
    return fix


def _sections(text, kw, rng, request):
    groups = _groups(_sentences(text), kw["num_sections"])
    if groups is None:
        return None
    return "\n\n".join(f"{kw['section_spliter']} {i}\n{' '.join(g)}" for i, g in enumerate(groups, 1))


def _two_responses(text, kw, rng, request):
    """The answer, then a shorter one (its first half), around ``******``."""
    sentences = _sentences(text)
    if len(sentences) < 2:
        return None
    return text.strip() + "\n\n******\n\n" + " ".join(sentences[: len(sentences) // 2])


def _constrained(text, kw, rng, request):
    return rng.choice(checks.CONSTRAINED_OPTIONS) + " " + text


def _postscript(text, kw, rng, request):
    return f"{text}\n\n{kw['postscript_marker']} {rng.choice(_POSTSCRIPTS)}"


def _end(text, kw, rng, request):
    return f"{text}\n\n{kw['end_phrase']}"


def _title(text, kw, rng, request):
    words = _WORD.findall(request.split("\n\n")[0])[:5] or ["Answer"]
    return "<<" + " ".join(w.capitalize() for w in words) + ">>\n\n" + text


def _start(text, kw, rng, request):
    return kw["start_phrase"] + ": " + text


def _repeat(text, kw, rng, request):
    return kw["prompt_to_repeat"].strip() + "\n\n" + text


def _capital_frequency(text, kw, rng, request):
    if checks.capital_word_frequency(text, **kw):
        return text
    if kw["capital_relation"] == "less than":
        return re.sub(r"\b[A-Z]{2,}\b", lambda m: m.group(0).capitalize(), text)
    need = kw["capital_frequency"] - checks.count_capital_words(text)
    spans = [m for m in _WORD.finditer(text) if len(m.group(0)) >= 4 and not m.group(0).isupper()][:need]
    for m in reversed(spans):
        text = text[: m.start()] + m.group(0).upper() + text[m.end():]
    return text


def _no_comma(text, kw, rng, request):
    return re.sub(r"(?<=\d),(?=\d)", "", text).replace(", ", " ").replace(",", " ")


def _json(text, kw, rng, request):
    return "```json\n" + json.dumps({"answer": text}, ensure_ascii=False, indent=2) + "\n```"


_REPAIRS: dict[str, Callable[[str, Mapping[str, Any], random.Random, str], str | None]] = {
    "keywords:forbidden_words": _forbidden,
    "length_constraints:number_words": _length_limit(checks.count_words, "num_words"),
    "length_constraints:number_sentences": _length_limit(checks.count_sentences, "num_sentences"),
    "keywords:existence": _existence,
    "keywords:frequency": _frequency,
    "keywords:letter_frequency": _only_if_followed(checks.letter_frequency),
    "language:response_language": _only_if_followed(checks.response_language),
    "detectable_content:number_placeholders": _placeholders,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:number_bullet_lists": _bullets,
    "length_constraints:number_paragraphs": _paragraphs("\n\n***\n\n"),
    "length_constraints:nth_paragraph_first_word": _paragraphs("\n\n"),
    "detectable_format:multiple_sections": _sections,
    "combination:two_responses": _two_responses,
    "detectable_format:constrained_response": _constrained,
    "detectable_content:postscript": _postscript,
    "startend:end_checker": _end,
    "detectable_format:title": _title,
    "startend:start_checker": _start,
    "combination:repeat_prompt": _repeat,
    "change_case:capital_word_frequency": _capital_frequency,
    "change_case:english_lowercase": lambda text, kw, rng, request: text.lower(),
    "change_case:english_capital": lambda text, kw, rng, request: text.upper(),
    "punctuation:no_comma": _no_comma,
    "detectable_format:json_format": _json,
    "startend:quotation": lambda text, kw, rng, request: '"' + text.strip().strip('"') + '"',
}

REPAIR_ORDER: tuple[str, ...] = tuple(_REPAIRS)
"""The order rewrites are applied in: content, layout, opening and closing, case and punctuation, wrappers."""


def repair(response: str, instructions: Sequence[Mapping[str, Any]], request: str, seed: int) -> str | None:
    """``response`` rewritten to follow every instruction (``[{"id", "kwargs"}]`` as in
    ``meta["instructions"]``), checked by the verifier in strict mode; None when no rewrite follows them all.

    ``request`` is the user's request without the instructions (a title is made from its first words);
    ``seed`` chooses among the added phrases, so a repair is reproducible.
    """
    if verify(response, instructions).all_followed:
        return response
    rng = random.Random(seed)
    by_id = dict(canonical_instructions(instructions))
    text: str | None = response.strip()
    for type_id in REPAIR_ORDER:
        if type_id in by_id and text is not None:
            text = _REPAIRS[type_id](text, by_id[type_id], rng, request)
    if text is None or not text.strip() or not verify(text, instructions).all_followed:
        return None
    return text
