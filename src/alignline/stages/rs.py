"""``alignline rs``: rejection-sampling fine-tuning (Xwin): SFT on the selected best responses, with the
loss on the last assistant turn only, through the shared loop (``alignline select mode=rs`` makes the data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.stages import sft
from alignline.train.loop import TrainSettings


class RSData(sft.SFTData):
    """Selected conversations (``rs.jsonl`` from ``alignline select mode=rs``)."""

    train_on: Literal["all", "last"] = "last"
    """Train on the last assistant turn only (the selected response), as Xwin's RS does."""


def default_rs_train() -> TrainSettings:
    # Xwin RS: like SFT with peak lr 1e-5.
    return TrainSettings(lr=1e-5, epochs=3, adam_betas=(0.9, 0.999), weight_decay=0.0, schedule="cosine")


class RSConfig(sft.SFTConfig):
    """Configuration of ``alignline rs`` (every ``sft`` setting; RS defaults)."""

    output_dir: str = "runs/rs"
    """Run directory."""
    data: RSData
    """Selected conversations."""
    train: TrainSettings = Field(default_factory=default_rs_train)
    """Optimiser and loop settings (Xwin RS: lr 1e-5)."""


def run(cfg: RSConfig) -> Path:
    return sft.run(cfg, stage="rs")
