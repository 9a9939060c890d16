"""eval winrate: outcome rule, standard error, the length-controlled fit, and the stage end to end with
scripted engines (no model, no network)."""

from __future__ import annotations

import json
import math

import pytest

from alignline.config import load_config
from alignline.data.io import write_records
from alignline.data.records import Prompt, Response
from alignline.errors import ConfigError, DataError
from alignline.evaluate import winrate as wr
from alignline.judges.pairwise import PairwiseVerdict
from alignline.stages import eval_winrate

# ------------------------------------------------------------------------------------------ pure functions


def test_order_votes_and_prompt_outcomes():
    better, unsure, negligibly = (PairwiseVerdict("A", d, "") for d in ("better", "unsure", "negligibly"))
    assert wr.order_vote(better, "A", ["unsure"]) == "model"
    assert wr.order_vote(better, "B", ["unsure"]) == "reference"
    assert wr.order_vote(unsure, "A", ["unsure"]) == "tie"
    assert wr.order_vote(negligibly, "A", ["unsure"]) == "model"
    assert wr.order_vote(negligibly, "A", ["unsure", "negligibly"]) == "tie"
    assert wr.prompt_outcome(["model", "model"]) == 1.0
    assert wr.prompt_outcome(["reference", "reference"]) == 0.0
    # the two orders disagree (position bias), or one order is a tie vote: a tie counted as half
    assert wr.prompt_outcome(["model", "reference"]) == 0.5
    assert wr.prompt_outcome(["model", "tie"]) == 0.5
    assert wr.prompt_outcome(["tie", "tie"]) == 0.5


def test_win_rate_and_standard_error():
    """[1, 0.5, 0, 1]: mean 0.625; deviations .375, -.125, -.625, .375 -> squares sum .6875; sd (ddof 1) =
    sqrt(.6875 / 3) = .478714; se = sd / sqrt(4) = .239357 -> 62.5 +- 23.9357 percent."""
    rate, se = wr.win_rate([1, 0.5, 0, 1])
    assert rate == pytest.approx(62.5)
    assert se == pytest.approx(23.9357, abs=1e-4)
    assert wr.win_rate([]) == (None, None)
    assert wr.win_rate([1.0]) == (100.0, None)


def test_lc_two_length_groups_match_the_closed_form():
    """10 prompts where the model is 30 chars longer (9 wins, 1 loss) and 2 where it is 30 shorter (2 ties).
    mean d = 30 * 8 / 12 = 20, sd = sqrt(E[d^2] - 20^2) = sqrt(900 - 400) = sqrt(500), so x = +-c with
    c = tanh(30 / sqrt(500)). With two x values and no penalty the fit matches each group's mean:
    sigmoid(theta + phi c) = 0.9 and sigmoid(theta - phi c) = 0.5, so theta = (logit .9 + logit .5) / 2 = ln 3
    and phi = ln 3 / c. LC = 100 sigmoid(ln 3) = 75, below the raw (9 + 2 * 0.5) / 12 = 83.33: part of the
    model's wins are explained by its length."""
    outcomes = [1.0] * 9 + [0.0] + [0.5, 0.5]
    diffs = [30] * 10 + [-30] * 2
    fit = wr.fit_length_model(outcomes, diffs, lam=0.0)
    c = math.tanh(30 / math.sqrt(500))
    assert fit.scale == pytest.approx(math.sqrt(500))
    assert fit.theta == pytest.approx(math.log(3), abs=1e-8)
    assert fit.phi == pytest.approx(math.log(3) / c, abs=1e-8)
    assert fit.lc_win_rate == pytest.approx(75.0, abs=1e-6)
    assert wr.win_rate(outcomes)[0] == pytest.approx(83.3333, abs=1e-4)
    assert not fit.separable


def test_lc_moves_to_50_when_length_explains_the_outcomes():
    """Longer on 10 prompts (8 wins, 2 losses), shorter on 5 (1 win, 4 losses): raw = 9 / 15 = 60 %. The
    group logits are ln 4 and -ln 4, so theta = 0 and LC = 50 exactly without a penalty; the default tiny
    penalty moves it by far less than a point."""
    outcomes = [1.0] * 8 + [0.0] * 2 + [1.0] + [0.0] * 4
    diffs = [25] * 10 + [-25] * 5
    assert wr.win_rate(outcomes)[0] == pytest.approx(60.0)
    exact = wr.fit_length_model(outcomes, diffs, lam=0.0)
    assert exact.theta == pytest.approx(0.0, abs=1e-9) and exact.lc_win_rate == pytest.approx(50.0, abs=1e-7)
    assert exact.phi > 0
    assert wr.fit_length_model(outcomes, diffs).lc_win_rate == pytest.approx(50.0, abs=0.05)


def test_lc_equals_raw_when_outcomes_do_not_depend_on_length():
    """Every length difference in {-40, -20, 20, 40} carries the outcomes {1, 1, 0, 0.5}: sum(x) = 0 and
    sum(x y) = 2.5 sum(x) = 0, so phi = 0 solves the phi equation and theta = logit(0.625) = ln(5/3):
    LC = raw = 62.5 (the default penalty shifts it by ~3e-3 points)."""
    outcomes = [1.0, 1.0, 0.0, 0.5] * 4
    diffs = [d for d in (-40, -20, 20, 40) for _ in range(4)]
    fit = wr.fit_length_model(outcomes, diffs, lam=0.0)
    assert fit.phi == pytest.approx(0.0, abs=1e-9)
    assert fit.theta == pytest.approx(math.log(5 / 3), abs=1e-9)
    assert fit.lc_win_rate == pytest.approx(62.5, abs=1e-7)
    assert wr.fit_length_model(outcomes, diffs).lc_win_rate == pytest.approx(62.5, abs=0.01)


def test_separable_symmetric_data_gives_theta_zero():
    """Losses at d = -20, -10 and wins at +10, +20: separable, so only the penalty keeps the fit finite. The
    penalised objective is unchanged by (x, y) -> (-x, 1 - y), which maps theta to -theta; its unique
    minimum therefore has theta = 0: LC = 50 = raw, with a large positive phi, flagged separable."""
    fit = wr.fit_length_model([0.0, 0.0, 1.0, 1.0], [-20, -10, 10, 20])
    assert fit.separable and fit.iterations < 200
    assert fit.theta == pytest.approx(0.0, abs=1e-9) and fit.lc_win_rate == pytest.approx(50.0, abs=1e-7)
    assert fit.phi > 5
    all_wins = wr.fit_length_model([1.0, 1.0, 1.0], [5, -5, 10])
    assert all_wins.separable and all_wins.lc_win_rate > 99
    # a tie is fitted exactly only on the boundary (p = 0.5 there): one tie can sit on it, two apart cannot
    assert wr.separable([-1, 1], [0.5, 1.0])
    assert not wr.separable([-1, 0, 1], [0.5, 1.0, 0.5])
    assert not wr.separable([0, 0], [1.0, 0.0])  # one length, both outcomes: a finite maximum
    assert not wr.separable([-1, 1, 2], [1.0, 0.0, 1.0])
    assert wr.fit_length_model([], []) is None


# ------------------------------------------------------------------------------------------ the stage


class ScriptedEngine:
    """Answers every prompt by ``rule(last user message, prompt id)``; counts calls."""

    def __init__(self, rule):
        self.rule, self.calls = rule, 0

    def generate(self, prompts, n, sampling):
        self.calls += len(prompts)
        return [[Response(prompt_id=p.id, sample_idx=0, text=self.rule(p.messages[-1].content, p.id),
                          source="scripted")] for p in prompts]


def shown(text, which):
    start = text.index(f"<<<RESPONSE {which} ")
    body = text[text.index(">>>", start) + 4:]
    return body[: body.index("\n<<<END OF RESPONSE")]


def judge_rule(text, _id):
    """Q3: a malformed reply (a failure); Q4: always A (position bias: the orders disagree, a tie);
    otherwise the response containing 'good' wins."""
    if "USER: Q3?" in text:
        return "I would rather not pick one."
    if "USER: Q4?" in text:
        return "Reason: first is fine\nVerdict: [[A]]\nDegree: better"
    a = shown(text, "A")
    return f"Reason: has good\nVerdict: [[{'A' if 'good' in a else 'B'}]]\nDegree: better"


def reference_rule(_text, pid):
    return "a good reference answer" if pid == "q2" else "plain reference"


MODEL_TEXTS = {"q0": "good answer zero", "q1": "a good and long answer one", "q2": "meh", "q3": "good three",
               "q4": "good four"}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    prompts = [Prompt(id=f"q{i}", messages=[{"role": "user", "content": f"Q{i}?"}]) for i in range(5)]
    write_records(tmp_path / "prompts.jsonl", prompts)
    write_records(tmp_path / "model.jsonl", [Response(prompt_id=k, sample_idx=0, text=v, source="m")
                                             for k, v in MODEL_TEXTS.items()])
    engines = {"judge-fake": ScriptedEngine(judge_rule), "ref-engine": ScriptedEngine(reference_rule)}
    builds = []

    def fake_build(settings, device=None):
        builds.append(settings.model)
        return engines[settings.model]

    monkeypatch.setattr(eval_winrate, "build_engine", fake_build)
    return engines, builds


def cfg(tmp_path, *extra):
    return load_config(eval_winrate.WinrateConfig, None, [
        f"prompts={tmp_path / 'prompts.jsonl'}", f"model.responses={tmp_path / 'model.jsonl'}",
        "model.name=my-model", "reference.model=ref-engine", "judge.model=judge-fake",
        f"output_dir={tmp_path / 'out'}", *extra])


def test_winrate_end_to_end_failures_ties_cache_and_export(tmp_path, setup):
    """q0, q1: wins; q2: loss (the reference has 'good'); q3: judge reply malformed in both orders ->
    failure, excluded; q4: both orders say A -> disagreement -> tie. Win rate (1 + 1 + 0 + 0.5) / 4 = 62.5,
    se as in test_win_rate_and_standard_error = 23.9357; failure rate 1 / 5 = 20 %."""
    engines, builds = setup
    out = eval_winrate.run(cfg(tmp_path))
    res = json.loads((out / "results.json").read_text())
    assert (res["wins"], res["ties"], res["losses"], res["judge_failures"]) == (2, 1, 1, 1)
    assert res["failed_prompt_ids"] == ["q3"] and res["judge_failure_rate"] == pytest.approx(20.0)
    assert res["win_rate"] == pytest.approx(62.5) and res["win_rate_se"] == pytest.approx(23.9357, abs=1e-4)
    assert (res["model"], res["reference"]) == ("my-model", "ref-engine")
    rows = {r["prompt_id"]: r for r in map(json.loads, (out / "judgments.jsonl").read_text().splitlines())}
    assert {k: r["outcome"] for k, r in rows.items()} == {"q0": "win", "q1": "win", "q2": "loss", "q3": "failure",
                                                          "q4": "tie"}
    assert [o["model_shown_as"] for o in rows["q0"]["orders"]] == ["A", "B"]
    assert "no 'Verdict:'" in rows["q3"]["orders"][0]["failure"]
    assert [o["vote"] for o in rows["q4"]["orders"]] == ["model", "reference"]
    # the LC number is the fit on the judged prompts' outcomes and character-length differences
    judged = [r for r in rows.values() if "score" in r]
    fit = wr.fit_length_model([r["score"] for r in judged], [r["model_chars"] - r["reference_chars"] for r in judged])
    assert res["lc_win_rate"] == pytest.approx(fit.lc_win_rate)
    # the loss (model 20 chars shorter) < the tie (6 shorter) < the wins (longer): separable, flagged
    assert res["length_model"]["separable"] is True
    # AlpacaEval export: both systems, same instructions, in AlpacaEval's three fields
    model_out = json.loads((out / "alpaca_eval" / "model_outputs.json").read_text())
    ref_out = json.loads((out / "alpaca_eval" / "reference_outputs.json").read_text())
    assert model_out[1] == {"instruction": "Q1?", "output": MODEL_TEXTS["q1"], "generator": "my-model"}
    assert [r["instruction"] for r in ref_out] == [f"Q{i}?" for i in range(5)]
    assert ref_out[2] == {"instruction": "Q2?", "output": "a good reference answer", "generator": "ref-engine"}
    assert engines["judge-fake"].calls == 10 and engines["ref-engine"].calls == 5
    # an identical rerun is skipped; a rerun that has lost its results makes zero judge or generation calls
    for name in ("manifest.json", "results.json", "judgments.jsonl"):
        (out / name).unlink()
    eval_winrate.run(cfg(tmp_path))
    assert engines["judge-fake"].calls == 10 and engines["ref-engine"].calls == 5
    assert builds == ["ref-engine", "judge-fake"]  # nothing built on the rerun
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["judge_calls"] == 0
    assert json.loads((out / "results.json").read_text())["win_rate"] == pytest.approx(62.5)


def test_tie_degrees_turn_unsure_into_ties(tmp_path, setup):
    """A judge that always answers 'unsure' for the model's side: with tie_degrees [unsure] every judged
    prompt is a tie (win rate 50); with tie_degrees [] the same verdicts are two model votes: all wins."""
    engines, _ = setup

    def unsure_for_good(text, _id):
        a = shown(text, "A")
        return f"Reason: x\nVerdict: [[{'A' if a.startswith(('good', 'a good and')) else 'B'}]]\nDegree: unsure"

    engines["judge-fake"].rule = unsure_for_good
    res = json.loads((eval_winrate.run(cfg(tmp_path, "max_prompts=2")) / "results.json").read_text())
    assert (res["ties"], res["win_rate"]) == (2, 50.0)
    res = json.loads((eval_winrate.run(cfg(tmp_path, "max_prompts=2", "tie_degrees=[]")) / "results.json")
                     .read_text())
    assert (res["wins"], res["win_rate"]) == (2, 100.0)


def test_reference_covering_other_prompts_is_a_clear_error(tmp_path, setup):
    ref = tmp_path / "ref.jsonl"
    write_records(ref, [Response(prompt_id=f"q{i}", sample_idx=0, text="r", source="r") for i in range(3)])
    with pytest.raises(DataError) as exc:
        eval_winrate.run(cfg(tmp_path, "reference.model=null", f"reference.responses={ref}"))
    msg = str(exc.value)
    assert str(ref) in msg and "reference responses" in msg and "q3, q4" in msg and "2 of the 5" in msg
    write_records(ref, [Response(prompt_id=i, sample_idx=0, text="r", source="r") for i in ("q0", "zz")])
    with pytest.raises(DataError, match=r"not in the prompts file: zz"):
        eval_winrate.run(cfg(tmp_path, "reference.model=null", f"reference.responses={ref}"))


def test_empty_response_file_and_unset_system_are_errors(tmp_path, setup):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError) as exc:
        eval_winrate.run(cfg(tmp_path, f"model.responses={tmp_path / 'empty.jsonl'}"))
    assert str(tmp_path / "empty.jsonl") in str(exc.value) and "no Response records" in str(exc.value)
    with pytest.raises(ConfigError, match="set exactly one of reference.responses"):
        eval_winrate.run(cfg(tmp_path, "reference.model=null"))


def test_pick_responses_takes_the_first_usable_sample():
    """q0: sample 0 failed, samples 1 and 2 ok -> sample 1; q1: only a failed sample -> that one (it is
    counted as a response failure by the stage, never judged)."""
    prompts = [Prompt(id=f"q{i}", messages=[{"role": "user", "content": "x"}]) for i in range(2)]
    rs = [Response(prompt_id="q0", sample_idx=i, text=f"s{i}", source="m", status=s)
          for i, s in ((2, "ok"), (0, "failed"), (1, "ok"))]
    rs.append(Response(prompt_id="q1", sample_idx=0, text="", source="m", status="failed"))
    picked = wr.pick_responses(prompts, rs, "r.jsonl", {"q0", "q1"})
    assert (picked["q0"].sample_idx, picked["q1"].status) == (1, "failed")
