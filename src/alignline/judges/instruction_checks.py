"""The checks behind the verifiable instruction types, with the semantics of IFEval's official checker.

Each function takes a response and the instruction's arguments and says whether the response follows it.
They reproduce what Google's IFEval checker decides (Zhou et al., 2023; read in the ``if-verifiable``
package, whose ``instructions.py`` is the reference), including its quirks, because a policy trained on
these verdicts is measured by that checker:

* words are runs of ``\\w`` characters (``don't`` is two words); keywords match as case-insensitive
  substrings (``garden`` is found in ``Gardens``), forbidden words as whole words;
* paragraphs of ``number_paragraphs`` are split by ``***`` (blank lines do not count), those of
  ``nth_paragraph_first_word`` by a blank line (``\\n\\n``);
* a postscript marker may stand anywhere in the text, not only at the start of a line;
* a highlight is ``*text*`` or ``**text**`` on one line, with something other than blanks inside;
* a bullet is a line starting with ``*`` (not ``**``) or with ``-``;
* relations are ``"less than"`` (strictly fewer) and ``"at least"``.

Two official checks use NLTK's English Punkt model (sentence counting; capital-word counting through
``word_tokenize``), a data file that is not always installed. Here the same Punkt algorithm (NLTK's code)
runs with parameters of this project's own: the abbreviations in :data:`ABBREVIATIONS`, the sentence
starters in :data:`SENTENCE_STARTERS` and nothing learned (no collocations or orthographic statistics). The verdicts are therefore
deterministic and need no download; they differ from the official model only where a period follows a
token the model learned something about (see docs/guide.md, "Verifiable instructions", for the measured
agreement). Language detection (``langdetect``) runs with a fixed seed; the official call is unseeded, so
its verdict on an ambiguous text may change from run to run while ours does not.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

__all__ = [
    "ABBREVIATIONS",
    "CONSTRAINED_OPTIONS",
    "SENTENCE_STARTERS",
    "compare",
    "count_capital_words",
    "count_sentences",
    "count_words",
    "detect_language",
    "split_sentences",
    "word_tokens",
]

ABBREVIATIONS: tuple[str, ...] = (
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "inc", "ltd", "co", "corp", "vs", "jan", "feb", "aug",
    "sept", "oct", "nov", "dec", "u.s", "u.k", "ph.d", "a.m", "p.m", "gen", "sen", "rep", "ft",
)
"""Tokens that a following period does not end a sentence after (lower case, without the final period)."""

SENTENCE_STARTERS: tuple[str, ...] = (
    "the", "this", "these", "those", "it", "they", "he", "she", "you", "there", "here", "however", "finally",
    "overall", "then", "first", "next", "my", "our", "your", "their", "what", "how", "why", "each", "every",
    "please", "let", "now", "today", "also", "instead", "meanwhile", "in", "if", "when", "while", "but", "so",
)
"""Capitalized, these words start a sentence even after an abbreviation or an ellipsis (``9 a.m. The``)."""

CONSTRAINED_OPTIONS: tuple[str, ...] = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
"""The three answers of ``detectable_format:constrained_response``; fixed by the official checker."""

_WORD = re.compile(r"\w+")
_PARAGRAPH_DIVIDER = re.compile(r"\s?\*\*\*\s?")
_STAR_BULLET = re.compile(r"^\s*\*[^*].*$", re.M)
_DASH_BULLET = re.compile(r"^\s*-.*$", re.M)
_SINGLE_HIGHLIGHT = re.compile(r"\*[^\n*]*\*")
_DOUBLE_HIGHLIGHT = re.compile(r"\*\*[^\n*]*\*\*")
_PLACEHOLDER = re.compile(r"\[.*?\]")
_TITLE = re.compile(r"<<[^\n]+>>")
_FIRST_WORD_STOP = frozenset(".,?!'\"")


def compare(count: int, relation: str, n: int) -> bool:
    """IFEval's two relations: ``"less than"`` is ``count < n``, ``"at least"`` is ``count >= n``."""
    return count < n if relation == "less than" else count >= n


def count_words(text: str) -> int:
    """Number of runs of word characters (``\\w+``): ``don't`` counts 2, ``well-known`` 2, ``3.5`` 2."""
    return len(_WORD.findall(text))


@functools.cache
def _sentence_splitter():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    params.sent_starters = set(SENTENCE_STARTERS)
    return PunktSentenceTokenizer(params)


@functools.cache
def _word_splitter():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def split_sentences(text: str) -> list[str]:
    """Sentences by NLTK's Punkt algorithm with :data:`ABBREVIATIONS` (a line break alone ends none)."""
    return _sentence_splitter().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def word_tokens(text: str) -> list[str]:
    """Treebank word tokens of each sentence, as ``nltk.word_tokenize`` makes them (``DON'T`` -> ``DO N'T``)."""
    tokenizer = _word_splitter()
    return [token for sentence in split_sentences(text) for token in tokenizer.tokenize(sentence)]


def count_capital_words(text: str) -> int:
    """Tokens whose cased characters are all capitals (``I``, ``USA``, ``N'T``)."""
    return sum(token.isupper() for token in word_tokens(text))


@functools.cache
def _language_factory():
    from langdetect import detector_factory

    detector_factory.init_factory()
    return detector_factory._factory


@functools.lru_cache(maxsize=4096)  # loose mode asks about the same variants once per language instruction
def detect_language(text: str) -> str | None:
    """langdetect's language code of ``text`` with seed 0 (no global state touched); None if undetectable."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.seed = 0
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None


def _is_english_or_undetectable(text: str) -> bool:
    found = detect_language(text)
    return found is None or found == "en"


# ---------------------------------------------------------------------------------------------------------
# One check per instruction type (text first, then the arguments by their IFEval names)
# ---------------------------------------------------------------------------------------------------------


def keywords_existence(text: str, keywords: Sequence[str]) -> bool:
    return all(re.search(re.escape(k), text, re.I) for k in keywords)


def keyword_frequency(text: str, keyword: str, frequency: int, relation: str) -> bool:
    return compare(len(re.findall(re.escape(keyword), text, re.I)), relation, frequency)


def forbidden_words(text: str, forbidden_words: Sequence[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", text, re.I) for w in forbidden_words)


def letter_frequency(text: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return compare(text.lower().count(letter), let_relation, let_frequency)


def response_language(text: str, language: str) -> bool:
    found = detect_language(text)
    return found is None or found == language  # undetectable counts as followed, as officially


def number_sentences(text: str, num_sentences: int, relation: str) -> bool:
    return compare(count_sentences(text), relation, num_sentences)


def number_paragraphs(text: str, num_paragraphs: int) -> bool:
    """Blocks between ``***`` dividers; an empty block is allowed only at either end, not in the middle."""
    blocks = _PARAGRAPH_DIVIDER.split(text)
    if any(not b.strip() for b in blocks[1:-1]):
        return False
    blank_ends = sum(not blocks[i].strip() for i in {0, len(blocks) - 1})
    return len(blocks) - blank_ends == num_paragraphs


def number_words(text: str, num_words: int, relation: str) -> bool:
    return compare(count_words(text), relation, num_words)


def _first_word(paragraph: str) -> str:
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    out = []
    for ch in word:
        if ch in _FIRST_WORD_STOP:
            break
        out.append(ch.lower())
    return "".join(out)


def nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Paragraphs split at every ``\\n\\n``; blank pieces are not counted, yet the ``nth`` piece is taken from
    the raw split (as officially), so a blank piece before it shifts which paragraph is looked at."""
    pieces = text.split("\n\n")
    count = sum(bool(p.strip()) for p in pieces)
    if nth_paragraph > count or not pieces[nth_paragraph - 1].strip():
        return False
    return count == num_paragraphs and _first_word(pieces[nth_paragraph - 1].strip()) == first_word.lower()


def number_placeholders(text: str, num_placeholders: int) -> bool:
    return len(_PLACEHOLDER.findall(text)) >= num_placeholders


def postscript(text: str, postscript_marker: str) -> bool:
    """The marker anywhere (any case); ``P.S.`` and ``P.P.S`` allow a space after each period."""
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif postscript_marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:  # officially the lower-cased marker is a pattern: its '.' matches any character
        pattern = r"\s*" + postscript_marker.lower() + r".*$"
    return re.search(pattern, text.lower(), re.M) is not None


def number_bullet_lists(text: str, num_bullets: int) -> bool:
    return len(_STAR_BULLET.findall(text)) + len(_DASH_BULLET.findall(text)) == num_bullets


def constrained_response(text: str) -> bool:
    body = text.strip()
    return any(option in body for option in CONSTRAINED_OPTIONS)


def number_highlighted_sections(text: str, num_highlights: int) -> bool:
    singles = sum(bool(m.strip("*").strip()) for m in _SINGLE_HIGHLIGHT.findall(text))
    doubles = sum(bool(m[2:-2].strip()) for m in _DOUBLE_HIGHLIGHT.findall(text))
    return singles + doubles >= num_highlights


def multiple_sections(text: str, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` headers ``<splitter> <number>`` (case-sensitive)."""
    return len(re.split(r"\s?" + section_spliter + r"\s?\d+\s?", text)) - 1 >= num_sections


def json_format(text: str) -> bool:
    """Any JSON value once the text is stripped of an opening ```json (or ```Json, ```JSON, ```) fence and
    a closing ``` fence."""
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def title(text: str) -> bool:
    return any(m.lstrip("<").rstrip(">").strip() for m in _TITLE.findall(text))


def two_responses(text: str) -> bool:
    """Exactly two non-blank, different parts around ``******`` (blank parts only at either end)."""
    parts = text.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p for p in parts if p.strip()]
    return len(answers) == 2 and answers[0].strip() != answers[1].strip()


def repeat_prompt(text: str, prompt_to_repeat: str) -> bool:
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(text: str, end_phrase: str) -> bool:
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def start_checker(text: str, start_phrase: str) -> bool:
    """This project's own (IFEval has no start check): the text, stripped of blanks and an opening ``"``,
    starts with the phrase (any case), and the phrase is not the start of a longer word."""
    body, phrase = text.strip().lstrip('"').lower(), start_phrase.strip().lower()
    if not body.startswith(phrase):
        return False
    return len(body) == len(phrase) or not (phrase[-1].isalnum() and body[len(phrase)].isalnum())


def capital_word_frequency(text: str, capital_frequency: int, capital_relation: str) -> bool:
    return compare(count_capital_words(text), capital_relation, capital_frequency)


def english_capital(text: str) -> bool:
    return text.isupper() and _is_english_or_undetectable(text)


def english_lowercase(text: str) -> bool:
    return text.islower() and _is_english_or_undetectable(text)


def no_comma(text: str) -> bool:
    return "," not in text


def quotation(text: str) -> bool:
    body = text.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'
