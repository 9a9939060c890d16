"""Online RL throughput: ``alignline rl`` (GRPO) against TRL 1.16's ``GRPOTrainer``, side by side.

    .venv/bin/python benchmarks/rl_throughput.py --smoke   # tiny random model, both rows, seconds each
    .venv/bin/python benchmarks/rl_throughput.py           # SmolLM2-135M-Instruct, fp32, 2 threads (quiet machine)

Both rows: the same model, the same prompts (verifiable instructions attached; the verifier's strict share of
instructions followed is the reward on both sides), G = 8 responses per prompt, the same max new tokens, the
same number of optimizer steps (one per rollout), TRL's ``loss_type="grpo"`` (alignline's estimator grpo with
aggregation seq_mean_token_mean), beta 0 (no reference model on either side), no vLLM, fp32. Each row runs in
its own child process (``benchmarks/harness.py``) and reports rollout tokens/s, training tokens/s, seconds per
iteration and peak RSS. The goal of issue 16: >= 2x TRL's iterations/s at <= 1/2 of its peak RSS.

Rows (``--configs``): every alignline row takes one optimizer step per rollout, as TRL does; they differ in how
the step's P x G responses are split into micro-batches (the loss and the step are the same: the loop weighs
micro-batches by their tokens):

* ``alignline``: micro-batches of G responses (one prompt's group: one prefix-shared row), P accumulation steps;
* ``alignline-gc``: the same with ``train.gradient_checkpointing`` (every decoder layer recomputed in backward);
* ``alignline-batch32``: all P x G responses in one micro-batch (the row measured first, 2026-12-03);
* ``trl``: TRL's ``per_device_train_batch_size`` P x G, no accumulation (its generation batch is the rollout);
* ``trl-mb8``: TRL with micro-batches of G and P accumulation steps (its generation batch is still the P x G
  rollout, one optimizer step per rollout): the micro-batching of the ``alignline`` rows, for the memory
  comparison.

Share of the limit (issue 20): useful training FLOPs (``telemetry.useful_flops``: 6 x body parameters x real
tokens + 6 x head parameters x response positions) per second of the optimizer steps, over the fp32 matmul
limit measured in the same run on the model's layer shapes. alignline reads both from the stage's
``metrics.jsonl`` (``flops``, ``time/step_s``); TRL's steps are timed by a callback minus the generation inside
them (``_generate_and_score_completions``), its tokens taken from the inputs of ``_compute_loss`` (TRL computes
each prompt once per response, and those repeats count as real tokens, as in the DPO benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import harness  # noqa: E402

CONFIGS = {
    "alignline": {"micro_batch": "group", "gc": False},
    "alignline-gc": {"micro_batch": "group", "gc": True},
    "alignline-batch32": {"micro_batch": "rollout", "gc": False},
    "trl": {"micro_batch": "rollout"},
    "trl-mb8": {"micro_batch": "group"},
}
DEFAULT_CONFIGS = ("alignline", "alignline-gc", "trl", "trl-mb8")
SMOKE_CONFIGS = ("alignline", "trl", "trl-mb8")
FULL = {"iterations": 10, "prompts_per_iteration": 4, "group_size": 8, "max_new_tokens": 128}
QUICK = {"iterations": 3, "prompts_per_iteration": 2, "group_size": 8, "max_new_tokens": 64}
SMOKE = {"iterations": 2, "prompts_per_iteration": 2, "group_size": 4, "max_new_tokens": 8}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rl_throughput.json"


def make_prompts(path: Path, n: int) -> Path:
    """n prompts with verifiable instructions attached (seeded), as JSONL."""
    from alignline.data.records import Prompt
    from alignline.judges.verifiable import attach_instructions

    topics = ["a cat", "the sea", "bread", "a bicycle", "rain", "a library", "coffee", "mountains"]
    with open(path, "w") as f:
        for i in range(n):
            p = Prompt(id=f"b{i}", messages=[{"role": "user", "content": f"Write a few sentences about {topics[i % 8]}."}])
            f.write(attach_instructions(p, 0).model_dump_json() + "\n")
    return path


def alignline_side(spec: dict) -> dict:
    from alignline.config import load_config
    from alignline.stages import rl

    P, G = spec["prompts_per_iteration"], spec["group_size"]
    per_group = spec["micro_batch"] == "group"
    cfg = load_config(rl.RLConfig, None, [
        f"model={spec['model']}", f"prompts={spec['prompts']}", f"output_dir={spec['out']}",
        f"iterations={spec['iterations']}", f"rollout.prompts={P}", f"rollout.group_size={G}",
        f"rollout.sampling.max_new_tokens={spec['max_new_tokens']}", f"train.batch_size={G if per_group else P * G}",
        f"train.grad_accum={P if per_group else 1}", f"train.gradient_checkpointing={str(spec['gc']).lower()}",
        "loss.estimator=grpo", "kl.coef=0", "reward=verifier", "dtype=float32"])
    t0 = time.perf_counter()
    out = rl.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (out / "iterations.jsonl").read_text().splitlines()]
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "time/step_s" in s]
    return {"wall_s": wall, "s_per_iteration": wall / len(rows),
            "rollout_tokens_per_s": sum(r["rollout_tokens"] for r in rows) / sum(r["rollout_seconds"] for r in rows),
            "train_tokens_per_s": sum(r["train_tokens_per_s"] * r["train_seconds"] for r in rows)
            / sum(r["train_seconds"] for r in rows),
            "train_step_s": sum(s["time/step_s"] for s in steps), "train_flops": sum(s["flops"] for s in steps),
            "train_steps": len(steps), "train_peak_rss_gb": max(s.get("mem/peak_rss_gb", 0) for s in steps),
            "per_step": [{"seconds": s["time/step_s"], "flops": s["flops"], "tokens": s["tokens"]} for s in steps],
            "details": {"phases": json.loads((out / "manifest.json").read_text())["phases"]},
            "reward_mean": [r["reward_mean"] for r in rows]}


def trl_side(spec: dict) -> dict:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from alignline.data.io import read_prompts
    from alignline.judges.verifiable import verify
    from alignline.models import load_causal_lm, load_tokenizer
    from alignline.telemetry import param_counts, useful_flops
    from peer_clock import TrlClock

    P, G = spec["prompts_per_iteration"], spec["group_size"]
    prompts = read_prompts(spec["prompts"])
    data = datasets.Dataset.from_list([{"prompt": [m.model_dump() for m in p.messages],
                                        "instructions": json.dumps(p.meta["instructions"])} for p in prompts])

    def verifier(completions, instructions, **kw):
        return [verify(c[0]["content"] if isinstance(c, list) else c, json.loads(i), "strict").score
                for c, i in zip(completions, instructions)]

    per_group = spec["micro_batch"] == "group"
    args = GRPOConfig(output_dir=spec["out"], per_device_train_batch_size=G if per_group else P * G,
                      gradient_accumulation_steps=P if per_group else 1,
                      num_generations=G, max_completion_length=spec["max_new_tokens"], beta=0.0, loss_type="grpo",
                      max_steps=spec["iterations"], learning_rate=1e-6, lr_scheduler_type="constant", bf16=False,
                      use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, temperature=1.0,
                      seed=0, dataloader_num_workers=0)
    generation_s: list[float] = []
    batches: list[dict] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            generation_s.append(time.perf_counter() - t0)
            return out

        def _compute_loss(self, model, inputs):
            completion = int(inputs["completion_mask"].sum())
            batches.append({"tokens": int(inputs["prompt_mask"].sum()) + completion, "logit_positions": completion})
            return super()._compute_loss(model, inputs)

    model = load_causal_lm(spec["model"], dtype="float32")
    clock = TrlClock()
    trainer = Timed(model=model, reward_funcs=verifier, args=args, train_dataset=data,
                    processing_class=load_tokenizer(spec["model"]),
                    callbacks=[clock.callback()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length", 0) for h in logs]
    assert len(generation_s) == len(clock.steps), "one generation per optimizer step (generation batch = rollout)"
    params = param_counts(model)
    return {"wall_s": wall, "s_per_iteration": wall / spec["iterations"],
            "rollout_tokens": sum(n * P * G for n in lengths), "reward_mean": [h["reward"] for h in logs],
            "train_step_s": sum(t["time/step_s"] for t in clock.steps) - sum(generation_s),
            "generation_s": sum(generation_s), "train_steps": len(clock.steps),
            "train_flops": sum(useful_flops(*params, b["tokens"], b["logit_positions"], grad=True) for b in batches)}


SIDES = {name: (trl_side if name.startswith("trl") else alignline_side) for name in CONFIGS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    p.add_argument("--prompts", type=Path, help="prompts JSONL with meta.instructions (default: generated)")
    common.add_common_args(p, configs=CONFIGS, default_configs=DEFAULT_CONFIGS, default_out=DEFAULT_OUT)
    return common.finish_args(p.parse_args(argv), full=FULL, quick=QUICK, smoke=SMOKE, default_out=DEFAULT_OUT,
                              smoke_configs=SMOKE_CONFIGS)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return harness.child_main(args, SIDES)
    work = harness.new_work_dir(args, "rl-bench-")
    prompts = args.prompts or make_prompts(work / "prompts.jsonl", args.prompts_per_iteration * args.iterations)
    base = {"model": common.model_path(args, work), "prompts": str(prompts),
            **{k: getattr(args, k) for k in FULL}}
    env = harness.child_env(args.threads)
    # a typical training row: one prompt's group (prompt + G responses of about max_new_tokens)
    limit = common.measure_limit(args, base["model"], 64 + args.group_size * args.max_new_tokens)

    def run_config(name, run_dir):
        spec = {**base, **CONFIGS[name], "out": str(run_dir)}
        child, res, quiet = harness.run_in_child(__file__, name, spec, args, work, env)
        if child is None:
            return None, harness.failure_of(res)
        share = common.share_of_limit(child["train_flops"], child["train_step_s"], limit)
        return {"config": name, **child, "peak_rss_gb": res.peak_rss_bytes / common.GB,
                "train_useful_gflops_s": child["train_flops"] / child["train_step_s"] / 1e9,
                "share_of_limit": share, "share_pct": common.percent(share),
                "contention": getattr(res, "contention", None)}, None

    # one optimizer step per rollout on every alignline row (TRL rows run no alignline stage: nothing to check)
    rows, failures = harness.measure_rows(
        common.config_names(args, CONFIGS, DEFAULT_CONFIGS), run_config, args, work=work,
        stage_steps=lambda name: None if name.startswith("trl") else args.iterations)
    result = {"settings": base, "machine": common.machine_info(), "limit": limit, "rows": rows, "failures": failures}
    by = {r["config"]: r for r in rows}
    for r in rows:
        if "trl" in by and r["config"] != "trl":
            r["speedup_vs_trl"] = by["trl"]["s_per_iteration"] / r["s_per_iteration"]
            r["rss_vs_trl"] = r["peak_rss_gb"] / by["trl"]["peak_rss_gb"]
    harness.write_json(args.out, result)
    print(common.markdown_table(rows, [
        ("config", "config", ""), ("s_per_iteration", "s / iteration", ".2f"),
        ("rollout_tokens_per_s", "rollout tok/s", ".1f"), ("train_tokens_per_s", "train tok/s", ".1f"),
        ("train_step_s", "optimizer steps (s)", ".1f"), ("train_useful_gflops_s", "useful GFLOP/s", ".1f"),
        ("share_pct", "share of limit (%)", ".1f"), ("peak_rss_gb", "peak RSS GB", ".2f"),
        ("speedup_vs_trl", "iterations/s vs TRL", ".2f"), ("rss_vs_trl", "peak RSS vs TRL", ".2f")]))
    print(f"results: {args.out}")
    harness.drop_work_dir(args, work)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
