"""The in-process engine (design section 6): transformers models, the prompt prefilled once per prompt.

For each prompt, :class:`HFEngine` runs the prompt through the model once (one forward pass with the
key/value cache on) and then decodes all ``n`` samples as a batch that starts from a copy of that cache,
repeated once per sample (in chunks of at most ``max_batch`` samples to bound memory). The decode loop is
hand-written: every step runs the last token of each unfinished sample through the model, filters the
logits (temperature, top-k, top-p) and draws the next token by inverse-CDF sampling with a uniform number
from the sample's own CPU ``torch.Generator``, seeded by :func:`~alignline.generate.base.sample_seed`.
A sample's text therefore depends only on (run seed, prompt id, sample index), not on how the samples are
batched or chunked, nor on the device's RNG.

All samples of a chunk advance in lock-step from the same prompt, so every row always has the same length:
finished rows are *removed* from the batch and its cache (``batch_select_indices``) rather than padded, and
the rows left need no padding mask; every row's next position is ``len(prompt) + step``.

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
        out: list[list[Response]] = []
        for prompt in prompts:
            seeds = [sample_seed(sampling.seed, prompt.id, i) for i in range(n)]
            ids = prompt_ids(self.tokenizer, prompt.messages)
            samples = self.sample(ids, seeds, sampling)
            out.append([
                Response(prompt_id=prompt.id, sample_idx=i, text=s.text, source=self.source,
                         sampling=dict(params), seed=seeds[i], finish_reason=s.finish_reason)
                for i, s in enumerate(samples)
            ])
        return out

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
                samples.extend(self._decode_chunk(base_cache, first_logits, len(input_ids), chunk, sampling))
            return samples

    # ---------------------------------------------------------------------------------------- decoding

    def _stop_window(self, sampling: SamplingParams) -> int:
        # Enough trailing tokens to contain any stop string even with one byte per token (UTF-8: <= 4 bytes
        # per character), plus a margin for tokens that decode to nothing on their own.
        return 4 * max(len(s) for s in sampling.stop) + 8

    def _decode_chunk(self, base_cache, first_logits: torch.Tensor, prompt_len: int, seeds: Sequence[int],
                      sampling: SamplingParams) -> list[Sample]:
        size = len(seeds)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        stops = [s for s in sampling.stop if s]
        window = self._stop_window(sampling) if stops else 0
        tokens: list[list[int]] = [[] for _ in range(size)]
        finish: list[FinishReason] = ["length"] * size

        cache = copy.deepcopy(base_cache)
        cache.batch_repeat_interleave(size)
        logits = first_logits.expand(size, -1)
        alive = list(range(size))  # chunk rows still decoding, in cache order
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
                next_tokens = next_tokens[index]
                alive = [alive[j] for j in keep]
            position = torch.full((len(alive), 1), prompt_len + step, dtype=torch.long, device=next_tokens.device)
            out = self.model(input_ids=next_tokens.view(-1, 1), position_ids=position, past_key_values=cache,
                             use_cache=True)
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
