"""``alignline eval ifeval``: the IFEval benchmark (Zhou et al. 2023) with its official checker and semantics.

The prompts are IFEval's own 541 (``benchmark: ifeval``, installed offline by ``make setup``) or any JSONL
file in IFEval's layout; ``max_prompts`` takes a seeded subset: the prompts with the smallest
``sha256(seed, key)``, kept in file order, so every policy evaluated with the same seed gets the same prompts,
whatever the file's order. Responses come from a model (any engine; generated through ``alignline sample``:
greedy by default, resumable shards written atomically) or from a responses file (alignline Response records
whose prompt_id is the benchmark key, or IFEval's own ``{"prompt", "response"}`` layout). Each response is
checked by Google's instruction classes with IFEval's strict and loose semantics
(:mod:`alignline.evaluate.ifeval`); a response that failed at its engine is checked as the empty text, which
follows nothing, and is counted.

Writes ``prompts.jsonl`` (the subset as Prompt records), ``responses/`` (when generating), ``verdicts.jsonl``
(one line per prompt: its instruction ids, strict and loose verdicts, words, status), ``results.json`` (the
four rates with standard errors, per instruction type, answer words, failures and, with ``compare_to``, the
paired differences from another eval.ifeval run on the same prompts; :mod:`alignline.evaluate.clustered`)
and ``manifest.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pydantic import Field, model_validator
from rich.table import Table

from alignline.data.io import (
    atomic_write_bytes,
    atomic_write_json,
    iter_jsonl,
    jsonl_bytes,
    read_records,
    write_records,
)
from alignline.data.records import Message, Prompt, Response
from alignline.errors import DataError
from alignline.evaluate import clustered
from alignline.evaluate import ifeval as bench
from alignline.evaluate import winrate as wr
from alignline.generate.base import SamplingParams
from alignline.stages.common import RunDir, console, seeded_digest

METRICS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")
VERDICTS = "verdicts.jsonl"


def default_ifeval_sampling() -> SamplingParams:
    """Greedy, 1280 new tokens: lm-evaluation-harness's IFEval setting (CPU runs lower it)."""
    return SamplingParams(temperature=0.0, max_new_tokens=1280)


class IFEvalConfig(wr.SystemSettings):
    """Configuration of ``alignline eval ifeval``: the system (model + engine settings, or responses), then these."""

    responses: str | None = None
    """Instead of model: existing responses, Response records (a file or a sample shard directory; prompt_id =
    the benchmark key, the first ok response per prompt) or IFEval's {"prompt", "response"} JSONL layout."""
    sampling: SamplingParams = Field(default_factory=default_ifeval_sampling)
    """Sampling when generating (default greedy, 1280 new tokens as lm-evaluation-harness; 256-512 on a CPU)."""
    benchmark: str = "ifeval"
    """An installed benchmark's name (ifeval: the 541 official prompts) or the path of a JSONL file in IFEval's
    layout (key, prompt, instruction_id_list, kwargs) whose instruction ids the checker knows."""
    max_prompts: int | None = Field(None, gt=0)
    """A seeded subset of this many prompts (null: all)."""
    seed: int = Field(0, ge=0)
    """Seed of the subset: the same seed gives every policy the same prompts."""
    compare_to: str | None = None
    """Another eval.ifeval run directory on the same prompts: paired differences (this minus that) with SEs."""
    prompts_per_shard: int = Field(16, gt=0)
    """Generating: prompts per response shard (the unit that survives a kill)."""
    output_dir: str = "runs/eval_ifeval"
    """prompts.jsonl, responses/, verdicts.jsonl, results.json, manifest.json."""

    @model_validator(mode="after")
    def _one_system(self) -> IFEvalConfig:
        if (self.model is None) == (self.responses is None):
            raise ValueError("set exactly one of model=... (answer now with engine=hf or openai) and responses=FILE "
                             f"(answers already made); {'both are' if self.model else 'neither is'} set")
        if self.compare_to is not None and Path(self.compare_to).resolve() == Path(self.output_dir).resolve():
            raise ValueError("compare_to names this run's own output_dir; give another eval.ifeval run directory")
        return self


def select_items(items: list[bench.BenchmarkItem], max_prompts: int | None, seed: int) -> list[bench.BenchmarkItem]:
    """The ``max_prompts`` items with the smallest ``seeded_digest(seed, key)``, in file order (all when None):
    the same subset however the file is ordered."""
    if max_prompts is None or max_prompts >= len(items):
        return list(items)
    chosen = set(sorted((i.prompt_id for i in items), key=lambda pid: seeded_digest(seed, pid))[:max_prompts])
    return [i for i in items if i.prompt_id in chosen]


def as_prompts(items: list[bench.BenchmarkItem]) -> list[Prompt]:
    """One single-turn Prompt per item, id = the benchmark key (no system message: IFEval has none)."""
    return [Prompt(id=i.prompt_id, messages=[Message(role="user", content=i.prompt)],
                   meta={"benchmark_key": i.key, "instruction_id_list": list(i.instruction_ids)}) for i in items]


def _official_layout(by_text: dict[str, str | None], source: str):
    """An adapter of IFEval's ``{"prompt", "response"}`` records into Response records (prompt matched by text)."""
    def adapt(obj: dict) -> dict:
        if "prompt_id" in obj or not {"prompt", "response"} <= set(obj):
            return obj
        if by_text.get(obj["prompt"]) is None:
            why = "is in the benchmark twice" if obj["prompt"] in by_text else "is not in the benchmark"
            raise DataError(f"a response to a prompt that {why}", field="prompt", found=repr(str(obj["prompt"])[:60]),
                            expected="IFEval's input_response_data layout for this benchmark's distinct prompts "
                            "(else Response records with prompt_id = the key)")
        return {"prompt_id": by_text[obj["prompt"]], "sample_idx": 0, "text": obj["response"], "source": source}
    return adapt


def get_responses(cfg: IFEvalConfig, everything: list[bench.BenchmarkItem], prompts: list[Prompt],
                  prompts_file: Path, rd: RunDir) -> tuple[dict[str, Response], str]:
    """(one response per prompt, the system's name): read from ``cfg.responses`` or generated now."""
    from alignline.stages import sample

    known = {i.prompt_id for i in everything}
    if cfg.responses is not None:
        texts = Counter(i.prompt for i in everything)
        by_text = {i.prompt: i.prompt_id if texts[i.prompt] == 1 else None for i in everything}
        adapt = _official_layout(by_text, cfg.name or Path(cfg.responses).stem)
        responses = read_records(cfg.responses, Response, adapt)
        return wr.pick_responses(prompts, responses, cfg.responses, known, "model"), wr.system_name(cfg, responses)
    out = sample.run(sample.SampleConfig(
        prompts=str(prompts_file), model=cfg.model, engine=cfg.engine, openai=cfg.openai, dtype=cfg.dtype,
        max_batch=cfg.max_batch, trust_remote_code=cfg.trust_remote_code, decode_step=cfg.decode_step,
        n=1, sampling=cfg.sampling, source=cfg.name, prompts_per_shard=cfg.prompts_per_shard,
        output_dir=str(rd.path / "responses")))
    responses = read_records(out, Response)
    return wr.pick_responses(prompts, responses, str(out), known, "model"), wr.system_name(cfg, responses)


def check_all(items: list[bench.BenchmarkItem], responses: dict[str, Response]) -> list[dict]:
    """One verdict row per item (failed responses checked as the empty text)."""
    registry = bench.instruction_registry()
    rows = []
    for item in items:
        r = responses[item.prompt_id]
        text = r.text if r.status == "ok" else ""
        strict, loose = bench.check_response(item, text, registry)
        rows.append({"key": item.key, "prompt_id": item.prompt_id, "status": r.status,
                     "finish_reason": r.finish_reason, "instruction_id_list": list(item.instruction_ids),
                     "strict": strict, "loose": loose, "words": len(text.split())})
    return rows


def rates(rows: list[dict]) -> dict:
    """The four rates with their standard errors (flat: ``<metric>`` and ``<metric>_se``)."""
    out = {}
    for mode in ("strict", "loose"):
        verdicts = [r[mode] for r in rows]
        for level, estimate in (("prompt_level", clustered.prompt_level(verdicts)),
                                ("instruction_level", clustered.instruction_level(verdicts))):
            out[f"{level}_{mode}"], out[f"{level}_{mode}_se"] = estimate.value, estimate.se
    return out


def read_verdicts(run_dir: Path) -> tuple[dict, dict[str, dict]]:
    """(results.json, verdict rows by prompt id) of an eval.ifeval run directory."""
    results_path, verdicts_path = run_dir / "results.json", run_dir / VERDICTS
    if not results_path.is_file() or not verdicts_path.is_file():
        raise DataError("not a finished eval.ifeval run (no results.json and verdicts.jsonl)", path=str(run_dir),
                        expected="the output_dir of an eval.ifeval run on the same prompts")
    rows = {str(r["prompt_id"]): r for _, r in iter_jsonl(verdicts_path)}
    return json.loads(results_path.read_text(encoding="utf-8")), rows


def paired_comparison(rows: list[dict], other_dir: Path, sha256: str | None) -> dict:
    """This run minus the run in ``other_dir`` on the same prompts: per metric the difference, its paired SE
    (instruction level: per instruction, clustered by prompt; prompt level: per prompt) and whether it lies
    beyond 2 SE. DataError when the two runs are not of the same prompts and instructions."""
    other_results, other = read_verdicts(other_dir)
    fix = "evaluate both with the same benchmark, max_prompts and seed"
    if other_results.get("benchmark", {}).get("sha256") != sha256:
        raise DataError("compare_to is a run of another benchmark file", path=str(other_dir / "results.json"),
                        field="benchmark.sha256", expected=f"{sha256} ({fix})",
                        found=str(other_results.get("benchmark", {}).get("sha256")))
    mine = [r["prompt_id"] for r in rows]
    if set(mine) != set(other) or any(other[r["prompt_id"]]["instruction_id_list"] != r["instruction_id_list"]
                                      for r in rows):
        raise DataError(f"compare_to holds other prompts ({len(other)} there, {len(mine)} here, "
                        f"{len(set(mine) & set(other))} in common)", path=str(other_dir / VERDICTS),
                        expected=f"the same prompts with the same instructions ({fix})")
    out = {"run": str(other_dir), "model": other_results.get("model"), "n_prompts": len(rows),
           "n_instructions": sum(len(r["strict"]) for r in rows)}
    for mode in ("strict", "loose"):
        a, b = [r[mode] for r in rows], [other[r["prompt_id"]][mode] for r in rows]
        for level, estimate in (("prompt_level", clustered.paired_prompt_level(a, b)),
                                ("instruction_level", clustered.paired_instruction_level(a, b))):
            beyond = estimate.se is not None and abs(estimate.value) > 2 * estimate.se
            out[f"{level}_{mode}"] = {"difference": estimate.value, "se": estimate.se, "beyond_2se": beyond}
    return out


def summarise(name: str, path: Path, everything: list[bench.BenchmarkItem], items: list[bench.BenchmarkItem],
              rows: list[dict], cfg: IFEvalConfig) -> dict:
    failed = [r["prompt_id"] for r in rows if r["status"] != "ok"]
    ok_words = [r["words"] for r in rows if r["status"] == "ok"]
    return {
        "model": name, **rates(rows), "n_prompts": len(rows), "n_instructions": sum(len(r["strict"]) for r in rows),
        "per_type": bench.per_type(items, [r["strict"] for r in rows], [r["loose"] for r in rows]),
        "mean_answer_words": sum(ok_words) / len(ok_words) if ok_words else None,
        "responses_cut_by_token_limit": sum(r["finish_reason"] == "length" for r in rows),
        "failed_responses": len(failed), "failed_prompt_ids": failed, "failed_counted_as": "not followed",
        "benchmark": {"name": cfg.benchmark, "path": str(path), "sha256": bench.file_sha256(path),
                      "prompts_in_file": len(everything)},
        "subset": {"max_prompts": cfg.max_prompts, "seed": cfg.seed}, "checker": bench.checker_versions(),
        "sampling": cfg.sampling.model_dump(mode="json") if cfg.responses is None else None,
    }


def _pct(x: float | None, se: float | None = None, sign: bool = False) -> str:
    if x is None:
        return "-"
    text = f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"
    return text + (f" +- {100 * se:.1f}" if se is not None else "")


def print_table(res: dict) -> None:
    table = Table(title=f"IFEval: {res['model']} ({res['n_prompts']} prompts, {res['n_instructions']} instructions,"
                        f" {res['failed_responses']} failed responses; +- SE, in %)")
    for col in ("metric", "strict %", "loose %", "n"):
        table.add_column(col)
    for level, n in (("prompt_level", res["n_prompts"]), ("instruction_level", res["n_instructions"])):
        table.add_row(level.replace("_", " "), _pct(res[f"{level}_strict"], res[f"{level}_strict_se"]),
                      _pct(res[f"{level}_loose"], res[f"{level}_loose_se"]), str(n))
    for name, row in res["per_type"].items():
        table.add_row(f"  {name}", _pct(row["strict"]), _pct(row["loose"]), str(row["n"]))
    console.print(table)
    cmp = res.get("compare_to")
    if cmp:
        for metric in METRICS:
            d = cmp[metric]
            console.print(f"  vs {cmp['model']}: {metric.replace('_', ' ')} {_pct(d['difference'], d['se'], True)}"
                          f" paired SE{' (beyond 2 SE)' if d['beyond_2se'] else ''}")


def run(cfg: IFEvalConfig) -> Path:
    path = bench.benchmark_path(cfg.benchmark)
    other = Path(cfg.compare_to) if cfg.compare_to else None
    rd = RunDir("eval_ifeval", cfg, cfg.output_dir, {
        "benchmark": path, "responses": cfg.responses, "model": cfg.model,
        "compare_to": other / VERDICTS if other is not None else None})
    if rd.skip_if_done():
        return rd.path
    rd.start()
    everything = bench.load_benchmark(path)
    items = select_items(everything, cfg.max_prompts, cfg.seed)
    prompts = as_prompts(items)
    prompts_file = write_records(rd.path / "prompts.jsonl", prompts)
    responses, name = get_responses(cfg, everything, prompts, prompts_file, rd)
    rows = check_all(items, responses)
    res = summarise(name, path, everything, items, rows, cfg)
    res["compare_to"] = paired_comparison(rows, other, res["benchmark"]["sha256"]) if other is not None else None
    atomic_write_bytes(rd.path / VERDICTS, jsonl_bytes(rows, ensure_ascii=True))
    atomic_write_json(rd.path / "results.json", res)
    rd.finish(Counter(prompts=res["n_prompts"], instructions=res["n_instructions"],
                      failed_responses=res["failed_responses"]), results={k: res[k] for k in METRICS})
    print_table(res)
    console.print(f"[green]eval ifeval done[/green]: {rd.path / 'results.json'}")
    return rd.path
