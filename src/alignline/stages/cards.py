"""The facts of a trained model's card, gathered the same way by every stage that writes a model.

A stage calls :func:`stage_card` just before it saves and hands the result to ``save_trained_model(...,
card=...)`` / ``save_model(..., card=...)``, which write ``README.md`` beside the weights
(:mod:`alignline.models.card`). The parent model is the config's ``model``; the settings, data inputs and
evaluation are the stage's own; the command reproducing the model reads the run's resolved ``config.yaml``,
which the card also shows (secrets written as '**********').
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from alignline.config import resolved_yaml
from alignline.models.card import CardFacts

TRAIN_SETTINGS = ("train.lr", "train.epochs", "train.batch_size", "train.grad_accum", "train.schedule",
                  "train.seed", "lora.r", "lora.save", "dtype")
"""The loop settings every training stage's card lists (those a config has)."""


def _dotted(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def main_settings(cfg: BaseModel, keys: Iterable[str]) -> dict[str, Any]:
    """``keys`` (dotted) of the config with their values; those it has not (or that are null) left out."""
    dump = cfg.model_dump(mode="json")
    values = {key: _dotted(dump, key) for key in keys}
    return {k: v for k, v in values.items() if v is not None}


def training_evaluation(result: Any, keys: Iterable[str] = ("loss",)) -> dict[str, Any]:
    """A training loop result's figures: the final step's ``keys`` and each held-out metric start -> end."""
    out: dict[str, Any] = {"steps": result.steps}
    out |= {f"final train {k}": result.last_metrics[k] for k in keys if k in (result.last_metrics or {})}
    for name, end in (result.eval_metrics or {}).items():
        start = (result.eval_metrics_start or {}).get(name)
        out[f"held-out {name}"] = f"{start:.4g} -> {end:.4g}" if isinstance(start, float) and isinstance(end, float) \
            else end
    return out


LOSS_TAGS = {"dpo": ["dpo"], "ipo": ["dpo", "ipo"], "cdpo": ["dpo", "cdpo"], "hinge": ["dpo", "rso", "hinge"],
             "dual_clip": ["dpo", "tso", "dual-clip"]}
"""Hub tags of each preference loss (``loss.type``)."""
PREFERENCE_SETTINGS = ("loss.type", "loss.beta", "loss.sft_weight", "reference", "data.max_length", "pair_layout")
"""The preference settings dpo's and tso's cards list."""


def stage_card(command: str, cfg: BaseModel, *, method: str, tags: list[str], data: Mapping[str, Any],
               counts: Mapping[str, Any], settings: Iterable[str], evaluation: Mapping[str, Any],
               pipeline_tag: str = "text-generation", parent: str | None = None) -> CardFacts:
    """The card facts of a model written by ``alignline COMMAND`` under ``cfg`` (its ``output_dir`` holds the
    resolved config.yaml the reproduce command reads). ``parent``: the starting model when it is not
    ``cfg.model``."""
    config_path = Path(str(getattr(cfg, "output_dir", "."))) / "config.yaml"
    return CardFacts(
        stage=command, method=method, tags=tags, parent=parent or getattr(cfg, "model", None),
        data={k: v for k, v in data.items() if v}, counts=dict(counts),
        settings=main_settings(cfg, [*settings, *TRAIN_SETTINGS]), evaluation=dict(evaluation),
        command=f"alignline {command} {config_path}", config_yaml=resolved_yaml(cfg), pipeline_tag=pipeline_tag,
    )
