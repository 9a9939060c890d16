"""Which engine answers and how to build it: the settings section, the factory and its lazy form.

Kept apart from :mod:`alignline.generate.base` (the protocol), so the protocol never imports the engines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field

from alignline.config import Section
from alignline.generate.base import DecodeStep, Engine
from alignline.generate.endpoint import OpenAIConnection


class EngineSettings(Section):
    """Which engine answers (a policy being sampled or evaluated, or an LLM judge)."""

    engine: Literal["hf", "openai"] = "hf"
    """hf: transformers in this process; openai: an OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, llama.cpp)."""
    model: str
    """hf: a local HF checkpoint dir, .gguf file or alias; openai: the model name as the server knows it."""
    openai: OpenAIConnection = Field(default_factory=OpenAIConnection)
    """openai engine settings (base_url, api_key_env, api_key, max_concurrency, max_retries, timeout_s, ...);
    a key (api_key, or credentials in base_url) is used but never written to a file."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """hf: weights dtype (auto: bf16 on GPUs that support it, fp32 on CPU)."""
    max_batch: int = Field(64, gt=0)
    """hf: sequences decoded together."""
    trust_remote_code: bool = False
    """hf: allow model code from the checkpoint directory (off unless you trust it)."""
    decode_step: DecodeStep = "live"
    """hf: live (default), static or graph (CUDA graphs, GPU only; see ``alignline.generate.base.DecodeStep``)."""


def build_engine(settings: EngineSettings, device=None, *, loaded: tuple | None = None) -> Engine:
    """The engine ``settings`` describe (hf loads the model now; openai checks its settings now). ``loaded``:
    hf only, a (model, tokenizer) already in memory to sample from instead of loading ``settings.model`` (the
    policy being trained: its live weights)."""
    if settings.engine == "hf":
        from alignline.generate.hf import HFEngine

        if loaded is not None:
            model, tokenizer = loaded
            return HFEngine(model, tokenizer, max_batch=settings.max_batch, decode_step=settings.decode_step)
        return HFEngine.from_path(settings.model, dtype=settings.dtype, device=device, max_batch=settings.max_batch,
                                  trust_remote_code=settings.trust_remote_code, decode_step=settings.decode_step)
    from alignline.generate.openai_engine import OpenAIEngine, OpenAISettings

    return OpenAIEngine(OpenAISettings.of(settings.model, settings.openai))


class LazyEngine:
    """Builds the engine on the first call, so a rerun served from the cache loads no model."""

    def __init__(self, settings: EngineSettings, device=None, build: Callable[..., Engine] | None = None):
        """``build``: the engine factory (default :func:`build_engine`; stages pass their own so tests can
        substitute a scripted engine)."""
        self.settings, self.device, self.engine = settings, device, None
        self.build = build or build_engine

    def generate(self, prompts, n, sampling):
        if self.engine is None:
            device = self.device
            if device is None and self.settings.engine == "hf":
                import torch

                device = "cuda" if torch.cuda.is_available() else None
            self.engine = self.build(self.settings, device=device)
        return self.engine.generate(prompts, n, sampling)

    def close(self) -> None:
        getattr(self.engine, "close", lambda: None)()
