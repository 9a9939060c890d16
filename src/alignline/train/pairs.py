"""Preference pairs as tensors, and their per-sequence log-probabilities.

**Prefix-shared layout** (default). One row holds ``prompt + chosen + rejected``. A 4-D additive
attention mask lets chosen tokens see the prompt and earlier chosen tokens, and rejected tokens see the
prompt and earlier rejected tokens but never the chosen ones; rejected positions continue from the end
of the prompt. The prompt is therefore computed once per pair. The first rejected token is predicted
from the last prompt position, exactly as in a separate ``prompt + rejected`` sequence.

**Separate layout** (``prompt + chosen`` and ``prompt + rejected`` as two padded rows, plain causal
mask): for attention kernels that take no arbitrary mask (e.g. FlashAttention-2), and as the reference
the shared layout is tested against.

Either way the LM head runs only on positions that predict a response token (``logits_to_keep``), and
log-probs are taken with a log-sum-exp per kept position, never a full ``log_softmax`` copy.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from alignline.data.chat import tokenise_prompt_response
from alignline.data.records import Pair
from alignline.errors import DataError

Layout = Literal["shared", "separate"]


@dataclass(frozen=True)
class TokenisedPair:
    """One preference pair as token ids, as :func:`collate_pairs` takes it. Stages add what they know later
    (``dataclasses.replace``): rm its rating margin, dpo / tso the reference log-probs."""

    id: str
    """The Pair record's id."""
    prompt_ids: list[int]
    """The rendered prompt (history + generation prompt)."""
    chosen_ids: list[int]
    """The chosen response, ending with its end token (cut to fit max_length)."""
    rejected_ids: list[int]
    """The rejected response, likewise."""
    rating: str | None = None
    """The Pair's rating level, if it has one."""
    margin: float | None = None
    """rm's margin_by_rating margin inside the Bradley-Terry loss; None: no margin."""
    reference_chosen: float | None = None
    """The reference model's log-prob of the chosen response (dpo / tso; None before the reference pass)."""
    reference_rejected: float | None = None
    """... and of the rejected one."""

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)


def tokenise_pairs(pairs: Sequence[Pair], tokenizer, *, max_length: int, counts: Counter,
                   max_drop_fraction: float = 0.1, where: str = "pairs", keep_tail: bool = False,
                   dropped_on_read: int = 0) -> list[TokenisedPair]:
    """Token ids per pair (responses end with their end token).

    Responses are cut so that ``prompt + response`` fits ``max_length``. Dropped and counted: chosen equal
    to rejected (as text, or as tokens after cutting), a prompt that leaves no room for a response, an
    empty response. More than ``max_drop_fraction`` dropped is an error; ``dropped_on_read`` pairs of the file
    that were already dropped when it was read count towards it.
    """
    out = []
    for p in pairs:
        if p.chosen.strip() == p.rejected.strip():
            counts["dropped_identical_text"] += 1
            continue
        prompt, chosen = tokenise_prompt_response(tokenizer, p.prompt, p.chosen, where=f"{where}: pair {p.id}",
                                                  keep_tail=keep_tail)
        _, rejected = tokenise_prompt_response(tokenizer, p.prompt, p.rejected, where=f"{where}: pair {p.id}",
                                               keep_tail=keep_tail)
        room = max_length - len(prompt)
        if room < 1:
            counts["dropped_prompt_too_long"] += 1
            continue
        if len(chosen) > room or len(rejected) > room:
            counts["responses_truncated"] += 1
        chosen, rejected = chosen[:room], rejected[:room]
        if not chosen or not rejected:
            counts["dropped_empty_response"] += 1
            continue
        if chosen == rejected:
            counts["dropped_identical_after_truncation"] += 1
            continue
        out.append(TokenisedPair(id=p.id, prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected,
                                 rating=p.rating))
    total = len(pairs) + dropped_on_read
    dropped = total - len(out)
    counts["pairs_in"] += total
    counts["pairs_kept"] += len(out)
    if total and dropped / total > max_drop_fraction:
        reasons = {k: v for k, v in counts.items() if k.startswith("dropped")}
        raise DataError(
            f"{dropped} of {total} pairs ({dropped / total:.0%}) would be dropped {reasons}, more than "
            f"data.max_drop_fraction={max_drop_fraction}; fix the data, raise data.max_length, or raise the fraction",
            path=where,
        )
    return out


def pair_length(pair: TokenisedPair, layout: Layout) -> int:
    """Tokens of the pair's row (shared layout), or of its longer row (separate layout)."""
    if layout == "shared":
        return pair.prompt_length + len(pair.chosen_ids) + len(pair.rejected_ids)
    return pair.prompt_length + max(len(pair.chosen_ids), len(pair.rejected_ids))


def plan_bucketed(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: int = 32,
                  micro_batch_size: int | None = None) -> list[list[int]]:
    """Seeded batches of similar length (less padding): shuffle, sort within windows of ``bucket``
    batches, then shuffle the batches.

    With ``micro_batch_size`` smaller than ``batch_size`` (gradient accumulation), each batch is split
    into consecutive micro-batches and a short batch goes last, so an optimizer step of
    ``batch_size / micro_batch_size`` micro-batches holds the same examples whatever the split.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s: s + window], key=lambda i: lengths[i])
        batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    if micro_batch_size is None or micro_batch_size >= batch_size:
        return batches
    batches.sort(key=lambda b: len(b) < batch_size)  # stable: only a short batch moves, to the end
    return [b[i: i + micro_batch_size] for b in batches for i in range(0, len(b), micro_batch_size)]


def collate_pairs(examples: Sequence[TokenisedPair], pad_id: int, layout: Layout = "shared"
                  ) -> dict[str, torch.Tensor]:
    """Tensors for :func:`pair_logps`. Targets are described by flat index lists:

    ``src``: for each response token, the (row, position) whose output predicts it, as an index into the
    kept positions; ``tgt``: the token id; ``seg``: 0 chosen / 1 rejected; ``pair``: the pair's index.
    """
    rows: list[tuple[list[int], list[int]]] = []  # (token ids, position ids)
    targets: list[tuple[int, int, int, int, int]] = []  # (row, predicting position, token, segment, pair)
    blocks: list[list[tuple[int, int]]] = []  # per row: [(start, end) of chosen], for the mask
    ends: list[tuple[int, int, int, int]] = []  # per pair: (row, last chosen pos, row, last rejected pos)
    for b, ex in enumerate(examples):
        p, c, r = ex.prompt_ids, ex.chosen_ids, ex.rejected_ids
        P, C = len(p), len(c)
        if layout == "shared":
            rows.append((p + c + r, list(range(P + C)) + list(range(P, P + len(r)))))
            blocks.append([(P, P + C), (P + C, P + C + len(r))])
            ends.append((len(rows) - 1, P + C - 1, len(rows) - 1, P + C + len(r) - 1))
            targets += [(len(rows) - 1, P - 1 + j, t, 0, b) for j, t in enumerate(c)]
            targets += [(len(rows) - 1, (P - 1) if j == 0 else (P + C + j - 1), t, 1, b) for j, t in enumerate(r)]
        else:
            ends.append((len(rows), P + C - 1, len(rows) + 1, P + len(r) - 1))
            for seg, resp in ((0, c), (1, r)):
                rows.append((p + resp, list(range(P + len(resp)))))
                blocks.append([])
                targets += [(len(rows) - 1, P - 1 + j, t, seg, b) for j, t in enumerate(resp)]
    width = max(len(ids) for ids, _ in rows)
    batch, lengths = row_tensors(rows, targets, pad_id)
    batch = {
        **batch,
        "tgt": torch.tensor([t[2] for t in targets]),
        "seg": torch.tensor([t[3] for t in targets]),
        "pair": torch.tensor([t[4] for t in targets]),
        "n_pairs": torch.tensor(len(examples)),
        "n_tokens": lengths.sum(),  # real (non-padding) tokens, for the loop's token count
        "ends": torch.tensor(ends, dtype=torch.long),
    }
    if layout == "shared":
        # allowed[q, k]: causal, within the row's length, and rejected queries never see chosen keys
        idx = torch.arange(width)
        allowed = (idx[None, :] <= idx[:, None]).unsqueeze(0) & (idx[None, None, :] < lengths[:, None, None])
        for i, ((c0, c1), (r0, r1)) in enumerate(blocks):
            allowed[i, r0:r1, c0:c1] = False
        allowed |= torch.eye(width, dtype=torch.bool).unsqueeze(0)  # padding rows attend to themselves
        batch["allowed"] = allowed.unsqueeze(1)
    else:
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    if all(ex.margin is not None for ex in examples):
        batch["margin"] = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)
    if all(ex.reference_chosen is not None for ex in examples):
        batch["ref_chosen"] = torch.tensor([ex.reference_chosen for ex in examples], dtype=torch.float64)
        batch["ref_rejected"] = torch.tensor([ex.reference_rejected for ex in examples], dtype=torch.float64)
    return batch


def row_tensors(rows: Sequence[tuple[list[int], list[int]]], targets: Sequence[tuple[int, int, Any, ...]],
                pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded ``input_ids`` / ``position_ids`` of ``rows`` (token ids, position ids), the ``keep`` mask of
    the positions named by ``targets`` ((row, predicting position, ...) each) and ``src`` (each target's index
    into the kept positions); and the row lengths."""
    width = max(len(ids) for ids, _ in rows)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    for i, (ids, pos) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        position_ids[i, : len(ids)] = torch.tensor(pos)
    keep = torch.zeros((B, width), dtype=torch.bool)
    t_row = torch.tensor([t[0] for t in targets])
    t_pos = torch.tensor([t[1] for t in targets])
    keep[t_row, t_pos] = True
    flat = (keep.flatten().cumsum(0) - 1).view(B, width)
    return {"input_ids": input_ids, "position_ids": position_ids, "keep": keep, "src": flat[t_row, t_pos]}, lengths


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def padded_width(batch: dict[str, torch.Tensor], multiple: int | None = None) -> dict[str, torch.Tensor]:
    """``batch`` with its rows right-padded to a multiple of ``multiple`` tokens (default: 16 on CUDA, else 1).

    On GPUs the memory-efficient attention kernel wants the 4-D mask's last dimension aligned; an odd
    width makes PyTorch copy and pad the mask on every layer or pick a slower kernel. Padding positions are
    never kept (``keep`` False) and attend only to themselves, so results are unchanged.
    """
    ids = batch["input_ids"]
    if multiple is None:
        multiple = 16 if ids.is_cuda else 1
    B, W = ids.shape
    extra = -W % multiple
    if extra == 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.nn.functional.pad(ids, (0, extra), value=int(ids[0, -1]))
    out["position_ids"] = torch.nn.functional.pad(batch["position_ids"], (0, extra))
    out["keep"] = torch.nn.functional.pad(batch["keep"], (0, extra), value=False)
    if "allowed" in batch:
        allowed = torch.nn.functional.pad(batch["allowed"], (0, extra, 0, extra), value=False)
        idx = torch.arange(W, W + extra, device=ids.device)
        allowed[:, :, idx, idx] = True
        out["allowed"] = allowed
    if "attention_mask" in batch:
        out["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra))
    return out


def model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """input_ids, position_ids and the attention mask (4-D additive for the shared layout); pass a batch
    through :func:`padded_width` first."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "allowed" in batch:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else _model_dtype(model)
        mask = torch.zeros(batch["allowed"].shape, dtype=dtype, device=batch["allowed"].device)
        kwargs["attention_mask"] = mask.masked_fill(~batch["allowed"], torch.finfo(dtype).min)
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    return kwargs


_ROWS = 64
"""Rows of [N, V] logits processed at a time by the token log-prob pieces (bounds their temporaries)."""


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits, -1)`` for [N, V] logits, ``_ROWS`` rows at a time (no [N, V] temporary)."""
    return torch.cat([torch.logsumexp(logits[s: s + _ROWS], dim=-1) for s in range(0, logits.shape[0], _ROWS)])


class _TargetLogps(torch.autograd.Function):
    """``log_softmax(logits)[src, tgt]`` for flat ``logits`` [N, V], with index tensors ``src``, ``tgt`` [T];
    returns [T]. The same values as ``logits[src, tgt] - logsumexp(logits, -1)[src]``, with less memory:
    the log-sum-exp runs over row chunks (no [N, V] temporary), and the backward turns the saved logits
    into their gradient in place, ``g * (onehot(tgt) - softmax)`` summed per row, instead of allocating a
    softmax, a scattered one-hot and their sum. The logits must not be needed by anything else (they are
    the LM head's output here; its backward needs only its input and weight)."""

    @staticmethod
    def forward(ctx, logits, src, tgt):
        lse = _row_logsumexp(logits)
        ctx.save_for_backward(logits, lse, src, tgt)
        ctx.used = False
        return logits[src, tgt] - lse[src]

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("token log-probs: backward ran twice over the same graph (its logits were reused "
                               "in place); do not use retain_graph=True here")
        ctx.used = True
        logits, lse, src, tgt = ctx.saved_tensors
        per_row = torch.zeros_like(lse).index_add_(0, src, grad.to(lse.dtype))
        for s in range(0, logits.shape[0], _ROWS):
            chunk = logits[s: s + _ROWS]
            chunk.sub_(lse[s: s + _ROWS, None]).exp_().mul_(-per_row[s: s + _ROWS, None])
        logits.index_put_((src, tgt), grad.to(logits.dtype), accumulate=True)
        return logits, None, None


def token_logps(logits: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Log-probability of token ``tgt[i]`` under row ``src[i]`` of ``logits`` [N, V]; [T]. See
    :class:`_TargetLogps` (the logits are overwritten by the backward)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TargetLogps.apply(logits, src, tgt)
    return logits[src, tgt] - _row_logsumexp(logits)[src]


class PairLogps(NamedTuple):
    """Per-pair log-probs of the responses (summed over their tokens, or averaged) and their token counts."""

    chosen: torch.Tensor
    """[B] chosen responses' log-probs."""
    rejected: torch.Tensor
    """[B] rejected responses' log-probs."""
    chosen_lengths: torch.Tensor
    """[B] chosen responses' token counts (float)."""
    rejected_lengths: torch.Tensor
    """[B] rejected responses' token counts (float)."""


def pair_logps(model, batch: dict[str, torch.Tensor], *, length_normalize: bool = False) -> PairLogps:
    """Chosen and rejected log-probs per pair, summed over tokens (or averaged when ``length_normalize``),
    with the response lengths."""
    padded = padded_width(batch)
    out = model(**model_inputs(model, padded), logits_to_keep=padded["keep"], use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    del out  # the backward overwrites the logits in place: nothing else may hold them
    per_token = token_logps(logits, batch["src"], batch["tgt"])
    B = int(batch["n_pairs"])
    slot = batch["pair"] * 2 + batch["seg"]  # even slots: chosen, odd: rejected
    sums = torch.zeros(2 * B, dtype=per_token.dtype, device=per_token.device).index_add(0, slot, per_token)
    counts = torch.zeros(2 * B, dtype=per_token.dtype, device=per_token.device).index_add(
        0, slot, torch.ones_like(per_token))
    if length_normalize:
        sums = sums / counts.clamp(min=1)
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])
