"""Atomic files, resumable shards, manifests and fingerprints."""

from __future__ import annotations

import json
import os
import stat

import pytest

from alignline.data import io
from alignline.data.io import (
    ShardedWriter,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    iter_jsonl,
    read_manifest,
    write_manifest,
    write_records,
)
from alignline.data.records import Conversation, Message


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- atomic files

def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    atomic_write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "sub" / "j.json", {"a": [1, 2], "ü": "ß"})
    assert target.read_text() == "two"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "sub" / "j.json").read_text(encoding="utf-8")) == {"a": [1, 2], "ü": "ß"}
    assert leftovers(tmp_path / "sub") == []
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["b.bin", "f.txt", "j.json"]


def test_atomic_write_failure_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_write_gives_normal_permissions(tmp_path):
    # regression: mkstemp's 0600 used to leak into every output file
    target = tmp_path / "f.jsonl"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    os.chmod(target, 0o640)
    atomic_write_text(target, "y")  # an existing file keeps its mode
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    pq_path = write_records(tmp_path / "c.parquet", [])
    assert stat.S_IMODE(pq_path.stat().st_mode) == 0o666 & ~umask


def test_write_records_jsonl_is_atomic_and_readable(tmp_path):
    convs = [Conversation(id=str(i), messages=[Message(role="user", content="q"),
                                               Message(role="assistant", content="a")]) for i in range(3)]
    path = write_records(tmp_path / "c.jsonl", convs)
    assert [obj["id"] for _, obj in iter_jsonl(path)] == ["0", "1", "2"]
    assert "meta" in path.read_text()  # defaults are written; None values are not
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- resumable shards

def rec(i: int) -> dict:
    return {"key": f"k{i:03d}", "value": i}


def all_rows(directory):
    return [obj for shard in sorted(directory.glob("part-*.jsonl")) for _, obj in iter_jsonl(shard)]


def test_sharded_writer_resumes_after_a_crash(tmp_path):
    d = tmp_path / "shards"
    w = ShardedWriter(d, shard_size=10, key=lambda r: r["key"])
    for i in range(25):
        w.add(rec(i))
    # 20 records are in two complete shards, 5 are buffered; "crash": drop the writer without flush
    assert len(w.shards()) == 2
    for i in range(25, 28):
        w.add(rec(i))
    del w

    w2 = ShardedWriter(d, shard_size=10, key=lambda r: r["key"])
    assert w2.done_keys() == {f"k{i:03d}" for i in range(20)}
    with w2:
        for i in range(40):
            r = rec(i)
            if r["key"] not in w2.done_keys():
                w2.add(r)
    rows = all_rows(d)
    assert sorted(r["key"] for r in rows) == [f"k{i:03d}" for i in range(40)]  # each exactly once
    assert [p.name for p in w2.shards()] == [f"part-{i:05d}.jsonl" for i in range(4)]
    assert leftovers(d) == []


def test_sharded_writer_removes_leftover_temp_shard(tmp_path):
    d = tmp_path / "shards"
    with ShardedWriter(d, shard_size=2) as w:
        for i in range(4):
            w.add(rec(i))
    tmp = d / ".part-00002.jsonl.abc123.tmp"  # what an interrupted atomic write leaves
    tmp.write_text('{"key": "half"')
    other = d / ".other-00000.jsonl.x.tmp"  # another writer's temp file is not ours to remove
    other.write_text("")
    w2 = ShardedWriter(d, shard_size=2, key=lambda r: r["key"])
    assert not tmp.exists()
    assert other.exists()
    assert w2.done_keys() == {"k000", "k001", "k002", "k003"}


def test_sharded_writer_does_not_overwrite_after_a_gap(tmp_path):
    # regression: the next shard number was the count of shards, so a gap made it overwrite the last one
    d = tmp_path / "shards"
    with ShardedWriter(d, shard_size=1) as w:
        for i in range(3):
            w.add(rec(i))
    (d / "part-00001.jsonl").unlink()
    with ShardedWriter(d, shard_size=1) as w:
        w.add(rec(9))
    assert sorted(r["key"] for r in all_rows(d)) == ["k000", "k002", "k009"]
    assert (d / "part-00003.jsonl").exists()


def test_sharded_writer_rejects_duplicate_keys(tmp_path):
    w = ShardedWriter(tmp_path, shard_size=5, key=lambda r: r["key"])
    w.add(rec(1))
    with pytest.raises(AssertionError, match="duplicate record key"):
        w.add(rec(1))


def test_sharded_writer_accepts_models_and_custom_names(tmp_path):
    conv = Conversation(id="a", messages=[Message(role="user", content="q"), Message(role="assistant", content="a")])
    with ShardedWriter(tmp_path, name="convs", shard_size=100, key=lambda r: r["id"]) as w:
        w.add(conv)
    assert [p.name for p in w.shards()] == ["convs-00000.jsonl"]
    assert ShardedWriter(tmp_path, name="convs", key=lambda r: r["id"]).done_keys() == {"a"}
    assert ShardedWriter(tmp_path, name="other").shards() == []


def test_sharded_writer_exit_on_error_does_not_flush(tmp_path):
    with pytest.raises(RuntimeError), ShardedWriter(tmp_path, shard_size=10) as w:
        w.add(rec(0))
        raise RuntimeError("stage failed")
    assert w.shards() == []


# --------------------------------------------------------------------------- manifests and fingerprints

def test_manifest_write_and_read(tmp_path):
    assert read_manifest(tmp_path) is None
    path = write_manifest(tmp_path, status="complete", counts={"kept": 3}, config={"lr": 1e-5})
    assert path == tmp_path / "manifest.json"
    m = read_manifest(tmp_path)
    assert m["status"] == "complete" and m["counts"] == {"kept": 3} and m["config"] == {"lr": 1e-5}
    assert "written_at" in m and "alignline" in m["versions"]
    assert leftovers(tmp_path) == []


def test_corrupt_manifest_reads_as_absent(tmp_path):
    (tmp_path / "manifest.json").write_text('{"status": "compl')
    assert read_manifest(tmp_path) is None


def test_fingerprint_of_a_directory_changes_with_its_files(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("one\n")
    (d / "sub" / "b.jsonl").write_text("two\n")
    first = fingerprint(d)
    assert fingerprint(d) == first  # stable
    (d / "sub" / "b.jsonl").write_text("two!\n")
    changed = fingerprint(d)
    assert changed != first
    (d / "sub" / "b.jsonl").write_text("two\n")
    assert fingerprint(d) == first  # content-based, not time-based
    (d / "sub" / "b.jsonl").rename(d / "sub" / "c.jsonl")
    assert fingerprint(d) != first  # names count
    (d / "new.txt").write_text("")
    assert fingerprint(d) not in (first, changed)


def test_fingerprint_of_a_file_and_of_configs(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    one = fingerprint(f)
    assert fingerprint(str(f)) == one
    f.write_bytes(b"abd")
    assert fingerprint(f) != one
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_a_stage_directory_is_read_without_its_side_files(tmp_path):
    """annotate writes pairs-00000.jsonl next to judge_cache.jsonl and failures.jsonl; reading the directory as
    pairs must take the shard only (1 pair), not fail on the cache's {key, output} lines."""
    from alignline.data.io import read_pairs

    pair = {"id": "p1", "prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    (tmp_path / "pairs-00000.jsonl").write_text(json.dumps(pair) + "\n")
    (tmp_path / "judge_cache.jsonl").write_text(json.dumps({"key": "k", "output": "Verdict: [[A]]"}) + "\n")
    (tmp_path / "failures.jsonl").write_text(json.dumps({"prompt_id": "p2", "reason": "no verdict"}) + "\n")
    assert [p.id for p in read_pairs(tmp_path)] == ["p1"]
