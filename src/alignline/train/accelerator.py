"""The run's Accelerator (``accelerate``): DDP or FSDP2 as ``accelerate launch`` configured it, and what the
training loop refuses (DeepSpeed, FSDP version 1) with the alternative to use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignline.errors import AlignlineError
from alignline.train.checkpoint import is_sharded

if TYPE_CHECKING:
    from alignline.train.loop import TrainSettings


def make_accelerator(settings: TrainSettings, out_dir: Path | None = None):
    """The run's Accelerator: DDP or FSDP2 as ``accelerate launch`` configured it, bf16 autocast on GPUs that
    support it (``settings.mixed_precision``). DeepSpeed and FSDP version 1 are refused with the alternative."""
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
