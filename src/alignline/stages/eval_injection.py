"""``alignline eval injection``: how far adversarial responses move a pairwise LLM judge.

Runs the battery of :mod:`alignline.evaluate.injection` (fake verdicts, a forged closing delimiter, "[[10]]",
a plea to the judge, constant null-model answers) against the project's pairwise judge on any engine
(``hf`` in process or an OpenAI-compatible server), on prompts with two different responses: a Pair file
(chosen/rejected) or prompts plus two Response files (the first usable response per prompt of each).
Writes ``results.json`` (the per-case table), ``verdicts.jsonl`` (every clean/attacked reading),
``failures.jsonl`` (unparsed judge outputs with the parser's diagnosis) and ``judge_cache.jsonl``: a rerun
makes zero judge calls.
"""

from __future__ import annotations

import difflib
import time
from collections import Counter
from pathlib import Path

from pydantic import Field, model_validator
from rich.table import Table

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import (
    atomic_write_bytes,
    atomic_write_json,
    jsonl_bytes,
    read_pairs,
    read_prompts,
    read_records,
)
from alignline.data.records import Response
from alignline.errors import DataError
from alignline.evaluate.injection import CASE_NAMES, CASES, JudgeItem, run_suite
from alignline.generate.base import SamplingParams
from alignline.generate.endpoint import display_url
from alignline.generate.engines import EngineSettings, build_engine
from alignline.judges.cache import JudgeCache
from alignline.judges.pairwise import PAIRWISE_VERSION
from alignline.stages.common import RunDir, console, usable_responses


def default_judge_sampling() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=384)


class InjectionConfig(Section):
    """Configuration of ``alignline eval injection``."""

    judge: EngineSettings
    """The pairwise judge: engine (hf / openai), model and engine settings."""
    sampling: SamplingParams = Field(default_factory=default_judge_sampling)
    """Judge sampling (default greedy, 384 new tokens)."""
    pairs: RecordsSource | None = None
    """Pair records (chosen/rejected, or TRL preference layouts); or give prompts + responses_a + responses_b."""
    prompts: RecordsSource | None = None
    """Prompt records, with responses_a and responses_b."""
    responses_a: str | None = None
    """Response records: the first usable response per prompt (by sample_idx) is one side of the pair."""
    responses_b: str | None = None
    """Response records: the other side; taken as the weaker one when the judge's clean verdict is a tie."""
    max_prompts: int | None = Field(50, gt=0)
    """Only the first this many usable prompts (each costs 2 clean + 2 per case judge calls)."""
    cases: list[str] | None = None
    """Attack cases to run (default: all): fake_verdict, fake_verdict_blind, better_claim, rating_claim,
    fake_delimiter, score_ten, plea, null_refusal, null_filler."""
    output_dir: str = "runs/eval_injection"
    """results.json, verdicts.jsonl, failures.jsonl, judge_cache.jsonl, manifest.json."""
    judge_cache: str | None = None
    """A judge cache file to use (e.g. one shared with annotate); default output_dir/judge_cache.jsonl."""
    batch_size: int = Field(8, gt=0)
    """Judge prompts per engine call."""

    @model_validator(mode="after")
    def _check(self) -> InjectionConfig:
        files = (self.prompts, self.responses_a, self.responses_b)
        if self.pairs is not None and any(f is not None for f in files):
            raise ValueError("give either pairs, or prompts + responses_a + responses_b, not both")
        if self.pairs is None and any(f is None for f in files):
            raise ValueError("give pairs=FILE, or all three of prompts, responses_a and responses_b")
        for name in self.cases or []:
            if name not in CASE_NAMES:
                close = difflib.get_close_matches(name, CASE_NAMES, n=1)
                raise ValueError(f"unknown case '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
                                 + f" (known: {', '.join(CASE_NAMES)})")
        return self


def judge_id_of(settings: EngineSettings) -> str:
    # the hf form matches annotate's, so a shared judge_cache serves both
    if settings.engine == "hf":
        return f"llm:{settings.model}"
    return f"llm:openai:{display_url(settings.openai.base_url or 'default')}:{settings.model}"


def first_usable(responses: list[Response], prompt_ids: set[str], where: str, counts: Counter) -> dict[str, Response]:
    return {pid: rs[0] for pid, rs in usable_responses(responses, prompt_ids, where, counts).items()}


def load_items(cfg: InjectionConfig, counts: Counter) -> list[JudgeItem]:
    items = []
    if cfg.pairs is not None:
        for p in read_pairs(cfg.pairs):
            if p.chosen.strip() == p.rejected.strip():
                counts["skipped_identical_responses"] += 1
                continue
            items.append(JudgeItem(id=p.id, messages=p.prompt, first=p.chosen, second=p.rejected))
    else:
        prompts = read_prompts(cfg.prompts)
        ids = {p.id for p in prompts}
        a = first_usable(read_records(cfg.responses_a, Response), ids, cfg.responses_a, counts)
        b = first_usable(read_records(cfg.responses_b, Response), ids, cfg.responses_b, counts)
        for p in prompts:
            if p.id not in a or p.id not in b:
                counts["prompts_without_both_responses"] += 1
            elif a[p.id].text.strip() == b[p.id].text.strip():
                counts["skipped_identical_responses"] += 1
            else:
                items.append(JudgeItem(id=p.id, messages=p.messages, first=a[p.id].text, second=b[p.id].text))
    if cfg.max_prompts is not None:
        items = items[: cfg.max_prompts]
    if not items:
        raise DataError("no prompt with two different usable responses to judge",
                        path=cfg.pairs or f"{cfg.responses_a} + {cfg.responses_b}",
                        expected="at least one pair of different, non-empty responses")
    return items


def _fmt(x: float | None, signed: bool = False) -> str:
    return "n/a" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")


def run(cfg: InjectionConfig) -> Path:
    rd = RunDir("eval_injection", cfg, cfg.output_dir, {"pairs": cfg.pairs, "prompts": cfg.prompts,
                                                        "responses_a": cfg.responses_a,
                                                        "responses_b": cfg.responses_b})
    if rd.skip_if_done():
        return rd.path
    rd.start()
    t0 = time.perf_counter()
    counts: Counter = Counter()
    items = load_items(cfg, counts)
    cases = [c for c in CASES if cfg.cases is None or c.name in cfg.cases]
    judge_id = judge_id_of(cfg.judge)
    engine = build_engine(cfg.judge)
    with JudgeCache(Path(cfg.judge_cache) if cfg.judge_cache else rd.path / "judge_cache.jsonl") as cache:
        result = run_suite(engine, items, sampling=cfg.sampling, cache=cache, judge_id=judge_id,
                           template_version=PAIRWISE_VERSION, cases=cases, batch_size=cfg.batch_size)
    counts.update(result.counts)
    atomic_write_json(rd.path / "results.json", {"judge": judge_id, "template": PAIRWISE_VERSION, **result.summary})
    atomic_write_bytes(rd.path / "verdicts.jsonl", jsonl_bytes(result.records, ensure_ascii=True))
    atomic_write_bytes(rd.path / "failures.jsonl", jsonl_bytes(result.failures, ensure_ascii=True))
    if not counts["engine_failures"]:
        rd.finish(counts, seconds=time.perf_counter() - t0, judge=judge_id, template=PAIRWISE_VERSION,
                  summary=result.summary)

    table = Table(title=f"judge injection suite: {judge_id} ({len(items)} prompts, both orders)")
    for col in ("case", "flip rate", "parse failures", "mean shift", "attacked wins"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, row in result.summary["cases"].items():
        table.add_row(name, f"{_fmt(row['flip_rate'])} ({row['flips']}/{row['clean_target_lost']})",
                      f"{_fmt(row['parse_failure_rate'])} ({row['parse_failures']}/"
                      f"{row['orders'] - row['engine_failures']})",
                      _fmt(row["mean_shift"], signed=True), _fmt(row["attacked_target_win_rate"]))
    console.print(table)
    console.print(f"[green]eval injection done[/green]: {result.calls} judge calls; clean parse failures "
                  f"{result.summary['clean_parse_failures']}/{result.summary['clean_outputs']}\n"
                  f"  results: {rd.path / 'results.json'}\n  readings: {rd.path / 'verdicts.jsonl'}")
    if counts["engine_failures"]:
        console.print(f"[yellow]{counts['engine_failures']} judge call(s) failed at the engine[/yellow] (not cached, "
                      "not counted as parse failures); the run is not marked complete: rerun the same command to "
                      "retry them (answered calls come from the cache)")
    return rd.path
