"""The one training loop shared by every stage (SFT, RS, RM, DPO, TSO).

A stage hands the loop its model, a deterministic *plan* of micro-batches per epoch, a collate function,
a ``count_units`` function (trained tokens for SFT, pairs for DPO) and a ``step_fn`` that returns the
*summed* loss of a micro-batch. The loop divides by the number of units in the whole optimizer step across
micro-batches and processes, so the update does not depend on how a step is split (gradient accumulation,
data parallelism, packing). The loop never knows which loss it is running.

Under ``accelerate launch`` the loop runs data parallel (DDP) or fully sharded (FSDP2: parameters, gradients
and optimizer state split across processes, the ZeRO-3 layout); every process runs the same collectives, so a
process without a micro-batch at the tail of an epoch runs one weighted 0.

Checkpoints (``checkpoints/step-NNNNNNN``) hold safetensors weights, optimizer state (tensors in
safetensors, the rest as JSON), scheduler state, per-process RNG state and the data position, and a
``COMPLETE`` marker written last. They always hold whole (gathered) tensors, whatever the sharding (an exact
resume needs the same number of processes). ``resume=True`` continues from the newest complete checkpoint
exactly: same batches, same RNG, same optimizer moments. The marker records every file's size and sha256 and
is checked first: a damaged checkpoint is named and the one before it resumed (``checkpoint_verify``). A non-finite loss or gradient stops the run before
the optimizer step, leaving the last good checkpoint untouched.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignline.config import Section
from alignline.data.io import atomic_write_bytes, atomic_write_json
from alignline.errors import AlignlineError, TrainingDivergedError
from alignline.models import save_model
from alignline.train import telemetry as tm
from alignline.train.checkpoint_verify import COMPLETE, marker_bytes, resume_checkpoint


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
    """Write a resumable checkpoint every this many steps (null: only at the end)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep (older ones are deleted)."""
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
    cheap elementwise ops. Per such layer: about 25 KB more activation memory per token in fp32 for a
    576-wide model, and about 1/30 of the recompute's cost saved for a 30-layer model. A value at or above
    the layer count applies it to every checkpointed layer."""
    free_memory: Literal["keep", "trim", "unmap"] = "trim"
    """How a CPU process hands freed activation memory back to the OS (Linux with glibc; no effect elsewhere).
    keep: glibc's default, freed memory stays in malloc's heap (fastest, highest peak RSS). trim: malloc_trim
    after every micro-batch's backward and every 10th decoder-layer call (forward and recompute); about as fast
    as keep at ~0.4 GB less peak RSS for SmolLM2-135M at micro-batch 1 with checkpointing. unmap: allocations
    of 128 KiB and more are mmapped, so each large tensor is unmapped when freed: ~0.25 GB below trim there,
    but every tensor costs fresh page faults (~10-15 % slower steps)."""
    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Extra metric sinks (metrics.jsonl is always written)."""
    stop_after_step: int | None = None
    """Stop (after checkpointing) at this step as if interrupted; for testing resume."""


def _glibc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def free_memory_policy(model, mode: str) -> Callable[[], None]:
    """Apply ``TrainSettings.free_memory`` (see there) on a CPU process; returns what to call after each
    micro-batch's backward. A no-op on GPUs and off glibc."""
    libc = _glibc()
    if mode == "keep" or libc is None or any(p.is_cuda for p in model.parameters()):
        return lambda: None
    if mode == "unmap":
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        return lambda: None
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = [0]

    def every_tenth_layer(module, args):
        # the heap fragments as variable-length activations are freed; trimming now and then bounds it
        # without giving up the reuse of freed memory inside a layer (which unmap gives up)
        if module.training:
            calls[0] += 1
            if calls[0] % 10 == 0:
                libc.malloc_trim(0)

    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and not getattr(layer, "_alignline_trims", False):
            layer.register_forward_pre_hook(every_tenth_layer)
            layer._alignline_trims = True  # a model trained again (tso mini-batches) keeps one hook
    return lambda: libc.malloc_trim(0)


def _keep_matmul_outputs(ctx, op, *args, **kwargs):
    """Selective-checkpointing policy: keep what is expensive to recompute (matmuls, attention)."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_EXPENSIVE_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(torch.ops.aten, name)}


def enable_checkpointing(model, *, every: int = 1, selective_layers: int = 0) -> None:
    """Activation checkpointing on every ``every``-th decoder layer; the first ``selective_layers`` of those
    keep matmul and attention outputs (their recompute redoes only elementwise ops)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5 name; older: gradient_...
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    selective = functools.partial(checkpoint, use_reentrant=False, context_fn=functools.partial(
        create_selective_checkpoint_contexts, _keep_matmul_outputs))
    checkpointed = 0
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
        if layer.gradient_checkpointing:
            if checkpointed < selective_layers:
                layer._gradient_checkpointing_func = selective
            checkpointed += 1


def is_sharded(accelerator) -> bool:
    """Whether the prepared model's parameters are split across processes (FSDP)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def make_accelerator(settings: TrainSettings, out_dir: Path | None = None):
    """The run's Accelerator: DDP or FSDP2 as ``accelerate launch`` configured it, bf16 autocast on GPUs that
    support it (``settings.mixed_precision``). DeepSpeed and FSDP version 1 are refused with the alternative."""
    import os

    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    mp = settings.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True lets accelerate run several CPU processes (gloo) under torchrun / accelerate launch
    kwargs: dict[str, Any] = {"mixed_precision": mp, "cpu": not torch.cuda.is_available()}
    if settings.report_to:
        kwargs["log_with"] = list(settings.report_to)
        kwargs["project_dir"] = str(out_dir) if out_dir else None
    accelerator = Accelerator(**kwargs)
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        raise AlignlineError(
            "DeepSpeed is not supported by alignline's training loop (the loop accumulates micro-batches and "
            "writes whole-tensor checkpoints itself). For ZeRO-3-style sharding launch with FSDP2 instead: "
            "accelerate launch --config_file configs/gpu/accelerate_fsdp.yaml ...; for models that fit on each "
            "GPU, DDP: configs/gpu/accelerate_ddp.yaml")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and state.distributed_type == DistributedType.MULTI_CPU:
        # accelerate drops an FSDP request on CPU processes; torch's FSDP2 runs there (gloo), so honour it
        # (as accelerate does for GPUs: every later AcceleratorState() copies the type from PartialState)
        PartialState._shared_state["distributed_type"] = state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if is_sharded(accelerator) and state.fsdp_plugin.fsdp_version != 2:
        raise AlignlineError(
            f"FSDP version {state.fsdp_plugin.fsdp_version} is not supported; alignline trains with FSDP2: set "
            "fsdp_version: 2 in the accelerate config file (or FSDP_VERSION=2), as configs/gpu/accelerate_fsdp.yaml does")
    return accelerator


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
    """:meth:`Telemetry.summary` at the end of training (see ``alignline.train.telemetry``)."""


# --------------------------------------------------------------------------- checkpoints

def complete_checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())


def _optimizer_to_files(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, st in opt_state["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    def param_key(key: str) -> int | str:  # torch's own state dict numbers parameters; a sharded one names them
        return int(key) if key.isdigit() else key

    state: dict[int | str, dict] = {param_key(i): dict(v) for i, v in meta["state"].items()}
    for key, t in tensors.items():
        idx, name = key.rsplit(".", 1)
        state.setdefault(param_key(idx), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _tied_groups(model) -> list[list[str]]:
    """Names that share one parameter (tied embeddings); the first is the one a checkpoint stores."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def full_model_state(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole model's weights on the main process (a tied parameter once, under its first name), ``{}`` on
    the others. Every process must call it: for a sharded model it is a collective that gathers the shards."""
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_options())
    else:
        state = accelerator.unwrap_model(model).state_dict() if accelerator.is_main_process else {}
    for group in _tied_groups(accelerator.unwrap_model(model)):
        for alias in group[1:]:
            state.pop(alias, None)
    return state


def save_trained_model(accelerator, model, tokenizer, out_dir: Path) -> None:
    """Write the trained model as an HF checkpoint (LoRA merged). Every process calls it; a sharded model's
    weights are gathered to the main process, which writes."""
    state = full_model_state(accelerator, model) if is_sharded(accelerator) else None
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, out_dir, merge_lora=True, state_dict=state)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, model, optimizer, scheduler, out_dir: Path, position: dict, keep: int) -> Path:
    ckpt = out_dir / "checkpoints" / f"step-{position['step']:07d}"
    weights = full_model_state(accelerator, model)
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(model, optimizer, options=_full_options())
    else:
        optimizer_state = optimizer.state_dict() if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        if ckpt.exists():
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(ckpt / "model.safetensors"),
                  metadata={"format": "pt"})
        tensors, meta = _optimizer_to_files(optimizer_state)
        save_file(tensors, str(ckpt / "optimizer.safetensors"))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        atomic_write_json(ckpt / "optimizer.json", meta)
        atomic_write_json(ckpt / "scheduler.json", sched)
        atomic_write_json(ckpt / "position.json", position)
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(ckpt / f"rng-{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_bytes(ckpt / COMPLETE, marker_bytes(ckpt))  # written last (sizes, sha256): the checkpoint is whole
        for old in complete_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for partial in (out_dir / "checkpoints").glob("step-*"):
            if not (partial / COMPLETE).exists():
                shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


def load_checkpoint(accelerator, model, optimizer, scheduler, ckpt: Path) -> dict:
    weights = load_file(str(ckpt / "model.safetensors"))
    for group in _tied_groups(accelerator.unwrap_model(model)):
        stored = next((name for name in group if name in weights), None)
        for alias in group if stored else []:
            weights.setdefault(alias, weights[stored])
    meta = json.loads((ckpt / "optimizer.json").read_text())
    optimizer_state = _optimizer_from_files(load_file(str(ckpt / "optimizer.safetensors")), meta)
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # every process holds the whole tensors (read from the shared file) and keeps its own shard
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    else:
        accelerator.unwrap_model(model).load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
    sched = scheduler.state_dict()
    sched.update(json.loads((ckpt / "scheduler.json").read_text()))
    scheduler.load_state_dict(sched)
    rng_file = ckpt / f"rng-{accelerator.process_index}.safetensors"
    if rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((ckpt / "position.json").read_text())


# --------------------------------------------------------------------------- metrics

class MetricsLog:
    """Append-only metrics.jsonl (+ accelerate trackers); on resume, lines past the resumed step are cut."""

    def __init__(self, accelerator, path: Path, resume_step: int | None):
        self.acc, self.path = accelerator, path
        if accelerator.is_main_process:
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
                atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
        self.fh = open(path, "a") if accelerator.is_main_process else None  # noqa: SIM115 (kept open for the run)

    def log(self, record: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
        if self.acc.trackers:
            self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


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


def train(
    model: torch.nn.Module,
    *,
    accelerator,
    settings: TrainSettings,
    out_dir: Path,
    plan: Callable[[int], list[list[int]]],
    collate: Callable[[list[int]], dict[str, torch.Tensor]],
    count_units: Callable[[dict[str, torch.Tensor]], int],
    step_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int, dict[str, float]]],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    metric_keys: tuple[str, ...] = (),
    resume: bool = False,
    desc: str = "train",
    telemetry: tm.Telemetry | None = None,
    count_logits: Callable[[dict[str, torch.Tensor]], int] = tm.logit_positions,
) -> TrainResult:
    """Train ``model`` in place; see the module docstring for the contract of each callable.

    ``step_fn(model, batch)`` returns (summed loss, units, summed metrics); metrics named in
    ``metric_keys`` are reported as per-unit means over the optimizer step. ``telemetry`` (the stage's, so
    that its other phases land in the same summary) records the "train", "eval" and "checkpoint" phases and
    per-step times, memory and useful FLOPs; ``count_logits(batch)`` is the number of positions whose head
    output a batch computes (default :func:`alignline.train.telemetry.logit_positions`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = settings.grad_accum * world

    epoch_plans: dict[int, list[list[int]]] = {}

    def micro_batches(epoch: int) -> list[list[int]]:
        if epoch not in epoch_plans:
            epoch_plans.clear()
            epoch_plans[epoch] = plan(epoch)
        return epoch_plans[epoch]

    steps_per_epoch = [math.ceil(len(plan(e)) / per_step) for e in range(settings.epochs)]
    total_steps = sum(steps_per_epoch)
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    if total_steps == 0:
        raise AlignlineError("no training data: the plan has no micro-batches (check the data and max_length)")

    if settings.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        enable_checkpointing(model, every=settings.checkpoint_every, selective_layers=settings.selective_layers)
    sharded = is_sharded(accelerator)
    if sharded and hasattr(model, "peft_config"):
        raise AlignlineError("LoRA under FSDP is not supported: LoRA's trainable weights are small, so launch it "
                             "data parallel (configs/gpu/accelerate_ddp.yaml) with the frozen base in bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    after_backward = free_memory_policy(model, settings.free_memory)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=tuple(settings.adam_betas), eps=settings.adam_eps,
        # one fused kernel instead of a Python loop over ~300 tensors: ~4x faster steps on CPU
        # (FSDP swaps the parameters for sharded DTensors at prepare: the default foreach kernels take those)
        fused=None if sharded else all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None,
    )
    from transformers import get_scheduler

    warmup = settings.warmup_steps if settings.warmup_steps is not None else int(settings.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[settings.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    tel = telemetry or tm.Telemetry(accelerator.device)
    params = tel.params_of(model)  # before DDP/FSDP wrap it
    model, optimizer = accelerator.prepare(model, optimizer)

    step, start_epoch, start_in_epoch = 0, 0, 0
    resumed_from = None
    if not resume and complete_checkpoints(out_dir):
        # starting over: checkpoints of an earlier run in this directory must never be resumed later
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        accelerator.wait_for_everyone()
    if resume:
        resumed_from = resume_checkpoint(accelerator, complete_checkpoints(out_dir))  # verified; damaged: the one before
        if resumed_from is not None:
            pos = load_checkpoint(accelerator, model, optimizer, scheduler, resumed_from)
            step, start_epoch, start_in_epoch = pos["step"], pos["epoch"], pos["step_in_epoch"]
            accelerator.print(f"resuming from {resumed_from} (step {step})")
    log = MetricsLog(accelerator, out_dir / "metrics.jsonl", step if resumed_from else None)
    if settings.report_to:
        accelerator.init_trackers(out_dir.name, config=settings.model_dump(mode="json"))

    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    result = TrainResult(steps=step, stopped_early=False)
    t_start, tokens_seen, last = time.perf_counter(), 0, {}
    tel.open("train")
    if evaluate is not None and step == 0:
        # the starting point, so the run's effect on held-out data is visible
        model.eval()
        with torch.no_grad(), tel.phase("eval"):
            ev = evaluate(model)
        model.train()
        result.eval_metrics_start = ev
        log.log({"step": 0, **{f"eval/{k}": v for k, v in ev.items()}})
    model.train()
    done = step >= total_steps
    for epoch in range(start_epoch, settings.epochs):
        if done:
            break
        mbs = micro_batches(epoch)
        first = start_in_epoch if epoch == start_epoch else 0
        for s_in_epoch in range(first, steps_per_epoch[epoch]):
            group = mbs[s_in_epoch * per_step: (s_in_epoch + 1) * per_step]
            mine = group[rank::world]
            batches = [collate(ix) for ix in mine]
            units = sum(count_units(b) for b in batches)
            global_units = _all_sum(accelerator, units)
            if global_units == 0:
                raise AlignlineError(f"step {step + 1}: no trained units in the whole step (check the labels)")
            t0 = time.perf_counter()
            clock = tel.step_clock()
            loss_total, sums = 0.0, {k: 0.0 for k in metric_keys}
            step_tokens = step_logits = 0
            weights = [1.0] * len(batches)
            if not batches:  # no micro-batch here at the tail: run one weighted 0 to join the collectives
                batches, weights = [collate(group[0])], [0.0]
            for i, (batch, weight) in enumerate(zip(batches, weights)):
                last_mb = i == len(batches) - 1
                ctx = accelerator.no_sync(model) if (world > 1 and not last_mb) else _null()
                with ctx, accelerator.autocast():
                    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                    loss_sum, _, m = step_fn(model, batch)
                    clock.lap("forward")
                    # DDP and FSDP average gradients over processes, hence the factor `world`.
                    accelerator.backward(loss_sum * (weight * world / global_units))
                    after_backward()
                    clock.lap("backward")
                if weight:
                    step_tokens += tm.real_tokens(batch)
                    step_logits += count_logits(batch)
                    loss_total += float(loss_sum.detach())
                    for k in metric_keys:
                        sums[k] += float(m.get(k, 0.0))
            reduced = _all_sum_dict(accelerator, {"loss": loss_total, "tokens": step_tokens,
                                                  "logit_positions": step_logits, **sums},
                                    ["loss", "tokens", "logit_positions", *metric_keys])
            loss_value = reduced["loss"] / global_units
            grad_norm = None
            if settings.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
            if not math.isfinite(loss_value) or (grad_norm is not None and not math.isfinite(grad_norm)):
                good = complete_checkpoints(out_dir)
                log.log({"step": step + 1, "event": "non_finite", "loss": str(loss_value), "grad_norm": str(grad_norm)})
                log.close()
                bar.close()
                tel.close("train")
                raise TrainingDivergedError(
                    f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} "
                    f"({loss_value if not math.isfinite(loss_value) else grad_norm}); stopped before the update. "
                    + (f"The last good checkpoint {good[-1]} is kept; " if good else "No checkpoint was written yet; ")
                    + "lower train.lr, check the data, or use train.max_grad_norm."
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            clock.lap("optimizer")
            step += 1
            dt = time.perf_counter() - t0
            tokens_seen += int(reduced["tokens"])
            last = {"step": step, "epoch": epoch, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                    "units": global_units, "tokens": int(reduced["tokens"]),
                    "tokens_per_s": reduced["tokens"] / max(dt, 1e-9),
                    "logit_positions": int(reduced["logit_positions"]),
                    "flops": tel.count(params, int(reduced["tokens"]), int(reduced["logit_positions"]), grad=True),
                    **clock.record()}
            if grad_norm is not None:
                last["grad_norm"] = grad_norm
            for k in metric_keys:
                last[k] = reduced[k] / global_units
            if step % settings.log_every == 0 or step == total_steps:
                log.log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            finished = step >= total_steps
            if evaluate is not None and ((settings.eval_every and step % settings.eval_every == 0) or finished):
                model.eval()
                with torch.no_grad(), tel.phase("eval"):
                    ev = evaluate(model)
                model.train()
                result.eval_metrics = ev
                log.log({"step": step, **{f"eval/{k}": v for k, v in ev.items()}})
            position = {"step": step, "epoch": epoch, "step_in_epoch": s_in_epoch + 1}
            if s_in_epoch + 1 == steps_per_epoch[epoch]:
                position.update(epoch=epoch + 1, step_in_epoch=0)
            stop_now = settings.stop_after_step is not None and step >= settings.stop_after_step
            if (settings.save_every and step % settings.save_every == 0) or finished or stop_now:
                with tel.phase("checkpoint"):
                    result.checkpoint = save_checkpoint(accelerator, model, optimizer, scheduler, out_dir, position,
                                                        settings.keep_checkpoints)
            if stop_now and not finished:
                result.stopped_early = True
                done = True
                break
            if finished:
                done = True
                break
    bar.close()
    tel.add(steps=step - result.steps)
    tel.close("train")
    result.phases = tel.summary()
    log.close()
    if settings.report_to:
        accelerator.end_training()
    result.steps, result.last_metrics = step, last
    result.seconds, result.tokens = time.perf_counter() - t_start, tokens_seen
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
