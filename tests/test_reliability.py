"""Issue 18: no secret in any file, no traceback on bad input or a broken checkpoint, no hang on a huge record.

Every test writes the file it needs (a planted key, a cut checkpoint or GGUF, a surrogate, a non-JSON server,
a 50 MB record, duplicate ids) and checks the clear error, the counted drop or the equal result.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from tests.conftest import conversation, tokenised_examples
from tests.test_training import _losses, _run

from alignline.data.chat import tokenise_conversation

# ------------------------------------------------------------------------------ 2. broken newest checkpoint


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return tokenised_examples(tiny_tokenizer, 8)


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, examples, tiny_tokenizer, tmp_path_factory):
    """An uninterrupted run of 8 steps (its parameters and losses) and a run stopped at step 4 with checkpoints 2
    and 4."""
    from alignline.models import load_causal_lm

    root = tmp_path_factory.mktemp("interrupted")
    pad = tiny_tokenizer.pad_token_id
    full = load_causal_lm(tiny_model_dir, dtype="float32")
    _run(full, examples, root / "full", pad, save_every=5)
    part = load_causal_lm(tiny_model_dir, dtype="float32")
    assert _run(part, examples, root / "part", pad, save_every=2, stop_after_step=4).steps == 4
    return [p.detach().clone() for p in full.parameters()], _losses(root / "full" / "metrics.jsonl"), root / "part"


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.safetensors", "optimizer.json", "position.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(damaged, interrupted, tiny_model_dir, examples,
                                                               tiny_tokenizer, tmp_path, capsys):
    """Checkpoints at steps 2 and 4; step 4's file cut in half: the rerun names the file, resumes step 2 and ends
    equal to an uninterrupted run (parameters bit for bit, every logged loss)."""
    from alignline.models import load_causal_lm

    full_params, full_losses, part = interrupted
    run_dir = shutil.copytree(part, tmp_path / "part")
    path = run_dir / "checkpoints" / "step-0000004" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    resumed = load_causal_lm(tiny_model_dir, dtype="float32")
    r = _run(resumed, examples, run_dir, tiny_tokenizer.pad_token_id, save_every=2, resume=True)
    said = capsys.readouterr().out
    assert r.steps == 8
    assert f"{damaged} is damaged" in said and "resuming from" in said and "step-0000002 (step 2)" in said
    assert (run_dir / "checkpoints" / "damaged-step-0000004" / damaged).exists()
    for p, q in zip(full_params, resumed.parameters()):
        assert torch.equal(p, q)
    assert _losses(run_dir / "metrics.jsonl") == full_losses


def test_checkpoint_marker_records_sizes_and_checksums(tmp_path):
    from alignline.train.checkpoint import COMPLETE, checkpoint_problem, marker_bytes, newest_intact

    old, new = tmp_path / "step-1", tmp_path / "step-2"
    for d in (old, new):
        d.mkdir()
        (d / "position.json").write_text('{"step": 1}')
        (d / COMPLETE).write_bytes(marker_bytes(d))
    assert json.loads((new / COMPLETE).read_text())["files"]["position.json"]["size"] == 11
    assert checkpoint_problem(new) is None
    (new / "position.json").write_text('{"step": 9}')  # same size, other bytes
    assert "sha256" in checkpoint_problem(new)
    said = []
    assert newest_intact([old, new], said.append) == old and "position.json" in said[0]
    (old / COMPLETE).write_text("ok\n")  # a marker from before checksums: trusted
    assert checkpoint_problem(old) is None


# ------------------------------------------------------------------------------------------- CLI in process


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``alignline ARGS`` in this process: (exit code, stderr)."""
    import sys

    from alignline.cli import main

    monkeypatch.setattr(sys, "argv", ["alignline", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), capsys.readouterr().err


# ---------------------------------------------------------------------------- a local OpenAI-compatible server

KEY, PASSWORD = "sk-planted-KEY-4242", "pw-planted-9393"


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions; ``server.mode``: "ok" (a verdict-shaped answer), "nonjson" (HTTP
    200, a JSON content type and an HTML body) or "refuse PROMPT" (HTTP 400 for that prompt, which stops a run).
    Records each request's Authorization header."""

    def log_message(self, *args):
        pass

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.seen.append((self.headers.get("Authorization"), body["messages"][-1]["content"][:40]))
        if self.server.mode == "nonjson":
            self._reply(b"<html><body>502 Bad Gateway</body></html>")
            return
        if self.server.mode == "refuse " + body["messages"][-1]["content"]:
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        text = "Reason: fine\nVerdict: [[A]]\nDegree: better"
        self._reply(json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                             "finish_reason": "stop"}]}).encode())


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    srv.mode, srv.seen = "ok", []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_port}/v1"
    srv.secret_url = f"http://user:{PASSWORD}@127.0.0.1:{srv.server_port}/v1"
    yield srv
    srv.shutdown()


def write_prompts(path, n=2):
    path.write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"Q{i}?"}]}) + "\n"
                            for i in range(n)))
    return path


def files_holding(root, *secrets: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]


# ----------------------------------------------------------------------------------------- 1. secrets


def test_no_secret_reaches_any_file(tmp_path, server, monkeypatch, capsys):
    """sample (openai.api_key) and eval winrate (judge.openai.api_key, credentials in base_url): every file both runs
    write is free of the key and the password, the saved configs hold the redacted forms, and the server did
    receive the real key."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    code, err = cli(monkeypatch, capsys, "sample", f"prompts={prompts}", "engine=openai", "model=fake",
                    f"openai.api_key={KEY}", f"openai.base_url={server.url}", "openai.max_retries=0",
                    f"output_dir={tmp_path / 'sample'}")
    assert code == 0, err
    responses = tmp_path / "responses.jsonl"
    shutil.copy(next((tmp_path / "sample").glob("responses-*.jsonl")), responses)
    code, err = cli(monkeypatch, capsys, "eval", "winrate", f"prompts={prompts}", f"model.responses={responses}",
                    "model.name=m", f"reference.responses={responses}", "reference.name=r", "judge.engine=openai",
                    "judge.model=fake", f"judge.openai.api_key={KEY}", f"judge.openai.base_url={server.secret_url}",
                    f"output_dir={tmp_path / 'winrate'}")
    assert code == 0, err
    # the engines got the real values (httpx sends a URL's user:password as Basic auth, in place of the key)
    basic = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    assert {auth for auth, _ in server.seen} == {f"Bearer {KEY}", basic}
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 6
    assert files_holding(tmp_path, KEY, PASSWORD) == []
    for run in ("sample", "winrate"):
        text = (tmp_path / run / "config.yaml").read_text()
        assert "**********" in text and f"http://127.0.0.1:{server.server_port}/v1" in text
    # a key where the variable's name belongs: a clear error that does not echo it
    code, err = cli(monkeypatch, capsys, "sample", f"prompts={prompts}", "engine=openai", "model=fake",
                    f"openai.api_key_env={KEY}", f"output_dir={tmp_path / 'bad'}")
    assert code == 2 and "openai.api_key_env" in err and "not the key itself" in err
    assert KEY not in err and "Traceback" not in err


# ------------------------------------------------------------------------------ 3. a 200 that is not JSON


def test_non_json_200_is_a_retried_then_recorded_failure(tmp_path, server, monkeypatch, capsys):
    """A server answering HTTP 200 with an HTML body: sample records every sample as failed after 1 + 1 attempts
    (like a 5xx) and completes; eval winrate records judge failures; neither leaves a traceback or "running"."""
    server.mode = "nonjson"
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    code, err = cli(monkeypatch, capsys, "sample", f"prompts={prompts}", "engine=openai", "model=fake", "n=2",
                    f"openai.base_url={server.url}", "openai.max_retries=1", "openai.backoff_base_s=0",
                    f"output_dir={tmp_path / 'sample'}")
    assert code == 0, err
    rows = [json.loads(ln) for f in (tmp_path / "sample").glob("responses-*.jsonl") for ln in f.read_text().splitlines()]
    assert len(rows) == 4 and all(r["status"] == "failed" and "cannot be read" in r["error"] for r in rows)
    assert len(server.seen) == 4 * 2  # every request retried once
    manifest = json.loads((tmp_path / "sample" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["failed"] == 4

    for name in ("model", "reference"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"prompt_id": f"q{i}", "sample_idx": 0, "text": f"{name} answer {i}", "source": name}) + "\n"
            for i in range(2)))
    server.seen.clear()
    code, err = cli(monkeypatch, capsys, "eval", "winrate", f"prompts={prompts}", f"model.responses={tmp_path / 'model.jsonl'}",
                    "model.name=m", f"reference.responses={tmp_path / 'reference.jsonl'}", "reference.name=r",
                    "judge.engine=openai",
                    "judge.model=fake", f"judge.openai.base_url={server.url}", "judge.openai.max_retries=1",
                    "judge.openai.backoff_base_s=0", f"output_dir={tmp_path / 'winrate'}")
    assert "Traceback" not in err and len(server.seen) == 2 * 2 * 2  # 2 prompts x 2 orders x 2 attempts
    manifest = json.loads((tmp_path / "winrate" / "manifest.json").read_text())
    assert manifest["status"] == ("complete" if code == 0 else "failed"), err


# ------------------------------------------------------------------------------------ 3. a cut GGUF file


def write_gguf(path):
    """A small llama GGUF whose header (with a 300-token vocabulary) is over 1 KB; returns where its data starts."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list([f"token-{i}" for i in range(300)])
    writer.add_tensor("token_embd.weight", np.ones((300, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from alignline.models.gguf_layout import read_gguf_layout

    return read_gguf_layout(path).data_start


def test_cut_gguf_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Cut at 100 bytes and 1 KB (inside the header) and inside the tensor data: import-gguf and sft model=x.gguf
    say the file is truncated or damaged and to copy it again; no traceback."""
    whole = tmp_path / "whole.gguf"
    data_start = write_gguf(whole)
    assert data_start > 1024
    data = whole.read_bytes()
    monkeypatch.setenv("ALIGNLINE_CACHE", str(tmp_path / "cache"))
    convs = tmp_path / "convs.jsonl"
    convs.write_text(json.dumps(conversation(0)) + "\n")
    for cut, where in ((100, "inside its GGUF header"), (1024, "inside its GGUF header"),
                       (data_start + 100, "inside the tensor data")):
        bad = tmp_path / f"cut-{cut}.gguf"
        bad.write_bytes(data[:cut])
        for args in (("models", "import-gguf", bad, tmp_path / "out"),
                     ("sft", f"model={bad}", f"data.train={convs}", f"output_dir={tmp_path / 'sft'}")):
            code, err = cli(monkeypatch, capsys, *args)
            assert code == 2, err
            flat = " ".join(err.split())
            assert f"{bad} is truncated or damaged" in flat and where in flat and "copy the .gguf file again" in flat
            assert "Traceback" not in err
    assert json.loads((tmp_path / "sft" / "manifest.json").read_text())["status"] == "failed"  # item 6


# ---------------------------------------------------------------------------- 3. a lone surrogate in JSON text


def test_lone_surrogate_names_record_and_field_and_marks_the_run_failed(tmp_path, tiny_model_dir, monkeypatch,
                                                                        capsys):
    """'\\ud800' in otherwise valid JSON: prepare, sft and sample each stop with file:line and the field, and
    leave their run directory marked "failed" with the error (item 6)."""
    convs = tmp_path / "convs.jsonl"
    bad = conversation(1)
    bad["messages"][1]["content"] = "half a pair: \ud800!"
    convs.write_text(json.dumps(conversation(0)) + "\n" + json.dumps(bad) + "\n")  # json.dumps writes \\ud800
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p", "messages": [{"role": "user", "content": "x\udfff"}]}) + "\n")
    runs = {
        "prepare": (["prepare", "source=conversations", f"path={convs}", "tokenizer=null"], convs, 2,
                    "messages[1].content"),
        "sft": (["sft", f"model={tiny_model_dir}", f"data.train={convs}"], convs, 2, "messages[1].content"),
        "sample": (["sample", f"model={tiny_model_dir}", f"prompts={prompts}"], prompts, 1, "messages[0].content"),
    }
    for name, (args, path, line, field) in runs.items():
        out = tmp_path / name
        code, err = cli(monkeypatch, capsys, *args, f"output_dir={out}")
        flat = " ".join(err.split())
        assert code == 2 and f"{path}:{line}" in flat and f"field '{field}'" in flat and "lone surrogate" in flat, err
        assert "Traceback" not in err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "lone surrogate" in manifest["error"]


# ------------------------------------------------------------------------------ 5. counts that add up


def test_resumed_sample_counts_describe_the_whole_output(tmp_path, server, monkeypatch, capsys):
    """8 prompts, 2 per shard; the first invocation stops at Q6 (HTTP 400) with 6 prompts written and is marked
    failed; the rerun samples the last 2: the manifest counts 8 prompts and 8 responses, 6 of them resumed."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8)
    args = ("sample", f"prompts={prompts}", "engine=openai", "model=fake", "n=1", "prompts_per_shard=2",
            "max_batch=2", f"openai.base_url={server.url}", "openai.max_retries=0", f"output_dir={tmp_path / 's'}")
    server.mode = "refuse Q6?"
    code, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "HTTP 400" in " ".join(err.split())
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "HTTP 400" in manifest["error"]
    assert sum(len(f.read_text().splitlines()) for f in (tmp_path / "s").glob("responses-*.jsonl")) == 6
    server.mode = "ok"
    code, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    counts = json.loads((tmp_path / "s" / "manifest.json").read_text())["counts"]
    assert (counts["prompts"], counts["responses"], counts["failed"]) == (8, 8, 0)
    assert (counts["resumed_prompts"], counts["sampled_prompts"], counts["finish_reason:stop"]) == (6, 2, 8)


# ---------------------------------------------------------------------------------- 4. a huge record


def test_prefix_tokenisation_equals_the_whole_conversation_up_to_max_tokens(tiny_tokenizer):
    """max_tokens=64 on a 3-turn conversation of ~3,000 characters: the first 64 ids and labels are those of the
    whole conversation, for train_on all and last; a conversation that fits is tokenised whole."""
    msgs = []
    for t in range(3):
        msgs += [{"role": "user", "content": f"question {t} " + "why? " * 150},
                 {"role": "assistant", "content": f"answer {t} " + "because. " * 150}]
    for train_on in ("all", "last"):
        whole = tokenise_conversation(tiny_tokenizer, msgs, train_on=train_on)
        cut = tokenise_conversation(tiny_tokenizer, msgs, train_on=train_on, max_tokens=64)
        assert cut.truncated and not whole.truncated and len(cut.input_ids) < len(whole.input_ids)
        assert cut.input_ids[:64] == whole.input_ids[:64] and cut.labels[:64] == whole.labels[:64]
    short = tokenise_conversation(tiny_tokenizer, msgs[:2], max_tokens=10_000)
    assert not short.truncated and short == tokenise_conversation(tiny_tokenizer, msgs[:2])


def test_50_mb_record_is_truncated_cheaply_or_skipped_by_size(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A valid 50 MB conversation on line 2 with long_examples=truncate max_length=128: without a size limit it
    becomes one 128-token example (only a prefix is tokenised, so the run finishes); under the default
    data.max_record_chars it is skipped and counted with its line number."""
    from alignline.config import load_config
    from alignline.stages import sft

    data = tmp_path / "convs.jsonl"
    huge = {"id": "huge", "messages": [{"role": "user", "content": "Tell me everything."},
                                       {"role": "assistant", "content": "All of it. " * 5_000_000}]}
    with open(data, "w") as fh:
        fh.write(json.dumps(conversation(0)) + "\n" + json.dumps(huge) + "\n" + json.dumps(conversation(1)) + "\n")
    assert data.stat().st_size > 50_000_000

    def run(name, *extra):
        cfg = load_config(sft.SFTConfig, None, [
            f"model={tiny_model_dir}", f"data.train={data}", "data.long_examples=truncate", "data.max_length=128",
            "train.epochs=1", "train.batch_size=3", f"output_dir={tmp_path / name}", *extra])
        return json.loads((sft.run(cfg) / "manifest.json").read_text())["counts"]

    counts = run("cut", "data.max_record_chars=null")
    assert (counts["conversations"], counts["examples"], counts["over_length"]) == (3, 3, 1)
    assert counts["tokens"] == 128 + sum(
        len(tokenise_conversation(tiny_tokenizer, conversation(i)["messages"]).input_ids) for i in (0, 1))
    counts = run("skipped")
    assert (counts["conversations"], counts["examples"], counts["dropped_over_max_record_chars"]) == (2, 2, 1)
    chars = len(huge["messages"][0]["content"]) + len(huge["messages"][1]["content"])
    assert counts["dropped_lines"] == [f"{data}:2: {chars:,} characters, over data.max_record_chars=1,000,000"]


# ------------------------------------------------------------------------------ 5. counts that add up


def test_prepare_conversations_duplicate_ids_and_content(tmp_path, monkeypatch, capsys):
    """conversations input: the same messages twice (other id) is a counted drop; one id on two different
    conversations is an error naming both lines."""
    from alignline.config import load_config
    from alignline.stages import prepare

    data = tmp_path / "convs.jsonl"
    copy = {**conversation(0), "id": "copy-of-c0"}
    data.write_text("".join(json.dumps(c) + "\n" for c in (conversation(0), conversation(1), copy, conversation(2))))
    cfg = load_config(prepare.PrepareConfig, None, [
        "source=conversations", f"path={data}", "tokenizer=null", f"output_dir={tmp_path / 'p'}",
        "splits={all: {fraction: 1.0, kind: conversations}}"])
    counts = json.loads((prepare.run(cfg) / "manifest.json").read_text())["counts"]
    assert (counts["kept"], counts["duplicate_content"], counts["split:all"]) == (3, 1, 3)
    clash = {**conversation(5), "id": "c1"}
    data.write_text("".join(json.dumps(c) + "\n" for c in (conversation(0), conversation(1), conversation(2), clash)))
    code, err = cli(monkeypatch, capsys, "prepare", "source=conversations", f"path={data}", "tokenizer=null",
                    f"output_dir={tmp_path / 'p2'}")
    flat = " ".join(err.split())
    assert code == 2 and f"{data}:4, field 'id'" in flat and "'c1'" in flat and "on line 2" in flat, err


def test_pairs_with_an_empty_response_are_counted_drops(tmp_path, tiny_tokenizer):
    """dpo / rm (load_pairs_for): a pair whose rejected is blank is dropped with its line in dropped_lines and
    counts towards data.max_drop_fraction (1 of 5 = 20 %: kept under 0.25, an error under 0.1)."""
    from alignline.errors import DataError
    from alignline.train.preference import PairData, load_pairs_for

    data = tmp_path / "pairs.jsonl"
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": f"good {i}",
              "rejected": "  " if i == 3 else f"bad {i}"} for i in range(5)]
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    counts: Counter = Counter()
    kept, _ = load_pairs_for(PairData(train=str(data), max_drop_fraction=0.25), tiny_tokenizer, counts)
    assert [e.id for e in kept] == ["p0", "p1", "p2", "p4"]
    assert (counts["pairs_in"], counts["pairs_kept"], counts["dropped_empty_response"]) == (5, 4, 1)
    assert counts["dropped_lines"] == [f"{data}:4: empty rejected response"]
    with pytest.raises(DataError, match="1 of 5 pairs"):
        load_pairs_for(PairData(train=str(data), max_drop_fraction=0.1), tiny_tokenizer, Counter())
