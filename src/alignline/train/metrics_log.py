"""The training loop's metrics.jsonl: one JSON line per logged step, also sent to the accelerate trackers."""

from __future__ import annotations

import json
from pathlib import Path

from alignline.data.io import append_bytes, atomic_write_bytes


class MetricsLog:
    """Append-only metrics.jsonl (+ accelerate trackers); on resume, lines past the resumed step are cut."""

    def __init__(self, accelerator, path: Path, resume_step: int | None):
        self.acc, self.path = accelerator, path
        if accelerator.is_main_process:
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
                atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
        # unbuffered: each line is written whole at once (a full disk cuts it back, append_bytes)
        self.fh = open(path, "ab", buffering=0) if accelerator.is_main_process else None  # noqa: SIM115

    def log(self, record: dict) -> None:
        if self.fh is not None:
            append_bytes(self.fh, (json.dumps(record) + "\n").encode())
        if self.acc.trackers:
            self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
