"""Best-of-n curves: hand-computed arithmetic and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
from tests.test_select import ranked

from alignline.config import load_config
from alignline.errors import ConfigError, DataError
from alignline.stages import bestofn


def test_ns_up_to():
    assert bestofn.ns_up_to(1) == [1]
    assert bestofn.ns_up_to(16) == [1, 2, 4, 8, 16]
    assert bestofn.ns_up_to(6) == [1, 2, 4, 6]


def test_curves_hand_computed():
    """Prompt a: RM scores by sample [4, 1, 3, 2], gold [0.0, 1.0, 0.5, 1.0].
    n=1: RM best = s0 -> gold 0.0; oracle 0.0.  n=2: RM best s0 -> 0.0; oracle max(0, 1) = 1.0.
    n=4: RM best s0 -> 0.0; oracle 1.0.  Prompt b: RM [1, 2, 0, 0], gold [1, 0.5, 0, 0]:
    n=1: 1.0/1.0; n=2: RM best s1 -> 0.5, oracle 1.0; n=4: 0.5 / 1.0.  Means: n=1 (0+1)/2 = 0.5 / 0.5;
    n=2: (0+0.5)/2 = 0.25 / 1.0; n=4: 0.25 / 1.0."""
    sets = [ranked("a", [4.0, 1.0, 3.0, 2.0]), ranked("b", [1.0, 2.0, 0.0, 0.0])]
    gold = {("a", 0): 0.0, ("a", 1): 1.0, ("a", 2): 0.5, ("a", 3): 1.0,
            ("b", 0): 1.0, ("b", 1): 0.5, ("b", 2): 0.0, ("b", 3): 0.0}
    rows = bestofn.curves(sets, gold, 4)
    assert [(r["n"], r["gold_of_rm_best"], r["gold_oracle_best"]) for r in rows] == [
        (1, 0.5, 0.5), (2, 0.25, 1.0), (4, 0.25, 1.0)]
    assert rows[1]["rm_score_of_best"] == pytest.approx((4 + 2) / 2)


def test_bestofn_end_to_end(tmp_path, tiny_model_dir):
    ins = [{"id": "no_commas", "kwargs": {}, "text": "Use no commas."}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({
        "id": f"h{i}", "messages": [{"role": "user", "content": f"Say {i}. Use no commas."}],
        "meta": {"instructions": ins}}) + "\n" for i in range(3)))
    cfg = load_config(bestofn.BestOfNConfig, None, [
        f"model={tiny_model_dir}", f"prompts={tmp_path / 'p.jsonl'}", f"reward_model={tiny_model_dir}",
        f"output_dir={tmp_path / 'bon'}", "n=4", "sampling.max_new_tokens=6", "sampling.temperature=1.0"])
    out = bestofn.run(cfg)
    res = json.loads((out / "bestofn.json").read_text())
    assert [r["n"] for r in res["rows"]] == [1, 2, 4]
    oracle = [r["gold_oracle_best"] for r in res["rows"]]
    assert oracle == sorted(oracle)  # the oracle can only improve with n
    assert all(r["gold_oracle_best"] >= r["gold_of_rm_best"] for r in res["rows"])
    assert (out / "bestofn.png").stat().st_size > 1000


def test_bestofn_from_ranked_sets_samples_nothing(tmp_path, tiny_model_dir):
    """The curve of sets a score stage already ranked equals the curve bestofn computes from its own."""
    ins = [{"id": "no_commas", "kwargs": {}, "text": "Use no commas."}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({
        "id": f"h{i}", "messages": [{"role": "user", "content": f"Say {i}. Use no commas."}],
        "meta": {"instructions": ins}}) + "\n" for i in range(3)))
    sampled = bestofn.run(load_config(bestofn.BestOfNConfig, None, [
        f"model={tiny_model_dir}", f"prompts={prompts}", f"reward_model={tiny_model_dir}",
        f"output_dir={tmp_path / 'bon'}", "n=4", "sampling.max_new_tokens=6", "sampling.temperature=1.0"]))
    reused = bestofn.run(load_config(bestofn.BestOfNConfig, None, [
        f"ranked={sampled / 'ranked'}", f"prompts={prompts}", f"output_dir={tmp_path / 'reused'}", "n=4"]))
    assert not (reused / "samples").exists()
    rows = json.loads((reused / "bestofn.json").read_text())["rows"]
    assert rows == json.loads((sampled / "bestofn.json").read_text())["rows"]
    first_two = bestofn.run(load_config(bestofn.BestOfNConfig, None, [
        f"ranked={sampled / 'ranked'}", f"prompts={prompts}", f"output_dir={tmp_path / 'two'}", "n=4", "max_prompts=2"]))
    assert [r["prompts"] for r in json.loads((first_two / "bestofn.json").read_text())["rows"]] == [2, 2, 2]
    other = tmp_path / "other.jsonl"
    other.write_text(prompts.read_text().replace('"h0"', '"x0"'))
    with pytest.raises(DataError, match="not in"):
        bestofn.run(load_config(bestofn.BestOfNConfig, None, [
            f"ranked={sampled / 'ranked'}", f"prompts={other}", f"output_dir={tmp_path / 'bad'}"]))
    with pytest.raises(ConfigError, match="not both"):
        load_config(bestofn.BestOfNConfig, None, [f"ranked={sampled / 'ranked'}", f"prompts={prompts}",
                                                  f"model={tiny_model_dir}"])
