"""The remote engine (design section 6): any OpenAI-compatible endpoint through the ``openai`` client.

Works with OpenAI, ``vllm serve``, SGLang and the llama.cpp server. Every sample is its own chat-completions
request with ``seed = sample_seed(run seed, prompt id, sample index)``, so each sample can be retried on its
own and servers that honour ``seed`` (vLLM does) give the same text for it however the run is split.

Requests run in a thread pool of at most ``max_concurrency`` workers. The ``openai`` client's own retries
are off; :class:`OpenAIEngine` retries 408, 409, 429, 5xx, timeouts and connection errors (refused, reset)
with capped exponential backoff and full jitter, honouring ``Retry-After`` / ``retry-after-ms``. A request
that still fails after ``max_retries`` retries becomes a ``Response`` with ``status="failed"``, an ``error``
and empty ``text``, never an "ok" empty answer. 400, 401, 403, 404 and other client errors will not get
better by retrying: the run stops at once with an :class:`OpenAIEndpointError` naming the status, the
base URL, the model and the server's message.

The API key comes from ``api_key`` (a ``SecretStr``, '**********' in dumps, reprs and manifests) or from the
environment variable named by ``api_key_env``; it is replaced by ``***`` in every message this module
writes, logs or raises.
"""

from __future__ import annotations

import email.utils
import http
import json
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import openai
from pydantic import ValidationError

from alignline.config import config_error
from alignline.data.records import SURROGATE, Prompt, Response
from alignline.errors import AlignlineError
from alignline.generate.base import Engine, SamplingParams, check_n, sample_seed
from alignline.generate.endpoint import DEFAULT_BASE_URL, OpenAISettings, display_url

__all__ = ["DEFAULT_BASE_URL", "OpenAIEndpointError", "OpenAIEngine", "OpenAISettings", "display_url",
           "retry_after_s"]

log = logging.getLogger(__name__)

NO_KEY = "EMPTY"
"""Sent as the key when none is configured: local servers started without ``--api-key`` ignore it."""
RETRY_AFTER_CAP_S = 120.0
"""A server's Retry-After is honoured up to max(backoff_max_s, this many seconds)."""
RETRYABLE_STATUS = frozenset({408, 409, 429})


class OpenAIEndpointError(AlignlineError):
    """The endpoint refused a request in a way retrying cannot fix (400, 401, 403, 404, ...)."""

    def __init__(self, message: str, *, status: int | None = None, base_url: str = "", model: str = ""):
        super().__init__(message)
        self.status, self.base_url, self.model = status, base_url, model


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds asked for by ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), else None."""
    if not headers:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is not None:
            return max(0.0, when.timestamp() - time.time())
    return None


@dataclass
class _Failure:
    """One failed attempt: a summary for the record and, if retryable, the wait the server asked for."""

    summary: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None
    server_message: str = ""


class _Aborted(Exception):
    """Another request failed fast; this one stops without recording anything."""


class OpenAIEngine(Engine):
    """Sampling through an OpenAI-compatible chat-completions endpoint, one request per sample.

    ``OpenAIEngine(settings)`` or ``OpenAIEngine(model=..., base_url=..., ...)`` (keyword fields override
    ``settings``). ``source`` is written into every response (default: the model name). After
    :meth:`generate`, :attr:`last_stats` holds the counts of requests, retries and failed requests.
    """

    name = "openai"

    def __init__(self, settings: OpenAISettings | Mapping[str, Any] | None = None, *, source: str | None = None,
                 client: openai.OpenAI | None = None, **fields: Any):
        self.settings = self._settings(settings, fields)
        self.base_url = self.settings.resolved_base_url()
        self._url = display_url(self.base_url)
        key = self.settings.resolved_api_key()
        self._key = key
        self._has_key = key is not None
        self.source = source or self.settings.model
        self._client = client or openai.OpenAI(base_url=self.base_url, api_key=key or NO_KEY, max_retries=0,
                                               timeout=self.settings.timeout_s)
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.last_stats: dict[str, int] = {"requests": 0, "retries": 0, "failed": 0}

    @staticmethod
    def _settings(settings: OpenAISettings | Mapping[str, Any] | None, fields: Mapping[str, Any]) -> OpenAISettings:
        if isinstance(settings, OpenAISettings):
            data: dict[str, Any] = {k: getattr(settings, k) for k in OpenAISettings.model_fields}
        else:
            data = dict(settings or {})
        data.update(fields)
        try:
            return OpenAISettings.model_validate(data)
        except ValidationError as exc:
            raise config_error(OpenAISettings, exc, "OpenAIEngine settings") from None

    def __repr__(self) -> str:
        return f"OpenAIEngine(base_url={self._url!r}, model={self.settings.model!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- key hygiene

    def scrub(self, text: object) -> str:
        """``text`` with the API key replaced by ``***``."""
        text = str(text)
        if self._key and len(self._key) >= 4:
            text = text.replace(self._key, "***")
        return text

    # ------------------------------------------------------------------------------------------ public API

    def check_connection(self, timeout_s: float | None = None) -> list[str]:
        """The model ids the endpoint serves (``GET <base_url>/models``); a clear error if it cannot be reached.

        Raises :class:`OpenAIEndpointError` naming the base URL when the server is unreachable, times out,
        refuses the key or keeps answering with a body that is not JSON (retried as a completion is). Only logs a warning if ``model`` is not among the listed ids (some servers, e.g.
        llama.cpp, serve one model under any name), or if the server answers 404/405 (a gateway without
        /models) or a retryable status (408/409/429/5xx): then it returns [].
        """
        client = self._client.with_options(max_retries=0, timeout=timeout_s or min(self.settings.timeout_s, 10.0))
        try:
            ids = self._listed_models(client)
        except openai.APITimeoutError:
            raise OpenAIEndpointError(
                f"the OpenAI-compatible endpoint at {self._url} did not answer GET /models in time; "
                "is the server up and is base_url right (it usually ends in /v1)?",
                base_url=self._url, model=self.settings.model) from None
        except openai.APIConnectionError as exc:
            raise OpenAIEndpointError(
                f"cannot reach the OpenAI-compatible endpoint at {self._url} ({self._cause(exc)}); is the server "
                "running (e.g. `vllm serve MODEL`) and is base_url right (it usually ends in /v1)?",
                base_url=self._url, model=self.settings.model) from None
        except openai.APIStatusError as exc:
            if exc.status_code in (404, 405, 408, 409, 429) or exc.status_code >= 500:
                # the server answered: it is reachable; some gateways have no /models, others are busy now
                log.warning("the endpoint at %s answered GET /models with HTTP %s; going on (requests are retried)",
                            self._url, exc.status_code)
                return []
            failure = self._classify(exc)
            raise self._fatal(failure, "GET /models") from None
        if ids and self.settings.model not in ids:
            log.warning("the endpoint at %s does not list model %r (it lists: %s)", self._url, self.settings.model,
                        self.scrub(", ".join(ids[:20])))
        return ids

    def _listed_models(self, client: openai.OpenAI) -> list[str]:
        """The ids of ``GET /models``, read from the body itself: a 200 whose body is not a JSON object (a proxy's
        error page, a web page at the wrong base_url) is retried like a completion, then an error naming the URL
        and the body's first bytes (the client's own parser would fail on it with an AttributeError)."""
        attempts = self.settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            raw = client.models.with_raw_response.list()
            body = raw.content
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                return [str(m.get("id") if isinstance(m, dict) else m) for m in doc.get("data") or []]
            if attempt < attempts:
                time.sleep(self._backoff(attempt, None))
        raise OpenAIEndpointError(self.scrub(
            f"the endpoint at {self._url} answered GET {self._url}/models with HTTP {raw.status_code} and a body that "
            f"is not JSON ({len(body):,} bytes, starting {body[:120]!r}), {attempts} times. Is base_url the API's "
            "address (it usually ends in /v1), not a web page, or a proxy's login or error page?"),
            status=raw.status_code, base_url=self._url, model=self.settings.model)

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[list[Response]]:
        """For every prompt (same order), ``n`` responses (``sample_idx`` 0..n-1), one request each.

        Requests that exhaust their retries come back with ``status="failed"``; a request the server
        refuses for good (400, 401, 403, 404, ...) raises :class:`OpenAIEndpointError` and stops the rest.
        """
        check_n(n)
        if not isinstance(sampling, SamplingParams):
            sampling = SamplingParams.model_validate(sampling)
        params = sampling.model_dump()
        out: list[list[Response | None]] = [[None] * n for _ in prompts]
        stats = {"requests": 0, "retries": 0, "failed": 0}
        self.last_stats = stats
        jobs = [(p, i, prompt) for p, prompt in enumerate(prompts) for i in range(n)]
        if not jobs:
            return []
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.settings.max_concurrency, len(jobs)),
                                  thread_name_prefix="alignline-openai")
        ok = False
        try:
            futures: dict[Future, tuple[int, int]] = {}
            for p, i, prompt in jobs:
                fut = pool.submit(self._sample, prompt, i, sampling, params, stop, stats)
                futures[fut] = (p, i)
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None and not isinstance(fut.exception(), _Aborted):
                    raise fut.exception()
            for fut, (p, i) in futures.items():
                out[p][i] = fut.result()
            ok = True
        finally:
            if not ok:
                stop.set()
            pool.shutdown(wait=ok, cancel_futures=True)
        if stats["failed"]:
            log.warning("%d of %d requests to %s (model %r) failed after %d retries each and are recorded with "
                        "status 'failed'; first error: %s", stats["failed"], len(jobs), self._url,
                        self.settings.model, self.settings.max_retries,
                        next(r.error for row in out for r in row if r is not None and r.status == "failed"))
        return [[r for r in row if r is not None] for row in out]

    # --------------------------------------------------------------------------------------------- requests

    def _request_kwargs(self, prompt: Prompt, seed: int, sampling: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            model=self.settings.model,
            messages=[{"role": m.role, "content": m.content} for m in prompt.messages],
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
        )
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)
        if sampling.top_k > 0:
            kwargs["extra_body"] = {"top_k": sampling.top_k}
        return kwargs

    def _sample(self, prompt: Prompt, idx: int, sampling: SamplingParams, params: dict[str, Any],
                stop: threading.Event, stats: dict[str, int]) -> Response:
        seed = sample_seed(sampling.seed, prompt.id, idx)
        kwargs = self._request_kwargs(prompt, seed, sampling)
        base = dict(prompt_id=prompt.id, sample_idx=idx, source=self.source, sampling=dict(params), seed=seed)
        attempts = self.settings.max_retries + 1
        failure: _Failure | None = None
        for attempt in range(1, attempts + 1):
            if stop.is_set():
                raise _Aborted
            with self._lock:
                stats["requests"] += 1
                if attempt > 1:
                    stats["retries"] += 1
            try:
                completion = self._client.chat.completions.create(**kwargs)
                if isinstance(completion, (str, bytes)):  # a 200 whose body is not JSON (a proxy's error page)
                    raise ValueError(f"not JSON: {_short(completion, 120)!r}")
            except (openai.APIConnectionError, openai.APIStatusError) as exc:
                failure = self._classify(exc)
            except (openai.OpenAIError, ValueError) as exc:  # a malformed or non-JSON body: like a 5xx
                failure = _Failure(self.scrub(_short(f"the server answered with a body that cannot be read "
                                                     f"({type(exc).__name__}: {exc})")), retryable=True)
            else:
                return self._to_response(completion, base, stats)
            if not failure.retryable:
                raise self._fatal(failure, f"prompt {prompt.id!r}, sample {idx}")
            if attempt == attempts:
                break
            delay = self._backoff(attempt, failure.retry_after)
            log.debug("request for prompt %r sample %d: %s; retry %d of %d in %.2f s", prompt.id, idx,
                      failure.summary, attempt, self.settings.max_retries, delay)
            if stop.wait(delay):
                raise _Aborted
        assert failure is not None
        with self._lock:
            stats["failed"] += 1
        noun = "attempt" if attempts == 1 else "attempts"
        return Response(**base, text="", finish_reason=None, status="failed",
                        error=f"gave up after {attempts} {noun}; last error: {failure.summary}")

    def _to_response(self, completion: Any, base: dict[str, Any], stats: dict[str, int]) -> Response:
        choices = getattr(completion, "choices", None)
        if not choices:
            with self._lock:
                stats["failed"] += 1
            return Response(**base, text="", status="failed",
                            error=self.scrub(f"the server at {self._url} returned no choices: {_short(completion)}"))
        choice = choices[0]
        message = getattr(choice, "message", None)
        content = getattr(message, "content", None)
        finish = getattr(choice, "finish_reason", None)
        if content is None:
            with self._lock:
                stats["failed"] += 1
            refusal = getattr(message, "refusal", None)
            detail = f"finish_reason={finish!r}" + (f", refusal: {_short(refusal)}" if refusal else "")
            return Response(**base, text="", finish_reason=finish, status="failed",
                            error=self.scrub(f"the server returned no text ({detail})"))
        # a lone surrogate (JSON "\\ud800") cannot be written as UTF-8: keep the text, mark the damage
        return Response(**base, text=SURROGATE.sub("\ufffd", content), finish_reason=finish)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        jitter = self._rng.uniform(0.0, min(s.backoff_max_s, s.backoff_base_s * 2 ** (attempt - 1)))
        if retry_after is None:
            return jitter
        return min(retry_after, max(s.backoff_max_s, RETRY_AFTER_CAP_S)) + self._rng.uniform(0.0, s.backoff_base_s)

    # ---------------------------------------------------------------------------------------------- errors

    def _cause(self, exc: BaseException) -> str:
        cause = exc.__cause__ or exc.__context__
        text = f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else str(exc)
        return self.scrub(_short(text, 200))

    def _classify(self, exc: openai.APIConnectionError | openai.APIStatusError) -> _Failure:
        if isinstance(exc, openai.APITimeoutError):
            return _Failure(f"timed out after {self.settings.timeout_s:g} s", retryable=True)
        if isinstance(exc, openai.APIConnectionError):
            return _Failure(f"connection error to {self._url} ({self._cause(exc)})", retryable=True)
        status = int(exc.status_code)
        body = exc.body
        message = body.get("message") if isinstance(body, Mapping) else body
        message = self.scrub(_short(message if message else exc.message))
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        summary = f"HTTP {status}" + (f" {phrase}" if phrase else "") + (f": {message}" if message else "")
        retryable = status in RETRYABLE_STATUS or status >= 500
        headers = getattr(getattr(exc, "response", None), "headers", None)
        return _Failure(summary, retryable=retryable, status=status,
                        retry_after=retry_after_s(headers) if retryable else None, server_message=message)

    def _fatal(self, failure: _Failure, what: str) -> OpenAIEndpointError:
        s, status = self.settings, failure.status
        where = f"the endpoint at {self._url} (model {s.model!r})"
        said = f"; the server said: {failure.server_message}" if failure.server_message else ""
        if status in (401, 403):
            if self._has_key:
                hint = (f"check the key in ${s.api_key_env} (or api_key in the config): it is wrong, expired or "
                        f"not allowed to use model {s.model!r}")
            else:
                hint = f"no API key was found: set the key in ${s.api_key_env} (or api_key in the config)"
            text = f"{where} refused the API key (HTTP {status}) for {what}{said}. {hint}"
        elif status == 404:
            text = (f"{where} answered HTTP 404 Not Found for {what}{said}. Check that base_url is right (it usually "
                    f"ends in /v1) and that the server serves model {s.model!r} (GET {self._url}/models lists them)")
        elif status == 400:
            text = (f"{where} rejected the request as invalid (HTTP 400 Bad Request) for {what}{said}. Common causes: "
                    "an unknown model name, or the prompt plus max_new_tokens exceeding the model's context length")
        else:
            text = f"{where} refused the request for {what} with {failure.summary}; retrying will not help"
        return OpenAIEndpointError(self.scrub(text), status=status, base_url=self._url, model=s.model)
