"""Issue 28, the inputs: a damaged model file, a server answering non-JSON, a reward function that raises, a
prompt too long for the context, judge calls that fail, a pair with identical texts.

Each test builds the bad input (a cut file, an HTML body, a raising function) and checks the clear error (what,
where, what to do), the exit code and the manifest.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tests.test_sample import args as sample_args
from tests.test_sample import write_prompts
from tests.test_sft_cli import alignline

# ------------------------------------------------------------------------------ 4. a damaged model file

def _cut(path, keep: int) -> int:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return len(data)


def test_cut_model_file_is_a_model_error_naming_file_size_and_problem(tmp_path, tiny_model_dir):
    """`alignline sample` on a model whose model.safetensors lost its last 1000 bytes: exit 2, the file, its size
    and how many bytes are missing, no traceback."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    full = _cut(weights, weights.stat().st_size - 1000)
    write_prompts(tmp_path / "prompts.jsonl", 2)
    res = alignline("sample", *sample_args(tmp_path, model, tmp_path / "out", 4))
    said = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{weights} ({full - 1000:,} bytes) is damaged: it is cut short: its tensors need {full:,} bytes, " \
           "1,000 more than it holds" in said


@pytest.mark.parametrize("damage", ["header", "tail", "padded", "tiny"])
def test_every_loader_names_a_damaged_weight_file(damage, tmp_path, tiny_model, tiny_tokenizer):
    """Causal LM, reward model and a LoRA adapter's own file: a ModelError naming the file before transformers,
    peft or safetensors open it."""
    from alignline.errors import ModelError
    from alignline.models import LoraSettings, apply_lora, load_causal_lm, load_reward_model, save_model

    plain = save_model(tiny_model, tiny_tokenizer, tmp_path / "plain")
    adapter = save_model(apply_lora(tiny_model, LoraSettings(r=2)), tiny_tokenizer, tmp_path / "adapter")
    for path, load in ((plain / "model.safetensors", load_causal_lm), (plain / "model.safetensors", load_reward_model),
                       (adapter / "adapter_model.safetensors", load_causal_lm)):
        good = path.read_bytes()
        expected = {"header": "announce a", "tail": "cut short: its tensors need", "tiny": "too small",
                    "padded": "bytes after its last tensor"}[damage]
        path.write_bytes({"header": good[:100], "tail": good[:-1], "tiny": good[:5], "padded": good + b"\0" * 7}[damage])
        with pytest.raises(ModelError, match=f"{path.name} .* bytes\\) is damaged: .*{expected}"):
            load(path.parent)
        path.write_bytes(good)


# ------------------------------------------------------------------------------ 5. a server answering non-JSON

class HtmlEverywhere(BaseHTTPRequestHandler):
    """HTTP 200 with a JSON content type and an HTML body, for every GET (counted)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.gets += 1
        body = b"<html><head><title>Sign in</title></head><body>proxy login</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_connection_check_names_url_and_body_of_a_non_json_200(tmp_path, monkeypatch, capsys):
    """`GET /models` answered 200 with HTML: retried (1 + max_retries), then exit 2 naming the URL and the body's
    first bytes; no AttributeError from the client's parser."""
    from tests.test_reliability import cli

    srv = ThreadingHTTPServer(("127.0.0.1", 0), HtmlEverywhere)
    srv.gets = 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/v1"
    write_prompts(tmp_path / "prompts.jsonl", 2)
    try:
        code, err = cli(monkeypatch, capsys, "sample", f"prompts={tmp_path / 'prompts.jsonl'}", "engine=openai",
                        "model=fake", f"openai.base_url={url}", "openai.max_retries=2", "openai.backoff_base_s=0",
                        f"output_dir={tmp_path / 'out'}")
    finally:
        srv.shutdown()
    said = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and "AttributeError" not in err, err
    assert f"the endpoint at {url} answered GET {url}/models with HTTP 200 and a body that is not JSON (72 bytes, " \
           "starting b'<html><head><title>Sign in</title>" in said
    assert srv.gets == 3
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------------------ 3. a reward function that raises

FAILING_REWARD = textwrap.dedent("""
    def score(prompt, texts):
        if prompt.id == {bad!r}:
            raise KeyError(prompt.id)
        return [float(len(t)) for t in texts]

    def fails_on_one_prompt(prompts, responses):
        return [score(p, ts) for p, ts in zip(prompts, responses)]
""")


def test_reward_function_that_raises_names_function_prompt_iteration_and_keeps_its_traceback(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    """rl with a `module:callable` reward that raises on one prompt of iteration 1 (iteration 0 does not draw it):
    exit 2, the error names the function, the prompt and the iteration with the user's traceback lines (file, line,
    code) below, the manifest says failed; after the fix the same command finishes, reusing iteration 0's rollout."""
    from tests.test_reliability import cli
    from tests.test_rl import write_prompts as write_rl_prompts

    from alignline.stages.rl import RLConfig
    from alignline.stages.rl.rollout import draw_prompts

    seed = RLConfig.model_validate({"model": "m", "prompts": "p"}).train.seed
    first, second = (set(draw_prompts(8, 4, seed, it)) for it in (0, 1))
    bad = f"p{min(second - first)}"
    module = tmp_path / "round3_rewards.py"
    module.write_text(FAILING_REWARD.format(bad=bad))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "rl"
    argv = ["rl", f"model={tiny_model_dir}", f"prompts={write_rl_prompts(tmp_path / 'prompts.jsonl')}",
            f"output_dir={out}", "iterations=2", "rollout.prompts=4", "rollout.group_size=2",
            "rollout.sampling.max_new_tokens=4", "train.batch_size=8", "train.grad_accum=1",
            'reward=[{type: function, function: "round3_rewards:fails_on_one_prompt"}]']
    code, err = cli(monkeypatch, capsys, *argv)
    said = " ".join(err.split())
    assert code == 2, err
    assert f"reward function round3_rewards:fails_on_one_prompt raised KeyError: '{bad}' on prompt '{bad}' in rl " \
           "iteration 1" in said
    assert f'File "{module}", line 4, in score raise KeyError(prompt.id) KeyError: \'{bad}\'' in said
    assert "alignline/stages" not in err and "alignline/rewards.py" not in err  # the user's frames only
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "round3_rewards:fails_on_one_prompt" in manifest["error"]
    first_rollout = (out / "rollouts" / "iter-00000.jsonl").read_bytes()
    assert not (out / "rollouts" / "iter-00001.jsonl").exists()

    module.write_text(FAILING_REWARD.format(bad="none"))
    sys.modules.pop("round3_rewards", None)
    code, err = cli(monkeypatch, capsys, *argv)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert (out / "rollouts" / "iter-00000.jsonl").read_bytes() == first_rollout


# ------------------------------------------------------------------------------ 6. the small ones

def test_eval_winrate_whose_judge_calls_all_fail_ends_failed(tmp_path, monkeypatch, capsys):
    """Every judge call answered 200 with HTML (retried, then failed): 2 of 2 prompts without an outcome is more
    than max_failure_fraction=0.5, so exit 2 and a failed manifest, with results.json written; at 1.0 the same
    outputs are accepted (the setting is not part of the fingerprint: the rerun reuses the run)."""
    from tests.test_reliability import FakeOpenAI, cli
    from tests.test_reliability import write_prompts as write_q_prompts

    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    srv.mode, srv.seen = "nonjson", []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    prompts = write_q_prompts(tmp_path / "prompts.jsonl")
    for name in ("model", "reference"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"prompt_id": f"q{i}", "sample_idx": 0, "text": f"{name} answer {i}", "source": name}) + "\n"
            for i in range(2)))
    argv = ["eval", "winrate", f"prompts={prompts}", f"model.responses={tmp_path / 'model.jsonl'}", "model.name=m",
            f"reference.responses={tmp_path / 'reference.jsonl'}", "reference.name=r", "judge.engine=openai",
            "judge.model=fake", f"judge.openai.base_url=http://127.0.0.1:{srv.server_port}/v1",
            "judge.openai.max_retries=0", "judge.openai.backoff_base_s=0", f"output_dir={tmp_path / 'winrate'}"]
    try:
        code, err = cli(monkeypatch, capsys, *argv)
        assert code == 2, err
        assert "eval winrate: 2 of 2 judged prompts failed (100%), more than max_failure_fraction=0.5" in " ".join(err.split())
        manifest = json.loads((tmp_path / "winrate" / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "TooManyFailuresError" in manifest["error"]
        assert json.loads((tmp_path / "winrate" / "results.json").read_text())["judge_failures"] == 2
        code, err = cli(monkeypatch, capsys, *argv, "max_failure_fraction=1.0")
        assert code == 0, err
    finally:
        srv.shutdown()


def test_prompt_longer_than_the_context_is_named_by_id_and_file_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The tiny model's context is 1024 tokens; the byte-level prompt on line 3 has over 1100: the error names the
    file, line 3 and the prompt's id, not its index in a batch."""
    from tests.test_reliability import cli

    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": "x" * (1100 if i == 2 else 5)}]} for i in range(4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = cli(monkeypatch, capsys, "sample", *sample_args(tmp_path, tiny_model_dir, tmp_path / "out", 4))
    said = " ".join(err.split())
    assert code == 2, err
    assert f"{tmp_path / 'prompts.jsonl'}:3, field 'messages': prompt 'p2' has " in said
    assert "which fills the model's context of 1024 tokens" in said


def test_identical_pair_is_dropped_with_its_file_and_line(tmp_path, tiny_tokenizer):
    """Line 2 of the pairs file has chosen == rejected (after stripping): dropped when read, counted as
    dropped_identical_text and listed as file:2 in dropped_lines."""
    from collections import Counter

    from alignline.train.preference import PairData, load_pairs_for

    rows = [{"id": f"x{i}", "prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    rows[1]["rejected"] = "good 1 "
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = Counter()
    train, _ = load_pairs_for(PairData(train=str(path), max_length=128, max_drop_fraction=0.5), tiny_tokenizer, counts)
    assert [p.id for p in train] == ["x0", "x2", "x3"]
    assert counts["dropped_identical_text"] == 1
    assert counts["dropped_lines"] == [f"{path}:2: chosen and rejected are the same text"]


def test_annotate_whose_judge_never_parses_ends_failed(tmp_path, monkeypatch):
    """A judge whose 6 outputs all fail to parse: 6 of 6 prompts without a verdict > max_failure_fraction 0.5, so
    the run raises TooManyFailuresError and its manifest says failed; failures.jsonl lists all 6."""
    from tests.test_annotate import llm_cfg, setup_llm

    from alignline.errors import TooManyFailuresError
    from alignline.stages import annotate
    from alignline.stages.common import failures_recorded

    setup_llm(tmp_path, monkeypatch, lambda text: "I refuse.")
    with pytest.raises(TooManyFailuresError, match=r"annotate: 6 of 6 judged prompts failed \(100%\), more than "
                                                   "max_failure_fraction=0.5"), failures_recorded():
        annotate.run(llm_cfg(tmp_path))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "failed"
    assert len((tmp_path / "out" / "failures.jsonl").read_text().splitlines()) == 6


def test_rl_prompt_over_max_prompt_tokens_is_dropped_with_its_file_and_line(tmp_path, tiny_model_dir, tiny_tokenizer):
    """rl drops a prompt longer than max_prompt_tokens (counted, as before) and now lists it as file:line with its id
    and length in dropped_lines."""
    from collections import Counter

    from tests.test_rl import config

    from alignline.stages.rl.stage import load_prompts

    cfg = config(tmp_path, tiny_model_dir, max_prompt_tokens=60, reward="[{type: function, function: 'm:f'}]")
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    rows[5]["messages"][0]["content"] = "word " * 40
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = Counter()
    kept, _ = load_prompts(cfg, tiny_tokenizer, counts)
    assert len(kept) == 7 and counts["dropped_prompt_too_long"] == 1
    [line] = counts["dropped_lines"]
    assert line.startswith(f"{tmp_path / 'prompts.jsonl'}:6: prompt 'p5' has ") and "more than max_prompt_tokens" in line
