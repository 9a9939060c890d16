"""The judge-output cache shared by every stage that asks a judge (annotate, eval mtbench/winrate, score).

A judge call is keyed by (judge id, template version, sampling settings, the full judge prompt), so a rerun
with the same inputs makes zero calls, and changing the template or sampling invalidates only what it
should. Outputs are stored raw; parsing happens after reading, so a parser fix never needs new calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignline.data.io import atomic_write_bytes
from alignline.data.records import Prompt


def judge_key(judge_id: str, template_version: str, sampling: Any, text: str) -> str:
    """sha256 of the call's identity; ``sampling`` is a pydantic model or a JSON-able value."""
    body = sampling.model_dump(mode="json") if hasattr(sampling, "model_dump") else sampling
    return hashlib.sha256(json.dumps([judge_id, template_version, body, text]).encode()).hexdigest()


class JudgeCache:
    """Append-only JSONL of {key, output}; every line is flushed and fsynced, a torn last line is ignored."""

    def __init__(self, path: Path):
        self.path, self.items = Path(path), {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            for raw in self.path.read_bytes().splitlines():
                try:
                    obj = json.loads(raw)
                    self.items[obj["key"]] = obj["output"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a kill
            atomic_write_bytes(self.path, b"".join(json.dumps({"key": k, "output": v}).encode() + b"\n"
                                                   for k, v in self.items.items()))
        self.fh = open(self.path, "ab")  # noqa: SIM115 (kept open for the run)

    def get(self, key: str) -> str | None:
        return self.items.get(key)

    def put(self, key: str, output: str) -> None:
        self.items[key] = output
        self.fh.write(json.dumps({"key": key, "output": output}).encode() + b"\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ask_judge(engine, texts: Sequence[str], sampling, cache: JudgeCache, *, judge_id: str,
              template_version: str, batch_size: int = 8) -> tuple[list[str | None], int]:
    """Judge outputs for ``texts`` (one user message each), calling ``engine`` only for those not cached.

    Returns (outputs in order, number of calls made). A call that failed at the engine (``status`` not
    ok: the openai engine after its retries) is not cached and comes back as None, so a rerun retries it.
    """
    keys = [judge_key(judge_id, template_version, sampling, t) for t in texts]
    missing = list(dict.fromkeys(k for k in keys if cache.get(k) is None))
    by_key = dict(zip(keys, texts))
    failed: set[str] = set()
    calls = 0
    for s in range(0, len(missing), batch_size):
        chunk = missing[s: s + batch_size]
        reqs = [Prompt(id=k, messages=[{"role": "user", "content": by_key[k]}]) for k in chunk]
        outs = engine.generate(reqs, 1, sampling)
        calls += len(reqs)
        for k, out in zip(chunk, outs):
            resp = out[0]
            if getattr(resp, "status", "ok") != "ok":
                failed.add(k)
                continue
            cache.put(k, resp.text)
    return [None if k in failed else cache.get(k) for k in keys], calls
