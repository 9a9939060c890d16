"""alignline: a complete LLM alignment pipeline (Xwin-LM and TSO), as a command line and from Python.

From Python (docs/guide.md, "Python API")::

    import alignline

    result = alignline.run(alignline.SFTConfig(model="...", data={"train": "convs.jsonl"}))
    result.output_dir, result.manifest, result.metrics
    result = alignline.run("dpo", "dpo.yaml", overrides=["train.lr=1e-6"])
    pipeline = alignline.run_pipeline("configs/demo/pipeline.yaml", overrides=["output_root=runs/mine"])

Every name here is loaded on first use, so ``import alignline`` stays cheap (no torch, no transformers):

* ``run``, ``run_pipeline``, ``stage_names``, ``RunResult``, ``PipelineRun``, ``final_metrics``: from
  :mod:`alignline.api` (pydantic, PyYAML and the stage table; no torch);
* ``AlignlineError``, ``ConfigError``, ``DataError``, ``ModelError``: from :mod:`alignline.errors`;
* each stage's config class (``SFTConfig``, ``DPOConfig``, ``RMConfig`` ... one per stage, see
  :data:`CONFIGS`): from its stage module, which imports torch and transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("run", "run_pipeline", "stage_names", "RunResult", "PipelineRun", "final_metrics")
_ERRORS = ("AlignlineError", "ConfigError", "DataError", "ModelError")
CONFIGS = {
    "PrepareConfig": "prepare", "SFTConfig": "sft", "SelectConfig": "select", "RSConfig": "rs",
    "DPOConfig": "dpo", "SampleConfig": "sample", "AnnotateConfig": "annotate", "RepairConfig": "repair",
    "RMConfig": "rm", "ScoreConfig": "score", "FeedbackConfig": "feedback", "JudgeSFTConfig": "judge-sft",
    "BestOfNConfig": "eval.bestofn", "TSOConfig": "tso", "TSOLoopConfig": "tso-loop", "RLConfig": "rl",
    "SelfRewardConfig": "self-reward", "MTBenchConfig": "eval.mtbench", "WinrateConfig": "eval.winrate",
    "VerifiableConfig": "eval.verifiable", "IFEvalConfig": "eval.ifeval", "InjectionConfig": "eval.injection",
}
"""Each stage config class offered here -> its stage (tests check it against the stage table)."""

__all__ = ["CONFIGS", "__version__", *_API, *_ERRORS, *CONFIGS]


def __getattr__(name: str) -> Any:
    if name in _API:
        from alignline import api

        value = getattr(api, name)
    elif name in _ERRORS:
        from alignline import errors

        value = getattr(errors, name)
    elif name in CONFIGS:
        from alignline.stages.registry import STAGE_BY_NAME

        value, _ = STAGE_BY_NAME[CONFIGS[name]].load()
    else:
        raise AttributeError(f"module 'alignline' has no attribute '{name}'")
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
