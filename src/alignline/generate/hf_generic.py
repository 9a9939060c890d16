"""The engine's path for models the fast decoder does not cover (e.g. Gemma 3): transformers' own forward.

Per prompt, one forward pass fills transformers' cache; the samples then decode in chunks of ``max_batch``
rows that start from a copy of it, finished rows leaving the batch. Sampling is the engine's (the same
uniforms per sample seed and step), so texts still depend only on (run seed, prompt id, sample index).
Slower than :class:`~alignline.generate.decoder.KVDecoder` (the cache grows by concatenation), but exact for
any causal LM transformers can run.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch

from alignline.generate.base import SamplingParams
from alignline.generate.sampling import pick, stop_window, tail_has_stop, uniforms_for


def cache_keyword(model) -> str:
    """The name transformers' forward takes the cache by (``cache`` from 5.x, ``past_key_values`` before)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def cache_of(output):
    """The cache a transformers forward returned (``cache`` from 5.x, ``past_key_values`` before)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def decode_lockstep(engine, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]],
                    sampling: SamplingParams) -> list[list[tuple[list[int], str]]]:
    """Per prompt, per seed: (new token ids, "stop" | "length"), each prompt prefilled once."""
    model, device = engine.model, engine.device
    keyword = cache_keyword(model)
    out: list[list[tuple[list[int], str]]] = []
    for ids, prompt_seeds in zip(prompts, seeds, strict=True):
        rows: list[tuple[list[int], str]] = []
        if prompt_seeds:
            prefill = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, logits_to_keep=1)
            first, base = prefill.logits[:, -1].float(), cache_of(prefill)
            limit = min(sampling.max_new_tokens, engine.max_context - len(ids))
            for start in range(0, len(prompt_seeds), engine.max_batch):
                chunk = prompt_seeds[start: start + engine.max_batch]
                cache = copy.deepcopy(base)
                cache.batch_repeat_interleave(len(chunk))
                rows.extend(_decode(engine, keyword, cache, first.expand(len(chunk), -1), len(ids), chunk, limit,
                                    sampling))
        out.append(rows)
    return out


def _decode(engine, keyword: str, cache, logits: torch.Tensor, position: int, seeds: Sequence[int], limit: int,
            sampling: SamplingParams) -> list[tuple[list[int], str]]:
    uniforms = torch.stack([uniforms_for(s, limit) for s in seeds])
    stops = tuple(s for s in sampling.stop if s)
    flags = engine.stop_flags(stops, logits.shape[-1]) if stops else None
    window = stop_window(stops) if stops else 0
    tokens: list[list[int]] = [[] for _ in seeds]
    finish = ["length"] * len(seeds)
    alive = list(range(len(seeds)))
    for step in range(limit):
        drawn = pick(logits, sampling, uniforms[alive, step]).cpu()
        keep = []
        for j, (row, token) in enumerate(zip(alive, drawn.tolist(), strict=True)):
            if token in engine.end_ids:
                finish[row] = "stop"
                continue
            tokens[row].append(token)
            if flags is not None and flags[token] and tail_has_stop(engine.tokenizer, tokens[row], stops, window):
                finish[row] = "stop"
                continue
            if len(tokens[row]) < limit:
                keep.append(j)
        if not keep:
            break
        index = torch.tensor(keep, dtype=torch.long)
        if len(keep) < len(alive):
            cache.batch_select_indices(index.to(logits.device))
            alive = [alive[j] for j in keep]
        positions = torch.full((len(alive), 1), position + step, dtype=torch.long, device=logits.device)
        output = engine.model(input_ids=drawn[index].view(-1, 1).to(logits.device), position_ids=positions,
                              use_cache=True, **{keyword: cache})
        logits, cache = output.logits[:, -1].float(), cache_of(output)
    return list(zip(tokens, finish, strict=True))
