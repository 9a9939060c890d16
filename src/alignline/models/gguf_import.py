"""GGUF import: every tensor dequantised (transformers' GGUF loader) into a plain float checkpoint.

The import writes ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer files
(with the chat template when the GGUF has one) into a directory beside its final place, renames it in and
marks it with :data:`IMPORT_MARKER`, so a crash or a concurrent import never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from alignline.data.io import file_sha256
from alignline.errors import ModelError, on_disk_full
from alignline.models.atomic_dir import _tmp_dir_for
from alignline.models.gguf_layout import read_gguf_layout

#: Written last into an imported checkpoint directory: JSON with the source path and its sha256.
IMPORT_MARKER = ".alignline-imported"




def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / IMPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def gguf_architecture(gguf_path: str | Path) -> str:
    """``general.architecture`` from a GGUF file's metadata (ModelError if the file cannot be read, or is cut
    or damaged: :func:`alignline.models.gguf_layout.read_gguf_layout` checks the header and the tensor
    data's size)."""
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
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with on_disk_full(out.parent, f"the model imported from {src.name} (safetensors weights)", needed):
        model.save_pretrained(str(out))  # into a temporary directory: _import_gguf removes it on any error
        tokenizer.save_pretrained(str(out))
    if not any(out.glob("*.safetensors")):
        raise ModelError(f"{src}: the import wrote no safetensors weights into {out}")


def _import_gguf(src: Path, out: Path, dtype: torch.dtype, source: str, *, digest: str | None = None) -> Path:
    digest = digest or file_sha256(src)
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
