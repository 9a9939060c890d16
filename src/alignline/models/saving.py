"""Saving a model (or its LoRA adapter) and tokenizer in safetensors, replacing the directory atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from alignline.errors import ModelError, on_disk_full
from alignline.models.atomic_dir import _replace_dir, _tmp_dir_for
from alignline.models.card import CardFacts, write_model_card
from alignline.models.gguf_import import _strip_gguf_quantizer
from alignline.models.loading import _pickled_files


def save_model(model, tokenizer, out_dir: str | Path, *, merge_lora: bool = False,
               state_dict: dict[str, torch.Tensor] | None = None, card: CardFacts | None = None) -> Path:
    """Save ``model`` (and ``tokenizer`` unless None) to ``out_dir`` in safetensors, replacing it atomically.

    ``state_dict``: the weights to write instead of the model's own (the gathered full weights of a model
    sharded across processes, whose own parameters are shards); not with a PEFT model.

    A PEFT model is saved as its adapter (``adapter_config.json`` + ``adapter_model.safetensors``, whose
    ``base_model_name_or_path`` points at the base checkpoint) unless ``merge_lora`` is true, in which case
    the adapters are merged into a plain checkpoint (the model passed in is left unmerged). Every loader in
    :mod:`alignline.models.loading` accepts both kinds of directory.

    ``card``: the facts of the model card written as ``README.md`` in the same directory (and renamed into
    place with it; ``library_name`` peft for an adapter): :mod:`alignline.models.card`. The weights files are
    the same with or without it.
    """
    out = Path(out_dir).expanduser().resolve()
    needed = _weight_bytes(model, state_dict, adapter_only=not merge_lora)
    with on_disk_full(out.parent, f"the model {out.name}/ (safetensors weights and tokenizer)", needed):
        tmp = _tmp_dir_for(out)
        try:
            adapter = _write_model(model, tokenizer, tmp, merge_lora=merge_lora, state_dict=state_dict)
            if card is not None:
                write_model_card(tmp, card, adapter=adapter)
            pickled = _pickled_files(tmp)
            if pickled:
                raise ModelError(f"saving {out} produced pickled files {[p.name for p in pickled]}; refusing")
            _replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # also the partial files of a full disk
    return out


def _weight_bytes(model, state_dict: dict | None, *, adapter_only: bool) -> int:
    """About the bytes the weights take on disk (an adapter alone: its LoRA tensors only)."""
    from peft import PeftModel

    weights = state_dict if state_dict is not None else model.state_dict()
    if adapter_only and isinstance(model, PeftModel):
        weights = {k: v for k, v in weights.items() if "lora_" in k}
    return sum(t.numel() * t.element_size() for t in weights.values() if isinstance(t, torch.Tensor))


def _write_model(model, tokenizer, tmp: Path, *, merge_lora: bool, state_dict: dict | None) -> bool:
    """``save_model``'s files, into the fresh directory ``tmp``; whether they are an adapter alone."""
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
    return isinstance(model, PeftModel) and not merge_lora
