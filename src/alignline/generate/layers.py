"""The per-layer maths both decode steps share (:mod:`alignline.generate.decoder`'s live step and
:mod:`alignline.generate.static_step`'s fixed-shape one): the model's own modules for everything but attention
(embedding, norms, projections, rotary tables, MLP, head), attention split in two parts (a prompt row and a
slot's own tokens) and their exact merge by log-sum-exp (the split softmax of flash attention).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MASKED = -1e30
"""The attention bias of a masked key (float32 scores; finite: a fully masked junk row gives junk, never NaN)."""


def causal_lm_parts(model):
    """The transformers causal LM inside ``model`` (a PEFT wrapper is looked through; its layers stay)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayers:
    """The parts of a Llama-family causal LM a decode step calls (a PEFT wrapper is looked through; its layers
    stay, so the weights are always the live ones)."""

    def __init__(self, model):
        lm = causal_lm_parts(model)
        self.body, self.head = lm.model, lm.lm_head
        self.layers = list(self.body.layers)
        attn = self.layers[0].self_attn
        config = lm.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        weight = self.body.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype

    def rotary(self, x: torch.Tensor, positions: torch.Tensor):
        """The rotary tables (cos, sin) [B, 1, T, d] for ``positions`` [B, T], computed once per pass."""
        cos, sin = self.body.rotary_emb(x, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def qkv(self, layer, x: torch.Tensor, rotary):
        """Queries [B, H, T, d] and keys/values [B, kvH, T, d] of ``x`` [B, T, hidden], rotary applied."""
        attn = layer.self_attn
        batch, length = x.shape[:2]
        q = attn.q_proj(x).view(batch, length, self.heads, self.head_dim)
        k = attn.k_proj(x).view(batch, length, self.kv_heads, self.head_dim)
        v = attn.v_proj(x).view(batch, length, self.kv_heads, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rotary
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def finish_layer(self, layer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + layer.self_attn.o_proj(attended)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body.norm(x)).float()


def rank_in_row(slot_row: torch.Tensor) -> torch.Tensor:
    """Each slot's rank [S] among the slots of the same row, in slot order (rows [0, 0, 2, 0] -> [0, 1, 0, 2])."""
    order = torch.argsort(slot_row, stable=True)
    sorted_rows = slot_row[order]
    first = torch.searchsorted(sorted_rows, sorted_rows, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=slot_row.device) - first
    return rank


class Partial(NamedTuple):
    """A softmax attention split for merging (all float32): the unnormalised output [N, kvH, M, d], each query's
    score maximum [N, kvH, M, 1] and its sum of exp(score - maximum) [N, kvH, M, 1]."""

    out: torch.Tensor
    top: torch.Tensor
    total: torch.Tensor


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      bias: torch.Tensor) -> Partial:
    """Softmax attention of ``q`` [N, kvH, M, d] to ``k``/``v`` [N, kvH, L, d] split for merging.

    Returns (unnormalised output [N, kvH, M, d], row max [N, kvH, M, 1], sum of exp [N, kvH, M, 1]), all
    float32 (half-precision weights keep their matmuls, not their softmax, in half precision).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).add_(bias)
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    return Partial(torch.matmul(weights.to(v.dtype), v).float(), top, weights.sum(dim=-1, keepdim=True))


def merge(a: Partial, b: Partial) -> torch.Tensor:
    """One softmax over the keys of two partial attentions (out, max, sum): the exact combined output."""
    (out_a, top_a, sum_a), (out_b, top_b, sum_b) = a, b
    top = torch.maximum(top_a, top_b)
    scale_a, scale_b = torch.exp(top_a - top), torch.exp(top_b - top)
    return (out_a * scale_a + out_b * scale_b) / (sum_a * scale_a + sum_b * scale_b)


class QueryPacking(NamedTuple):
    """Where each slot's queries sit in the prompt part's query matrices: row r's ``per_row`` query slots at
    positions ``r x per_row ..``, so all samples of a prompt (and all query heads of a key/value head) form one
    matrix against the row's keys, which are then read once for all of them."""

    rows: int
    """Prompt rows 0..rows-1 attended."""
    per_row: int
    """Query slots per row."""
    index: torch.Tensor | None
    """Slot s's position [S] in the packed matrix; None: slot s already sits at position s (row-major slots)."""
    spare: int = 0
    """Positions past ``rows x per_row`` for slots not fed this step: they attend nothing (sum of exp 1, never
    0 / 0) and no row's matrix reads them."""


def attend_prompts(prefix_k: torch.Tensor, prefix_v: torch.Tensor, q: torch.Tensor, packing: QueryPacking, keys: int,
                   scale: float, bias: torch.Tensor) -> Partial:
    """Each slot's partial attention to its prompt row: its queries ``q`` [S, kvH, g, d] packed by ``packing``
    against the first ``keys`` keys of one layer's prompt rows ``prefix_k``/``prefix_v`` [rows, kvH, L, d]."""
    slots, kv, g, d = q.shape
    packed_rows = packing.rows * packing.per_row
    if packing.index is not None:
        packed = q.new_zeros(packed_rows + packing.spare, kv, g, d)
        packed[packing.index] = q
        q = packed
    rows = q[:packed_rows].view(packing.rows, packing.per_row, kv, g, d).transpose(1, 2)
    out, top, total = partial_attention(rows.reshape(packing.rows, kv, packing.per_row * g, d),
                                        prefix_k[:packing.rows, :, :keys], prefix_v[:packing.rows, :, :keys], scale,
                                        bias)
    merged = torch.cat([out, top, total], dim=-1).view(packing.rows, kv, packing.per_row, g, d + 2).transpose(1, 2)
    merged = merged.reshape(packed_rows, kv, g, d + 2)
    if packing.spare:
        spare = merged.new_zeros(packing.spare, kv, g, d + 2)
        spare[..., d + 1] = 1.0
        merged = torch.cat([merged, spare])
    if packing.index is not None:
        merged = merged[packing.index]
    return Partial(merged[..., :d], merged[..., d: d + 1], merged[..., d + 1:])


class StepInputs(NamedTuple):
    """What one decode step reads besides the caches, all on the model's device (a strategy builds them: the
    live step fresh each step, the static step in buffers allocated once)."""

    tokens: torch.Tensor
    """The token fed to each slot [S]."""
    positions: torch.Tensor
    """Each slot's position in its sequence [S, 1] (prompt length + own tokens so far)."""
    write_at: torch.Tensor
    """Where each slot's new key/value goes in its own cache [S]."""
    slot_index: torch.Tensor
    """0..S-1 [S]."""
    own_keys: int
    """Own-cache positions attended (the live ones, or the whole capacity)."""
    own_bias: torch.Tensor
    """[S, 1, 1, own_keys]: 0 where a slot's own key is live, :data:`MASKED` elsewhere."""
    prompt_keys: int
    """Prompt positions attended."""
    prompt_bias: torch.Tensor
    """[rows, 1, 1, prompt_keys]: 0 within a row's prompt, :data:`MASKED` past it."""
    packing: QueryPacking


def run_step(decoder, step: StepInputs) -> torch.Tensor:
    """One decode step of ``decoder`` (a :class:`~alignline.generate.decoder.KVDecoder`): each slot's key/value
    written into its own cache, attention to its prompt row and its own tokens merged exactly; the next logits
    [S, V] (float32). No host reads: a CUDA graph can capture it."""
    d, slots = decoder, step.tokens.shape[0]
    x = d.body.embed_tokens(step.tokens.view(slots, 1))
    rotary = d.rotary(x, step.positions)
    for i, layer in enumerate(d.layers):
        q, k, v = d.qkv(layer, layer.input_layernorm(x), rotary)
        d.own_k[i, step.slot_index, :, step.write_at] = k[:, :, 0]
        d.own_v[i, step.slot_index, :, step.write_at] = v[:, :, 0]
        q = q.view(slots, d.kv_heads, d.groups, d.head_dim)
        scale = layer.self_attn.scaling
        prompt_part = attend_prompts(d.prefix_k[i], d.prefix_v[i], q, step.packing, step.prompt_keys, scale,
                                     step.prompt_bias)
        own = partial_attention(q, d.own_k[i, :, :, :step.own_keys], d.own_v[i, :, :, :step.own_keys], scale,
                                step.own_bias)
        x = d.finish_layer(layer, x, merge(prompt_part, own).to(x.dtype).reshape(slots, 1, -1))
    return d.logits(x[:, -1])
