"""User-facing errors: every one carries a message that says where, what was expected and how to fix it."""

from __future__ import annotations


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


class ModelError(AlignlineError):
    """A model cannot be found, loaded or converted."""


class DirectoryBusyError(AlignlineError):
    """Another process holds the output directory's lock (alignline.data.dirlock)."""


class TrainingDivergedError(AlignlineError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""
