"""Continuous batching over :class:`~alignline.generate.decoder.KVDecoder`: the batch stays full until the
queue of samples is empty.

The queue holds every (prompt, seed) of a call, prompts ordered by length. ``slots`` samples decode at once;
when one ends (end token, stop string or token limit) its slot takes the next queued sample at once: the next
seed of the same prompt (its keys are already in the prompt's row), or the first seed of the next prompt
(prefilled once into a free row when its first sample is admitted; a row is freed when its prompt's last
sample ends). Only when the queue is empty and a quarter of the slots sit idle are the idle slots dropped (not
with a fixed-shape step, :mod:`alignline.generate.static_step`, whose shapes never change).

Which random number a token uses depends only on the sample's seed and the step (the sample's uniforms are
drawn when it starts), and a slot's attention sees only its prompt and its own tokens, so a sample's text
does not depend on the slot, the batch size or which samples run beside it (up to floating-point rounding of
the batched matmuls).

With ``logprobs`` each drawn token's log-probability under the model's own distribution (the logits before
temperature and filtering) is kept as well: an RL rollout then needs no second pass of the sampling policy.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Sequence

import torch

from alignline.generate.base import SamplingParams
from alignline.generate.decoder import KVDecoder
from alignline.generate.sampling import pick, stop_window, tail_has_stop, uniforms_for

PREFILL_TOKENS = 8192
"""At most this many prompt tokens in one packed prefill pass (bounds its activations)."""


class ContinuousBatch:
    """One call's samples decoded with continuous batching; :meth:`run` returns their token ids and endings."""

    def __init__(self, engine, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]],
                 sampling: SamplingParams, *, logprobs: bool = False):
        self.engine, self.prompts, self.seeds, self.sampling = engine, prompts, seeds, sampling
        self.want_logprobs = logprobs
        order = sorted((i for i in range(len(prompts)) if seeds[i]), key=lambda i: len(prompts[i]))
        self.queue = deque((p, j) for p in order for j in range(len(seeds[p])))
        self.remaining = {p: len(seeds[p]) for p in order}
        self.limit = {p: min(sampling.max_new_tokens, engine.max_context - len(prompts[p])) for p in order}
        slots = min(engine.max_batch, len(self.queue))
        self.decoder = KVDecoder(engine.model, slots=slots, rows=min(len(order), slots),
                                 prompt_capacity=max(len(prompts[p]) for p in order),
                                 new_capacity=max(self.limit.values()))
        if engine.decode_step != "live":
            self.decoder.use_static_step(per_row=min(slots, max(len(seeds[p]) for p in order)),
                                         graph=engine.decode_step == "graph")
        self.free_rows = list(range(self.decoder.prefix_k.shape[1]))
        self.row_of: dict[int, int] = {}
        self.row_logits: dict[int, torch.Tensor] = {}
        self.job: list[tuple[int, int] | None] = [None] * slots
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.logps: list[list[float]] = [[] for _ in range(slots)]
        self.uniforms = torch.zeros(slots, self.decoder.new_capacity, dtype=torch.float64)
        self.logits: torch.Tensor | None = None
        self.results: list[list] = [[None] * len(s) for s in seeds]
        stops = [s for s in sampling.stop if s]
        self.stops = stops
        self.window = stop_window(stops) if stops else 0
        self.stop_flags = None

    # ---------------------------------------------------------------------------------------- queue

    def _fill(self, free: list[int]) -> None:
        """Give each slot of ``free`` the next queued sample; the new prompts among them are prefilled together
        (packed passes of at most ``PREFILL_TOKENS`` tokens, so weights are read once per pass, not per prompt)."""
        jobs = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        new = list(dict.fromkeys(p for p, _ in jobs if p not in self.row_of))
        while new:
            take, tokens = 0, 0
            while take < len(new) and (take == 0 or tokens + len(self.prompts[new[take]]) <= PREFILL_TOKENS):
                tokens += len(self.prompts[new[take]])
                take += 1
            chunk, new = new[:take], new[take:]
            rows = [heapq.heappop(self.free_rows) for _ in chunk]
            t0 = self._clock()
            logits = self.decoder.prefill(rows, [list(self.prompts[p]) for p in chunk])
            self.engine.stats.add(prefill_s=self._clock() - t0, prefill_tokens=tokens)
            for prompt, row, row_logits in zip(chunk, rows, logits, strict=True):
                self.row_of[prompt], self.row_logits[row] = row, row_logits
        for slot, (prompt, j) in zip(free, jobs):
            row = self.row_of[prompt]
            self.decoder.assign(slot, row)
            if self.logits is None:
                self.logits = self.row_logits[row].new_zeros(len(self.job), self.row_logits[row].shape[-1])
            self.logits[slot] = self.row_logits[row]
            if self.sampling.temperature > 0:
                self.uniforms[slot] = uniforms_for(self.seeds[prompt][j], self.decoder.new_capacity)
            self.job[slot], self.tokens[slot], self.logps[slot] = (prompt, j), [], []

    def _finish(self, slot: int, reason: str, end_token: int | None = None) -> None:
        """Record the slot's sample as (tokens, reason, end token, log-probs or None) and free the slot."""
        prompt, j = self.job[slot]
        self.results[prompt][j] = (self.tokens[slot], reason, end_token,
                                   self.logps[slot] if self.want_logprobs else None)
        self.job[slot] = None
        self.remaining[prompt] -= 1
        if not self.remaining[prompt]:
            heapq.heappush(self.free_rows, self.row_of.pop(prompt))

    def _stopped(self, slot: int) -> bool:
        return tail_has_stop(self.engine.tokenizer, self.tokens[slot], self.stops, self.window)

    def _drop_idle(self) -> None:
        keep = [s for s, job in enumerate(self.job) if job is not None]
        self.decoder.keep_slots(keep)
        index = torch.tensor(keep, dtype=torch.long)
        self.job = [self.job[s] for s in keep]
        self.tokens = [self.tokens[s] for s in keep]
        self.logps = [self.logps[s] for s in keep]
        self.uniforms = self.uniforms[index]
        self.logits = self.logits[index.to(self.logits.device)]

    def _clock(self) -> float:
        """Seconds, after the GPU's queued work is done (kernels run asynchronously; CPU: just the clock)."""
        if self.decoder.device.type == "cuda":
            torch.cuda.synchronize(self.decoder.device)
        return time.perf_counter()

    # ----------------------------------------------------------------------------------------- loop

    def _advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw each live slot's next token and end the samples that are done: (tokens to feed, feed mask)."""
        slots = len(self.job)
        steps = torch.tensor([len(t) for t in self.tokens])
        uniforms = self.uniforms[torch.arange(slots), steps.clamp(max=self.uniforms.shape[1] - 1)]
        drawn = pick(self.logits, self.sampling, uniforms)
        if self.want_logprobs:
            logps = torch.log_softmax(self.logits.float(), dim=-1).gather(1, drawn.view(-1, 1)).view(-1).tolist()
        drawn = drawn.cpu()
        candidates = self.stop_flags[drawn].tolist() if self.stops else [False] * slots
        feed = [False] * slots
        for slot, token in enumerate(drawn.tolist()):
            if self.job[slot] is None:
                continue
            if self.want_logprobs:
                self.logps[slot].append(logps[slot])
            if token in self.engine.end_ids:
                self._finish(slot, "stop", token)
                continue
            self.tokens[slot].append(token)
            if candidates[slot] and self._stopped(slot):
                self._finish(slot, "stop")
            elif len(self.tokens[slot]) >= self.limit[self.job[slot][0]]:
                self._finish(slot, "length")
            else:
                feed[slot] = True
        return drawn, torch.tensor(feed)

    def run(self) -> list[list[tuple[list[int], str, int | None, list[float] | None]]]:
        """Decode every queued sample; per prompt, per seed: (new token ids, "stop" | "length", the end token
        drawn or None, the tokens' log-probs (end token's last) or None)."""
        if self.stops:
            self.stop_flags = self.engine.stop_flags(tuple(self.stops), self.decoder.head.out_features)
        self._fill(list(range(len(self.job))))
        while any(job is not None for job in self.job):
            drawn, feed = self._advance()
            if self.queue:
                self._fill([slot for slot, job in enumerate(self.job) if job is None])
            idle = sum(job is None for job in self.job)
            if not self.queue and idle and idle * 4 >= len(self.job) and self.decoder.static is None:
                live = torch.tensor([job is not None for job in self.job])
                drawn, feed = drawn[live], feed[live]
                self._drop_idle()
            if bool(feed.any()):
                t0 = self._clock()
                fresh = self.decoder.step(drawn, feed)
                if bool(feed.all()):
                    self.logits = fresh
                else:
                    fed = feed.nonzero().view(-1).to(fresh.device)
                    self.logits.index_copy_(0, fed, fresh.index_select(0, fed))
                self.engine.stats.add(decode_s=self._clock() - t0, decode_steps=1,
                                      decode_rows=int(feed.sum()), decode_slots=len(self.job))
        return self.results
