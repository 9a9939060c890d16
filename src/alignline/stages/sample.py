"""``alignline sample``: N responses per prompt from a model (best-of-N pools, annotation pairs).

Engines: ``hf`` (in process; each prompt prefilled once and its cache reused for all N samples) or
``openai`` (any OpenAI-compatible server: OpenAI, vLLM, SGLang, llama.cpp). Every sample is seeded by
(run seed, prompt id, sample index), so a resumed run produces the same texts. Output shards hold whole
prompts (``prompts_per_shard`` x N responses each) and are written atomically: a run killed at any
point and rerun has no duplicate or missing (prompt_id, sample_idx). ``finish_reason: length`` marks a
response cut by ``sampling.max_new_tokens`` (counted in the manifest).

With ``matrix`` (a TSO model matrix, :mod:`alignline.matrix`) instead of ``model``, every member gets a
sub-directory ``<output_dir>/<member>/``: sampled members go through the same per-model path (own shards,
resume and manifest; ``source`` = ``name@version``; engine settings from the member, the other settings from
this config), members with a ``responses`` file are validated and copied (only the run's prompts), and
``human`` holds the prompts' references.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignline.config import Section, ShardSetting
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import (
    ShardedWriter,
    iter_jsonl,
    read_manifest,
    read_prompts,
    read_records,
    write_manifest,
    write_records,
)
from alignline.data.records import Prompt, Response
from alignline.errors import DataError
from alignline.generate.base import DecodeStep, SamplingParams
from alignline.generate.endpoint import OpenAIConnection
from alignline.generate.engines import EngineSettings, build_engine
from alignline.matrix import MatrixMember, human_responses, load_matrix
from alignline.stages.common import RunDir, console, prompts_located
from alignline.telemetry import Telemetry


class SampleConfig(Section):
    """Configuration of ``alignline sample``."""

    prompts: RecordsSource
    """Prompt records (each ends with a user turn)."""
    model: str | None = None
    """hf engine: a local HF dir, .gguf, alias or Hub id; openai engine: the served model name (or give matrix)."""
    matrix: str | None = None
    """A TSO model-matrix YAML instead of model: every member is sampled (or copied) into its own
    sub-directory; engine, openai, dtype, max_batch, trust_remote_code and decode_step then come from each member."""
    engine: Literal["hf", "openai"] = "hf"
    """hf: in process; openai: an OpenAI-compatible endpoint (settings below)."""
    openai: OpenAIConnection = Field(default_factory=OpenAIConnection)
    """openai engine settings: base_url, api_key_env, api_key, max_concurrency, max_retries, timeout_s, ... (a
    key, in api_key or as credentials in base_url, is used but never written to a file)."""
    output_dir: str = "runs/sample"
    """Where response shards and manifest.json go."""
    n: int = Field(2, ge=1)
    """Responses per prompt (Xwin-Pair: 2; best-of-N: up to 64)."""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    """Temperature, top-p, top-k, max_new_tokens, stop strings, seed."""
    source: str | None = None
    """Name recorded in each response's ``source`` (default: the model)."""
    max_prompts: int | None = None
    """Only the first this many prompts."""
    prompts_per_shard: int = Field(16, gt=0)
    """Prompts per output shard (a shard is the unit that survives a kill, and one call of the engine: with the
    hf engine, keep prompts_per_shard x n >= max_batch so the batch stays full)."""
    max_batch: int = Field(64, gt=0)
    """Samples generated together (hf: decode slots, refilled from the shard's queue as samples finish, each
    prompt prefilled once; openai: requests handed to the client at once, up to its max_concurrency). On a GPU
    raise prompts_per_shard with it."""
    shard: ShardSetting = None
    """'i/N': sample only prompts i, i+N, ... (several machines); null: all (or one share per process)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """hf: weights dtype."""
    trust_remote_code: bool = False
    """hf: allow model code from the checkpoint directory."""
    decode_step: DecodeStep = "live"
    """hf: live (default), static or graph (the decode step replayed as a CUDA graph; GPU only)."""

    @model_validator(mode="after")
    def _one_source(self) -> SampleConfig:
        """Checked with the config, so ``alignline run --dry-run`` sees it."""
        if (self.model is None) == (self.matrix is None):
            raise ValueError("sample needs exactly one of model=... (one model) or matrix=MATRIX.yaml (a TSO model "
                             "matrix)")
        return self


def make_engine(cfg: SampleConfig, device=None):
    return build_engine(EngineSettings(engine=cfg.engine, model=cfg.model, openai=cfg.openai, dtype=cfg.dtype,
                                       max_batch=cfg.max_batch, trust_remote_code=cfg.trust_remote_code,
                                       decode_step=cfg.decode_step),
                        device=device)


def _copy_member(m: MatrixMember, prompt_ids: set[str], out: Path) -> dict:
    """A member's pre-computed responses, validated, for the run's prompts only."""
    rows = read_records(m.responses, Response)
    seen: set = set()
    for r in rows:
        if (r.prompt_id, r.sample_idx) in seen:
            raise DataError(f"member '{m.name}': two responses with prompt_id '{r.prompt_id}' and sample_idx "
                            f"{r.sample_idx}", path=m.responses, field="sample_idx", expected="unique per prompt")
        seen.add((r.prompt_id, r.sample_idx))
    kept = [r for r in rows if r.prompt_id in prompt_ids]
    write_records(out / "responses.jsonl", kept)
    return {"responses": len(kept), "responses_for_other_prompts": len(rows) - len(kept),
            "prompts_without_response": len(prompt_ids - {r.prompt_id for r in kept}),
            "failed": sum(r.status == "failed" for r in kept)}


def _run_matrix(cfg: SampleConfig) -> Path:
    matrix = load_matrix(cfg.matrix)
    members = list(matrix.by_name().values())
    rd = RunDir("sample", cfg, cfg.output_dir, {
        "prompts": cfg.prompts, "matrix": cfg.matrix,
        **{f"member:{m.name}": m.responses or (m.engine.model if m.engine else None) for m in members}})
    if rd.skip_if_done():
        return rd.path
    rd.start()
    shared = cfg.model_dump(exclude={"matrix", "model", "engine", "openai", "dtype", "max_batch", "trust_remote_code",
                                     "decode_step", "output_dir", "source"})
    for m in members:
        if m.kind == "sampled":
            console.print(f"sample: member {m.source} ({m.size or 'size ?'}) from {m.engine.model}")
            run(SampleConfig.model_validate({**shared, **dict(m.engine), "source": m.source,
                                             "output_dir": str(rd.path / m.name)}))
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return rd.path
    prompts = read_prompts(cfg.prompts)[: cfg.max_prompts]
    summary: dict = {}
    for m in members:
        sub = rd.path / m.name
        if m.kind == "sampled":
            summary[m.name] = {"kind": m.kind, **(read_manifest(sub) or {}).get("counts", {})}
            continue
        sub.mkdir(parents=True, exist_ok=True)
        if m.kind == "human":
            rows = human_responses(m, prompts)
            write_records(sub / "responses.jsonl", rows)
            counts = {"responses": len(rows), "prompts_without_reference": len(prompts) - len(rows)}
        else:
            counts = _copy_member(m, {p.id for p in prompts}, sub)
        write_manifest(sub, stage="sample", status="complete", member=m.model_dump(mode="json"), counts=counts)
        summary[m.name] = {"kind": m.kind, **counts}
    rd.finish({"members": len(members), "prompts": len(prompts)}, members=summary)
    console.print(f"[green]sample done[/green] (matrix): {summary}\n  responses: {rd.path}/<member>/")
    return rd.path


def prompts_to_sample(prompts: list[Prompt], done: set, n: int) -> list[Prompt]:
    """The prompts whose ``n`` responses are not in the shards yet (a shard holds whole prompts)."""
    todo = [p for p in prompts if any((p.id, i) not in done for i in range(n))]
    partial = [p.id for p in todo if any((p.id, i) in done for i in range(n))]
    assert not partial, f"shards hold whole prompts, found partial prompts {partial[:3]}"
    return todo


def run(cfg: SampleConfig) -> Path:
    if cfg.matrix is not None:
        return _run_matrix(cfg)
    rd = RunDir("sample", cfg, cfg.output_dir, {"prompts": cfg.prompts, "model": cfg.model})
    if rd.skip_if_done():
        return rd.path
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    rd.start(state.wait_for_everyone)  # every process reads the old manifest before it is replaced
    index, total = map(int, cfg.shard.split("/")) if cfg.shard else (state.process_index, state.num_processes)
    prompts = read_prompts(cfg.prompts)[: cfg.max_prompts][index::total]
    writer = ShardedWriter(rd.path, name=f"responses-{index:03d}-of-{total:03d}",
                           shard_size=cfg.prompts_per_shard * cfg.n,
                           key=lambda o: (o["prompt_id"], o["sample_idx"]), fresh=rd.fresh)
    todo = prompts_to_sample(prompts, writer.done_keys(), cfg.n)
    engine = make_engine(cfg, device=state.device if cfg.engine == "hf" else None)
    if todo and hasattr(engine, "check_connection"):
        engine.check_connection()  # an unreachable server is an error now, not a run of failed records
    tokenizer = getattr(engine, "tokenizer", None)
    counts: Counter = Counter(resumed_prompts=len(prompts) - len(todo))
    t0, new_tokens = time.perf_counter(), 0
    # Batches never straddle a shard: a shard is written whole or not at all, so a resumed run starts at a shard
    # boundary and decodes every prompt with the same batch-mates as an uninterrupted run (the same rounding).
    groups = [todo[i: i + cfg.prompts_per_shard] for i in range(0, len(todo), cfg.prompts_per_shard)]
    bar = tqdm(total=len(todo), desc=f"sample n={cfg.n}", disable=not state.is_local_main_process,
               dynamic_ncols=True)
    tel = Telemetry(state.device if cfg.engine == "hf" else None)
    with writer, tel.phase("sample") as sample_phase, prompts_located(cfg.prompts):
        for group in (g for g in groups if g):
            for responses in engine.generate(group, cfg.n, cfg.sampling):
                for r in responses:
                    if cfg.source:
                        r.source = cfg.source
                    counts[f"finish_reason:{r.finish_reason}"] += 1
                    counts["failed"] += r.status == "failed"
                    if tokenizer is not None and r.status == "ok":
                        new_tokens += len(tokenizer(r.text, add_special_tokens=False)["input_ids"])
                    writer.add(r)
                counts["prompts"] += 1
            bar.update(len(group))
            dt = time.perf_counter() - t0
            bar.set_postfix(prompts_s=f"{counts['prompts'] / dt:.2f}", tok_s=f"{new_tokens / dt:.0f}")
    sample_phase["new_tokens"] = new_tokens
    state.wait_for_everyone()
    # counts describe the whole output (every process, and what earlier invocations wrote before a resume);
    # sampled_prompts and new_tokens are this invocation's work
    pattern = f"responses-{index:03d}-of-{total:03d}-*.jsonl" if cfg.shard else f"responses-*-of-{total:03d}-*.jsonl"
    shards = sorted(rd.path.glob(pattern))
    if state.is_main_process:
        counts = Counter(output_counts(shards), resumed_prompts=counts["resumed_prompts"],
                         sampled_prompts=counts["prompts"])
        rd.finish(counts, seconds=time.perf_counter() - t0, new_tokens=new_tokens, phases=tel.summary(),
                  shards=[str(p) for p in shards])
    console.print(f"[green]sample done[/green]: {dict(counts)}\n  responses: {rd.path}")
    return rd.path


def output_counts(shards: list[Path]) -> Counter:
    """prompts, responses, failed, responses_cut_by_token_limit and finish_reason:<reason> of response shards."""
    counts: Counter = Counter()
    prompts = set()
    for shard in shards:
        for _, obj in iter_jsonl(shard):
            prompts.add(obj["prompt_id"])
            counts["responses"] += 1
            counts["failed"] += obj.get("status") == "failed"
            counts[f"finish_reason:{obj.get('finish_reason')}"] += 1
    counts["prompts"] = len(prompts)
    counts["responses_cut_by_token_limit"] = counts.pop("finish_reason:length", 0)
    return counts
