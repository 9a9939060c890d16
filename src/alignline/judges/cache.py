"""The judge-output cache shared by every stage that asks a judge (annotate, eval mtbench/winrate, score).

:func:`ask_cached` is the one way to make cached judge calls (:func:`ask_judge` for single user-message
prompts). A judge call is keyed by (judge id, template version, sampling settings, the full judge prompt), so a rerun
with the same inputs makes zero calls, and changing the template or sampling invalidates only what it
should. Outputs are stored raw; parsing happens after reading, so a parser fix never needs new calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignline.data.io import append_bytes, atomic_write_bytes
from alignline.data.records import Prompt

if TYPE_CHECKING:
    from alignline.generate.base import EngineSettings


def llm_judge_id(engine: EngineSettings) -> str:
    """The judge id an LLM judge's cache entries are keyed by: its engine and model."""
    return f"llm:{engine.engine}:{engine.model}"


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
        self.fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept open for the run)

    def get(self, key: str) -> str | None:
        return self.items.get(key)

    def put(self, key: str, output: str) -> None:
        self.items[key] = output
        append_bytes(self.fh, json.dumps({"key": key, "output": output}).encode() + b"\n")
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class JudgeCall:
    """One judge call: its cache key (:func:`judge_key`), the messages sent and the sampling they are sent with."""

    key: str
    messages: list[dict]
    sampling: Any


def ask_cached(get_engine: Callable[[], Any], calls: Sequence[JudgeCall], cache: JudgeCache, *,
               batch_size: int = 8) -> tuple[list[str | None], int]:
    """Judge outputs for ``calls`` (same order), asking the judge only for keys not in ``cache``.

    ``get_engine`` is called only when something is missing, so a fully cached rerun loads no judge. Calls
    are sent grouped by sampling settings (in order of first appearance), ``batch_size`` at a time, each
    key once. Returns (outputs, calls made); a call that failed at the engine (``status`` not ok: the openai
    engine after its retries) is not cached and comes back as None, so a rerun retries it.
    """
    todo: dict[str, JudgeCall] = {}
    for c in calls:
        if cache.get(c.key) is None:
            todo.setdefault(c.key, c)
    by_sampling: dict[str, list[str]] = defaultdict(list)
    for k, c in todo.items():
        by_sampling[_sampling_json(c.sampling)].append(k)
    failed: set[str] = set()
    made = 0
    engine = get_engine() if todo else None
    for group in by_sampling.values():
        sampling = todo[group[0]].sampling
        for s in range(0, len(group), batch_size):
            chunk = group[s: s + batch_size]
            outs = engine.generate([Prompt(id=k, messages=todo[k].messages) for k in chunk], 1, sampling)
            made += len(chunk)
            for k, out in zip(chunk, outs):
                if getattr(out[0], "status", "ok") != "ok":
                    failed.add(k)
                else:
                    cache.put(k, out[0].text)
    return [None if c.key in failed else cache.get(c.key) for c in calls], made


def _sampling_json(sampling: Any) -> str:
    return json.dumps(sampling.model_dump(mode="json") if hasattr(sampling, "model_dump") else sampling,
                      sort_keys=True)


def user_calls(texts: Sequence[str], sampling, *, judge_id: str, template_version: str) -> list[JudgeCall]:
    """One call per text, sent as a single user message with ``sampling``."""
    return [JudgeCall(judge_key(judge_id, template_version, sampling, t), [{"role": "user", "content": t}], sampling)
            for t in texts]


def ask_judge(engine, texts: Sequence[str], sampling, cache: JudgeCache, *, judge_id: str,
              template_version: str, batch_size: int = 8) -> tuple[list[str | None], int]:
    """Judge outputs for ``texts`` (:func:`user_calls`), calling ``engine`` only for those not cached
    (:func:`ask_cached`). Returns (outputs in order, number of calls made)."""
    calls = user_calls(texts, sampling, judge_id=judge_id, template_version=template_version)
    return ask_cached(lambda: engine, calls, cache, batch_size=batch_size)
