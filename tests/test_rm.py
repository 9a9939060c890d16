"""Reward model: loss values, per-rating accuracy, the rm stage, prefix-cached scoring, the score stage."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from tests.test_dpo import make_pairs

from alignline import losses
from alignline.config import load_config
from alignline.data.chat import tokenise_prompt_response
from alignline.errors import DataError
from alignline.judges.reward import score_plain, score_responses
from alignline.stages import rm, score
from alignline.stages.rm import summarize_scores


def test_bradley_terry_hand_values():
    """r_w = 1, r_l = 0: -log sigmoid(1) = log(1 + e^-1) = 0.3132617;
    with margin 0.5: log(1 + e^-0.5) = 0.4740770; equal rewards: log 2."""
    loss, c, r = losses.bradley_terry_loss(torch.tensor([1.0, 0.3]), torch.tensor([0.0, 0.3]))
    assert loss[0].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert loss[1].item() == pytest.approx(math.log(2), abs=1e-6)
    loss, _, _ = losses.bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)


def test_accuracy_per_rating_constructed():
    """significantly: 2/2 right; slightly: 1 of 2; unrated: 0 of 1. Overall 3/5 = 0.6.
    SE of a mean of hits, sqrt(n / (n - 1) * sum (h - p)^2) / n: overall sqrt(5/4 * (3 * 0.4^2 + 2 * 0.6^2)) / 5
    = sqrt(1.5) / 5 = 0.2449490; slightly sqrt(2 * (0.5^2 + 0.5^2)) / 2 = 0.5; significantly 0; unrated (one
    pair) None."""
    chosen = [2.0, 1.0, 0.5, 0.1, 0.0]
    rejected = [0.0, 0.0, 0.4, 0.2, 1.0]
    ratings = ["significantly", "significantly", "slightly", "slightly", "unrated"]
    s = summarize_scores(chosen, rejected, ratings)
    assert s["accuracy"] == pytest.approx(0.6)
    assert list(s["accuracy_by_rating"]) == ["significantly", "slightly", "unrated"]
    assert s["accuracy_by_rating"]["significantly"] == {"pairs": 2, "accuracy": 1.0, "se": 0.0}
    assert s["accuracy_by_rating"]["slightly"]["accuracy"] == 0.5
    assert s["accuracy_by_rating"]["slightly"]["se"] == pytest.approx(0.5)
    assert s["accuracy_by_rating"]["unrated"]["se"] is None
    assert s["accuracy_se"] == pytest.approx(math.sqrt(1.5) / 5)
    assert s["accuracy_by_rating"]["unrated"]["accuracy"] == 0.0
    assert s["margin_mean"] == pytest.approx((2 + 1 + 0.1 - 0.1 - 1) / 5)


@pytest.fixture
def rated_pairs(tmp_path):
    rows = make_pairs(24)
    for i, r in enumerate(rows):
        r["rating"] = ["significantly", "better", "slightly", "negligibly"][i % 4]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rm_stage_trains_and_saves_a_sequence_classifier(tmp_path, tiny_model_dir, rated_pairs, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    cfg_path = tmp_path / "rm.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "rm"), "margin_by_rating": True,
        "data": {"train": str(rated_pairs), "eval": str(rated_pairs), "max_length": 128},
        "train": {"epochs": 3, "batch_size": 4, "grad_accum": 1, "lr": 2e-3, "warmup_ratio": 0.0},
    }))
    out = rm.run(load_config(rm.RMConfig, cfg_path))
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["accuracy_by_rating"]) == {"significantly", "better", "slightly", "negligibly"}
    assert ev["accuracy"] >= 0.9  # it separates these (train = eval) pairs
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "eval/accuracy/significantly" in metrics[0]
    loaded = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    p, r = tokenise_prompt_response(tiny_tokenizer, make_pairs(1)[0]["prompt"], make_pairs(1)[0]["chosen"],
                                    keep_tail=True)
    with torch.no_grad():
        hf = loaded(input_ids=torch.tensor([p + r])).logits.item()
    ours = score_plain(loaded, p, [r], pad_id=tiny_tokenizer.pad_token_id)[0]
    assert hf == pytest.approx(ours, abs=1e-5)


def test_rm_stage_evaluates_the_held_out_pairs_twice_not_three_times(tmp_path, tiny_model_dir, rated_pairs,
                                                                     monkeypatch):
    """The held-out pairs are scored at step 0 and after the last step; eval.json is that last evaluation
    (not a third pass over the same pairs with the same weights): the same accuracy as the metrics' last row."""
    calls = []
    real = rm.evaluate_rm
    monkeypatch.setattr(rm, "evaluate_rm", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg_path = tmp_path / "rm.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "rm"),
        "data": {"train": str(rated_pairs), "eval": str(rated_pairs), "max_length": 128},
        "train": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 2e-3, "warmup_ratio": 0.0},
    }))
    out = rm.run(load_config(rm.RMConfig, cfg_path))
    assert len(calls) == 2
    ev = json.loads((out / "eval.json").read_text())
    last = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert ev["accuracy"] == last["eval/accuracy"] and ev["pairs"] == 24


@pytest.fixture
def tiny_rm(tiny_model_dir):
    from alignline.models import load_reward_model

    torch.manual_seed(1)
    return load_reward_model(tiny_model_dir, dtype="float32").eval()


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_prefix_cached_scores_equal_plain_scores(tiny_rm, tiny_tokenizer, chunk):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about cats. " * 5}]
    texts = ["Cats purr.", "They are mammals that sleep a lot." * 3, "no", "Meow " * 20, "Cats!"]
    ids = [tokenise_prompt_response(tiny_tokenizer, msgs, t, keep_tail=True) for t in texts]
    p = ids[0][0]
    shared = score_responses(tiny_rm, p, [x[1] for x in ids], pad_id=tiny_tokenizer.pad_token_id, chunk=chunk)
    plain = score_plain(tiny_rm, p, [x[1] for x in ids], pad_id=tiny_tokenizer.pad_token_id)
    assert shared == pytest.approx(plain, abs=1e-4)


def write_score_inputs(tmp_path, n_prompts=5, n=4):
    prompts, responses = [], []
    for i in range(n_prompts):
        prompts.append({"id": f"q{i}", "messages": [{"role": "user", "content": f"Question number {i}?"}]})
        for j in range(n):
            responses.append({"prompt_id": f"q{i}", "sample_idx": j, "text": f"Answer {j} " * (j + 1),
                              "source": "tiny"})
    responses.append({"prompt_id": "q0", "sample_idx": 9, "text": "", "source": "tiny", "status": "failed",
                      "error": "timeout"})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))


def score_cfg(tmp_path, rm_dir, **over):
    return load_config(score.ScoreConfig, None, [
        f"reward_model={rm_dir}", f"prompts={tmp_path / 'prompts.jsonl'}",
        f"responses={tmp_path / 'responses.jsonl'}", f"output_dir={tmp_path / 'score'}", "shard_size=2",
        *[f"{k}={v}" for k, v in over.items()]])


def read_sets(out):
    return [json.loads(ln) for p in sorted(out.glob("ranked-*.jsonl")) for ln in p.read_text().splitlines()]


def test_score_stage_ranks_and_resumes(tmp_path, tiny_model_dir):
    write_score_inputs(tmp_path)
    out = score.run(score_cfg(tmp_path, tiny_model_dir))
    sets = read_sets(out)
    assert [s["prompt"]["id"] for s in sets] == [f"q{i}" for i in range(5)]
    for s in sets:
        vals = [r["scores"]["rm"] for r in s["responses"]]
        assert vals == sorted(vals, reverse=True) and [r["rank"] for r in s["responses"]] == [1, 2, 3, 4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_failed_responses"] == 1
    assert (out / "score_by_rank.png").exists()
    # a kill after the first shard: manifest and later shards gone -> rerun completes with no duplicates
    shards = sorted(out.glob("ranked-*.jsonl"))
    for p in shards[1:]:
        p.unlink()
    (out / "manifest.json").unlink()
    score.run(score_cfg(tmp_path, tiny_model_dir))
    again = read_sets(out)
    assert [s["prompt"]["id"] for s in again] == [s["prompt"]["id"] for s in sets]
    assert json.loads((out / "manifest.json").read_text())["counts"]["resumed_prompts"] == 2


def test_score_unknown_prompt_is_a_clear_error(tmp_path, tiny_model_dir):
    write_score_inputs(tmp_path)
    with open(tmp_path / "responses.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt_id": "nope", "sample_idx": 0, "text": "x", "source": "s"}) + "\n")
    with pytest.raises(DataError, match=r"prompt_id.*'nope'"):
        score.run(score_cfg(tmp_path, tiny_model_dir))


def test_score_with_the_verifier_judge_ranks_by_instructions_followed(tmp_path):
    """Instructions all_lowercase (IFEval's english_lowercase: no capitals and langdetect says English) +
    no_commas: "this is a good answer" follows both (1.0), "This is a good answer" only no_commas (0.5),
    "This is a good, answer" neither (0.0); equal scores keep sample order (samples 0 and 3 both score 0.5)."""
    instructions = [{"id": "all_lowercase", "kwargs": {}}, {"id": "no_commas", "kwargs": {}}]
    (tmp_path / "prompts.jsonl").write_text(json.dumps(
        {"id": "q0", "messages": [{"role": "user", "content": "Hi?"}], "meta": {"instructions": instructions}}) + "\n")
    texts = ["This is a good answer", "This is a good, answer", "this is a good answer", "Also fine"]
    (tmp_path / "responses.jsonl").write_text("".join(
        json.dumps({"prompt_id": "q0", "sample_idx": i, "text": t, "source": "s"}) + "\n" for i, t in enumerate(texts)))
    cfg = load_config(score.ScoreConfig, None, [
        "judge=verifier", f"prompts={tmp_path / 'prompts.jsonl'}", f"responses={tmp_path / 'responses.jsonl'}",
        f"output_dir={tmp_path / 'score'}"])
    [ranked] = read_sets(score.run(cfg))
    assert [(r["sample_idx"], r["scores"]["verifier"], r["rank"]) for r in ranked["responses"]] == [
        (2, 1.0, 1), (0, 0.5, 2), (3, 0.5, 3), (1, 0.0, 4)]

    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "q0", "messages": [{"role": "user", "content": "Hi"}]})
                                            + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl.*meta.instructions|meta.instructions.*prompts.jsonl"):
        score.run(cfg.model_copy(update={"output_dir": str(tmp_path / "score2")}))


@pytest.fixture
def tiny_rm_dir(tiny_rm, tiny_tokenizer, tmp_path):
    from alignline.models import save_model

    save_model(tiny_rm, tiny_tokenizer, tmp_path / "rm")
    return tmp_path / "rm"


def test_rl_rm_reward_cuts_at_max_length_as_score_does(tiny_rm_dir, tiny_rm, tiny_tokenizer, tmp_path):
    """The rl reward ``rm`` scores through the judge's one reward-model scorer, so it cuts as ``score`` does: with
    max_length = P + 3 (P: the prompt's tokens) each reward is score_responses on the response's first 3 tokens,
    and every response longer than 3 tokens is counted in responses_cut. max_length = P leaves no room: an error
    naming the setting."""
    from collections import Counter

    from alignline.data.records import Prompt
    from alignline.errors import ConfigError
    from alignline.rewards import RewardSpec, build_reward

    prompt = Prompt(id="q", messages=[{"role": "user", "content": "Tell me about cats."}])
    texts = ["Cats purr and sleep a lot.", "no", "They are mammals."]
    ids = [tokenise_prompt_response(tiny_tokenizer, prompt.messages, t, keep_tail=True) for t in texts]
    p = ids[0][0]
    expected = score_responses(tiny_rm, p, [r[:3] for _, r in ids], pad_id=tiny_tokenizer.pad_token_id)
    uncut = score_responses(tiny_rm, p, [r for _, r in ids], pad_id=tiny_tokenizer.pad_token_id)
    assert expected != pytest.approx(uncut, abs=1e-4)  # the cut changes the scores, so the check below can fail
    counts: Counter = Counter()
    fn = build_reward(RewardSpec(type="rm", model=str(tiny_rm_dir), max_length=len(p) + 3), 0, out_dir=tmp_path,
                      counts=counts)
    assert fn([prompt], [texts])[0] == pytest.approx(expected, abs=1e-5)
    assert counts["responses_cut"] == sum(len(r) > 3 for _, r in ids) > 0
    assert len(p) > 8  # a valid max_length (> 8) that the prompt alone fills
    fn = build_reward(RewardSpec(type="rm", model=str(tiny_rm_dir), max_length=len(p)), 2, out_dir=tmp_path,
                      counts=counts)
    with pytest.raises(ConfigError, match=r"reward\[2\]\.max_length: prompt 'q'"):
        fn([prompt], [texts])


def test_reward_model_weights_take_the_devices_dtype_everywhere(tiny_rm_dir, tmp_path, monkeypatch):
    """dtype auto is the device's own (models/device.py pick_dtype), for score, rl's rm reward and tso alike: on a
    CPU that computes bfloat16 natively the reward model is loaded in bfloat16 (rl's reward hard-coded float32)."""
    from collections import Counter

    from alignline.judges import reward as reward_mod
    from alignline.rewards import RewardSpec, build_reward

    monkeypatch.setattr("alignline.models.device.cpu_has_native_bf16", lambda: True)
    loaded = []
    real_load = reward_mod.RewardModelJudge.load.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(real_load(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(reward_mod.RewardModelJudge, "load", classmethod(spy))
    build_reward(RewardSpec(type="rm", model=str(tiny_rm_dir)), 0, out_dir=tmp_path, counts=Counter(), device="cpu")
    assert next(loaded[-1].model.parameters()).dtype == torch.bfloat16
