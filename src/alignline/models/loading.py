"""Resolving a model name (alias, .gguf file, local directory or Hub id) to a local safetensors checkpoint, and loading tokenizers, causal LMs, reward
models and LoRA adapters from it. Pickled weights are refused: unpickling can run arbitrary code."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from alignline.config import Section
from alignline.data.io import file_sha256
from alignline.errors import ModelError
from alignline.hub import Snapshot, fetch_snapshot, parse_hub_id
from alignline.models.aliases import ALIASES, _alias_list, _resolve_alias, default_cache_dir
from alignline.models.device import pick_dtype
from alignline.models.gguf_import import _import_gguf
from alignline.models.safetensors_layout import check_safetensors_files

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


def _pickled_files(directory: Path) -> list[Path]:
    found = {p for pat in _PICKLE_PATTERNS for p in directory.glob(pat) if p.name not in _NOT_WEIGHTS}
    return sorted(found)


def _refuse_pickle(source: Path | str, names: list[str], *, hub_revision: str | None = None) -> ModelError:
    """The refusal of a checkpoint (directory or Hub repository) whose weights are only pickled."""
    # a Hub repository is converted into a local directory named after it
    target = f"{str(source).rsplit('/', 1)[-1]}-safetensors" if hub_revision else f"{source}-safetensors"
    revision = f", revision='{hub_revision}'" if hub_revision else ""
    return ModelError(
        f"{source} has only pickled weights ({', '.join(names[:5])}); alignline loads safetensors only, because "
        "unpickling can run arbitrary code. If you trust the file, convert it once: python -c \"from transformers "
        f"import AutoModelForCausalLM as M; M.from_pretrained('{source}'{revision}, use_safetensors=False)"
        f".save_pretrained('{target}')\" and give {target} instead"
    )


def _check_checkpoint_dir(directory: Path) -> None:
    if (directory / "adapter_config.json").is_file():
        if not (directory / "adapter_model.safetensors").is_file():
            pickled = _pickled_files(directory)
            if pickled:
                raise _refuse_pickle(directory, [p.name for p in pickled])
            raise ModelError(f"{directory}: adapter_config.json but no adapter_model.safetensors")
        return
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.safetensors.index.json"))
    if not has_weights:
        pickled = _pickled_files(directory)
        if pickled:
            raise _refuse_pickle(directory, [p.name for p in pickled])
        raise ModelError(
            f"{directory} has no *.safetensors weights; give a Hugging Face checkpoint directory "
            f"(config.json + model.safetensors), a .gguf file or one of the aliases: {_alias_list()}"
        )
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory} has weights but no config.json; it is not a Hugging Face checkpoint")


# What loading a Hub checkpoint needs besides its weights: configs, tokenizer files, the chat template.
_HUB_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt", "chat_template.jinja", "chat_template.json", "adapter_config.json")


def hub_model_files(files: list[str], label: str) -> list[str]:
    """The files of a Hub model repository that loading needs (top level only: configs, tokenizer, chat template,
    ``*.safetensors`` and their index, model code), decided from its file list before anything is downloaded. A repository
    whose weights are only pickled is refused as a local directory is."""
    top = [f for f in files if "/" not in f]
    weights = [f for f in top if f.endswith((".safetensors", ".safetensors.index.json"))]
    if any(not f.startswith("consolidated") for f in weights):
        weights = [f for f in weights if not f.startswith("consolidated")]  # Mistral's second copy of the weights
    if not any(f.endswith(".safetensors") for f in weights):
        pickled = sorted(f for f in top if f not in _NOT_WEIGHTS and any(fnmatch(f, p) for p in _PICKLE_PATTERNS))
        if pickled:
            repo, _, commit = label.partition("@")
            raise _refuse_pickle(repo, pickled, hub_revision=commit)
        ggufs = [f for f in files if f.lower().endswith(".gguf")]
        hint = (f"; it holds GGUF files ({', '.join(ggufs[:3])}): download one with `hf download {label.split('@')[0]} "
                "FILE.gguf` and give its path" if ggufs else "")
        raise ModelError(f"Hub model {label} has no *.safetensors weights{hint}")
    # a repository's own model code (*.py) comes too: transformers runs it only with trust_remote_code on
    return [f for f in top if f in _HUB_SIDE_FILES or f.startswith("tokenizer") or f.endswith(".py")] + weights


def resolve_model_source(name_or_path: str | Path, *, cache_dir: Path | None = None) -> tuple[Path, Snapshot | None]:
    """(local checkpoint directory, the Hub snapshot it is when it came from the Hub) for any model name.

    In order: a built-in alias (an alias wins over a path or Hub id of the same spelling), an existing local path
    (a checkpoint directory or a .gguf file), a Hub id ``org/name`` or ``org/name@revision`` (fetched through
    huggingface_hub into its cache: only configs, tokenizer files and safetensors weights).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if isinstance(name_or_path, str) and name_or_path in ALIASES:
        return _resolve_alias(ALIASES[name_or_path], cache), None
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _resolve_local(path.resolve(), cache), None
    ref = parse_hub_id(str(name_or_path))
    if ref is None:
        raise ModelError(
            f"model {name_or_path} not found; give a local HF checkpoint directory, a .gguf file, a Hugging Face "
            f"Hub id (org/name or org/name@revision) or one of the aliases: {_alias_list()}")
    try:
        snapshot = fetch_snapshot(ref, hub_model_files, ModelError)
    except ModelError as exc:
        if getattr(exc, "hub_missing", False):  # it may have been meant as a local path
            raise ModelError(f"{exc}; nor is there a local directory {path.resolve()}") from None
        raise
    _check_checkpoint_dir(snapshot.path)
    check_safetensors_files(snapshot.path)
    return snapshot.path, snapshot


def resolve_model(name_or_path: str | Path, *, cache_dir: Path | None = None) -> Path:
    """The local checkpoint directory for an alias, a .gguf file, a checkpoint directory or a Hub id (see
    :func:`resolve_model_source`). Aliases and .gguf files are imported once into ``cache_dir`` (default
    :func:`default_cache_dir`); Hub ids are fetched once into the Hugging Face cache."""
    return resolve_model_source(name_or_path, cache_dir=cache_dir)[0]


def _resolve_local(path: Path, cache: Path) -> Path:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            if path.match("*.bin") or path.suffix.lower() in (".pt", ".pth", ".ckpt", ".pkl"):
                raise _refuse_pickle(path.parent, [path.name])
            raise ModelError(f"{path} is a file but not a .gguf; give a checkpoint directory, a .gguf file or "
                             f"one of the aliases: {_alias_list()}")
        digest = file_sha256(path)
        out = cache / f"{path.stem}-{digest[:12]}"
        return _import_gguf(path, out, torch.float32, str(path), digest=digest)
    _check_checkpoint_dir(path)
    check_safetensors_files(path)  # a cut weight file named here, not as safetensors' "file not fully covered"
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
    save: Literal["merged", "adapter"] = "merged"
    """The stage's final model/: merged, a full checkpoint; adapter, only the adapters (a few MB instead of the
    model's size; its adapter_config.json names the base checkpoint, which must stay where it was; every
    loader merges it on load)."""


def merged_on_save(lora: LoraSettings | None) -> bool:
    """Whether a stage's final model/ is a full checkpoint (no LoRA, or lora.save=merged) or the adapter alone."""
    return lora is None or lora.save == "merged"


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
    if (isinstance(path, str) and path in ALIASES) or p.is_file() or (not p.exists() and parse_hub_id(str(path))):
        p = resolve_model(path)
    elif not p.is_dir():
        raise ModelError(f"tokenizer path {path} not found; give a model or tokenizer directory, a .gguf "
                         f"file, a Hub id (org/name) or one of the aliases: {_alias_list()}")
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
