"""The in-process engine (design section 6): transformers models, the prompt prefilled once per prompt.

For each prompt, :class:`HFEngine` runs the prompt through the model once (one forward pass with the
key/value cache on) and then decodes all ``n`` samples as a batch that starts from a copy of that cache,
repeated once per sample (in chunks of at most ``max_batch`` samples to bound memory). The decode loop is
hand-written: every step runs the last token of each unfinished sample through the model, filters the
logits (temperature, top-k, top-p) and draws the next token by inverse-CDF sampling with a uniform number
from the sample's own CPU ``torch.Generator``, seeded by :func:`~alignline.generate.base.sample_seed`.
A sample's text therefore depends only on (run seed, prompt id, sample index), not on how the samples are
batched or chunked, nor on the device's RNG.

All rows of a batch advance in lock-step; finished rows are *removed* from the batch and its cache
(``batch_select_indices``) rather than kept as padding. When ``n`` samples of a prompt leave room in
``max_batch``, several prompts share a batch: they are prefilled together, left-padded to the longest one
(attention mask and per-row positions make the padding invisible), and each row's next position is
``len(its prompt) + step``. Prompts are grouped by length, so little padding is computed. Batching changes
only floating-point rounding, not which random number a sample draws.

:func:`generate_reference` is the plain ``model.generate(num_return_sequences=n)`` path (the prompt
expanded ``n`` times and recomputed), kept as the peer for benchmarks; it is not seed-identical.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from alignline.data.chat import end_token_ids, ensure_chat_template, prompt_ids
from alignline.data.records import Prompt, Response
from alignline.errors import ConfigError
from alignline.generate.base import Engine, SamplingParams, check_n, sample_seed

FinishReason = str  # "stop" | "length"


@dataclass
class Sample:
    """One continuation: new token ids (no end token; a stop string's tokens included), the text (cut before
    the stop string) and why it ended ("stop": end token or stop string, "length": max_new_tokens)."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason


# ------------------------------------------------------------------------------------------- sampling


def filter_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Probabilities [B, V] after temperature, top-k and top-p (float32); temperature must be > 0."""
    logits = logits.float() / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= sampling.top_p  # the most likely token is always kept (mass before it = 0)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row the first token whose cumulative probability exceeds u * total."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(uniforms.to(cdf.device, torch.float64).view(-1, 1) * total,
                      torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).view(-1).clamp_(max=probs.shape[-1] - 1)


def pick_tokens(logits: torch.Tensor, sampling: SamplingParams, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token [B] for each row: greedy at temperature 0, else drawn with that row's own generator."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    return draw(filter_logits(logits, sampling), uniforms)


# --------------------------------------------------------------------------------------------- engine


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_source(model) -> str:
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return str(name) or "hf"


class HFEngine(Engine):
    """Sampling with a transformers causal LM in this process, the prompt prefilled once per prompt.

    ``max_batch`` bounds how many samples of one prompt are decoded together (the prompt's cache is copied
    and repeated per chunk). ``source`` is written into every response (default: the model's path/name).
    """

    name = "hf"

    def __init__(self, model, tokenizer, *, max_batch: int = 64, source: str | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, found {max_batch!r}")
        ensure_chat_template(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.source = source or _model_source(model)
        ends = set(end_token_ids(tokenizer))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ends.update([gen_eos] if isinstance(gen_eos, int) else list(gen_eos))
        self.end_ids: frozenset[int] = frozenset(int(t) for t in ends)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._logits_to_keep = "logits_to_keep" in params

    @classmethod
    def from_path(cls, path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                  *, max_batch: int = 64, trust_remote_code: bool = False) -> HFEngine:
        """An engine for the model at ``path`` (alias, .gguf, checkpoint or adapter directory)."""
        from alignline.models import load_causal_lm, load_tokenizer

        model = load_causal_lm(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, max_batch=max_batch, source=str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------- public API

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[list[Response]]:
        """For every prompt, ``n`` responses (``sample_idx`` 0..n-1), each seeded by its own sample seed."""
        check_n(n)
        if not isinstance(sampling, SamplingParams):
            sampling = SamplingParams.model_validate(sampling)
        params = sampling.model_dump()
        ids = [prompt_ids(self.tokenizer, p.messages) for p in prompts]
        seeds = [[sample_seed(sampling.seed, p.id, i) for i in range(n)] for p in prompts]
        samples: list[list[Sample]] = [[] for _ in prompts]
        prompts_per_batch = max(1, self.max_batch // n)
        by_length = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        for start in range(0, len(by_length), prompts_per_batch):
            group = by_length[start: start + prompts_per_batch]
            if len(group) == 1:
                samples[group[0]] = self.sample(ids[group[0]], seeds[group[0]], sampling)
                continue
            for i, got in zip(group, self.sample_prompts([ids[i] for i in group], [seeds[i] for i in group],
                                                         sampling), strict=True):
                samples[i] = got
        return [
            [Response(prompt_id=prompt.id, sample_idx=i, text=s.text, source=self.source, sampling=dict(params),
                      seed=prompt_seeds[i], finish_reason=s.finish_reason) for i, s in enumerate(prompt_samples)]
            for prompt, prompt_seeds, prompt_samples in zip(prompts, seeds, samples, strict=True)
        ]

    @torch.inference_mode()
    def sample(self, input_ids: Sequence[int], seeds: Sequence[int], sampling: SamplingParams) -> list[Sample]:
        """One continuation of ``input_ids`` per seed; the prompt's forward pass is done once for all of them."""
        if not input_ids:
            raise ConfigError("the prompt has no tokens; nothing to continue")
        if not seeds:
            return []
        with _eval_mode(self.model):
            prompt = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
            kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
            prefill = self.model(input_ids=prompt, use_cache=True, **kwargs)
            first_logits = prefill.logits[:, -1, :].float()
            base_cache = prefill.past_key_values
            del prefill
            samples: list[Sample] = []
            for start in range(0, len(seeds), self.max_batch):
                chunk = seeds[start: start + self.max_batch]
                cache = copy.deepcopy(base_cache)
                cache.batch_repeat_interleave(len(chunk))
                positions = torch.full((len(chunk),), len(input_ids), dtype=torch.long, device=self.device)
                samples.extend(self._decode(cache, first_logits.expand(len(chunk), -1), positions, None, chunk,
                                            sampling))
            return samples

    @torch.inference_mode()
    def sample_prompts(self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]],
                       sampling: SamplingParams) -> list[list[Sample]]:
        """One continuation per seed for each prompt, all prompts prefilled and decoded as one batch.

        The prompts are left-padded to the longest; ``seeds[i]`` are prompt ``i``'s sample seeds. The caller
        bounds the batch (sum of ``len(seeds[i])`` rows); :meth:`generate` keeps it within ``max_batch``.
        """
        if any(not ids for ids in prompts):
            raise ConfigError("a prompt has no tokens; nothing to continue")
        lengths = [len(ids) for ids in prompts]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.end_ids, default=0)
        rows = [[pad] * (width - len(ids)) + list(ids) for ids in prompts]
        counts = torch.tensor([len(s) for s in seeds], device=self.device)
        with _eval_mode(self.model):
            input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)
            mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long, device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp_(min=0)
            kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
            prefill = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **kwargs)
            rows_of = torch.arange(len(prompts), device=self.device).repeat_interleave(counts)
            logits = prefill.logits[:, -1, :].float()[rows_of]
            cache = prefill.past_key_values
            del prefill
            cache.batch_select_indices(rows_of)  # each prompt's cache repeated once per sample
            next_positions = torch.tensor(lengths, dtype=torch.long, device=self.device)[rows_of]
            flat = self._decode(cache, logits, next_positions, mask[rows_of], [x for s in seeds for x in s],
                                sampling)
        out, at = [], 0
        for s in seeds:
            out.append(flat[at: at + len(s)])
            at += len(s)
        return out

    # ---------------------------------------------------------------------------------------- decoding

    def _stop_window(self, sampling: SamplingParams) -> int:
        # Enough trailing tokens to contain any stop string even with one byte per token (UTF-8: <= 4 bytes
        # per character), plus a margin for tokens that decode to nothing on their own.
        return 4 * max(len(s) for s in sampling.stop) + 8

    def _decode(self, cache, logits: torch.Tensor, next_positions: torch.Tensor, mask: torch.Tensor | None,
                seeds: Sequence[int], sampling: SamplingParams) -> list[Sample]:
        """Decode one row per seed from ``cache`` (already one row per seed) and the logits of its first token.

        ``next_positions`` [rows]: each row's position for its first new token; ``mask`` [rows, cached length]:
        1 for real tokens, 0 for left padding, or None when no row is padded.
        """
        size = len(seeds)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        stops = [s for s in sampling.stop if s]
        window = self._stop_window(sampling) if stops else 0
        tokens: list[list[int]] = [[] for _ in range(size)]
        finish: list[FinishReason] = ["length"] * size

        alive = list(range(size))  # rows still decoding, in cache order
        for step in range(sampling.max_new_tokens):
            next_tokens = pick_tokens(logits, sampling, [generators[r] for r in alive])
            keep: list[int] = []
            for j, (row, tok) in enumerate(zip(alive, next_tokens.tolist(), strict=True)):
                if tok in self.end_ids:
                    finish[row] = "stop"
                    continue
                tokens[row].append(tok)
                if stops:
                    tail = self.tokenizer.decode(tokens[row][-window:], skip_special_tokens=True)
                    if any(s in tail for s in stops):
                        finish[row] = "stop"
                        continue
                if len(tokens[row]) >= sampling.max_new_tokens:
                    continue  # finish stays "length"
                keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, dtype=torch.long, device=next_tokens.device)
                cache.batch_select_indices(index)
                next_tokens, next_positions = next_tokens[index], next_positions[index]
                mask = None if mask is None else mask[index]
                alive = [alive[j] for j in keep]
            kwargs = {}
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
                kwargs["attention_mask"] = mask
            out = self.model(input_ids=next_tokens.view(-1, 1), position_ids=(next_positions + step).view(-1, 1),
                             past_key_values=cache, use_cache=True, **kwargs)
            logits = out.logits[:, -1, :].float()
            cache = out.past_key_values
        del cache

        samples = []
        for row in range(size):
            text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
            text, cut = cut_at_stop(text, stops)
            samples.append(Sample(tokens[row], text, "stop" if cut else finish[row]))
        return samples


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (not including) the earliest stop string it contains, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# ------------------------------------------------------------------------------------------ reference


@torch.inference_mode()
def generate_reference(model, tokenizer, prompt: Prompt, n: int, sampling: SamplingParams, *,
                       source: str | None = None) -> list[Response]:
    """``n`` responses from plain ``model.generate(num_return_sequences=n)``: the benchmarks' peer path.

    The prompt is expanded to ``n`` rows and recomputed for each (no shared prefill). Sampling uses the
    global torch RNG seeded with ``sampling.seed`` (restored afterwards), so texts are reproducible for
    the same ``n`` but not equal to :class:`HFEngine`'s per-sample-seeded ones. At temperature 0 the
    greedy continuation is computed once and repeated ``n`` times.
    """
    check_n(n)
    ensure_chat_template(tokenizer)
    ends = sorted(end_token_ids(tokenizer))
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt.messages)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs: dict = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=ends,
                        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0])
    greedy = sampling.temperature == 0
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k, num_return_sequences=n)
    if sampling.stop:
        kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    devices = [device] if device.type == "cuda" else []
    with _eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(sampling.seed)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    rows = out[:, len(ids):].tolist()
    if greedy:
        rows = rows * n
    end_set = set(ends)
    responses = []
    for i, row in enumerate(rows):
        cut = next((k for k, t in enumerate(row) if t in end_set), None)
        new = row if cut is None else row[:cut]
        text, hit = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), sampling.stop)
        responses.append(Response(
            prompt_id=prompt.id, sample_idx=i, text=text, source=source or _model_source(model),
            sampling=sampling.model_dump(), seed=sampling.seed,
            finish_reason="stop" if hit or cut is not None else "length",
        ))
    return responses
