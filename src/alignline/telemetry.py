"""What a run measures about itself: phase times, tokens, useful FLOPs and peak memory.

A :class:`Telemetry` is opened by a stage (or by :func:`alignline.train.loop.train` when the stage passes
none) and records *phases*: the reference pass, the training loop, checkpoints, evaluations, scoring,
sampling, the final model save. Each phase accumulates its wall seconds, how often it ran, the real
(non-padding) tokens it computed, the positions whose logits it computed, its useful FLOPs and its peak
memory. The training loop also records, per optimizer step, forward / backward / optimizer seconds and the
step's peak memory (:class:`StepClock`): the loop writes those into every step's record in ``metrics.jsonl``
(``time/forward_s``, ``time/backward_s``, ``time/optimizer_s``, ``time/step_s``, ``tokens``,
``logit_positions``, ``flops``, ``mem/peak_rss_gb`` and on CUDA ``mem/peak_allocated_gb``,
``mem/peak_reserved_gb``), and stages write :meth:`Telemetry.summary` into ``manifest.json`` (``phases``).

Memory: on every device the resident set size (RSS) of the process, sampled every 20 ms by a thread while
a phase is open (spikes shorter than that can be missed; ``process_peak_rss_gb`` is the kernel's exact
lifetime high-water mark, VmHWM); on CUDA also the caching allocator's peak allocated and reserved
bytes (exact; their peak statistics are reset at each phase and step boundary, so read a whole process's
peak from :meth:`Telemetry.summary`, not from ``torch.cuda.max_memory_allocated``).

Useful FLOPs (:func:`useful_flops`) count the matmuls the objective needs: ``6 x N`` per token for a pass
with gradients (2 forward, 4 backward), ``2 x N`` without, where ``N`` is the parameters outside the input
embedding (a lookup) and the output head; the head counts ``k x head parameters`` only at the positions
whose logits are computed. Attention-score matmuls, padding and the recompute of activation checkpointing
are not counted: they are work, not useful work. :func:`matmul_shapes` lists the same matmuls by shape (what a
benchmark measures its hardware limit on) and :func:`decode_flops` prices one decoded token with them.

A generation engine keeps its running totals in an :class:`EngineStats`; :func:`read_run` reads a finished
run's step records and phases back (what the benchmarks report), :func:`step_split` sums its step clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alignline.data.chat import IGNORE

GB = 1024**3
SAMPLE_INTERVAL_S = 0.02
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def useful_flops(body_params: int, head_params: int, tokens: int, logit_positions: int, *, grad: bool) -> int:
    """Useful matmul FLOPs of a pass over ``tokens`` real tokens with logits at ``logit_positions`` positions:
    ``k x (body_params x tokens + head_params x logit_positions)``, k = 6 with gradients, 2 without.

    Example (the tiny test model: hidden 64, 2 layers, MLP 128, untied 300 x 64 head): body = 2 x (4 x 64 x 64
    attention + 3 x 64 x 128 MLP + 2 x 64 norms) + 64 final norm = 82,240 parameters, head = 19,200. A training
    micro-batch of 100 real tokens, 40 of them predicting a target: 6 x (82,240 x 100 + 19,200 x 40) =
    6 x 8,992,000 = 53,952,000 FLOPs; the same batch without gradients: 17,984,000.
    """
    return (6 if grad else 2) * (body_params * tokens + head_params * logit_positions)


def matmul_shapes(config: dict[str, Any], tokens: int) -> dict[str, tuple[int, int, int, float]]:
    """The weight matmuls of one forward pass of a Llama-style decoder (its ``config.json`` as a dict) over
    ``tokens`` tokens, as name -> (M, K, N, how many per decoder layer); the LM head once per model (1 / layers
    per layer). Their FLOPs, 2 x M x K x N each, are :func:`useful_flops` without gradients (norms aside): the
    shapes a benchmark's matmul limit is measured on."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    q = config["num_attention_heads"] * head_dim
    return {"q": (tokens, h, q, 1), "k/v": (tokens, h, kv, 2), "o": (tokens, q, h, 1),
            "gate/up": (tokens, h, i, 2), "down": (tokens, i, h, 1),
            "lm head": (tokens, h, config["vocab_size"], 1 / layers)}


def decode_flops(config: dict[str, Any], context: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one decoded token at ``context``: 2 x weights (:func:`matmul_shapes`, LM head
    included) and 4 x layers x heads x head_dim x context (scores and weighted values; not useful FLOPs)."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    weights = layers * sum(k * n * per_layer for _, k, n, per_layer in matmul_shapes(config, 1).values())
    return 2.0 * weights, 4.0 * layers * heads * head_dim * context


def param_counts(model) -> tuple[int, int]:
    """(body parameters, head parameters) of a causal LM or a sequence-classification model: the body is
    every parameter except the input embedding and the head (a tied head is the embedding, counted once)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = [out.weight] if out is not None else [
        p for name in ("score", "classifier") if getattr(model, name, None) is not None
        for p in getattr(model, name).parameters()]
    total = sum(p.numel() for p in model.parameters())
    head_n = sum(p.numel() for p in head)
    tied = any(p is emb for p in head)
    return total - emb.numel() - (0 if tied else head_n), head_n


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch: its ``n_tokens`` (packed rows, pair rows), else the attention mask's sum,
    else every position."""
    if "n_tokens" in batch:
        return int(batch["n_tokens"])
    if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def logit_positions(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose LM-head logits a batch computes: pair batches' ``keep`` mask (response positions), a
    causal-LM batch's positions predicting a target (``labels``), else every real token."""
    if "keep" in batch:
        return int(batch["keep"].sum())
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
    return real_tokens(batch)


# --------------------------------------------------------------------------- memory

def rss_bytes() -> int:
    """This process's resident set size now (Linux: /proc/self/statm; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak RSS: Linux's VmHWM (of the process image since its exec; ru_maxrss also holds the
    RSS of the process it was forked from, e.g. a benchmark's parent), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


class RssWatch(threading.Thread):
    """Samples the RSS every ``interval_s`` into ``peak`` (the maximum since the last :meth:`take`); a subclass
    overrides :meth:`sample` to keep more (e.g. a benchmark's per-phase peaks)."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        super().__init__(daemon=True, name="alignline-rss")
        self.interval_s = interval_s
        self.lock, self.halt = threading.Lock(), threading.Event()
        self.peak = rss_bytes()

    def run(self) -> None:
        while not self.halt.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        r = rss_bytes()
        with self.lock:
            self.peak = max(self.peak, r)

    def take(self) -> int:
        """The peak since the last call; the next window starts at the current RSS."""
        self.sample()
        with self.lock:
            peak, self.peak = self.peak, rss_bytes()
        return peak


# --------------------------------------------------------------------------- phases and steps

class Telemetry:
    """Phases of a run (see the module docstring). ``device``: where the model runs (CUDA adds allocator peaks)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.phases: dict[str, dict[str, Any]] = {}
        self.lifetime: dict[str, float] = {}
        self._open: list[str] = []
        self._t0: dict[str, float] = {}
        self._watch: RssWatch | None = None
        self._params: dict[int, tuple[int, int]] = {}

    # memory windows ----------------------------------------------------------
    def _take_peaks(self) -> dict[str, float]:
        """Peaks since the previous call, folded into every open phase and the lifetime peaks."""
        peaks = {"peak_rss_gb": (self._watch.take() if self._watch else rss_bytes()) / GB}
        if self.cuda:
            peaks["peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            peaks["peak_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / GB
            torch.cuda.reset_peak_memory_stats(self.device)
        for record in [self.phases[n] for n in self._open] + [self.lifetime]:
            for k, v in peaks.items():
                record[k] = max(record.get(k, 0.0), v)
        return peaks

    def sync(self) -> None:
        """Wait for queued CUDA work, so that a time taken next includes it (no-op on CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # phases ------------------------------------------------------------------
    def open(self, name: str) -> dict[str, Any]:
        """Start (or resume: times add up) phase ``name``; returns its record."""
        if self._watch is None:
            self._watch = RssWatch()
            self._watch.start()
        self.sync()
        self._take_peaks()  # the enclosing phases keep what came before; this one starts now
        record = self.phases.setdefault(name, {"seconds": 0.0, "calls": 0})
        self._open.append(name)
        self._t0[name] = time.perf_counter()
        return record

    def close(self, name: str) -> dict[str, Any]:
        self.sync()
        record = self.phases[name]
        record["seconds"] += time.perf_counter() - self._t0.pop(name)
        record["calls"] += 1
        self._take_peaks()
        self._open.remove(name)
        if not self._open and self._watch is not None:
            self._watch.halt.set()
            self._watch = None
        return record

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        record = self.open(name)
        try:
            yield record
        finally:
            self.close(name)

    # counting ----------------------------------------------------------------
    def params_of(self, model) -> tuple[int, int]:
        """:func:`param_counts` of ``model`` (computed once per model)."""
        key = id(model)
        if key not in self._params:
            self._params[key] = param_counts(model)
        return self._params[key]

    def count(self, params: tuple[int, int], tokens: int, positions: int, *, grad: bool) -> int:
        """Add a pass of a model with ``params`` = (body, head) parameters (:meth:`params_of`) over ``tokens``
        real tokens with logits at ``positions`` to every open phase; returns its useful FLOPs."""
        flops = useful_flops(*params, tokens, positions, grad=grad)
        self.add(tokens=tokens, logit_positions=positions, flops=flops)
        return flops

    def count_batch(self, model, batch: dict[str, torch.Tensor], *, grad: bool) -> int:
        """:meth:`count` for ``model`` (unwrapped) running ``batch`` (:func:`real_tokens`, :func:`logit_positions`)."""
        return self.count(self.params_of(model), real_tokens(batch), logit_positions(batch), grad=grad)

    def add(self, **values: float) -> None:
        """Add ``values`` (e.g. tokens, flops, steps) to every open phase."""
        for name in self._open:
            record = self.phases[name]
            for k, v in values.items():
                record[k] = record.get(k, 0) + v

    def step_clock(self) -> StepClock:
        return StepClock(self)

    # reports -----------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """``{phase: {seconds, calls, tokens, logit_positions, flops, peak_rss_gb, ...}}`` plus ``process``
        (lifetime peaks, ``process_peak_rss_gb`` = the kernel's high-water mark) and ``params`` of the first model counted."""
        out: dict[str, Any] = {n: _rounded(r) for n, r in self.phases.items()}
        process = dict(self.lifetime)
        process["process_peak_rss_gb"] = peak_rss_bytes() / GB
        if self.cuda:
            self._take_peaks()
            process.update({k: self.lifetime[k] for k in ("peak_allocated_gb", "peak_reserved_gb")})
        out["process"] = _rounded(process)
        if self._params:
            body, head = next(iter(self._params.values()))
            out["params"] = {"body": body, "head": head}
        return out


class StepClock:
    """Times one optimizer step by laps (forward, backward, optimizer; micro-batches add up) and its peak memory."""

    def __init__(self, telemetry: Telemetry):
        self.tel = telemetry
        self.tel._take_peaks()  # the step's memory window starts here
        self.laps: dict[str, float] = {}
        self.t0 = self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        self.tel.sync()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def record(self) -> dict[str, float]:
        """``time/<lap>_s`` per lap, ``time/step_s`` in all, and ``mem/<peak>`` of the step."""
        out = {f"time/{k}_s": v for k, v in self.laps.items()}
        out["time/step_s"] = self.last - self.t0
        out.update({f"mem/{k}": round(v, 4) for k, v in self.tel._take_peaks().items()})
        return out


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}


class EngineStats(dict):
    """Running totals of a generation engine's work: prefill and decode seconds, tokens, steps and rows."""

    def add(self, **values) -> None:
        for key, value in values.items():
            self[key] = self.get(key, 0) + value


# --------------------------------------------------------------------------- reading a run back

def read_run(out_dir: str | Path) -> dict[str, Any]:
    """A finished training run's own figures: ``steps``, the per-optimizer-step records of its
    ``metrics.jsonl`` (seconds, tokens, logit positions, useful FLOPs, forward / backward / optimizer seconds,
    peak memory, loss, units, ...), and its manifest's ``phases`` (:meth:`Telemetry.summary`) and ``counts``."""
    out_dir = Path(out_dir)
    steps = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "tokens_per_s" in record:  # a step's record (evaluations and the final line carry none)
            steps.append(record)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return {"steps": steps, "phases": manifest.get("phases", {}), "counts": manifest.get("counts")}


def step_split(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Forward / backward / optimizer seconds summed over step records (:meth:`StepClock.record`)."""
    return {lap: sum(s.get(f"time/{lap}_s", 0.0) for s in steps) for lap in ("forward", "backward", "optimizer")}
