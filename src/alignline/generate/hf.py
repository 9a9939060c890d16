"""The in-process engine (design section 6): transformers models, each prompt prefilled once for its samples.

:class:`HFEngine` decodes with continuous batching (:mod:`alignline.generate.continuous`) on preallocated
key/value caches (:mod:`alignline.generate.decoder`): a prompt's keys are computed once and stored once for
all of its samples, each sample keeps only its own new tokens, and a finished sample's slot takes the next
queued sample at once, so up to ``max_batch`` samples decode together until the queue is empty. Tokens are
drawn by inverse-CDF sampling with the sample's own uniform numbers (its CPU ``torch.Generator``, seeded by
:func:`~alignline.generate.base.sample_seed`): a sample's text depends only on (run seed, prompt id, sample
index), not on the batch size, the slot, the other prompts or their order.

Models outside the Llama family the decoder supports (e.g. Gemma 3) take
:func:`alignline.generate.hf_generic.decode_lockstep`, transformers' own forward and cache, with the same
sampling and the same per-sample seeds.

:func:`generate_reference` is the plain ``model.generate(num_return_sequences=n)`` path (the prompt
expanded ``n`` times and recomputed), kept as the peer for benchmarks; it is not seed-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch

from alignline.data.chat import end_token_ids, ensure_chat_template, prompt_ids
from alignline.data.records import Prompt, Response
from alignline.errors import ConfigError, PromptTooLongError
from alignline.generate.base import DecodeStep, Engine, SamplingParams, check_n, sample_seed
from alignline.generate.decoder import unsupported_reason
from alignline.generate.sampling import draw, filter_logits, pick_tokens, stop_candidates
from alignline.telemetry import EngineStats

__all__ = ["HFEngine", "Sample", "cut_at_stop", "draw", "filter_logits", "generate_reference", "pick_tokens"]

FinishReason = str  # "stop" | "length"
DECODE_STEPS: tuple[str, ...] = get_args(DecodeStep)


@dataclass
class Sample:
    """One continuation: new token ids (no end token; a stop string's tokens included), the text (cut before
    the stop string) and why it ended ("stop": end token or stop string, "length": max_new_tokens).

    With ``sample_prompts(..., logprobs=True)``: ``end_token``, the end token drawn (None if the sample ended
    otherwise), and ``logprobs``, the model's log-probability of each token of ``token_ids`` and then of
    ``end_token``, under its own distribution (no temperature, top-k or top-p: what a policy-gradient ratio
    needs), as computed by the decode step (float32; equal to a full forward's up to rounding)."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    end_token: int | None = None
    logprobs: list[float] | None = None


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
    """Sampling with a transformers causal LM in this process (continuous batching, prompts prefilled once).

    ``max_batch``: samples decoded together (the slots). ``max_context``: prompt plus new tokens at most
    (default: the model's ``max_position_embeddings``); a sample reaching it ends with "length", a prompt
    that fills it is an error. ``source`` is written into every response (default: the model's path/name).
    ``decode_step``: live, static or graph (see :data:`~alignline.generate.base.DecodeStep`).
    """

    name = "hf"

    def __init__(self, model, tokenizer, *, max_batch: int = 64, source: str | None = None,
                 max_context: int | None = None, decode_step: DecodeStep = "live"):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, found {max_batch!r}")
        if decode_step not in DECODE_STEPS:
            raise ConfigError(f"decode_step must be one of {', '.join(DECODE_STEPS)}, found {decode_step!r}")
        self.decode_step = decode_step
        ensure_chat_template(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.source = source or _model_source(model)
        config = getattr(model, "config", None)
        self.max_context = int(max_context or getattr(config, "max_position_embeddings", None) or 1 << 30)
        ends = set(end_token_ids(tokenizer))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ends.update([gen_eos] if isinstance(gen_eos, int) else list(gen_eos))
        self.end_ids: frozenset[int] = frozenset(int(t) for t in ends)
        self.fallback_reason = unsupported_reason(model)
        if decode_step == "graph" and self.device.type != "cuda":
            raise ConfigError(f"decode_step 'graph' replays CUDA graphs and needs the model on a GPU, not on "
                              f"{self.device}; use 'live' (the default) there")
        self.stats = EngineStats()
        self._stop_flags: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_path(cls, path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                  *, max_batch: int = 64, trust_remote_code: bool = False, decode_step: DecodeStep = "live") -> HFEngine:
        """An engine for the model at ``path`` (alias, .gguf, checkpoint or adapter directory)."""
        from alignline.models.loading import load_causal_lm, load_tokenizer

        model = load_causal_lm(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, max_batch=max_batch, source=str(path), decode_step=decode_step)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stop_flags(self, stops: tuple[str, ...], vocab: int) -> torch.Tensor:
        """Tokens that can complete one of ``stops`` (computed once per set of stop strings)."""
        if stops not in self._stop_flags:
            self._stop_flags[stops] = stop_candidates(self.tokenizer, stops, vocab)
        return self._stop_flags[stops]

    # ------------------------------------------------------------------------------------- public API

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[list[Response]]:
        """For every prompt, ``n`` responses (``sample_idx`` 0..n-1), each seeded by its own sample seed."""
        check_n(n)
        if not isinstance(sampling, SamplingParams):
            sampling = SamplingParams.model_validate(sampling)
        params = sampling.model_dump()
        ids = [prompt_ids(self.tokenizer, p.messages) for p in prompts]
        for p, x in zip(prompts, ids):
            if len(x) >= self.max_context:
                raise PromptTooLongError(
                    f"prompt '{p.id}' has {len(x)} tokens, which fills the model's context of {self.max_context} "
                    "tokens (max_position_embeddings) with no room for an answer; shorten it or drop it",
                    p.id, field="messages")
        seeds = [[sample_seed(sampling.seed, p.id, i) for i in range(n)] for p in prompts]
        samples = self.sample_prompts(ids, seeds, sampling)
        return [
            [Response(prompt_id=prompt.id, sample_idx=i, text=s.text, source=self.source, sampling=dict(params),
                      seed=prompt_seeds[i], finish_reason=s.finish_reason) for i, s in enumerate(prompt_samples)]
            for prompt, prompt_seeds, prompt_samples in zip(prompts, seeds, samples, strict=True)
        ]

    def sample(self, input_ids: Sequence[int], seeds: Sequence[int], sampling: SamplingParams) -> list[Sample]:
        """One continuation of ``input_ids`` per seed; the prompt's forward pass is done once for all of them."""
        return self.sample_prompts([input_ids], [seeds], sampling)[0]

    @torch.inference_mode()
    def sample_prompts(self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]],
                       sampling: SamplingParams, *, logprobs: bool = False) -> list[list[Sample]]:
        """One continuation per seed for each prompt (``seeds[i]`` are prompt ``i``'s sample seeds), all of them
        decoded with continuous batching in at most ``max_batch`` slots. ``logprobs``: also each sample's
        ``end_token`` and ``logprobs`` (see :class:`Sample`); the generic fallback path (``fallback_reason``)
        leaves them None."""
        for i, ids in enumerate(prompts):
            if not ids:
                raise ConfigError(f"prompt {i} has no tokens; nothing to continue")
            if len(ids) >= self.max_context:
                raise ConfigError(
                    f"prompt {i} has {len(ids)} tokens, which fills the model's context of {self.max_context} "
                    f"tokens (max_position_embeddings) with no room for an answer; shorten it (e.g. the "
                    f"stage's data.max_length) or drop it")
        if not any(seeds):
            return [[] for _ in prompts]
        with _eval_mode(self.model):
            if self.fallback_reason is None:
                from alignline.generate.continuous import ContinuousBatch

                decoded = ContinuousBatch(self, prompts, seeds, sampling, logprobs=logprobs).run()
            else:
                from alignline.generate.hf_generic import decode_lockstep

                decoded = [[(tokens, reason, None, None) for tokens, reason in rows]
                           for rows in decode_lockstep(self, prompts, seeds, sampling)]
        return [[self._finish(*row, sampling) for row in rows] for rows in decoded]

    def _finish(self, tokens: list[int], reason: FinishReason, end_token: int | None, logps: list[float] | None,
                sampling: SamplingParams) -> Sample:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, cut = cut_at_stop(text, sampling.stop)
        return Sample(tokens, text, "stop" if cut else reason, end_token, logps)


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
