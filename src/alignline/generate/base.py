"""What every generation engine shares (design section 6): sampling settings, the interface, per-sample seeds.

An engine turns prompts into ``n`` :class:`~alignline.data.records.Response` records each. A sample's seed is
derived from ``(run seed, prompt id, sample index)`` only (:func:`sample_seed`), so engines that honour it
give the same text for a sample however prompts and samples are batched, chunked or resumed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import Field

from alignline.config import Section
from alignline.data.records import Prompt, Response
from alignline.errors import ConfigError


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
