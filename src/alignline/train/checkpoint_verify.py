"""Checkpoints that prove they are whole: sizes and sha256 of every file, recorded in the ``COMPLETE`` marker.

``save_checkpoint`` writes every file of ``checkpoints/step-NNNNNNN/`` and then the marker, which lists each
file's size and sha256. Before resuming, :func:`resume_checkpoint` checks the newest complete checkpoint
against its marker; a file that is missing, cut or changed is named, the checkpoint is moved aside to
``checkpoints/damaged-step-NNNNNNN`` (so retention never keeps it over a good one) and the previous complete
checkpoint is tried, down to none (a fresh start). Resuming from an older checkpoint replays the same steps, so
the result equals an uninterrupted run. A marker written before checksums were recorded (``ok``) is trusted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from alignline.data.io import fingerprint  # a file's sha256

COMPLETE = "COMPLETE"
"""The marker written last into a checkpoint directory: its files' sizes and sha256 (JSON)."""
DAMAGED_PREFIX = "damaged-"


def marker_bytes(ckpt: Path) -> bytes:
    """The ``COMPLETE`` marker's content for the files now in ``ckpt``."""
    files = {p.name: {"size": p.stat().st_size, "sha256": fingerprint(p)}
             for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != COMPLETE and not p.name.startswith(".")}
    return (json.dumps({"files": files}, indent=2) + "\n").encode()


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with ``ckpt`` (naming the damaged file), or None when every recorded file is there with
    its recorded size and sha256."""
    try:
        recorded = json.loads((ckpt / COMPLETE).read_text())["files"]
    except (OSError, UnicodeDecodeError):
        return f"its {COMPLETE} marker cannot be read"
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a marker from before checksums were recorded: trusted, as then
    for name, want in recorded.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is damaged: {size:,} bytes, {want['size']:,} when it was written"
        if fingerprint(path) != want["sha256"]:
            return f"{name} is damaged: its sha256 differs from the one recorded when it was written"
    return None


def newest_intact(ckpts: list[Path], say: Callable[[str], object] = print) -> Path | None:
    """The newest of ``ckpts`` (sorted oldest first) that passes :func:`checkpoint_problem`; each damaged one
    newer than it is named and moved aside."""
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
        shutil.rmtree(aside, ignore_errors=True)
        ckpt.rename(aside)
        say(f"checkpoint {ckpt} cannot be resumed: {problem}. Moved it to {aside}; "
            "falling back to the previous complete checkpoint" + ("" if ckpt != ckpts[0] else " (none: starting over)"))
    return None


def resume_checkpoint(accelerator, ckpts: list[Path]) -> Path | None:
    """The checkpoint every process resumes from: the main process verifies (each file read once) and tells
    the others."""
    choice = newest_intact(ckpts, accelerator.print) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [str(choice) if choice is not None else None]
        broadcast_object_list(box)
        choice = Path(box[0]) if box[0] is not None else None
    return choice
