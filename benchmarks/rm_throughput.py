"""Reward-model training throughput: ``alignline rm`` against TRL 1.16's RewardTrainer (2 CPU cores, fp32).

    .venv/bin/python benchmarks/rm_throughput.py            # the full run (about 20-30 minutes on 2 cores)
    .venv/bin/python benchmarks/rm_throughput.py --quick    # a smoke run (8 pairs, batch 2, max_length 256, 2 steps)

What it does:

1. Builds ``--pairs`` preference pairs from the ShareGPT asset with the DPO benchmark's pair builder
   (``benchmarks/dpo_throughput.py: build_data``, seeded, deterministic; prompt lengths spread evenly
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
   collation outside) -- alignline: ``tokens / tokens_per_s`` of each step in ``metrics.jsonl``; TRL: a
   callback's ``on_step_begin`` -> ``on_step_end`` -- and the training loop as a whole (alignline: its
   ``train`` call minus the final resumable checkpoint; TRL: ``trainer.train()``). Training pairs/s =
   pairs trained / sum of step times. The whole child's wall time (imports, model load, tokenisation,
   training, alignline's final evaluation and model save) is reported too. Peak RSS is the child's
   ``ru_maxrss`` (whole process); per-phase peaks come from a thread sampling ``/proc/self/statm``.
   After training the TRL child also scores its first batch with alignline's prefix-shared path and with
   TRL's padded path on the same (trained) model: the two must agree (a parity check of the layouts).

Results: a table and ratios on stdout, and ``benchmarks/results/rm_throughput.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (benchmarks/ is sys.path[0]): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (
    GB,
    RssSampler,
    busy_processes,
    child_env,
    machine_info,
    markdown_table,
    run_child,
    timed_trl_trainer,
    trl_step_timer,
    wait_until_quiet,
    write_json,
)
from benchmarks.dpo_throughput import build_data, is_contended

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "rm_throughput.json"
MODEL = "smollm2-135m-instruct"

FULL = {"pairs": 64, "batch_size": 4, "max_length": 512, "max_steps": None}
QUICK = {"pairs": 8, "batch_size": 2, "max_length": 256, "max_steps": 2}

CONFIGS = {
    "alignline-shared": {"side": "alignline", "layout": "shared", "label": "alignline rm (shared prefix)"},
    "alignline-separate": {"side": "alignline", "layout": "separate", "label": "alignline rm (separate rows)"},
    "trl": {"side": "trl", "label": "TRL 1.16 RewardTrainer"},
}
DEFAULT_CONFIGS = ("alignline-shared", "trl")


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

    from alignline.data.io import read_pairs, write_records
    from alignline.models import load_tokenizer
    from alignline.train.pairs import pair_length, plan_bucketed, tokenise_pairs

    L = args.max_length
    builder_args = argparse.Namespace(pairs=args.pairs, batch_size=args.batch_size, max_length=L - 1, seed=args.seed)
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
    too_long = [e["id"] for e in examples if len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) > L]
    if too_long:
        raise SystemExit(f"{len(too_long)} pairs exceed max_length {L} (TRL would drop them): {too_long[:3]}")
    # the RM stage's own plan (make_plan: plan_bucketed over pair_length(layout) with train.seed, epoch 0)
    plan = plan_bucketed([pair_length(e, "shared") for e in examples], args.batch_size, args.seed, 0)
    n_steps = len(plan) if args.max_steps is None else min(len(plan), args.max_steps)
    trl_order = [i for mb in plan for i in mb]
    by_id = {p.id: p for p in pairs}
    trl_rows = []
    for i in trl_order:
        p = by_id[examples[i]["id"]]
        trl_rows.append({"prompt": [{"role": m.role, "content": m.content} for m in p.prompt], "chosen": [{"role": "assistant", "content": p.chosen}],
                         "rejected": [{"role": "assistant", "content": p.rejected}]})
    trl_path = work / "pairs_trl_rm.jsonl"
    write_records(trl_path, trl_rows)

    P = [len(e["prompt"]) for e in examples]
    C = [len(e["chosen"]) for e in examples]
    R = [len(e["rejected"]) for e in examples]

    def stats(xs):
        return {"mean": round(sum(xs) / len(xs), 1), "min": min(xs), "max": max(xs)}

    shared = [p + c + r for p, c, r in zip(P, C, R)]
    # tokens each side feeds the model per step, padding included (alignline shared: B rows of the widest
    # shared row; alignline separate / TRL: 2B rows of the widest prompt + response)
    trained = plan[:n_steps]
    computed_shared = [len(mb) * max(shared[i] for i in mb) for mb in trained]
    computed_two = [2 * len(mb) * max(P[i] + max(C[i], R[i]) for i in mb) for mb in trained]
    n_trained = sum(len(mb) for mb in trained)
    info = {
        **{k: built["info"][k] for k in ("source", "selection", "conversations_scanned", "candidates")},
        "path": str(al_path), "trl_path": str(trl_path),
        "builder": f"benchmarks/dpo_throughput.py build_data at max_length {L - 1} (the RM keeps 1 tail token)",
        "pairs": len(examples), "steps": n_steps, "pairs_trained": n_trained,
        "tokens": {"prompt": stats(P), "chosen": stats(C), "rejected": stats(R),
                   "prompt_plus_longer_response": stats([p + max(c, r) for p, c, r in zip(P, C, R)]),
                   "shared_row": stats(shared)},
        "truncated": tok_counts.get("responses_truncated", 0),
        "tokens_per_pair": {"shared_layout": round(sum(shared) / len(shared), 1),
                            "two_rows": round(sum(2 * p + c + r for p, c, r in zip(P, C, R)) / len(P), 1)},
        "computed_tokens_per_pair_with_padding": {"shared_layout": round(sum(computed_shared) / n_trained, 1),
                                                  "two_rows": round(sum(computed_two) / n_trained, 1)},
        "seconds": round(built["info"]["seconds"] + time.perf_counter() - t0, 1),
    }
    expected = [{"id": examples[i]["id"], "chosen_ids": examples[i]["prompt"] + examples[i]["chosen"],
                 "rejected_ids": examples[i]["prompt"] + examples[i]["rejected"]} for i in trl_order]
    shared_examples = [{k: examples[i][k] for k in ("id", "prompt", "chosen", "rejected")} for i in trl_order]
    return {"info": info, "plan": plan, "expected_trl": expected, "shared_examples": shared_examples,
            "model_path": built["model_path"]}


# --------------------------------------------------------------------------- children

def child_alignline(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])  # the RM stage seeds only inside train(), after the head is built
    import alignline.stages.rm as rm_mod
    import alignline.train.loop as loop_mod

    sampler = RssSampler()
    sampler.start()
    sampler.set_phase("load+tokenise")
    times: dict[str, float] = {"checkpoint_save": 0.0, "final_eval": 0.0}
    info: dict[str, Any] = {}
    train_fn, ckpt_fn, save_fn, eval_fn, load_fn = (rm_mod.train, loop_mod.save_checkpoint, rm_mod.save_model,
                                                    rm_mod.evaluate_rm, rm_mod.load_reward_model)

    def load_reward_model(*a, **kw):
        model = load_fn(*a, **kw)
        info["head"] = head_digest(model)
        info["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        return model

    def train(*a, **kw):
        sampler.set_phase("train")
        t0 = time.perf_counter()
        out = train_fn(*a, **kw)
        times["train_loop"] = time.perf_counter() - t0
        sampler.set_phase("after train")
        return out

    def save_checkpoint(*a, **kw):
        t0 = time.perf_counter()
        previous = sampler.phase
        sampler.set_phase("checkpoint")
        out = ckpt_fn(*a, **kw)
        sampler.set_phase(previous)
        times["checkpoint_save"] += time.perf_counter() - t0
        return out

    def evaluate_rm(*a, **kw):
        sampler.set_phase("final eval")
        t0 = time.perf_counter()
        out = eval_fn(*a, **kw)
        times["final_eval"] += time.perf_counter() - t0
        sampler.set_phase("save model")
        return out

    def save_model(*a, **kw):
        t0 = time.perf_counter()
        out = save_fn(*a, **kw)
        times["model_save"] = time.perf_counter() - t0
        return out

    # per micro-batch: forward + loss (rm_step_fn) start/end, and the start of gradient clipping (= end of backward)
    marks: list[dict] = []
    step_fn, make_acc = rm_mod.rm_step_fn, rm_mod.make_accelerator

    def rm_step_fn(model, batch):
        t0 = time.perf_counter()
        out = step_fn(model, batch)
        marks.append({"fwd_start": t0, "fwd_end": time.perf_counter(), "rss_after_fwd": sampler.rss() / GB,
                      "shape": list(batch["input_ids"].shape)})
        return out

    def make_accelerator(*a, **kw):
        acc = make_acc(*a, **kw)
        clip = acc.clip_grad_norm_

        def clip_grad_norm_(*ca, **ckw):
            if marks:
                marks[-1]["clip_start"] = time.perf_counter()
            return clip(*ca, **ckw)

        acc.clip_grad_norm_ = clip_grad_norm_
        return acc

    (rm_mod.train, loop_mod.save_checkpoint, rm_mod.save_model, rm_mod.evaluate_rm, rm_mod.load_reward_model,
     rm_mod.rm_step_fn, rm_mod.make_accelerator) = (train, save_checkpoint, save_model, evaluate_rm,
                                                    load_reward_model, rm_step_fn, make_accelerator)

    out_dir = Path(spec["run_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = rm_mod.RMConfig(
        model=spec["model_path"], output_dir=str(out_dir), dtype="float32", resume=False,
        pair_layout=spec["layout"], eval_batch_size=spec["batch_size"],
        data={"train": spec["data"], "max_length": spec["max_length"], "max_drop_fraction": 0.0},
        train={"epochs": 1, "max_steps": spec["max_steps"], "batch_size": spec["batch_size"], "grad_accum": 1,
               "lr": spec["lr"], "warmup_ratio": 0.0, "warmup_steps": 0, "schedule": "linear", "seed": spec["seed"],
               "log_every": 1, "save_every": None, "keep_checkpoints": 1, "mixed_precision": "no",
               "gradient_checkpointing": False, "max_grad_norm": 1.0, "weight_decay": 0.0},
    )
    t0 = time.perf_counter()
    rm_mod.run(cfg)
    wall = time.perf_counter() - t0
    rss = sampler.stop()
    steps = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if "tokens_per_s" in rec:
            steps.append({"step": rec["step"], "seconds": rec["tokens"] / rec["tokens_per_s"], "loss": rec["loss"],
                          "tokens_computed": rec["tokens"], "pairs": int(rec["units"]),
                          "accuracy": rec.get("accuracy"), "margin": rec.get("rewards/margin"),
                          "grad_norm": rec.get("grad_norm")})
    for s, m in zip(steps, marks):  # grad_accum 1: one micro-batch per step
        s["fwd_s"] = m["fwd_end"] - m["fwd_start"]
        if "clip_start" in m:
            s["bwd_s"] = m["clip_start"] - m["fwd_end"]
            s["clip_opt_s"] = s["seconds"] - s["fwd_s"] - s["bwd_s"]
        s["shape"] = m["shape"]
        s["rss_after_fwd_gb"] = round(m["rss_after_fwd"], 3)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    evaluation = json.loads((out_dir / "eval.json").read_text())
    return {
        "train_s": times["train_loop"] - times["checkpoint_save"], "train_call_s": times["train_loop"],
        "checkpoint_save_s": times["checkpoint_save"], "final_eval_s": times["final_eval"],
        "model_save_s": times.get("model_save"), "manifest_seconds": manifest.get("seconds"),
        "run_seconds": wall, "steps": steps, "counts": manifest.get("counts"), "rss": rss,
        "final_eval": {k: evaluation.get(k) for k in ("split", "pairs", "accuracy", "margin_mean")},
        "torch_threads": torch.get_num_threads(), "optimizer": "torch.optim.AdamW (for-loop on CPU)", **info,
    }


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    sampler = RssSampler()
    sampler.start()
    sampler.set_phase("load")
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines() if x.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(spec["seed"])  # the fresh head is drawn here, as in the alignline child
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_path"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    head = head_digest(model)
    train_batches: list[dict] = []
    timeline: list[dict] = []

    Timed = timed_trl_trainer(RewardTrainer, sampler, train_batches)

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
                    callbacks=[trl_step_timer(sampler, timeline)])
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
    steps = []
    for i, (t, b) in enumerate(zip(timeline, train_batches)):
        steps.append({"step": i + 1, "seconds": t["t1"] - t["t0"], "fwd_s": b["fwd_s"],
                      "bwd_clip_s": t["t_fb"] - t["t0"] - b["fwd_s"], "opt_s": t["t1"] - t["t_fb"],
                      "loss": b["loss"], "logged_loss": losses[i] if i < len(losses) else None,
                      "pairs": b["shape"][0] // 2, "shape": b["shape"], "real_tokens": b["real_tokens"],
                      "tokens_computed": b["shape"][0] * b["shape"][1], "rss_after_fwd_gb": b["rss_after_fwd_gb"]})
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
    from alignline.train.pairs import collate_pairs

    model = trainer.model
    model.eval()
    B = spec["batch_size"]
    with torch.no_grad():
        batch = trainer.data_collator([{k: ds[i][k] for k in ("chosen_ids", "rejected_ids")} for i in range(B)])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        trl_c, trl_r = torch.chunk(logits.squeeze(-1).float(), 2)
        shared = collate_pairs(spec["shared_examples"][:B], trainer.processing_class.pad_token_id, "shared")
        al_c, al_r = pair_rewards(model, shared)
    diff = torch.cat([(al_c - trl_c).abs(), (al_r - trl_r).abs()])
    return {"pairs": B, "reward_abs_diff_max": float(diff.max()), "reward_abs_diff_mean": float(diff.mean()),
            "reward_abs_mean": float(torch.cat([trl_c, trl_r]).abs().mean()),
            "loss_trl_path": float(-torch.nn.functional.logsigmoid(trl_c - trl_r).mean()),
            "loss_shared_path": float(-torch.nn.functional.logsigmoid(al_c - al_r).mean())}


def child_main(name: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = child_alignline(spec) if CONFIGS[name]["side"] == "alignline" else child_trl(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=1))
    return 0


# --------------------------------------------------------------------------- parent

def quiet_gate(max_wait_s: float, confirm_s: float = 10.0) -> dict[str, Any]:
    """``wait_until_quiet``, then a second look ``confirm_s`` later (another benchmark's parent starts its next
    child a few seconds after the previous one ended); at most ``max_wait_s`` in all."""
    t0 = time.monotonic()
    while True:
        left = max(0.0, max_wait_s - (time.monotonic() - t0))
        quiet = wait_until_quiet(max_wait_s=left, poll_s=30.0, log=log)
        if not quiet["quiet"]:
            break
        time.sleep(confirm_s)
        busy = busy_processes()
        if not busy or time.monotonic() - t0 >= max_wait_s:
            quiet.update(quiet=not busy, busy=busy)
            break
        log(f"  busy again {confirm_s:.0f}s later ({'; '.join(b['cmd'][:70] for b in busy)}); waiting on")
    quiet["waited_s"] = round(time.monotonic() - t0, 1)
    return quiet


def summarise(name: str, child: dict, rss_gb: float, wall_s: float) -> dict:
    steps = child["steps"]
    pairs = sum(s["pairs"] for s in steps)
    step_s = sum(s["seconds"] for s in steps)
    later = steps[1:] or steps
    later_s = sum(s["seconds"] for s in later)
    peaks = child["rss"]["peaks_gb"]
    split = {"forward": sum(s.get("fwd_s", 0.0) for s in steps),
             "backward": sum(s.get("bwd_s", s.get("bwd_clip_s", 0.0)) for s in steps),
             "clip+optimizer": sum(s.get("clip_opt_s", s.get("opt_s", 0.0)) for s in steps)}
    return {
        "config": name, "label": CONFIGS[name]["label"], "steps": len(steps), "pairs": pairs,
        "step_s_sum": step_s, "s_per_step": step_s / len(steps), "train_pairs_per_s": pairs / step_s,
        "train_pairs_per_s_steps_2_on": sum(s["pairs"] for s in later) / later_s,
        "train_loop_s": child["train_s"], "loop_pairs_per_s": pairs / child["train_s"],
        "tokens_computed_per_pair": sum(s["tokens_computed"] for s in steps) / pairs,
        "peak_rss_gb": rss_gb, "rss_train_gb": peaks.get("train"), "first_step_loss": steps[0]["loss"],
        "last_step_loss": steps[-1]["loss"], "child_wall_s": wall_s, "step_split_s": split, "per_step": steps,
    }


def run_config(name: str, args, data: dict, work: Path, env: dict) -> tuple[dict | None, dict | None]:
    """One configuration in its own child process; returns (result row, None) or (None, failure)."""
    cfg, d = CONFIGS[name], data["info"]
    log(f"\n[{name}] waiting for a quiet machine ...")
    quiet = quiet_gate(args.max_wait)
    spec = {"model_path": data["model_path"], "batch_size": args.batch_size, "max_length": args.max_length,
            "max_steps": args.max_steps, "seed": args.seed, "threads": args.threads, "lr": args.lr,
            "run_dir": str(work / "runs" / name), "result": str(work / f"{name}.result.json")}
    if cfg["side"] == "alignline":
        spec.update(data=d["path"], layout=cfg["layout"])
    else:
        spec.update(data=d["trl_path"], expected=data["expected_trl"], shared_examples=data["shared_examples"])
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    log(f"[{name}] running (load average {quiet['loadavg']}, waited {quiet['waited_s']}s) ...")
    res = run_child([sys.executable, str(Path(__file__).resolve()), "--child", name, "--spec", str(spec_path)],
                    log_path=work / f"{name}.log", env=env, cwd=ROOT, timeout_s=args.timeout)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # alignline's checkpoint and model
    if res.returncode != 0 or not Path(spec["result"]).exists():
        log(f"[{name}] FAILED (rc {res.returncode}{', timed out' if res.timed_out else ''}); log {res.log_path}"
            f"\n{res.tail(30)}")
        return None, {"returncode": res.returncode, "timed_out": res.timed_out, "tail": res.tail(30)}
    child = json.loads(Path(spec["result"]).read_text())
    row = summarise(name, child, res.peak_rss_gb, res.wall_s)
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
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 pairs, batch 2, max_length 256, 2 steps")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5, linear decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads in every child (default 2)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--out", type=Path, help=f"result JSON (default {DEFAULT_OUT.relative_to(ROOT)}; "
                   "--quick: rm_throughput_quick.json)")
    p.add_argument("--work-dir", type=Path, help="where data and runs go (default: a temporary directory)")
    p.add_argument("--keep-work-dir", action="store_true")
    p.add_argument("--max-wait", type=float, default=900.0,
                   help="seconds to wait for other busy processes before each configuration (default 900)")
    p.add_argument("--timeout", type=float, default=2400.0, help="seconds allowed per child (default 2400)")
    p.add_argument("--retries", type=int, default=1,
                   help="measure a configuration again when other processes used the CPU meanwhile (default 1)")
    p.add_argument("--max-foreign-cores", type=float, default=0.1,
                   help="mean cores used by other processes above which a measurement counts as contended")
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("rm_throughput_quick.json") if args.quick else DEFAULT_OUT
    return args


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
        return child_main(args.child, args.spec)

    names = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="alignline-rm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"rm throughput: pairs={args.pairs} batch={args.batch_size} max_length={args.max_length} "
        f"max_steps={args.max_steps} lr={args.lr} threads={args.threads}; work dir {work}")
    log("waiting for a quiet machine before building the data ...")
    quiet_gate(args.max_wait)
    data = build_rm_data(args, work)
    d = data["info"]
    t = d["tokens"]
    log(f"data: {d['pairs']} pairs, {d['steps']} steps ({d['pairs_trained']} pairs trained); tokens mean prompt "
        f"{t['prompt']['mean']} chosen {t['chosen']['mean']} rejected {t['rejected']['mean']}; prompt+longer "
        f"response max {t['prompt_plus_longer_response']['max']}; tokens/pair {d['tokens_per_pair']}; computed "
        f"with padding {d['computed_tokens_per_pair_with_padding']}; {d['truncated']} truncated ({d['seconds']}s)")

    env = child_env(args.threads, {"TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets")})
    rows, failures = [], {}
    for name in names:
        for attempt in range(1, args.retries + 2):
            row, failure = run_config(name, args, data, work, env)
            if failure is not None:
                failures[name] = failure
                break
            contended = is_contended(row["contention"], args.max_foreign_cores)
            row["attempt"], row["contended"] = attempt, contended
            if not contended or attempt == args.retries + 1:
                rows.append(row)
                break
            log(f"[{name}] other processes used {row['contention']['foreign_cores_mean']:.2f} cores on average "
                f"while it ran; measuring again (attempt {attempt + 1})")

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
               ("train_pairs_per_s", "training pairs/s", ".3f"), ("train_loop_s", "training loop (s)", ".1f"),
               ("tokens_computed_per_pair", "tokens computed/pair", ".0f"),
               ("child_wall_s", "child wall (s)", ".1f"), ("peak_rss_gb", "peak RSS (GB)", ".2f"),
               ("rss_train_gb", "RSS training (GB)", ".2f"), ("first_step_loss", "first-step loss", ".6f"),
               ("foreign", "other load (cores)", ".2f")]
    for r in rows:
        r["foreign"] = (r.get("contention") or {}).get("foreign_cores_mean")
    table = markdown_table(rows, columns)
    cmd = command_line(argv)
    log("\n" + table + "\n")
    for k, v in ratios.items():
        log(f"  {k}: {v:.2f}x")
    for k, v in checks.items():
        log(f"  check {k}: {v}")
    if failures:
        log(f"  failed: {', '.join(failures)}")

    result = {
        "benchmark": "rm_throughput", "command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {"model": MODEL, "pairs": args.pairs, "batch_size": args.batch_size,
                     "max_length": args.max_length, "max_steps": args.max_steps, "lr": args.lr,
                     "loss": "Bradley-Terry, mean over pairs", "schedule": "linear, no warm-up", "seed": args.seed,
                     "threads": args.threads, "dtype": "float32", "gradient_checkpointing": False,
                     "grad_accum": 1, "epochs": 1, "max_grad_norm": 1.0, "weight_decay": 0.0},
        "timed": "training pairs/s = pairs trained / sum of optimizer-step times (forward + backward + clip + "
                 "optimizer; batch collation outside). training loop = alignline's train() minus its final "
                 "resumable checkpoint / TRL's trainer.train(). child wall = the whole child process (imports, "
                 "load, tokenisation, training, alignline's final evaluation over the pairs and model save). "
                 "Peak RSS = the child's ru_maxrss (whole process).",
        "machine": machine_info(), "data": d, "results": rows, "ratios": ratios, "checks": checks,
        "failures": failures, "table_markdown": table,
    }
    write_json(args.out, result)
    log(f"\nwrote {args.out}\ncommand: {cmd}")
    if not args.keep_work_dir and args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
