"""Token-level causal-LM computations that never materialise full-vocabulary logits for untrained tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignline.data.chat import IGNORE


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask [B, L] of positions whose next token is a target, the targets in mask order)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


def forward_selected_logits(model, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the ``keep`` positions only (the LM head runs on those hidden states alone)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
    return out.logits.reshape(-1, out.logits.shape[-1])


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Summed next-token cross-entropy over trained tokens, and their count.

    The caller divides by the number of trained tokens in the whole optimizer step (over micro-batches and
    processes), so the loss is a per-token mean that does not depend on how the step is split.
    """
    keep, targets = target_positions(batch["labels"])
    n = int(targets.numel())
    if n == 0:
        # keeps the graph connected so every process runs the same backward under DDP
        return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0, 0, {}
    logits = forward_selected_logits(model, batch, keep)
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, n, {}
