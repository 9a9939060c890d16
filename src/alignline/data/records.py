"""The pipeline's records (design section 3): plain JSON objects validated on read.

Every validation failure becomes a :class:`~alignline.errors.DataError` that names the file, the line,
the field, what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alignline.errors import DataError

Role = Literal["system", "user", "assistant"]
Rating = Literal["significantly", "better", "slightly", "negligibly", "unsure"]
RATINGS: tuple[str, ...] = ("significantly", "better", "slightly", "negligibly", "unsure")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Message(Record):
    """One chat turn."""

    role: Role
    content: str

    @field_validator("content")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("content is empty; remove the turn or fill it")
        return v


def check_turn_order(messages: list[Message], *, last: Role | None) -> None:
    """Raise ValueError unless: optional leading system, then user/assistant alternating from a user turn."""
    if not messages:
        raise ValueError("messages is empty")
    body = messages[1:] if messages[0].role == "system" else messages
    if not body:
        raise ValueError("only a system message; a user turn must follow it")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            idx = i + (len(messages) - len(body))
            raise ValueError(
                f"messages[{idx}].role is '{m.role}' but '{want}' was expected "
                "(an optional system turn first, then user and assistant alternating, starting with user)"
            )
    if last is not None and body[-1].role != last:
        raise ValueError(f"the last message must be {'an assistant' if last == 'assistant' else 'a user'} turn, "
                         f"found '{body[-1].role}'")


def content_id(obj: Any) -> str:
    """A stable id for records that come without one (e.g. TRL layouts): sha1 of the canonical JSON."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class Conversation(Record):
    """A whole dialogue for SFT: ends with an assistant turn."""

    id: str
    messages: list[Message]
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _order(cls, v: list[Message]) -> list[Message]:
        check_turn_order(v, last="assistant")
        return v


class Prompt(Record):
    """A prompt for sampling: history ending with a user turn; ``reference`` is the original answer if known."""

    id: str
    messages: list[Message]
    reference: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _order(cls, v: list[Message]) -> list[Message]:
        check_turn_order(v, last="user")
        return v


class Response(Record):
    """One sampled response to a prompt."""

    prompt_id: str
    sample_idx: int = Field(ge=0)
    text: str
    source: str
    sampling: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    finish_reason: str | None = None
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None

    @property
    def usable(self) -> bool:
        """Whether the response can be judged or trained on: it did not fail and its text is not blank (the
        one test every stage applies; :func:`alignline.stages.common.iter_usable` also counts the rest)."""
        return self.status == "ok" and bool(self.text.strip())


class Scored(Response):
    """A response with scores by scorer id (and a judge's reason)."""

    scores: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None
    rank: int | None = None


class RankedSet(Record):
    """A prompt with N scored responses sorted best first (Xwin-Set)."""

    prompt: Prompt
    responses: list[Scored]
    scorer: str


class Pair(Record):
    """A preference pair: ``prompt`` messages end with a user turn; chosen/rejected are assistant texts."""

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    rating: Rating | None = None
    reason: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _order(cls, v: list[Message]) -> list[Message]:
        check_turn_order(v, last="user")
        return v

    @field_validator("chosen", "rejected")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the response is empty")
        return v


R = TypeVar("R", bound=BaseModel)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<record>"


SURROGATE = re.compile("[\ud800-\udfff]")
"""A lone UTF-16 surrogate in a Python string (what ``\\ud800`` in JSON decodes to)."""
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate_field(obj: Any, raw_json: str | None = None) -> str | None:
    """The field (``messages[1].content``) of the first string in ``obj`` holding a lone UTF-16 surrogate
    (JSON such as ``"\\ud800"`` decodes to one: it cannot be encoded as UTF-8, tokenised or written back), else
    None. With ``raw_json`` (the text ``obj`` was parsed from), text without such an escape is not searched."""
    if raw_json is not None and not _SURROGATE_ESCAPE.search(raw_json):
        return None
    stack: list[tuple[tuple, Any]] = [((), obj)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                return _loc(loc)
        elif isinstance(value, dict):
            stack.extend(((*loc, str(k)), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend(((*loc, i), v) for i, v in reversed(list(enumerate(value))))
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(model: type[R], obj: Any, *, path: str | None = None, line: int | None = None) -> R:
    """Validate one JSON object as ``model``; a failure raises DataError naming path, line and field."""
    if not isinstance(obj, dict):
        raise DataError(
            f"not a {model.__name__} record", path=path, line=line,
            expected="a JSON object", found=type(obj).__name__,
        )
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _loc(tuple(err["loc"]))
        kind = err["type"]
        if kind == "missing":
            raise DataError(f"missing field in a {model.__name__} record", path=path, line=line,
                            field=field, expected="the field to be present") from None
        if kind == "extra_forbidden":
            raise DataError(f"unknown field in a {model.__name__} record", path=path, line=line, field=field,
                            expected="only " + ", ".join(model.model_fields), found=_short(err.get("input"))) from None
        msg = err["msg"].removeprefix("Value error, ")
        found = None if kind == "value_error" else _short(err.get("input"))
        raise DataError(f"invalid {model.__name__} record: {msg}", path=path, line=line,
                        field=field, found=found) from None
