"""Directories written next to their final place and renamed into it, so a reader never sees half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from alignline.errors import ModelError


def _tmp_dir_for(final: Path) -> Path:
    """A fresh directory next to ``final`` (same filesystem, so it can be renamed into place)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the finished model should be as readable as a normal directory
    return tmp


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing whatever is there."""
    if final.is_symlink() or final.is_file():
        raise ModelError(f"{final} exists and is not a directory; remove it or choose another output path")
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
