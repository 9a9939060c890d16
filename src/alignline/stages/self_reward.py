"""``alignline self-reward``: the iterative self-reward baseline of the TSO paper, on the same prompts as
``alignline tso-loop`` and built from the same stages.

Stage s = 1..S starts from the policy v{s-1} (v0: ``model``) and, in ``<output_dir>/stage-s/``:

1. ``sample``: the policy's ``sample.n`` responses per prompt (``policy_samples/``, source ``policy-v{s-1}@v{s-1}``);
2. ``score``: an external judge ranks them (``scored/``: a reward model, or ``score.judge=evaluator``);
3. ``select strategy=best_worst`` (``pairs/``): rank 1 vs the last rank of every prompt (ties dropped, counted);
4. ``tso`` with one mini-batch (``dpo/``): DPO whose reference is the stage's starting policy v{s-1}, so the
   reference is updated every stage; its result is v{s}, the next stage's policy;
5. with ``eval_prompts``: ``eval verifiable`` of v{s} (``eval/``; v0 in ``stage-0/eval/``), and
   ``summary.json`` as in tso-loop.

Unlike ``tso-loop``: no model matrix and no human answers (the policy's own pairs only), and one reference
per stage instead of K. Top level: ``versions.json``, ``results.json`` (the same table as tso-loop's) and ``manifest.json``.
Each sub-stage skips itself when up to date, so a rerun generates and trains nothing.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from alignline.stages.common import RunDir
from alignline.stages.select import SelectConfig
from alignline.stages.tso import TSOConfig
from alignline.stages.tso_loop import (
    IterationBase,
    PairSettings,
    Stage,
    build,
    eval_config,
    judge_inputs,
    policy_configs,
    run_stages,
    settings_of,
)
from alignline.train.preference import LossSettings

DPOSettings = settings_of(
    TSOConfig, "DPOSettings",
    "Each stage's DPO run (alignline tso with one mini-batch: the reference is the stage's starting policy).",
    {"model", "output_dir", "data", "regenerate", "stop_at", "resume", "minibatches", "split_seed"},
    data=(PairSettings, Field(default_factory=PairSettings,
                              description="How the stage's pairs are cut: max_length, max_drop_fraction, max_examples.")),
    loss=(LossSettings, Field(default_factory=LossSettings,
                              description="The preference loss (default DPO, beta 0.1: the baseline's loss).")))


class SelfRewardConfig(IterationBase):
    """Configuration of ``alignline self-reward``."""

    output_dir: str = "runs/self_reward"
    """stage-s/ per stage, versions.json, results.json, manifest.json."""
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    """Each stage's training: loss (default DPO), train (default: TSO's optimiser settings), data.max_length."""


def plan(cfg: SelfRewardConfig) -> list[Stage]:
    """Every stage's sub-stage configs, validated; nothing is run or written."""
    stages, start = [], cfg.model
    for s in range(1, cfg.stages + 1):
        d = Path(cfg.output_dir) / f"stage-{s}"
        policy_sample, score = policy_configs(cfg, start, f"policy-v{s - 1}@v{s - 1}", d)
        new = str(d / "dpo" / "versions" / "v1")
        stages.append(Stage(
            index=s, start=start, new=new, dir=d, policy_sample=policy_sample, score=score,
            select=build(SelectConfig, "select", ranked=score.output_dir, mode="pairs", strategy="best_worst",
                         output_dir=str(d / "pairs")),
            train=build(TSOConfig, "dpo", **cfg.dpo.model_dump(exclude={"data"}), minibatches=1, model=start,
                        data={**cfg.dpo.data.model_dump(), "train": str(d / "pairs" / "pairs.jsonl")},
                        output_dir=str(d / "dpo")),
            eval=eval_config(cfg, new, f"v{s}", d)))
        start = new
    return stages


def run(cfg: SelfRewardConfig) -> Path:
    stages = plan(cfg)
    rd = RunDir("self_reward", cfg, cfg.output_dir, judge_inputs(cfg, stages[0].score))
    if rd.skip_if_done():
        return rd.path
    rd.start()
    return run_stages(cfg, "self-reward", stages, rd)
