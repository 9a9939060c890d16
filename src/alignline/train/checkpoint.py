"""Checkpoint files of the training loop: writing, proving whole, choosing one to resume, reading back.

A checkpoint is a directory ``checkpoints/step-NNNNNNN/`` with ``model.safetensors``, the optimizer state
(``optimizer.safetensors`` for its tensors, ``optimizer.json`` for the rest), ``scheduler.json``, one
``rng-<rank>.safetensors`` per process, ``position.json`` (step, epoch, step within epoch) and the ``COMPLETE``
marker, written last, which lists every file's size and sha256. No pickle is written or read. Tensors are
always whole (gathered), whatever the sharding, so an exact resume needs the same number of processes.

Before resuming, :func:`resume_checkpoint` checks the newest complete checkpoint against its marker; a file that
is missing, cut or changed is named, the checkpoint is moved aside to ``checkpoints/damaged-step-NNNNNNN`` (so
retention never keeps it over a good one) and the previous complete checkpoint is tried, down to none (a fresh
start). Resuming from an older checkpoint replays the same steps, so the result equals an uninterrupted run. A
marker written before checksums were recorded is trusted.

Checkpoints exist while a stage runs: once it has finished (final model written, manifest complete) it never
resumes, so :func:`finished_checkpoints` lists them for its manifest's ``dropped`` field and
:func:`remove_dropped` deletes them, unless ``train.keep_checkpoints_when_done`` (``RunDir.finish``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignline.data.io import atomic_write_bytes, atomic_write_json, fingerprint
from alignline.errors import on_disk_full
from alignline.models import save_model
from alignline.models.card import CardFacts

COMPLETE = "COMPLETE"
"""The marker written last into a checkpoint directory: its files' sizes and sha256 (JSON)."""
DAMAGED_PREFIX = "damaged-"


def is_sharded(accelerator) -> bool:
    """Whether the prepared model's parameters are split across processes (FSDP)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


# --------------------------------------------------------------------------- state as files

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


def _full_optimizer_state(accelerator, model, optimizer) -> dict:
    """The whole optimizer state on the main process, ``{}`` on the others (a collective when sharded)."""
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_options())
    return optimizer.state_dict() if accelerator.is_main_process else {}


def save_trained_model(accelerator, model, tokenizer, out_dir: Path, *, merge_lora: bool = True,
                       card: CardFacts | None = None) -> None:
    """Write the trained model as an HF checkpoint (LoRA merged unless ``merge_lora`` is false: then the
    adapters alone) with its model card (``card``: :func:`alignline.models.save_model`). Every process calls
    it; a sharded model's weights are gathered to the main process, which writes."""
    state = full_model_state(accelerator, model) if is_sharded(accelerator) else None
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, out_dir, merge_lora=merge_lora, state_dict=state,
                   card=card)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- writing

def complete_checkpoints(out_dir: Path) -> list[Path]:
    """The checkpoints under ``out_dir`` whose marker was written, oldest first."""
    root = out_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())


def marker_bytes(ckpt: Path) -> bytes:
    """The ``COMPLETE`` marker's content for the files now in ``ckpt`` (``fingerprint``: a file's sha256)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": fingerprint(p)}
             for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != COMPLETE and not p.name.startswith(".")}
    return (json.dumps({"files": files}, indent=2) + "\n").encode()


def _write_shared_files(ckpt: Path, weights: dict, optimizer_state: dict, scheduler, position: dict) -> None:
    """The main process's part: weights, optimizer, scheduler and position (``ckpt`` replaced if present)."""
    if ckpt.exists():
        shutil.rmtree(ckpt)
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    tensors, meta = _optimizer_to_files(optimizer_state)
    needed = sum(t.numel() * t.element_size() for t in [*weights.values(), *tensors.values()])
    with _disk_full_removes(ckpt, "weights and optimizer state", needed):
        ckpt.mkdir(parents=True)
        save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        save_file(tensors, str(ckpt / "optimizer.safetensors"))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        atomic_write_json(ckpt / "optimizer.json", meta)
        atomic_write_json(ckpt / "scheduler.json", sched)
        atomic_write_json(ckpt / "position.json", position)


def _disk_full_removes(ckpt: Path, what: str, needed: int):
    """A full disk while writing ``ckpt``: the partial checkpoint is removed (the previous ones stay, and resume)
    and the error names the checkpoint, what was written and the bytes it needs."""
    return on_disk_full(ckpt.parent, f"checkpoint {ckpt.name} ({what})", needed,
                        cleanup=lambda: shutil.rmtree(ckpt, ignore_errors=True))


def _seal_and_prune(ckpt: Path, out_dir: Path, keep: int) -> None:
    """Write ``ckpt``'s marker, then delete all but the ``keep`` newest complete checkpoints and any partial one."""
    atomic_write_bytes(ckpt / COMPLETE, marker_bytes(ckpt))  # written last (sizes, sha256): the checkpoint is whole
    for old in complete_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for partial in (out_dir / "checkpoints").glob("step-*"):
        if not (partial / COMPLETE).exists():
            shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(accelerator, model, optimizer, scheduler, out_dir: Path, position: dict, keep: int) -> Path:
    """Write ``checkpoints/step-NNNNNNN`` for ``position`` and keep the ``keep`` newest. Every process calls it:
    the main process writes the shared files and the marker, each process its own RNG state."""
    ckpt = out_dir / "checkpoints" / f"step-{position['step']:07d}"
    weights = full_model_state(accelerator, model)
    optimizer_state = _full_optimizer_state(accelerator, model, optimizer)
    if accelerator.is_main_process:
        _write_shared_files(ckpt, weights, optimizer_state, scheduler, position)
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with _disk_full_removes(ckpt, "RNG state", sum(t.numel() for t in rng.values())):
        save_file(rng, str(ckpt / f"rng-{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _disk_full_removes(ckpt, COMPLETE + " marker", 0):
            _seal_and_prune(ckpt, out_dir, keep)
    accelerator.wait_for_everyone()
    return ckpt


# --------------------------------------------------------------------------- verifying

def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with ``ckpt`` (naming the damaged file), or None when every recorded file is there with
    its recorded size and sha256."""
    try:
        recorded = json.loads((ckpt / COMPLETE).read_text())["files"]
    except (OSError, UnicodeDecodeError):
        return f"its {COMPLETE} marker cannot be read"
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a marker from before checksums were recorded: trusted, as then
    for name, want in recorded.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is damaged: {size:,} bytes, {want['size']:,} when it was written"
        if fingerprint(path) != want["sha256"]:
            return f"{name} is damaged: its sha256 differs from the one recorded when it was written"
    return None


def newest_intact(ckpts: list[Path], say: Callable[[str], object] = print) -> Path | None:
    """The newest of ``ckpts`` (sorted oldest first) that passes :func:`checkpoint_problem`; each damaged one
    newer than it is named and moved aside."""
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
        shutil.rmtree(aside, ignore_errors=True)
        ckpt.rename(aside)
        say(f"checkpoint {ckpt} cannot be resumed: {problem}. Moved it to {aside}; "
            "falling back to the previous complete checkpoint" + ("" if ckpt != ckpts[0] else " (none: starting over)"))
    return None


def resume_checkpoint(accelerator, ckpts: list[Path]) -> Path | None:
    """The checkpoint every process resumes from: the main process verifies (each file read once) and tells
    the others."""
    choice = newest_intact(ckpts, accelerator.print) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [str(choice) if choice is not None else None]
        broadcast_object_list(box)
        choice = Path(box[0]) if box[0] is not None else None
    return choice


# --------------------------------------------------------------------------- reading

def _restore_rng(ckpt: Path, rank: int) -> None:
    rng_file = ckpt / f"rng-{rank}.safetensors"
    if rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def load_checkpoint(accelerator, model, optimizer, scheduler, ckpt: Path) -> dict:
    """Load ``ckpt`` into the prepared model, optimizer and scheduler and this process's RNG; returns its
    position (``step``, ``epoch``, ``step_in_epoch``)."""
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
    _restore_rng(ckpt, accelerator.process_index)
    return json.loads((ckpt / "position.json").read_text())


# --------------------------------------------------------------------------- once the stage is done

CHECKPOINTS_KEPT_WITH = "train.keep_checkpoints_when_done=true"
"""The setting that keeps a finished run's checkpoints (named in its manifest and message)."""


def dropped_entry(path: Path, run_dir: Path, what: str, kept_with: str) -> dict:
    """A manifest ``dropped`` entry: ``path`` relative to ``run_dir``, its size in bytes, what it held and the
    setting that keeps it."""
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"path": path.relative_to(run_dir).as_posix(), "bytes": size, "what": what, "kept_with": kept_with}


def finished_checkpoints(run_dir: Path) -> list[dict]:
    """A ``dropped`` entry for each ``checkpoints/`` directory of ``run_dir`` and of its direct sub-directories
    (tso's ``iter-k/``): what a finished run no longer needs, as it never resumes. A sub-directory with its own
    ``config.yaml`` is another stage's run (judge_sft's ``sft/``), which drops its own when it finishes."""
    subruns = sorted(p for p in run_dir.glob("*/checkpoints") if not (p.parent / "config.yaml").exists())
    return [dropped_entry(p, run_dir, "resumable checkpoints (weights, optimizer state, RNG)", CHECKPOINTS_KEPT_WITH)
            for p in [run_dir / "checkpoints", *subruns] if p.is_dir()]


def remove_dropped(run_dir: Path, dropped: list[dict], say: Callable[[str], object] = print) -> None:
    """Delete what ``dropped`` names, once the manifest listing it is written, and say what and how to keep it.
    Every process of a multi-process run calls it: they wait for each other (each has measured and written its
    manifest), then the main process deletes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        if dist.get_rank() != 0:
            return
    for entry in dropped:
        shutil.rmtree(run_dir / entry["path"], ignore_errors=True)
    settings = " / ".join(dict.fromkeys(e["kept_with"] for e in dropped))
    say(f"removed {', '.join(e['path'] + '/' for e in dropped)} ({sum(e['bytes'] for e in dropped) / 1e9:.2f} GB) "
        f"now that the run is complete (listed in its manifest's 'dropped'); {settings} keeps them")
