"""``alignline select`` on hand-built ranked sets, and ``alignline rs`` training on the last turn only."""

from __future__ import annotations

import json
import random

import pytest

from alignline.config import load_config
from alignline.data.records import RankedSet
from alignline.errors import ConfigError
from alignline.stages import select
from alignline.stages.select import mean_score_by_rank, policy_matched_rank, rso_pairs


def ranked(pid: str, scores: list[float]) -> RankedSet:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return RankedSet(prompt={"id": pid, "messages": [{"role": "user", "content": f"q {pid}"}]}, scorer="rm",
                     responses=[{"prompt_id": pid, "sample_idx": i, "text": f"answer {pid} {i}", "source": "m",
                                 "scores": {"rm": scores[i]}, "rank": r + 1} for r, i in enumerate(order)])


SETS = [ranked("a", [4.0, 1.0, 3.0, 2.0]), ranked("b", [2.0, 0.0, 1.0, 1.0])]


def test_policy_matched_rank_hand_computed():
    """Mean by rank: rank1 (4+2)/2 = 3, rank2 (3+1)/2 = 2, rank3 (2+1)/2 = 1.5, rank4 (1+0)/2 = 0.5.
    Policy mean 1.6 -> rank 3 (|1.5 - 1.6| = 0.1 is the smallest)."""
    assert mean_score_by_rank(SETS) == [3.0, 2.0, 1.5, 0.5]
    assert policy_matched_rank(SETS, 1.6, chosen_rank=1) == 3
    assert policy_matched_rank(SETS, 9.0, chosen_rank=1) == 2  # never the chosen rank itself
    assert policy_matched_rank(SETS, -5.0, chosen_rank=1) == 4


def write_sets(tmp_path, sets, name="ranked.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(s.model_dump(mode="json")) + "\n" for s in sets))
    return path


def run_select(tmp_path, *over):
    cfg = load_config(select.SelectConfig, None, [f"ranked={write_sets(tmp_path, SETS)}",
                                                  f"output_dir={tmp_path / 'out'}", *over])
    out = select.run(cfg)
    return out, json.loads((out / "manifest.json").read_text())


def read(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_fixed_rank_with_ties_dropped(tmp_path):
    """Set b = [2, 0, 1, 1] ranks as 2 (idx 0), 1 (idx 2), 1 (idx 3), 0 (idx 1): ranks 2 and 3 tie -> dropped;
    set a = [4, 1, 3, 2]: rank 2 is idx 2 (3.0), rank 3 is idx 3 (2.0) -> pair a#2-3."""
    out, m = run_select(tmp_path, "strategy=fixed_rank", "rank=2", "rejected_rank=3")
    pairs = read(out / "pairs.jsonl")
    assert [p["id"] for p in pairs] == ["a#2-3"] and m["counts"]["dropped_ties"] == 1
    assert pairs[0]["provenance"]["chosen_rank"] == 2 and pairs[0]["provenance"]["rejected_rank"] == 3


def test_rank_beyond_n_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="rejected rank 9 but the smallest ranked set has 4"):
        run_select(tmp_path, "strategy=fixed_rank", "rejected_rank=9")
    with pytest.raises(ConfigError, match="rank=5 but the smallest ranked set has 4"):
        run_select(tmp_path, "mode=rs", "rank=5")


def test_best_worst_and_rs(tmp_path):
    out, _ = run_select(tmp_path, "strategy=best_worst")
    pairs = read(out / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("answer a 0", "answer a 1"), ("answer b 0", "answer b 1")]
    out, _ = run_select(tmp_path, "mode=rs", "rank=2", "output_dir=" + str(tmp_path / "rs"))
    convs = read(out / "rs.jsonl")
    assert convs[0]["messages"][-1] == {"role": "assistant", "content": "answer a 2"}


def test_policy_matched_selection_end_to_end(tmp_path):
    policy = write_sets(tmp_path, [ranked("p", [1.6, 1.6])], "policy.jsonl")
    out, m = run_select(tmp_path, "strategy=policy_matched", f"policy_scores={policy}")
    assert m["selection"]["rejected_rank"] == 3 and m["selection"]["policy_mean_score"] == 1.6


def test_rso_acceptance_follows_the_reward():
    """With beta small only near-best samples are accepted; the pair is best-accepted vs worst-accepted."""
    s = ranked("x", [10.0, 9.9, 0.0, -5.0])
    rng = random.Random(0)
    pairs = [rso_pairs(s, 0.05, 2, rng) for _ in range(50)]
    assert all(p == [(0, 1)] for p in pairs if p)  # ranks 1 and 2 (indices into responses)
    wide = [rso_pairs(s, 100.0, 2, random.Random(i)) for i in range(200)]
    assert len({p[0] for p in wide if p}) > 2  # with a large beta many combinations occur


def test_rs_trains_on_the_last_turn_only(tmp_path, tiny_model_dir):
    from alignline.stages import rs

    conv = {"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "first"},
                                    {"role": "user", "content": "again"}, {"role": "assistant", "content": "LAST"}]}
    data = tmp_path / "rs.jsonl"
    data.write_text((json.dumps(conv) + "\n") * 4)
    cfg = load_config(rs.RSConfig, None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'rs'}",
                                          f"data.train={data}", "train.epochs=1", "train.batch_size=2"])
    out = rs.run(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "rs" and m["config"]["data"]["train_on"] == "last"
    assert m["counts"]["trained_tokens"] == 4 * len("LAST<|im_end|>".replace("<|im_end|>", "x"))
