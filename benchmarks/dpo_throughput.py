"""DPO throughput: ``alignline dpo`` against TRL 1.16's DPOTrainer on ShareGPT pairs (2 CPU cores, fp32).

    .venv/bin/python benchmarks/dpo_throughput.py            # the full run (about an hour on 2 cores)
    .venv/bin/python benchmarks/dpo_throughput.py --quick    # a short run (8 pairs, batch 2, max_length 256)
    .venv/bin/python benchmarks/dpo_throughput.py --smoke    # CI smoke run (tiny random model, 4 pairs, seconds)

What it does:

1. Builds ``--pairs`` preference pairs from the ShareGPT asset (seeded, deterministic): the prompt is a
   conversation's history up to a user turn, rendered with SmolLM2's chat template (prompt lengths spread
   evenly over [256/512, 416/512] x max_length, mean ~336 tokens at max_length 512); ``chosen`` is that
   turn's own assistant answer and ``rejected`` another conversation's answer, both cut at token boundaries
   to at most ``max_length - prompt`` tokens (end token included), so that no sequence needs truncating
   and both libraries see exactly the same tokens (mean ~176 at max_length 512). The pairs are written once:
   as alignline Pair records (prompt = messages) and, for TRL, in TRL's plain-text layout (prompt = the
   template-rendered prompt string with the generation prompt, chosen/rejected = the raw answers; TRL
   appends the end token ``<|im_end|>``). The plain-text layout is used because with conversational data
   TRL also trains on the ``"\\n"`` the ChatML template writes after ``<|im_end|>`` (tests/test_trl_parity.py).
2. Runs each configuration in its own child process, one after another, never side by side, with
   ``--threads`` torch threads: fp32, no gradient checkpointing, batch ``--batch-size`` pairs, no gradient
   accumulation, one epoch, DPO (sigmoid) beta 0.1, AdamW lr ``--lr``, linear schedule, no warm-up,
   gradient clipping at 1.0, reference log-probs computed once before training by the starting policy.

   * ``alignline-shared`` / ``alignline-separate``: ``alignline.stages.dpo.run`` with ``pair_layout``
     shared (prompt + chosen + rejected in one row, prompt computed once) / separate (two rows per pair),
     ``ref_batch_size`` ``--ref-batch-size``, ``reference: null`` (the starting policy).
     ``alignline-shared-gc``: shared with ``train.gradient_checkpointing`` on.
     ``alignline-lowmem``: shared, micro-batch 1 with ``--batch-size`` accumulation steps (the same pairs
     per optimizer step, hence the same losses) and gradient checkpointing: alignline's memory-lean setting.
     ``alignline-fast``: as lowmem, with ``train.selective_layers`` and ``train.free_memory`` trim (the default)
     instead of unmap. The rows set ``train.free_memory`` explicitly (see each row's ``train``).
   * ``trl``: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` and ``ref_model=None``, as TRL recommends (it then
     computes the reference log-probs with the policy itself in ``__init__`` and holds no second model),
     ``precompute_ref_batch_size`` = the train batch size, ``truncation_mode`` keep_start (nothing is cut).
     The dataset is put in alignline's (shared layout) batch order and read sequentially, so every TRL
     step sees exactly the pairs of the same alignline step; losses are compared step by step.

   By default ``alignline-fast`` and ``trl`` run; ``--configs`` picks others, and ``--merge`` keeps the rows
   of configurations measured earlier into the same ``--out`` file (same settings and data only).

3. Times, inside each child, the reference pass and the training loop separately. alignline: the phases the
   dpo stage records itself (``manifest.json: phases``: ``reference``, ``train``, ``checkpoint``, with their
   tokens, useful FLOPs and peak memory) and the per-step figures of its ``metrics.jsonl`` (forward, backward,
   clip+optimizer seconds); nothing of the package is replaced. TRL: a subclass timing
   ``_precompute_ref_logps``, and ``trainer.train()``. ``train`` excludes the final resumable checkpoint
   alignline writes (its own phase, reported separately; TRL runs with ``save_strategy="no"``); model loading,
   tokenisation and alignline's final model save are outside both. pairs/s = pairs / (reference + train).
   Per-step times (forward+backward+optimizer, batch collation excluded) are recorded on both sides too.
   Peak RSS is the child's own high-water mark (VmHWM: whole process, everything included); per-phase peaks
   come from the stage's phases (alignline) or a thread sampling ``/proc/self/statm`` every 10 ms (TRL).
4. Share of the limit: useful FLOPs per second (``alignline.telemetry.useful_flops``: 6 x body
   parameters x real tokens + 6 x head parameters x positions whose logits are computed; 2 x for the reference
   pass; alignline computes logits at response positions only, TRL at every position) over the fp32 matmul
   throughput the parent measures in the same run on the model's own layer shapes
   (``benchmarks/common.py: matmul_limit``), for the training steps and for the reference pass.

Results: a table and ratios on stdout, and ``benchmarks/results/dpo_throughput.json``. Parity with TRL (tokens,
reference log-probs, losses) is ``tests/test_trl_parity.py``'s to check, not this benchmark's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (benchmarks/ is sys.path[0]): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness
from benchmarks.common import (
    GB,
    add_common_args,
    config_names,
    finish_args,
    machine_info,
    markdown_table,
    measure_limit,
    percent,
    share_of_limit,
    stage_steps,
    step_split,
)
from benchmarks.preference_data import MODEL, build_data, log

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dpo_throughput.json"

FULL = {"pairs": 64, "batch_size": 4, "max_length": 512, "ref_batch_size": 4}
QUICK = {"pairs": 8, "batch_size": 2, "max_length": 256, "ref_batch_size": 2}
SMOKE = {"pairs": 4, "batch_size": 2, "max_length": 96, "ref_batch_size": 2}

SELECTIVE_LAYERS = 4  # alignline-fast: layers keeping matmul outputs, sized to stay under 1/4 of TRL's memory

CONFIGS = {
    "alignline-shared": {"side": "alignline", "layout": "shared", "label": "alignline dpo (shared prefix)"},
    "alignline-separate": {"side": "alignline", "layout": "separate", "label": "alignline dpo (separate rows)"},
    "alignline-shared-gc": {"side": "alignline", "layout": "shared", "gc": True,
                            "label": "alignline dpo (shared prefix, gradient checkpointing)"},
    "alignline-lowmem": {"side": "alignline", "layout": "shared", "gc": True, "micro_batch": 1,
                         "train": {"free_memory": "unmap"},
                         "label": "alignline dpo (shared prefix, micro-batch 1 x accumulation, checkpointing, "
                                  "freed memory to the OS)"},
    "alignline-fast": {"side": "alignline", "layout": "shared", "gc": True, "micro_batch": 1,
                       "train": {"selective_layers": SELECTIVE_LAYERS, "free_memory": "trim"},
                       "label": f"alignline dpo (shared prefix, micro-batch 1 x accumulation, checkpointing, "
                                f"{SELECTIVE_LAYERS} of 30 layers selective, heap trimmed)"},
    "trl": {"side": "trl", "label": "TRL 1.16 DPOTrainer"},
}
DEFAULT_CONFIGS = ("alignline-fast", "trl")
SMOKE_CONFIGS = DEFAULT_CONFIGS
GOAL_SPEEDUP, GOAL_MEMORY = 1.5, 0.25
PARITY = ("parity with TRL (same tokens, reference log-probs and losses) is checked by tests/test_trl_parity.py, "
          "not here")


# --------------------------------------------------------------------------- children

def child_alignline(spec: dict) -> dict:
    """``alignline.stages.dpo.run`` as a user runs it; the figures are the ones the stage records itself."""
    import torch

    torch.set_num_threads(spec["threads"])
    from alignline.stages.dpo import DPOConfig, run

    out_dir = Path(spec["run_dir"])  # fresh for every attempt (harness.measure_rows)
    cfg = DPOConfig(
        model=spec["model_path"], reference=None, output_dir=str(out_dir), dtype="float32", resume=False,
        pair_layout=spec["layout"], ref_batch_size=spec["ref_batch_size"],
        data={"train": spec["data"], "max_length": spec["max_length"], "max_drop_fraction": 0.0},
        loss={"type": "dpo", "beta": spec["beta"]},
        train={"epochs": 1, "batch_size": spec["batch_size"], "grad_accum": spec["grad_accum"], "lr": spec["lr"],
               "warmup_steps": 0, "schedule": "linear", "seed": spec["seed"], "log_every": 1, "save_every": None,
               "keep_checkpoints": 1, "mixed_precision": "bf16" if spec.get("device") == "cuda" else "no",
               "gradient_checkpointing": spec["gradient_checkpointing"],
               "max_grad_norm": 1.0, "weight_decay": 0.0, **spec.get("train", {})},
    )
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    recorded = stage_steps(out_dir)
    ph = recorded["phases"]
    checkpoint_s = ph.get("checkpoint", {}).get("seconds", 0.0)  # none unless the run keeps or resumes one
    steps = [{"step": r["step"], "seconds": r["seconds"], "loss": r["loss"], "tokens": r["tokens"],
              "logit_positions": r["logit_positions"], "flops": r["flops"], "pairs": r["pairs"],
              "margin": r.get("rewards/margin"), "grad_norm": r.get("grad_norm"),
              **{k: r[k] for k in ("fwd_s", "bwd_s", "clip_opt_s")},
              **{k: r[k] for k in r if k.startswith("mem/")}} for r in recorded["steps"]]
    ref = json.loads((out_dir / "ref_logps.json").read_text())
    return {
        "reference_s": ph["reference"]["seconds"], "reference_flops": ph["reference"].get("flops", 0),
        "train_s": ph["train"]["seconds"] - checkpoint_s, "checkpoint_save_s": checkpoint_s,
        "model_save_s": ph["save_model"]["seconds"], "run_seconds": wall, "steps": steps, "phases": ph,
        "ref_logps": dict(zip(ref["ids"], ref["values"])), "counts": recorded["counts"],
        "rss": {"peaks_gb": {name: ph[name]["peak_rss_gb"] for name in ("reference", "train")}},
        "torch_threads": torch.get_num_threads(), "optimizer": "torch.optim.AdamW (fused)", **gpu_memory(ph),
    }


def gpu_memory(phases: dict | None = None) -> dict:
    """Peak CUDA memory of this process (allocated by tensors / reserved by the caching allocator), if any: from
    an alignline run's recorded ``phases`` (its telemetry resets torch's peak statistics at every phase and step),
    else from torch."""
    import torch

    if not torch.cuda.is_available():
        return {}
    if phases is not None:
        peaks = phases["process"]
        return {"gpu": torch.cuda.get_device_name(), "gpu_peak_allocated_gb": peaks.get("peak_allocated_gb"),
                "gpu_peak_reserved_gb": peaks.get("peak_reserved_gb")}
    return {"gpu": torch.cuda.get_device_name(), "gpu_peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
            "gpu_peak_reserved_gb": torch.cuda.max_memory_reserved() / GB}


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from benchmarks.peer_clock import RssSampler, TrlClock, step_times

    sampler = RssSampler()
    sampler.start()
    sampler.set_phase("load")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignline.telemetry import param_counts, useful_flops

    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines() if x.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    ref_model = None
    if spec.get("trl_ref_model"):
        ref_model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    times: dict[str, float] = {"reference": 0.0}
    ref_batches: list[list[int]] = []
    ref_tokens: list[int] = []
    clock = TrlClock(sampler)

    class Timed(clock.trainer(DPOTrainer)):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            sampler.set_phase("reference")
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            times["reference"] += time.perf_counter() - t0
            sampler.set_phase("prepare")
            return out

        def compute_ref_log_probs(self, model, inputs):
            ref_batches.append(list(inputs["input_ids"].shape))
            mask = inputs.get("attention_mask")
            ref_tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().compute_ref_log_probs(model, inputs)


    args = DPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_length=spec["max_length"], beta=spec["beta"], loss_type="sigmoid", precompute_ref_log_probs=True,
        bf16=spec.get("device") == "cuda", fp16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=spec.get("device") != "cuda", num_train_epochs=1, learning_rate=spec["lr"], warmup_steps=0, lr_scheduler_type="linear",
        dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True, train_sampling_strategy="sequential",
        max_grad_norm=1.0, weight_decay=0.0,
    )
    sampler.set_phase("prepare")
    t0 = time.perf_counter()
    trainer = Timed(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                    callbacks=[clock.callback()])
    init_s = time.perf_counter() - t0
    ds = trainer.train_dataset
    expected = spec["expected"]
    ids_equal = all(list(ds[i]["prompt_ids"]) == e["prompt"] and list(ds[i]["chosen_ids"]) == e["chosen"]
                    and list(ds[i]["rejected_ids"]) == e["rejected"] for i, e in enumerate(expected))
    ref_logps = {e["id"]: [float(ds[i]["ref_chosen_logps"]), float(ds[i]["ref_rejected_logps"])]
                 for i, e in enumerate(expected)}
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    rss = sampler.stop()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = param_counts(model)  # TRL computes logits at every position: useful at every real one
    steps = []
    for i, (t, b) in enumerate(zip(clock.steps, clock.batches)):
        steps.append({"step": i + 1, **step_times(t), "loss": b["loss"],
                      "logged_loss": losses[i] if i < len(losses) else None,
                      "shape": b["shape"], "real_tokens": b["real_tokens"], "rss_after_fwd_gb": b["rss_after_fwd_gb"],
                      "flops": useful_flops(*params, b["real_tokens"], b["real_tokens"], grad=True)})
    return {
        "reference_s": times["reference"], "train_s": train_s, "init_s": init_s,
        "reference_flops": sum(useful_flops(*params, n, n, grad=False) for n in ref_tokens),
        "prepare_s": init_s - times["reference"], "steps": steps, "ref_logps": ref_logps,
        "tokenisation_equals_alignline": ids_equal, "reference_batches": ref_batches,
        "ref_model": "separate model passed" if ref_model is not None else
                     ("none (the policy computes the precompute)" if trainer.ref_model is None else "created by TRL"),
        "train_metrics": out.metrics, "rss": rss, "torch_threads": torch.get_num_threads(),
        "optimizer": str(args.optim), **gpu_memory(),
    }


# --------------------------------------------------------------------------- parent

def summarise(name: str, child: dict, rss_gb: float, wall_s: float, n_pairs: int, limit: dict | None) -> dict:
    steps = child["steps"]
    ref_s, train_s = child["reference_s"], child["train_s"]
    total = ref_s + train_s
    step_s = sum(s["seconds"] for s in steps)
    flops = sum(s["flops"] for s in steps)
    peaks = child["rss"]["peaks_gb"]
    return {
        "train_useful_gflops_s": flops / step_s / 1e9, "share_of_limit": share_of_limit(flops, step_s, limit),
        "reference_share_of_limit": share_of_limit(child["reference_flops"], ref_s, limit),
        "config": name, "label": CONFIGS[name]["label"], "steps": len(steps), "reference_s": ref_s,
        "train_s": train_s, "total_s": total, "pairs_per_s": n_pairs / total, "s_per_pair": total / n_pairs,
        "train_pairs_per_s": n_pairs / train_s, "reference_pairs_per_s": n_pairs / ref_s,
        "step_s_sum": step_s, "s_per_step": step_s / len(steps), "peak_rss_gb": rss_gb,
        "rss_reference_gb": peaks.get("reference"), "rss_train_gb": peaks.get("train"),
        "first_step_loss": steps[0]["loss"], "child_wall_s": wall_s, "step_split_s": step_split(steps),
        "per_step": steps,
    }


def run_config(name: str, run_dir: Path, args, data: dict, work: Path, env: dict, limit: dict | None
               ) -> tuple[dict | None, dict | None]:
    """One configuration in its own child process; returns (result row, None) or (None, failure)."""
    cfg, d = CONFIGS[name], data["info"]
    spec = {"model_path": data["model_path"], "batch_size": args.batch_size, "max_length": args.max_length,
            "seed": args.seed, "threads": args.threads, "lr": args.lr, "beta": args.beta,
            "ref_batch_size": args.ref_batch_size, "run_dir": str(run_dir), "device": args.device}
    if cfg["side"] == "alignline":
        micro = cfg.get("micro_batch", args.batch_size)
        if args.batch_size % micro:
            raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of {name}'s micro-batch {micro}")
        spec.update(data=d["path"], layout=cfg["layout"], gradient_checkpointing=bool(cfg.get("gc")),
                    batch_size=micro, grad_accum=args.batch_size // micro, train=cfg.get("train", {}))
    else:
        spec.update(data=d["trl_path"], expected=data["expected_trl"], trl_ref_model=args.trl_ref_model)
    log(f"\n[{name}] waiting for a quiet machine ...")
    child, res, quiet = harness.run_in_child(__file__, name, spec, args, work, env, log=log)
    if child is None:
        return None, harness.failure_of(res)
    row = summarise(name, child, res.peak_rss_gb, res.wall_s, d["pairs"], limit)
    row["quiet_before"], row["contention"] = quiet, res.contention
    row["details"] = {k: v for k, v in child.items() if k not in ("steps", "ref_logps")}
    row["ref_logps"] = child["ref_logps"]
    c = res.contention or {}
    log(f"[{name}] reference {row['reference_s']:.1f}s + train {row['train_s']:.1f}s = {row['total_s']:.1f}s "
        f"({row['pairs_per_s']:.3f} pairs/s, {row['s_per_pair']:.2f} s/pair), peak RSS {row['peak_rss_gb']:.2f} GB, "
        f"first-step loss {row['first_step_loss']:.6f}, child wall {res.wall_s:.0f}s, "
        f"other processes {c.get('foreign_cores_mean', 0):.2f} cores (max {c.get('foreign_cores_max', 0):.2f})")
    sp = row["step_split_s"]
    log(f"[{name}] steps: {row['step_s_sum']:.1f}s = forward {sp['forward']:.1f}s + backward {sp['backward']:.1f}s + "
        f"clip/optimizer {sp['clip+optimizer']:.1f}s; RSS peaks by phase {child['rss']['peaks_gb']}")
    return row, None


def expected_steps(name: str, args, pairs: int) -> int | None:
    """Optimizer steps an alignline row's one epoch takes (None for TRL): micro-batches of ``micro_batch`` pairs,
    ``--batch-size / micro_batch`` of them per step, a partial last one included (``train.loop``)."""
    cfg = CONFIGS[name]
    if cfg["side"] != "alignline":
        return None
    micro = cfg.get("micro_batch", args.batch_size)
    return math.ceil(math.ceil(pairs / micro) / (args.batch_size // micro))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, help=f"preference pairs (default {FULL['pairs']})")
    p.add_argument("--batch-size", type=int, help=f"pairs per optimizer step (default {FULL['batch_size']})")
    p.add_argument("--max-length", type=int, help=f"max prompt + response tokens (default {FULL['max_length']})")
    p.add_argument("--ref-batch-size", type=int,
                   help=f"alignline ref_batch_size (default {FULL['ref_batch_size']}, TRL's precompute batch)")
    p.add_argument("--lr", type=float, default=5e-7, help="peak learning rate (default 5e-7, linear decay)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of other configurations already in --out (same settings and data)")
    p.add_argument("--trl-ref-model", action="store_true",
                   help="give TRL an explicit ref_model (a second copy in memory) instead of ref_model=None")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: fp32 (the default); cuda: fp32 weights with bf16 autocast on both sides")
    p.add_argument("--data-dir", type=Path,
                   help="use pairs.jsonl from an earlier run's work dir instead of selecting from ShareGPT")
    p.add_argument("--repeat-data", type=int, default=1, help="with --data-dir: use each pair this many times")
    p.add_argument("--build-data-only", action="store_true", help="write the pairs into --work-dir and stop")
    add_common_args(p, configs=list(CONFIGS), default_configs=DEFAULT_CONFIGS, default_out=DEFAULT_OUT)
    return finish_args(p.parse_args(argv), full=FULL, quick=QUICK, smoke=SMOKE, default_out=DEFAULT_OUT,
                       smoke_configs=SMOKE_CONFIGS)


def command_line(argv: list[str]) -> str:
    return " ".join([".venv/bin/python", "benchmarks/dpo_throughput.py", *argv])


def settings_of(args) -> dict[str, Any]:
    return {"model": MODEL, "pairs": args.pairs, "batch_size": args.batch_size, "max_length": args.max_length,
            "ref_batch_size": args.ref_batch_size, "trl_precompute_batch_size": args.batch_size, "lr": args.lr,
            "beta": args.beta, "loss": "dpo / sigmoid", "schedule": "linear, no warm-up", "seed": args.seed,
            "threads": args.threads, "dtype": "float32", "epochs": 1,
            "grad_accum": "1, except alignline-lowmem and alignline-fast: micro-batch 1 x batch-size "
                          "accumulation steps",
            "gradient_checkpointing": "off, except in the alignline-shared-gc, alignline-lowmem and "
                                      "alignline-fast rows",
            "trl_ref_model": "explicit copy" if args.trl_ref_model else "None (TRL's recommended setting)"}


def previous_rows(args, settings: dict, data_info: dict) -> list[dict]:
    """Rows of an earlier run written to ``args.out`` with the same settings and data (for ``--merge``)."""
    if not args.out.exists():
        return []
    old = json.loads(args.out.read_text())
    descriptive = ("grad_accum", "gradient_checkpointing")  # texts describing the rows, not settings
    if {k: v for k, v in old.get("settings", {}).items() if k not in descriptive} != {
            k: v for k, v in settings.items() if k not in descriptive} or old.get("data", {}).get("tokens") != data_info["tokens"]:
        log(f"--merge: {args.out} has other settings or data; not merging")
        return []
    return old.get("results", [])


def report(rows: list[dict], failures: dict, args, argv: list[str], settings: dict, data_info: dict,
           limit: dict, final: bool) -> int:
    """Ratios, goal and the table; writes the results JSON (also after each configuration)."""
    order = list(CONFIGS)
    rows = sorted(rows, key=lambda r: order.index(r["config"]))
    by = {r["config"]: r for r in rows}
    ratios: dict[str, float] = {}
    goal: dict[str, Any] = {}
    for name in CONFIGS:
        a, b = by.get(name), by.get("trl")
        if a is None or b is None or name == "trl":
            continue
        r = {"pairs/s (reference + train)": a["pairs_per_s"] / b["pairs_per_s"],
             "pairs/s (train only)": a["train_pairs_per_s"] / b["train_pairs_per_s"],
             "pairs/s (reference pass only)": a["reference_pairs_per_s"] / b["reference_pairs_per_s"],
             "peak RSS": a["peak_rss_gb"] / b["peak_rss_gb"]}
        ratios.update({f"{name} / trl: {k}": v for k, v in r.items()})
        goal[name] = {"speedup": r["pairs/s (reference + train)"], "memory_fraction": r["peak RSS"],
                      "speed_goal_met": r["pairs/s (reference + train)"] >= GOAL_SPEEDUP,
                      "memory_goal_met": r["peak RSS"] <= GOAL_MEMORY}
        goal[name]["met"] = goal[name]["speed_goal_met"] and goal[name]["memory_goal_met"]

    columns = [("label", "configuration", ""), ("reference_s", "reference pass (s)", ".1f"),
               ("train_s", "training (s)", ".1f"), ("total_s", "total (s)", ".1f"),
               ("pairs_per_s", "pairs/s", ".4f"), ("s_per_pair", "s/pair", ".2f"),
               ("train_pairs_per_s", "train-only pairs/s", ".4f"), ("share_pct", "share of limit, training (%)", ".1f"),
               ("reference_share_pct", "share of limit, ref pass (%)", ".1f"), ("peak_rss_gb", "peak RSS (GB)", ".2f"),
               ("rss_reference_gb", "RSS ref pass (GB)", ".2f"), ("rss_train_gb", "RSS training (GB)", ".2f"),
               ("first_step_loss", "first-step loss", ".6f"), ("foreign", "other load (cores)", ".2f")]
    for r in rows:
        r["foreign"] = (r.get("contention") or {}).get("foreign_cores_mean")
        r["share_pct"], r["reference_share_pct"] = percent(r["share_of_limit"]), percent(r["reference_share_of_limit"])
    table = markdown_table(rows, columns)
    cmd = command_line(argv)
    if final:
        log("\n" + table + "\n")
        log(f"  limit: fp32 matmul {limit['gflops']:.1f} GFLOP/s on the model's layer shapes ({limit['tokens']} tokens)")
        for k, v in ratios.items():
            log(f"  {k}: {v:.2f}x")
        for name, g in goal.items():
            log(f"  goal ({name}: >= {GOAL_SPEEDUP}x TRL pairs/s at <= {GOAL_MEMORY:.0%} of its peak RSS): "
                f"{'MET' if g['met'] else 'NOT MET'} (speed {g['speedup']:.2f}x, memory {g['memory_fraction']:.2f}x)")
        if failures:
            log(f"  failed: {', '.join(failures)}")
    result = {
        "benchmark": "dpo_throughput", "command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": settings,
        "timed": "reference = the pass computing reference log-probs before training; train = the training loop "
                 "(all optimizer steps incl. batch collation) without alignline's final resumable checkpoint; "
                 "pairs/s = pairs / (reference + train). Peak RSS = the child's ru_maxrss (whole process).",
        "machine": machine_info(), "limit": limit, "data": data_info, "results": rows, "ratios": ratios, "goal": goal,
        "checks": PARITY, "failures": failures, "table_markdown": table, "complete": final,
    }
    harness.write_json(args.out, result)
    if final:
        log(f"\nwrote {args.out}\ncommand: {cmd}")
    return 1 if failures else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return harness.child_main(args, {n: child_alignline if c["side"] == "alignline" else child_trl
                                         for n, c in CONFIGS.items()})
    names = config_names(args, CONFIGS, DEFAULT_CONFIGS)
    work = harness.new_work_dir(args, "alignline-dpo-bench-")
    log(f"dpo throughput: pairs={args.pairs} batch={args.batch_size} max_length={args.max_length} "
        f"ref_batch={args.ref_batch_size} lr={args.lr} threads={args.threads}; configs {names}; work dir {work}")
    data = build_data(args, work)
    d = data["info"]
    if args.build_data_only:
        log(f"wrote {work / 'pairs.jsonl'} ({d['pairs']} pairs)")
        return 0
    t = d["tokens"]
    log(f"data: {d['pairs']} pairs; tokens mean prompt {t['prompt']['mean']} chosen {t['chosen']['mean']} rejected "
        f"{t['rejected']['mean']}; prompt+longer response max {t['prompt_plus_longer_response']['max']}; "
        f"{d['truncated']} truncated ({d['seconds']}s)")
    settings = settings_of(args)
    rows = [r for r in previous_rows(args, settings, d) if r["config"] not in names] if args.merge else []
    if rows:
        log(f"--merge: keeping {[r['config'] for r in rows]} from {args.out}")
    # the limit on the shapes of a typical row (a shared-layout pair: prompt + chosen + rejected)
    limit = measure_limit(args, data["model_path"], round(t["shared_row"]["mean"]), device=args.device, log=log)

    env = harness.child_env(args.threads, {"TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets")})

    def report_so_far(done: list[dict], failures: dict) -> None:
        report(rows + done, failures, args, argv, settings, d, limit, final=False)

    measured, failures = harness.measure_rows(names, lambda n, run_dir: run_config(n, run_dir, args, data, work, env, limit),
                                      args, work=work, log=log, after_row=report_so_far,
                                      stage_steps=lambda n: expected_steps(n, args, d["pairs"]))
    code = report(rows + measured, failures, args, argv, settings, d, limit, final=True)
    harness.drop_work_dir(args, work)
    return code


if __name__ == "__main__":
    sys.exit(main())
