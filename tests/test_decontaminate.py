"""Decontamination: word n-gram overlap with benchmark prompts (alignline.data.decontaminate) and ``prepare``
dropping, counting and listing the training conversations that overlap."""

from __future__ import annotations

import json
import sys

import pytest

from alignline.config import load_config
from alignline.data import benchmarks
from alignline.data.decontaminate import (
    BenchmarkPrompt,
    OverlapIndex,
    read_benchmark_prompts,
    resolve_benchmark,
)
from alignline.errors import ConfigError, DataError
from alignline.stages import prepare

# 12 words: "the quick brown fox jumps over the lazy dog near the river"
BENCH = "The quick brown fox jumps over the lazy dog near the river."


def index_of(*texts: str, n: int = 4, threshold: float = 0.5) -> OverlapIndex:
    return OverlapIndex([BenchmarkPrompt("b", "b.jsonl", i + 1, t) for i, t in enumerate(texts)], n, threshold)


def test_an_exact_copy_matches_whatever_its_case_and_punctuation():
    """All 9 4-grams of the 12-word prompt occur in the copy: 12 / 12 words covered."""
    match = index_of(BENCH).match("THE quick, brown fox -- jumps over the lazy dog near the river!!")
    assert match is not None and match.overlap == 1.0 and match.prompt.where == "b.jsonl:1"


def test_overlap_is_the_share_of_the_prompt_words_covered_by_shared_ngrams():
    """n = 4, 12-word prompt. One shared 4-gram ("jumps over the lazy", words 4-7) covers 4 / 12 = 0.33 < 0.5:
    kept. Words 0-5 ("the quick brown fox jumps over": 4-grams starting at 0, 1, 2) cover 6 / 12 = 0.5: a match
    at the threshold. Two disjoint shared 4-grams (words 0-3 and 8-11) cover 8 / 12 = 0.67."""
    index = index_of(BENCH)
    assert index.match("a cat jumps over the lazy mouse every day") is None
    at_threshold = index.match("so the quick brown fox jumps over a sleepy cat")
    assert at_threshold is not None and at_threshold.overlap == pytest.approx(6 / 12)
    two = index.match("the quick brown fox slept while a dog near the river barked")
    assert two is not None and two.overlap == pytest.approx(8 / 12)
    assert index_of(BENCH, threshold=0.7).match("the quick brown fox slept while a dog near the river barked") is None


def test_a_paraphrase_below_the_threshold_is_kept():
    """Same content, other words: no 4-gram of the prompt survives, nothing is covered."""
    assert index_of(BENCH).match("A fast brown fox leaps over a sleepy dog by the river.") is None


def test_a_prompt_shorter_than_n_words_matches_only_an_exact_copy():
    """"Say hello." has 2 < 4 words, so no 4-gram: only a turn of exactly its words matches (overlap 1);
    a longer turn containing it does not, and neither does a turn shorter than n that is another text."""
    index = index_of("Say hello.", BENCH)
    assert index.short_prompts == 1
    exact = index.match("say HELLO!")
    assert exact is not None and exact.overlap == 1.0 and exact.prompt.line == 1
    assert index.match("Say hello to my friend Bob, he is nice.") is None
    assert index.match("say goodbye") is None


def test_the_best_prompt_is_reported_and_ties_go_to_the_earlier_line():
    """Two copies of the prompt (lines 2 and 3) both fully covered: line 2 is reported; an unrelated prompt on
    line 1 does not change the result, and a text covering more of line 3's prompt reports line 3."""
    index = index_of("Completely unrelated words about cooking pasta at home tonight.", BENCH, BENCH)
    assert index.match(BENCH).prompt.line == 2
    other = index_of(BENCH, "The quick brown fox jumps over the lazy cat in the garden today.")
    assert other.match("the quick brown fox jumps over the lazy cat in the garden today").prompt.line == 2


def test_benchmark_files_ifeval_records_and_alignline_prompts(tmp_path):
    """IFEval's layout (a `prompt` string) gives one prompt per line; an alignline Prompt gives each user turn;
    a record with neither is an error naming file, line and field."""
    ifeval = tmp_path / "input_data.jsonl"
    ifeval.write_text(json.dumps({"key": 1000, "prompt": BENCH, "instruction_id_list": []}) + "\n")
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "messages": [
        {"role": "user", "content": "first turn"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second turn"}]}) + "\n")
    assert [(p.where, p.text) for p in read_benchmark_prompts(ifeval, "ifeval")] == [(f"{ifeval}:1", BENCH)]
    assert [p.text for p in resolve_benchmark(str(prompts))] == ["first turn", "second turn"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "no prompt field"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2, field 'prompt'"):
        read_benchmark_prompts(bad, "bad")


def test_benchmarks_by_name_or_path(tmp_path, monkeypatch):
    """A name of the installed-benchmark registry (data/benchmarks.py, as ``ifeval``) resolves to its file; an
    unknown name that is not a file is a config error saying what to give."""
    f = tmp_path / "input_data.jsonl"
    f.write_text(json.dumps({"prompt": BENCH}) + "\n")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setitem(benchmarks.BENCHMARKS, "toy", benchmarks.InstalledBenchmark("input_data.jsonl", "-", "toy"))
    assert [p.benchmark for p in resolve_benchmark("toy")] == ["toy"]
    with pytest.raises(ConfigError, match="not a file"):
        resolve_benchmark(str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------ prepare

IFEVAL_LIKE = ("Write a 300+ word summary of the wikipedia page about the history of the printing press. "
               "Do not use any commas.")  # 21 words


def conv(cid: str, *user_turns: str) -> dict:
    messages = []
    for text in user_turns:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": f"answer to {cid}"}]
    return {"id": cid, "messages": messages}


CONVERSATIONS = [
    conv("copy", IFEVAL_LIKE.upper()),
    conv("paraphrase", "Could you summarise how the printing press came about, without using commas?"),
    conv("second-turn", "Hello there, how are you today?",
         # the first 16 of the prompt's 21 words inside a longer turn: 16 / 21 = 0.76 >= 0.5
         "Please write a 300 word summary of the Wikipedia page about the history of the printing press, thanks"),
    conv("short-copy", "say hello"),
    conv("short-inside", "Say hello to my friend Bob please, he is nice"),
    *(conv(f"clean{i}", f"Tell me something interesting about the number {i} and its history in mathematics")
      for i in range(7)),
]


def run_prepare(tmp_path, name: str, bench_file, splits: str):
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    cfg = load_config(prepare.PrepareConfig, None, [
        "source=conversations", f"path={data}", "tokenizer=null", f"output_dir={tmp_path / name}",
        f"splits={splits}", f"decontaminate.benchmarks=[{bench_file}]"])
    return prepare.run(cfg)


def test_prepare_drops_counts_and_lists_overlapping_conversations(tmp_path):
    """Defaults n = 8, threshold 0.5. Dropped: the upper-cased copy (21 / 21), the second user turn (message 2)
    holding 16 of the 21 words (16 / 21 = 0.76), and the exact copy of the 2-word prompt. Kept: the paraphrase
    (no shared 8-gram) and the turn that only contains "say hello". The 7 clean conversations are kept; every
    split (conversations and prompts alike) is decontaminated, and the drops are counted per split."""
    bench = tmp_path / "input_data.jsonl"
    bench.write_text(json.dumps({"key": 1, "prompt": IFEVAL_LIKE}) + "\n" + json.dumps({"key": 2, "prompt": "Say hello."})
                     + "\n")
    out = run_prepare(tmp_path, "p", bench, "{sft: {fraction: 0.5, kind: conversations}, "
                                            "pairs: {fraction: 0.5, kind: prompts}}")
    summary = json.loads((out / "summary.json").read_text())
    deco = summary["decontamination"]
    assert (deco["ngram"], deco["threshold"], deco["splits"]) == (8, 0.5, "all")
    assert deco["benchmarks"] == [{"benchmark": str(bench), "file": str(bench), "prompts": 2, "shorter_than_ngram": 1}]
    by_id = {d["id"]: d for d in deco["dropped"]}
    assert set(by_id) == {"copy", "second-turn", "short-copy"}
    assert (by_id["copy"]["turn"], by_id["copy"]["overlap"], by_id["copy"]["benchmark_prompt"]) == (0, 1.0, f"{bench}:1")
    assert (by_id["second-turn"]["turn"], by_id["second-turn"]["overlap"]) == (2, round(16 / 21, 4))
    assert by_id["short-copy"]["benchmark_prompt"] == f"{bench}:2"
    counts = summary["counts"]
    per_split = {s: counts.get(f"{s}:decontaminated", 0) for s in ("sft", "pairs")}
    assert sum(per_split.values()) == 3
    assert per_split == {s: sum(d["split"] == s for d in deco["dropped"]) for s in per_split}
    kept = {json.loads(line)["id"] for line in (out / "sft.jsonl").read_text().splitlines()}
    kept |= {json.loads(line)["meta"]["conversation_id"] for line in (out / "pairs.jsonl").read_text().splitlines()}
    assert kept == {c["id"] for c in CONVERSATIONS} - set(by_id)
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"benchmark:{bench}" in manifest["input_fingerprints"]


def test_prepare_decontamination_is_deterministic(tmp_path):
    """Two runs into two directories: the same drops in the same order and byte-identical split files."""
    bench = tmp_path / "input_data.jsonl"
    bench.write_text(json.dumps({"prompt": IFEVAL_LIKE}) + "\n")
    splits = "{all: {fraction: 1.0, kind: prompts}}"
    a, b = run_prepare(tmp_path, "a", bench, splits), run_prepare(tmp_path, "b", bench, splits)
    drops = [json.loads((d / "summary.json").read_text())["decontamination"]["dropped"] for d in (a, b)]
    assert drops[0] == drops[1] and [d["id"] for d in drops[0]] == ["copy", "second-turn"]
    assert (a / "all.jsonl").read_bytes() == (b / "all.jsonl").read_bytes()
