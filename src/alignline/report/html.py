"""``alignline report RUN_DIR``: one self-contained HTML page about a run directory.

RUN_DIR is a stage's run directory or a directory of them: it is searched recursively for
``manifest.json``. The page leads with the result: for a pipeline's output root (``pipeline.json``) the
policy progression (:mod:`alignline.report.progression`: the table ``alignline run`` prints, and a chart of
best-of-1 per policy with +-2 SE error bars). Then what it finds, each section's runs in pipeline order
(without pipeline.json: in order of completion): training curves from ``metrics.jsonl`` (loss;
chosen/rejected rewards and margin for DPO, TSO and the reward model), the reward model's accuracy per rating
(``eval.json``: on held-out pairs when the rm stage had ``data.eval``, else labelled as training-pair accuracy),
the mean score by rank of ranked sets (``score``), best-of-n curves (``bestofn.json``), online-RL runs (``rl``:
per-iteration curves from ``iterations.jsonl`` and the held-out evaluation, :mod:`alignline.report.rl`), the
evolution across policy versions when there are several, the judge injection suite's table
(``eval_injection``), a filterable table of sample records (pairs and ranked sets), and last the stages'
summaries (status, counts, seconds). A piece whose files are missing or unreadable is left out with a note;
the page never fails for it.

The page needs nothing else: figures are PNGs inside ``data:`` URIs, the CSS is inline, and the only script
is a few lines that filter the sample tables. Every text from the data is HTML-escaped.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from alignline.config import Section
from alignline.data.io import atomic_write_text
from alignline.report.common import StageRun, esc, find_runs, read_json
from alignline.report.ifeval import section_ifeval
from alignline.report.progression import relocate, section_progression
from alignline.report.rl import section_rl
from alignline.report.samples import section_samples
from alignline.report.sections import (
    section_bestofn,
    section_evolution,
    section_injection,
    section_rm,
    section_score_by_rank,
    section_stages,
    section_training,
)


class ReportConfig(Section):
    """Configuration of ``alignline report``."""

    run_dir: str
    """A stage's run directory, or a directory of them (searched recursively for manifest.json)."""
    output: str | None = None
    """Where the page goes; default RUN_DIR/report.html."""
    max_samples: int = Field(30, ge=0)
    """At most this many records per run in the sample table (0: no sample table)."""
    title: str | None = None
    """Page title; default 'alignline report: <RUN_DIR name>'."""


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1b1f24;background:#fff}
h1{font-size:1.6em;border-bottom:3px solid #2f6fb2;padding-bottom:.3em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ccd;padding-bottom:.2em;color:#2f6fb2}
h3{font-size:1.05em;margin-bottom:.3em}h3 small{color:#667;font-weight:normal}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccd;padding:.3em .55em;vertical-align:top;text-align:left}
th{background:#e8eef7}tbody tr:nth-child(even){background:#f6f8fb}
#samples td{max-width:420px}
.txt{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;
margin:.2em 0;padding:.25em .4em;background:#fbfbf4;border-left:3px solid #d8d3a8}
.note{color:#7a5b00}ul.notes li{color:#7a5b00}
figure{margin:.6em 0;display:inline-block}figure img{max-width:min(100%,760px);border:1px solid #dde}
figcaption{font-size:.8em;color:#667}
.st-complete{color:#1d7a32;font-weight:600}.st-stale,.st-running,.st-unreadable{color:#b3261e;font-weight:600}
#progression-table{font-size:1em}#progression-table th{background:#ffeeb0}
nav a{margin-right:1em}input[type=search]{width:24em;padding:.3em}
"""

SCRIPT = """<script>
document.querySelectorAll("input[data-filter]").forEach(function (box) {
  box.addEventListener("input", function () {
    var q = box.value.toLowerCase();
    document.querySelectorAll("#" + box.dataset.filter + " tbody tr").forEach(function (tr) {
      tr.style.display = tr.textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none";
    });
  });
});
</script>"""

SECTIONS = (
    ("training", "Training curves", section_training,
     "no metrics.jsonl (sft, rs, dpo, tso, rm or rl runs write one)"),
    ("rm", "Reward-model accuracy", section_rm, "no reward-model run (rm writes eval.json)"),
    ("score", "Reward-model score by rank", section_score_by_rank, "no score run with ranked sets"),
    ("bestofn", "Best-of-n", section_bestofn, "no best-of-n run (alignline eval bestofn)"),
    ("rl", "Online RL", section_rl, "no rl run (alignline rl)"),
    ("evolution", "Across policy versions", section_evolution, "needs two or more policy runs or versions"),
    ("injection", "Judge robustness (injection suite)", section_injection, "no eval_injection run"),
)
"""The sections after the result, in the order a pipeline makes their stages; within each the runs are in
pipeline order (:func:`order_runs`). The samples and then the stages' counts and timings come last."""


def order_runs(runs: list[StageRun], root: Path, doc: dict | None) -> list[StageRun]:
    """Runs in pipeline order: by the pipeline.json stage holding each (a sub-run, e.g. tso/iter-1, right after
    its stage); runs no stage holds, or all without pipeline.json, by when their outermost run finished."""
    output_root = str((doc or {}).get("output_root") or ".")
    dirs = [(i, relocate(s["output_dir"], output_root, root).resolve())
            for i, s in enumerate((doc or {}).get("stages") or []) if isinstance(s, dict) and s.get("output_dir")]

    def rank(run: StageRun) -> tuple:
        here = run.path.resolve()
        hits = [(len(d.parts), i) for i, d in dirs if here == d or d in here.parents]
        if hits:
            return (0, max(hits)[1], "", run.rel)
        outer = min((r for r in runs if r.path.resolve() == here or r.path.resolve() in here.parents),
                    key=lambda r: len(r.path.parts))
        return (1, 0, str(outer.manifest.get("written_at", "")), run.rel)

    return sorted(runs, key=rank)


def build_html(root: Path, runs: list[StageRun], *, title: str, max_samples: int) -> str:
    """The page: the result first (the policy progression of root/pipeline.json), then :data:`SECTIONS`,
    the samples, and the stages' counts and timings last."""
    body, nav, all_notes = [], [], []
    doc = read_json(root / "pipeline.json")
    runs = order_runs(runs, root, doc)
    builders = [("progression", "Result: held-out instruction following per policy",
                 lambda rs, ns: section_progression(doc, root, ns) + section_ifeval(doc, root),
                 "no pipeline.json with evaluated policies or eval.ifeval results (alignline run writes it)"),
                *SECTIONS, ("samples", "Samples", lambda rs, ns: section_samples(rs, ns, max_samples),
                            "no pair or ranked-set records" if max_samples else "max_samples=0"),
                ("stages", "Stages: counts and timings", section_stages, "no stage summaries")]
    for key, heading, build, missing in builders:
        notes: list[str] = []
        try:
            content = build(runs, notes)
        except Exception as exc:  # noqa: BLE001 (one unreadable piece must not cost the whole page)
            content = ""
            notes.append(f"this section could not be built: {type(exc).__name__}: {exc}")
        all_notes += [f"{heading}: {n}" for n in notes]
        nav.append(f'<a href="#{key}">{esc(heading)}</a>')
        body.append(f'<section id="{key}"><h2>{esc(heading)}</h2>'
                    + (content or f'<p class="note">Omitted: {esc(missing)}.</p>')
                    + "".join(f'<p class="note">{esc(n)}</p>' for n in notes) + "</section>")
    stages = sorted({r.stage for r in runs})
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p>{len(runs)} stage run(s) under <code>{esc(root)}</code> "
        f"({esc(', '.join(stages))}); generated {esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}.</p>"
        f"<nav>{''.join(nav)}</nav>{''.join(body)}{SCRIPT}</body></html>\n"
    )


def run(cfg: ReportConfig) -> Path:
    """Build the page and print its path."""
    out = build_report(cfg)
    print(out)
    return out


def build_report(cfg: ReportConfig) -> Path:
    """Write the page; its path."""
    root = Path(cfg.run_dir)
    runs = find_runs(root)
    out = Path(cfg.output) if cfg.output else root / "report.html"
    page = build_html(root, runs, title=cfg.title or f"alignline report: {root.resolve().name}",
                      max_samples=cfg.max_samples)
    atomic_write_text(out, page)
    return out


def report_cli(run_dir: str, overrides: list[str]) -> Path:
    """``alignline report RUN_DIR [key=value ...]``: RUN_DIR is taken as is (never YAML-parsed)."""
    from pydantic import ValidationError

    from alignline.config import config_error, parse_overrides

    data = parse_overrides(overrides)
    data["run_dir"] = str(run_dir)
    try:
        cfg = ReportConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(ReportConfig, exc, "the command line") from None
    return run(cfg)
