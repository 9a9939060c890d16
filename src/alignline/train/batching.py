"""Micro-batches for causal-LM training: padding or padding-free packing, planned deterministically.

A *plan* is the list of micro-batches of one epoch, as lists of example indices; it depends only on the
seed, the epoch and the example lengths, so a resumed run rebuilds exactly the same plan and skips the
micro-batches already consumed.

Packing concatenates examples into one row with ``position_ids`` restarting at 0 for each example and no
attention mask: transformers then builds a block-diagonal causal mask from the position resets, so no
example attends to another. The first token of each example is never a target (as in the unpacked case,
where it has no left context).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from alignline.data.chat import IGNORE


def shuffled(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def plan_padded(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Micro-batches of ``batch_size`` examples in a seeded order."""
    order = shuffled(len(lengths), seed, epoch) if shuffle else list(range(len(lengths)))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def pack_rows(lengths: Sequence[int], order: Sequence[int], max_length: int, window: int = 8) -> list[list[int]]:
    """Greedy first-fit of examples (in ``order``) into rows of at most ``max_length`` tokens.

    Only the ``window`` most recent rows stay open, so the order stays close to the shuffled one.
    """
    rows: list[list[int]] = []
    open_rows: list[tuple[int, list[int]]] = []
    for idx in order:
        n = lengths[idx]
        for j, (used, members) in enumerate(open_rows):
            if used + n <= max_length:
                members.append(idx)
                open_rows[j] = (used + n, members)
                break
        else:
            open_rows.append((n, [idx]))
        if len(open_rows) > window:
            rows.append(open_rows.pop(0)[1])
    rows.extend(members for _, members in open_rows)
    return rows


def plan_packed(lengths: Sequence[int], max_length: int, rows_per_batch: int, seed: int, epoch: int,
                shuffle: bool = True) -> list[list[list[int]]]:
    """Micro-batches of ``rows_per_batch`` packed rows, each row a list of example indices."""
    order = shuffled(len(lengths), seed, epoch) if shuffle else list(range(len(lengths)))
    rows = pack_rows(lengths, order, max_length)
    return [rows[i: i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


def collate_padded(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(rows: Sequence[Sequence[dict[str, Any]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of concatenated examples; ``position_ids`` restart at 0 per example (and for the padding tail,
    which thus forms its own block and is never attended to by real tokens)."""
    packed = []
    for row in rows:
        ids, labels, pos = [], [], []
        for e in row:
            ids.extend(e["input_ids"])
            lab = list(e["labels"])
            lab[0] = IGNORE  # the first token of an example is never a target
            labels.extend(lab)
            pos.extend(range(len(e["input_ids"])))
        packed.append((ids, labels, pos))
    width = max(len(p[0]) for p in packed)
    out_ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(packed), width), IGNORE, dtype=torch.long)
    out_pos = torch.zeros((len(packed), width), dtype=torch.long)
    for i, (ids, labels, pos) in enumerate(packed):
        n = len(ids)
        out_ids[i, :n] = torch.tensor(ids)
        out_labels[i, :n] = torch.tensor(labels)
        out_pos[i, :n] = torch.tensor(pos)
        out_pos[i, n:] = torch.arange(width - n)
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos,
            "n_tokens": torch.tensor(sum(len(p[0]) for p in packed))}  # real (non-padding) tokens


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Trained tokens of a batch (positions whose label is not IGNORE, excluding each row's first)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


