"""Helpers shared by the benchmarks: the shared arguments, the smoke model, result tables, the TRL side's
clocks and the hardware limit. The child-process harness is :mod:`benchmarks.harness`."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GB = 1024**3


# --------------------------------------------------------------------------- machine and results

def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and library versions, for the results file."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "logical_cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if f" {f}" in flags]
    except OSError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / GB, 1)
    except ImportError:
        pass
    versions = {}
    for mod in ("torch", "transformers", "trl", "accelerate", "datasets", "alignline"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # a missing library is just not listed
            continue
    info["versions"] = versions
    return info


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header, format spec) triples."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


# --------------------------------------------------------------------------- the shared argument set

#: Every benchmark script accepts ``--smoke``: a tiny random model, a handful of examples, no waiting for a quiet
#: machine, a few seconds per row, peers included where installed. ``tests/test_benchmarks_smoke.py`` runs each
#: script listed in ``SMOKE_SCRIPTS`` that way (``make test``), so an API change that breaks a benchmark fails
#: the tests. Smoke figures measure nothing: they only show that every row still runs.
SMOKE_SCRIPTS = ("sft_throughput.py", "dpo_throughput.py", "rm_throughput.py", "score_throughput.py",
                 "generate_throughput.py", "rl_throughput.py")

#: Benchmark scripts not (yet) in ``SMOKE_SCRIPTS``, with the reason; the smoke test fails for a
#: ``benchmarks/*_throughput.py`` in neither. To be covered, a script must: take the shared arguments
#: (``add_common_args`` + ``finish_args``: ``--smoke``, ``--out``, ``--work-dir``, ...); with ``--smoke``, use
#: ``model_path(args, work)`` (the tiny random model, never a download or the real model's import) and sizes
#: that run in seconds, skip the quiet-machine wait, include its peer rows when the peer is installed; write its
#: result JSON to ``--out`` and exit 0 (non-zero on any failed row). A training benchmark's result also carries
#: ``limit`` (:func:`matmul_limit`) and a positive ``share_of_limit`` in every row of ``results``.
SMOKE_PENDING: dict[str, str] = {}


def add_common_args(p, *, configs: Sequence[str] = (), default_configs: Sequence[str] = (),
                    default_out: Path | None = None, max_wait: float = 600.0, timeout: float = 2400.0) -> None:
    """The arguments every benchmark shares: the mode (``--smoke`` / ``--quick`` / full), threads, seed,
    configurations, result file, work directory, quiet-machine gate, retries and the child-process protocol."""
    import argparse

    p.add_argument("--smoke", action="store_true",
                   help="CI smoke run: a tiny random model and a handful of examples, no quiet-machine wait "
                        "(seconds; figures meaningless)")
    p.add_argument("--quick", action="store_true", help="a short run of the real model (minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads in every child (default 2)")
    if configs:
        p.add_argument("--configs", default=None, help=f"comma-separated, from {','.join(configs)} "
                       f"(default {','.join(default_configs)})")
    if default_out is not None:
        p.add_argument("--out", type=Path, help=f"result JSON (default {default_out.name} in benchmarks/results; "
                       "--quick / --smoke: *_quick.json / *_smoke.json)")
    p.add_argument("--model-path", type=Path, help="a checkpoint directory instead of the model alias")
    p.add_argument("--work-dir", type=Path, help="where data and runs go (default: a temporary directory)")
    p.add_argument("--keep-work-dir", action="store_true")
    p.add_argument("--max-wait", type=float, default=max_wait,
                   help=f"seconds to wait for other busy processes before each configuration (default {max_wait:.0f})")
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds allowed per child (default {timeout:.0f})")
    p.add_argument("--retries", type=int, default=None,
                   help="measure a configuration again when other processes used the CPU meanwhile (default 1; "
                        "0 with --smoke)")
    p.add_argument("--max-foreign-cores", type=float, default=0.1,
                   help="mean cores used by other processes above which a measurement counts as contended")
    p.add_argument("--force-retry", action="store_true", help=argparse.SUPPRESS)  # test hook, see measure_rows
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)


def finish_args(args, *, full: dict, quick: dict, smoke: dict, default_out: Path | None = None,
                smoke_configs: Sequence[str] | None = None):
    """Fill the sizes the mode sets (an explicit argument wins), the result file and, for ``--smoke``, the rows
    (``smoke_configs``, TRL rows dropped where TRL is not installed) and no quiet-machine wait or retries (unless
    ``--retries`` is given; ``--force-retry`` asks for at least one)."""
    base = smoke if args.smoke else quick if args.quick else full
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if default_out is not None and getattr(args, "out", None) is None:
        suffix = "_smoke" if args.smoke else "_quick" if args.quick else ""
        args.out = default_out.with_name(default_out.stem + suffix + default_out.suffix)
    if getattr(args, "retries", 0) is None:
        args.retries = 0 if args.smoke else 1
    if getattr(args, "force_retry", False):
        args.retries = max(args.retries, 1)
    if args.smoke:
        args.max_wait = 0.0
        if smoke_configs is not None and getattr(args, "configs", None) is None:
            args.configs = ",".join(c for c in smoke_configs if not c.startswith("trl") or peer_installed("trl"))
    return args


def peer_installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def config_names(args, configs: Sequence[str], default_configs: Sequence[str]) -> list[str]:
    names = args.configs.split(",") if getattr(args, "configs", None) else list(default_configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(configs)}")
    return names


def smoke_model(work: Path, *, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with alignline's byte-level test tokenizer, saved in ``work``."""
    import torch
    from transformers import LlamaForCausalLM

    from alignline.models import load_tokenizer, make_tiny_tokenizer, save_model, tiny_causal_lm_config

    out = work / "tiny-model"
    if (out / "config.json").exists():
        return out
    make_tiny_tokenizer(work / "tiny-tokenizer")
    tokenizer = load_tokenizer(work / "tiny-tokenizer")
    torch.manual_seed(seed)
    save_model(LlamaForCausalLM(tiny_causal_lm_config(vocab_size=len(tokenizer))), tokenizer, out)
    return out


def model_path(args, work: Path, alias: str = "smollm2-135m-instruct") -> str:
    """``--model-path``, else the tiny model (``--smoke``), else the alias's local checkpoint."""
    if getattr(args, "model_path", None):
        return str(args.model_path)
    if args.smoke:
        return str(smoke_model(work, seed=args.seed))
    from alignline.models import resolve_model

    return str(resolve_model(alias))


# --------------------------------------------------------------------------- what alignline's runs record

def stage_steps(out_dir: str | Path) -> dict[str, Any]:
    """:func:`alignline.telemetry.read_run` of a finished alignline run, each step record also under the names
    the benchmarks report (``seconds``, ``fwd_s``, ``bwd_s``, ``clip_opt_s``, ``pairs``)."""
    from alignline.telemetry import read_run

    recorded = read_run(out_dir)
    recorded["steps"] = [{**rec, "seconds": rec["time/step_s"], "fwd_s": rec["time/forward_s"],
                          "bwd_s": rec["time/backward_s"], "clip_opt_s": rec["time/optimizer_s"],
                          "pairs": int(rec["units"])} for rec in recorded["steps"]]
    return recorded


def step_split(steps: Sequence[dict]) -> dict[str, float]:
    """Forward / backward / clip+optimizer seconds over ``steps`` (either side's per-step records)."""
    return {"forward": sum(s.get("fwd_s", 0.0) for s in steps),
            "backward": sum(s.get("bwd_s", s.get("bwd_clip_s", 0.0)) for s in steps),
            "clip+optimizer": sum(s.get("clip_opt_s", s.get("opt_s", 0.0)) for s in steps)}


# --------------------------------------------------------------------------- the hardware limit

TRIALS = 5


def matmul_limit(config: dict[str, Any], tokens: int, *, device: str = "cpu", threads: int | None = None,
                 seconds: float = 2.0) -> dict[str, Any]:
    """fp32 matmul throughput on the model's own layer shapes (``alignline.telemetry.matmul_shapes``), measured
    now: each shape is run for about ``seconds / shapes`` seconds after one warm-up, in ``TRIALS`` trials of which
    the fastest counts; the limit is the whole pass's matmul FLOPs over its time at the measured rates (each shape
    weighted by how often a pass runs it). This is the ceiling for the useful-FLOP throughput a training row
    reports (``share of limit`` = row's / this)."""
    import torch

    from alignline.telemetry import matmul_shapes

    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    shapes = matmul_shapes(config, tokens)
    by_shape, flops_total, time_total = {}, 0.0, 0.0
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (m, k, n, per_layer) in shapes.items():
        a = torch.randn(m, k, device=dev, generator=g)
        b = torch.randn(k, n, device=dev, generator=g)
        torch.mm(a, b)
        sync()
        rate = 0.0
        for _ in range(TRIALS):  # the best trial: another process taking the CPU for a moment only lowers one
            reps, t0 = 0, time.perf_counter()
            while True:
                torch.mm(a, b)
                reps += 1
                sync()
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / len(shapes) / TRIALS:
                    break
            rate = max(rate, 2.0 * m * k * n * reps / elapsed)
        by_shape[name] = {"shape": [m, k, n], "gflops": round(rate / 1e9, 2)}
        weight = per_layer * config["num_hidden_layers"]
        flops_total += weight * 2.0 * m * k * n
        time_total += weight * 2.0 * m * k * n / rate
    return {"flops_per_s": flops_total / time_total, "gflops": round(flops_total / time_total / 1e9, 2),
            "tokens": tokens, "dtype": "float32", "device": device, "threads": torch.get_num_threads(),
            "by_shape": by_shape}


def share_of_limit(flops: float, seconds: float, limit: dict[str, Any] | None) -> float | None:
    """Useful FLOPs per second over the measured matmul limit (None when either is missing)."""
    if not limit or not seconds or not flops:
        return None
    return flops / seconds / limit["flops_per_s"]


def model_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def measure_limit(args, model_dir: str | Path, tokens: int, *, device: str = "cpu", log=print) -> dict[str, Any]:
    """:func:`matmul_limit` for the benchmark's model at ``tokens`` tokens (a brief probe with ``--smoke``)."""
    limit = matmul_limit(model_config(model_dir), tokens, device=device, threads=args.threads,
                         seconds=0.3 if args.smoke else 4.0)
    log(f"fp32 matmul limit on the model's layer shapes ({tokens} tokens): {limit['gflops']:.1f} GFLOP/s")
    return limit


def percent(share: float | None) -> float | None:
    return None if share is None else 100 * share
