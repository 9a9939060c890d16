"""Our verdicts against IFEval's official checker (``if-verifiable``) on a few hundred synthetic responses.

Every type of the taxonomy that IFEval has, with arguments drawn by our builders, is checked on responses
made of random combinations of the things the checks look at (paragraph dividers, blank lines, bullets,
sections, highlights, titles, placeholders, postscripts, case, commas, JSON, quotes, two answers, repeated
requests, other languages); strict and loose verdicts must equal the official ones. The two types that
need NLTK's English Punkt model are compared only where its data (punkt_tab) is installed.
"""

from __future__ import annotations

import json
import random

import pytest

from alignline.judges.instruction_wordings import FIRST_WORDS
from alignline.judges.verifiable import REGISTRY, check

instructions_registry = pytest.importorskip("if_verifiable.ifeval.instructions_registry")
common = pytest.importorskip("if_verifiable.common")

PUNKT_TYPES = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
LANGDETECT_TYPES = ("language:response_language", "change_case:english_capital", "change_case:english_lowercase")
LANGDETECT_RESPONSES = 80  # langdetect takes ~10 ms a text: these three types see the first 80 responses
DRAWS = 8  # argument draws per response for the fast types (one for the langdetect and Punkt types)
REQUEST = "Tell me about the river near your town."

SENTENCES = (
    "The river runs past the old mill.", "Patience is a habit worth building every morning.",
    "Dr. Smith paid 3.5 dollars for coffee.", "Is the library open today?", "What a lovely garden!",
    "Many people enjoy music, art and history.", "Honestly this is very simple stuff.",
    "A balance of energy and rest helps.", "Mr. Jones said it was fine.", "We met at 9 a.m. and left early.",
    "The weather was cold; we stayed in the kitchen.", "Remember to fill in [name] and [date].",
    "It costs about 20 dollars, e.g. less than lunch.", "The future looks bright... for now.", "Zebras and quails fox jazz.",
    "I think it's good.", "They said \"hello\" to us.", "Overall the plan works.", "Finally we went home.",
)
FOREIGN = (
    "El río pasa junto al viejo molino y la gente camina por la orilla cada mañana.",
    "La rivière traverse la ville et les enfants jouent près du pont tous les jours.",
    "Der Fluss fließt durch die Stadt und die Kinder spielen jeden Tag an der Brücke.",
)


def _paragraph(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        marks = ("* ", "- ", "**", "*", "  * ", "-")
        return "\n".join(f"{rng.choice(marks)}{rng.choice(SENTENCES)}" for _ in range(rng.randint(1, 4)))
    if kind < 0.3:
        return f"{rng.choice(('Section', 'SECTION', 'Part', 'Step', 'Chapter'))} {rng.randint(1, 4)}\n" \
               + rng.choice(SENTENCES)
    words = [rng.choice(SENTENCES) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        i = rng.randrange(len(words))
        words[i] = rng.choice(("*", "**", "* ")) + words[i] + rng.choice(("*", "**", " *"))
    if rng.random() < 0.15:
        words.append(rng.choice(FOREIGN))
    if rng.random() < 0.2:
        words.append(rng.choice(("USA", "NASA", "OK", "I", "BIG NEWS")) + " indeed.")
    return " ".join(words)


def _body(rng: random.Random) -> str:
    if rng.random() < 0.08:
        value = {"answer": rng.choice(SENTENCES), "n": rng.randint(1, 9)} if rng.random() < 0.8 else [1, 2]
        text = json.dumps(value)
        return rng.choice((text, f"```json\n{text}\n```", f"```\n{text}\n```", f"Here it is: {text}"))
    if rng.random() < 0.05:
        return rng.choice(FOREIGN) + " " + rng.choice(FOREIGN)
    if rng.random() < 0.15:  # blank-line paragraphs, each opening with one word (nth_paragraph_first_word)
        opener = rng.choice(FIRST_WORDS)
        return "\n\n".join(rng.choice(("", '"', "*")) + f"{opener.capitalize()}{rng.choice(('', ',', '.'))} "
                             + _paragraph(rng) for _ in range(rng.randint(1, 5)))
    if rng.random() < 0.15:
        splitter = rng.choice(("Section", "SECTION", "Part", "PART", "Chapter", "Step"))
        return "\n\n".join(f"{splitter} {i}\n{_paragraph(rng)}" for i in range(1, rng.randint(2, 6)))
    separator = rng.choice(("\n\n", "\n***\n", "\n\n***\n\n", " *** ", "\n", "\n\n\n"))
    return separator.join(_paragraph(rng) for _ in range(rng.randint(1, 5)))


def make_response(rng: random.Random) -> str:
    text = _body(rng)
    if rng.random() < 0.1:
        text = text + "\n******\n" + (_body(rng) if rng.random() < 0.8 else text)
    if rng.random() < 0.2:
        text = rng.choice(("<<A River Story>>", "<< >>", "<<title>> and more", "Title: rivers")) + "\n" + text
    if rng.random() < 0.15:
        text = rng.choice(("Sure! Here is my answer:", "In short", "Of course.", REQUEST)) + "\n" + text
    if rng.random() < 0.2:
        text += "\n\n" + rng.choice(("P.S. see you soon", "p. s. bring a coat", "P.P.S one more thing",
                                     "PS no dots", "P.P.S. later"))
    if rng.random() < 0.15:
        text += " " + rng.choice(("Hope this helps!", "Thanks for reading.", "Have a wonderful day!"))
    if rng.random() < 0.15:
        text += "\nMy answer is " + rng.choice(("yes.", "no.", "maybe", "Maybe."))
    case = rng.random()
    text = text.lower() if case < 0.15 else text.upper() if case < 0.25 else text
    if rng.random() < 0.1:
        text = text.replace(",", "")
    if rng.random() < 0.1:
        text = f'"{text}"'
    return text if rng.random() > 0.03 else rng.choice(("", "  \n", "*", "***"))


def _punkt_installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def _official(type_id: str, kwargs: dict):
    checker = instructions_registry.INSTRUCTION_DICT[type_id](type_id)
    checker.build_description(**kwargs)
    return checker


def _official_verdicts(checker, response: str) -> tuple[bool, bool]:
    strict = bool(response.strip()) and checker.check_following(response)
    loose = any(r.strip() and checker.check_following(r) for r in common.get_loose_transformations(response))
    return strict, bool(loose)


def test_our_verdicts_equal_the_official_checkers(monkeypatch):
    """300 responses (80 for the langdetect types) x every IFEval type, with arguments drawn afresh by our
    builder for each response (8 draws for the fast types), x strict and loose: no disagreement, and both
    verdicts occur for every type (so that the comparison is not vacuous)."""
    import functools

    import langdetect

    monkeypatch.setattr(langdetect.DetectorFactory, "seed", 0)  # the official call is unseeded; ours uses 0
    monkeypatch.setattr(langdetect, "detect", functools.cache(langdetect.detect))  # same answers, once each
    skip = () if _punkt_installed() else PUNKT_TYPES
    rng = random.Random(2026)
    responses = [make_response(rng) for _ in range(300)]
    disagreements, compared = [], 0
    for type_id, kind in REGISTRY.items():
        if not kind.ifeval or type_id in skip:
            continue
        outcomes = set()
        slow = type_id in LANGDETECT_TYPES or type_id in PUNKT_TYPES
        for i, response in enumerate(responses[:LANGDETECT_RESPONSES] if type_id in LANGDETECT_TYPES else responses):
            for draw in range(1 if slow else DRAWS):
                kwargs = kind.build(random.Random(f"{type_id}/{i}/{draw}"), request=REQUEST).kwargs
                official = _official_verdicts(_official(type_id, kwargs), response)
                ours = (check(kind, response, kwargs, "strict"), check(kind, response, kwargs, "loose"))
                if ours != official:
                    disagreements.append((type_id, kwargs, response, ours, official))
                outcomes.update(official)
                compared += 1
        assert outcomes == {True, False}, type_id
    fast = 25 - 3 - len(PUNKT_TYPES)
    assert compared == 300 * DRAWS * fast + LANGDETECT_RESPONSES * 3 + 300 * (len(PUNKT_TYPES) - len(skip))
    assert not disagreements, disagreements[:5]
