"""The weights dtype for a device: bfloat16 where the hardware computes it natively, float32 elsewhere."""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess

import torch

from alignline.errors import ModelError

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16/AMX-BF16, Arm BF16); False if unknown."""
    try:
        if platform.system() == "Linux":
            flags: set[str] = set()
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key.strip().lower() in ("flags", "features"):
                        flags.update(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        if platform.system() == "Darwin":
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                 text=True, timeout=5, check=False)
            return out.stdout.strip() == "1"
    except (OSError, subprocess.SubprocessError):
        return False
    return False


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device | str | None = None, requested: str | torch.dtype = "auto") -> torch.dtype:
    """The weights dtype for ``requested`` on ``device`` (default: CUDA if available, else CPU).

    ``"auto"`` is bfloat16 on CUDA devices that support it natively and on CPUs with native bfloat16
    (AVX512-BF16/AMX, Arm BF16), float32 everywhere else. ``"float32"``, ``"bfloat16"`` and ``"float16"``
    are taken as given.
    """
    if isinstance(requested, torch.dtype):
        if requested in (torch.float32, torch.bfloat16, torch.float16):
            return requested
        raise ModelError(f"dtype {requested} is not supported; use auto, float32, bfloat16 or float16")
    name = str(requested).strip().lower()
    if name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    if name != "auto":
        raise ModelError(f"dtype '{requested}' is not one of auto, float32, bfloat16, float16")
    try:
        dev = torch.device(device) if device is not None else _default_device()
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"device '{device}' is not a valid torch device ({exc})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return torch.float32
        ctx = torch.cuda.device(dev) if dev.index is not None else contextlib.nullcontext()
        with ctx:
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32
