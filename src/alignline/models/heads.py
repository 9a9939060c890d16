"""The parts of a scalar-head model (a reward model, rl's critic) that scoring reads directly: its backbone,
whose hidden states it takes at chosen positions, and its ``score`` head."""

from __future__ import annotations


def backbone_of(model):
    return model.base_model if hasattr(model, "base_model") else model.model


def score_head(model):
    head = getattr(model, "score", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no 'score' head; load it with load_reward_model")
    return head
