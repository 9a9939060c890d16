"""What every generation engine shares (design section 6): sampling settings, the interface, per-sample seeds.

An engine turns prompts into ``n`` :class:`~alignline.data.records.Response` records each. A sample's seed is
derived from ``(run seed, prompt id, sample index)`` only (:func:`sample_seed`), so engines that honour it
give the same text for a sample however prompts and samples are batched, chunked or resumed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import Field

from alignline.config import Section
from alignline.data.records import Prompt, Response
from alignline.errors import ConfigError
from alignline.generate.endpoint import OpenAIConnection


class SamplingParams(Section):
    """How responses are sampled."""

    temperature: float = Field(default=0.7, ge=0.0)
    """Softmax temperature; 0 means greedy decoding (the most likely token every step)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off)."""
    top_k: int = Field(default=0, ge=0)
    """Keep only the top_k most likely tokens before sampling (0 = off)."""
    max_new_tokens: int = Field(default=256, ge=1)
    """At most this many new tokens per response; a response cut here has finish_reason "length"."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings: the response ends before the first one it contains (finish_reason "stop")."""
    seed: int = Field(default=0, ge=0)
    """Run seed; each sample's seed is derived from (seed, prompt id, sample index)."""


def sample_seed(run_seed: int, prompt_id: str, sample_idx: int) -> int:
    """A stable 63-bit seed for one sample: sha256 of ``(run_seed, prompt_id, sample_idx)``.

    Independent of the process, the platform and ``PYTHONHASHSEED``.
    """
    key = json.dumps([int(run_seed), str(prompt_id), int(sample_idx)], ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_n(n: int) -> int:
    """``n`` (samples per prompt) as an int >= 1, else a ConfigError naming ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (samples per prompt) must be an integer >= 1, found {n!r}")
    return n


@runtime_checkable
class Engine(Protocol):
    """Something that samples responses: in process (``hf``) or remote (``openai``)."""

    name: str
    """Short engine name, e.g. "hf"."""

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[list[Response]]:
        """For every prompt (same order), ``n`` responses with ``sample_idx`` 0..n-1."""
        ...


DecodeStep = Literal["live", "static", "graph"]
"""How the hf engine runs a decode step (Llama-family models; the generic path for others ignores it).
``live`` (default): attention over the live part of each cache only, eager; the fastest on CPU. ``static``: the
fixed-shape step (:mod:`alignline.generate.static_step`), eager. ``graph``: that step captured once and replayed
as a CUDA graph (GPU only), which removes the per-kernel launch cost that bounds small models on a GPU; it has
not been timed on a GPU yet, hence opt-in. Samples are the same under all three, up to float rounding."""


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


def build_engine(settings: EngineSettings, device=None) -> Engine:
    """The engine ``settings`` describe (hf loads the model now; openai checks its settings now)."""
    if settings.engine == "hf":
        from alignline.generate.hf import HFEngine

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
