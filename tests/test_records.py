"""Record validation (design section 3): every error names the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignline.data.io import read_conversations, read_pairs, read_prompts, read_records, write_records
from alignline.data.records import (
    Conversation,
    Message,
    Pair,
    Prompt,
    RankedSet,
    Response,
    Scored,
    content_id,
    validate,
)
from alignline.errors import AlignlineError, DataError

U = {"role": "user", "content": "What is 2+2?"}
A = {"role": "assistant", "content": "4."}
S = {"role": "system", "content": "Be brief."}


def write_lines(path: Path, *objs) -> Path:
    """Each obj: a dict (dumped as JSON) or a str/bytes line written verbatim."""
    with open(path, "wb") as fh:
        for obj in objs:
            if isinstance(obj, bytes):
                fh.write(obj + b"\n")
            elif isinstance(obj, str):
                fh.write(obj.encode() + b"\n")
            else:
                fh.write(json.dumps(obj).encode() + b"\n")
    return path


def conv(id_="c1", messages=None, **extra) -> dict:
    return {"id": id_, "messages": messages if messages is not None else [U, A], **extra}


# --------------------------------------------------------------------------- the happy path

def test_valid_conversations_read(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", conv("a"), "", conv("b", [S, U, A, U, A], meta={"k": 1}))
    got = read_conversations(path)
    assert [c.id for c in got] == ["a", "b"]
    assert got[1].messages[0] == Message(role="system", content="Be brief.")
    assert got[1].meta == {"k": 1}


def test_dataerror_is_an_alignline_error_with_attributes(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", conv("a"), {"messages": [U, A]})
    with pytest.raises(AlignlineError) as info:
        read_records(path, Conversation)
    err = info.value
    assert isinstance(err, DataError)
    assert (err.path, err.line, err.field) == (str(path), 2, "id")


# --------------------------------------------------------------------------- malformed input

def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", conv("a"), conv("b"), '{"id": "c", "messages": [')
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert f"{path}:3" in msg
    assert "broken.jsonl" in msg and "malformed JSON" in msg


def test_non_utf8_bytes_name_the_line(tmp_path):
    bad = b'{"id": "x", "messages": [{"role": "user", "content": "caf\xe9"}]}'
    path = write_lines(tmp_path / "latin1.jsonl", conv("a"), conv("b"), bad)
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert f"{path}:3" in msg
    assert "not UTF-8" in msg and "UTF-8 text" in msg


def test_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", "[1, 2]")
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert f"{path}:1" in msg and "a JSON object" in msg and "list" in msg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError) as info:
        read_conversations(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize(
    "obj, field",
    [
        ({"messages": [U, A]}, "id"),
        ({"id": "x"}, "messages"),
        ({"id": "x", "messages": [U, {"role": "assistant"}]}, "messages[1].content"),
        ({"id": "x", "messages": [{"content": "hi"}, A]}, "messages[0].role"),
    ],
)
def test_missing_field_is_named(tmp_path, obj, field):
    path = write_lines(tmp_path / "missing.jsonl", conv("ok"), obj)
    with pytest.raises(DataError) as info:
        read_records(path, Conversation)
    msg = str(info.value)
    assert f"{path}:2" in msg
    assert f"field '{field}'" in msg and "missing field" in msg
    assert info.value.field == field


def test_missing_field_in_pair(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", {"id": "p", "prompt": [U], "chosen": "yes"})
    with pytest.raises(DataError) as info:
        read_pairs(path)
    assert f"{path}:1" in str(info.value) and "field 'rejected'" in str(info.value)


def test_unknown_field_is_named_with_the_allowed_ones(tmp_path):
    path = write_lines(tmp_path / "extra.jsonl", conv("a", colour="blue"))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert f"{path}:1" in msg and "field 'colour'" in msg and "unknown field" in msg
    assert "only id, messages, meta" in msg and "'blue'" in msg


def test_unknown_role_value(tmp_path):
    path = write_lines(tmp_path / "role.jsonl", conv("a", [U, {"role": "gpt", "content": "4"}]))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert f"{path}:1" in msg and "field 'messages[1].role'" in msg and "'gpt'" in msg


def test_assistant_first_names_the_index(tmp_path):
    path = write_lines(tmp_path / "order.jsonl", conv("a"), conv("b", [A, U, A]))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert f"{path}:2" in msg
    assert "messages[0].role is 'assistant' but 'user' was expected" in msg


def test_two_user_turns_in_a_row_name_the_index(tmp_path):
    # with a leading system turn the index counts it: the second user turn is messages[2]
    path = write_lines(tmp_path / "order.jsonl", conv("b", [S, U, U, A]))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert f"{path}:1" in msg
    assert "messages[2].role is 'user' but 'assistant' was expected" in msg


def test_system_not_first_names_the_index(tmp_path):
    path = write_lines(tmp_path / "order.jsonl", conv("b", [U, A, S, U, A]))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    assert "messages[2].role is 'system' but 'user' was expected" in str(info.value)


def test_conversation_must_end_with_assistant(tmp_path):
    path = write_lines(tmp_path / "end.jsonl", conv("b", [U, A, U]))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    assert f"{path}:1" in str(info.value)
    assert "the last message must be an assistant turn, found 'user'" in str(info.value)


def test_prompt_must_end_with_user(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", {"id": "p", "messages": [U, A]})
    with pytest.raises(DataError) as info:
        read_prompts(path)
    assert f"{path}:1" in str(info.value) and "the last message must be a user turn" in str(info.value)


def test_only_system_and_empty_messages(tmp_path):
    path = write_lines(tmp_path / "sys.jsonl", conv("a", [S]))
    with pytest.raises(DataError, match="only a system message"):
        read_conversations(path)
    path = write_lines(tmp_path / "empty.jsonl", conv("a", []))
    with pytest.raises(DataError, match="messages is empty"):
        read_conversations(path)


def test_empty_content_names_the_message(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", conv("a"), conv("b", [U, {"role": "assistant", "content": "  \n"}]))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert f"{path}:2" in msg and "field 'messages[1].content'" in msg and "content is empty" in msg


def test_wrong_type_names_field_and_value(tmp_path):
    path = write_lines(tmp_path / "type.jsonl", conv("a", [U, {"role": "assistant", "content": 4}]))
    with pytest.raises(DataError) as info:
        read_conversations(path)
    msg = str(info.value)
    assert "field 'messages[1].content'" in msg and "found 4" in msg


def test_pair_errors(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", {"id": "p", "prompt": [U], "chosen": "a", "rejected": " "})
    with pytest.raises(DataError) as info:
        read_pairs(path)
    assert f"{path}:1" in str(info.value) and "field 'rejected'" in str(info.value) and "the response is empty" in str(info.value)

    path = write_lines(tmp_path / "rating.jsonl", {"id": "p", "prompt": [U], "chosen": "a", "rejected": "b",
                                                   "rating": "much"})
    with pytest.raises(DataError) as info:
        read_pairs(path)
    assert "field 'rating'" in str(info.value) and "'much'" in str(info.value)


def test_response_sample_idx_must_be_non_negative():
    with pytest.raises(DataError) as info:
        validate(Response, {"prompt_id": "p", "sample_idx": -1, "text": "t", "source": "m"}, path="r.jsonl", line=7)
    assert "r.jsonl:7" in str(info.value) and "field 'sample_idx'" in str(info.value)


# --------------------------------------------------------------------------- TRL layouts, read as-is

def test_trl_conversational_layout_without_id(tmp_path):
    path = write_lines(tmp_path / "trl.jsonl", {"messages": [U, A]}, {"messages": [S, U, A]})
    got = read_conversations(path)
    assert [len(c.messages) for c in got] == [2, 3]
    assert got[0].id == content_id([U, A])  # stable content id
    assert got[0].id != got[1].id


def test_trl_conversational_layout_errors_still_name_the_line(tmp_path):
    path = write_lines(tmp_path / "trl.jsonl", {"messages": [U, A]}, {"messages": [A]})
    with pytest.raises(DataError) as info:
        read_conversations(path)
    assert f"{path}:2" in str(info.value) and "messages[0].role is 'assistant'" in str(info.value)


def test_trl_prompt_only_layouts(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", {"prompt": "Hello?"}, {"prompt": [S, U]},
                       {"id": "mine", "messages": [U], "reference": "4"})
    got = read_prompts(path)
    assert got[0].messages == [Message(role="user", content="Hello?")]
    assert [m.role for m in got[1].messages] == ["system", "user"]
    assert got[2].id == "mine" and got[2].reference == "4"
    assert all(p.id for p in got)


def test_trl_preference_explicit_strings(tmp_path):
    path = write_lines(tmp_path / "pref.jsonl", {"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    (pair,) = read_pairs(path)
    assert pair.prompt == [Message(role="user", content="2+2?")]
    assert (pair.chosen, pair.rejected) == ("4", "5")
    assert pair.id


def test_trl_preference_explicit_message_lists(tmp_path):
    row = {"prompt": [S, U], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    path = write_lines(tmp_path / "pref.jsonl", row)
    (pair,) = read_pairs(path)
    assert [m.role for m in pair.prompt] == ["system", "user"]
    assert (pair.chosen, pair.rejected) == ("4", "5")


def test_trl_preference_implicit_prompt(tmp_path):
    row = {"chosen": [U, {"role": "assistant", "content": "4"}], "rejected": [U, {"role": "assistant", "content": "5"}]}
    path = write_lines(tmp_path / "pref.jsonl", row)
    (pair,) = read_pairs(path)
    assert pair.prompt == [Message(**U)]
    assert (pair.chosen, pair.rejected) == ("4", "5")


def test_trl_preference_implicit_prompt_mismatch(tmp_path):
    row = {"chosen": [U, A], "rejected": [{"role": "user", "content": "other"}, A]}
    path = write_lines(tmp_path / "pref.jsonl", row)
    with pytest.raises(DataError) as info:
        read_pairs(path)
    msg = str(info.value)
    assert f"{path}:1" in msg and "do not share a conversation prefix" in msg


def test_trl_preference_chosen_not_ending_with_assistant(tmp_path):
    row = {"prompt": [U], "chosen": [U], "rejected": "5"}
    path = write_lines(tmp_path / "pref.jsonl", row)
    with pytest.raises(DataError) as info:
        read_pairs(path)
    assert f"{path}:1" in str(info.value) and "last message of 'chosen' must be an assistant turn" in str(info.value)


def test_our_pair_layout_with_rating_and_provenance(tmp_path):
    row = {"id": "p1", "prompt": [U], "chosen": "4", "rejected": "5", "rating": "slightly",
           "reason": "correct", "provenance": {"sources": ["a", "b"], "ranks": [1, 4]}}
    (pair,) = read_pairs(write_lines(tmp_path / "p.jsonl", row))
    assert pair.rating == "slightly" and pair.provenance["ranks"] == [1, 4]


# --------------------------------------------------------------------------- Parquet

def test_parquet_round_trip_conversations(tmp_path):
    convs = [
        Conversation(id="a", messages=[Message(**U), Message(**A)]),
        Conversation(id="b", messages=[Message(**S), Message(**U), Message(**A)],
                     meta={"source": "sharegpt", "turns": 3, "mixed": [1, "x", None]}),
        Conversation(id="c", messages=[Message(**U), Message(**A)], meta={"other": {"nested": True}}),
    ]
    path = write_records(tmp_path / "out" / "convs.parquet", convs)
    assert path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert read_conversations(path) == convs
    assert read_records(path, Conversation) == convs


def test_parquet_round_trip_keeps_fields_missing_from_the_first_row(tmp_path):
    # regression: the writer used to take the columns from the first row only, losing 'rating' here
    pairs = [
        Pair(id="p", prompt=[Message(**U)], chosen="4", rejected="5"),
        Pair(id="q", prompt=[Message(**U)], chosen="4", rejected="5", rating="better", reason="r",
             provenance={"sources": ["m1", "m2"], "scores": [0.9, 0.1]}),
    ]
    path = write_records(tmp_path / "pairs.parquet", pairs)
    assert read_pairs(path) == pairs


def test_parquet_round_trip_scored_and_ranked_sets(tmp_path):
    prompt = Prompt(id="p", messages=[Message(**U)], meta={"split": "eval"})
    scored = [
        Scored(prompt_id="p", sample_idx=0, text="4", source="m", sampling={"temperature": 0.7, "top_p": 1},
               seed=1, scores={"rm": 1.5}),
        Scored(prompt_id="p", sample_idx=1, text="5", source="m", sampling={"stop": ["\n"]}, status="failed",
               error="timeout"),
    ]
    write_records(tmp_path / "scored.parquet", scored)
    assert read_records(tmp_path / "scored.parquet", Scored) == scored
    ranked = [RankedSet(prompt=prompt, responses=scored, scorer="rm")]
    write_records(tmp_path / "ranked.parquet", ranked)
    assert read_records(tmp_path / "ranked.parquet", RankedSet) == ranked


def test_parquet_messages_column_is_native_for_trl(tmp_path):
    import pyarrow.parquet as pq

    path = write_records(tmp_path / "c.parquet", [Conversation(id="a", messages=[Message(**U), Message(**A)])])
    table = pq.read_table(path)
    assert table.column("messages").to_pylist() == [[U, A]]


def test_parquet_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_conversations(tmp_path / "missing.parquet")
    bogus = tmp_path / "bogus.parquet"
    bogus.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as info:
        read_conversations(bogus)
    assert "bogus.parquet" in str(info.value) and "Parquet" in str(info.value)
    path = write_records(tmp_path / "convs.parquet", [Conversation(id="a", messages=[Message(**U), Message(**A)])])
    # rows are validated on read: a Conversation file read as Pairs names the row and the field
    with pytest.raises(DataError) as info:
        read_pairs(path)
    assert f"{path}:1" in str(info.value)


def test_empty_parquet_round_trip(tmp_path):
    path = write_records(tmp_path / "empty.parquet", [])
    assert read_conversations(path) == []


def test_jsonl_round_trip_and_shard_directory(tmp_path):
    convs = [Conversation(id=str(i), messages=[Message(**U), Message(**A)]) for i in range(5)]
    write_records(tmp_path / "d" / "part-00000.jsonl", convs[:3])
    write_records(tmp_path / "d" / "part-00001.parquet", convs[3:])
    (tmp_path / "d" / "manifest.json").write_text("{}")
    assert read_conversations(tmp_path / "d") == convs
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataError, match="no .jsonl, .parquet or .arrow shards"):
        read_conversations(empty)
