"""The verifiable-instruction taxonomy: per-type checks, wordings, seeded draws, conflicts, answer budgets."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import random
import re

import pytest

from alignline.data.records import Prompt
from alignline.errors import ConfigError
from alignline.judges import instruction_checks as checks
from alignline.judges import instruction_wordings as words
from alignline.judges.verifiable import (
    ALIASES,
    CONFLICTS,
    REGISTRY,
    attach_instructions,
    check,
    compatible,
    resolve_types,
)

IFEVAL_IDS = {
    "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
    "language:response_language", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders", "detectable_content:postscript",
    "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
    "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
    "combination:repeat_prompt", "startend:end_checker", "change_case:capital_word_frequency",
    "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma", "startend:quotation",
}
REQUEST = "Tell me about rivers."
AL, LT = "at least", "less than"

# (id, kwargs, response, followed in strict mode). The edge cases where alignline's earlier checker disagreed
# with the official one are marked "official:".
STRICT_CASES = [
    ("keywords:existence", {"keywords": ["garden", "ice cream"]}, "My GARDEN has ice cream.", True),
    ("keywords:existence", {"keywords": ["garden"]}, "Gardens are nice.", True),  # official: a substring
    ("keywords:existence", {"keywords": ["garden", "river"]}, "A garden.", False),
    ("keywords:frequency", {"keyword": "river", "frequency": 3, "relation": AL}, "River, river and rivers.", True),
    ("keywords:frequency", {"keyword": "river", "frequency": 3, "relation": LT}, "River, river and rivers.", False),
    ("keywords:frequency", {"keyword": "river", "frequency": 2, "relation": LT}, "One river.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["very", "just"]}, "This was adjusted.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["very", "just"]}, "It is Very good.", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": LT}, "Zoo", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": LT}, "Zig zag", False),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": AL}, "Eve sees", True),
    ("language:response_language", {"language": "es"},
     "El río pasa junto al viejo molino y la gente camina por la orilla cada mañana.", True),
    ("language:response_language", {"language": "es"}, "The river runs past the old mill every morning.", False),
    ("language:response_language", {"language": "es"}, "12345 !!!", True),  # official: undetectable passes
    # official: a line break alone does not end a sentence; "Dr." and "3.5" do not either
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AL}, "One line\nanother line", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LT},
     "Dr. Smith paid 3.5 dollars. Why?", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": AL}, "One. Two? Three!", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LT}, "One. Two? Three!", False),
    # official: only *** divides paragraphs (blank lines do not); blank blocks count only at either end
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n\nSecond.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nFirst.\n***\nSecond.\n***", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n***\nSecond.", False),
    ("length_constraints:number_words", {"num_words": 3, "relation": AL}, "don't stop", True),  # 3 words
    ("length_constraints:number_words", {"num_words": 3, "relation": LT}, "don't stop", False),
    ("length_constraints:number_words", {"num_words": 3, "relation": LT}, "**well** done", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"}, "Intro.\n\n\"Finally, done.", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"}, "Intro.\n\nFinal words.", False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"}, "Intro.\n***\nFinally done.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you on [date].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you soon.", False),
    # official: the marker may stand anywhere, with spaces after its periods, in any case
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body with P.S. inline", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\n\np. s. see you", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body. PS see you", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\nP.S. only one", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\nP.P.S one more", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Intro\n* one\n- two\n**bold** line", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n  * three", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* one\n* two\n---", True),  # a rule is a "-"
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "my answer is yes.", False),
    # official: *x* and **x** spans, each on one line with something besides blanks inside
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "* item *", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "** ** and *\nx*", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nA.\nSection 2\nB.", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "SECTION 1\nA.\nSECTION 2\nB.", False),
    ("detectable_format:json_format", {}, '```JSON\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, "42", True),  # official: any JSON value
    ("detectable_format:json_format", {}, 'Here: {"a": 1}', False),
    ("detectable_format:title", {}, "<<My Poem>>\nRoses are red.", True),
    ("detectable_format:title", {}, "<< >> and <my title>", False),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False),
    ("combination:two_responses", {}, "A\n******\n\n******\nB", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": REQUEST}, "tell me about rivers. Rivers flow.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": REQUEST}, "Sure. Tell me about rivers.", False),
    ("startend:end_checker", {"end_phrase": "Hope this helps!"}, '"Answer. hope this helps!"  \n', True),
    ("startend:end_checker", {"end_phrase": "Hope this helps!"}, "Hope this helps! Bye.", False),
    ("startend:start_checker", {"start_phrase": "In short"}, '  "in short, yes."', True),
    ("startend:start_checker", {"start_phrase": "In short"}, "In shortage of time.", False),
    # I, DO, N'T and USA are capital words (Treebank tokens): 4
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": AL},
     "I DON'T know the USA.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": LT},
     "I DON'T know the USA.", False),
    ("change_case:english_capital", {}, "THIS IS ALL WRITTEN IN CAPITAL LETTERS, MY FRIEND.", True),
    ("change_case:english_capital", {}, "HELLO THERE", False),  # official: langdetect says Vietnamese
    ("change_case:english_capital", {}, "ALL uPPER CASE HERE, MY FRIEND", False),
    ("change_case:english_lowercase", {}, "this is a good answer", True),
    ("change_case:english_lowercase", {}, "good answer", False),  # official: langdetect says Welsh
    ("change_case:english_lowercase", {}, "This is a good answer", False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "One, two.", False),
    ("startend:quotation", {}, '  "Hello there."\n', True),
    ("startend:quotation", {}, "“Curly quotes.”", False),  # official: straight quotes only
]

# (id, kwargs, response): strict fails, loose passes (a first or last line dropped, or '*' removed)
LOOSE_CASES = [
    ("startend:start_checker", {"start_phrase": "In short"}, "Sure! Here you go:\nIn short the river is long."),
    ("startend:start_checker", {"start_phrase": "In short"}, "**In short** the river is long."),
    ("change_case:english_lowercase", {}, "Sure!\nhere is everything you asked for in lowercase."),
    ("keywords:existence", {"keywords": ["ice cream"]}, "I like **ice** cream."),
    ("startend:end_checker", {"end_phrase": "Hope this helps!"}, "Answer. Hope this helps!\nLet me know."),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas below."),
    ("keywords:forbidden_words", {"forbidden_words": ["very"]}, "Very well!\nThe answer is four."),
    ("startend:quotation", {}, 'Sure:\n"Quoted answer."'),
    ("length_constraints:number_words", {"num_words": 4, "relation": LT}, "Of course here you go:\nthree short words"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Intro\n***\nA\n***\nB"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* Want more?"),
    ("combination:repeat_prompt", {"prompt_to_repeat": REQUEST}, "Sure!\nTell me about rivers. They flow."),
]


def prompt(pid: str = "p1", content: str = REQUEST) -> Prompt:
    return Prompt.model_validate({"id": pid, "messages": [{"role": "user", "content": content}]})


# ------------------------------------------------------------------------------------------------- registry


def test_registry_is_ifeval_and_one_of_ours():
    assert {t for t, k in REGISTRY.items() if k.ifeval} == IFEVAL_IDS
    assert set(REGISTRY) - IFEVAL_IDS == {"startend:start_checker"}
    for type_id, kind in REGISTRY.items():
        assert kind.id == type_id and kind.summary and kind.min_words >= 1


@pytest.mark.parametrize(("type_id", "kwargs", "response", "expected"), STRICT_CASES,
                         ids=[f"{c[0].split(':')[1]}-{i}" for i, c in enumerate(STRICT_CASES)])
def test_strict_checks(type_id, kwargs, response, expected):
    assert check(REGISTRY[type_id], response, kwargs, "strict") is expected
    if expected:  # loose mode is never stricter
        assert check(REGISTRY[type_id], response, kwargs, "loose") is True


def test_every_type_has_a_pass_and_a_fail_case():
    for type_id in REGISTRY:
        assert {c[3] for c in STRICT_CASES if c[0] == type_id} == {True, False}, type_id


@pytest.mark.parametrize(("type_id", "kwargs", "response"), LOOSE_CASES,
                         ids=[f"{c[0].split(':')[1]}-{i}" for i, c in enumerate(LOOSE_CASES)])
def test_loose_forgives_wrapping(type_id, kwargs, response):
    assert check(REGISTRY[type_id], response, kwargs, "strict") is False
    assert check(REGISTRY[type_id], response, kwargs, "loose") is True


@pytest.mark.parametrize("type_id", sorted(REGISTRY))
def test_blank_response_follows_nothing(type_id):
    kwargs = REGISTRY[type_id].build(random.Random(0), request=REQUEST).kwargs
    for mode in ("strict", "loose"):
        assert check(REGISTRY[type_id], "  \n ", kwargs, mode) is False


def test_counting_helpers():
    """Words: runs of \\w (it, s, a, well, known, fact, 3, cats, two, dogs = 10). Sentences: Punkt with our
    abbreviations: "Dr." and "3.5" do not end one, "e.g." (not an abbreviation here) does, a line break
    does not: [Dr. Smith paid 3.5 dollars.] [Why?] [e.g.] [this one\\n* a bullet]."""
    assert checks.count_words("It's a well-known fact: 3 cats, *two* dogs.") == 10
    assert checks.split_sentences("Dr. Smith paid 3.5 dollars. Why? e.g. this one\n* a bullet") == [
        "Dr. Smith paid 3.5 dollars.", "Why?", "e.g.", "this one\n* a bullet"]
    assert checks.word_tokens("I DON'T know.") == ["I", "DO", "N'T", "know", "."]
    assert checks.detect_language("Der Fluss fließt durch die Stadt und die Kinder spielen.") == "de"
    assert checks.detect_language("12345") is None


# ------------------------------------------------------------------------------------------------- wordings


def _mentions(text: str, value) -> bool:
    if isinstance(value, int):
        spelled = words.NUMBER_WORDS[value] if value < len(words.NUMBER_WORDS) else None
        return str(value) in text or (spelled is not None and spelled in text.lower())
    return str(value).lower() in text.lower()


def _mentions_args(type_id: str, kwargs: dict, text: str) -> bool:
    """Every argument shows in the wording; a "less than n" count may show as n or as "at most n - 1"."""
    for key, value in kwargs.items():
        if key in ("relation", "let_relation", "capital_relation", "prompt_to_repeat"):
            continue
        if key == "language":
            value = words.LANGUAGES[value]
        if key == "postscript_marker":
            value = "P.P.S" if value == "P.P.S" else value
        if key == "nth_paragraph":
            if not (_mentions(text, value) or words.ORDINALS[value] in text):
                return False
            continue
        values = value if isinstance(value, list) else [value]
        relation = kwargs.get("relation", kwargs.get("let_relation", kwargs.get("capital_relation")))
        for v in values:
            if not (_mentions(text, v) or (isinstance(v, int) and relation == LT and _mentions(text, v - 1))):
                return False
    return True


#: sha256 of json.dumps([kwargs, text], sort_keys=True) of each type's build(random.Random(7), request=REQUEST),
#: first 12 hex digits, computed once (issue 29). Two builds in one process agree even when a builder depends on
#: PYTHONHASHSEED (set iteration order, hash()); known values do not. A deliberate change to a type's wordings or
#: argument ranges changes its value: recompute it then.
PINNED_BUILDS = {
    "change_case:capital_word_frequency": "cfff1e1c8f6d",
    "change_case:english_capital": "87432a300e4a",
    "change_case:english_lowercase": "9e1dad72c9e7",
    "combination:repeat_prompt": "2d4231302206",
    "combination:two_responses": "9ed540d3b414",
    "detectable_content:number_placeholders": "82636afd43ce",
    "detectable_content:postscript": "4d742a88313b",
    "detectable_format:constrained_response": "78286c528a32",
    "detectable_format:json_format": "b5419b6005d9",
    "detectable_format:multiple_sections": "9eb013236b0e",
    "detectable_format:number_bullet_lists": "14b8da8fd214",
    "detectable_format:number_highlighted_sections": "65432e2d728c",
    "detectable_format:title": "b034be0139a9",
    "keywords:existence": "f28c53490c96",
    "keywords:forbidden_words": "6198f91bf05a",
    "keywords:frequency": "0e1c3ac2cafc",
    "keywords:letter_frequency": "e2f64b5cade2",
    "language:response_language": "53dabd47c3ae",
    "length_constraints:nth_paragraph_first_word": "882285987309",
    "length_constraints:number_paragraphs": "8b1fa75b4e3b",
    "length_constraints:number_sentences": "6e5fccc9e6a3",
    "length_constraints:number_words": "949dbc921144",
    "punctuation:no_comma": "8faf9d057c8b",
    "startend:end_checker": "16e744f20a33",
    "startend:quotation": "da1c8308faf9",
    "startend:start_checker": "d838f49181f0",
}


def _build_digest(inst) -> str:
    return hashlib.sha256(json.dumps([inst.kwargs, inst.text], sort_keys=True).encode()).hexdigest()[:12]


@pytest.mark.parametrize("type_id", sorted(REGISTRY))
def test_builders_are_seeded_valid_and_mention_their_args(type_id):
    kind = REGISTRY[type_id]
    assert len(kind.wordings) >= 3
    assert _build_digest(kind.build(random.Random(7), request=REQUEST)) == PINNED_BUILDS[type_id]
    texts = set()
    for seed in range(150):
        inst = kind.build(random.Random(seed), request=REQUEST)
        assert inst.id == type_id
        kind.parse_args(inst.kwargs)
        assert _mentions_args(type_id, inst.kwargs, inst.text), inst
        assert inst.text[0].isupper() and inst.text.rstrip('"')[-1] in ".!?", inst.text
        assert json.loads(inst.model_dump_json()) == inst.model_dump()
        texts.add(re.sub(r"\d+|\b(" + "|".join(words.NUMBER_WORDS) + r")\b", "N", inst.text))
    assert len(texts) >= 3, texts  # at least three wordings are drawn, not merely different numbers


@pytest.mark.parametrize("type_id", sorted(t for t in REGISTRY if t != "combination:repeat_prompt"))
def test_every_argument_varies(type_id):
    """Over 300 draws every argument takes at least two values (relations both), within the documented
    ranges for the counts."""
    values: dict[str, set] = {}
    for seed in range(300):
        for key, value in REGISTRY[type_id].build(random.Random(seed), request=REQUEST).kwargs.items():
            values.setdefault(key, set()).add(json.dumps(value))
    assert all(len(v) >= 2 for v in values.values()), values
    for key in ("relation", "let_relation", "capital_relation"):
        if key in values:
            assert values[key] == {json.dumps(AL), json.dumps(LT)}
    ranges = {"num_paragraphs": (2, 5), "num_bullets": (2, 6), "num_highlights": (1, 4), "num_sections": (2, 5),
              "num_placeholders": (1, 4), "num_sentences": (2, 10), "num_words": (20, 300), "frequency": (2, 4),
              "let_frequency": (2, 12), "capital_frequency": (2, 10)}
    for key, (lo, hi) in ranges.items():
        if key in values:
            assert all(lo <= json.loads(v) <= hi for v in values[key]), (key, values[key])


def test_relation_wordings_say_which_way():
    for type_id, templates in words.WORDINGS.items():
        if isinstance(templates, dict):
            assert set(templates) == {AL, LT}, type_id
            for t in templates[AL]:
                assert any(w in t for w in ("at least", "or more", "no fewer than", "or longer")), t
            for t in templates[LT]:
                assert any(w in t for w in ("fewer than", "at most", "no more than", "more than", "under")), t


def test_wordings_are_not_ifevals():
    """No rendered wording is close to the official description of the same instruction (similarity < 0.75)."""
    registry = pytest.importorskip("if_verifiable.ifeval.instructions_registry")
    for type_id in sorted(IFEVAL_IDS):
        for seed in range(60):
            inst = REGISTRY[type_id].build(random.Random(seed), request=REQUEST)
            official = registry.INSTRUCTION_DICT[type_id](type_id)
            description = official.build_description(**inst.kwargs)  # also: the official accepts our kwargs
            ratio = difflib.SequenceMatcher(None, inst.text.lower(), description.lower()).ratio()
            assert ratio < 0.75, (inst.text, description)


def test_word_lists_cannot_contradict_each_other():
    assert not set(words.KEYWORDS) & set(words.FORBIDDEN_WORDS)
    assert not set(words.FIRST_WORDS) & set(words.FORBIDDEN_WORDS)
    phrases = (*words.START_PHRASES, *words.END_PHRASES, *words.KEYWORDS, *words.FIRST_WORDS)
    for phrase in phrases:
        assert "," not in phrase, phrase
        assert not {w.lower() for w in re.findall(r"\w+", phrase)} & set(words.FORBIDDEN_WORDS), phrase
        assert not set(phrase.lower()) & set(words.RATIONED_LETTERS), phrase


# ------------------------------------------------------------------------------------------------- drawing


def test_pinned_draws_do_not_depend_on_hash_seeds():
    """Known draws (seed 7): a dependence on PYTHONHASHSEED, set order or file order would change them."""
    def ids_kwargs(pid):
        return [(d["id"], d["kwargs"]) for d in attach_instructions(prompt(pid), 7).meta["instructions"]]

    assert ids_kwargs("conv-1_0") == [
        ("change_case:capital_word_frequency", {"capital_frequency": 9, "capital_relation": "at least"})]
    assert ids_kwargs("rivers") == [
        ("change_case:capital_word_frequency", {"capital_frequency": 6, "capital_relation": "at least"}),
        ("startend:quotation", {}),
        ("detectable_format:multiple_sections", {"section_spliter": "Step", "num_sections": 5})]
    out = attach_instructions(prompt("p42"), 7)
    assert [d["id"] for d in out.meta["instructions"]] == [
        "detectable_format:number_highlighted_sections", "detectable_content:number_placeholders",
        "startend:end_checker"]
    assert out.messages[-1].content == (
        "Tell me about rivers.\n\nPut at least 3 important bits between asterisks (*like so*) so they stand out. "
        "Leave 1 or more blanks for me to fill in, written in square brackets such as [date]. Wrap up with "
        '"Let me know if anything else comes up." as the very end of your reply.')


def test_draws_are_order_free_and_differ_by_seed():
    prompts = [prompt(f"p{i}") for i in range(40)]
    forward = {p.id: attach_instructions(p, 1234).meta for p in prompts}
    backward = {p.id: attach_instructions(p, 1234).meta for p in reversed(prompts)}
    assert forward == backward
    assert {p.id: attach_instructions(p, 99).meta for p in prompts} != forward


def test_no_conflicting_pair_over_2000_draws_and_every_type_drawn():
    counts, seen = set(), set()
    for i in range(2000):
        out = attach_instructions(prompt(f"id-{i}"), "base")
        ids = [d["id"] for d in out.meta["instructions"]]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        for a, b in itertools.combinations(ids, 2):
            assert compatible(a, b) and frozenset((a, b)) not in CONFLICTS, (a, b)
        counts.add(len(ids))
        seen.update(ids)
    assert counts == {1, 2, 3}
    assert seen == set(REGISTRY)


def test_conflict_table():
    assert all(not compatible("detectable_format:constrained_response", t) for t in REGISTRY)
    assert compatible("detectable_format:json_format", "keywords:existence")
    assert not compatible("detectable_format:json_format", "punctuation:no_comma")
    assert not compatible("change_case:english_lowercase", "change_case:english_capital")
    assert not compatible("language:response_language", "keywords:existence")
    assert not compatible("combination:repeat_prompt", "startend:start_checker")
    assert not compatible("startend:quotation", "detectable_format:title")
    assert compatible("punctuation:no_comma", "change_case:english_lowercase")
    assert all(pair <= set(REGISTRY) and len(pair) == 2 for pair in CONFLICTS)


def test_repeat_prompt_repeats_the_request_and_skips_long_ones():
    long_request = " ".join(["word"] * 41) + "?"
    for i in range(300):
        short = attach_instructions(prompt(f"r{i}"), 0, types=["repeat_prompt", "title"], k_min=2, k_max=2)
        for d in short.meta["instructions"]:
            if d["id"] == "combination:repeat_prompt":
                assert d["kwargs"] == {"prompt_to_repeat": REQUEST}
        long = attach_instructions(prompt(f"r{i}", long_request), 0, types=["repeat_prompt", "title"])
        assert [d["id"] for d in long.meta["instructions"]] == ["detectable_format:title"]


# ------------------------------------------------------------------------------------------------- settings


def test_type_names_and_aliases():
    assert resolve_types() == resolve_types("all") == list(REGISTRY)
    assert resolve_types("ifeval") == [t for t in REGISTRY if t in IFEVAL_IDS]
    assert resolve_types(["no_commas", "start_with", "title", "include_keywords", "all_lowercase"]) == [
        "keywords:existence", "detectable_format:title", "change_case:english_lowercase", "punctuation:no_comma",
        "startend:start_checker"]
    assert resolve_types(["no_comma", "punctuation:no_comma"]) == ["punctuation:no_comma"]
    assert set(resolve_types("all", exclude=["repeat_prompt", "json_format"])) == \
        set(REGISTRY) - {"combination:repeat_prompt", "detectable_format:json_format"}
    assert all(target in REGISTRY for target in ALIASES.values())
    with pytest.raises(ConfigError, match="did you mean 'no_commas'"):
        resolve_types(["no_comas"])
    with pytest.raises(ConfigError, match="instructions.exclude"):
        resolve_types("all", exclude=["nope"])
    with pytest.raises(ConfigError, match="raise max_answer_words"):
        resolve_types(["number_paragraphs"], max_answer_words=20)


def test_answer_budget_leaves_out_long_types_and_caps_counts():
    """A 35-word budget leaves out the types whose min_words > 35 (paragraphs 40, nth paragraph 40, sections
    40, two responses 40, repeat prompt 60) and draws counts that fit: at most 35 // 12 = 2 sentences (at
    least 2 asked), 35 // 6 = 5 bullets, 35 // 8 = 4 highlights, at-least word counts only when 80 % of
    the budget reaches 30 words (28 here: never)."""
    pool = resolve_types("all", max_answer_words=35)
    assert set(REGISTRY) - set(pool) == {
        "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
        "detectable_format:multiple_sections", "combination:two_responses", "combination:repeat_prompt"}
    for i in range(400):
        for d in attach_instructions(prompt(f"b{i}"), 3, types="all", max_answer_words=35).meta["instructions"]:
            k = d["kwargs"]
            assert d["id"] in pool
            if d["id"] == "length_constraints:number_sentences" and k["relation"] == AL:
                assert k["num_sentences"] == 2
            if d["id"] == "detectable_format:number_bullet_lists":
                assert k["num_bullets"] <= 5
            if d["id"] == "detectable_format:number_highlighted_sections":
                assert k["num_highlights"] <= 4
            if d["id"] == "length_constraints:number_words":
                assert k["relation"] == LT


def test_a_word_limit_caps_the_other_counts():
    """With "less than n words" drawn, the other counts are drawn for a budget of n - 1 words: bullets at
    most (n - 1) // 6 (never below 2), sentences (at least) at most (n - 1) // 12 (never below 2)."""
    found = 0
    for i in range(1500):
        out = attach_instructions(prompt(f"w{i}"), 5, k_min=3, k_max=3,
                                  types=["number_words", "number_bullet_lists", "number_sentences"])
        kw = {d["id"]: d["kwargs"] for d in out.meta["instructions"]}
        limit = kw["length_constraints:number_words"]
        if limit["relation"] != LT:
            continue
        found += 1
        budget = limit["num_words"] - 1
        assert kw["detectable_format:number_bullet_lists"]["num_bullets"] <= max(2, budget // 6)
        sentences = kw["length_constraints:number_sentences"]
        if sentences["relation"] == AL:
            assert sentences["num_sentences"] <= max(2, budget // 12)
    assert found > 100
