"""What the report's pieces share: the run directories found, reading their files leniently, numbers and
HTML cells, figures as ``data:`` URIs."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from alignline.data.io import MANIFEST
from alignline.errors import ConfigError
from alignline.report.plots import _plt, one_step_axis


@dataclass
class StageRun:
    path: Path
    rel: str
    """Path relative to RUN_DIR, as shown on the page."""
    manifest: dict

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage", "?"))


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def find_runs(root: Path) -> list[StageRun]:
    """Every directory under ``root`` (itself included) holding a manifest.json, sorted by path."""
    if not root.is_dir():
        raise ConfigError(f"run_dir {root} is not a directory; give a stage's output_dir or a directory of them")
    runs = []
    for m in sorted(root.rglob(MANIFEST)):
        try:
            manifest = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            manifest = {"stage": "?", "status": f"unreadable manifest ({type(exc).__name__})"}
        if not isinstance(manifest, dict):
            manifest = {"stage": "?", "status": "unreadable manifest (not a JSON object)"}
        rel = m.parent.relative_to(root).as_posix()
        runs.append(StageRun(path=m.parent, rel=rel if rel != "." else ".", manifest=manifest))
    if not runs:
        raise ConfigError(f"no {MANIFEST} under {root}: it is not a run directory (a stage writes {MANIFEST} "
                          "when it finishes); point run_dir at a stage's output_dir or at a directory of them")
    return runs


# ----------------------------------------------------------------------------------------------- figures


def fig_uri(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'


def line_plot(series: list[tuple[str, list, list]], title: str, xlabel: str, ylabel: str,
              vlines: list[float] = (), log2_x: bool = False) -> str:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, xs, ys in series:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 20 else None, markersize=3)
    xs_all = sorted({x for _, xs, _ in series for x in xs})
    if log2_x and xs_all:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, ranks and n are whole numbers
    for v in vlines:
        ax.axvline(v, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return fig_uri(fig)


# ----------------------------------------------------------------------------------------------- reading

def read_jsonl(path: Path, notes: list[str], limit: int | None = None) -> list[dict]:
    """Objects of a JSONL file; unreadable lines are skipped and noted (a report never stops for them)."""
    out, bad = [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad += 1
                continue
            if isinstance(obj, dict):
                out.append(obj)
            else:
                bad += 1
            if limit is not None and len(out) >= limit:
                break
    if bad:
        notes.append(f"{path.parent.name}/{path.name}: {bad} unreadable line(s) skipped")
    return out


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt(x, digits: int = 3) -> str:
    v = num(x)
    if v is None:
        return "&mdash;" if x is None else esc(x)
    return str(x) if isinstance(x, int) else f"{v:.{digits}f}"


def metrics_files(run: StageRun) -> list[Path]:
    if run.stage == "tso":
        iters = [p for p in run.path.glob("iter-*/metrics.jsonl") if p.parent.name[5:].isdigit()]
        return sorted(iters, key=lambda p: int(p.parent.name[5:]))
    return [run.path / "metrics.jsonl"] if (run.path / "metrics.jsonl").exists() else []


def concat_metrics(files: list[Path], notes: list[str]) -> tuple[list[dict], list[float]]:
    """Rows of several metrics files on one step axis (:func:`alignline.report.plots.one_step_axis`), and the
    step where each file after the first starts; unreadable lines are noted, not fatal."""
    return one_step_axis([read_jsonl(f, notes) for f in files])


def series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], num(r.get(key))) for r in rows if num(r.get(key)) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def table(headers: list[str], rows: list[list[str]], table_id: str = "") -> str:
    """``rows`` cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    attr = f' id="{table_id}"' if table_id else ""
    return f'<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
