"""Vectorised token selection for the in-process engine: filtering, inverse-CDF draws, stop-string candidates.

Every op works on the whole batch of rows at once. A row's random numbers come from its own sample's
``torch.Generator`` (seeded by :func:`~alignline.generate.base.sample_seed`), drawn for all of its steps when
the sample starts (:func:`uniforms_for`: the same numbers, in the same order, as one draw per step), so which
number a token uses depends only on (sample seed, step), never on the batch, the slot or the other rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignline.generate.base import SamplingParams


def filter_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Probabilities [B, V] after temperature, top-k and top-p (float32); temperature must be > 0."""
    logits = logits.float() / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        probs = _top_p(probs, sampling.top_p)
    return probs


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token whose more likely tokens already hold ``top_p`` of the mass (the first always stays).

    Only the descending order up to where the mass reaches ``top_p`` matters. ``topk`` with k = 64, 256, 1024
    gives that prefix exactly as a full sort would, at a fraction of its cost; rows whose mass is spread wider
    (a flat distribution) are sorted whole.
    """
    vocab = probs.shape[-1]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    rows = torch.arange(probs.shape[0], device=probs.device)
    k = min(64, vocab)
    while len(rows):
        top, order = (torch.topk(probs[rows], k, dim=-1) if k < _SORT_FROM
                      else torch.sort(probs[rows], dim=-1, descending=True))
        mass = top.cumsum(-1)
        done = mass[:, -1] >= top_p if top.shape[-1] < vocab else torch.ones_like(mass[:, -1], dtype=torch.bool)
        keep_sorted = (mass - top) < top_p  # the most likely token is always kept (mass before it = 0)
        keep[rows[done]] = keep[rows[done]].scatter_(-1, order[done], keep_sorted[done])
        rows, k = rows[~done], (4 * k if k < _SORT_FROM else vocab)
    return probs.masked_fill(~keep, 0.0)


_SORT_FROM = 4096  # past this k a full sort of the row is cheaper than another topk


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row the first token whose cumulative probability exceeds u * total.

    Two levels, so only a small part of the vocabulary is summed in order: the mass of each block of
    ``DRAW_BLOCK`` tokens (float64) picks the block, the cumulative sum inside that block picks the token.
    A token of probability 0 is never picked.
    """
    rows, vocab = probs.shape
    pad = (-vocab) % DRAW_BLOCK
    padded = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = padded.view(rows, -1, DRAW_BLOCK)
    mass = blocks.sum(-1).double()
    cdf = mass.cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(uniforms.to(cdf.device, torch.float64).view(-1, 1) * total,
                      torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(cdf, x, right=True).clamp_(max=blocks.shape[1] - 1)
    before = cdf.gather(1, block) - mass.gather(1, block)
    inner = blocks[torch.arange(rows, device=probs.device), block.view(-1)].double().cumsum(-1)
    inner_total = inner[:, -1:]
    y = torch.minimum((x - before).clamp_(min=0.0), torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    within = torch.searchsorted(inner, y, right=True).clamp_(max=DRAW_BLOCK - 1)
    return (block * DRAW_BLOCK + within).view(-1).clamp_(max=vocab - 1)


DRAW_BLOCK = 1024


def pick(logits: torch.Tensor, sampling: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """Next token [B] for each row: greedy at temperature 0, else drawn with the row's uniform number [B]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    return draw(filter_logits(logits, sampling), uniforms)


def pick_tokens(logits: torch.Tensor, sampling: SamplingParams, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """:func:`pick` with one number drawn now from each row's generator (the step-by-step form)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    return pick(logits, sampling, torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]))


def uniforms_for(seed: int, steps: int) -> torch.Tensor:
    """The ``steps`` uniform numbers [steps] (float64) a sample seeded ``seed`` uses, one per new token.

    Equal to ``steps`` successive one-number draws from a generator seeded ``seed`` (torch's CPU generator
    fills a tensor in order), so the engine may draw them all up front.
    """
    return torch.rand(steps, generator=torch.Generator(device="cpu").manual_seed(int(seed)), dtype=torch.float64)


def stop_candidates(tokenizer, stops: Sequence[str], vocab: int) -> torch.Tensor:
    """Tokens [vocab] (bool) that can complete a stop string: only rows that just drew one need a decode.

    A stop string first appears in the text when its last character does, so the token that completes it
    decodes to text holding that character, or (a character split over byte tokens) to text holding the
    replacement character, or to nothing. Every other token leaves the set of stop strings in the text as it
    was, so its row is not decoded that step.
    """
    ends = {s[-1] for s in stops if s}
    flags = torch.zeros(vocab, dtype=torch.bool)
    if not ends:
        return flags
    texts = tokenizer.batch_decode([[t] for t in range(min(vocab, len(tokenizer)))], skip_special_tokens=False)
    for t, text in enumerate(texts):
        flags[t] = not text or "\ufffd" in text or any(c in text for c in ends)
    flags[len(texts):] = True
    return flags


def stop_window(stops: Sequence[str]) -> int:
    """Trailing tokens enough to hold any of ``stops`` even at one byte per token (UTF-8: <= 4 bytes a
    character), plus a margin for tokens that decode to nothing on their own."""
    return 4 * max(len(s) for s in stops) + 8


def tail_has_stop(tokenizer, tokens: Sequence[int], stops: Sequence[str], window: int) -> bool:
    """Whether the text of the last ``window`` of ``tokens`` holds one of ``stops``."""
    tail = tokenizer.decode(list(tokens[-window:]), skip_special_tokens=True)
    return any(s in tail for s in stops)
