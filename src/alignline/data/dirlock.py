"""One process per output directory: an exclusive OS file lock held for as long as a stage writes there.

The lock is ``flock`` on ``<dir>/.alignline.lock`` (``.alignline.<part>.lock`` for one share of a directory that
several machines fill together, e.g. sample's ``shard``). The kernel releases it when the process ends, however
it ends, so a crashed or killed run never leaves a lock that blocks the next one. The holder writes its pid, host
and start time into the file, so a refused process can say who holds it; the file is removed on release (a
killed holder leaves it behind, harmless: only the kernel lock counts, and fingerprints skip it).

Within one process the lock is re-entrant (``tso-loop`` and ``self-reward`` run their sub-stages, a pipeline its
stages, while holding an outer lock). Under ``accelerate launch`` / ``torchrun`` only the launch's main process
(``RANK`` 0) takes it: the other processes of that launch share the directory with it, and a second launch's other
processes wait at their first collective for a main process that was refused and exits. A directory that cannot
be written is a ConfigError; a filesystem that cannot lock (some network mounts) is warned about, and the stage runs
unguarded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from alignline.errors import ConfigError, DirectoryBusyError

LOCK_PREFIX, LOCK_SUFFIX = ".alignline", ".lock"
WAIT_ENV = "ALIGNLINE_WAIT_LOCK"
"""Environment variable: 1 / true / yes makes a process wait for a busy output directory instead of stopping
(the ``--wait-lock`` flag sets it)."""

_HELD: dict[Path, list] = {}
"""Lock files this process holds: path -> [file descriptor (None: not lockable there), depth]."""


def is_lock_file(name: str) -> bool:
    """Whether a file name is one of these lock files (left out of directory fingerprints)."""
    return name.startswith(LOCK_PREFIX) and name.endswith(LOCK_SUFFIX)


def lock_path(directory: str | Path, part: str | None = None) -> Path:
    """The lock file of ``directory`` (or of one ``part`` of it, e.g. sample's shard ``0/4``)."""
    tag = "" if not part else "." + "".join(c if c.isalnum() else "-" for c in part)
    return Path(directory).expanduser().resolve() / f"{LOCK_PREFIX}{tag}{LOCK_SUFFIX}"


def waits_for_locks() -> bool:
    return os.environ.get(WAIT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_launch_main_process() -> bool:
    """False in the other processes of an ``accelerate launch`` / ``torchrun`` launch (``RANK`` > 0)."""
    rank = os.environ.get("RANK", "0").strip()
    return not rank.isdigit() or int(rank) == 0


def _holder(path: Path) -> str:
    """Who holds ``path`` as written into it ("pid 12, host h, since ..."), or why that is unknown."""
    for _ in range(20):  # the holder writes right after it locks: a moment may show an empty file
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on host {info['host']}, running since {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a process that has not written its pid yet"


def _busy(path: Path, holder: str) -> DirectoryBusyError:
    return DirectoryBusyError(
        f"{path.parent} is in use by another alignline process ({holder}; lock file {path.name}). Two processes "
        "writing one output directory would each redo and overwrite the other's work. Wait for it to finish (or "
        f"stop it), give this run another output_dir, or rerun with --wait-lock (or {WAIT_ENV}=1) to wait for it")


def _open_locked(path: Path, wait: bool) -> int:
    """A descriptor of ``path`` with the exclusive lock held (the file is the one now at ``path``)."""
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                os.close(fd)
                raise _busy(path, holder) from None
            if not said:
                _say(f"waiting for {path.parent}: in use by {holder}")
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder removes the file as it lets go: a lock on a removed file guards nothing
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _acquire(path: Path, wait: bool) -> int | None:
    """The locked descriptor, or None where the filesystem cannot lock (said, and the run goes on unguarded)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path, wait)
    except DirectoryBusyError:
        raise
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
            raise ConfigError(f"cannot write the output directory {path.parent} ({exc.strerror}); choose a writable "
                              "output_dir") from None
        _say(f"warning: cannot lock {path.parent} ({exc.strerror}); nothing stops a second process from writing "
             "there: make sure only this one does")
        return None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with contextlib.suppress(OSError):  # who holds it is a courtesy (a full disk may refuse even these bytes)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def _say(text: str) -> None:
    Console(stderr=True, soft_wrap=True).print(text, markup=False, highlight=False)


@contextlib.contextmanager
def directory_lock(directory: str | Path, *, part: str | None = None, wait: bool | None = None) -> Iterator[None]:
    """Hold ``directory``'s lock (created if missing) for the ``with`` block: another process holding it is a
    :class:`DirectoryBusyError` naming it, or, with ``wait`` (default: :func:`waits_for_locks`), waited for.
    Re-entrant within a process; a no-op in the non-main processes of a multi-process launch."""
    if not is_launch_main_process():
        yield
        return
    path = lock_path(directory, part)
    held = _HELD.get(path)
    if held is not None:
        held[1] += 1
    else:
        _HELD[path] = held = [_acquire(path, waits_for_locks() if wait is None else wait), 1]
    try:
        yield
    finally:
        held[1] -= 1
        if held[1] == 0:
            del _HELD[path]
            if held[0] is not None:
                with contextlib.suppress(OSError):
                    path.unlink()  # before letting go, so a waiter that locked the old file notices (samestat)
                os.close(held[0])
