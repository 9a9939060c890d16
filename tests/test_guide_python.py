"""docs/guide.md's Python examples, run as written: every ``python`` block of the guide in order, in one
namespace, in an empty directory, after the YAML files its "Python API" section shows (a ``yaml`` block whose
first line is ``# PATH``) are written there. The first block makes the tiny model and data the others use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
BLOCK = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(text) if lang == language]


def test_the_guide_has_python_examples():
    api = section(GUIDE.read_text(encoding="utf-8"), "Python API")
    assert len(blocks(api, "python")) >= 5 and "alignline.run_pipeline(" in api and "alignline.run(" in api


@pytest.mark.usefixtures("one_thread")
def test_the_guides_python_examples_run(tmp_path, monkeypatch, capsys):
    text = GUIDE.read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for body in blocks(section(text, "Python API"), "yaml"):
        first, _, rest = body.partition("\n")
        if first.startswith("# "):
            path = tmp_path / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    namespace: dict = {"__name__": "guide"}
    for i, code in enumerate(blocks(text, "python")):
        exec(compile(code, f"{GUIDE}:python block {i + 1}", "exec"), namespace)  # noqa: S102 (the guide's own code)
    out = capsys.readouterr().out
    assert "peft ['dpo', 'ipo', 'alignline']" in out  # what the card example says it prints
    assert (tmp_path / "runs/py-pipeline/pipeline.json").is_file()
