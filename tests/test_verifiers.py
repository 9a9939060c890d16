"""The verifiable-instruction library and the ``verifier`` judge (alignline.judges.verifiable)."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from alignline.data.records import Prompt
from alignline.errors import ConfigError, DataError
from alignline.judges.verifiable import (
    CONFLICTS,
    END_PHRASES,
    FILLER_WORDS,
    KEYWORDS,
    POSTSCRIPT_MARKERS,
    REGISTRY,
    START_PHRASES,
    Instruction,
    VerifierJudge,
    VerifyResult,
    aggregate,
    attach_instructions,
    compatible,
    count_words,
    instruction_seed,
    loose_variants,
    split_paragraphs,
    split_sentences,
    verify,
)

ALL_IDS = {
    "word_count", "sentence_count", "paragraph_count", "include_keywords", "exclude_words", "keyword_frequency",
    "start_with", "end_with", "all_lowercase", "all_uppercase", "no_commas", "json_format", "bullet_count",
    "highlighted_sections", "title", "postscript", "quoted",
}

# (id, kwargs, response, followed in strict mode)
STRICT_CASES = [
    ("word_count", {"relation": "at_most", "n": 5}, "one two three four five", True),
    ("word_count", {"relation": "at_most", "n": 5}, "one two three four five six", False),
    ("word_count", {"relation": "at_least", "n": 3}, "don't well-known **x**", True),
    ("word_count", {"relation": "at_least", "n": 4}, "don't well-known **x**", False),
    ("sentence_count", {"relation": "at_most", "n": 2}, "It costs 3.5 dollars. Dr. Smith agreed!", True),
    ("sentence_count", {"relation": "at_most", "n": 2}, "One. Two? Three!", False),
    ("sentence_count", {"relation": "at_least", "n": 3}, "One. Two? Three!", True),
    ("sentence_count", {"relation": "at_least", "n": 3}, "One line\nanother line", False),
    ("paragraph_count", {"n": 3}, "First.\n\nSecond.\n***\nThird.", True),
    ("paragraph_count", {"n": 3}, "First.\nStill first.\n\nSecond.", False),
    ("include_keywords", {"keywords": ["garden", "ice cream"]}, "My GARDEN has ice\ncream.", True),
    ("include_keywords", {"keywords": ["garden"]}, "Gardens are nice.", False),
    ("exclude_words", {"words": ["very", "just"]}, "This was adjusted.", True),
    ("exclude_words", {"words": ["very", "just"]}, "It is Very good.", False),
    ("keyword_frequency", {"keyword": "river", "n": 2}, "River, river and rivers.", True),
    ("keyword_frequency", {"keyword": "river", "n": 3}, "River, river and rivers.", False),
    ("start_with", {"phrase": "In short"}, "  in short, yes.", True),
    ("start_with", {"phrase": "In short"}, "In shortage of time.", False),
    ("end_with", {"phrase": "Hope this helps!"}, "Answer. Hope this helps!  \n", True),
    ("end_with", {"phrase": "Hope this helps!"}, "Hope this helps! Bye.", False),
    ("all_lowercase", {}, "all lower, 123.", True),
    ("all_lowercase", {}, "Not lower.", False),
    ("all_lowercase", {}, "123", False),
    ("all_uppercase", {}, "ALL UPPER, 42!", True),
    ("all_uppercase", {}, "ALL uPPER", False),
    ("no_commas", {}, "No commas here.", True),
    ("no_commas", {}, "One, two.", False),
    ("no_commas", {}, "全角，逗号", False),
    ("json_format", {}, '{"a": [1, 2]}', True),
    ("json_format", {}, '```json\n{"a": 1}\n```', True),
    ("json_format", {}, 'Here: {"a": 1}', False),
    ("json_format", {}, "42", False),
    ("bullet_count", {"n": 2}, "Intro\n* one\n- two\n***\n**bold** line", True),
    ("bullet_count", {"n": 2}, "* one\n* two\n  * three", False),
    ("highlighted_sections", {"n": 2}, "*one* and **two**", True),
    ("highlighted_sections", {"n": 2}, "* item\n* item *one*\n* no *", False),
    ("title", {}, "<<My Poem>>\nRoses are red.", True),
    ("title", {}, "<< >> and <my title>", False),
    ("postscript", {"marker": "P.S."}, "Body.\n\np.s. see you soon", True),
    ("postscript", {"marker": "P.S."}, "Body with P.S. inline", False),
    ("postscript", {"marker": "P.P.S."}, "Body.\nP.S. only one", False),
    ("quoted", {}, '  "Hello there."\n', True),
    ("quoted", {}, "“Curly quotes.”", True),
    ("quoted", {}, '"Hello" there', False),
]

# (id, kwargs, response): strict fails, loose passes
LOOSE_CASES = [
    ("start_with", {"phrase": "In short"}, "Sure! Here is my answer:\nIn short the river is long."),
    ("start_with", {"phrase": "In short"}, "**In short** the river is long."),
    ("all_lowercase", {}, "Sure!\nhere is everything in lowercase."),
    ("all_uppercase", {}, "HELLO THERE\nBest regards"),
    ("include_keywords", {"keywords": ["ice cream"]}, "I like **ice** cream."),
    ("keyword_frequency", {"keyword": "ice cream", "n": 2}, "ice cream and **ice** cream"),
    ("end_with", {"phrase": "Hope this helps!"}, "Answer. Hope this helps!\nLet me know."),
    ("json_format", {}, 'Here is the JSON:\n{"a": 1}'),
    ("no_commas", {}, "Sure, here it is:\nNo commas below."),
    ("exclude_words", {"words": ["very"]}, "Very well!\nThe answer is four."),
    ("quoted", {}, 'Sure:\n"Quoted answer."'),
    ("word_count", {"relation": "at_most", "n": 3}, "Of course here you go:\nthree short words"),
    ("sentence_count", {"relation": "at_most", "n": 2}, "Sure thing!\nOne. Two."),
    ("paragraph_count", {"n": 2}, "First.\n\nSecond.\n\nSent from my phone"),
    ("bullet_count", {"n": 2}, "* one\n* two\n* Want more?"),
    ("postscript", {"marker": "P.S."}, "Body.\n**P.S.** later"),
]
# loose mode only drops lines and asterisks, so it cannot add a title or a highlight: those two have no case


def prompt(pid: str = "p1", *, meta: dict | None = None, multi: bool = False) -> Prompt:
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    if multi:
        messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, *messages]
    return Prompt.model_validate({"id": pid, "messages": messages, "meta": meta or {}})


# ------------------------------------------------------------------------------------------------- registry


def test_registry_has_the_promised_types():
    assert set(REGISTRY) == ALL_IDS
    for name, kind in REGISTRY.items():
        assert kind.id == name and re.fullmatch(r"[a-z]+(_[a-z]+)*", name)
        assert type(kind).__doc__ and name in type(kind).__doc__


@pytest.mark.parametrize(("name", "kwargs", "response", "expected"), STRICT_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(STRICT_CASES)])
def test_strict_checks(name, kwargs, response, expected):
    assert REGISTRY[name].check(response, kwargs, "strict") is expected
    if expected:  # loose mode is never stricter
        assert REGISTRY[name].check(response, kwargs, "loose") is True


def test_every_type_has_a_pass_and_a_fail_case():
    for name in ALL_IDS:
        outcomes = {c[3] for c in STRICT_CASES if c[0] == name}
        assert outcomes == {True, False}, name


@pytest.mark.parametrize(("name", "kwargs", "response"), LOOSE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(LOOSE_CASES)])
def test_loose_forgives_wrapping(name, kwargs, response):
    assert REGISTRY[name].check(response, kwargs, "strict") is False
    assert REGISTRY[name].check(response, kwargs, "loose") is True


@pytest.mark.parametrize("name", sorted(ALL_IDS))
def test_blank_response_follows_nothing(name):
    kwargs = REGISTRY[name].build(random.Random(0)).kwargs
    for mode in ("strict", "loose"):
        assert REGISTRY[name].check("  \n ", kwargs, mode) is False
    # a one-line response: dropping its only line leaves a blank variant, which must not count
    assert REGISTRY["no_commas"].check("a, b", {}, "loose") is False


def test_loose_variants():
    assert loose_variants("Sure!\n**hi**\nbye") == [
        "Sure!\n**hi**\nbye", "Sure!\nhi\nbye", "**hi**\nbye", "hi\nbye", "Sure!\n**hi**", "Sure!\nhi",
        "**hi**", "hi",
    ]
    assert loose_variants("one line") == ["one line"]


def test_text_helpers():
    assert count_words("It's a well-known fact: 3 cats, *two* dogs.") == 8
    assert split_sentences("Dr. Smith paid 3.5 dollars. Why? e.g. this!\n* a bullet\n\n") == [
        "Dr. Smith paid 3.5 dollars.", "Why?", "e.g. this!", "* a bullet"]
    assert split_paragraphs("a\n\nb\n***\nc\n\n***\n\nd\n   \n e") == ["a", "b", "c", "d", "e"]


# ------------------------------------------------------------------------------------------------- builders


def _range_ok(inst: Instruction) -> bool:
    k = inst.kwargs
    match inst.id:
        case "word_count":
            lo, hi = (30, 200) if k["relation"] == "at_least" else (50, 300)
            return lo <= k["n"] <= hi and k["n"] % 10 == 0
        case "sentence_count":
            lo, hi = (3, 8) if k["relation"] == "at_least" else (2, 6)
            return lo <= k["n"] <= hi
        case "paragraph_count":
            return 2 <= k["n"] <= 5
        case "include_keywords":
            return 1 <= len(k["keywords"]) <= 3 and len(set(k["keywords"])) == len(k["keywords"]) \
                and set(k["keywords"]) <= set(KEYWORDS)
        case "exclude_words":
            return 1 <= len(k["words"]) <= 3 and len(set(k["words"])) == len(k["words"]) \
                and set(k["words"]) <= set(FILLER_WORDS)
        case "keyword_frequency":
            return k["keyword"] in KEYWORDS and 2 <= k["n"] <= 4
        case "start_with":
            return k["phrase"] in START_PHRASES
        case "end_with":
            return k["phrase"] in END_PHRASES
        case "bullet_count":
            return 2 <= k["n"] <= 6
        case "highlighted_sections":
            return 1 <= k["n"] <= 4
        case "postscript":
            return k["marker"] in POSTSCRIPT_MARKERS
        case _:
            return k == {}


def _mentions_args(inst: Instruction) -> bool:
    values = []
    for v in inst.kwargs.values():
        values.extend(v if isinstance(v, list) else [v])
    return all(str(v) in inst.text for v in values if v not in ("at_least", "at_most"))


@pytest.mark.parametrize("name", sorted(ALL_IDS))
def test_builders_are_seeded_in_range_and_mention_their_args(name):
    kind = REGISTRY[name]
    assert kind.build(random.Random(7)) == kind.build(random.Random(7))
    texts = set()
    for seed in range(200):
        inst = kind.build(random.Random(seed))
        assert inst.id == name
        assert _range_ok(inst), inst
        assert _mentions_args(inst), inst
        assert inst.text.strip() and inst.text[0].isupper() and inst.text.rstrip()[-1] in ".!?"
        assert Instruction.model_validate(json.loads(inst.model_dump_json())) == inst
        kind.parse_args(inst.kwargs)
        texts.add(inst.text)
    assert len(texts) >= 2  # more than one wording


def test_relation_builders_say_which_way():
    for name in ("word_count", "sentence_count"):
        for seed in range(50):
            inst = REGISTRY[name].build(random.Random(seed))
            at_most = any(w in inst.text for w in ("at most", "or fewer", "no more than"))
            at_least = any(w in inst.text for w in ("at least", "no fewer than", "or more"))
            assert (at_most, at_least) == (inst.kwargs["relation"] == "at_most", inst.kwargs["relation"] == "at_least")


def test_word_lists_cannot_contradict_each_other():
    assert not set(KEYWORDS) & set(FILLER_WORDS)
    for phrase in (*START_PHRASES, *END_PHRASES, *KEYWORDS):
        assert "," not in phrase
        assert not {w.lower() for w in re.findall(r"\w+", phrase)} & set(FILLER_WORDS), phrase


# ------------------------------------------------------------------------------------------------- attaching


def test_attach_is_stable_per_prompt_id_whatever_the_order():
    prompts = [prompt(f"p{i}") for i in range(40)]
    forward = {p.id: attach_instructions(p, 1234).meta for p in prompts}
    backward = {p.id: attach_instructions(p, 1234).meta for p in reversed(prompts)}
    assert forward == backward
    other = {p.id: attach_instructions(p, 99).meta for p in prompts}
    assert other != forward
    assert instruction_seed(1234, "p1") == instruction_seed("1234", "p1") != instruction_seed(1234, "p2")


def test_attach_picks_one_to_three_compatible_types_over_500_prompts():
    counts, seen = set(), set()
    for i in range(500):
        out = attach_instructions(prompt(f"id-{i}"), "base")
        ids = [d["id"] for d in out.meta["instructions"]]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        for a, b in itertools.combinations(ids, 2):
            assert compatible(a, b) and frozenset((a, b)) not in CONFLICTS, (a, b)
        counts.add(len(ids))
        seen.update(ids)
    assert counts == {1, 2, 3}
    assert seen == ALL_IDS


def test_conflict_table():
    assert not compatible("all_lowercase", "all_uppercase")
    for other in ("bullet_count", "title", "postscript", "quoted", "paragraph_count"):
        assert not compatible("json_format", other)
    assert not compatible("start_with", "quoted")
    assert not compatible("no_commas", "no_commas")
    assert compatible("no_commas", "all_lowercase")
    assert all(pair <= ALL_IDS and len(pair) == 2 for pair in CONFLICTS)


def test_attach_appends_to_the_last_user_turn_and_stores_meta():
    original = prompt("conv-1", meta={"source": "demo"}, multi=True)
    out = attach_instructions(original, 5, k_min=3, k_max=3)
    insts = out.meta["instructions"]
    assert len(insts) == 3 and out.meta["source"] == "demo"
    assert out.messages[:-1] == original.messages[:-1]
    assert out.messages[-1].role == "user"
    assert out.messages[-1].content == "Tell me about rivers.\n\n" + " ".join(d["text"] for d in insts)
    assert original.messages[-1].content == "Tell me about rivers." and "instructions" not in original.meta
    assert all(set(d) == {"id", "kwargs", "text"} for d in insts)
    again = Prompt.model_validate(json.loads(out.model_dump_json()))
    assert again == out
    assert isinstance(verify("anything", again.meta["instructions"]), VerifyResult)
    # attaching twice changes nothing
    assert attach_instructions(out, 5) == out


def test_attach_with_restricted_types_and_bad_settings():
    for i in range(50):
        out = attach_instructions(prompt(f"r{i}"), 0, k_min=3, k_max=3,
                                  types=["no_commas", "all_lowercase", "all_uppercase"])
        ids = {d["id"] for d in out.meta["instructions"]}
        assert len(ids) == 2 and "no_commas" in ids  # lower + upper never together, so only two fit
    with pytest.raises(ConfigError, match="k_min"):
        attach_instructions(prompt(), 0, k_min=0)
    with pytest.raises(ConfigError, match="k_min"):
        attach_instructions(prompt(), 0, k_min=3, k_max=2)
    with pytest.raises(ConfigError, match="did you mean 'no_commas'"):
        attach_instructions(prompt(), 0, types=["no_comma"])


# ------------------------------------------------------------------------------------------------- verify


def test_verify_and_aggregate_arithmetic():
    """Two responses, five instructions.

    A: [no_commas, all_lowercase, start_with "in short"], response "Sure!\\nin short it works."
       strict: [T, F ("Sure" is capitalised), F (starts with "Sure")] -> 1/3; loose (first line dropped): all T.
    B: [word_count at_most 3, end_with "Bye."], response "One two three four. Bye." (5 words)
       strict = loose = [F, T] -> 1/2 (one line: no loose variant differs).
    prompt level: strict 0/2 = 0; loose 1/2 (A). instruction level: strict (1+1)/5 = 0.4; loose (3+1)/5 = 0.8.
    """
    a = [{"id": "no_commas", "kwargs": {}}, {"id": "all_lowercase", "kwargs": {}},
         Instruction(id="start_with", kwargs={"phrase": "in short"}, text="Start with 'in short'.")]
    b = [{"id": "word_count", "kwargs": {"relation": "at_most", "n": 3}, "text": "..."},
         {"id": "end_with", "kwargs": {"phrase": "Bye."}}]
    ra, rb = "Sure!\nin short it works.", "One two three four. Bye."
    sa, la = verify(ra, a), verify(ra, a, "loose")
    sb, lb = verify(rb, b, mode="strict"), verify(rb, b, mode="loose")
    assert sa.followed == [True, False, False] and sa.score == pytest.approx(1 / 3) and not sa.all_followed
    assert la.followed == [True, True, True] and la.score == 1.0 and la.all_followed
    assert sb.followed == lb.followed == [False, True] and sb.score == lb.score == 0.5
    assert sa.ids == ["no_commas", "all_lowercase", "start_with"] and sa.mode == "strict" and la.mode == "loose"
    agg = aggregate([(sa, la), (sb, lb)])
    assert agg["n_prompts"] == 2 and agg["n_instructions"] == 5
    assert agg["prompt_level_strict"] == 0.0
    assert agg["prompt_level_loose"] == 0.5
    assert agg["instruction_level_strict"] == pytest.approx(0.4)
    assert agg["instruction_level_loose"] == pytest.approx(0.8)
    assert agg["per_type"]["all_lowercase"] == {"n": 1, "strict": 0.0, "loose": 1.0}
    assert agg["per_type"]["word_count"] == {"n": 1, "strict": 0.0, "loose": 0.0}
    json.dumps(agg)
    with pytest.raises(DataError, match="strict, loose"):
        aggregate([(la, sa)])
    with pytest.raises(DataError):
        aggregate([])


def test_unknown_id_names_it_and_lists_known_ids():
    with pytest.raises(DataError) as err:
        verify("text", [{"id": "no_commas", "kwargs": {}}, {"id": "no_comma", "kwargs": {}}])
    msg = str(err.value)
    assert "'no_comma'" in msg and "did you mean 'no_commas'" in msg and "instructions[1].id" in msg
    assert all(name in msg for name in ALL_IDS)


@pytest.mark.parametrize(("kwargs", "field", "words"), [
    ({"relation": "about", "n": 5}, "instructions[0].kwargs.relation", "invalid argument"),
    ({"n": 5}, "instructions[0].kwargs.relation", "missing"),
    ({"relation": "at_most", "n": "5"}, "instructions[0].kwargs.n", "invalid argument"),
    ({"relation": "at_most", "n": 0}, "instructions[0].kwargs.n", "invalid argument"),
    ({"relation": "at_most", "n": 5, "extra": 1}, "instructions[0].kwargs.extra", "unknown argument"),
    ([5], "instructions[0].kwargs", "malformed"),
])
def test_malformed_kwargs_name_id_and_field(kwargs, field, words):
    with pytest.raises(DataError) as err:
        verify("text", [{"id": "word_count", "kwargs": kwargs}])
    assert err.value.field == field
    assert "'word_count'" in str(err.value) and field in str(err.value) and words in str(err.value)


def test_other_malformed_inputs():
    with pytest.raises(DataError, match=r"instructions\[0\].kwargs.keywords.*entry 1"):
        verify("x", [{"id": "include_keywords", "kwargs": {"keywords": ["river", "  "]}}])
    with pytest.raises(DataError, match="at least one instruction"):
        verify("x", [])
    with pytest.raises(DataError, match="must be an object"):
        verify("x", ["no_commas"])
    with pytest.raises(ConfigError, match="mode"):
        verify("x", [{"id": "no_commas"}], mode="lenient")


# ------------------------------------------------------------------------------------------------- judge


def test_verifier_judge():
    p = prompt(meta={"instructions": [{"id": "all_lowercase", "kwargs": {}, "text": "lower"},
                                       {"id": "no_commas", "kwargs": {}, "text": "no commas"}]})
    judge = VerifierJudge()
    assert judge.id == "verifier" and judge.mode == "strict"
    assert judge.score(p, "Sure!\nno commas here") == 0.5
    assert VerifierJudge(mode="loose").score(p, "Sure!\nno commas here") == 1.0
    assert judge.score_detail(p, "Sure!\nno commas here", mode="loose").followed == [True, True]
    with pytest.raises(DataError) as err:
        judge.score(prompt("bare-7"), "text")
    assert "bare-7" in str(err.value) and "prepare's instructions setting" in str(err.value)
    broken = prompt("bad-3", meta={"instructions": [{"id": "nope"}]})
    with pytest.raises(DataError, match="bad-3.*unknown instruction id 'nope'"):
        judge.score(broken, "text")
    with pytest.raises(ConfigError):
        VerifierJudge(mode="lenient")


def test_attached_instructions_are_checkable_end_to_end():
    for i in range(100):
        p = attach_instructions(prompt(f"e{i}"), 3)
        res = VerifierJudge().score_detail(p, "A plain answer, with a comma.")
        assert 0.0 <= res.score <= 1.0 and len(res.followed) == len(p.meta["instructions"])
