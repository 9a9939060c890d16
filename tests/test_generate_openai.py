"""OpenAIEngine against a local fake OpenAI-compatible server (127.0.0.1 only, no internet).

The fake server picks its behaviour from the last user message (the "scenario") and counts attempts per
(scenario, seed), so each test scripts e.g. "429 once, then answer" without sharing state.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import struct
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from alignline.data.records import Prompt
from alignline.errors import AlignlineError, ConfigError
from alignline.generate.base import Engine, SamplingParams, sample_seed
from alignline.generate.openai_engine import (
    OpenAIEndpointError,
    OpenAIEngine,
    OpenAISettings,
    display_url,
    retry_after_s,
)

KEY = "sk-test-SECRET123"
MODEL = "fake-model"


class FakeState:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # {"path", "body", "auth", "t"}
        self.attempts: collections.Counter = collections.Counter()
        self.inflight = 0
        self.max_inflight = 0
        self.require_key: str | None = None
        self.url = ""

    def bodies(self, scenario: str | None = None) -> list[dict]:
        with self.lock:
            return [r["body"] for r in self.requests
                    if r["body"] and (scenario is None or r["body"]["messages"][-1]["content"] == scenario)]

    def times(self, scenario: str) -> list[float]:
        with self.lock:
            return [r["t"] for r in self.requests
                    if r["body"] and r["body"]["messages"][-1]["content"] == scenario]


def completion(text: str, finish: str = "stop") -> dict:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": "error", "code": status}}, headers)

    def _reset(self) -> None:
        # Close with RST and no response at all.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def do_GET(self):
        fake: FakeState = self.server.fake
        auth = self.headers.get("Authorization", "")
        with fake.lock:
            fake.requests.append({"path": self.path, "body": None, "auth": auth, "t": time.monotonic()})
        if fake.require_key and auth != f"Bearer {fake.require_key}":
            return self._error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}")
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]})
        return self._error(404, "not found")

    def do_POST(self):
        fake: FakeState = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        scenario = body["messages"][-1]["content"]
        seed = body.get("seed")
        with fake.lock:
            fake.requests.append({"path": self.path, "body": body, "auth": auth, "t": time.monotonic()})
            fake.attempts[(scenario, seed)] += 1
            attempt = fake.attempts[(scenario, seed)]
            fake.inflight += 1
            fake.max_inflight = max(fake.max_inflight, fake.inflight)
        try:
            self._respond(fake, body, scenario, seed, attempt, auth, token)
        finally:
            with fake.lock:
                fake.inflight -= 1

    def _respond(self, fake, body, scenario, seed, attempt, auth, token):
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        if fake.require_key and auth != f"Bearer {fake.require_key}":
            return self._error(401, f"Incorrect API key provided: {token}")
        if body.get("model") != MODEL:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        ok = completion(f"seed={seed}", "length" if body.get("max_tokens", 99) < 3 else "stop")
        if scenario == "busy":
            time.sleep(0.1)
        elif scenario == "429" and attempt == 1:
            return self._error(429, "Rate limit reached", {"Retry-After": "0.2"})
        elif scenario == "500x2" and attempt <= 2:
            return self._error(500, "internal error")
        elif scenario == "slow" and attempt == 1:
            time.sleep(0.8)
        elif scenario == "reset" and attempt == 1:
            return self._reset()
        elif scenario == "401":
            return self._error(401, f"Incorrect API key provided: {token}. You can find your API key at ...")
        elif scenario == "400":
            return self._error(400, "This model's maximum context length is 16 tokens; you asked for 300 tokens")
        elif scenario == "503":
            return self._error(503, f"upstream overloaded (request authorised with {token})")
        return self._send(200, ok)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_LOG", "MY_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake():
    state = FakeState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.fake = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def make(fake: FakeState, **kw) -> OpenAIEngine:
    opts = dict(model=MODEL, base_url=fake.url, api_key=KEY, max_retries=3, timeout_s=5.0,
                backoff_base_s=0.01, backoff_max_s=0.05)
    opts.update(kw)
    return OpenAIEngine(**opts)


def prompts(*scenarios: str) -> list[Prompt]:
    return [Prompt(id=f"p{i}", messages=[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": s}]) for i, s in enumerate(scenarios)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ happy path


def test_n_samples_are_n_seeded_requests_with_sampling_params(fake):
    sampling = SamplingParams(temperature=0.5, top_p=0.9, top_k=20, max_new_tokens=7, stop=["END"], seed=11)
    with make(fake) as engine:
        assert isinstance(engine, Engine) and engine.name == "openai"
        out = engine.generate(prompts("ok", "ok2"), n=3, sampling=sampling)
    assert [[r.sample_idx for r in row] for row in out] == [[0, 1, 2], [0, 1, 2]]
    bodies = fake.bodies()
    assert len(bodies) == 6
    want = {sample_seed(11, f"p{p}", i) for p in range(2) for i in range(3)}
    assert {b["seed"] for b in bodies} == want and len(want) == 6
    for p, row in enumerate(out):
        for i, r in enumerate(row):
            assert r.prompt_id == f"p{p}" and r.status == "ok" and r.error is None
            assert r.seed == sample_seed(11, f"p{p}", i)
            assert r.text == f"seed={r.seed}" and r.finish_reason == "stop"
            assert r.source == MODEL and r.sampling == sampling.model_dump()
    b = bodies[0]
    assert b["model"] == MODEL and b["temperature"] == 0.5 and b["top_p"] == 0.9 and b["max_tokens"] == 7
    assert b["stop"] == ["END"] and b["top_k"] == 20
    assert b["messages"] == [{"role": "system", "content": "Be brief."}, {"role": b["messages"][1]["role"],
                                                                         "content": b["messages"][1]["content"]}]
    assert all(r["auth"] == f"Bearer {KEY}" for r in fake.requests)
    assert engine.last_stats == {"requests": 6, "retries": 0, "failed": 0}


def test_defaults_send_no_top_k_or_stop_and_length_finish(fake):
    with make(fake) as engine:
        (row,) = engine.generate(prompts("ok"), n=1, sampling=SamplingParams(max_new_tokens=2))
    (body,) = fake.bodies()
    assert "top_k" not in body and "stop" not in body
    assert row[0].finish_reason == "length"
    with make(fake) as engine:
        assert engine.generate([], n=2, sampling=SamplingParams()) == []


# ------------------------------------------------------------------------------------------- retries


def test_429_honours_retry_after(fake):
    with make(fake) as engine:
        (row,) = engine.generate(prompts("429"), n=1, sampling=SamplingParams())
    assert row[0].status == "ok" and row[0].text == f"seed={row[0].seed}"
    t = fake.times("429")
    assert len(t) == 2 and t[1] - t[0] >= 0.2
    assert engine.last_stats["retries"] == 1


def test_500_twice_then_success(fake):
    with make(fake) as engine:
        (row,) = engine.generate(prompts("500x2"), n=1, sampling=SamplingParams())
    assert row[0].status == "ok" and len(fake.bodies("500x2")) == 3
    assert engine.last_stats == {"requests": 3, "retries": 2, "failed": 0}


def test_timeout_then_success(fake):
    with make(fake, timeout_s=0.3) as engine:
        start = time.monotonic()
        (row,) = engine.generate(prompts("slow"), n=1, sampling=SamplingParams())
    assert row[0].status == "ok" and row[0].text == f"seed={row[0].seed}"
    assert len(fake.bodies("slow")) == 2
    assert time.monotonic() - start < 3


def test_connection_reset_then_success(fake):
    with make(fake) as engine:
        (row,) = engine.generate(prompts("reset"), n=1, sampling=SamplingParams())
    assert row[0].status == "ok" and len(fake.bodies("reset")) == 2


def test_persistent_503_is_a_failed_record_not_an_empty_answer(fake, caplog):
    caplog.set_level(logging.WARNING, logger="alignline")
    with make(fake, max_retries=3) as engine:
        (row,) = engine.generate(prompts("503", "ok"), n=1, sampling=SamplingParams())[:1]
    r = row[0]
    assert r.status == "failed" and r.text == "" and r.finish_reason is None
    assert "503" in r.error and "4 attempts" in r.error and "upstream overloaded" in r.error
    assert r.seed == sample_seed(0, "p0", 0) and r.prompt_id == "p0"
    assert len(fake.bodies("503")) == 4
    assert engine.last_stats["failed"] == 1
    assert "1 of 2 requests" in caplog.text and "failed" in caplog.text


def test_max_concurrency_is_respected(fake):
    with make(fake, max_concurrency=3) as engine:
        out = engine.generate(prompts(*["busy"] * 8), n=2, sampling=SamplingParams())
    assert all(r.status == "ok" for row in out for r in row)
    assert len(fake.bodies()) == 16
    assert 2 <= fake.max_inflight <= 3


def test_backoff_is_capped_and_jittered(fake):
    engine = make(fake, backoff_base_s=0.5, backoff_max_s=2.0)
    waits = [engine._backoff(k, None) for k in range(1, 12) for _ in range(20)]
    assert all(0 <= w <= 2.0 for w in waits) and len(set(waits)) > 100
    assert 1.5 <= engine._backoff(1, 1.5) <= 2.0  # Retry-After honoured (+ up to backoff_base_s jitter)
    engine.close()


def test_retry_after_parsing():
    assert retry_after_s({"retry-after-ms": "150"}) == pytest.approx(0.15)
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "-3"}) == 0.0
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 20 < retry_after_s({"retry-after": future}) <= 31
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None and retry_after_s(None) is None


# ---------------------------------------------------------------------------------------- fail fast


def test_401_fails_fast_with_a_clear_message(fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with make(fake, api_key=None) as engine, pytest.raises(AlignlineError) as info:
        engine.generate(prompts("401"), n=1, sampling=SamplingParams())
    msg = str(info.value)
    assert isinstance(info.value, OpenAIEndpointError) and info.value.status == 401
    assert "401" in msg and fake.url in msg and MODEL in msg and "$OPENAI_API_KEY" in msg
    assert "Incorrect API key provided: ***" in msg and KEY not in msg
    assert len(fake.requests) == 1 and fake.requests[0]["auth"] == f"Bearer {KEY}"


def test_missing_key_message_says_where_to_set_it(fake):
    fake.require_key = KEY
    with make(fake, api_key=None, api_key_env="MY_KEY") as engine, pytest.raises(OpenAIEndpointError) as info:
        engine.generate(prompts("ok"), n=1, sampling=SamplingParams())
    assert "no API key was found" in str(info.value) and "$MY_KEY" in str(info.value)


def test_fatal_error_stops_the_remaining_requests(fake):
    with make(fake, max_concurrency=2) as engine, pytest.raises(OpenAIEndpointError):
        engine.generate(prompts("401", *["busy"] * 30), n=1, sampling=SamplingParams())
    time.sleep(0.3)  # let any in-flight request land
    assert len(fake.requests) <= 4


def test_400_fails_fast(fake):
    with make(fake) as engine, pytest.raises(OpenAIEndpointError) as info:
        engine.generate(prompts("400"), n=3, sampling=SamplingParams())
    msg = str(info.value)
    assert info.value.status == 400 and "400" in msg and fake.url in msg and MODEL in msg
    assert "maximum context length is 16 tokens" in msg
    assert len(fake.bodies("400")) <= 3  # one per sample at most, never retried


def test_unknown_model_404_fails_fast(fake):
    with make(fake, model="no-such-model", max_retries=5) as engine, pytest.raises(OpenAIEndpointError) as info:
        engine.generate(prompts("ok"), n=1, sampling=SamplingParams())
    msg = str(info.value)
    assert "404" in msg and "no-such-model" in msg and f"{fake.url}/models" in msg and "does not exist" in msg
    assert len(fake.requests) == 1


# ------------------------------------------------------------------------------------ unreachable server


def test_unreachable_endpoint_gives_failed_records_and_a_clear_check(caplog):
    url = f"http://127.0.0.1:{free_port()}/v1"
    caplog.set_level(logging.WARNING, logger="alignline")
    with OpenAIEngine(model=MODEL, base_url=url, max_retries=2, timeout_s=2, backoff_base_s=0.01,
                      backoff_max_s=0.02) as engine:
        out = engine.generate(prompts("ok", "ok2"), n=2, sampling=SamplingParams())
        assert all(r.status == "failed" and r.text == "" for row in out for r in row)
        assert "3 attempts" in out[0][0].error and "connection error" in out[0][0].error and url in out[0][0].error
        assert engine.last_stats == {"requests": 12, "retries": 8, "failed": 4}
        assert "4 of 4 requests" in caplog.text
        with pytest.raises(AlignlineError, match="cannot reach") as info:
            engine.check_connection()
        assert url in str(info.value)


def test_check_connection(fake):
    with make(fake) as engine:
        assert engine.check_connection() == [MODEL]
    fake.require_key = "sk-other-KEY"
    with make(fake) as engine, pytest.raises(OpenAIEndpointError) as info:
        engine.check_connection()
    assert info.value.status == 401 and fake.url in str(info.value) and KEY not in str(info.value)


def test_check_connection_goes_on_when_the_server_has_no_models_route(fake, caplog):
    """A gateway that answers GET /models with 404 is reachable: a warning and [], not an error."""
    with make(fake, base_url=f"{fake.url.removesuffix('/v1')}/gateway/v1") as engine:
        assert engine.check_connection() == []
    assert "HTTP 404" in caplog.text


# ------------------------------------------------------------------------------------------ key hygiene


def test_key_never_leaks(fake, caplog, capfd, monkeypatch):
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with make(fake, max_retries=1) as engine:
        texts.append(repr(engine))
        out = engine.generate(prompts("ok", "503", "500x2"), n=2, sampling=SamplingParams())
        texts += [r.model_dump_json() for row in out for r in row]
        assert out[1][0].status == "failed" and "***" in out[1][0].error
        for scenario in ("401", "400"):
            with pytest.raises(AlignlineError) as info:
                engine.generate(prompts(scenario), n=1, sampling=SamplingParams())
            texts += [str(info.value), repr(info.value.args)]
    fake.require_key = "sk-other-KEY"
    with make(fake) as engine, pytest.raises(AlignlineError) as info:
        engine.check_connection()
    texts.append(str(info.value))
    assert any(r["auth"] == f"Bearer {KEY}" for r in fake.requests)  # the key was really used

    settings = OpenAISettings(model=MODEL, api_key=KEY, base_url=fake.url)
    assert settings.api_key.get_secret_value() == KEY
    assert settings.model_dump(mode="json")["api_key"] == "**********"  # redacted in every file-bound dump
    texts += [settings.model_dump_json(), json.dumps(settings.model_dump(mode="json")), repr(settings), str(settings)]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    texts.append(repr(OpenAISettings(model=MODEL)))
    with pytest.raises(ValidationError) as info:  # a key pasted where the variable's name belongs
        OpenAISettings(model=MODEL, api_key_env=KEY)
    texts.append(str(info.value))
    with pytest.raises(ConfigError) as info:
        OpenAIEngine(model=MODEL, api_key_env=KEY)
    assert "api_key_env" in str(info.value)
    texts.append(str(info.value))

    sys.stderr.flush()
    captured = capfd.readouterr()
    texts += [caplog.text, captured.out, captured.err]
    assert caplog.text  # logging really was captured
    for text in texts:
        assert KEY not in text


def test_scrub_and_display_url(fake):
    with make(fake) as engine:
        assert engine.scrub(f"bad key {KEY}!") == "bad key ***!"
    assert display_url("http://user:pw@host:8000/v1") == "http://host:8000/v1"
    assert display_url("http://host/v1") == "http://host/v1"


# --------------------------------------------------------------------------------------------- settings


def test_settings_resolution_and_docs(monkeypatch):
    s = OpenAISettings(model="m")
    assert (s.max_concurrency, s.max_retries, s.timeout_s, s.api_key_env) == (8, 5, 60.0, "OPENAI_API_KEY")
    assert s.resolved_base_url() == "https://api.openai.com/v1" and s.resolved_api_key() is None
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:8000/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert s.resolved_base_url() == "http://localhost:8000/v1" and s.resolved_api_key() == "sk-env"
    assert OpenAISettings(model="m", base_url="http://x/v1", api_key="sk-cfg").resolved_api_key() == "sk-cfg"
    assert OpenAISettings(model="m", base_url="http://x/v1").resolved_base_url() == "http://x/v1"
    for name, field in OpenAISettings.model_fields.items():
        assert field.description, f"{name} has no docstring"
    with pytest.raises(ConfigError, match="model"):
        OpenAIEngine(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="max_concurrency"):
        OpenAIEngine(model="m", max_concurrency=0)
    engine = OpenAIEngine(OpenAISettings(model="m", api_key="sk-cfg", max_retries=1), max_retries=2)
    assert engine.settings.max_retries == 2 and engine.settings.resolved_api_key() == "sk-cfg"
    engine.close()
