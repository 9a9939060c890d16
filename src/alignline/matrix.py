"""The TSO model matrix: models indexed by (version, size), the ``human`` answers, and weighted source sets.

A matrix YAML lists ``members`` (each sampled from a checkpoint / alias / served model, or read from a file of
pre-computed Response records) and two source sets, ``positive`` and ``negative``: member name -> weight.
The member ``human`` always exists: the reference answers carried with the prompts (``Prompt.reference``,
e.g. ShareGPT's original assistant turn kept by ``alignline prepare``). ``alignline sample matrix=...``
produces every member's responses; ``alignline select strategy=matrix`` draws, per prompt, a chosen member
from the positive mixture and a rejected member from the negative mixture (:func:`draw_pair`, seeded by
the prompt id) and mixes in the policy's own best-vs-worst pairs (:func:`mix_counts`).

Paths in the matrix file are relative to the working directory, like every other config path.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from alignline.config import Section, load_config
from alignline.data.io import read_manifest, read_records
from alignline.data.records import Prompt, Response
from alignline.errors import ConfigError, DataError
from alignline.generate.engines import EngineSettings

HUMAN = "human"
"""The reserved member name of the prompts' reference answers."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class MatrixMember(Section):
    """One model of the matrix (or the ``human`` answers). ``model: X`` is shorthand for ``engine: {model: X}``."""

    name: str
    """Unique name (letters, digits, '.', '_', '-'; it names the member's sub-directory); 'human' is reserved
    for the prompts' reference answers."""
    version: str = ""
    """Model version, free text (e.g. "v1", "2024-03"); recorded in every pair and in Response.source as
    name@version."""
    size: str = ""
    """Model size, free text (e.g. "135M", "7B")."""
    engine: EngineSettings | None = None
    """Sampled members: how to sample (engine.model: a checkpoint dir, .gguf file or alias; openai engine:
    the served model name)."""
    responses: str | None = None
    """Members with pre-computed answers: a file or shard directory of Response records (instead of engine)."""

    @model_validator(mode="before")
    @classmethod
    def _model_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" in data:
            data = dict(data)
            model = data.pop("model")
            engine = dict(data.get("engine") or {})
            if engine.get("model", model) != model:
                raise ValueError(f"model={model!r} and engine.model={engine['model']!r} disagree; give one of them")
            data["engine"] = {**engine, "model": model}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError("a member name must start with a letter or digit and hold only letters, digits, "
                             "'.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> MatrixMember:
        if self.name == HUMAN:
            if self.engine is not None or self.responses is not None:
                raise ValueError("the member 'human' is the prompts' reference answers and takes no model, engine "
                                 "or responses; give this model another name")
        elif (self.engine is None) == (self.responses is None):
            raise ValueError(f"member '{self.name}' needs exactly one of model/engine (to sample it) or responses "
                             "(a file of pre-computed Response records)")
        return self

    @property
    def kind(self) -> Literal["human", "sampled", "responses"]:
        return HUMAN if self.name == HUMAN else ("sampled" if self.engine is not None else "responses")

    @property
    def source(self) -> str:
        """What ``Response.source`` says for this member's sampled or human responses."""
        return f"{self.name}@{self.version}"

    def describe(self) -> dict[str, str]:
        return {"member": self.name, "version": self.version, "size": self.size}


def _implicit_human() -> MatrixMember:
    return MatrixMember(name=HUMAN, version="reference", size="human")


class MatrixConfig(Section):
    """A TSO model matrix: members plus the positive (chosen) and negative (rejected) source sets."""

    members: list[MatrixMember] = Field(default_factory=list)
    """The models; 'human' (the prompts' reference answers) exists without being listed (list it to set its
    version and size)."""
    positive: dict[str, float]
    """Chosen responses: member name -> weight (> 0; normalised to sum 1). Paper: human 1, largest-newest 1."""
    negative: dict[str, float]
    """Rejected responses: member name -> weight (> 0; normalised). Paper: older and smaller models, uniform."""

    @field_validator("members")
    @classmethod
    def _unique(cls, v: list[MatrixMember]) -> list[MatrixMember]:
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"member '{m.name}' is listed twice; member names must be unique")
            seen.add(m.name)
        return v

    @field_validator("positive", "negative")
    @classmethod
    def _source_set(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        which = info.field_name
        if not v:
            raise ValueError(f"the {which} set is empty; give at least one member name -> weight")
        if "members" in info.data:  # absent when the members themselves failed: that error is reported instead
            known = [HUMAN, *(m.name for m in info.data["members"] if m.name != HUMAN)]
            for name in v:
                if name not in known:
                    raise ValueError(f"the {which} set names member '{name}', which does not exist; "
                                     f"known members: {', '.join(known)}")
        for name, w in v.items():
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"the {which} set gives member '{name}' weight {w}; weights must be > 0 "
                                 "(leave a member out instead of giving it weight 0)")
        return v

    @model_validator(mode="after")
    def _distinct_possible(self) -> MatrixConfig:
        if set(self.positive) == set(self.negative) and len(self.positive) == 1:
            raise ValueError(f"positive and negative are both only '{next(iter(self.positive))}', so no pair can "
                             "have different chosen and rejected members")
        return self

    def by_name(self) -> dict[str, MatrixMember]:
        """Every member by name, ``human`` included."""
        out = {HUMAN: _implicit_human()}
        out.update({m.name: m for m in self.members})
        return out

    def used(self) -> list[MatrixMember]:
        """Members named in the positive or negative set, in the order of ``members`` (human first if implicit)."""
        names = set(self.positive) | set(self.negative)
        return [m for m in self.by_name().values() if m.name in names]


def load_matrix(path: str | Path) -> MatrixConfig:
    """A :class:`MatrixConfig` from YAML; every problem is a ConfigError naming the setting."""
    return load_config(MatrixConfig, path)


def normalise(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


# --------------------------------------------------------------------------- weighted draws

def prompt_rng(seed: int, prompt_id: str) -> random.Random:
    """The draws of one prompt: seeded by sha256 of (seed, prompt id), so a prompt's pair does not depend on
    which other prompts are in the run or their order (all seeded hashes: docs/architecture.md)."""
    key = json.dumps(["matrix", int(seed), str(prompt_id)], ensure_ascii=False, separators=(",", ":"))
    return random.Random(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big"))


def weighted_choice(weights: Mapping[str, float], rng: random.Random, exclude: Any = ()) -> str | None:
    """One name drawn with probability proportional to its weight among those not in ``exclude``; None if none
    is left. Consumes exactly one ``rng.random()``."""
    names = [n for n in weights if n not in exclude]
    if not names:
        return None
    x = rng.random() * sum(weights[n] for n in names)
    for n in names:
        x -= weights[n]
        if x < 0:
            return n
    return names[-1]  # x can stay >= 0 after the last subtraction only by float rounding


@dataclass
class Draw:
    """The members drawn for one prompt, and every member drawn and put back on the way (with why)."""

    chosen: str | None
    rejected: str | None
    redraws: list[tuple[str, str, str]] = field(default_factory=list)
    """(side, member, reason): side 'chosen' or 'rejected'; reason 'no_response' or 'same_member'."""


def draw_pair(positive: Mapping[str, float], negative: Mapping[str, float], rng: random.Random,
              has_response: Callable[[str], bool]) -> Draw:
    """Draw a chosen member from ``positive`` and then a rejected one from ``negative``.

    A draw that hits a member without a usable response for the prompt (or, for the rejected side, the chosen
    member itself) is put back: that member is excluded and the draw repeated over the remaining ones,
    renormalised. No rejected draw is made when no chosen member is left.
    """
    out = Draw(None, None)
    excluded: list[str] = []
    while (name := weighted_choice(positive, rng, excluded)) is not None:
        if has_response(name):
            out.chosen = name
            break
        excluded.append(name)
        out.redraws.append(("chosen", name, "no_response"))
    if out.chosen is None:
        return out
    excluded = []
    while (name := weighted_choice(negative, rng, excluded)) is not None:
        if name != out.chosen and has_response(name):
            out.rejected = name
            break
        excluded.append(name)
        out.redraws.append(("rejected", name, "same_member" if name == out.chosen else "no_response"))
    return out


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)  # the epsilon keeps 2.4999999999 (float noise of 2.5) rounding up


def mix_counts(matrix_pairs: int, self_available: int, self_ratio: float) -> tuple[int, int]:
    """(matrix pairs kept, self pairs taken) so that self pairs are ``self_ratio`` of the final pairs.

    With M matrix pairs, A usable self pairs and r = self_ratio in [0, 1):
    S = round_half_up(M * r / (1 - r)); if S <= A all M are kept with S self pairs; otherwise all A self
    pairs are taken and M' = min(M, round_half_up(A * (1 - r) / r)) matrix pairs kept, so the ratio still
    holds. E.g. M = 10, r = 0.5: S = 10 (if A >= 10), 20 pairs in all; A = 4: S = 4, M' = 4.
    """
    if not 0 <= self_ratio < 1:
        raise ConfigError(f"self_ratio must be in [0, 1), found {self_ratio}")
    if self_ratio == 0 or matrix_pairs == 0:
        return matrix_pairs, 0
    want = _round_half_up(matrix_pairs * self_ratio / (1 - self_ratio))
    if want <= self_available:
        return matrix_pairs, want
    return min(matrix_pairs, _round_half_up(self_available * (1 - self_ratio) / self_ratio)), self_available


# --------------------------------------------------------------------------- members' responses

def human_responses(member: MatrixMember, prompts: list[Prompt]) -> list[Response]:
    """The ``human`` member's answers: one Response per prompt that carries a non-empty reference."""
    return [Response(prompt_id=p.id, sample_idx=0, text=p.reference, source=member.source)
            for p in prompts if p.reference and p.reference.strip()]


def read_member_dir(member: MatrixMember, directory: Path) -> list[Response]:
    """A member's sub-directory of an ``alignline sample matrix=...`` run: complete, and sampled under the
    member's current name@version."""
    m = read_manifest(directory)
    if not m or m.get("status") != "complete":
        raise DataError(f"the responses of member '{member.name}' are incomplete (no complete manifest.json)",
                        path=str(directory), expected="a finished `alignline sample matrix=...` run; rerun it")
    rows = read_records(directory, Response)
    if member.kind != "responses":
        for r in rows:
            if r.source != member.source:
                raise DataError(f"a response of member '{member.name}' has source '{r.source}' but the matrix "
                                f"says '{member.source}' (the version changed?)", path=str(directory),
                                field="source", expected=f"'{member.source}'; rerun alignline sample")
    return rows


def load_member_responses(matrix: MatrixConfig, prompts: list[Prompt], sample_dir: str | Path | None,
                          files: Mapping[str, str]) -> tuple[dict[str, dict[str, list[Response]]], dict[str, str]]:
    """Usable responses of every member in a source set, by member and prompt id, and where each came from.

    Looked for in this order: ``files[name]``; ``sample_dir/name/`` (an ``alignline sample matrix=...`` run);
    the member's own ``responses`` file; for ``human``, the prompts' references.
    """
    members = matrix.by_name()
    unknown = sorted(set(files) - set(members))
    if unknown:
        raise ConfigError(f"member_responses names member '{unknown[0]}', which is not in the matrix; "
                          f"known members: {', '.join(members)}")
    out: dict[str, dict[str, list[Response]]] = {}
    origin: dict[str, str] = {}
    for m in matrix.used():
        sub = Path(sample_dir) / m.name if sample_dir is not None else None
        if m.name in files:
            rows, origin[m.name] = read_records(files[m.name], Response), str(files[m.name])
        elif sub is not None and sub.is_dir():
            rows, origin[m.name] = read_member_dir(m, sub), str(sub)
        elif m.responses is not None:
            rows, origin[m.name] = read_records(m.responses, Response), m.responses
        elif m.kind == HUMAN:
            rows, origin[m.name] = human_responses(m, prompts), "prompts.reference"
        else:
            raise ConfigError(f"no responses for member '{m.name}': run `alignline sample matrix=...` and pass its "
                              "output_dir as responses=..., or name a file in member_responses")
        by_prompt: dict[str, list[Response]] = {}
        for r in rows:
            if r.usable:
                by_prompt.setdefault(r.prompt_id, []).append(r)
        out[m.name] = by_prompt
    return out, origin
