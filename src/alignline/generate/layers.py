"""The per-layer maths both decode steps share (:mod:`alignline.generate.decoder`'s live step and
:mod:`alignline.generate.static_step`'s fixed-shape one): the model's own modules for everything but attention
(embedding, norms, projections, rotary tables, MLP, head), attention split in two parts (a prompt row and a
slot's own tokens) and their exact merge by log-sum-exp (the split softmax of flash attention).
"""

from __future__ import annotations

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


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor):
    """Softmax attention of ``q`` [N, kvH, M, d] to ``k``/``v`` [N, kvH, L, d] split for merging.

    Returns (unnormalised output [N, kvH, M, d], row max [N, kvH, M, 1], sum of exp [N, kvH, M, 1]), all
    float32 (half-precision weights keep their matmuls, not their softmax, in half precision).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).add_(bias)
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    return torch.matmul(weights.to(v.dtype), v).float(), top, weights.sum(dim=-1, keepdim=True)


def merge(a, b) -> torch.Tensor:
    """One softmax over the keys of two partial attentions (out, max, sum): the exact combined output."""
    (out_a, top_a, sum_a), (out_b, top_b, sum_b) = a, b
    top = torch.maximum(top_a, top_b)
    scale_a, scale_b = torch.exp(top_a - top), torch.exp(top_b - top)
    return (out_a * scale_a + out_b * scale_b) / (sum_a * scale_a + sum_b * scale_b)
