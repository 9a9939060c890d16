"""What ``alignline run`` prints at its end: the policy progression (one row per evaluated policy, in
pipeline order: :mod:`alignline.report.progression`), IFEval per policy (:mod:`alignline.report.ifeval`), then the report's path, the wall time and the disk used
by the output root, every line at most 100 columns. The per-stage bookkeeping (status, seconds, counts) is in
pipeline.json and the report; only stages that failed or stopped early are named here."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

from alignline.report import ifeval
from alignline.report.ifeval import IFEvalRow
from alignline.report.progression import QUANTITY, ProgressionRow, cells, final_line, headers, no_effect_line

WIDTH = 100


def disk_usage(root: str | Path) -> int:
    """Bytes the files under ``root`` occupy on disk (allocated blocks where the system reports them, each hard
    link counted once; symbolic links are not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue  # removed while walking
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            blocks = getattr(st, "st_blocks", None)
            total += blocks * 512 if blocks is not None else st.st_size
    return total


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover (the loop always returns)


def human_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else (f"{s // 60} min {s % 60} s" if s >= 60
                                                                      else f"{s} s")


def progression_table(rows: list[ProgressionRow], width: int = WIDTH) -> str:
    """The rows as a plain-text table no wider than ``width`` (rich wraps a cell that would not fit)."""
    return plain_table(headers(rows), cells(rows), width, left=(0, 4))


def plain_table(head: list[str], body: list[list[str]], width: int = WIDTH, left: tuple[int, ...] = (0,)) -> str:
    """A plain-text table no wider than ``width``; the columns in ``left`` are left-aligned, the rest right."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, title in enumerate(head):
        table.add_column(title, justify="left" if i in left else "right", overflow="fold")
    for row in body:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False, soft_wrap=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False, subsequent_indent="  ") or [""]


def ifeval_lines(rows: list[IFEvalRow], width: int = WIDTH) -> list[str]:
    """IFEval per policy (:mod:`alignline.report.ifeval`) and the final policy against the first."""
    if not rows:
        return []
    lines = [plain_table(ifeval.HEADERS, ifeval.cells(rows), width), *_wrap(ifeval.QUANTITY, width)]
    line = ifeval.comparison_line(ifeval.final_vs_first(rows))
    return lines + (_wrap(line, width) if line else [])


def summary_text(name: str, rows: list[ProgressionRow], stages: list[dict], *, pipeline_json: str,
                 report: str | None, wall_seconds: float, disk_bytes: int, root: str, width: int = WIDTH,
                 ifeval_rows: list[IFEvalRow] | None = None) -> str:
    """The end-of-run summary. ``stages``: pipeline.json's stage entries (their ``result.status`` / ``error``);
    ``ifeval_rows``: the pipeline's eval.ifeval results, shown after the progression."""
    lines = _wrap(f"pipeline {name}: held-out instruction following per policy, in pipeline order", width)
    if rows:
        lines += [progression_table(rows, width), *_wrap(QUANTITY, width)]
        for line in (final_line(rows), no_effect_line(rows)):
            if line:
                lines += _wrap(line, width)
    elif not ifeval_rows:
        lines += _wrap("no evaluated policy (an eval.bestofn stage on a stage's model, with an eval.verifiable "
                       "stage on its samples, or an eval.ifeval stage)", width)
    lines += ifeval_lines(ifeval_rows or [], width)
    statuses: dict[str, int] = {}
    for s in stages:
        res = s.get("result") or {}
        statuses[res.get("status", "?")] = statuses.get(res.get("status", "?"), 0) + 1
        if res.get("status") in ("failed", "interrupted", "incomplete"):
            lines += _wrap(f"stage {s['name']} {res['status']}" + (f": {res['error']}" if res.get("error") else ""),
                           width)
    lines += _wrap("stages: " + ", ".join(f"{n} {k}" for k, n in statuses.items())
                   + f"; per stage status, seconds and counts: {pipeline_json}", width)
    lines += _wrap(f"report: {report}" if report else f"report: none built (`alignline report {root}` builds it)",
                   width)
    lines += _wrap(f"wall time {human_seconds(wall_seconds)}; disk used by {root}: {human_bytes(disk_bytes)}",
                   width)
    return "\n".join(lines)
