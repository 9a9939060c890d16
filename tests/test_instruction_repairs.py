"""Verifier-guided repair (alignline.judges.instruction_repairs): minimal rewrites that the verifier accepts."""

from __future__ import annotations

import random

import pytest

from alignline.data.records import Prompt
from alignline.judges.instruction_repairs import REPAIR_ORDER, repair
from alignline.judges.verifiable import REGISTRY, attach_instructions, verify

ANSWER = ("Rivers carry water from high ground to the sea, and they shape valleys as they go. Most start as "
          "small streams in hills or mountains. Over time they join and grow wider. Along the way they feed "
          "farms, towns and wetlands. Floods can be dangerous, yet they also spread rich soil. People have "
          "settled beside rivers for thousands of years.")
REQUEST = "Tell me about rivers."


def one(type_id: str, **kwargs) -> list[dict]:
    return [{"id": type_id, "kwargs": kwargs}]


def test_every_type_has_a_repair_and_the_order_lists_each_once():
    assert sorted(REPAIR_ORDER) == sorted(REGISTRY)


def test_a_followed_response_comes_back_unchanged():
    instructions = one("keywords:existence", keywords=["valleys"])
    assert repair(ANSWER, instructions, REQUEST, seed=0) == ANSWER


@pytest.mark.parametrize(("instructions", "expected"), [
    (one("change_case:english_lowercase"), ANSWER.lower()),
    (one("punctuation:no_comma"), ANSWER.replace(", ", " ")),
    (one("startend:quotation"), f'"{ANSWER}"'),
    (one("startend:end_checker", end_phrase="Hope this helps!"), ANSWER + "\n\nHope this helps!"),
    (one("startend:start_checker", start_phrase="In short"), "In short: " + ANSWER),
    (one("detectable_format:title"), "<<Tell Me About Rivers>>\n\n" + ANSWER),
    # 6 sentences into 3 paragraphs of 2, joined by the *** divider
    (one("length_constraints:number_paragraphs", num_paragraphs=3),
     "\n\n***\n\n".join([
         "Rivers carry water from high ground to the sea, and they shape valleys as they go. Most start as "
         "small streams in hills or mountains.",
         "Over time they join and grow wider. Along the way they feed farms, towns and wetlands.",
         "Floods can be dangerous, yet they also spread rich soil. People have settled beside rivers for "
         "thousands of years."])),
])
def test_hand_made_repairs(instructions, expected):
    assert repair(ANSWER, instructions, REQUEST, seed=0) == expected


def test_an_upper_limit_cuts_whole_sentences():
    """54 words in 6 sentences; "less than 30 words": the first two sentences have 16 + 9 = 25 words (runs of
    \\w), the first three 25 + 6 = 31, so two are kept."""
    fixed = repair(ANSWER, one("length_constraints:number_words", num_words=30, relation="less than"), REQUEST, 0)
    assert fixed == ("Rivers carry water from high ground to the sea, and they shape valleys as they go. Most start "
                     "as small streams in hills or mountains.")


def test_what_needs_new_content_is_not_invented():
    """At least 200 words (the answer has 54) or another language cannot be made by a rewrite."""
    assert repair(ANSWER, one("length_constraints:number_words", num_words=200, relation="at least"),
                  REQUEST, 0) is None
    assert repair(ANSWER, one("language:response_language", language="fr"), REQUEST, 0) is None


def test_bullets_keep_every_sentence_and_count_exactly():
    """Three bullets from six sentences: the first three stay as the opening line, the last three are bullets."""
    fixed = repair(ANSWER, one("detectable_format:number_bullet_lists", num_bullets=3), REQUEST, 0)
    lines = fixed.split("\n")
    assert [line[:2] for line in lines[-3:]] == ["* "] * 3 and lines[1] == ""
    assert fixed.replace("\n", " ").replace("* ", "").split() == ANSWER.split()


def test_a_combination_is_applied_in_an_order_that_keeps_every_rewrite():
    """Lower case after the postscript (so the marker is lower-cased too: the check ignores case), and the
    quotation marks last, around everything."""
    instructions = [{"id": "detectable_content:postscript", "kwargs": {"postscript_marker": "P.S."}},
                    {"id": "change_case:english_lowercase", "kwargs": {}},
                    {"id": "startend:quotation", "kwargs": {}}]
    fixed = repair(ANSWER, instructions, REQUEST, seed=0)
    assert fixed.startswith('"rivers carry') and fixed.endswith('"') and "\n\np.s. " in fixed
    assert verify(fixed, instructions).all_followed


def test_repairs_are_seeded_and_always_verified():
    """Across attached instruction sets of every type (the project's own draws), a repair is either None or
    followed in strict mode, and the same seed gives the same text."""
    repaired = 0
    for i in range(150):
        prompt = attach_instructions(Prompt(id=f"p{i}", messages=[{"role": "user", "content": REQUEST}]), 7,
                                     k_min=1, k_max=3, types="all", exclude=["language:response_language"],
                                     max_answer_words=60)
        instructions = prompt.meta["instructions"]
        seed = random.Random(i).randrange(1000)
        fixed = repair(ANSWER, instructions, REQUEST, seed)
        assert fixed == repair(ANSWER, instructions, REQUEST, seed)
        if fixed is not None:
            repaired += 1
            assert verify(fixed, instructions).all_followed
    assert repaired >= 100


# ---------------------------------------------------------------------------------------------------------
# The repair stage
# ---------------------------------------------------------------------------------------------------------

from alignline.config import load_config  # noqa: E402
from alignline.data.io import read_records, write_records  # noqa: E402
from alignline.data.records import Conversation, Pair, Response  # noqa: E402
from alignline.errors import DataError  # noqa: E402
from alignline.stages import repair as repair_stage  # noqa: E402


def stage_prompts() -> list[Prompt]:
    """p1 already follows (no comma in the answer); p2 is repaired (lower-cased); p3 asks for at least 500 words,
    which is not invented; p4 has no reference."""
    def make(pid, wording, instruction, reference):
        return Prompt(id=pid, messages=[{"role": "user", "content": f"{REQUEST}\n\n{wording}"}],
                      reference=reference, meta={"instructions": [{**instruction, "text": wording}]})
    return [
        make("p1", "No commas.", {"id": "punctuation:no_comma", "kwargs": {}}, "Rivers run to the sea."),
        make("p2", "All lowercase.", {"id": "change_case:english_lowercase", "kwargs": {}}, ANSWER),
        make("p3", "At least 500 words.", {"id": "length_constraints:number_words",
                                           "kwargs": {"num_words": 500, "relation": "at least"}}, ANSWER),
        make("p4", "No commas.", {"id": "punctuation:no_comma", "kwargs": {}}, None),
    ]


def run_stage(tmp_path, **overrides):
    write_records(tmp_path / "prompts.jsonl", stage_prompts())
    cfg = load_config(repair_stage.RepairConfig, None, [f"prompts={tmp_path / 'prompts.jsonl'}",
                                                        f"output_dir={tmp_path / 'out'}",
                                                        *[f"{k}={v}" for k, v in overrides.items()]])
    out = repair_stage.run(cfg)
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    return (read_records(out / "conversations.jsonl", Conversation), read_records(out / "pairs.jsonl", Pair),
            manifest)


def test_the_stage_writes_followed_conversations_and_minimal_edit_pairs(tmp_path):
    conversations, pairs, manifest = run_stage(tmp_path)
    assert [c.id for c in conversations] == ["p1", "p2"]
    assert conversations[0].messages[-1].content == "Rivers run to the sea."
    assert conversations[1].messages[-1].content == ANSWER.lower()
    assert [(p.id, p.chosen, p.rejected) for p in pairs] == [("p2", ANSWER.lower(), ANSWER)]
    counts = manifest["counts"]
    assert (counts["answers_followed"], counts["answers_repaired"], counts["dropped_unrepairable"],
            counts["prompts_without_reference"]) == (1, 1, 1, 1)
    assert manifest["per_type"]["length_constraints:number_words"] == {"unrepairable": 1}


def test_answers_are_cut_to_leading_sentences_and_long_conversations_dropped(tmp_path, tiny_model_dir):
    """max_answer_words 20: ANSWER's first sentence has 16 words, the first two 25, so one sentence is kept.
    max_tokens halfway between p1's conversation and p2's (whole answer) keeps p1 and drops p2."""
    conversations, _, _ = run_stage(tmp_path, max_answer_words=20)
    assert conversations[1].messages[-1].content == ("rivers carry water from high ground to the sea, and they "
                                                     "shape valleys as they go.")
    from transformers import AutoTokenizer

    from alignline.data.chat import encode, render

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    whole, _, _ = run_stage(tmp_path / "whole")
    n1, n2 = (len(encode(tokenizer, render(tokenizer, c.messages, add_generation_prompt=False))) for c in whole)
    assert n1 < n2
    conversations, _, manifest = run_stage(tmp_path / "short", tokenizer=tiny_model_dir, max_tokens=(n1 + n2) // 2)
    assert [c.id for c in conversations] == ["p1"] and manifest["counts"]["dropped_too_long"] == 1


def test_responses_are_repaired_instead_of_references(tmp_path):
    write_records(tmp_path / "responses.jsonl",
                  [Response(prompt_id="p2", sample_idx=1, text="Later Sample.", source="m"),
                   Response(prompt_id="p2", sample_idx=0, text="First Sample.", source="m")])
    conversations, pairs, _ = run_stage(tmp_path, responses=tmp_path / "responses.jsonl")
    assert [(c.id, c.messages[-1].content) for c in conversations] == [("p2", "first sample.")]
    assert pairs[0].provenance["source"] == "response"


def test_prompts_without_instructions_are_refused_by_name(tmp_path):
    write_records(tmp_path / "prompts.jsonl", [Prompt(id="bare", messages=[{"role": "user", "content": "Hi"}],
                                                      reference="Hello.")])
    cfg = load_config(repair_stage.RepairConfig, None, [f"prompts={tmp_path / 'prompts.jsonl'}",
                                                        f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError, match=r"prompts.jsonl.*meta.instructions.*first: bare"):
        repair_stage.run(cfg)


def test_max_tokens_needs_a_tokenizer(tmp_path):
    with pytest.raises(Exception, match="max_tokens needs tokenizer"):
        load_config(repair_stage.RepairConfig, None, ["prompts=x.jsonl", "max_tokens=100"])
