"""Settings of an OpenAI-compatible endpoint, shared by every config that can name one (``sample``'s
``openai``, the ``openai`` block of every engine setting: judges, matrix members, evaluated systems).

Secrets never reach a file: ``api_key`` is a ``SecretStr`` (``'**********'`` in every dump a file is written
from: resolved configs, manifests, pipeline.json) and a ``user:password@`` part of ``base_url`` is left out of
JSON dumps. Python-mode dumps and attribute access keep the real values, so engines still receive them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_serializer, field_validator, model_validator

from alignline.config import Section

DEFAULT_BASE_URL = "https://api.openai.com/v1"
REDACTED = "**********"
"""How a ``SecretStr`` is written; a saved config.yaml given back as a config holds it instead of the key."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HIDDEN = "<hidden: not a variable name>"


def display_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages and saved configs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class OpenAIConnection(Section):
    """Where and how to reach an OpenAI-compatible endpoint (the model name is set next to this block)."""

    base_url: str | None = None
    """Endpoint URL, usually ending in /v1 (e.g. http://localhost:8000/v1 for `vllm serve`); unset: the
    OPENAI_BASE_URL environment variable, else https://api.openai.com/v1. A user:password@ part is used but
    never written to a file."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key (the name, not the key)."""
    api_key: SecretStr | None = Field(default=None, repr=False)
    """The API key itself; written to files, dumps and logs only as '**********'. Prefer api_key_env."""
    max_concurrency: int = Field(default=8, ge=1)
    """At most this many requests in flight at once."""
    max_retries: int = Field(default=5, ge=0)
    """Retries per request after the first attempt (429, 5xx, timeouts, connection errors, non-JSON bodies)."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Seconds to wait for a response (connect, read and write, each) before the attempt counts as timed out."""
    backoff_base_s: float = Field(default=0.5, ge=0)
    """Backoff before retry k is uniform in [0, min(backoff_max_s, backoff_base_s * 2**(k-1))] (full jitter)."""
    backoff_max_s: float = Field(default=30.0, ge=0)
    """Cap on one backoff wait (a server's Retry-After is honoured up to max(this, 120 s))."""

    @model_validator(mode="before")
    @classmethod
    def _hide_key_like_env(cls, data: Any) -> Any:
        # A key pasted into api_key_env must not be echoed back by the validation error.
        if isinstance(data, Mapping):
            value = data.get("api_key_env")
            if isinstance(value, str) and not _ENV_NAME.fullmatch(value):
                data = {**data, "api_key_env": _HIDDEN}
        return data

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not _ENV_NAME.fullmatch(v):
            raise ValueError("must be the name of an environment variable (e.g. OPENAI_API_KEY), not the key "
                             "itself: put the key in that variable (export OPENAI_API_KEY=...) or give api_key=...")
        return v

    @field_serializer("base_url", when_used="json")
    def _base_url_without_credentials(self, v: str | None) -> str | None:
        return display_url(v) if v else v

    def resolved_base_url(self) -> str:
        """``base_url``, else ``$OPENAI_BASE_URL``, else the OpenAI API, without a trailing slash."""
        url = self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        return url.rstrip("/")

    def resolved_api_key(self) -> str | None:
        """``api_key``, else the value of ``$<api_key_env>``, else None (a redacted '**********', as a saved
        config holds, counts as unset)."""
        if self.api_key is not None and self.api_key.get_secret_value() not in ("", REDACTED):
            return self.api_key.get_secret_value()
        return os.environ.get(self.api_key_env) or None


class OpenAISettings(OpenAIConnection):
    """An OpenAI-compatible endpoint and the model it serves."""

    model: str
    """Model name as the server knows it (vLLM: the served model name; `GET <base_url>/models` lists them)."""

    @classmethod
    def of(cls, model: str, connection: OpenAIConnection) -> OpenAISettings:
        """``connection``'s settings (real secrets included) for ``model``."""
        return cls(model=model, **{k: getattr(connection, k) for k in OpenAIConnection.model_fields})
