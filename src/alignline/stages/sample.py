"""``alignline sample``: N responses per prompt from a model (best-of-N pools, annotation pairs).

Engines: ``hf`` (in process; each prompt prefilled once and its cache reused for all N samples) or
``openai`` (any OpenAI-compatible server: OpenAI, vLLM, SGLang, llama.cpp). Every sample is seeded by
(run seed, prompt id, sample index), so a resumed run produces the same texts. Output shards hold whole
prompts (``prompts_per_shard`` x N responses each) and are written atomically: a run killed at any
point and rerun has no duplicate or missing (prompt_id, sample_idx). ``finish_reason: length`` marks a
response cut by ``sampling.max_new_tokens`` (counted in the manifest).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.config import Section, ShardSetting
from alignline.data.io import ShardedWriter, read_prompts
from alignline.errors import ConfigError
from alignline.generate.base import SamplingParams
from alignline.stages.common import RunDir, console


class SampleConfig(Section):
    """Configuration of ``alignline sample``."""

    prompts: str
    """Prompt records (each ends with a user turn)."""
    model: str
    """hf engine: a local HF dir, .gguf or alias; openai engine: the served model name."""
    engine: Literal["hf", "openai"] = "hf"
    """hf: in process; openai: an OpenAI-compatible endpoint (settings below)."""
    openai: dict = Field(default_factory=dict)
    """openai engine settings: base_url, api_key_env, max_concurrency, max_retries, timeout_s (the key itself
    comes from the environment and is never written anywhere)."""
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
    prompts_per_shard: int = Field(8, gt=0)
    """Prompts per output shard (a shard is the unit that survives a kill)."""
    max_batch: int = Field(64, gt=0)
    """hf: samples of one prompt decoded together."""
    shard: ShardSetting = None
    """'i/N': sample only prompts i, i+N, ... (several machines); null: all (or one share per process)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """hf: weights dtype."""
    trust_remote_code: bool = False
    """hf: allow model code from the checkpoint directory."""



def make_engine(cfg: SampleConfig, device=None):
    if cfg.engine == "hf":
        from alignline.generate.hf import HFEngine

        return HFEngine.from_path(cfg.model, dtype=cfg.dtype, device=device, max_batch=cfg.max_batch,
                                  trust_remote_code=cfg.trust_remote_code)
    try:
        from alignline.generate.openai_engine import OpenAIEngine, OpenAISettings
    except ImportError as exc:  # pragma: no cover
        raise ConfigError(f"the openai engine is unavailable: {exc}") from None
    return OpenAIEngine(OpenAISettings.model_validate({"model": cfg.model, **cfg.openai}))


def run(cfg: SampleConfig) -> Path:
    rd = RunDir("sample", cfg, cfg.output_dir, {"prompts": cfg.prompts, "model": cfg.model})
    if rd.up_to_date():
        console.print(f"[green]sample: {rd.path} is up to date[/green]; nothing to do")
        return rd.path
    rd.start()
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    index, total = map(int, cfg.shard.split("/")) if cfg.shard else (state.process_index, state.num_processes)
    prompts = read_prompts(cfg.prompts)[: cfg.max_prompts][index::total]
    writer = ShardedWriter(rd.path, name=f"responses-{index:03d}-of-{total:03d}",
                           shard_size=cfg.prompts_per_shard * cfg.n,
                           key=lambda o: (o["prompt_id"], o["sample_idx"]))
    done = writer.done_keys()
    todo = [p for p in prompts if any((p.id, i) not in done for i in range(cfg.n))]
    partial = [p.id for p in todo if any((p.id, i) in done for i in range(cfg.n))]
    assert not partial, f"shards hold whole prompts, found partial prompts {partial[:3]}"
    engine = make_engine(cfg, device=state.device if cfg.engine == "hf" else None)
    tokenizer = getattr(engine, "tokenizer", None)
    counts: Counter = Counter(resumed_prompts=len(prompts) - len(todo))
    t0, new_tokens = time.perf_counter(), 0
    bar = tqdm(todo, desc=f"sample n={cfg.n}", disable=not state.is_local_main_process, dynamic_ncols=True)
    with writer:
        for prompt in bar:
            [responses] = engine.generate([prompt], cfg.n, cfg.sampling)
            for r in responses:
                if cfg.source:
                    r.source = cfg.source
                counts[f"finish_reason:{r.finish_reason}"] += 1
                counts["failed"] += r.status == "failed"
                if tokenizer is not None and r.status == "ok":
                    new_tokens += len(tokenizer(r.text, add_special_tokens=False)["input_ids"])
                writer.add(r)
            counts["prompts"] += 1
            dt = time.perf_counter() - t0
            bar.set_postfix(prompts_s=f"{counts['prompts'] / dt:.2f}", tok_s=f"{new_tokens / dt:.0f}")
    counts["responses_cut_by_token_limit"] = counts.pop("finish_reason:length", 0)
    state.wait_for_everyone()
    if state.is_main_process:
        rd.finish(counts, seconds=time.perf_counter() - t0, new_tokens=new_tokens,
                  shards=[str(p) for p in sorted(rd.path.glob("responses-*.jsonl"))])
    console.print(f"[green]sample done[/green]: {dict(counts)}\n  responses: {rd.path}")
    return rd.path
