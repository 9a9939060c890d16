"""``alignline eval verifiable``: IFEval-style accuracy on held-out prompts with verifiable instructions.

Prompts carry ``meta["instructions"]`` (``alignline prepare`` with ``instructions.splits``); the model's
responses come from a Response file or are generated now (see :mod:`alignline.evaluate.winrate`,
"Systems"). Every response is checked by :func:`alignline.judges.verifiable.verify` in strict and loose
mode (the modes are defined there) and the results are aggregated by
:func:`alignline.judges.verifiable.aggregate` into IFEval's four numbers:

* prompt-level strict / loose: the fraction of prompts whose response follows *all* its instructions;
* instruction-level strict / loose: the fraction of all instructions (over all prompts) followed;

plus per-instruction-type accuracy and counts. A response that failed at its engine (``status`` failed)
is checked as the empty text, which follows no instruction in either mode: it stays in every
denominator and counts as not followed, and the failures are counted and listed. Writes
``results.json``, ``verifications.jsonl`` (one line per prompt: instruction ids and per-mode booleans),
``manifest.json``, and prints a table.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydantic import Field
from rich.table import Table

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import atomic_write_bytes, atomic_write_json, jsonl_bytes, read_prompts
from alignline.errors import DataError
from alignline.evaluate import winrate as wr
from alignline.generate.engines import build_engine
from alignline.judges.verifiable import aggregate, verify
from alignline.stages.common import RunDir, console, prompts_located

METRICS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")


class VerifiableConfig(Section):
    """Configuration of ``alignline eval verifiable``."""

    prompts: RecordsSource
    """Held-out prompts with meta.instructions (``prepare`` with ``instructions.splits``)."""
    model: wr.SystemSettings = Field(default_factory=wr.SystemSettings)
    """The evaluated system: model.responses (a Response file) or model.model (+ engine settings) to generate."""
    output_dir: str = "runs/eval_verifiable"
    """results.json, verifications.jsonl, generated responses, manifest.json."""
    max_prompts: int | None = Field(None, gt=0)
    """Only the first this many prompts."""


def check_responses(prompts, responses, prompts_path: str) -> tuple[list, list[dict], list[str]]:
    """(strict, loose) results, per-prompt records and the ids of failed responses."""
    results, rows, failed = [], [], []
    for p in prompts:
        r = responses[p.id]
        ok = r.status == "ok"
        if not ok:
            failed.append(p.id)
        text = r.text if ok else ""  # a failed response follows nothing (verify: blank text never follows)
        try:
            strict = verify(text, p.meta["instructions"], "strict")
            loose = verify(text, p.meta["instructions"], "loose")
        except DataError as exc:
            raise DataError(f"prompt '{p.id}' has malformed meta.instructions: {exc}", path=prompts_path,
                            field="meta.instructions") from None
        results.append((strict, loose))
        rows.append({"prompt_id": p.id, "status": r.status, "instructions": strict.ids,
                     "strict": strict.followed, "loose": loose.followed})
    return results, rows, failed


def print_table(res: dict) -> None:
    table = Table(title=f"verifiable instructions: {res['model']} ({res['n_prompts']} prompts, "
                        f"{res['n_instructions']} instructions, {res['failed_responses']} failed responses)")
    for col in ("metric", "strict %", "loose %", "n"):
        table.add_column(col)
    table.add_row("prompt level", f"{100 * res['prompt_level_strict']:.1f}", f"{100 * res['prompt_level_loose']:.1f}",
                  str(res["n_prompts"]))
    table.add_row("instruction level", f"{100 * res['instruction_level_strict']:.1f}",
                  f"{100 * res['instruction_level_loose']:.1f}", str(res["n_instructions"]))
    for name, row in res["per_type"].items():
        table.add_row(f"  {name}", f"{100 * row['strict']:.1f}", f"{100 * row['loose']:.1f}", str(row["n"]))
    console.print(table)


def run(cfg: VerifiableConfig) -> Path:
    rd = RunDir("eval_verifiable", cfg, cfg.output_dir, {"prompts": cfg.prompts, "responses": cfg.model.responses,
                                                         "model": cfg.model.model})
    if rd.skip_if_done():
        return rd.path
    wr.check_system(cfg.model, "model")
    rd.start()
    all_prompts = read_prompts(cfg.prompts, required=True)
    prompts = all_prompts[: cfg.max_prompts]
    bare = [p.id for p in prompts if not p.meta.get("instructions")]
    if bare:
        raise DataError(f"{len(bare)} prompt(s) have no verifiable instructions: {', '.join(bare[:8])}",
                        path=cfg.prompts, field="meta.instructions",
                        expected="held-out prompts from prepare with instructions.splits naming their split")
    # the module-level build_engine is looked up now, so a test can replace it
    with prompts_located(cfg.prompts):  # a prompt too long for the generating model: its file:line
        responses, name = wr.system_responses(cfg.model, "model", prompts, {p.id for p in all_prompts}, rd.path,
                                              build_engine)
    results, rows, failed = check_responses(prompts, responses, cfg.prompts)
    res = {"model": name, **aggregate(results), "failed_responses": len(failed), "failed_prompt_ids": failed,
           "failed_counted_as": "not followed"}
    atomic_write_bytes(rd.path / "verifications.jsonl", jsonl_bytes(rows, ensure_ascii=True))
    atomic_write_json(rd.path / "results.json", res)
    rd.finish(Counter(prompts=res["n_prompts"], instructions=res["n_instructions"], failed_responses=len(failed)),
              results={k: res[k] for k in METRICS})
    print_table(res)
    console.print(f"[green]eval verifiable done[/green]: {rd.path / 'results.json'}")
    return rd.path
