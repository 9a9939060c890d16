"""The verifier judge and its API (alignline.judges.verifiable): verify, aggregate, attach, older ids.

Per-type checks, wordings, draws and conflicts: tests/test_instruction_taxonomy.py; agreement with the
official IFEval checker: tests/test_instruction_official.py."""

from __future__ import annotations

import json

import pytest

from alignline.data.records import Prompt
from alignline.errors import ConfigError, DataError
from alignline.judges.verifiable import (
    REGISTRY,
    Instruction,
    VerifierJudge,
    VerifyResult,
    aggregate,
    attach_instructions,
    instruction_seed,
    loose_variants,
    verify,
)


def prompt(pid: str = "p1", *, meta: dict | None = None, multi: bool = False) -> Prompt:
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    if multi:
        messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, *messages]
    return Prompt.model_validate({"id": pid, "messages": messages, "meta": meta or {}})


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
    assert instruction_seed(1234, "p1") == instruction_seed("1234", "p1") != instruction_seed(1234, "p2")


def test_attach_with_restricted_types_and_bad_settings():
    for i in range(50):
        out = attach_instructions(prompt(f"r{i}"), 0, k_min=3, k_max=3,
                                  types=["no_commas", "all_lowercase", "all_uppercase"])
        ids = {d["id"] for d in out.meta["instructions"]}
        assert len(ids) == 2 and "punctuation:no_comma" in ids  # lower + upper never together: two fit
    with pytest.raises(ConfigError, match="k_min"):
        attach_instructions(prompt(), 0, k_min=0)
    with pytest.raises(ConfigError, match="k_min"):
        attach_instructions(prompt(), 0, k_min=3, k_max=2)
    with pytest.raises(ConfigError, match="did you mean 'no_commas'"):
        attach_instructions(prompt(), 0, types=["no_comas"])


# ------------------------------------------------------------------------------------------------- verify


def test_verify_and_aggregate_arithmetic():
    """Two responses, five instructions (older short ids, checked as the IFEval types they map to).

    A: [no_commas, all_lowercase, start_with "in short"], response "Sure!\\nin short it works."
       strict: [T, F ("Sure" is capitalised), F (starts with "Sure")] -> 1/3; loose (first line dropped): all T.
    B: [word_count at_most 3 (= number_words less than 4), end_with "Bye."], response "One two three four.
       Bye." (5 words)
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
        verify("text", [{"id": "no_commas", "kwargs": {}}, {"id": "no_comas", "kwargs": {}}])
    msg = str(err.value)
    assert "'no_comas'" in msg and "did you mean 'no_commas'" in msg and "instructions[1].id" in msg
    assert all(name in msg for name in REGISTRY)


@pytest.mark.parametrize(("kwargs", "field", "words"), [
    ({"relation": "about", "num_words": 5}, "instructions[0].kwargs.relation", "invalid argument"),
    ({"num_words": 5}, "instructions[0].kwargs.relation", "missing"),
    ({"relation": "at least", "num_words": "5"}, "instructions[0].kwargs.num_words", "invalid argument"),
    ({"relation": "at least", "num_words": 0}, "instructions[0].kwargs.num_words", "invalid argument"),
    ({"relation": "at least", "num_words": 5, "n": 1}, "instructions[0].kwargs.n", "unknown argument"),
    ([5], "instructions[0].kwargs", "malformed"),
])
def test_malformed_kwargs_name_id_and_field(kwargs, field, words):
    with pytest.raises(DataError) as err:
        verify("text", [{"id": "length_constraints:number_words", "kwargs": kwargs}])
    assert err.value.field == field
    assert "'length_constraints:number_words'" in str(err.value) and field in str(err.value)
    assert words in str(err.value)


def test_other_malformed_inputs():
    with pytest.raises(DataError, match=r"instructions\[0\].kwargs.keywords\[1\].*must be a word"):
        verify("x", [{"id": "include_keywords", "kwargs": {"keywords": ["river", "  "]}}])
    with pytest.raises(DataError, match=r"kwargs.section_spliter.*found '\(\.\*\)'"):  # a regex would slip in
        verify("x", [{"id": "multiple_sections", "kwargs": {"section_spliter": "(.*)", "num_sections": 2}}])
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
    answer = "Sure!\nthere are no commas in this answer"
    assert judge.score(p, answer) == 0.5
    assert VerifierJudge(mode="loose").score(p, answer) == 1.0
    assert judge.score_detail(p, answer, mode="loose").followed == [True, True]
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


def test_older_ids_and_arguments_are_checked_as_the_ifeval_types():
    """Prompt files written before the IFEval taxonomy keep working: old id, old argument names; the ids
    stay as stored. On "One two.\\n\\nriver. P.S.": word_count at_most 2 = number_words less than 3 (One,
    two, river, P, S: 5 words, not followed); paragraph_count n 2 counts *** dividers only (a blank line is
    none: 1 paragraph, not followed); exclude_words "very" (followed); postscript P.S. (followed). On "one
    two": 2 words, followed. On "One. Two.": sentence_count at_least 2 (2 sentences, followed);
    keyword_frequency n 2 = "river" at least 2 times (0: not followed)."""
    old = [{"id": "word_count", "kwargs": {"relation": "at_most", "n": 2}},
           {"id": "sentence_count", "kwargs": {"relation": "at_least", "n": 2}},
           {"id": "keyword_frequency", "kwargs": {"keyword": "river", "n": 2}},
           {"id": "paragraph_count", "kwargs": {"n": 2}},
           {"id": "exclude_words", "kwargs": {"words": ["very"]}},
           {"id": "postscript", "kwargs": {"marker": "P.S."}}]
    res = verify("One two.\n\nriver. P.S.", old[:1] + old[3:])
    assert res.ids == ["word_count", "paragraph_count", "exclude_words", "postscript"]
    assert res.followed == [False, False, True, True]
    assert verify("one two", old[:1]).followed == [True]
    assert verify("One. Two.", old[1:3]).followed == [True, False]


def test_loose_variants_are_the_official_ones():
    """The response; without the first line, the last, both (stripped); each also without '*'."""
    assert loose_variants("Sure!\n**hi** \nbye") == [
        "Sure!\n**hi** \nbye", "Sure!\nhi \nbye", "**hi** \nbye", "hi \nbye", "Sure!\n**hi**", "Sure!\nhi",
        "**hi**", "hi"]
    assert loose_variants("one line") == ["one line"]
    assert loose_variants("  \n  ") == []
