"""The shipped pipeline files validate (every stage's settings, references, ``extends:`` chains), as
``alignline run FILE --dry-run`` does, so a settings change elsewhere cannot leave one broken unnoticed; and
the TSO Table 2 baselines compare like with like (one starting policy, one prompt set, one sample budget,
one evaluation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignline.pipeline import load_pipeline, run_pipeline
from alignline.stages.eval_ifeval import IFEvalConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _pipeline_files(folder: str) -> list[str]:
    """The pipeline files of ``configs/FOLDER``: those with ``stages`` or ``extends`` (a model-matrix file beside
    them has neither)."""
    return sorted(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / folder).glob("*.yaml")
                  if {"stages", "extends"} & set(yaml.safe_load(p.read_text()) or {}))


PIPELINES = [*_pipeline_files("demo"), *_pipeline_files("paper"), *_pipeline_files("experiments")]


@pytest.mark.parametrize("name", PIPELINES)
def test_shipped_pipeline_validates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output roots are relative to the working directory: nothing exists there
    plan = load_pipeline(CONFIGS / name)
    assert plan.stages and len({s.output_dir for s in plan.stages}) == len(plan.stages)


def test_demo_ifeval_compares_the_final_policy_with_sft_on_one_prompt_set(tmp_path, monkeypatch):
    """configs/demo/ifeval.yaml adds IFEval to the demo's own stages (same output_root, so they are reused): every
    policy on the same seeded prompts with the same greedy settings, SFT's row first and the final policy's last
    (the summary compares the last row with the first), each other row paired with SFT's."""
    monkeypatch.chdir(tmp_path)
    demo, plan = load_pipeline(CONFIGS / "demo/pipeline.yaml"), load_pipeline(CONFIGS / "demo/ifeval.yaml")
    assert [(s.name, s.output_dir) for s in plan.stages[: len(demo.stages)]] == \
        [(s.name, s.output_dir) for s in demo.stages]
    st = {s.name: s for s in plan.stages}
    evals = [s for s in plan.stages if isinstance(s.cfg, IFEvalConfig)]
    assert [s.name for s in evals] == ["ifeval_sft", "ifeval_imported", "ifeval_rl"]
    assert evals[0].cfg.model == f"{st['sft'].output_dir}/model"
    assert evals[-1].cfg.model == f"{st['rl'].output_dir}/model"  # the final policy
    shared = {e.name: e.cfg.model_dump(exclude={"model", "name", "compare_to", "output_dir"}) for e in evals}
    assert all(v == shared["ifeval_sft"] for v in shared.values())
    assert shared["ifeval_sft"]["max_prompts"] >= 150 and shared["ifeval_sft"]["sampling"]["temperature"] == 0
    assert all(e.cfg.compare_to == evals[0].output_dir for e in evals[1:])


METHODS = {"t2_dpo": "dpo", "t2_ipo": "ipo", "t2_cdpo": "cdpo", "t2_rso": "hinge", "t2_tso": "dual_clip"}


def test_tso_table2_baselines_compare_like_with_like(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = run_pipeline(CONFIGS / "paper/tso_table2_baselines.yaml", dry_run=True)
    assert "t2_self_reward" in capsys.readouterr().out
    assert result.ok and {r.status for r in result.results} == {"planned"}
    st = {s.name: s for s in result.plan.stages}
    cfg = {name: s.cfg for name, s in st.items()}
    sft = f"{st['sft'].output_dir}/model"
    prompts = f"{st['prepare'].output_dir}/bestofn.jsonl"

    # one starting policy and the loss / estimator each method is named for
    trained = [*METHODS, "t2_ppo", "t2_self_reward"]
    assert all(cfg[m].model == sft for m in trained)
    assert {m: cfg[m].loss.type for m in METHODS} == METHODS
    assert cfg["pairs_rso"].strategy == "rso" and cfg["t2_rso"].data.train.startswith(st["pairs_rso"].output_dir)
    assert cfg["t2_ppo"].loss.estimator == "gae" and cfg["t2_self_reward"].dpo.loss.type == "dpo"

    # one prompt set and one sample budget: best-of-N ranked sets = PPO's rollouts = Self-Reward's samples
    n_prompts = cfg["prepare"].splits["bestofn"].max_records
    assert cfg["sample_bon"].prompts == cfg["t2_ppo"].prompts == cfg["t2_self_reward"].prompts == prompts
    budget = n_prompts * cfg["sample_bon"].n
    ppo, sr = cfg["t2_ppo"], cfg["t2_self_reward"]
    assert ppo.iterations * ppo.rollout.prompts * ppo.rollout.group_size == budget
    assert sr.stages * n_prompts * sr.sample.n == budget
    rm = f"{st['rm'].output_dir}/model"
    assert ppo.reward[0].model == ppo.ppo.critic == sr.score.reward_model == cfg["score_bon"].reward_model == rm

    # one evaluation: the same settings (prompts, n, seeds) for SFT and every method, of the method's final policy
    finals = {"t2_tso": f"versions/v{cfg['t2_tso'].minibatches}",
              "t2_self_reward": f"stage-{sr.stages}/dpo/versions/v1"}
    evals = {"sft": "eval_sft", **{m: f"eval_{m}" for m in trained}}
    same = {name: cfg[e].model_dump(exclude={"model", "output_dir"}) for name, e in evals.items()}
    assert all(v == same["sft"] for v in same.values())
    assert same["sft"]["n"] == 1 and same["sft"]["prompts"] == f"{st['prepare'].output_dir}/eval.jsonl"
    for m in trained:
        assert cfg[f"eval_{m}"].model == f"{st[m].output_dir}/{finals.get(m, 'model')}"
        verify = cfg[f"verify_{m}"]
        assert verify.model.responses == f"{st[f'eval_{m}'].output_dir}/samples"
        assert verify.prompts == cfg["verify_sft"].prompts
