"""Reward-model scoring throughput: prefix-shared (the prompt prefilled once, its cache reused for all N
responses) vs plain batched scoring (every prompt + response its own row), SmolLM2-135M-sized RM.

    .venv/bin/python benchmarks/score_throughput.py             # N in (16, 64) x prompt in (256, 1024)
    .venv/bin/python benchmarks/score_throughput.py --quick     # short run (N 4, prompt 64, responses of 16)
    .venv/bin/python benchmarks/score_throughput.py --smoke     # CI smoke run (the same on a tiny random model)

The RM is SmolLM2-135M-Instruct with a freshly initialised scalar head (speed does not depend on the
head's values). Token ids are random (fixed seed) with the requested lengths: prompt P tokens, N
responses of 128 tokens. Both paths run in the same process, one after the other, on the same inputs;
timed: the scoring calls only. Scores must agree within 1e-4 (checked and reported).

Share of the limit (issue 20): useful FLOPs (``telemetry.useful_flops`` without gradients: 2 x body parameters x
tokens computed + 2 x head parameters x responses scored) per second, over the fp32 matmul limit measured at the
start of the run on the model's layer shapes at one forward's size (``--chunk`` x response tokens). Each path is
credited with the tokens it computes: prompt + N x response for the prefix-shared path, N x (prompt + response)
for the plain path, whose repeated prompts count as its work (as TRL's repeated prompts do in the DPO benchmark).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (benchmarks/ is sys.path[0]): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness
from benchmarks.common import (
    add_common_args,
    finish_args,
    machine_info,
    markdown_table,
    measure_limit,
    model_path,
    percent,
    share_of_limit,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "score_throughput.json"
FULL = {"ns": "16,64", "prompts": "256,1024", "response_tokens": 128}
QUICK = {"ns": "4", "prompts": "64", "response_tokens": 16}
SMOKE = QUICK


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", help=f"responses per prompt (default {FULL['ns']})")
    p.add_argument("--prompts", help=f"prompt lengths in tokens (default {FULL['prompts']})")
    p.add_argument("--response-tokens", type=int, help=f"tokens per response (default {FULL['response_tokens']})")
    p.add_argument("--chunk", type=int, default=16, help="responses per forward on the prefix-shared path")
    p.add_argument("--batch", type=int, default=8, help="rows per forward on the plain path")
    add_common_args(p, default_out=OUT, max_wait=300.0)
    a = finish_args(p.parse_args(argv), full=FULL, quick=QUICK, smoke=SMOKE, default_out=OUT)
    if a.quick:
        a.max_wait = 0.0
    import torch

    torch.set_num_threads(a.threads)
    from alignline.judges.reward import score_plain, score_responses
    from alignline.models import load_reward_model
    from alignline.telemetry import param_counts, useful_flops

    work = harness.new_work_dir(a, "alignline-score-bench-")
    model_dir = model_path(a, work)
    model = load_reward_model(model_dir, dtype="float32").eval()
    params = param_counts(model)
    limit = measure_limit(a, model_dir, a.chunk * a.response_tokens)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = []
    for plen in map(int, a.prompts.split(",")):
        for n in map(int, a.ns.split(",")):
            quiet = harness.quiet_gate(a.max_wait)
            prompt = torch.randint(10, vocab, (plen,), generator=g).tolist()
            resps = [torch.randint(10, vocab, (a.response_tokens,), generator=g).tolist() for _ in range(n)]
            t0 = time.perf_counter()
            shared = score_responses(model, prompt, resps, pad_id=0, chunk=a.chunk)
            t_shared = time.perf_counter() - t0
            t0 = time.perf_counter()
            plain = score_plain(model, prompt, resps, pad_id=0, batch_size=a.batch)
            t_plain = time.perf_counter() - t0
            diff = max(abs(x - y) for x, y in zip(shared, plain))
            r = a.response_tokens
            shared_flops = useful_flops(*params, plen + n * r, n, grad=False)
            plain_flops = useful_flops(*params, n * (plen + r), n, grad=False)
            rows.append({"prompt_tokens": plen, "n": n, "shared_resp_s": n / t_shared, "plain_resp_s": n / t_plain,
                         "speedup": t_plain / t_shared, "max_abs_diff": diff,
                         "shared_share_pct": percent(share_of_limit(shared_flops, t_shared, limit)),
                         "plain_share_pct": percent(share_of_limit(plain_flops, t_plain, limit)),
                         "loadavg": quiet["loadavg"]})
            print(rows[-1], flush=True)
    table = markdown_table(rows, [("prompt_tokens", "prompt", ""), ("n", "N", ""),
                                  ("shared_resp_s", "prefix-shared resp/s", ".2f"),
                                  ("plain_resp_s", "plain resp/s", ".2f"), ("speedup", "speed-up", ".2f"),
                                  ("shared_share_pct", "prefix-shared share of limit (%)", ".1f"),
                                  ("plain_share_pct", "plain share of limit (%)", ".1f"),
                                  ("max_abs_diff", "max |diff|", ".1e")])
    print(table)
    harness.write_json(a.out, {
        "command": " ".join([".venv/bin/python", "benchmarks/score_throughput.py", *(argv or sys.argv[1:])]),
        "settings": vars(a), "machine": machine_info(), "matmul_limit": limit, "rows": rows})
    harness.drop_work_dir(a, work)
    return 0 if all(r["max_abs_diff"] < 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
