"""A pipeline's section in the model cards of the policies it evaluated: the policy's row of the progression
table and the command that reruns the pipeline. Rewritten after every run (the stage wrote the rest of the
card when it saved the model); a card is not part of any fingerprint, so nothing downstream reruns for it."""

from __future__ import annotations

import shlex
from pathlib import Path

from alignline.models.card import update_card_section
from alignline.report.progression import QUANTITY, ProgressionRow, cells, headers

SECTION = "pipeline"
"""The card section's key (its HTML comment markers)."""


def pipeline_command(doc: dict) -> str:
    """``alignline run PIPELINE.yaml`` with the run's overrides: the one command that makes every model again."""
    return shlex.join(["alignline", "run", str(doc["pipeline"]), *(doc.get("overrides") or [])])


def card_section(doc: dict, rows: list[ProgressionRow], index: int) -> str:
    """The Markdown of row ``index``'s section: the table's header and that row, what the columns mean."""
    head, line = headers(rows), cells(rows)[index]
    table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                       "| " + " | ".join(c.replace("|", "\\|") for c in line) + " |"])
    return (f"## In pipeline {doc.get('name')}\n\nThis model is the policy `{rows[index].policy.name}` of the "
            f"pipeline's progression (held-out evaluation after the pipeline's last run):\n\n{table}\n\n"
            f"{QUANTITY}\n\nThe whole pipeline, this model included:\n\n```bash\n{pipeline_command(doc)}\n```")


def refresh_model_cards(doc: dict, rows: list[ProgressionRow]) -> list[Path]:
    """Add or replace the pipeline section in the card of every evaluated policy's model (those with a card);
    the cards written."""
    written = []
    for i, row in enumerate(rows):
        path = update_card_section(Path(row.policy.model), SECTION, card_section(doc, rows, i))
        if path is not None:
            written.append(path)
    return written
