"""The loop's walk through its plan: steps per epoch, the steps from a resume position on, and the position
after a step (what a checkpoint records)."""

from __future__ import annotations

import math
from collections.abc import Callable

from alignline.errors import AlignlineError

START = {"step": 0, "epoch": 0, "step_in_epoch": 0}
"""Where a run that resumes nothing starts."""


def count_steps(plan: Callable[[int], list], epochs: int, max_steps: int | None, per_step: int
                ) -> tuple[list[int], int]:
    """Optimizer steps in each epoch, and in the whole run (``max_steps`` caps it)."""
    steps_per_epoch = [math.ceil(len(plan(e)) / per_step) for e in range(epochs)]
    total_steps = sum(steps_per_epoch)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    if total_steps == 0:
        raise AlignlineError("no training data: the plan has no micro-batches (check the data and max_length)")
    return steps_per_epoch, total_steps


def steps_from(plan: Callable[[int], list[list]], steps_per_epoch: list[int], per_step: int,
               position: dict[str, int], epoch_start: Callable[[int], None] | None = None):
    """(epoch, step within the epoch, that step's micro-batches across processes) from ``position`` on; an
    epoch's plan is built, and ``epoch_start(epoch)`` called, when the epoch's first step to run is reached."""
    for epoch in range(position["epoch"], len(steps_per_epoch)):
        micro_batches = plan(epoch)
        first = position["step_in_epoch"] if epoch == position["epoch"] else 0
        if epoch_start is not None and first < steps_per_epoch[epoch]:
            epoch_start(epoch)
        for index in range(first, steps_per_epoch[epoch]):
            yield epoch, index, micro_batches[index * per_step: (index + 1) * per_step]


def position_after(step: int, epoch: int, index: int, steps_in_epoch: int) -> dict[str, int]:
    """The resume position after step ``index`` of ``epoch`` (the next epoch's start after its last step)."""
    if index + 1 == steps_in_epoch:
        return {"step": step, "epoch": epoch + 1, "step_in_epoch": 0}
    return {"step": step, "epoch": epoch, "step_in_epoch": index + 1}


def every(interval: int | None, step: int) -> bool:
    return bool(interval) and step % interval == 0
