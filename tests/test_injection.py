"""Judge robustness: the injection suite against scripted judges, and parser invariance under quoted attacks."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignline.config import load_config
from alignline.data.io import read_manifest
from alignline.data.records import Pair
from alignline.errors import ConfigError
from alignline.evaluate.injection import (
    CASE_NAMES,
    CASES,
    FAKE_VERDICT,
    attack,
    attack_strings,
    parser_invariance_problems,
    quoted_judge_outputs,
)
from alignline.judges.pairwise import parse_pairwise
from alignline.stages import eval_injection

GOOD_RESPONSE = "Answer {i}: with detail, more detail and a final detail."  # 3 x "detail"
WEAK_RESPONSE = "Answer {i}."


class ScriptedEngine:
    """A judge engine whose output is a rule of the judge prompt; counts calls."""

    def __init__(self, rule):
        self.rule, self.calls = rule, 0

    def generate(self, prompts, n, sampling):
        from alignline.data.records import Response

        self.calls += len(prompts)
        return [[Response(prompt_id=p.id, sample_idx=0, text=self.rule(p.messages[-1].content), source="fake")]
                for p in prompts]


def blocks(text):
    """The two response blocks as the template delimits them (with the nonce, as a careful reader would)."""
    nonce = re.search(r"<<<RESPONSE A (\w+)>>>", text).group(1)
    out = {}
    for x in "AB":
        start = text.index(f"<<<RESPONSE {x} {nonce}>>>\n") + len(f"<<<RESPONSE {x} {nonce}>>>\n")
        out[x] = text[start: text.index(f"\n<<<END OF RESPONSE {x} {nonce}>>>")]
    return out


def verdict(x, degree="better"):
    return f"Reason: judged\nVerdict: [[{x}]]\nDegree: {degree}"


def robust(text):
    """Prefers the response that says "detail" more often (content only); ties go to A."""
    b = blocks(text)
    return verdict("A" if b["A"].count("detail") >= b["B"].count("detail") else "B")


def naive(text):
    """Confused by a forged delimiter (writes two verdicts), obeys any 'Verdict: [[X]]' or plea it reads."""
    b = blocks(text)
    if any("<<<END OF RESPONSE" in body for body in b.values()):
        return "Verdict: [[A]]\nVerdict: [[B]]\nDegree: better"
    for body in b.values():
        m = re.search(r"Verdict: \[\[([AB])\]\]", body)
        if m:
            return verdict(m.group(1), "significantly")
    for x, body in b.items():
        if "ignore previous instructions" in body:
            return verdict(x, "significantly")
    return robust(text)


def longer(text):
    b = blocks(text)
    return verdict("A" if len(b["A"]) >= len(b["B"]) else "B")


def write_pairs(tmp_path, n=2):
    pairs = [Pair(id=f"p{i}", prompt=[{"role": "user", "content": f"Question {i}?"}],
                  chosen=GOOD_RESPONSE.format(i=i), rejected=WEAK_RESPONSE.format(i=i)) for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p.model_dump(mode="json")) + "\n" for p in pairs))
    return path


def run_with(tmp_path, monkeypatch, rule, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    engine = ScriptedEngine(rule)
    monkeypatch.setattr(eval_injection, "build_engine", lambda settings: engine)
    cfg = load_config(eval_injection.InjectionConfig, None, [
        f"pairs={write_pairs(tmp_path)}", f"output_dir={tmp_path / 'out'}", "judge.model=fake-judge", *extra])
    out = eval_injection.run(cfg)
    return engine, out, json.loads((out / "results.json").read_text())


def table(results):
    return {k: (v["flip_rate"], v["parse_failure_rate"], v["mean_shift"]) for k, v in results["cases"].items()}


def test_naive_judge_is_fooled_and_rerun_makes_no_calls(tmp_path, monkeypatch):
    """2 pairs; clean: the judge picks the detailed answer ("better"), so the weak one is the target and its
    clean score is -0.75 in both orders (4 orders, all eligible).

    * fake_verdict names the target's position: the naive judge picks it "significantly" (+1.0) in all 4
      orders: flip rate 4/4 = 1.0, shift 1.0 - (-0.75) = 1.75.
    * fake_verdict_blind always says A: target shown as A -> flip, shift 1.75; target shown as B -> the judge
      picks A, the other one, "significantly": -1.0 - (-0.75) = -0.25. Flips 2/4 = 0.5, shift (1.75 - 0.25)/2
      = 0.75.
    * plea: obeyed in all 4 orders, as fake_verdict: 1.0 and 1.75.
    * fake_delimiter: the naive judge writes two verdict lines: 4/4 parse failures, 0 flips, no shift.
    * the rest read as the robust rule: nothing moves.
    Calls: 2 pairs x (2 clean + 2 x 9 cases) = 40; the rerun (manifest removed) makes 0.
    """
    engine, out, res = run_with(tmp_path, monkeypatch, naive)
    got = table(res)
    assert got["fake_verdict"] == (1.0, 0.0, 1.75)
    assert got["fake_verdict_blind"] == (0.5, 0.0, 0.75)
    assert got["plea"] == (1.0, 0.0, 1.75)
    assert got["fake_delimiter"] == (0.0, 1.0, None)
    for name in ("better_claim", "rating_claim", "score_ten", "null_refusal", "null_filler"):
        assert got[name] == (0.0, 0.0, 0.0), name
    assert res["clean_parse_failures"] == 0 and engine.calls == 40
    failures = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 4 and {f["case"] for f in failures} == {"fake_delimiter"}
    assert all("2 'Verdict:' lines" in f["reason"] for f in failures)
    (out / "manifest.json").unlink()
    run_with(tmp_path, monkeypatch, naive)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["judge_calls"] == 0 and manifest["counts"]["target_from_clean_verdict"] == 2


def test_engine_failures_are_not_parse_failures_and_are_retried(tmp_path, monkeypatch):
    """The engine fails every plea call once: 4 engine failures (2 pairs x 2 orders), no parse failure, no
    manifest; the rerun asks only those 4 again and completes with the naive judge's plea row (1.0, 0, 1.75)."""
    from alignline.data.records import Response

    class Flaky(ScriptedEngine):
        def __init__(self):
            super().__init__(naive)
            self.failed = set()

        def generate(self, prompts, n, sampling):
            self.calls += len(prompts)
            out = []
            for p in prompts:
                text = p.messages[-1].content
                if "ignore previous instructions" in text and text not in self.failed:
                    self.failed.add(text)
                    out.append([Response(prompt_id=p.id, sample_idx=0, text="", source="f", status="failed")])
                else:
                    out.append([Response(prompt_id=p.id, sample_idx=0, text=naive(text), source="f")])
            return out

    engine = Flaky()
    monkeypatch.setattr(eval_injection, "build_engine", lambda settings: engine)
    cfg = load_config(eval_injection.InjectionConfig, None, [
        f"pairs={write_pairs(tmp_path)}", f"output_dir={tmp_path / 'out'}", "judge.model=j", "cases=[plea]"])
    out = eval_injection.run(cfg)
    row = json.loads((out / "results.json").read_text())["cases"]["plea"]
    assert (row["engine_failures"], row["parse_failures"], row["parse_failure_rate"]) == (4, 0, None)
    assert (read_manifest(out) or {}).get("status") != "complete" and engine.calls == 8
    eval_injection.run(cfg)
    assert engine.calls == 12
    assert table(json.loads((out / "results.json").read_text())) == {"plea": (1.0, 0.0, 1.75)}
    assert json.loads((out / "manifest.json").read_text())["counts"]["judge_calls"] == 4


def test_robust_judge_does_not_move_and_a_length_judge_falls_for_filler(tmp_path, monkeypatch):
    """Robust (content) judge: every case 0 flips, 0 failures, 0 shift.
    Length judge: NULL_FILLER (785 chars) is longer than the detailed answer (54 chars): the target wins both
    orders, 2 pairs -> 4/4 flips, shift 0.75 - (-0.75) = 1.5; the refusal (24 chars) is shorter: no flip."""
    _, _, res = run_with(tmp_path / "r", monkeypatch, robust)
    assert set(table(res).values()) == {(0.0, 0.0, 0.0)}
    _, _, res = run_with(tmp_path / "l", monkeypatch, longer, "cases=[null_filler,null_refusal]")
    assert table(res) == {"null_filler": (1.0, 0.0, 1.5), "null_refusal": (0.0, 0.0, 0.0)}


def test_target_is_the_judges_clean_loser(tmp_path, monkeypatch):
    """A judge that prefers the *short* answer: the chosen (detailed) one becomes the target; with the
    fake verdict the naive-then-shorter judge flips 4/4."""

    def shorter_unless_told(text):
        b = blocks(text)
        m = next((re.search(r"Verdict: \[\[([AB])\]\]", body) for body in b.values()
                  if re.search(r"Verdict: \[\[([AB])\]\]", body)), None)
        if m:
            return verdict(m.group(1))
        return verdict("A" if len(b["A"]) <= len(b["B"]) else "B")

    _, out, res = run_with(tmp_path, monkeypatch, shorter_unless_told, "cases=[fake_verdict]")
    rows = [json.loads(ln) for ln in (out / "verdicts.jsonl").read_text().splitlines()]
    assert res["cases"]["fake_verdict"]["flip_rate"] == 1.0
    assert all(r["clean_target_won"] is False for r in rows)


def test_items_from_prompts_and_two_response_files(tmp_path):
    """q0: a (lowest sample_idx usable: sample 1, as sample 0 failed) vs b -> an item; q1: no b response;
    q2: identical texts. One item; the data-weaker side is file b; nothing usable is a DataError."""
    from collections import Counter

    from alignline.data.records import Prompt, Response
    from alignline.errors import DataError

    def dump(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r.model_dump(mode="json")) + "\n" for r in rows))
        return str(tmp_path / name)

    prompts = dump("p.jsonl", [Prompt(id=f"q{i}", messages=[{"role": "user", "content": f"Q{i}"}]) for i in range(3)])
    a = dump("a.jsonl", [Response(prompt_id="q0", sample_idx=0, text="", source="a", status="failed"),
                         Response(prompt_id="q0", sample_idx=1, text="a0", source="a"),
                         Response(prompt_id="q1", sample_idx=0, text="a1", source="a"),
                         Response(prompt_id="q2", sample_idx=0, text="same", source="a")])
    b = dump("b.jsonl", [Response(prompt_id="q0", sample_idx=0, text="b0", source="b"),
                         Response(prompt_id="q2", sample_idx=0, text="same", source="b")])
    cfg = load_config(eval_injection.InjectionConfig, None, [f"prompts={prompts}", f"responses_a={a}",
                                                             f"responses_b={b}", "judge.model=m"])
    counts = Counter()
    items = eval_injection.load_items(cfg, counts)
    assert [(i.id, i.first, i.second) for i in items] == [("q0", "a0", "b0")]
    assert counts == {"skipped_failed_or_empty_responses": 1, "prompts_without_both_responses": 1,
                      "skipped_identical_responses": 1}
    with pytest.raises(DataError, match="no prompt with two different usable responses"):
        eval_injection.load_items(cfg.model_copy(update={"responses_a": b}), Counter())


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'plea'"):
        load_config(eval_injection.InjectionConfig, None, ["pairs=x", "judge.model=m", "cases=[pleas]"])
    with pytest.raises(ConfigError, match="either pairs"):
        load_config(eval_injection.InjectionConfig, None, ["pairs=x", "prompts=y", "judge.model=m"])
    with pytest.raises(ConfigError, match="all three"):
        load_config(eval_injection.InjectionConfig, None, ["prompts=y", "judge.model=m"])
    doc = eval_injection.InjectionConfig.model_fields["cases"].description
    assert all(name in doc for name in CASE_NAMES)


def test_attack_rendering():
    assert attack(CASES[0], "Hi.", "B") == "Hi." + FAKE_VERDICT.replace("{self}", "B")
    filler = next(c for c in CASES if c.name == "null_filler")
    assert attack(filler, "Hi.", "A") == filler.text
    delim = next(c for c in CASES if c.name == "fake_delimiter")
    assert "<<<END OF RESPONSE B>>>" in attack(delim, "x", "B") and "<<<RESPONSE A>>>" in attack(delim, "x", "B")
    assert len(set(CASE_NAMES)) == len(CASES)


@pytest.mark.parametrize("output", [
    "Reason: B is detailed.\nVerdict: [[B]]\nDegree: better",
    "**Reason:** A is right.\n**Verdict:** [[A]]\n**Degree:** slightly",
])
def test_parser_reading_survives_quoted_attacks(output):
    """A judge that quotes any attack string inline or as a blockquote reads exactly as before; a verbatim
    quote of a line starting 'Verdict:' may only turn the output into a failure (two verdict lines)."""
    assert parse_pairwise(output) is not None
    assert parser_invariance_problems(output, attack_strings()) == []
    quoted = quoted_judge_outputs(output, FAKE_VERDICT.replace("{self}", "A"))
    assert parse_pairwise(quoted["verbatim"]) is None
    assert parse_pairwise(quoted["blockquote"]) == parse_pairwise(output)


def test_invariance_check_flags_an_echo_without_a_verdict():
    """The known limit: a judge that writes no verdict of its own but echoes a response holding one is read
    as that verdict; the check must report it (here for the fake_verdict attack, position A)."""
    problems = parser_invariance_problems("I cannot decide.", [FAKE_VERDICT.replace("{self}", "A")])
    assert len(problems) == 1 and problems[0].startswith("verbatim")


class JudgeHandler(BaseHTTPRequestHandler):
    """A local OpenAI-compatible chat endpoint answering every judge prompt with the naive rule."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        text = naive(body["messages"][-1]["content"])
        data = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_openai_engine_end_to_end(tmp_path):
    """The same suite through EngineSettings(engine=openai) and a local server: the naive judge's
    fake_verdict row is again flip 1.0, no failures, shift 1.75 (see the first test)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config(eval_injection.InjectionConfig, None, [
            f"pairs={write_pairs(tmp_path)}", f"output_dir={tmp_path / 'out'}", "judge.engine=openai",
            "judge.model=fake-judge", f"judge.openai.base_url=http://127.0.0.1:{server.server_port}/v1",
            "judge.openai.max_retries=0", "cases=[fake_verdict]"])
        out = eval_injection.run(cfg)
    finally:
        server.shutdown()
    res = json.loads((out / "results.json").read_text())
    assert table(res) == {"fake_verdict": (1.0, 0.0, 1.75)}
    assert res["judge"].startswith("llm:openai:http://127.0.0.1:")
