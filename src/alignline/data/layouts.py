"""TRL's dataset layouts (and ours) as alignline's records: conversations, prompts and preference pairs."""

from __future__ import annotations

from typing import Any

from alignline.data.records import content_id
from alignline.errors import DataError


def _as_messages(value: Any, field: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"'{field}' must be a string or a list of messages", found=type(value).__name__)


def adapt_conversation(obj: dict) -> dict:
    """Accept ours ({id, messages}) and TRL's conventional ``{"messages": [...]}`` without an id."""
    if "messages" in obj and "id" not in obj:
        obj = {"id": content_id(obj["messages"]), **obj}
    return obj


def adapt_prompt(obj: dict) -> dict:
    """Accept ours and TRL's prompt-only layout ``{"prompt": str | messages}``."""
    if "prompt" in obj and "messages" not in obj:
        obj = dict(obj)
        obj["messages"] = _as_messages(obj.pop("prompt"), "prompt", "user")
    if "id" not in obj and "messages" in obj:
        obj = {"id": content_id(obj["messages"]), **obj}
    return obj


def _last_assistant_text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        last = value[-1]
        if last.get("role") != "assistant":
            raise DataError(f"the last message of '{field}' must be an assistant turn", found=repr(last.get("role")))
        return last.get("content", "")
    raise DataError(f"'{field}' must be a string or a list of messages ending with an assistant turn",
                    found=type(value).__name__)


def adapt_pair(obj: dict) -> dict:
    """Accept ours and TRL's preference layouts: explicit ``prompt/chosen/rejected`` (strings or messages)
    and implicit-prompt (``chosen``/``rejected`` are whole conversations sharing all but the last turn)."""
    if "chosen" not in obj or "rejected" not in obj:
        return obj
    obj = dict(obj)
    if "prompt" not in obj:
        chosen, rejected = obj["chosen"], obj["rejected"]
        if isinstance(chosen, list) and isinstance(rejected, list) and chosen[:-1] == rejected[:-1]:
            obj["prompt"] = chosen[:-1]
        else:
            raise DataError("no 'prompt' and chosen/rejected do not share a conversation prefix",
                            field="prompt", expected="a prompt field or an implicit-prompt layout")
    if isinstance(obj["prompt"], str):
        obj["prompt"] = [{"role": "user", "content": obj["prompt"]}]
    obj["chosen"] = _last_assistant_text(obj["chosen"], "chosen")
    obj["rejected"] = _last_assistant_text(obj["rejected"], "rejected")
    if "id" not in obj:
        obj["id"] = content_id([obj["prompt"], obj["chosen"], obj["rejected"]])
    return obj
