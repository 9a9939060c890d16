"""``alignline eval winrate``: pairwise win rate of a model against a reference, raw and length-controlled.

Both systems' outputs come from Response files (``alignline sample``) or are generated now. An ``llm``
judge (any engine: in-process hf or an OpenAI-compatible server) compares them with this project's
pairwise template in both orders; the outcome rule (win 1 / tie 0.5 / loss 0, parse failures counted and
excluded), the standard error and the length-controlled win rate (AlpacaEval 2.0 style logistic fit) are
documented in :mod:`alignline.evaluate.winrate`. Judge outputs are cached in ``judge_cache.jsonl``: a
rerun makes zero judge calls and does not even load the judge.

Writes ``results.json``, ``judgments.jsonl`` (one line per prompt: both orders, raw outputs, votes or
failure reasons, lengths), ``alpaca_eval/{model,reference}_outputs.json`` (AlpacaEval's input format) and
``manifest.json``, and prints a table.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field
from rich.table import Table

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import atomic_write_json, read_prompts, write_records
from alignline.data.records import Prompt, Rating, Response
from alignline.evaluate import winrate as wr
from alignline.generate.base import SamplingParams
from alignline.generate.engines import EngineSettings, LazyEngine, build_engine
from alignline.judges.cache import JudgeCache, ask_judge
from alignline.judges.pairwise import PAIRWISE_VERSION, diagnose_pairwise, pairwise_prompt, parse_pairwise
from alignline.stages.common import RunDir, check_failures, console, prompts_located


def default_judge_sampling() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=384)


class WinrateJudge(EngineSettings):
    """The judge: a chat model behind an engine, asked with this project's pairwise template."""

    type: Literal["llm"] = "llm"
    """llm: a chat model with the pairwise template and its pure parser (the only kind for win rates)."""
    sampling: SamplingParams = Field(default_factory=default_judge_sampling)
    """Judge sampling (default greedy, 384 new tokens)."""
    batch_size: int = Field(8, gt=0)
    """Judge prompts per engine call."""


class WinrateConfig(Section):
    """Configuration of ``alignline eval winrate``."""

    prompts: RecordsSource
    """Held-out prompt records (each ends with a user turn)."""
    model: wr.SystemSettings = Field(default_factory=wr.SystemSettings)
    """The evaluated system: model.responses (a Response file) or model.model (+ engine settings) to generate."""
    reference: wr.SystemSettings = Field(default_factory=wr.SystemSettings)
    """The reference system, set the same way; it must answer every evaluated prompt."""
    judge: WinrateJudge
    """The llm judge: judge.model, judge.engine (hf or openai), judge.openai, judge.sampling."""
    output_dir: str = "runs/eval_winrate"
    """results.json, judgments.jsonl, judge_cache.jsonl, alpaca_eval/, generated responses, manifest.json."""
    tie_degrees: list[Rating] = Field(default_factory=lambda: ["unsure"])
    """Verdict degrees that count as a tie vote (e.g. [unsure, negligibly]); [] makes every verdict decisive."""
    lc_l2: float = Field(1e-3, ge=0)
    """L2 penalty of the length-controlled logistic fit (keeps it finite on separable outcomes)."""
    max_prompts: int | None = Field(None, gt=0)
    """Only the first this many prompts."""
    max_failure_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """The run ends failed (exit 2, results.json and judgments.jsonl written) when more than this fraction of the
    prompts got no outcome (a judge call failed in either order, or its output did not parse); a rerun asks the
    judge again only for the calls that failed (the cache keeps every answer)."""


OUTCOME_NAMES = {1.0: "win", 0.5: "tie", 0.0: "loss"}


def judge_orders(outputs: list[str | None], tie_degrees: list[str], counts: Counter) -> tuple[list[dict], list]:
    """Per order (model shown as A, then as B): a record, and the votes (None for a failed order)."""
    records, votes = [], []
    for raw, position in zip(outputs, ("A", "B")):
        rec: dict = {"model_shown_as": position}
        vote = None
        if raw is None:
            rec["failure"] = "the judge call failed at the engine (a rerun retries it)"
            counts["judge_call_failures"] += 1
        else:
            verdict = parse_pairwise(raw)
            if verdict is None:
                rec["failure"] = diagnose_pairwise(raw)
                counts["judge_parse_failures"] += 1
            else:
                vote = wr.order_vote(verdict, position, tie_degrees)
                rec.update(winner=verdict.winner, degree=verdict.degree, vote=vote, reason=verdict.reason)
            rec["output"] = raw[:4000]
        records.append(rec)
        votes.append(vote)
    return records, votes


def print_table(res: dict) -> None:
    def pct(v):
        return "-" if v is None else f"{v:.1f}"

    table = Table(title=f"win rate vs {res['reference']} (judge {res['judge']})")
    for col in ("model", "win rate", "± se", "LC win rate", "wins", "ties", "losses", "failures", "chars (m/ref)"):
        table.add_column(col)
    chars = res["mean_chars"]
    table.add_row(res["model"], pct(res["win_rate"]), pct(res["win_rate_se"]), pct(res["lc_win_rate"]),
                  str(res["wins"]), str(res["ties"]), str(res["losses"]),
                  f"{res['judge_failures']} ({pct(res['judge_failure_rate'])}%)",
                  f"{chars['model']:.0f}/{chars['reference']:.0f}" if chars["model"] is not None else "-")
    console.print(table)


def pair_rows(prompts: list[Prompt], model_rs: dict[str, Response], ref_rs: dict[str, Response],
              counts: Counter) -> tuple[list[dict], list[tuple[Prompt, dict]]]:
    """One judgments row per prompt, and the (prompt, row) of the prompts where both systems answered (a failed
    response is counted per side and never judged)."""
    rows: list[dict] = []
    jobs = []
    for p in prompts:
        m, r = model_rs[p.id], ref_rs[p.id]
        row = {"prompt_id": p.id, "model_chars": len(m.text), "reference_chars": len(r.text)}
        rows.append(row)
        bad = [side for side, x in (("model", m), ("reference", r)) if x.status != "ok"]
        if bad:
            row.update(outcome="response_failed", failed=bad)
            for side in bad:
                counts[f"{side}_response_failures"] += 1
            continue
        jobs.append((p, row))
    return rows, jobs


def ask_both_orders(cfg: WinrateConfig, jobs: list[tuple[Prompt, dict]], model_rs: dict[str, Response],
                    ref_rs: dict[str, Response], cache_path: Path, counts: Counter) -> tuple[str, list[str | None]]:
    """(judge id, the judge's outputs: per job the model shown as A, then as B); cached calls are not made."""
    texts = [t for p, _ in jobs for t in (pairwise_prompt(p.messages, model_rs[p.id].text, ref_rs[p.id].text),
                                          pairwise_prompt(p.messages, ref_rs[p.id].text, model_rs[p.id].text))]
    judge_settings = EngineSettings.model_validate(cfg.judge.model_dump(include=set(EngineSettings.model_fields)))
    judge_id = f"llm:{cfg.judge.engine}:{cfg.judge.model}"
    with JudgeCache(cache_path) as cache:
        outputs, calls = ask_judge(LazyEngine(judge_settings, build=build_engine), texts, cfg.judge.sampling, cache,
                                   judge_id=judge_id, template_version=PAIRWISE_VERSION,
                                   batch_size=cfg.judge.batch_size)
    counts["judge_calls"] = calls
    return judge_id, outputs


def prompt_outcomes(jobs: list[tuple[Prompt, dict]], outputs: list[str | None], tie_degrees: list[str],
                    counts: Counter) -> tuple[list[float], list[int], list[str]]:
    """(outcome of each judged prompt, its length difference model - reference, ids of prompts with a failed
    order); each job's row gets its orders and outcome."""
    outcomes, diffs, failed_ids = [], [], []
    for k, (p, row) in enumerate(jobs):
        orders, votes = judge_orders(outputs[2 * k: 2 * k + 2], tie_degrees, counts)
        row["orders"] = orders
        if any(v is None for v in votes):
            row["outcome"] = "failure"  # counted and excluded, never a score
            failed_ids.append(p.id)
            continue
        y = wr.prompt_outcome(votes)
        row.update(outcome=OUTCOME_NAMES[y], score=y)
        outcomes.append(y)
        diffs.append(row["model_chars"] - row["reference_chars"])
    return outcomes, diffs, failed_ids


def write_alpaca_eval(export: Path, prompts: list[Prompt], model_rs: dict[str, Response], model_name: str,
                      ref_rs: dict[str, Response], ref_name: str) -> None:
    """Both systems' outputs on ``prompts`` in AlpacaEval's input format."""
    atomic_write_json(export / "model_outputs.json", wr.alpaca_eval_records(
        prompts, {p.id: model_rs[p.id].text for p in prompts}, model_name))
    atomic_write_json(export / "reference_outputs.json", wr.alpaca_eval_records(
        prompts, {p.id: ref_rs[p.id].text for p in prompts}, ref_name))


def run(cfg: WinrateConfig) -> Path:
    rd = RunDir("eval_winrate", cfg, cfg.output_dir, {
        "prompts": cfg.prompts, "model_responses": cfg.model.responses, "model": cfg.model.model,
        "reference_responses": cfg.reference.responses, "reference": cfg.reference.model,
        "judge_model": cfg.judge.model})
    if rd.skip_if_done():
        return rd.path
    wr.check_system(cfg.model, "model")
    wr.check_system(cfg.reference, "reference")
    rd.start()
    all_prompts = read_prompts(cfg.prompts, required=True)
    prompts = all_prompts[: cfg.max_prompts]
    known = {p.id for p in all_prompts}
    # the module-level build_engine is looked up now, so a test can replace it
    with prompts_located(cfg.prompts):  # a prompt too long for a generating system: its file:line
        model_rs, model_name = wr.system_responses(cfg.model, "model", prompts, known, rd.path, build_engine)
        ref_rs, ref_name = wr.system_responses(cfg.reference, "reference", prompts, known, rd.path, build_engine)

    counts: Counter = Counter(prompts=len(prompts))
    rows, jobs = pair_rows(prompts, model_rs, ref_rs, counts)
    judge_id, outputs = ask_both_orders(cfg, jobs, model_rs, ref_rs, rd.path / "judge_cache.jsonl", counts)
    outcomes, diffs, failed_ids = prompt_outcomes(jobs, outputs, list(cfg.tie_degrees), counts)
    rate, se = wr.win_rate(outcomes)
    fit = wr.fit_length_model(outcomes, diffs, lam=cfg.lc_l2)
    judged = [row for row in rows if "score" in row]
    res = {
        "model": model_name, "reference": ref_name, "judge": judge_id, "template": PAIRWISE_VERSION,
        "tie_degrees": list(cfg.tie_degrees), "length_unit": "characters",
        "prompts": len(prompts), "judged": len(outcomes),
        "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0),
        "judge_failures": len(failed_ids),
        "judge_failure_rate": 100 * len(failed_ids) / len(jobs) if jobs else None,
        "failed_prompt_ids": failed_ids,
        "response_failures": {"model": counts["model_response_failures"],
                              "reference": counts["reference_response_failures"]},
        "win_rate": rate, "win_rate_se": se,
        "lc_win_rate": fit.lc_win_rate if fit else None,
        "length_model": fit.as_dict() if fit else None,
        "mean_chars": {side: (sum(r[f"{side}_chars"] for r in judged) / len(judged) if judged else None)
                       for side in ("model", "reference")},
    }
    write_records(rd.path / "judgments.jsonl", rows)
    export = rd.path / "alpaca_eval"
    write_alpaca_eval(export, [p for p, _ in jobs], model_rs, model_name, ref_rs, ref_name)
    atomic_write_json(rd.path / "results.json", res)
    counts.update(wins=res["wins"], ties=res["ties"], losses=res["losses"], judge_failures=len(failed_ids))
    check_failures("eval winrate", len(failed_ids), len(jobs), cfg.max_failure_fraction, "judged prompts",
                   rd.path / "judgments.jsonl")
    rd.finish(counts, results=res)
    print_table(res)
    if fit is not None and fit.separable:
        console.print("[yellow]warning[/yellow]: wins and losses are separated by length alone (or all prompts "
                      "went one way); the LC win rate is not meaningful on these outcomes")
    console.print(f"[green]eval winrate done[/green]: {rd.path / 'results.json'}\n  AlpacaEval: alpaca_eval "
                  f"--model_outputs {export / 'model_outputs.json'} --reference_outputs "
                  f"{export / 'reference_outputs.json'}")
    return rd.path
