"""The one training loop shared by every stage (SFT, RS, RM, DPO, TSO, RL).

A stage hands the loop its model, a deterministic *plan* of micro-batches per epoch, a collate function,
a ``count_units`` function (trained tokens for SFT, pairs for DPO) and a ``step_fn`` that returns the
*summed* loss of a micro-batch. The loop divides by the number of units in the whole optimizer step across
micro-batches and processes, so the update does not depend on how a step is split (gradient accumulation,
data parallelism, packing). The loop never knows which loss it is running.

Under ``accelerate launch`` the loop runs data parallel (DDP) or fully sharded (FSDP2: parameters, gradients
and optimizer state split across processes, the ZeRO-3 layout); every process runs the same collectives, so a
process without a micro-batch at the tail of an epoch runs one weighted 0 (the Accelerator:
:mod:`alignline.train.accelerator`).

Checkpoints (:mod:`alignline.train.checkpoint`) let ``resume=True`` continue from the newest intact one
exactly: same batches, same RNG, same optimizer moments; a damaged one is named and the one before it resumed.
A non-finite loss or gradient stops the run before the optimizer step, leaving the last good checkpoint
untouched; once the stage has finished, its checkpoints are removed (``keep_checkpoints_when_done``), so the
end of training writes one only when it will be kept (or the stage asks, ``final_checkpoint``): a kill between
the last step and the stage's ``model/`` then resumes from the last periodic checkpoint. How a
CPU process frees memory and which activations it keeps: :mod:`alignline.train.memory`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from alignline import telemetry as tm
from alignline.config import Section
from alignline.errors import AlignlineError, TrainingDivergedError
from alignline.train.checkpoint import (
    complete_checkpoints,
    is_sharded,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from alignline.train.memory import enable_checkpointing, free_memory_policy
from alignline.train.metrics_log import MetricsLog
from alignline.train.steps import START, count_steps, every, position_after, steps_from


class TrainSettings(Section):
    """Optimiser, schedule and bookkeeping settings of the shared training loop."""

    lr: float = Field(2e-5, gt=0)
    """Peak learning rate (Xwin SFT: 2e-5)."""
    epochs: int = Field(3, gt=0)
    """Passes over the data (Xwin SFT: 3)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller); the schedule spans it."""
    batch_size: int = Field(8, gt=0)
    """Examples per micro-batch per process (with packing: rows of up to max_length tokens each)."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step."""
    weight_decay: float = 0.0
    """AdamW weight decay (Xwin: 0)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (Xwin: 0.9, 0.999; TSO: 0.9, 0.95)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up (decays to 0 for cosine/linear)."""
    warmup_ratio: float = 0.0
    """Fraction of steps spent warming up linearly from 0 (Xwin RM: 0.03)."""
    warmup_steps: int | None = None
    """Warm-up steps; overrides warmup_ratio when set (Xwin DPO: 100)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    seed: int = 0
    """Seed of data order, dropout and head initialisation."""
    log_every: int = 1
    """Write metrics every this many optimizer steps."""
    eval_every: int | None = None
    """Run the stage's evaluation every this many steps (and always at the end)."""
    save_every: int | None = None
    """Write a resumable checkpoint every this many steps (null: none while training; the end of training writes
    one only with keep_checkpoints_when_done, as a finished stage removes its checkpoints)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep while the stage runs (older ones are deleted)."""
    keep_checkpoints_when_done: bool = False
    """Keep checkpoints/ once the stage has finished (model/ written, manifest complete). Each checkpoint holds
    the weights and AdamW's two moments in fp32, about 3x the model (1.6 GB for a 135M model); false removes
    them, as a finished stage never resumes (its manifest lists what was removed). Ask for it to inspect the
    optimizer state or continue training by hand from the last step."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on GPUs that support it, none on CPU (fp32; bf16 is slow without native support)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (about 25 % more compute)."""
    checkpoint_every: int = Field(1, ge=1)
    """With gradient_checkpointing: recompute only every k-th decoder layer (2 keeps about half the activation
    memory at about half the recompute cost)."""
    selective_layers: int = Field(0, ge=0)
    """With gradient_checkpointing: this many of the checkpointed decoder layers (the first ones) also keep
    their matmul and attention outputs (selective activation checkpointing), so their recompute redoes only
    cheap elementwise ops: a little more activation memory per layer for a share of the recompute saved. A
    value at or above the layer count applies it to every checkpointed layer."""
    free_memory: Literal["keep", "trim", "unmap"] = "trim"
    """How a CPU process hands freed activation memory back to the OS (Linux with glibc; no effect elsewhere).
    keep: glibc's default, freed memory stays in malloc's heap (fastest, highest peak RSS). trim: malloc_trim
    after every micro-batch's backward and every 10th decoder-layer call (forward and recompute): about as fast
    as keep at a lower peak RSS. unmap: allocations of 128 KiB and more are mmapped, so each large tensor is
    unmapped when freed: the lowest peak RSS, but every tensor costs fresh page faults (slower steps).
    Measurements: docs/benchmarks.md, "Memory policy notes"."""
    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Extra metric sinks (metrics.jsonl is always written)."""
    stop_after_step: int | None = None
    """Stop (after checkpointing) at this step as if interrupted; for testing resume."""


@dataclass
class TrainResult:
    steps: int
    stopped_early: bool
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics_start: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    seconds: float = 0.0
    tokens: int = 0
    phases: dict[str, Any] = field(default_factory=dict)
    """:meth:`Telemetry.summary` at the end of training (see ``alignline.telemetry``)."""


# --------------------------------------------------------------------------- the loop

def _all_sum(accelerator, value: float | int) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="sum").item())


def _all_sum_dict(accelerator, values: dict[str, float], keys: list[str]) -> dict[str, float]:
    vec = torch.tensor([float(values.get(k, 0.0)) for k in keys], device=accelerator.device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="sum")
    return dict(zip(keys, vec.tolist()))


@dataclass
class _Stage:
    """The callables a stage hands :func:`train` (see the module docstring)."""

    plan: Callable[[int], list[list[Any]]]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    count_units: Callable[[dict[str, torch.Tensor]], int]
    step_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int, dict[str, float]]]
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None
    metric_keys: tuple[str, ...]
    count_logits: Callable[[dict[str, torch.Tensor]], int]
    epoch_start: Callable[[int], None] | None


@dataclass
class _Run:
    """What the steps of one :func:`train` call share."""

    accelerator: Any
    settings: TrainSettings
    out_dir: Path
    stage: _Stage
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tel: tm.Telemetry
    params: tuple[int, int]
    """(body, head) parameter counts of the unwrapped model, for useful FLOPs."""
    after_backward: Callable[[], None]
    log: MetricsLog | None = None
    bar: Any = None


def _make_optimizer(model: torch.nn.Module, settings: TrainSettings, sharded: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with no weight decay on biases and norms (ndim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=tuple(settings.adam_betas), eps=settings.adam_eps,
        # one fused kernel instead of a Python loop over ~300 tensors: ~4x faster steps on CPU
        # (FSDP swaps the parameters for sharded DTensors at prepare: the default foreach kernels take those)
        fused=None if sharded else all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None,
    )


def _make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int):
    from transformers import get_scheduler

    warmup = settings.warmup_steps if settings.warmup_steps is not None else int(settings.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[settings.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _set_up(model, accelerator, settings: TrainSettings, out_dir: Path, stage: _Stage, total_steps: int,
            telemetry: tm.Telemetry | None) -> _Run:
    """Memory policy, optimizer and schedule, then the model and optimizer prepared for DDP / FSDP (the memory
    hooks and parameter counts go on the unwrapped model, before the wrap)."""
    if settings.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        enable_checkpointing(model, every=settings.checkpoint_every, selective_layers=settings.selective_layers)
    sharded = is_sharded(accelerator)
    if sharded and hasattr(model, "peft_config"):
        raise AlignlineError("LoRA under FSDP is not supported: LoRA's trainable weights are small, so launch it "
                             "data parallel (configs/gpu/accelerate_ddp.yaml) with the frozen base in bf16")
    after_backward = free_memory_policy(model, settings.free_memory)
    optimizer = _make_optimizer(model, settings, sharded)
    scheduler = _make_scheduler(optimizer, settings, total_steps)
    tel = telemetry or tm.Telemetry(accelerator.device)
    params = tel.params_of(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(accelerator, settings, out_dir, stage, model, optimizer, scheduler, tel, params, after_backward)


def _resume_or_clear(run: _Run, resume: bool) -> tuple[dict[str, int], bool]:
    """Where training starts, and whether that is a resumed checkpoint. Resuming takes the newest intact
    checkpoint; starting over deletes an earlier run's checkpoints, so they are never resumed later."""
    acc, out_dir = run.accelerator, run.out_dir
    if not resume:
        if complete_checkpoints(out_dir):
            acc.wait_for_everyone()
            if acc.is_main_process:
                shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
            acc.wait_for_everyone()
        return dict(START), False
    ckpt = resume_checkpoint(acc, complete_checkpoints(out_dir))  # verified; damaged: the one before
    if ckpt is None:
        return dict(START), False
    position = load_checkpoint(acc, run.model, run.optimizer, run.scheduler, ckpt)
    acc.print(f"resuming from {ckpt} (step {position['step']})")
    return position, True


def _forward_backward(run: _Run, group: list[list[Any]], batches: list[dict], global_units: float,
                      clock: tm.StepClock) -> dict[str, float]:
    """Forward and backward of this process's micro-batches, each loss scaled so that the gradients add up to
    the per-unit mean over the whole step; returns the step's sums over all processes (loss, tokens, logit
    positions, the stage's metrics)."""
    acc, stage, world = run.accelerator, run.stage, run.accelerator.num_processes
    loss_total, sums = 0.0, {k: 0.0 for k in stage.metric_keys}
    step_tokens = step_logits = 0
    weights = [1.0] * len(batches)
    if not batches:  # no micro-batch here at the tail: run one weighted 0 to join the collectives
        batches, weights = [stage.collate(group[0])], [0.0]
    for i, (batch, weight) in enumerate(zip(batches, weights)):
        last_mb = i == len(batches) - 1
        ctx = acc.no_sync(run.model) if (world > 1 and not last_mb) else contextlib.nullcontext()
        with ctx, acc.autocast():
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            loss_sum, _, m = stage.step_fn(run.model, batch)
            clock.lap("forward")
            # DDP and FSDP average gradients over processes, hence the factor `world`.
            acc.backward(loss_sum * (weight * world / global_units))
            run.after_backward()
            clock.lap("backward")
        if weight:
            step_tokens += tm.real_tokens(batch)
            step_logits += stage.count_logits(batch)
            loss_total += float(loss_sum.detach())
            for k in stage.metric_keys:
                sums[k] += float(m.get(k, 0.0))
    return _all_sum_dict(acc, {"loss": loss_total, "tokens": step_tokens, "logit_positions": step_logits, **sums},
                         ["loss", "tokens", "logit_positions", *stage.metric_keys])


def _clip_gradients(run: _Run) -> float | None:
    """The global gradient norm before clipping (None when clipping is off)."""
    if run.settings.max_grad_norm is None:
        return None
    norm = run.accelerator.clip_grad_norm_(run.model.parameters(), run.settings.max_grad_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


def _stop_if_diverged(run: _Run, step: int, loss_value: float, grad_norm: float | None) -> None:
    """Raise :class:`TrainingDivergedError` before the update of ``step`` when its loss or gradient norm is
    not finite, after logging the event and closing the run's sinks."""
    if math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    good = complete_checkpoints(run.out_dir)
    run.log.log({"step": step, "event": "non_finite", "loss": str(loss_value), "grad_norm": str(grad_norm)})
    run.log.close()
    run.bar.close()
    run.tel.close("train")
    raise TrainingDivergedError(
        f"step {step}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} "
        f"({loss_value if not math.isfinite(loss_value) else grad_norm}); stopped before the update. "
        + (f"The last good checkpoint {good[-1]} is kept; " if good else "No checkpoint was written yet; ")
        + "lower train.lr, check the data, or use train.max_grad_norm."
    )


def _run_step(run: _Run, group: list[list[Any]], step: int, epoch: int) -> dict[str, Any]:
    """Optimizer step ``step + 1`` over ``group`` (its micro-batches across processes, this process taking
    every ``world``-th); returns the step's metrics record."""
    acc, stage = run.accelerator, run.stage
    batches = [stage.collate(ix) for ix in group[acc.process_index::acc.num_processes]]
    global_units = _all_sum(acc, sum(stage.count_units(b) for b in batches))
    if global_units == 0:
        raise AlignlineError(f"step {step + 1}: no trained units in the whole step (check the labels)")
    t0 = time.perf_counter()
    clock = run.tel.step_clock()
    sums = _forward_backward(run, group, batches, global_units, clock)
    loss_value = sums["loss"] / global_units
    grad_norm = _clip_gradients(run)
    _stop_if_diverged(run, step + 1, loss_value, grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    seconds = time.perf_counter() - t0
    tokens, positions = int(sums["tokens"]), int(sums["logit_positions"])
    record = {"step": step + 1, "epoch": epoch, "loss": loss_value, "lr": run.scheduler.get_last_lr()[0],
              "units": global_units, "tokens": tokens, "tokens_per_s": sums["tokens"] / max(seconds, 1e-9),
              "logit_positions": positions, "flops": run.tel.count(run.params, tokens, positions, grad=True),
              **clock.record()}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    for k in stage.metric_keys:
        record[k] = sums[k] / global_units
    return record


def _evaluate(run: _Run, step: int) -> dict[str, float]:
    """The stage's evaluation at ``step`` (no gradients, eval mode), logged as ``eval/<name>``."""
    run.model.eval()
    with torch.no_grad(), run.tel.phase("eval"):
        metrics = run.stage.evaluate(run.model)
    run.model.train()
    run.log.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
    return metrics


def _save(run: _Run, position: dict[str, int]) -> Path:
    with run.tel.phase("checkpoint"):
        return save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler, run.out_dir, position,
                               run.settings.keep_checkpoints)


def _open_sinks(run: _Run, resumed: bool, step: int, total_steps: int, desc: str) -> None:
    """metrics.jsonl (cut back to ``step`` when resumed), the accelerate trackers and the progress bar."""
    acc, settings = run.accelerator, run.settings
    run.log = MetricsLog(acc, run.out_dir / "metrics.jsonl", step if resumed else None)
    if settings.report_to:
        acc.init_trackers(run.out_dir.name, config=settings.model_dump(mode="json"))
    run.bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not acc.is_local_main_process,
                   dynamic_ncols=True)


def _report(run: _Run, record: dict[str, Any], total_steps: int) -> None:
    step = record["step"]
    if step % run.settings.log_every == 0 or step == total_steps:
        run.log.log(record)
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")


def _close_sinks(run: _Run, result: TrainResult, step: int) -> None:
    run.bar.close()
    run.tel.add(steps=step - result.steps)
    run.tel.close("train")
    result.phases = run.tel.summary()
    run.log.close()
    if run.settings.report_to:
        run.accelerator.end_training()


def _run_steps(run: _Run, result: TrainResult, position: dict[str, int], steps_per_epoch: list[int],
               total_steps: int, save_at_end: bool) -> tuple[int, int, dict[str, Any]]:
    """The optimizer steps from ``position`` to the end (or ``stop_after_step``), each reported, evaluated and
    checkpointed as the settings ask; returns (the last step, the tokens trained, its metrics record)."""
    step, tokens_seen, last = position["step"], 0, {}
    per_step = run.settings.grad_accum * run.accelerator.num_processes
    for epoch, index, group in steps_from(run.stage.plan, steps_per_epoch, per_step, position, run.stage.epoch_start):
        last = _run_step(run, group, step, epoch)
        step = last["step"]
        tokens_seen += last["tokens"]
        _report(run, last, total_steps)
        if _after_step(run, result, step, total_steps, save_at_end,
                       position_after(step, epoch, index, steps_per_epoch[epoch])):
            break
    return step, tokens_seen, last


def _after_step(run: _Run, result: TrainResult, step: int, total_steps: int, save_at_end: bool,
                position: dict[str, int]) -> bool:
    """The evaluation and checkpoint due after ``step`` (``position``: where a resume would continue); whether
    training stops there (finished, or ``stop_after_step``: then ``result.stopped_early``)."""
    settings = run.settings
    finished = step >= total_steps
    if run.stage.evaluate is not None and (every(settings.eval_every, step) or finished):
        result.eval_metrics = _evaluate(run, step)
    stop_now = settings.stop_after_step is not None and step >= settings.stop_after_step
    if every(settings.save_every, step) or (finished and save_at_end) or stop_now:
        result.checkpoint = _save(run, position)
    if finished or stop_now:
        result.stopped_early = not finished
        return True
    return False


def train(
    model: torch.nn.Module,
    *,
    accelerator,
    settings: TrainSettings,
    out_dir: Path,
    plan: Callable[[int], list[list[Any]]],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    count_units: Callable[[dict[str, torch.Tensor]], int],
    step_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int, dict[str, float]]],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    metric_keys: tuple[str, ...] = (),
    resume: bool = False,
    desc: str = "train",
    telemetry: tm.Telemetry | None = None,
    count_logits: Callable[[dict[str, torch.Tensor]], int] = tm.logit_positions,
    final_checkpoint: bool = False,
    epoch_start: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place; see the module docstring for the contract of each callable.

    ``step_fn(model, batch)`` returns (summed loss, units, summed metrics); metrics named in
    ``metric_keys`` are reported as per-unit means over the optimizer step. ``telemetry`` (the stage's, so
    that its other phases land in the same summary) records the "train", "eval" and "checkpoint" phases and
    per-step times, memory and useful FLOPs; ``count_logits(batch)`` is the number of positions whose head
    output a batch computes (default :func:`alignline.telemetry.logit_positions`). The last step is
    checkpointed only with ``settings.keep_checkpoints_when_done`` or ``final_checkpoint`` (a stage that resumes
    a later part from it, as tso's mini-batches do): writing the weights and both AdamW moments for a stage that
    deletes them once ``model/`` is saved costs seconds and disk for nothing. ``epoch_start(epoch)`` runs before
    the first step of each epoch that runs (rl makes the epoch's rollout there).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    per_step = settings.grad_accum * accelerator.num_processes
    steps_per_epoch, total_steps = count_steps(plan, settings.epochs, settings.max_steps, per_step)
    stage = _Stage(plan, collate, count_units, step_fn, evaluate, metric_keys, count_logits, epoch_start)
    run = _set_up(model, accelerator, settings, out_dir, stage, total_steps, telemetry)
    position, resumed = _resume_or_clear(run, resume)
    step = position["step"]
    _open_sinks(run, resumed, step, total_steps, desc)
    result = TrainResult(steps=step, stopped_early=False)
    save_at_end = final_checkpoint or settings.keep_checkpoints_when_done
    t_start, tokens_seen, last = time.perf_counter(), 0, {}
    run.tel.open("train")
    if evaluate is not None and step == 0:  # the starting point, so the run's effect on held-out data is visible
        result.eval_metrics_start = _evaluate(run, 0)
    run.model.train()
    if step < total_steps:  # a run resumed from its final checkpoint has no step left
        step, tokens_seen, last = _run_steps(run, result, position, steps_per_epoch, total_steps, save_at_end)
    _close_sinks(run, result, step)
    result.steps, result.last_metrics = step, last
    result.seconds, result.tokens = time.perf_counter() - t_start, tokens_seen
    return result
