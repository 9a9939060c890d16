"""Whether a checkpoint's safetensors files are whole, read from their headers alone.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (each tensor's dtype, shape and
``data_offsets`` into the data section) and the data section, which the tensors must cover exactly. A cut copy
(an interrupted download, a full disk) otherwise reaches the user as safetensors' ``incomplete metadata, file not
fully covered``, naming no file; :func:`check_safetensors_files` names the file, its size and what is wrong before
any loader opens it. Reading the headers costs a few kB per file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from alignline.errors import ModelError

MAX_HEADER = 100_000_000
"""safetensors' own limit on the JSON header (bytes)."""


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file ``path`` (cut, padded, header unreadable), or None."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "it is cut short: too small to hold even the header's length"
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            return (f"it is cut short or not a safetensors file: its first 8 bytes announce a {n:,}-byte header "
                    f"and the file has {size - 8:,} bytes after them")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not the JSON table of tensors a safetensors file starts with"
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"it is cut short: its tensors need {need:,} bytes, {need - size:,} more than it holds"
    if size > need:
        return f"it has {size - need:,} bytes after its last tensor (not a file safetensors wrote)"
    return None


def _indexed_shards(directory: Path) -> list[Path]:
    """The weight files a ``*.safetensors.index.json`` names (a sharded checkpoint); a missing one is an error."""
    out = []
    for index in sorted(directory.glob("*.safetensors.index.json")):
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index} cannot be read as a safetensors index ({exc}); copy or save the model "
                             "again") from None
        missing = sorted(n for n in names if not (directory / n).is_file())
        if missing:
            raise ModelError(f"{index} names weight files that are missing: {', '.join(missing[:5])}; copy the "
                             "whole model directory again")
        out += [directory / n for n in sorted(names)]
    return out


def check_safetensors_files(directory: Path) -> None:
    """A :class:`ModelError` naming the first damaged ``*.safetensors`` file of ``directory`` (its size and what
    is wrong), or a missing shard of its index."""
    files = dict.fromkeys([*sorted(directory.glob("*.safetensors")), *_indexed_shards(directory)])
    for path in files:
        problem = safetensors_problem(path)
        if problem is not None:
            raise ModelError(f"{path} ({path.stat().st_size:,} bytes) is damaged: {problem}. A copy or download "
                             "that stopped early, or a full disk, leaves such a file: copy or save the model again")
