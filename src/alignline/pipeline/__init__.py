"""``alignline run PIPELINE.yaml``: several stages in order, each one's outputs feeding the next.

A pipeline file::

    name: xwin-small                  # optional; default: the file name without .yaml
    output_root: runs/xwin-small      # optional; default runs/<name> (relative to the working directory)
    vars:                             # optional; ${NAME} anywhere in a string value
      base: smollm2-135m-instruct
    stages:
      - name: sft                     # unique; letters, digits, _ and -
        stage: sft                    # a stage type as on the command line: sft, dpo, eval.bestofn (or bestofn)
        config: configs/demo/sft.yaml # a stage YAML (relative to this file), an inline mapping, or a list of both
        overrides: {model: "${base}", train.lr: 1e-5}   # dotted keys, applied after config
      - name: dpo
        stage: dpo
        config: {data: {train: data/pairs.jsonl}}
        overrides: {model: "${sft}/model"}  # ${sft}: the sft stage's output_dir

``${stage_name}`` is that (earlier) stage's output_dir. A stage's output_dir is ``<output_root>/<name>``
unless the pipeline file or the command line sets it (an ``output_dir`` inside a referenced stage YAML is
replaced, so that a stage YAML can be reused by several pipelines without them writing into one directory).
Paths inside stage settings are relative to the working directory, as with the single-stage commands.

Everything is resolved and validated (stage types, names, references, every stage's settings) before any
stage runs. Each stage then runs through its own ``run(cfg)``, which does nothing when its manifest records
the same config and the same input fingerprints; inputs are fingerprinted by content, so a stage reruns when
the content of an upstream output it reads changed, not merely because the upstream stage ran again.
An interrupted stage resumes where it stopped (training from its newest checkpoint, sample/score/annotate from
their shards); a stage redone because its settings or inputs changed starts afresh (its RunDir sees that the
directory holds a run of other settings: old checkpoints and shards are not reused).
The results go to ``<output_root>/pipeline.json``, and ``report.html`` is built from the output root; the
terminal gets the policy progression (:mod:`alignline.report.progression`), the report's path, the wall time
and the disk used, in at most 100 columns.

Modules: :mod:`~alignline.pipeline.spec` (the file's schema, the plan, ``${name}`` interpolation),
:mod:`~alignline.pipeline.loading` (YAML, ``extends``, overrides, validation: :func:`load_pipeline`),
:mod:`~alignline.pipeline.checks` (warnings that let the plan run: a held-out evaluation too small),
:mod:`~alignline.pipeline.running` (up-to-date checks, running, pipeline.json, report) and
:mod:`~alignline.pipeline.summary` (the end-of-run summary). The stage types are those of the one stage table,
:mod:`alignline.stages.registry`.
"""

from alignline.pipeline.loading import check_dirs, load_pipeline, read_pipeline_mapping, split_overrides
from alignline.pipeline.running import (
    FINGERPRINT_IGNORED,
    RESUME_IGNORED,
    PipelineResult,
    StageResult,
    _changed_settings,
    predict,
    print_plan,
    print_summary,
    run_pipeline,
)
from alignline.pipeline.spec import NAME_PATTERN, RESERVED, PipelineFile, PipelineStage, Plan, PlannedStage
from alignline.stages.registry import STAGES, StageSpec, stage_spec

__all__ = [
    "FINGERPRINT_IGNORED", "NAME_PATTERN", "RESERVED", "RESUME_IGNORED", "STAGES", "PipelineFile", "PipelineResult",
    "PipelineStage", "Plan", "PlannedStage", "StageResult", "StageSpec", "_changed_settings", "check_dirs",
    "load_pipeline", "predict", "print_plan", "print_summary", "read_pipeline_mapping", "run_pipeline",
    "split_overrides", "stage_spec",
]
