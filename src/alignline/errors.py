"""User-facing errors: every one carries a message that says where, what was expected and how to fix it."""

from __future__ import annotations

import errno
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class AlignlineError(Exception):
    """An error caused by the user's input or setup; the CLI prints its message without a traceback."""


class ConfigError(AlignlineError):
    """A configuration value is missing or invalid."""


class DataError(AlignlineError):
    """A data record is malformed. The message names the file, line, field, what was expected and found."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        expected: str | None = None,
        found: str | None = None,
    ):
        self.path, self.line, self.field = path, line, field
        self.expected, self.found = expected, found
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        text = (", ".join(where) + ": " if where else "") + message
        if expected is not None:
            text += f"; expected {expected}"
        if found is not None:
            text += f", found {found}"
        super().__init__(text)


class PromptTooLongError(DataError):
    """A prompt fills the model's context; ``prompt_id`` names it (a stage that read it from a file re-raises it as
    a DataError naming the file and line: ``stages.common.prompts_located``)."""

    def __init__(self, message: str, prompt_id: str, **where):
        self.prompt_id, self.bare_message = prompt_id, message
        super().__init__(message, **where)


class ModelError(AlignlineError):
    """A model cannot be found, loaded or converted."""


class DirectoryBusyError(AlignlineError):
    """Another process holds the output directory's lock (alignline.data.dirlock)."""


class RewardFunctionError(AlignlineError):
    """A user's reward function (``module:callable``) raised. The message names the function, the prompt and
    (once the rollout sets :attr:`iteration`) the rl iteration, and keeps the function's own traceback lines."""

    def __init__(self, function: str, where: str, error: str, traceback_text: str):
        self.function, self.where, self.error, self.traceback_text = function, where, error, traceback_text
        self.iteration: int | None = None
        super().__init__(function)

    def __str__(self) -> str:
        at = f" in rl iteration {self.iteration}" if self.iteration is not None else ""
        return (f"reward function {self.function} raised {self.error} {self.where}{at}. Fix the function (its "
                "traceback is below) and rerun the same command: the run resumes where it stopped\n"
                + self.traceback_text)


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM; SIGINT is Python's own KeyboardInterrupt) raised where the program is, so that the
    stage records it in its manifest ("interrupted") and releases its lock before the process exits."""

    def __init__(self, signum: int):
        self.signum, self.signal_name = signum, signal.Signals(signum).name
        super().__init__(self.signal_name)


class TooManyFailuresError(AlignlineError):
    """More of a stage's items failed (judge calls, parses) than its ``max_failure_fraction`` allows."""


class TrainingDivergedError(AlignlineError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


class DiskFullError(AlignlineError):
    """The disk (or quota) ran out while writing; the message names the directory, what was being written and
    about how much space it needs. The partial files are removed, so a rerun after freeing space resumes."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk or quota is full: ``OSError`` ENOSPC / EDQUOT, or a library error that
    carries the message only (safetensors' ``SafetensorError: ... No space left on device``)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(exc) for text in ("No space left on device", "Disk quota exceeded"))


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def disk_full_error(directory: str | Path, what: str, needed: int | None) -> DiskFullError:
    """The error for a full disk under ``directory`` while writing ``what`` (about ``needed`` bytes)."""
    try:
        free = f"; {_size(shutil.disk_usage(directory).free)} free now"
    except OSError:
        free = ""
    need = f"about {_size(needed)}" if needed else "space"
    return DiskFullError(
        f"no space left on the disk of {directory} while writing {what}: it needs {need}{free}. The partial files "
        "were removed. Free some space (or give output_dir on a disk with room), then rerun the same command: "
        "it resumes from what was written whole")


@contextmanager
def on_disk_full(directory: str | Path, what: str, needed: int | None,
                 cleanup: Callable[[], object] | None = None) -> Iterator[None]:
    """Turn a full-disk error inside the block into :func:`disk_full_error` (after ``cleanup()``, which removes
    what the block left half written); any other error passes unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        if cleanup is not None:
            cleanup()
        raise disk_full_error(directory, what, needed) from None
