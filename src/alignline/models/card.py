"""The model card (``README.md``) written into every model directory a stage saves: the Hugging Face Hub's
model-card form (YAML metadata between ``---`` lines, then Markdown), through ``huggingface_hub``'s
``ModelCard`` / ``ModelCardData``.

The stage supplies the facts (:class:`CardFacts`: method, parent model, data and counts, main settings, its
own evaluation, the command that reproduces it); this module derives the Hub metadata from them:

* ``base_model``: the parent's Hub id when the parent names one (``org/name``, an ``@revision`` left off),
  the Hub repository an alias was made from, or, for a local model directory, the ``base_model`` its own
  card carries (its nearest ancestor on the Hub); absent when none is known (a .gguf file, a hand-made model);
* ``license``: the alias's, or the one the parent's card carries;
* ``datasets``: the inputs that are Hub datasets (``hf:org/name``, or a mapping with ``name``);
* ``library_name``: ``peft`` for an adapter directory, else ``transformers`` (decided by the saver).

Later sections (a pipeline's progression row) are added or replaced between HTML comment markers by
:func:`update_card_section`. Nothing in a card is a secret: values that look like API keys or tokens, and
the values of the key/token environment variables, are replaced before anything is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
"""The model card's file name inside a model directory (what the Hub shows as the model's page)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_SECRET_PATTERNS = (re.compile(r"sk-[A-Za-z0-9_-]{16,}"), re.compile(r"hf_[A-Za-z0-9]{20,}"))
_SECRET_ENV = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_REDACTED = "**********"


@dataclass
class CardFacts:
    """What a stage knows about the model it saves; :func:`write_model_card` turns it into a card."""

    stage: str
    """The stage command that wrote the model (``dpo``, ``rm``, ``eval bestofn`` ...)."""
    method: str
    """One line naming the method, e.g. ``DPO (loss ipo, beta 0.1)``."""
    tags: list[str]
    """Method tags for the Hub (``sft``, ``dpo``, ``reward-model`` ...); ``alignline`` is always added."""
    parent: str | None
    """The model the stage started from, as its ``model`` setting names it."""
    data: dict[str, Any] = field(default_factory=dict)
    """Each input by role (``train``, ``eval``, ``prompts`` ...): a path, or a Hub dataset."""
    counts: dict[str, Any] = field(default_factory=dict)
    """The stage's counts (what was read, dropped and used)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The main settings, by dotted name."""
    evaluation: dict[str, Any] = field(default_factory=dict)
    """The stage's own evaluation (final loss, held-out accuracy, held-out change ...), by name."""
    command: str = ""
    """The one command that reproduces the model."""
    config_yaml: str | None = None
    """The resolved config that command reads (secrets already written as '**********')."""
    pipeline_tag: str = "text-generation"
    """``text-generation``, or ``text-classification`` for a reward model (a scalar head)."""


def hub_model_id(name: str | None) -> str | None:
    """The Hub id a model setting stands for (see the module docstring), or None."""
    if not name:
        return None
    from alignline.models.aliases import ALIASES

    if name in ALIASES:  # an alias wins over anything of the same spelling (as when loading)
        return ALIASES[name].hub_id
    path = Path(name).expanduser()
    if path.exists():
        return parent_card_data(path).get("base_model") if path.is_dir() else None
    if _HUB_ID.match(name):
        return name.split("@", 1)[0]
    return None


def hub_dataset_id(source: Any) -> str | None:
    """The Hub dataset an input names (``hf:org/name[@rev]`` or a mapping with ``name``), or None."""
    if isinstance(source, dict):
        source = source.get("name") and f"hf:{source['name']}"
    if isinstance(source, str) and source.startswith("hf:"):
        return source.removeprefix("hf:").split("@", 1)[0] or None
    return None


def parent_card_data(model_dir: Path) -> dict:
    """The metadata of the card in ``model_dir`` ({} when it has none or it cannot be read)."""
    from huggingface_hub import ModelCard

    card = model_dir / CARD_FILE
    if not card.is_file():
        return {}
    try:
        return ModelCard.load(card, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 (a parent's broken card only costs the child its inherited metadata)
        return {}


def _license(parent: str | None) -> str | None:
    if not parent:
        return None
    from alignline.models.aliases import ALIASES

    if parent in ALIASES:
        return ALIASES[parent].license
    path = Path(parent).expanduser()
    return parent_card_data(path).get("license") if path.is_dir() else None


def scrub_secrets(text: str) -> str:
    """``text`` with API keys and tokens (by pattern, and the values of their environment variables) hidden."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, _REDACTED)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(_REDACTED, text)
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) if isinstance(value, dict) \
            else ", ".join(map(_cell, value))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    """A two-column Markdown table of ``rows`` (nested values flattened onto one line)."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _data_lines(facts: CardFacts) -> str:
    inputs = {role: src for role, src in facts.data.items() if src}
    counts = {k: v for k, v in facts.counts.items() if k != "dropped_lines"}
    parts = [markdown_table(inputs, ("input", "source"))] if inputs else ["(no data inputs)"]
    if counts:
        parts.append(markdown_table(counts, ("count", "value")))
    return "\n\n".join(parts)


def card_body(facts: CardFacts, base_model: str | None, adapter: bool) -> str:
    """The Markdown below the metadata: method, parent, data, settings, evaluation, how to reproduce."""
    kind = "a LoRA adapter (load it on its base model with peft)" if adapter else "a full checkpoint"
    parent = f"`{facts.parent}`" if facts.parent else "(none)"
    hub = f" (on the Hub: [{base_model}](https://huggingface.co/{base_model}))" if base_model else ""
    sections = [
        f"# {facts.method}",
        f"Trained with alignline's `{facts.stage}` stage: {facts.method}. "
        f"This directory holds {kind} in safetensors.",
        f"## Parent model\n\n{parent}{hub}",
        f"## Data\n\n{_data_lines(facts)}",
    ]
    if facts.settings:
        sections.append("## Settings\n\n" + markdown_table(facts.settings, ("setting", "value")))
    if facts.evaluation:
        sections.append("## Evaluation\n\n" + markdown_table(facts.evaluation, ("metric", "value")))
    reproduce = f"## Reproduce\n\n```bash\n{facts.command}\n```"
    if facts.config_yaml:
        reproduce += (f"\n\n<details><summary>config.yaml</summary>\n\n```yaml\n{facts.config_yaml.rstrip()}\n```"
                      "\n\n</details>")
    sections.append(reproduce)
    return "\n\n".join(sections) + "\n"


def model_card_text(facts: CardFacts, *, adapter: bool) -> str:
    """The whole card (metadata + body), secrets scrubbed."""
    from huggingface_hub import ModelCard, ModelCardData

    base_model = hub_model_id(facts.parent)
    datasets = list(dict.fromkeys(d for d in map(hub_dataset_id, facts.data.values()) if d))
    data = ModelCardData(
        base_model=base_model, library_name="peft" if adapter else "transformers",
        tags=list(dict.fromkeys([*facts.tags, "alignline"])), datasets=datasets or None,
        pipeline_tag=facts.pipeline_tag, license=_license(facts.parent),
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(facts, base_model, adapter)}")
    return scrub_secrets(str(card))


def write_model_card(model_dir: str | Path, facts: CardFacts, *, adapter: bool) -> Path:
    """Write ``model_dir/README.md`` (replacing any card, e.g. the one peft writes for an adapter)."""
    from alignline.data.io import atomic_write_text

    path = Path(model_dir) / CARD_FILE
    atomic_write_text(path, model_card_text(facts, adapter=adapter))
    return path


def update_card_section(model_dir: str | Path, key: str, markdown: str) -> Path | None:
    """Add or replace the section ``key`` (between ``<!-- alignline:KEY -->`` markers) at the end of the card in
    ``model_dir``; None (nothing written) when the directory has no card."""
    from alignline.data.io import atomic_write_text

    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- alignline:{key} -->", f"<!-- /alignline:{key} -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, scrub_secrets(text))
    return path
