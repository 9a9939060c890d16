"""eval ifeval: the stage on a small benchmark file of our own prompts (IFEval's layout): rates and paired
differences by hand, a tiny-model run, seeded subsets, resumption after an interruption, bad comparisons."""

from __future__ import annotations

import json
import random

import pytest

from alignline.config import load_config
from alignline.data.io import iter_jsonl, read_records, write_records
from alignline.data.records import Response
from alignline.errors import ConfigError, DataError
from alignline.evaluate import ifeval as bench
from alignline.stages import eval_ifeval

BENCH = [
    {"key": 1, "prompt": "Describe a rainy day without using commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Write a short shopping note in lowercase letters only.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 3, "prompt": "Give your poem a title in double angular brackets and end it with 'That is all.'",
     "instruction_id_list": ["detectable_format:title", "startend:end_checker"],
     "kwargs": [{}, {"end_phrase": "That is all."}]},
    {"key": 4, "prompt": "Answer with exactly two markdown bullet points.",
     "instruction_id_list": ["detectable_format:number_bullet_lists"], "kwargs": [{"num_bullets": 2}]},
]
TEXTS_A = {1: "It rained all day and the streets shone under the lamps.",
           2: "Note:\nplease buy milk and eggs from the shop on the way home today",
           3: "<<Rain>>\nIt rained on the roofs. That is all.",
           4: "* one\n* two"}
TEXTS_B = {1: "Yes, it rained.", 2: "this answer is written in lowercase letters from the start to the end",
           4: "* one"}


def write_bench(tmp_path, rows=BENCH):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(tmp_path, out, *extra):
    return load_config(eval_ifeval.IFEvalConfig, None, [f"benchmark={tmp_path / 'bench.jsonl'}",
                                                        f"output_dir={tmp_path / out}", *extra])


def responses_a_official_layout(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": TEXTS_A[r["key"]]}) + "\n" for r in BENCH))
    return path


def responses_b_records(tmp_path):
    rows = [Response(prompt_id=str(k), sample_idx=0, text=t, source="b") for k, t in TEXTS_B.items()]
    rows.append(Response(prompt_id="3", sample_idx=0, text="", source="b", status="failed", error="HTTP 500"))
    return write_records(tmp_path / "b.jsonl", rows)


def test_rates_per_type_and_paired_differences_by_hand(tmp_path):
    """A (IFEval's {"prompt", "response"} layout), strict | loose per prompt: 1 no_comma T | T; 2 lowercase:
    the first line "Note:" has a capital: F | T (loose drops it); 3 title, end "That is all.": T T | T T;
    4 two bullets: T | T. Prompt level strict 3/4, loose 4/4; instruction level strict 4/5, loose 5/5.
    B (Response records): 1 has a comma F; 2 T; 3 failed at its engine: F F, counted; 4 one bullet F: prompt
    level 1/4, instruction level 1/5, loose the same.
    A - B, strict, instruction level: per-prompt differences D = (1, -1, 2, 1), m = (1, 1, 2, 1), mean 3/5 = 0.6,
    residuals D - 0.6 m = (0.4, -1.6, 0.8, 0.4), squares sum 3.52, SE = sqrt(4/3 * 3.52) / 5 = 0.433282.
    Prompt level: d = (1, -1, 1, 1), mean 0.5, sd(ddof=1) = 1, SE = 1 / sqrt(4) = 0.5: not beyond 2 SE."""
    write_bench(tmp_path)
    b_dir = eval_ifeval.run(cfg(tmp_path, "b", f"responses={responses_b_records(tmp_path)}"))
    b = json.loads((b_dir / "results.json").read_text())
    assert (b["prompt_level_strict"], b["instruction_level_strict"], b["instruction_level_loose"]) == (0.25, 0.2, 0.2)
    assert b["failed_responses"] == 1 and b["failed_prompt_ids"] == ["3"]

    a_dir = eval_ifeval.run(cfg(tmp_path, "a", f"responses={responses_a_official_layout(tmp_path)}",
                                f"compare_to={b_dir}"))
    a = json.loads((a_dir / "results.json").read_text())
    assert (a["prompt_level_strict"], a["prompt_level_loose"]) == (0.75, 1.0)
    assert (a["instruction_level_strict"], a["instruction_level_loose"]) == (0.8, 1.0)
    assert (a["n_prompts"], a["n_instructions"], a["failed_responses"]) == (4, 5, 0)
    assert a["per_type"]["change_case:english_lowercase"] == {"n": 1, "strict": 0.0, "loose": 1.0,
                                                             "strict_followed": 0, "loose_followed": 1}
    assert a["per_type"]["startend:end_checker"]["strict"] == 1.0
    verdicts = [row for _, row in iter_jsonl(a_dir / "verdicts.jsonl")]
    assert [v["strict"] for v in verdicts] == [[True], [False], [True, True], [True]]
    diff = a["compare_to"]
    assert diff["instruction_level_strict"]["difference"] == pytest.approx(0.6)
    assert diff["instruction_level_strict"]["se"] == pytest.approx((4 / 3 * 3.52) ** 0.5 / 5)
    assert diff["prompt_level_strict"] == {"difference": 0.5, "se": 0.5, "beyond_2se": False}
    assert diff["instruction_level_loose"]["difference"] == pytest.approx(0.8)


def test_subset_is_seeded_and_order_free():
    """The same seed picks the same prompts however the file is ordered, keeps file order, and another seed
    picks others (fixed sha256 draws: this does not depend on chance)."""
    items = [bench.BenchmarkItem(k, f"p{k}", ("punctuation:no_comma",), ({},)) for k in range(1000, 1050)]
    shuffled = items[:]
    random.Random(3).shuffle(shuffled)
    first = eval_ifeval.select_items(items, 10, seed=0)
    assert len(first) == 10 and first == sorted(first, key=lambda i: i.key)
    assert {i.key for i in eval_ifeval.select_items(shuffled, 10, seed=0)} == {i.key for i in first}
    assert {i.key for i in eval_ifeval.select_items(items, 10, seed=1)} != {i.key for i in first}
    assert eval_ifeval.select_items(items, 50, seed=0) == items and eval_ifeval.select_items(items, None, 0) == items


def test_tiny_model_end_to_end(tmp_path, tiny_model_dir):
    """A tiny random model answers a seeded subset of 3 of the 4 prompts (greedy, 6 tokens); every prompt gets
    one verdict per instruction and a rerun has nothing to do."""
    write_bench(tmp_path)
    args = [f"model={tiny_model_dir}", "max_prompts=3", "seed=5", "sampling.max_new_tokens=6", "prompts_per_shard=2"]
    out = eval_ifeval.run(cfg(tmp_path, "tiny", *args))
    res = json.loads((out / "results.json").read_text())
    chosen = [i.key for i in eval_ifeval.select_items(bench.load_benchmark(tmp_path / "bench.jsonl"), 3, 5)]
    verdicts = [row for _, row in iter_jsonl(out / "verdicts.jsonl")]
    assert [v["key"] for v in verdicts] == chosen
    assert all(len(v["strict"]) == len(v["instruction_id_list"]) == len(v["loose"]) for v in verdicts)
    assert res["n_prompts"] == 3 and res["sampling"]["max_new_tokens"] == 6 and res["sampling"]["temperature"] == 0
    assert sorted(r.prompt_id for r in read_records(out / "responses", Response)) == sorted(map(str, chosen))
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    before = (out / "results.json").stat().st_mtime_ns
    eval_ifeval.run(cfg(tmp_path, "tiny", *args))
    assert (out / "results.json").stat().st_mtime_ns == before


class ScriptedEngine:
    """Answers "answer <id>"; raises on call number ``fail_on`` (an interruption mid-run)."""

    def __init__(self, calls: list, fail_on: int | None = None):
        self.calls, self.fail_on = calls, fail_on

    def generate(self, prompts, n, sampling):
        self.calls.append([p.id for p in prompts])
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("killed")
        return [[Response(prompt_id=p.id, sample_idx=0, text=f"answer {p.id}", source="scripted")] for p in prompts]


def test_resume_after_interruption_without_duplicates(tmp_path, monkeypatch):
    """Shards of one prompt: the first run writes prompts 1 and 2, then dies on 3. The rerun generates only 3
    and 4, and the responses hold each prompt once."""
    from alignline.stages import sample

    write_bench(tmp_path)
    calls: list = []
    monkeypatch.setattr(sample, "build_engine", lambda settings, device=None: ScriptedEngine(calls, fail_on=3))
    args = ["model=scripted", "engine=openai", "prompts_per_shard=1"]
    with pytest.raises(RuntimeError, match="killed"):
        eval_ifeval.run(cfg(tmp_path, "resume", *args))
    assert calls == [["1"], ["2"], ["3"]]
    calls.clear()
    monkeypatch.setattr(sample, "build_engine", lambda settings, device=None: ScriptedEngine(calls))
    out = eval_ifeval.run(cfg(tmp_path, "resume", *args))
    assert calls == [["3"], ["4"]]
    ids = [r.prompt_id for r in read_records(out / "responses", Response)]
    assert sorted(ids) == ["1", "2", "3", "4"]
    assert json.loads((out / "results.json").read_text())["n_prompts"] == 4


def test_compare_to_other_prompts_is_refused(tmp_path):
    write_bench(tmp_path)
    b_dir = eval_ifeval.run(cfg(tmp_path, "b", f"responses={responses_b_records(tmp_path)}", "max_prompts=2"))
    with pytest.raises(DataError, match="same benchmark, max_prompts and seed"):
        eval_ifeval.run(cfg(tmp_path, "a", f"responses={responses_a_official_layout(tmp_path)}",
                            f"compare_to={b_dir}"))
    with pytest.raises(DataError, match="not a finished eval.ifeval run"):
        eval_ifeval.run(cfg(tmp_path, "c", f"responses={responses_a_official_layout(tmp_path)}",
                            f"compare_to={tmp_path}"))


def test_official_layout_response_to_an_unknown_prompt(tmp_path):
    write_bench(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": BENCH[0]["prompt"], "response": "x"}) + "\n"
                   + json.dumps({"prompt": "Not a benchmark prompt.", "response": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2.*is not in the benchmark"):
        eval_ifeval.run(cfg(tmp_path, "bad", f"responses={bad}"))


def test_cli_overrides_of_the_documented_command(tmp_path):
    """`alignline eval ifeval model=... max_prompts=200 sampling.max_new_tokens=320` parses; the defaults are
    greedy on the installed benchmark."""
    c = load_config(eval_ifeval.IFEvalConfig, None, ["model=smollm2-135m-instruct", "max_prompts=200",
                                                     "sampling.max_new_tokens=320"])
    assert (c.model, c.max_prompts, c.sampling.max_new_tokens, c.sampling.temperature) == (
        "smollm2-135m-instruct", 200, 320, 0.0)
    assert c.benchmark == "ifeval" and c.seed == 0
    with pytest.raises(ConfigError, match="exactly one of model"):
        load_config(eval_ifeval.IFEvalConfig, None, ["model=m", "responses=r.jsonl"])
    with pytest.raises(ConfigError, match="exactly one of model"):
        load_config(eval_ifeval.IFEvalConfig, None, [])
