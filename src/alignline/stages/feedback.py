"""``alignline feedback``: a scored-feedback dataset (TSO evaluation correction) from any judge.

Each usable response to a prompt becomes one :class:`~alignline.judges.evaluator.FeedbackRecord` per
criterion: ``{id, question, answer, criterion, evidence, score (2.0-10.0), source, meta}``, id
``<prompt id>/<sample idx>/<criterion>``. Judges:

* ``verifier``: one criterion (``verifier_criterion``); the score maps the fraction of the prompt's
  verifiable instructions followed linearly onto 2.0-10.0, the evidence says which passed and which failed.
* ``llm``: any engine (``judge.llm.engine``: hf or an OpenAI-compatible server) with this project's evaluator
  template, once per criterion. Outputs are cached in ``judge_cache.jsonl`` (a rerun makes zero calls); a
  parse failure goes to ``failures.jsonl`` with its reason and never becomes a record.

``corrections``: human-corrected records (same layout, matched by id) replace the judge's; a correction of
an item whose judge output failed to parse fills it in. A seeded ``eval_fraction`` of the questions (all of
a question's records together, so pairwise agreement can be measured) goes to ``feedback_eval.jsonl``, the
rest to ``feedback.jsonl``; ``alignline judge-sft feedback=<this run dir>`` reads both.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import read_prompts, read_records, write_records
from alignline.data.records import Prompt, Response
from alignline.errors import AlignlineError, ConfigError, DataError
from alignline.generate.base import SamplingParams
from alignline.generate.engines import EngineSettings, LazyEngine
from alignline.judges.cache import JudgeCache, ask_judge
from alignline.judges.evaluator import (
    DEFAULT_CRITERIA,
    EVALUATOR_VERSION,
    SCORE_MAX,
    SCORE_MIN,
    FeedbackRecord,
    diagnose_evaluation,
    distinct_criteria,
    evaluator_prompt,
    parse_evaluation,
    question_key,
)
from alignline.stages.common import RunDir, check_failures, console, iter_usable, seeded_digest

TRAIN_FILE, EVAL_FILE, FAILURES_FILE = "feedback.jsonl", "feedback_eval.jsonl", "failures.jsonl"


def default_evaluator_sampling() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=512)


class FeedbackJudge(Section):
    """Which judge writes the feedback."""

    type: Literal["verifier", "llm"] = "verifier"
    """verifier: verifiable-instruction checks (prompts need meta.instructions); llm: a chat model as evaluator."""
    llm: EngineSettings | None = None
    """llm: the evaluator's engine (engine hf|openai, model, openai settings, dtype, max_batch)."""
    sampling: SamplingParams = Field(default_factory=default_evaluator_sampling)
    """llm: evaluator sampling (default greedy, 512 new tokens)."""
    batch_size: int = Field(8, gt=0)
    """llm: evaluator prompts per engine call."""


class FeedbackConfig(Section):
    """Configuration of ``alignline feedback``."""

    prompts: RecordsSource
    """Prompt records the responses answer (for the verifier: with meta.instructions)."""
    responses: str
    """Response records (prompt_id, sample_idx, text, source, ...); failed or empty ones are skipped (counted)."""
    output_dir: str = "runs/feedback"
    """feedback.jsonl, feedback_eval.jsonl, failures.jsonl, judge_cache.jsonl, manifest.json."""
    judge: FeedbackJudge = Field(default_factory=FeedbackJudge)
    """The judge."""
    criteria: list[str] = Field(default_factory=lambda: list(DEFAULT_CRITERIA))
    """llm: the criteria each response is evaluated on (one evaluator call each)."""
    verifier_criterion: str = "instruction_following"
    """verifier: the criterion name its records carry."""
    corrections: str | None = None
    """Human-corrected feedback records (same layout); each replaces the judge's record with the same id."""
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of the questions (with all their records) held out in feedback_eval.jsonl."""
    seed: int = 0
    """Seed of the held-out split."""
    max_failure_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """The run ends failed (exit 2, its records and failures.jsonl written) when more than this fraction of the
    judged items got no score (an output that did not parse; a call that failed at the engine always stops it)."""

    _criteria = field_validator("criteria")(distinct_criteria)


def verifier_score(fraction: float) -> float:
    """Fraction of instructions followed (0..1) -> score (0 -> 2.0, 1 -> 10.0)."""
    return round(SCORE_MIN + (SCORE_MAX - SCORE_MIN) * fraction, 2)


def record_id(prompt_id: str, sample_idx: int, criterion: str) -> str:
    return f"{prompt_id}/{sample_idx}/{criterion}"


def _meta(prompt: Prompt, r: Response, judge: str) -> dict:
    return {"prompt_id": prompt.id, "sample_idx": r.sample_idx, "judge": judge}


def verifier_feedback(items: list[tuple[Prompt, Response]], criterion: str, counts: Counter) -> list[FeedbackRecord]:
    from alignline.judges.verifiable import VerifierJudge

    judge = VerifierJudge()
    out = []
    for prompt, r in items:
        res = judge.score_detail(prompt, r.text)
        texts = {i: (ins.get("text") or ins.get("id")) if isinstance(ins, dict) else str(ins)
                 for i, ins in enumerate(prompt.meta["instructions"])}
        passed = [f"{ins_id} ({texts[i]})" for i, (ins_id, ok) in enumerate(zip(res.ids, res.followed)) if ok]
        failed = [f"{ins_id} ({texts[i]})" for i, (ins_id, ok) in enumerate(zip(res.ids, res.followed)) if not ok]
        evidence = (f"{sum(res.followed)} of {len(res.followed)} instructions followed. "
                    f"Followed: {'; '.join(passed) or 'none'}. Not followed: {'; '.join(failed) or 'none'}.")
        out.append(FeedbackRecord(id=record_id(prompt.id, r.sample_idx, criterion), question=prompt.messages,
                                  answer=r.text, criterion=criterion, evidence=evidence,
                                  score=verifier_score(res.score), source=r.source,
                                  meta={**_meta(prompt, r, "verifier"), "fraction_followed": res.score}))
        counts["records"] += 1
    return out


def llm_feedback(items: list[tuple[Prompt, Response]], cfg: FeedbackConfig, cache_path: Path, counts: Counter,
                 failures: list[dict]) -> list[FeedbackRecord]:
    if cfg.judge.llm is None:
        raise ConfigError("judge.llm is required for judge.type=llm, e.g. judge.llm.model=PATH "
                          "(judge.llm.engine=openai judge.llm.model=NAME for a server)")
    judge_id = f"llm:{cfg.judge.llm.engine}:{cfg.judge.llm.model}"
    jobs = [(p, r, c) for p, r in items for c in cfg.criteria]
    texts = [evaluator_prompt(p.messages, r.text, c) for p, r, c in jobs]
    engine = LazyEngine(cfg.judge.llm)
    try:
        with JudgeCache(cache_path) as cache:
            outputs, calls = ask_judge(engine, texts, cfg.judge.sampling, cache, judge_id=judge_id,
                                       template_version=EVALUATOR_VERSION, batch_size=cfg.judge.batch_size)
    finally:
        engine.close()
    counts["judge_calls"] = calls
    out = []
    for (prompt, r, c), raw in zip(jobs, outputs):
        rid = record_id(prompt.id, r.sample_idx, c)
        if raw is None:
            counts["judge_call_failures"] += 1
            failures.append({"id": rid, "reason": "the judge call failed at the engine", "output": None})
            continue
        parsed = parse_evaluation(raw)
        if parsed is None:
            counts["judge_parse_failures"] += 1
            failures.append({"id": rid, "reason": diagnose_evaluation(raw), "output": raw[:2000]})
            continue
        out.append(FeedbackRecord(id=rid, question=prompt.messages, answer=r.text, criterion=c,
                                  evidence=parsed.evidence, score=parsed.score, source=r.source,
                                  meta={**_meta(prompt, r, judge_id), "template": EVALUATOR_VERSION}))
        counts["records"] += 1
    return out


def read_corrections(path: str) -> dict[str, FeedbackRecord]:
    out: dict[str, FeedbackRecord] = {}
    for rec in read_records(path, FeedbackRecord):
        if rec.id in out:
            raise DataError(f"two corrections share the id {rec.id!r}; keep one", path=path, field="id")
        out[rec.id] = rec
    return out


def apply_corrections(records: list[FeedbackRecord], corrections: dict[str, FeedbackRecord],
                      failed_ids: set[str], counts: Counter) -> list[FeedbackRecord]:
    """The judge's records with every correction of the same id in its place; a correction of an item the
    judge failed on is added; one that matches nothing is left out (counted)."""
    known = {r.id for r in records}
    out = [corrections.get(r.id, r) for r in records]
    counts["corrections_replaced"] = sum(r.id in corrections for r in records)
    filled = [c for cid, c in corrections.items() if cid not in known and cid in failed_ids]
    counts["corrections_filled"] = len(filled)
    counts["corrections_unmatched"] = sum(cid not in known and cid not in failed_ids for cid in corrections)
    return out + filled


def split_held_out(records: list[FeedbackRecord], fraction: float, seed: int):
    """(train, held out): whole questions are held out, round(fraction * questions) of them (at least one when
    fraction > 0 and there are 2+ questions), chosen by a seeded hash of the question."""
    keys = list(dict.fromkeys(question_key(r.question) for r in records))
    n_eval = round(fraction * len(keys))
    if fraction > 0 and len(keys) >= 2:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    ranked = sorted(keys, key=lambda k: seeded_digest(seed, k))
    held = set(ranked[:n_eval])
    train = [r for r in records if question_key(r.question) not in held]
    return train, [r for r in records if question_key(r.question) in held]


def run(cfg: FeedbackConfig) -> Path:
    judge_model = cfg.judge.llm.model if cfg.judge.type == "llm" and cfg.judge.llm and cfg.judge.llm.engine == "hf" \
        else None
    rd = RunDir("feedback", cfg, cfg.output_dir, {"prompts": cfg.prompts, "responses": cfg.responses,
                                                  "corrections": cfg.corrections, "judge_model": judge_model})
    if rd.skip_if_done():
        return rd.path
    rd.start()
    counts: Counter = Counter()
    corrections = read_corrections(cfg.corrections) if cfg.corrections else {}
    prompts = {p.id: p for p in read_prompts(cfg.prompts)}
    items = [(prompts[r.prompt_id], r)
             for r in iter_usable(read_records(cfg.responses, Response), prompts, cfg.responses, counts)]
    failures: list[dict] = []
    if cfg.judge.type == "verifier":
        records = verifier_feedback(items, cfg.verifier_criterion, counts)
    else:
        records = llm_feedback(items, cfg, rd.path / "judge_cache.jsonl", counts, failures)
    records = apply_corrections(records, corrections, {f["id"] for f in failures}, counts)
    train, held = split_held_out(records, cfg.eval_fraction, cfg.seed)
    counts["train_records"], counts["eval_records"] = len(train), len(held)
    write_records(rd.path / TRAIN_FILE, train)
    write_records(rd.path / EVAL_FILE, held)
    write_records(rd.path / FAILURES_FILE, failures)
    if counts["corrections_unmatched"]:
        console.print(f"[yellow]feedback: {counts['corrections_unmatched']} corrections in {cfg.corrections} match "
                      "no judged item (ids are <prompt id>/<sample idx>/<criterion>); left out[/yellow]")
    if counts["judge_call_failures"]:
        raise AlignlineError(f"{counts['judge_call_failures']} evaluator calls failed at the engine; run the same "
                             "command again to retry only those (the rest come from the cache)")
    check_failures("feedback", len(failures), len(items) * len(cfg.criteria) if cfg.judge.type == "llm" else 0,
                   cfg.max_failure_fraction, "judged items", rd.path / FAILURES_FILE)
    rd.finish(counts, template=EVALUATOR_VERSION, train=str(rd.path / TRAIN_FILE), eval=str(rd.path / EVAL_FILE))
    by_criterion = defaultdict(int)
    for r in records:
        by_criterion[r.criterion] += 1
    console.print(f"[green]feedback done[/green]: {dict(counts)}\n  records per criterion: {dict(by_criterion)}\n"
                  f"  train: {rd.path / TRAIN_FILE}\n  held out: {rd.path / EVAL_FILE}"
                  + (f"\n  parse failures: {rd.path / FAILURES_FILE}" if failures else ""))
    return rd.path
