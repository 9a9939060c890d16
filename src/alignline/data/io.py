"""Reading and writing records: JSONL and Parquet, atomic files, resumable shards and manifests.

Writes are atomic (temp file in the same directory, fsync, rename, fsync of the directory), so a kill at
any point leaves either the old file or the new one. A stage's ``manifest.json`` is written last: its
presence with ``status: complete`` is what says the stage finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pydantic import BaseModel

from alignline.data.datasets_source import is_datasets_source, iter_dataset_rows
from alignline.data.dirlock import is_lock_file
from alignline.data.layouts import adapt_conversation, adapt_pair, adapt_prompt
from alignline.data.records import (
    Conversation,
    Pair,
    Prompt,
    lone_surrogate_field,
    validate,
)
from alignline.errors import DataError, on_disk_full
from alignline.hub import pinned_snapshot

R = TypeVar("R", bound=BaseModel)
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- atomic files

def file_sha256(path: str | Path) -> str:
    """sha256 of one file's bytes, read in 1 MiB blocks (a GGUF of gigabytes never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, 'w')`` would give (mkstemp's temp files are 0600): keep an existing
    file's mode, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old content or the new, never a mix."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))


def atomic_write(path: str | Path, write: Callable[[str], object], *, size: int | None = None) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` (mode kept, data and
    directory synced): a crash leaves either the old content or the new. A full disk is a
    :class:`~alignline.errors.DiskFullError` naming the directory, the file and ``size`` (its expected bytes);
    the temporary file is removed."""
    path = Path(path)
    with on_disk_full(path.parent, path.name, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fchmod(fh.fileno(), _new_file_mode(path))
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)


def append_bytes(fh: BinaryIO, data: bytes) -> None:
    """Append ``data`` (a whole line) to ``fh``, a file opened ``open(path, "ab", buffering=0)``. A full disk
    cuts the file back to where it was (no torn line) and is a :class:`~alignline.errors.DiskFullError`."""
    start = fh.seek(0, os.SEEK_END)
    view = memoryview(data)
    path = Path(fh.name)
    with on_disk_full(path.parent, path.name, len(data), cleanup=lambda: fh.truncate(start)):
        while view:  # an unbuffered write may write part and report it; the next part then raises
            view = view[fh.write(view):]


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def to_jsonable(record: Any) -> dict:
    return record.model_dump(mode="json", exclude_none=True) if isinstance(record, BaseModel) else record


def jsonl_bytes(records: Iterable[Any], *, ensure_ascii: bool = False) -> bytes:
    """One JSON object per line, each line ending in a newline. ``ensure_ascii=True`` (non-ASCII escaped as
    ``\\uXXXX``) is kept for the files that have always been written that way (verifications, verdicts,
    annotate's and eval injection's failures), so their bytes do not change."""
    return b"".join(
        (json.dumps(to_jsonable(r), ensure_ascii=ensure_ascii) + "\n").encode("utf-8") for r in records
    )


# Parquet: columns of scalars, string lists and chat-message lists are stored natively (so TRL / datasets
# read ``messages``, ``prompt``, ``chosen``... as usual); any other column (free-form dicts such as ``meta``,
# ``provenance``, ``scores``, nested records, mixed types) is stored as JSON text and named in the schema
# metadata, because Arrow would otherwise pad dict keys with nulls or refuse mixed types.
PARQUET_JSON_COLUMNS = b"alignline.json_columns"


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(x, str) for x in m.values())
        for m in value
    )


def _native_column(values: list) -> bool:
    present = [v for v in values if v is not None]
    return (
        all(isinstance(v, (str, bool, int, float)) for v in present)
        or all(_is_message_list(v) for v in present)
        or all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in present)
    )


def _parquet_table(rows: list[dict]):
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in rows for k in r))  # the union of keys, not the first row's
    arrays, json_columns = [], []
    for name in names:
        values = [r.get(name) for r in rows]
        array = None
        if _native_column(values):
            try:
                array = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                array = None
        if array is None:
            array = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                             type=pa.string())
            json_columns.append(name)
        arrays.append(array)
    table = pa.Table.from_arrays(arrays, names=names) if names else pa.table({})
    return table.replace_schema_metadata({PARQUET_JSON_COLUMNS: json.dumps(json_columns).encode()})


def write_records(path: str | Path, records: Iterable[Any]) -> Path:
    """Write records atomically as JSONL, or as Parquet (through ``pyarrow``) when the suffix is .parquet."""
    path = Path(path)
    rows = [to_jsonable(r) for r in records]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = _parquet_table(rows)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp), size=table.nbytes)
    else:
        atomic_write_bytes(path, jsonl_bytes(rows))
    return path


# --------------------------------------------------------------------------- reading

def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; bad bytes or JSON raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=str(path), expected="an existing JSONL file")
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"bytes that are not UTF-8 at byte {exc.start} of the line",
                    path=str(path), line=line_no, expected="UTF-8 text",
                    found=repr(raw[max(0, exc.start - 10): exc.start + 10]),
                ) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON ({exc.msg} at column {exc.colno})", path=str(path), line=line_no,
                    expected="one JSON object per line", found=repr(text[:60].rstrip()),
                ) from None
            bad = lone_surrogate_field(obj, text)
            if bad is not None:
                raise DataError(
                    "text holds a lone surrogate escape (e.g. \\ud800: half of a UTF-16 pair, not a character); "
                    "remove it or replace it by the character it was meant to be", path=str(path), line=line_no,
                    field=bad, expected="valid Unicode text")
            yield line_no, obj


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file; null columns are left out (we write without None) and the JSON-text columns
    named in the schema metadata are decoded."""
    if not path.exists():
        raise DataError("file not found", path=str(path), expected="an existing Parquet file")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable Parquet file ({exc})", path=str(path)) from None
    json_columns = set(json.loads((pf.schema_arrow.metadata or {}).get(PARQUET_JSON_COLUMNS, b"[]")))
    row_no = 0
    for batch in pf.iter_batches():
        for row in batch.to_pylist():
            row_no += 1
            obj = {}
            for key, value in row.items():
                if value is None:
                    continue
                if key in json_columns:
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"column holds malformed JSON ({exc.msg})", path=str(path), line=row_no,
                                        field=key, found=repr(value[:60])) from None
                obj[key] = value
            yield row_no, obj


def iter_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Rows of a JSONL or Parquet file as (line or row number from 1, object)."""
    path = Path(path)
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet") and not p.name.startswith("."))
        if not shards:
            raise DataError("directory holds no .jsonl or .parquet shards", path=str(path))
        for shard in shards:
            yield from ((n, obj) for n, obj in iter_rows(shard))
    else:
        yield from iter_jsonl(path)


#: Files stages write next to their record shards (judge outputs, parse failures, training metrics):
#: reading a stage's output directory as records skips them.
SIDE_FILES = frozenset({"judge_cache.jsonl", "failures.jsonl", "metrics.jsonl"})


def _record_files(path: Path) -> list[Path]:
    """The files a directory of shards holds (a stage's output directory: its side files are skipped)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet", ".arrow")
                   and not p.name.startswith(".") and p.name not in SIDE_FILES)
    if not files:
        raise DataError("directory holds no .jsonl, .parquet or .arrow shards", path=str(path),
                        expected="record shards, a save_to_disk directory or a Hub dataset (hf:ORG/NAME)")
    return files


def iter_source_rows(source: str | Path) -> Iterator[tuple[str, int, Any]]:
    """(where, line or row, object) for every row of any records source: a JSONL / Parquet / Arrow file, a
    directory of shards, a ``save_to_disk`` directory or a Hub dataset (``hf:...``)."""
    if is_datasets_source(source):
        yield from iter_dataset_rows(source)
        return
    path = Path(source)
    for file in _record_files(path) if path.is_dir() else [path]:
        if is_datasets_source(file):
            yield from iter_dataset_rows(file)
        else:
            yield from ((str(file), line, obj) for line, obj in iter_rows(file))


def iter_records(path: str | Path, model: type[R], adapt: Callable[[dict], dict] | None = None, *,
                 drop: Callable[[dict], str | None] | None = None, dropped: list[str] | None = None,
                 ) -> Iterator[tuple[str, int, R]]:
    """(where, line, record) for every row of ``path`` (any source :func:`iter_source_rows` reads), validated as
    ``model`` (optionally through a layout adapter). Errors name the shard and line (a dataset: its split and
    row index). ``drop``: a row (after ``adapt``) for which it returns a reason is skipped and noted in
    ``dropped`` as ``"where:line: reason"``.
    """
    for where, line, obj in iter_source_rows(path):
        if adapt is not None and isinstance(obj, dict):
            try:
                obj = adapt(obj)
            except DataError as exc:
                raise DataError(str(exc), path=where, line=line) from None
        reason = drop(obj) if drop is not None and isinstance(obj, dict) else None
        if reason is not None:
            if dropped is not None:
                dropped.append(f"{where}:{line}: {reason}")
            continue
        yield where, line, validate(model, obj, path=where, line=line)


def read_records(path: str | Path, model: type[R], adapt: Callable[[dict], dict] | None = None, *,
                 drop: Callable[[dict], str | None] | None = None, dropped: list[str] | None = None) -> list[R]:
    """Every record of ``path`` (see :func:`iter_records`)."""
    return [r for _, _, r in iter_records(path, model, adapt, drop=drop, dropped=dropped)]


def read_conversations(path: str | Path, *, drop: Callable[[dict], str | None] | None = None,
                       dropped: list[str] | None = None) -> list[Conversation]:
    return read_records(path, Conversation, adapt_conversation, drop=drop, dropped=dropped)


def read_prompts(path: str | Path, *, required: bool = False) -> list[Prompt]:
    """The prompt records of ``path``; ``required``: an empty file is a DataError (an evaluation of nothing)."""
    prompts = read_records(path, Prompt, adapt_prompt)
    if required and not prompts:
        raise DataError("the prompts file holds no prompts", path=str(path), expected="at least one prompt record")
    return prompts


def read_pairs(path: str | Path, *, drop: Callable[[dict], str | None] | None = None,
               dropped: list[str] | None = None) -> list[Pair]:
    return read_records(path, Pair, adapt_pair, drop=drop, dropped=dropped)


# --------------------------------------------------------------------------- manifests and fingerprints

NOT_FINGERPRINTED = ("README.md",)
"""Files a directory's fingerprint leaves out: a model card describes the model and is refreshed after the
fact (a pipeline adds its progression row), which must not make the stages reading the model out of date."""


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (configs) or of a file's / directory's contents (but its
    :data:`NOT_FINGERPRINTED` files and lock files); a Hub cache snapshot (:func:`alignline.hub.pinned_snapshot`)
    by its repository and commit instead of its files."""
    h = hashlib.sha256()
    pinned = pinned_snapshot(obj) if isinstance(obj, (str, Path)) else None
    if pinned is not None:
        h.update(f"hub:{pinned}".encode())
    elif isinstance(obj, (str, Path)) and Path(obj).exists():
        p = Path(obj)
        # a lock file says who is writing the directory, not what it holds; a model card describes the weights
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.name not in NOT_FINGERPRINTED
                       and not is_lock_file(q.name)) if p.is_dir() else [p]
        for f in files:
            if p.is_dir():
                h.update(str(f.relative_to(p)).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("alignline", "torch", "transformers", "accelerate", "datasets", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def write_manifest(out_dir: str | Path, **fields: Any) -> Path:
    """Write ``manifest.json`` last, atomically; it records config, inputs, versions, counts and status."""
    path = Path(out_dir) / MANIFEST
    body = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(), **fields}
    atomic_write_json(path, body)
    return path


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------- resumable shards

class ShardedWriter:
    """Append records to ``<dir>/<name>-NNNNN.jsonl`` shards, each written atomically when full.

    A rerun opens the same directory: complete shards are read back, their keys are reported by
    :meth:`done_keys` so the caller skips them, and writing continues with the next shard number. Records
    in a shard that was never renamed into place are simply produced again: nothing is duplicated or lost.
    """

    def __init__(self, directory: str | Path, name: str = "part", shard_size: int = 1000,
                 key: Callable[[dict], Any] | None = None, fresh: bool = False):
        """``fresh``: delete this writer's existing shards first (they belong to a run of other settings)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.shard_size, self.key = name, shard_size, key
        self._buffer: list[dict] = []
        self._done: set = set()
        pattern = f"{name}-[0-9][0-9][0-9][0-9][0-9].jsonl"
        if fresh:
            for old in self.dir.glob(pattern):
                old.unlink()
        self.existing = sorted(self.dir.glob(pattern))
        for tmp in self.dir.glob(f".{name}-*.tmp"):
            tmp.unlink()  # a shard that never got renamed into place
        if key is not None:
            for shard in self.existing:
                for _, obj in iter_jsonl(shard):
                    self._done.add(key(obj))
        # after the highest shard number, not the count: a gap (a shard deleted by hand) must not make the
        # next flush overwrite an existing shard
        self._next = int(self.existing[-1].stem.rsplit("-", 1)[1]) + 1 if self.existing else 0

    def done_keys(self) -> set:
        return set(self._done)

    def add(self, record: Any) -> None:
        obj = to_jsonable(record)
        if self.key is not None:
            k = self.key(obj)
            assert k not in self._done, f"duplicate record key {k!r}"
            self._done.add(k)
        self._buffer.append(obj)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.dir / f"{self.name}-{self._next:05d}.jsonl"
        atomic_write_bytes(path, jsonl_bytes(self._buffer))
        self._next += 1
        self._buffer = []

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.name}-[0-9][0-9][0-9][0-9][0-9].jsonl"))

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
