"""The engine's decode path: preallocated key/value caches, the prompt's keys stored once for all its samples.

:class:`KVDecoder` runs a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3 and their LoRA-wrapped forms) on
its own caches, calling the model's own modules for everything but attention (embedding, norms, projections,
rotary tables, MLP, head), so the weights are always the live ones (a policy trained between calls samples
from its new weights).

Two caches, both allocated once and written in place:

* the **prefix store** ``[rows, kv_heads, prompt capacity, head_dim]`` per layer: one row per prompt being
  sampled, filled by :meth:`KVDecoder.prefill` (one pass over the prompt, causal SDPA);
* the **slot store** ``[slots, kv_heads, new-token capacity, head_dim]`` per layer: one slot per sample being
  decoded, holding only that sample's own new tokens. A slot that takes a new sample just resets its length;
  nothing is copied.

A decode step (:meth:`KVDecoder.step`) attends each slot's query to its prompt's row and to its own tokens.
The prompt part runs per prompt row: the queries of all the row's slots (and all query heads of a key/value
head, so grouped-query attention never repeats key/value heads) form one matrix against the row's keys, so
the prompt's keys are read once per step for all of its samples. The two parts are merged exactly with their
log-sum-exp (the split softmax of flash attention). Its cost is the model's matmuls plus one read of each
live prompt and each slot's own tokens.

The step runs as one of two strategies over the same layer maths (:func:`alignline.generate.layers.run_step`):
:class:`LiveStep` (default) builds its inputs for the live part of the caches each step;
:class:`~alignline.generate.static_step.StaticStep` keeps fixed-shape inputs in buffers (CUDA-graph ready).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignline.generate.layers import (
    MASKED,
    DecoderLayers,
    QueryPacking,
    StepInputs,
    causal_lm_parts,
    rank_in_row,
    run_step,
)
from alignline.generate.static_step import StaticStep

# Llama-family decoders whose layers are norm -> attention -> residual -> norm -> MLP -> residual.
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def unsupported_reason(model) -> str | None:
    """Why :class:`KVDecoder` cannot run ``model`` (None when it can)."""
    lm = causal_lm_parts(model)
    config = getattr(lm, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} (supported: {', '.join(sorted(SUPPORTED))})"
    body = getattr(lm, "model", None)
    if not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(lm, "lm_head"):
        return "not a decoder of the usual layout"
    if getattr(config, "use_sliding_window", False) or (kind == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention"
    return None


class KVDecoder(DecoderLayers):
    """Prefill into prompt rows and decode slots of a Llama-family model (see the module docstring)."""

    def __init__(self, model, *, slots: int, rows: int, prompt_capacity: int, new_capacity: int):
        """``slots`` samples decode at once from ``rows`` prompt rows of up to ``prompt_capacity`` tokens, each
        sample up to ``new_capacity`` new tokens; :meth:`use_static_step` switches to fixed-shape steps."""
        super().__init__(model)
        kv = dict(device=self.device, dtype=self.dtype)
        self.prefix_k = torch.zeros(len(self.layers), rows, self.kv_heads, prompt_capacity, self.head_dim, **kv)
        self.prefix_v = torch.zeros_like(self.prefix_k)
        self.own_k = torch.zeros(len(self.layers), slots, self.kv_heads, new_capacity, self.head_dim, **kv)
        self.own_v = torch.zeros_like(self.own_k)
        self.row_len = torch.ones(rows, dtype=torch.long)  # 1, not 0: an unused row is junk, never all-masked
        self.slot_row = torch.zeros(slots, dtype=torch.long)
        self.slot_len = torch.zeros(slots, dtype=torch.long)
        self.live = LiveStep(self)
        self.static: StaticStep | None = None

    @property
    def prompt_capacity(self) -> int:
        return self.prefix_k.shape[3]

    @property
    def new_capacity(self) -> int:
        return self.own_k.shape[3]

    # ------------------------------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run ``prompts`` into prompt rows ``rows`` in one packed pass; their next-token logits [P, V] (float32).

        The prompts are concatenated, so every weight is read once for all of them; attention runs per prompt
        (causal SDPA over its own span), the linear layers over the whole pack.
        """
        lengths = [len(ids) for ids in prompts]
        assert min(lengths) > 0 and max(lengths) <= self.prompt_capacity
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device).view(1, -1)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device).view(1, -1)
        x = self.body.embed_tokens(ids)
        rotary = self.rotary(x, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self.qkv(layer, layer.input_layernorm(x), rotary)
            out = []
            for row, start, n in zip(rows, starts, lengths, strict=True):
                span = slice(start, start + n)
                self.prefix_k[i, row, :, :n] = k[0, :, span]
                self.prefix_v[i, row, :, :n] = v[0, :, span]
                out.append(F.scaled_dot_product_attention(q[:, :, span], k[:, :, span], v[:, :, span],
                                                          is_causal=True, scale=attn.scaling,
                                                          enable_gqa=self.groups > 1))
            x = self.finish_layer(layer, x, torch.cat(out, dim=2).transpose(1, 2).reshape(1, ids.shape[1], -1))
        self.row_len[rows] = torch.tensor(lengths)
        last = torch.tensor([s + n - 1 for s, n in zip(starts, lengths, strict=True)], device=self.device)
        return self.logits(x[0, last])

    # ------------------------------------------------------------------------------------------- decode

    def assign(self, slot: int, row: int) -> None:
        """Slot ``slot`` starts a new sample of the prompt in row ``row`` (no copy: its length resets)."""
        self.slot_row[slot] = row
        self.slot_len[slot] = 0

    def use_static_step(self, *, per_row: int, graph: bool) -> None:
        """Decode with :class:`~alignline.generate.static_step.StaticStep` from now on: fixed shapes, at most
        ``per_row`` samples of one prompt at once; ``graph``: replayed as a CUDA graph."""
        self.static = StaticStep(self, per_row=per_row, graph=graph)

    def keep_slots(self, slots: list[int]) -> None:
        """Keep only ``slots`` (in that order), e.g. when the queue is empty and finished slots stay idle."""
        assert self.static is None, "a static step keeps its slots"
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.own_k = self.own_k.index_select(1, index)
        self.own_v = self.own_v.index_select(1, index)
        self.slot_row, self.slot_len = self.slot_row[index.cpu()], self.slot_len[index.cpu()]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, feed: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [S] into the slots where ``feed`` [S] (bool) is set; the next logits [S, V] (float32).

        Slots not fed (just assigned, or idle) compute junk that is never stored: their length does not move,
        so their next real token overwrites what they wrote.
        """
        logits = (self.static or self.live)(tokens, feed)
        self.slot_len += feed.to(self.slot_len.device).long()
        return logits


class LiveStep:
    """The decode step over the live part of each cache only: the fastest on CPU; its shapes grow from step to
    step and it reads lengths back to the host (the other strategy:
    :class:`~alignline.generate.static_step.StaticStep`)."""

    def __init__(self, decoder: KVDecoder):
        self.decoder = decoder

    def packing(self) -> QueryPacking:
        """The rows in use, the most slots of one row, and each slot's place (None when the slots are already
        row-major, e.g. every prompt's n samples in order)."""
        d = self.decoder
        rows_used = int(d.slot_row.max()) + 1
        rank = rank_in_row(d.slot_row)
        per_row = int(rank.max()) + 1
        flat = d.slot_row * per_row + rank
        if len(flat) == rows_used * per_row and bool((flat == torch.arange(len(flat))).all()):
            return QueryPacking(rows_used, per_row, None)
        return QueryPacking(rows_used, per_row, flat.to(d.device))

    def __call__(self, tokens: torch.Tensor, feed: torch.Tensor) -> torch.Tensor:
        """The next logits [S, V] (float32); ``feed`` is not read (a slot not fed writes junk never kept)."""
        d, slots = self.decoder, tokens.shape[0]
        own_len = d.slot_len.clone()
        positions = (d.row_len[d.slot_row] + own_len).to(d.device).view(slots, 1)
        packing = self.packing()
        live_new = int(own_len.max()) + 1
        live_prompt = int(d.row_len[:packing.rows].max())
        own_bias = torch.where(torch.arange(live_new) <= own_len.view(-1, 1), 0.0, MASKED)
        prefix_bias = torch.where(torch.arange(live_prompt) < d.row_len[:packing.rows].view(-1, 1), 0.0, MASKED)
        return run_step(d, StepInputs(
            tokens=tokens.to(d.device), positions=positions, write_at=own_len.to(d.device),
            slot_index=torch.arange(slots, device=d.device),
            own_keys=live_new, own_bias=own_bias.to(d.device).view(slots, 1, 1, live_new),
            prompt_keys=live_prompt, prompt_bias=prefix_bias.to(d.device).view(packing.rows, 1, 1, live_prompt),
            packing=packing))
