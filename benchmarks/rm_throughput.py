"""Reward-model training throughput: ``alignline rm`` against TRL 1.16's RewardTrainer (2 CPU cores, fp32).

    .venv/bin/python benchmarks/rm_throughput.py            # the full run (about 20-30 minutes on 2 cores)
    .venv/bin/python benchmarks/rm_throughput.py --quick    # a short run (8 pairs, batch 2, max_length 256, 2 steps)
    .venv/bin/python benchmarks/rm_throughput.py --smoke    # CI smoke run (tiny random model, 4 pairs, seconds)

What it does:

1. Builds ``--pairs`` preference pairs from the ShareGPT asset with the DPO benchmark's pair builder
   (``benchmarks/preference_data.py: build_data``, seeded, deterministic; prompt lengths spread evenly
   over [256/512, 416/512] x max_length, mean ~336 tokens at 512; chosen = the turn's own answer, rejected =
   another conversation's answer, both cut at token boundaries). The builder is called with
   ``max_length - 1`` because a reward model keeps the template's tail after the end token (ChatML's
   ``"\\n"`` after ``<|im_end|>``, ``keep_tail=True``): every ``prompt + response`` then has at most
   ``max_length`` tokens, nothing is cut by alignline and nothing is filtered out by TRL (which drops,
   rather than cuts, over-long pairs). The pairs are written once as alignline Pair records
   (prompt = messages) and, for TRL, in TRL's conversational explicit-prompt layout (prompt = the
   messages, chosen/rejected = one assistant message each), whose chat-template rendering gives exactly
   alignline's tokens (checked in the TRL child, pair by pair).
2. Runs each configuration in its own child process, one after another, never side by side, with
   ``--threads`` torch threads and ``torch.manual_seed(--seed)`` before the model is built: fp32, no
   gradient checkpointing, batch ``--batch-size`` pairs, no gradient accumulation, one epoch (or
   ``--max-steps``), Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)`` averaged over the pairs,
   AdamW lr ``--lr``, linear schedule, no warm-up, gradient clipping at 1.0, a fresh scalar head on
   SmolLM2-135M-Instruct.

   * ``alignline-shared`` (default) / ``alignline-separate`` (with ``--configs``):
     ``alignline.stages.rm.run`` with ``pair_layout`` shared (prompt + chosen + rejected in one row, the
     rejected part masked from the chosen one: the prompt is computed once) / separate (two rows per pair).
     No ``data.eval``: after training alignline scores the training pairs once more (its final
     evaluation, timed separately, outside the training numbers).
   * ``trl``: ``trl.RewardTrainer`` with ``AutoModelForSequenceClassification(num_labels=1, float32)``
     (two right-padded rows per pair: prompt + chosen and prompt + rejected), ``save_strategy="no"``,
     TRL's default optimizer (``adamw_torch_fused``). The dataset is put in alignline's batch order and read
     sequentially, so every TRL step sees exactly the pairs of the same alignline step.

3. Times, inside each child, every optimizer step (forward + backward + clipping + optimizer; batch
   collation outside) -- alignline: the ``time/step_s`` (and its forward / backward / optimizer laps) the
   training loop records for each step in ``metrics.jsonl``; TRL: a callback's ``on_step_begin`` ->
   ``on_step_end`` -- and the training loop as a whole (alignline: the ``train`` phase minus the
   ``checkpoint`` phase the rm stage records in ``manifest.json``; TRL: ``trainer.train()``). Nothing of the
   package is replaced. Training pairs/s = pairs trained / sum of step times. The whole child's wall time
   (imports, model load, tokenisation, training, alignline's final evaluation and model save) is reported
   too. Peak RSS is the child's own high-water mark (VmHWM, whole process); per-phase peaks come from the
   stage's phases (alignline) or a thread sampling ``/proc/self/statm`` (TRL).
4. Share of the limit: useful FLOPs (``alignline.telemetry.useful_flops``, 6 x body parameters x real
   tokens; the scalar head is negligible) per second of the timed steps, over the fp32 matmul throughput the
   parent measures in the same run on the model's own layer shapes (``benchmarks/common.py: matmul_limit``).
   After training the TRL child also scores its first batch with alignline's prefix-shared path and with
   TRL's padded path on the same (trained) model: the two must agree (a parity check of the layouts).

Results: a table and ratios on stdout, and ``benchmarks/results/rm_throughput.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
    percent,
    share_of_limit,
    stage_steps,
    step_split,
)
from benchmarks.preference_data import build_data, length_summary, pair_lengths

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "rm_throughput.json"
MODEL = "smollm2-135m-instruct"

FULL = {"pairs": 64, "batch_size": 4, "max_length": 512, "max_steps": None}
QUICK = {"pairs": 8, "batch_size": 2, "max_length": 256, "max_steps": 2}
SMOKE = {"pairs": 4, "batch_size": 2, "max_length": 96, "max_steps": 2}

CONFIGS = {
    "alignline-shared": {"side": "alignline", "layout": "shared", "label": "alignline rm (shared prefix)"},
    "alignline-separate": {"side": "alignline", "layout": "separate", "label": "alignline rm (separate rows)"},
    "trl": {"side": "trl", "label": "TRL 1.16 RewardTrainer"},
}
DEFAULT_CONFIGS = ("alignline-shared", "trl")
SMOKE_CONFIGS = DEFAULT_CONFIGS


def log(msg: str) -> None:
    print(msg, flush=True)


def head_digest(model) -> dict[str, Any]:
    """A fingerprint of the freshly initialised score head (to see whether both sides start from the same one)."""
    w = model.score.weight.detach().float().cpu()
    return {"sha1": hashlib.sha1(w.numpy().tobytes()).hexdigest()[:16], "norm": float(w.norm()),
            "first": [round(float(x), 6) for x in w.flatten()[:3]]}


# --------------------------------------------------------------------------- data (parent)

def build_rm_data(args, work: Path) -> dict[str, Any]:
    """The DPO benchmark's pairs (built at max_length - 1), tokenised as the RM stage does (keep_tail)."""
    from collections import Counter
    from dataclasses import asdict

    from alignline.data.io import read_pairs, write_records
    from alignline.models import load_tokenizer
    from alignline.train.pairs import pair_length, plan_bucketed, tokenise_pairs

    L = args.max_length
    builder_args = argparse.Namespace(pairs=args.pairs, batch_size=args.batch_size, max_length=L - 1, seed=args.seed,
                                      model_path=args.model_path, smoke=args.smoke)
    built = build_data(builder_args, work)  # writes work/pairs.jsonl (alignline layout) + a DPO-only TRL file
    (work / "pairs_trl.jsonl").unlink(missing_ok=True)  # DPO's plain-text layout: not used here
    t0 = time.perf_counter()
    al_path = Path(built["info"]["path"])
    tokenizer = load_tokenizer(built["model_path"])
    pairs = read_pairs(al_path)
    tok_counts: Counter = Counter()
    examples = tokenise_pairs(pairs, tokenizer, max_length=L, counts=tok_counts, max_drop_fraction=0.0,
                              keep_tail=True)
    if len(examples) != args.pairs or tok_counts.get("responses_truncated"):
        raise SystemExit(f"RM tokenisation kept {len(examples)} pairs, counts {dict(tok_counts)}")
    too_long = [e.id for e in examples if len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) > L]
    if too_long:
        raise SystemExit(f"{len(too_long)} pairs exceed max_length {L} (TRL would drop them): {too_long[:3]}")
    # the RM stage's own plan (make_plan: plan_bucketed over pair_length(layout) with train.seed, epoch 0)
    plan = plan_bucketed([pair_length(e, "shared") for e in examples], args.batch_size, args.seed, 0)
    n_steps = len(plan) if args.max_steps is None else min(len(plan), args.max_steps)
    trl_order = [i for mb in plan for i in mb]
    by_id = {p.id: p for p in pairs}
    trl_rows = []
    for i in trl_order:
        p = by_id[examples[i].id]
        trl_rows.append({"prompt": [{"role": m.role, "content": m.content} for m in p.prompt], "chosen": [{"role": "assistant", "content": p.chosen}],
                         "rejected": [{"role": "assistant", "content": p.rejected}]})
    trl_path = work / "pairs_trl_rm.jsonl"
    write_records(trl_path, trl_rows)

    P, C, R, shared = pair_lengths(examples)
    lengths = length_summary(P, C, R, shared)
    # tokens each side feeds the model per step, padding included (alignline shared: B rows of the widest
    # shared row; alignline separate / TRL: 2B rows of the widest prompt + response)
    trained = plan[:n_steps]
    computed_shared = [len(mb) * max(shared[i] for i in mb) for mb in trained]
    computed_two = [2 * len(mb) * max(P[i] + max(C[i], R[i]) for i in mb) for mb in trained]
    n_trained = sum(len(mb) for mb in trained)
    info = {
        **{k: built["info"][k] for k in ("source", "selection", "conversations_scanned", "candidates")},
        "path": str(al_path), "trl_path": str(trl_path),
        "builder": f"benchmarks/preference_data.py build_data at max_length {L - 1} (the RM keeps 1 tail token)",
        "pairs": len(examples), "steps": n_steps, "pairs_trained": n_trained,
        "tokens": lengths["tokens"], "truncated": tok_counts.get("responses_truncated", 0),
        "tokens_per_pair": lengths["tokens_per_pair"],
        "computed_tokens_per_pair_with_padding": {"shared_layout": round(sum(computed_shared) / n_trained, 1),
                                                  "two_rows": round(sum(computed_two) / n_trained, 1)},
        "seconds": round(built["info"]["seconds"] + time.perf_counter() - t0, 1),
    }
    expected = [{"id": examples[i].id, "chosen_ids": examples[i].prompt_ids + examples[i].chosen_ids,
                 "rejected_ids": examples[i].prompt_ids + examples[i].rejected_ids} for i in trl_order]
    shared_examples = [asdict(examples[i]) for i in trl_order]  # a TokenisedPair's fields, for the child's spec
    return {"info": info, "plan": plan, "expected_trl": expected, "shared_examples": shared_examples,
            "model_path": built["model_path"]}


# --------------------------------------------------------------------------- children

def child_alignline(spec: dict) -> dict:
    """``alignline.stages.rm.run`` as a user runs it; the figures are the ones the stage records itself."""
    import torch

    torch.set_num_threads(spec["threads"])
    from alignline.models import load_reward_model
    from alignline.stages.rm import RMConfig, run

    # the head the stage draws: a probe load after the same seed (the stage loads first thing after it)
    torch.manual_seed(spec["seed"])
    probe = load_reward_model(spec["model_path"], dtype="float32")
    info = {"head": head_digest(probe), "attn_implementation": getattr(probe.config, "_attn_implementation", None)}
    del probe
    torch.manual_seed(spec["seed"])  # the RM stage seeds only inside train(), after the head is built
    out_dir = Path(spec["run_dir"])  # fresh for every attempt (harness.measure_rows)
    cfg = RMConfig(
        model=spec["model_path"], output_dir=str(out_dir), dtype="float32", resume=False,
        pair_layout=spec["layout"], eval_batch_size=spec["batch_size"],
        data={"train": spec["data"], "max_length": spec["max_length"], "max_drop_fraction": 0.0},
        train={"epochs": 1, "max_steps": spec["max_steps"], "batch_size": spec["batch_size"], "grad_accum": 1,
               "lr": spec["lr"], "warmup_ratio": 0.0, "warmup_steps": 0, "schedule": "linear", "seed": spec["seed"],
               "log_every": 1, "save_every": None, "keep_checkpoints": 1, "mixed_precision": "no",
               "gradient_checkpointing": False, "max_grad_norm": 1.0, "weight_decay": 0.0},
    )
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    recorded = stage_steps(out_dir)
    ph = recorded["phases"]
    checkpoint_s = ph.get("checkpoint", {}).get("seconds", 0.0)  # none unless the run keeps or resumes one
    steps = [{"step": r["step"], "seconds": r["seconds"], "loss": r["loss"], "tokens_computed": r["tokens"],
              "flops": r["flops"], "pairs": r["pairs"], "accuracy": r.get("accuracy"),
              "margin": r.get("rewards/margin"), "grad_norm": r.get("grad_norm"),
              **{k: r[k] for k in ("fwd_s", "bwd_s", "clip_opt_s")},
              **{k: r[k] for k in r if k.startswith("mem/")}} for r in recorded["steps"]]
    evaluation = json.loads((out_dir / "eval.json").read_text())
    return {
        "train_s": ph["train"]["seconds"] - checkpoint_s, "train_call_s": ph["train"]["seconds"],
        "checkpoint_save_s": checkpoint_s, "final_eval_s": ph["final_eval"]["seconds"],
        "model_save_s": ph["save_model"]["seconds"], "run_seconds": wall, "steps": steps, "phases": ph,
        "counts": recorded["counts"], "rss": {"peaks_gb": {"train": ph["train"]["peak_rss_gb"]}},
        "final_eval": {k: evaluation.get(k) for k in ("split", "pairs", "accuracy", "margin_mean")},
        "torch_threads": torch.get_num_threads(), "optimizer": "torch.optim.AdamW (fused)", **info,
    }


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from benchmarks.peer_clock import RssSampler, TrlClock, step_times

    sampler = RssSampler()
    sampler.start()
    sampler.set_phase("load")
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from alignline.telemetry import param_counts, useful_flops

    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines() if x.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(spec["seed"])  # the fresh head is drawn here, as in the alignline child
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_path"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    head = head_digest(model)
    clock = TrlClock(sampler)
    Timed = clock.trainer(RewardTrainer)

    args = RewardConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_length=spec["max_length"], bf16=False, fp16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, num_train_epochs=1,
        max_steps=spec["max_steps"] if spec["max_steps"] is not None else -1, learning_rate=spec["lr"],
        lr_scheduler_type="linear", warmup_steps=0, dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True,
        train_sampling_strategy="sequential", max_grad_norm=1.0, weight_decay=0.0,
    )
    sampler.set_phase("prepare")
    t0 = time.perf_counter()
    trainer = Timed(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                    callbacks=[clock.callback()])
    init_s = time.perf_counter() - t0
    ds = trainer.train_dataset
    expected = spec["expected"]
    ids_equal = len(ds) == len(expected) and all(
        list(ds[i]["chosen_ids"]) == e["chosen_ids"] and list(ds[i]["rejected_ids"]) == e["rejected_ids"]
        for i, e in enumerate(expected))
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    sampler.set_phase("parity check")
    parity = layout_parity(trainer, spec, ds)
    rss = sampler.stop()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = param_counts(model)  # the scalar head runs at every position
    steps = []
    for i, (t, b) in enumerate(zip(clock.steps, clock.batches)):
        steps.append({"step": i + 1, **step_times(t), "loss": b["loss"],
                      "logged_loss": losses[i] if i < len(losses) else None,
                      "pairs": b["shape"][0] // 2, "shape": b["shape"], "real_tokens": b["real_tokens"],
                      "tokens_computed": b["shape"][0] * b["shape"][1], "rss_after_fwd_gb": b["rss_after_fwd_gb"],
                      "flops": useful_flops(*params, b["real_tokens"], b["real_tokens"], grad=True)})
    return {
        "train_s": train_s, "init_s": init_s, "steps": steps, "tokenisation_equals_alignline": ids_equal,
        "dataset_rows_after_filter": len(ds), "train_metrics": out.metrics, "rss": rss, "head": head,
        "attn_implementation": getattr(model.config, "_attn_implementation", None), "layout_parity": parity,
        "torch_threads": torch.get_num_threads(), "optimizer": str(args.optim),
    }


def layout_parity(trainer, spec: dict, ds) -> dict[str, Any]:
    """Rewards of the first batch on the trained model: TRL's padded rows vs alignline's prefix-shared row."""
    import torch

    from alignline.judges.reward import pair_rewards
    from alignline.train.pairs import TokenisedPair, collate_pairs

    model = trainer.model
    model.eval()
    B = spec["batch_size"]
    with torch.no_grad():
        batch = trainer.data_collator([{k: ds[i][k] for k in ("chosen_ids", "rejected_ids")} for i in range(B)])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        trl_c, trl_r = torch.chunk(logits.squeeze(-1).float(), 2)
        shared = collate_pairs([TokenisedPair(**e) for e in spec["shared_examples"][:B]],
                               trainer.processing_class.pad_token_id, "shared")
        al_c, al_r = pair_rewards(model, shared)
    diff = torch.cat([(al_c - trl_c).abs(), (al_r - trl_r).abs()])
    return {"pairs": B, "reward_abs_diff_max": float(diff.max()), "reward_abs_diff_mean": float(diff.mean()),
            "reward_abs_mean": float(torch.cat([trl_c, trl_r]).abs().mean()),
            "loss_trl_path": float(-torch.nn.functional.logsigmoid(trl_c - trl_r).mean()),
            "loss_shared_path": float(-torch.nn.functional.logsigmoid(al_c - al_r).mean())}


# --------------------------------------------------------------------------- parent

def summarise(name: str, child: dict, rss_gb: float, wall_s: float, limit: dict | None) -> dict:
    steps = child["steps"]
    pairs = sum(s["pairs"] for s in steps)
    step_s = sum(s["seconds"] for s in steps)
    later = steps[1:] or steps
    later_s = sum(s["seconds"] for s in later)
    peaks = child["rss"]["peaks_gb"]
    flops = sum(s["flops"] for s in steps)
    return {
        "useful_gflops_s": flops / step_s / 1e9, "share_of_limit": share_of_limit(flops, step_s, limit),
        "config": name, "label": CONFIGS[name]["label"], "steps": len(steps), "pairs": pairs,
        "step_s_sum": step_s, "s_per_step": step_s / len(steps), "train_pairs_per_s": pairs / step_s,
        "train_pairs_per_s_steps_2_on": sum(s["pairs"] for s in later) / later_s,
        "train_loop_s": child["train_s"], "loop_pairs_per_s": pairs / child["train_s"],
        "tokens_computed_per_pair": sum(s["tokens_computed"] for s in steps) / pairs,
        "peak_rss_gb": rss_gb, "rss_train_gb": peaks.get("train"), "first_step_loss": steps[0]["loss"],
        "last_step_loss": steps[-1]["loss"], "child_wall_s": wall_s, "step_split_s": step_split(steps),
        "per_step": steps,
    }


def run_config(name: str, run_dir: Path, args, data: dict, work: Path, env: dict, limit: dict | None
               ) -> tuple[dict | None, dict | None]:
    """One configuration in its own child process; returns (result row, None) or (None, failure)."""
    cfg, d = CONFIGS[name], data["info"]
    spec = {"model_path": data["model_path"], "batch_size": args.batch_size, "max_length": args.max_length,
            "max_steps": args.max_steps, "seed": args.seed, "threads": args.threads, "lr": args.lr,
            "run_dir": str(run_dir)}
    if cfg["side"] == "alignline":
        spec.update(data=d["path"], layout=cfg["layout"])
    else:
        spec.update(data=d["trl_path"], expected=data["expected_trl"], shared_examples=data["shared_examples"])
    log(f"\n[{name}] waiting for a quiet machine ...")
    child, res, quiet = harness.run_in_child(__file__, name, spec, args, work, env, log=log)
    if child is None:
        return None, harness.failure_of(res)
    row = summarise(name, child, res.peak_rss_gb, res.wall_s, limit)
    row["quiet_before"], row["contention"] = quiet, res.contention
    row["details"] = {k: v for k, v in child.items() if k != "steps"}
    c = res.contention or {}
    log(f"[{name}] {row['steps']} steps, {row['pairs']} pairs: steps {row['step_s_sum']:.1f}s "
        f"({row['train_pairs_per_s']:.3f} pairs/s, {row['s_per_step']:.2f} s/step), loop {row['train_loop_s']:.1f}s, "
        f"peak RSS {row['peak_rss_gb']:.2f} GB, first-step loss {row['first_step_loss']:.6f}, child wall "
        f"{res.wall_s:.0f}s, other processes {c.get('foreign_cores_mean', 0):.2f} cores "
        f"(max {c.get('foreign_cores_max', 0):.2f})")
    sp = row["step_split_s"]
    log(f"[{name}] steps: forward {sp['forward']:.1f}s + backward {sp['backward']:.1f}s + clip/optimizer "
        f"{sp['clip+optimizer']:.1f}s; RSS peaks by phase {child['rss']['peaks_gb']}")
    return row, None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, help=f"preference pairs (default {FULL['pairs']})")
    p.add_argument("--batch-size", type=int, help=f"pairs per optimizer step (default {FULL['batch_size']})")
    p.add_argument("--max-length", type=int, help=f"max prompt + response tokens (default {FULL['max_length']})")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch; --quick, --smoke: 2)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5, linear decay)")
    add_common_args(p, configs=list(CONFIGS), default_configs=DEFAULT_CONFIGS, default_out=DEFAULT_OUT,
                    max_wait=900.0)
    return finish_args(p.parse_args(argv), full=FULL, quick=QUICK, smoke=SMOKE, default_out=DEFAULT_OUT,
                       smoke_configs=SMOKE_CONFIGS)


def command_line(argv: list[str]) -> str:
    return " ".join([".venv/bin/python", "benchmarks/rm_throughput.py", *argv])


def parity_checks(by: dict[str, dict]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    trl = by.get("trl")
    if trl is not None:
        checks["TRL token ids == alignline token ids (every pair, tail included)"] = \
            trl["details"]["tokenisation_equals_alignline"]
        checks["TRL rows after its max_length filter"] = trl["details"]["dataset_rows_after_filter"]
        checks["TRL first batch after training: alignline shared-layout rewards vs TRL padded rows"] = \
            trl["details"]["layout_parity"]
    for name in ("alignline-shared", "alignline-separate"):
        al = by.get(name)
        if al is None or trl is None:
            continue
        same_head = al["details"].get("head", {}).get("sha1") == trl["details"]["head"]["sha1"]
        checks[f"{name} vs TRL: same initial score head (same seed before loading)"] = same_head
        la = [s["loss"] for s in al["per_step"]]
        lt = [s["loss"] for s in trl["per_step"]]
        checks[f"{name} vs TRL: first-step loss (alignline, TRL, |diff|)"] = [la[0], lt[0], abs(la[0] - lt[0])]
        checks[f"{name} vs TRL: per-step loss |diff| max over {len(la)} steps"] = max(
            abs(a - b) for a, b in zip(la, lt))
        checks[f"{name} vs TRL: last-step loss"] = [la[-1], lt[-1]]
    return checks


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return harness.child_main(args, {n: child_alignline if c["side"] == "alignline" else child_trl
                                         for n, c in CONFIGS.items()})
    names = config_names(args, CONFIGS, DEFAULT_CONFIGS)
    work = harness.new_work_dir(args, "alignline-rm-bench-")
    log(f"rm throughput: pairs={args.pairs} batch={args.batch_size} max_length={args.max_length} "
        f"max_steps={args.max_steps} lr={args.lr} threads={args.threads}; work dir {work}")
    log("waiting for a quiet machine before building the data ...")
    harness.quiet_gate(args.max_wait, log=log)
    data = build_rm_data(args, work)
    d = data["info"]
    t = d["tokens"]
    log(f"data: {d['pairs']} pairs, {d['steps']} steps ({d['pairs_trained']} pairs trained); tokens mean prompt "
        f"{t['prompt']['mean']} chosen {t['chosen']['mean']} rejected {t['rejected']['mean']}; prompt+longer "
        f"response max {t['prompt_plus_longer_response']['max']}; tokens/pair {d['tokens_per_pair']}; computed "
        f"with padding {d['computed_tokens_per_pair_with_padding']}; {d['truncated']} truncated ({d['seconds']}s)")

    env = harness.child_env(args.threads, {"TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets")})
    limit = measure_limit(args, data["model_path"], round(t["shared_row"]["mean"]), log=log)
    rows, failures = harness.measure_rows(names, lambda n, run_dir: run_config(n, run_dir, args, data, work, env, limit),
                                  args, work=work, log=log,
                                  stage_steps=lambda n: d["steps"] if CONFIGS[n]["side"] == "alignline" else None)

    by = {r["config"]: r for r in rows}
    checks = parity_checks(by)
    ratios: dict[str, float] = {}
    for name in ("alignline-shared", "alignline-separate"):
        a, b = by.get(name), by.get("trl")
        if a is None or b is None:
            continue
        r = {"training pairs/s (timed steps)": a["train_pairs_per_s"] / b["train_pairs_per_s"],
             "training pairs/s (steps 2..N)": a["train_pairs_per_s_steps_2_on"] / b["train_pairs_per_s_steps_2_on"],
             "training pairs/s (whole training loop)": a["loop_pairs_per_s"] / b["loop_pairs_per_s"],
             "peak RSS": a["peak_rss_gb"] / b["peak_rss_gb"],
             "peak RSS during training": (a["rss_train_gb"] or 0) / (b["rss_train_gb"] or 1),
             "child wall time": a["child_wall_s"] / b["child_wall_s"],
             "tokens computed per pair": a["tokens_computed_per_pair"] / b["tokens_computed_per_pair"]}
        ratios.update({f"{name} / trl: {k}": v for k, v in r.items()})

    columns = [("label", "configuration", ""), ("steps", "steps", ""), ("pairs", "pairs", ""),
               ("step_s_sum", "timed steps (s)", ".1f"), ("s_per_step", "s/step", ".2f"),
               ("train_pairs_per_s", "training pairs/s", ".3f"), ("share_pct", "share of limit (%)", ".1f"),
               ("train_loop_s", "training loop (s)", ".1f"),
               ("tokens_computed_per_pair", "tokens computed/pair", ".0f"),
               ("child_wall_s", "child wall (s)", ".1f"), ("peak_rss_gb", "peak RSS (GB)", ".2f"),
               ("rss_train_gb", "RSS training (GB)", ".2f"), ("first_step_loss", "first-step loss", ".6f"),
               ("foreign", "other load (cores)", ".2f")]
    for r in rows:
        r["foreign"] = (r.get("contention") or {}).get("foreign_cores_mean")
        r["share_pct"] = percent(r["share_of_limit"])
    table = markdown_table(rows, columns)
    cmd = command_line(argv)
    log("\n" + table + "\n")
    log(f"  limit: fp32 matmul {limit['gflops']:.1f} GFLOP/s on the model's layer shapes ({limit['tokens']} tokens)")
    for k, v in ratios.items():
        log(f"  {k}: {v:.2f}x")
    for k, v in checks.items():
        log(f"  check {k}: {v}")
    if failures:
        log(f"  failed: {', '.join(failures)}")

    result = {
        "benchmark": "rm_throughput", "command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {"model": data["model_path"] if args.smoke else MODEL, "smoke": args.smoke, "pairs": args.pairs, "batch_size": args.batch_size,
                     "max_length": args.max_length, "max_steps": args.max_steps, "lr": args.lr,
                     "loss": "Bradley-Terry, mean over pairs", "schedule": "linear, no warm-up", "seed": args.seed,
                     "threads": args.threads, "dtype": "float32", "gradient_checkpointing": False,
                     "grad_accum": 1, "epochs": 1, "max_grad_norm": 1.0, "weight_decay": 0.0},
        "timed": "training pairs/s = pairs trained / sum of optimizer-step times (forward + backward + clip + "
                 "optimizer; batch collation outside). training loop = alignline's train() minus its final "
                 "resumable checkpoint / TRL's trainer.train(). child wall = the whole child process (imports, "
                 "load, tokenisation, training, alignline's final evaluation over the pairs and model save). "
                 "Peak RSS = the child's ru_maxrss (whole process).",
        "machine": machine_info(), "limit": limit, "data": d, "results": rows, "ratios": ratios, "checks": checks,
        "failures": failures, "table_markdown": table,
    }
    harness.write_json(args.out, result)
    log(f"\nwrote {args.out}\ncommand: {cmd}")
    harness.drop_work_dir(args, work)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
