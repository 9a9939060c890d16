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


def _other_columns_into(obj: dict, fields: set[str], into: str) -> dict:
    """A TRL-layout row's columns that are not the record's fields (a Hub dataset's prompt_id, scores, source...)
    kept under ``into`` (meta or provenance), as TRL keeps them beside the columns it trains on."""
    extra = {k: obj.pop(k) for k in [k for k in obj if k not in fields]}
    if extra:
        obj[into] = {**extra, **(obj.get(into) or {})}
    return obj


_CONVERSATION_FIELDS = {"id", "messages", "meta"}
_PROMPT_FIELDS = {"id", "messages", "reference", "meta"}
_PAIR_FIELDS = {"id", "prompt", "chosen", "rejected", "rating", "reason", "provenance"}


def adapt_conversation(obj: dict) -> dict:
    """Accept ours ({id, messages}) and TRL's layouts without an id: conversational ``{"messages": [...]}`` and
    prompt-completion ``{"prompt": ..., "completion": ...}`` (standard: strings; conversational: messages)."""
    if "id" in obj:
        return obj
    obj = dict(obj)
    if "messages" not in obj and "prompt" in obj and "completion" in obj:
        obj["messages"] = (_as_messages(obj.pop("prompt"), "prompt", "user")
                           + _as_messages(obj.pop("completion"), "completion", "assistant"))
    if "messages" in obj:
        obj = _other_columns_into({"id": content_id(obj["messages"]), **obj}, _CONVERSATION_FIELDS, "meta")
    return obj


def adapt_prompt(obj: dict) -> dict:
    """Accept ours and TRL's layouts as prompts: ``{"prompt": str | messages}`` (a prompt-completion row's
    completion becomes the reference answer), or a conversation's ``messages`` ending with a user turn."""
    if "id" in obj:
        return obj
    obj = dict(obj)
    if "prompt" in obj and "messages" not in obj:
        obj["messages"] = _as_messages(obj.pop("prompt"), "prompt", "user")
        if "completion" in obj and "reference" not in obj:
            obj["reference"] = _last_assistant_text(obj.pop("completion"), "completion")
    if "messages" in obj:
        obj = _other_columns_into({"id": content_id(obj["messages"]), **obj}, _PROMPT_FIELDS, "meta")
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
        obj = _other_columns_into(obj, _PAIR_FIELDS, "provenance")
    return obj
