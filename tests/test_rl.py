"""alignline rl: prefix-shared group log-probs, a tiny end-to-end run whose reward rises, exact resume, PPO's
value loss, KL to the reference, and bad input (errors before any training)."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from alignline.config import load_config
from alignline.errors import AlignlineError, ConfigError, DataError
from alignline.stages import rl
from alignline.stages.rl import rollout as ro
from alignline.train.groups import collate_groups, group_token_logps, group_token_values
from alignline.train.pairs import token_logps

PROMPT_A = [5, 6, 7, 8, 9]
PROMPT_B = [20, 21, 22]
RESPONSES_A = [[30, 31, 32, 2], [40], [50, 51, 2], [30, 31, 33, 34, 35, 2]]
RESPONSES_B = [[60, 61], [62, 63, 64, 2]]


def naive_logps(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    P = len(prompt)
    return torch.stack([lp[P - 1 + j, t] for j, t in enumerate(response)])


def test_prefix_shared_group_logps_equal_per_row(tiny_model):
    items = [{"prompt": PROMPT_A, "responses": RESPONSES_A}, {"prompt": PROMPT_B, "responses": RESPONSES_B}]
    tiny_model.eval()
    shared = group_token_logps(tiny_model, collate_groups(items, 0, "shared"))[0]
    separate = group_token_logps(tiny_model, collate_groups(items, 0, "separate"))[0]
    naive = torch.cat([naive_logps(tiny_model, it["prompt"], r) for it in items for r in it["responses"]])
    assert shared.shape == naive.shape == (sum(len(r) for it in items for r in it["responses"]),)
    assert torch.allclose(shared, naive, atol=1e-5) and torch.allclose(separate, naive, atol=1e-5)


def test_prefix_shared_gradients_and_entropy(tiny_model):
    items = [{"prompt": PROMPT_A, "responses": RESPONSES_A}]
    grads, ents = [], []
    for layout in ("shared", "separate"):
        tiny_model.zero_grad()
        lp, ent = group_token_logps(tiny_model, collate_groups(items, 0, layout), entropy=True)
        lp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
        ents.append(ent)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert torch.allclose(ents[0], ents[1], atol=1e-5) and bool((ents[0] > 0).all())


def test_group_values_equal_per_row(tiny_model_dir):
    from alignline.models import load_reward_model

    critic = load_reward_model(tiny_model_dir, dtype="float32").eval()
    items = [{"prompt": PROMPT_A, "responses": RESPONSES_A}, {"prompt": PROMPT_B, "responses": RESPONSES_B}]
    a = group_token_values(critic, collate_groups(items, 0, "shared"))
    b = group_token_values(critic, collate_groups(items, 0, "separate"))
    assert torch.allclose(a, b, atol=1e-5)


def test_token_logps_match_collate_src(tiny_model):
    """token_logps reads log softmax(logits[src])[tgt]. Hand values: row 0 = [0, 0, 0] gives ln(1/3) for every
    token; row 1 = [ln 1, ln 2, ln 5] gives probabilities 1/8, 2/8, 5/8. src [0, 1, 1], tgt [2, 2, 0] ->
    [ln 1/3, ln 5/8, ln 1/8]. The gradient of their sum is onehot(tgt) - softmax per target: row 0
    [-1/3, -1/3, 2/3]; row 1 (targets 2 and 0) [1 - 2/8, -2 * 2/8, 1 - 2 * 5/8] = [0.75, -0.5, -0.25]."""
    # the flat order of targets is response-major: tokens of response 0, then 1, ...
    b = collate_groups([{"prompt": PROMPT_B, "responses": RESPONSES_B}], 0)
    assert b["seq"].tolist() == [0, 0, 1, 1, 1, 1] and b["tgt"].tolist() == [60, 61, 62, 63, 64, 2]
    rows = [[0.0, 0.0, 0.0], [0.0, math.log(2), math.log(5)]]
    src, tgt = torch.tensor([0, 1, 1]), torch.tensor([2, 2, 0])
    want = torch.tensor([math.log(1 / 3), math.log(5 / 8), math.log(1 / 8)], dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(token_logps(torch.tensor(rows, dtype=torch.float64), src, tgt), want, atol=1e-12)
    logits = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    got = token_logps(logits, src, tgt)  # the memory-saving autograd path
    assert torch.allclose(got.detach(), want, atol=1e-12)
    got.sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[-1 / 3, -1 / 3, 2 / 3], [0.75, -0.5, -0.25]],
                                                    dtype=torch.float64), atol=1e-12)


# --------------------------------------------------------------------------------------------- stage runs

TOY = textwrap.dedent("""
    def count_e(prompts, responses):
        return [[float(t.count("e")) for t in ts] for ts in responses]

    def length(prompts, responses):
        return [[float(len(t)) for t in ts] for ts in responses]

    def nan_reward(prompts, responses):
        return [[float("nan")] * len(ts) for ts in responses]
""")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "rl_toy_rewards.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rl_toy_rewards"
    sys.modules.pop("rl_toy_rewards", None)


def write_prompts(path, n=8, instructions=True):
    with open(path, "w") as f:
        for i in range(n):
            meta = {"instructions": [{"id": "no_commas", "kwargs": {}, "text": "No commas."}]} if instructions else {}
            f.write(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"say something {i}"}],
                                "meta": meta}) + "\n")
    return path


def config(tmp_path, model_dir, out="out", **over):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    base = [f"model={model_dir}", f"prompts={prompts}", f"output_dir={tmp_path / out}", "iterations=3",
            "rollout.prompts=4", "rollout.group_size=4", "rollout.sampling.max_new_tokens=8",
            "train.batch_size=8", "train.grad_accum=2", "train.lr=3e-3"]
    return load_config(rl.RLConfig, None, base + [f"{k}={v}" for k, v in over.items()])


def iterations(out):
    return [json.loads(ln) for ln in (out / "iterations.jsonl").read_text().splitlines()]


def test_toy_reward_rises(tmp_path, tiny_model_dir, toy):
    """A tiny random model rewarded for the count of 'e' in its response learns to write more of them."""
    cfg = config(tmp_path, tiny_model_dir, iterations=8, reward=f'[{{type: function, function: "{toy}:count_e"}}]',
                 **{"rollout.prompts": 8, "train.batch_size": 16, "rollout.sampling.max_new_tokens": 16,
                    "train.lr": 1e-2})
    out = rl.run(cfg)
    rows = iterations(out)
    assert len(rows) == 8
    first, last = sum(r["reward_mean"] for r in rows[:3]) / 3, sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.3, [r["reward_mean"] for r in rows]
    for r in rows:
        assert 0 <= r["zero_variance_groups"] <= 8 and r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0
        assert r["pass_rate_n"] == 32 and "clip_fraction" in r and "entropy" in r and "kl" not in r
    assert (out / "model" / "config.json").exists() and (out / "rl_curves.png").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_resume_is_exact(tmp_path, tiny_model_dir, toy):
    """Killed after step 3 (of 4, 2 steps per iteration with loss.epochs=2) and rerun: the same rollouts and
    the same weights as an uninterrupted run."""
    reward = f'[{{type: function, function: "{toy}:count_e"}}]'
    over = {"iterations": 2, "loss.epochs": 2, "reward": reward, "train.save_every": 1}
    whole = rl.run(config(tmp_path, tiny_model_dir, "whole", **over))
    rl.run(config(tmp_path, tiny_model_dir, "cut", **over, **{"train.stop_after_step": 3}))
    assert not (tmp_path / "cut" / "model").exists()
    cut = rl.run(config(tmp_path, tiny_model_dir, "cut", **over))
    for it in range(2):
        name = f"rollouts/iter-{it:05d}.jsonl"
        assert (whole / name).read_text() == (cut / name).read_text()
    a, b = load_file(str(whole / "model" / "model.safetensors")), load_file(str(cut / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = iterations(cut)
    assert [r["iteration"] for r in rows] == [0, 1]


def test_sampling_logps_from_the_engine_equal_the_policy_pass(tmp_path, tiny_model_dir, toy):
    """Two optimizer steps per rollout need the sampling policy's log-probs: taken from the decode steps
    (default) they equal those of the no-grad pass (rollout.engine_logprobs=false) within 1e-5, token for
    token, on the same responses."""
    over = {"iterations": 1, "loss.epochs": 2, "reward": f'[{{type: function, function: "{toy}:count_e"}}]'}
    runs = {flag: rl.run(config(tmp_path, tiny_model_dir, f"engine-{flag}", **over,
                                **{"rollout.engine_logprobs": flag}))
            for flag in ("true", "false")}
    a, b = (ro.read_rollout(runs[flag], 0) for flag in ("true", "false"))
    assert (a.stats["old_logps_from"], b.stats["old_logps_from"]) == ("engine", "pass")
    for x, y in zip(a.records, b.records, strict=True):
        assert x.response == y.response and len(x.old_logps) == len(x.response)
        torch.testing.assert_close(torch.tensor(x.old_logps), torch.tensor(y.old_logps), atol=1e-5, rtol=0)


def test_ppo_value_loss_decreases_on_fixed_rollout(tmp_path, tiny_model_dir, toy):
    """One rollout, four optimisation passes over it (4 steps): the critic's clipped value loss falls."""
    cfg = config(tmp_path, tiny_model_dir, iterations=1, reward=f'[{{type: function, function: "{toy}:count_e"}}]',
                 **{"loss.estimator": "gae", "loss.epochs": 4, "ppo.vf_coef": 1.0, "ppo.value_clip": 100.0,
                    "train.lr": 1e-3})
    out = rl.run(cfg)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    vl = [s["value_loss"] for s in steps if "value_loss" in s]
    assert len(vl) == 4 and vl[-1] < vl[0], vl
    assert (out / "critic" / "config.json").exists()
    from huggingface_hub import ModelCard

    policy, critic = ModelCard.load(out / "model" / "README.md"), ModelCard.load(out / "critic" / "README.md")
    assert policy.data.tags == ["ppo", "rl", "alignline"] and policy.data.pipeline_tag == "text-generation"
    assert critic.data.pipeline_tag == "text-classification" and "value-model" in critic.data.tags
    rec = json.loads((out / "rollouts" / "iter-00000.jsonl").read_text().splitlines()[0])
    assert len(rec["old_values"]) == len(rec["returns"]) == len(rec["advantages"]) == len(rec["response"])


def test_kl_to_reference_starts_at_zero(tmp_path, tiny_model_dir, toy):
    cfg = config(tmp_path, tiny_model_dir, iterations=2, reward=f'[{{type: function, function: "{toy}:length"}}]',
                 **{"kl.coef": 0.1, "kl.estimator": "k3"})
    out = rl.run(cfg)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"kl"' in ln]
    assert abs(steps[0]["kl"]) < 1e-6 and steps[-1]["kl"] > 0  # the policy is the reference until its first step
    rec = json.loads((out / "rollouts" / "iter-00001.jsonl").read_text().splitlines()[0])
    assert len(rec["ref_logps"]) == len(rec["response"])


def test_guard_stats_count_the_short_answers_and_the_reward_withheld():
    """min_words 3: "<<the end>>" (2 words, passed by the verifier) and "ok" (1 word, failed) are under the
    floor: 2 short, 1 of them passed; "three plain words" (3) is not short. No floor: nothing reported; the
    config's floor is the largest min_words of its verifier terms (an rm term's is not counted)."""
    from alignline.stages.rl.rollout import RolloutRecord, guard_stats

    def rec(text, passed):
        return RolloutRecord(iteration=0, prompt_id="p", sample_idx=0, prompt=[1], response=[2], text=text,
                             finish_reason="stop", score=0.0, parts={}, passed=passed)

    records = [rec("<<the end>>", True), rec("ok", False), rec("three plain words", True)]
    assert guard_stats(records, 3) == {"under_min_words": 2, "under_min_words_passed": 1}
    assert guard_stats(records, 0) == {}
    cfg = rl.RLConfig(model="m", prompts="p.jsonl", reward=[{"type": "verifier", "min_words": 12},
                                                            {"type": "verifier", "mode": "loose", "min_words": 5}])
    assert cfg.min_words_guard == 12
    assert rl.RLConfig(model="m", prompts="p.jsonl").min_words_guard == 0


def test_verifier_reward_is_the_share_of_instructions_followed(tmp_path, tiny_model_dir):
    """reward=verifier, every prompt with the one instruction no_commas: a response's score is 1.0 without a comma
    in its text and 0.0 with one; with no KL in the reward and no length penalty its reward is its score, the
    iteration's reward_mean their mean and pass_rate the share of responses that passed."""
    out = rl.run(config(tmp_path, tiny_model_dir, iterations=1, reward="verifier"))
    records = [json.loads(ln) for ln in (out / "rollouts" / "iter-00000.jsonl").read_text().splitlines()]
    expected = [0.0 if "," in r["text"] else 1.0 for r in records]
    assert 0 < sum(expected) < len(expected)  # both kinds drawn (seeded), so a constant reward would fail
    assert [r["score"] for r in records] == expected and [r["reward"] for r in records] == expected
    assert [r["passed"] for r in records] == [e == 1.0 for e in expected]
    row = iterations(out)[0]
    assert row["reward_mean"] == pytest.approx(sum(expected) / len(expected))
    assert row["pass_rate"] == pytest.approx(sum(expected) / len(expected))


def test_verifier_reward_min_words_zeroes_near_empty_answers():
    """A prompt with two instructions (no commas, all lowercase). "<<the end>>" follows both (langdetect: en):
    1.0 without a floor, 0 under min_words=3 (2 words); "three plain words" follows both and has 3 words: 1.0
    either way; "Three, words here" breaks both: 0."""
    from alignline.data.records import Prompt
    from alignline.rewards import verifier_reward

    prompt = Prompt(id="p", messages=[{"role": "user", "content": "Hi"}],
                    meta={"instructions": [{"id": "no_commas", "kwargs": {}}, {"id": "all_lowercase", "kwargs": {}}]})
    texts = ["<<the end>>", "three plain words", "Three, words here"]
    assert verifier_reward("strict")([prompt], [texts]) == [[1.0, 1.0, 0.0]]
    assert verifier_reward("strict", min_words=3)([prompt], [texts]) == [[0.0, 1.0, 0.0]]


def test_paired_change_reports_answer_lengths(tmp_path):
    """Start: 2 instructions [1, 0], answer "a b c d" (4 words); end: [1, 1], answer "a b" (2 words).
    Differences [0, 1]: mean 0.5, sd sqrt(0.5) = 0.7071, paired SE 0.7071 / sqrt(2) = 0.5."""
    from alignline.stages.rl.evaluation import paired_change

    (tmp_path / "eval_start.jsonl").write_text(json.dumps({"prompt_id": "p", "strict": [True, False],
                                                           "loose": [True, False], "text": "a b c d"}) + "\n")
    (tmp_path / "eval_last.jsonl").write_text(json.dumps({"prompt_id": "p", "strict": [True, True],
                                                          "loose": [True, True], "text": "a b"}) + "\n")
    change = paired_change(tmp_path)
    assert change["change"] == pytest.approx(0.5) and change["paired_se"] == pytest.approx(0.5)
    assert (change["start_words"], change["end_words"]) == (4.0, 2.0)


# ------------------------------------------------------------------------------------------- bad input

def no_training(out):
    """No optimizer step was taken: no checkpoint, no step in the metrics log."""
    metrics = out / "metrics.jsonl"
    assert not (out / "checkpoints").exists()
    assert not metrics.exists() or '"loss"' not in metrics.read_text()


def test_verifier_without_instructions(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir)
    write_prompts(tmp_path / "bare.jsonl", instructions=False)
    cfg = cfg.model_copy(update={"prompts": str(tmp_path / "bare.jsonl")})
    with pytest.raises(DataError, match=r"reward\[0\]\.type=verifier.*no verifiable instructions"):
        rl.run(cfg)
    no_training(tmp_path / "out")


def test_missing_reward_model(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, reward="[{type: rm, model: /nonexistent/rm}]")
    with pytest.raises(ConfigError, match=r"reward\[0\]\.model.*does not exist"):
        rl.run(cfg)
    no_training(tmp_path / "out")


def test_group_of_one_with_group_estimator(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="rollout.group_size must be >= 2"):
        config(tmp_path, tiny_model_dir, **{"rollout.group_size": 1})
    config(tmp_path, tiny_model_dir, **{"rollout.group_size": 1, "rollout.prompts": 16,
                                        "loss.estimator": "gae"})  # PPO needs no group


def test_nan_reward(tmp_path, tiny_model_dir, toy):
    cfg = config(tmp_path, tiny_model_dir, reward=f'[{{type: function, function: "{toy}:nan_reward"}}]')
    with pytest.raises(DataError, match="reward 'nan_reward' returned nan"):
        rl.run(cfg)
    no_training(tmp_path / "out")


def test_unreachable_server(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, engine="openai", iterations=1,
                 openai='{base_url: "http://127.0.0.1:9/v1", timeout_s: 2, max_retries: 0}')
    with pytest.raises(AlignlineError, match="127.0.0.1:9"):
        rl.run(cfg)
    no_training(tmp_path / "out")


def test_openai_needs_weight_sync(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="openai.weights_url"):
        config(tmp_path, tiny_model_dir, engine="openai", openai='{base_url: "http://127.0.0.1:9/v1"}')


def test_policy_server_key_never_reaches_a_dump(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, engine="openai", iterations=1,
                 openai='{base_url: "http://user:pw@127.0.0.1:9/v1", api_key: sk-planted-rl-key}')
    dumped = json.dumps(cfg.model_dump(mode="json"))
    assert "sk-planted-rl-key" not in dumped and "user:pw" not in dumped
    assert cfg.openai.resolved_api_key() == "sk-planted-rl-key"  # the engine still gets it


def test_steps_must_divide_rollout(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="multiple of train.batch_size x train.grad_accum"):
        config(tmp_path, tiny_model_dir, **{"train.batch_size": 5})


def test_reward_term_without_its_setting_is_a_config_error(tmp_path, tiny_model_dir):
    """Checked with the config, so `alignline run --dry-run` reports it before anything runs."""
    for reward, missing in (("[{type: rm}]", "model"), ("[verifier, {type: judge}]", "judge"),
                            ("[{type: function}]", "function")):
        with pytest.raises(ConfigError, match=rf"reward\.\d.*needs {missing}"):
            config(tmp_path, tiny_model_dir, reward=reward)


def test_groups_of_one_have_no_zero_variance_count():
    from alignline.stages.rl.rollout import group_stats

    one = group_stats(torch.tensor([[1.0], [1.0]]), [True, None], [3, 4], ["stop", "length"])
    assert one["zero_variance_groups"] is None and one["zero_variance_share"] is None and one["pass_rate_n"] == 1
    two = group_stats(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), [None] * 4, [1] * 4, ["stop"] * 4)
    assert two["zero_variance_groups"] == 1 and two["zero_variance_share"] == 0.5 and two["pass_rate"] is None


def test_rerun_with_other_settings_evaluates_its_own_start(tmp_path, tiny_model_dir):
    """A run redone with other settings (here: more held-out prompts) compares its end with its own start, not
    with the start of the run it replaced."""
    evals = write_prompts(tmp_path / "eval.jsonl", n=3)
    over = {"iterations": 1, "reward": "verifier", "eval.prompts": evals, "rollout.sampling.max_new_tokens": 4,
            "eval.max_new_tokens": 4}
    rl.run(config(tmp_path, tiny_model_dir, **over, **{"eval.max_prompts": 2}))
    out = rl.run(config(tmp_path, tiny_model_dir, **over, **{"eval.max_prompts": 3}))
    change = json.loads((out / "manifest.json").read_text())["eval_change"]
    assert change["n"] == 3 and len((out / "eval_start.jsonl").read_text().splitlines()) == 3
