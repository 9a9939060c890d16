"""Rates over clustered items and paired differences between two systems, with standard errors (pure).

A benchmark's instructions come in prompts: the instructions of one prompt share its response, so they are
not independent draws. Every estimate here is a ratio of per-prompt sums, ``R = sum_i y_i / sum_i m_i``
(prompt i contributes y_i, summed over its m_i items), and its standard error is the cluster-robust one of a
ratio estimator, with prompts as the independent units::

    SE(R) = sqrt(n / (n - 1) * sum_i (y_i - R m_i)^2) / sum_i m_i          (n prompts, n >= 2)

* instruction-level rate: y_i = instructions of prompt i followed, m_i = its instructions;
* prompt-level rate: y_i = 1 when all of them are followed, m_i = 1; the formula is then the usual standard
  error of a mean, sd(y, ddof=1) / sqrt(n);
* paired difference of two systems on the same prompts: y_i = (A's followed - B's followed) in prompt i,
  the same m_i. Instruction level: the per-instruction paired difference with a prompt-clustered SE; prompt
  level (m_i = 1): the per-prompt paired SE sd(d, ddof=1) / sqrt(n).

The SE is None below two prompts (no spread to estimate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """A ratio of per-prompt sums with its cluster-robust standard error."""

    value: float | None
    se: float | None
    n_items: int
    """sum of m_i: instructions (instruction level) or prompts (prompt level)."""
    n_prompts: int

    def as_dict(self) -> dict:
        return {"value": self.value, "se": self.se, "n": self.n_items, "n_prompts": self.n_prompts}


def ratio_estimate(sums: Sequence[float], sizes: Sequence[int]) -> Estimate:
    """``R = sum(sums) / sum(sizes)`` and its cluster-robust SE (module docstring); prompts with size 0 count
    as clusters that add nothing. ``value`` is None when no item is counted."""
    if len(sums) != len(sizes):
        raise ValueError(f"{len(sums)} per-prompt sums but {len(sizes)} sizes")
    total = sum(sizes)
    n = len(sizes)
    if total == 0:
        return Estimate(None, None, 0, n)
    rate = sum(sums) / total
    if n < 2:
        return Estimate(rate, None, total, n)
    spread = sum((y - rate * m) ** 2 for y, m in zip(sums, sizes))
    return Estimate(rate, math.sqrt(n / (n - 1) * spread) / total, total, n)


def instruction_level(followed: Sequence[Sequence[bool]]) -> Estimate:
    """Fraction of all instructions followed; ``followed[i]`` holds prompt i's verdicts."""
    return ratio_estimate([sum(map(bool, f)) for f in followed], [len(f) for f in followed])


def prompt_level(followed: Sequence[Sequence[bool]]) -> Estimate:
    """Fraction of prompts whose instructions are all followed."""
    return ratio_estimate([float(all(f)) for f in followed], [1] * len(followed))


def _check_paired(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> None:
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("paired verdicts need the same prompts with the same instructions, in the same order")


def paired_instruction_level(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> Estimate:
    """A's instruction-level rate minus B's on the same prompts, with the prompt-clustered paired SE."""
    _check_paired(a, b)
    return ratio_estimate([sum(map(bool, x)) - sum(map(bool, y)) for x, y in zip(a, b)], [len(x) for x in a])


def paired_prompt_level(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> Estimate:
    """A's prompt-level rate minus B's on the same prompts, with the per-prompt paired SE."""
    _check_paired(a, b)
    return ratio_estimate([float(all(x)) - float(all(y)) for x, y in zip(a, b)], [1] * len(a))
