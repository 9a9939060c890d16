"""How records dropped while reading are counted and reported, the same in every stage and loader."""

from __future__ import annotations

from collections import Counter

from rich.console import Console

_console = Console(stderr=True, soft_wrap=True)


def record_drops(counts: Counter, key: str, lines: list[str], what: str) -> None:
    """Count records dropped when read (``counts[key]``), keep where they were (``dropped_lines``: "file:line:
    reason", the first 100, in the manifest's counts) and say so."""
    if not lines:
        return
    counts[key] += len(lines)
    counts["dropped_lines"] = [*counts.get("dropped_lines", []), *lines][:100]
    _console.print(f"dropped {len(lines)} {what}: {', '.join(lines[:5])}" + (" ..." if len(lines) > 5 else ""))
