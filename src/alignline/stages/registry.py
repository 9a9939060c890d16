"""The one stage table: every stage type, its config class and its ``run(cfg)``, and the one way to run it.

The CLI registers one sub-command per entry, ``alignline run`` pipelines name entries by key, and the
compositions (``tso-loop``, ``self-reward``) look their sub-stages up here; all of them run a stage through
:meth:`StageSpec.run`. A stage module is imported only when its stage is loaded, so that building the CLI
imports no model code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from alignline.data.dirlock import directory_lock
from alignline.errors import ConfigError
from alignline.stages.common import failures_recorded


@dataclass(frozen=True)
class StageSpec:
    """One stage type: its command name, its config class (``module:Class``; the module has ``run(cfg)``)."""

    name: str
    target: str
    doc: str
    resumable: bool
    group: str | None = None
    """Command group: ``eval`` for ``alignline eval NAME``; None for top-level commands."""

    @property
    def key(self) -> str:
        """The name a pipeline file uses: ``eval.bestofn`` for ``alignline eval bestofn``."""
        return f"{self.group}.{self.name}" if self.group else self.name

    @property
    def command(self) -> str:
        """As typed after ``alignline``: ``eval bestofn``."""
        return f"{self.group} {self.name}" if self.group else self.name

    def load(self) -> tuple[type[BaseModel], Callable[[Any], Path]]:
        """The config class and the stage's ``run(cfg)``; the stage module is imported now."""
        module_name, cls_name = self.target.rsplit(":", 1)
        module = importlib.import_module(module_name)
        run = getattr(module, "run", None)
        if run is None:
            raise ConfigError(f"{self.target} has no run(cfg) function")
        return getattr(module, cls_name), run

    def run(self, cfg: BaseModel) -> Path:
        """The stage's own ``run(cfg)`` (which does nothing when its run directory is up to date), holding its
        output directory's lock (another process there: an error, or a wait with --wait-lock); an error leaves
        each run it started marked "failed" with the error, not "running"."""
        _, run = self.load()
        with directory_lock(cfg.output_dir, part=getattr(cfg, "shard", None)), failures_recorded():
            return run(cfg)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("prepare", "alignline.stages.prepare:PrepareConfig",
              "Normalise raw conversations (ShareGPT or JSONL) into disjoint SFT / prompt splits.", False),
    StageSpec("sft", "alignline.stages.sft:SFTConfig",
              "Supervised fine-tuning, loss on assistant tokens (Xwin step 1).", True),
    StageSpec("select", "alignline.stages.select:SelectConfig",
              "From ranked sets: RS data (rank k) or DPO pairs (fixed rank, policy-matched, best/worst, RSO, TSO model "
              "matrix).", False),
    StageSpec("rs", "alignline.stages.rs:RSConfig",
              "Rejection-sampling fine-tuning: SFT on selected responses, loss on the last turn only.", True),
    StageSpec("dpo", "alignline.stages.dpo:DPOConfig",
              "Preference optimisation on pairs: DPO, IPO, cDPO, RSO hinge or TSO dual-clip.", True),
    StageSpec("sample", "alignline.stages.sample:SampleConfig",
              "N responses per prompt from a model or every member of a TSO model matrix (hf in process, or any "
              "OpenAI-compatible server).", False),
    StageSpec("annotate", "alignline.stages.annotate:AnnotateConfig",
              "Xwin-Pair: a judge (verifier or LLM) picks the better of two responses, why and by how much.", False),
    StageSpec("repair", "alignline.stages.repair:RepairConfig",
              "Verifier-guided repair: answers rewritten to follow their verifiable instructions -> SFT "
              "conversations and minimal-edit preference pairs.", False),
    StageSpec("rm", "alignline.stages.rm:RMConfig",
              "Reward model (Xwin-RM): SFT backbone + scalar head, Bradley-Terry loss, accuracy per rating.", True),
    StageSpec("score", "alignline.stages.score:ScoreConfig",
              "Rank each prompt's responses with a reward model (prompt computed once per prompt), or with an LLM "
              "evaluator per criterion (judge=evaluator).", False),
    StageSpec("feedback", "alignline.stages.feedback:FeedbackConfig",
              "TSO scored feedback: a judge (verifier or LLM evaluator) scores each response per criterion; "
              "human corrections replace it; a held-out split.", False),
    StageSpec("judge-sft", "alignline.stages.judge_sft:JudgeSFTConfig",
              "TSO evaluation correction: fine-tune an evaluator on scored feedback; agreement before and after.",
              True),
    StageSpec("bestofn", "alignline.stages.bestofn:BestOfNConfig",
              "Best-of-n curve: gold (verifier) score of the RM's best among n samples, and the oracle's.",
              False, "eval"),
    StageSpec("tso", "alignline.stages.tso:TSOConfig",
              "Mini-batch iterative DPO (TSO): the reference is the policy after the previous mini-batch.", True),
    StageSpec("tso-loop", "alignline.stages.tso_loop:TSOLoopConfig",
              "Multi-stage TSO: each stage samples and scores the policy, mixes model-matrix pairs with its own "
              "pairs, trains mini-batch iterative DPO and registers the new version in the matrix.", False),
    StageSpec("rl", "alignline.stages.rl:RLConfig",
              "Online RL: G samples per prompt from the current policy, verifier / reward model / judge rewards, "
              "GRPO, Dr. GRPO, RLOO, REINFORCE++ or PPO (GAE + critic), KL to a reference.", True),
    StageSpec("self-reward", "alignline.stages.self_reward:SelfRewardConfig",
              "Self-Reward baseline: each stage the policy's samples are scored by a judge, best vs worst become "
              "pairs, DPO with the stage's starting policy as reference.", False),
    StageSpec("mtbench", "alignline.stages.eval_mtbench:MTBenchConfig",
              "MT-bench: answers turn by turn (or a FastChat answer file) graded 1-10 by an LLM judge; "
              "median of repeats.", False, "eval"),
    StageSpec("winrate", "alignline.stages.eval_winrate:WinrateConfig",
              "Pairwise win rate vs a reference (LLM judge, both orders), with AlpacaEval-style length control.",
              False, "eval"),
    StageSpec("verifiable", "alignline.stages.eval_verifiable:VerifiableConfig",
              "IFEval-style accuracy (prompt/instruction level, strict/loose) on prompts with verifiable "
              "instructions.", False, "eval"),
    StageSpec("ifeval", "alignline.stages.eval_ifeval:IFEvalConfig",
              "IFEval (Zhou et al. 2023): Google's checker, strict/loose, prompt/instruction level, per type, "
              "seeded subsets, paired SEs against another run.", False, "eval"),
    StageSpec("injection", "alignline.stages.eval_injection:InjectionConfig",
              "Judge robustness: fake verdicts, forged delimiters, pleas and null answers against a pairwise judge.",
              False, "eval"),
)
"""Every stage command, in the order of ``alignline --help``; the CLI, pipelines and compositions read it."""

# Command names are unique across groups, so a pipeline may also write the bare name ("bestofn").
STAGE_BY_NAME: dict[str, StageSpec] = {s.key: s for s in STAGES} | {s.name: s for s in STAGES}
assert len({s.name for s in STAGES}) == len(STAGES), "stage command names must be unique across groups"
STAGE_BY_TARGET: dict[str, StageSpec] = {s.target: s for s in STAGES}


def stage_spec(type_name: str) -> StageSpec | None:
    """The stage a pipeline's ``stage:`` names (``eval.bestofn`` or bare ``bestofn``), or None."""
    return STAGE_BY_NAME.get(type_name)

