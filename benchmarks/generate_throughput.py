"""Sampling throughput: alignline's hf engine against the engine before continuous batching, transformers'
``generate(num_return_sequences=n)``, llama.cpp (when llama-cpp-python is importable) and the matmul roofline.

    .venv/bin/python benchmarks/generate_throughput.py            # workloads a, b, c, c128 (about 25 minutes)
    .venv/bin/python benchmarks/generate_throughput.py --quick    # workload a only, fewer prompts
    .venv/bin/python benchmarks/generate_throughput.py --smoke    # CI smoke run on a tiny random model
    python benchmarks/generate_throughput.py --device cuda --dtype bfloat16 --sides engine,static,graph,transformers
                                                                    # on a GPU: the CUDA-graph step against eager

Workloads (prompts x samples x new tokens, prompt length in tokens):
  a     16 x 4 x 48, prompts of 128 (the demo's evaluation shape)
  b     4 x 16 x 128, prompts of 1024 (Xwin's best-of-N shape, scaled down)
  c     8 x 4 x 64, prompts of 2048 (long context; decode timed apart from prefill)
  c128  8 x 4 x 64, prompts of 128 (c's control: the per-token decode cost at short context)

Prompts are ShareGPT user turns cut to the exact length. Every side must produce exactly the requested new
tokens per sample (end tokens ignored), so all do equal work; each (workload, side) runs in its own child
process. Rows: ``engine`` (this engine; its own prefill/decode clock), ``baseline`` (the engine as of commit
``--baseline-rev``, loaded from git: lock-step decoding over transformers' dynamic cache), ``transformers``
(``model.generate``, the prompt expanded n times), ``llama.cpp`` (llama-cpp-python on the same model's GGUF,
Q4_1, one sequence at a time reusing the prompt's cache; ``--llama-python`` names an interpreter that has it),
``static`` (this engine with the fixed-shape decode step, eager: what a CUDA graph replays) and ``graph`` (that
step replayed as a CUDA graph; ``--device cuda`` only, skipped elsewhere).
The roofline is the matmul time of one decode step at the workload's batch (``F.linear`` over every weight
in order, the LM head included; the median of 11 passes): ``roofline tok/s = batch / step time``. Each side
measures it in its own process right after its run (llama.cpp: the parent's, measured before the workload),
since the machine's speed drifts between processes; a row's share of it uses its decode tokens/s where it
has its own decode clock. Results: stdout and
benchmarks/results/generate_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
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
    model_config,
    model_path,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "generate_throughput.json"
WORKLOADS = {  # name: (prompts, samples per prompt, new tokens, prompt tokens)
    "a": (16, 4, 48, 128), "b": (4, 16, 128, 1024), "c": (8, 4, 64, 2048), "c128": (8, 4, 64, 128)}
SIDES = ("engine", "baseline", "transformers", "llama.cpp", "static", "graph")
CPU_SIDES = "engine,baseline,transformers,llama.cpp"
FULL = {"workloads": "a,b,c,c128", "sides": CPU_SIDES}
QUICK = {"workloads": "a", "sides": CPU_SIDES}
SMOKE = {"workloads": "smoke", "sides": "engine,baseline,transformers,static"}
SMOKE_WORKLOAD = (3, 4, 6, 24)
BASELINE_REV = "dbcffc3"  # the last commit before continuous batching and the preallocated caches


# ------------------------------------------------------------------------------------------ prompts

def build_prompts(tokenizer, prompt_tokens: int, count: int) -> list[list[int]]:
    """``count`` chat prompts of exactly ``prompt_tokens`` tokens: ShareGPT user turns joined and cut."""
    from alignline.data.chat import prompt_ids
    from alignline.data.sharegpt import normalise_sharegpt, read_sharegpt

    raw, _ = read_sharegpt()
    convs, _ = normalise_sharegpt(raw[:3000], strip_leading_assistant=True)
    texts = iter([m.content for c in convs for m in c.messages if m.role == "user" and len(m.content) > 200])
    frame = len(prompt_ids(tokenizer, [{"role": "user", "content": "x"}])) - 1
    out = []
    while len(out) < count:
        body: list[int] = []
        while len(body) < prompt_tokens:
            body += tokenizer(next(texts) + "\n\n", add_special_tokens=False)["input_ids"]
        ids = prompt_ids(tokenizer, [{"role": "user", "content": tokenizer.decode(body[: prompt_tokens - frame])}])
        out.append(ids[:prompt_tokens])
    return out


def synthetic_prompts(tokenizer, prompt_tokens: int, count: int, seed: int) -> list[list[int]]:
    """``count`` prompts of exactly ``prompt_tokens`` random ordinary tokens (no special ones): for a machine
    without the ShareGPT asset (a lent GPU). Every side generates exactly the requested new tokens whatever the
    text, so the timings do not depend on it."""
    import random

    special = set(tokenizer.all_special_ids)
    ordinary = [t for t in range(len(tokenizer)) if t not in special]
    draw = random.Random(seed)
    return [[draw.choice(ordinary) for _ in range(prompt_tokens)] for _ in range(count)]


# ------------------------------------------------------------------------------------------- children

def _seeds(spec: dict) -> list[list[int]]:
    return [[1000 * p + i for i in range(spec["n"])] for p in range(len(spec["prompts"]))]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _load(spec: dict):
    import torch

    from alignline.models import load_causal_lm

    torch.set_num_threads(spec["threads"])
    return load_causal_lm(spec["model"], dtype=spec["dtype"], device=spec["device"]).eval()


def _engine(spec: dict, engine_cls, **engine_args) -> dict:
    from alignline.generate.base import SamplingParams
    from alignline.models import load_tokenizer

    model = _load(spec)
    engine = engine_cls(model, load_tokenizer(spec["model"]), max_batch=spec["max_batch"], **engine_args)
    engine.end_ids = frozenset()  # equal work: every sample runs to new_tokens
    sampling = SamplingParams(temperature=1.0, max_new_tokens=spec["new_tokens"], seed=0)
    _sync(spec["device"])
    t0 = time.perf_counter()
    out = engine.sample_prompts(spec["prompts"], _seeds(spec), sampling)
    _sync(spec["device"])
    seconds = time.perf_counter() - t0
    assert all(len(s.token_ids) == spec["new_tokens"] for rows in out for s in rows)
    return {"seconds": seconds, "stats": dict(getattr(engine, "stats", {})), "roofline_tok_s": _child_roofline(model, spec)}


def _child_roofline(model, spec: dict) -> float:
    """The roofline measured in this child right after its run, on its own copy of the weights: the machine's
    speed drifts by 20 % between processes, so a row's share is taken against its own process's limit."""
    batch = min(spec["max_batch"], len(spec["prompts"]) * spec["n"])
    return _roofline(model, batch, spec["roofline_passes"], spec["device"])


def side_engine(spec: dict) -> dict:
    from alignline.generate.hf import HFEngine

    return _engine(spec, HFEngine)


def side_static(spec: dict) -> dict:
    from alignline.generate.hf import HFEngine

    return _engine(spec, HFEngine, decode_step="static")


def side_graph(spec: dict) -> dict:
    from alignline.generate.hf import HFEngine

    return _engine(spec, HFEngine, decode_step="graph")


def side_baseline(spec: dict) -> dict:
    import importlib.util

    source = subprocess.run(["git", "show", f"{spec['baseline_rev']}:src/alignline/generate/hf.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(spec["result"]).with_name("baseline_hf.py")
    path.write_text(source)
    module_spec = importlib.util.spec_from_file_location("baseline_hf", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["baseline_hf"] = module
    module_spec.loader.exec_module(module)
    return _engine(spec, module.HFEngine)


def side_transformers(spec: dict) -> dict:
    import torch

    from alignline.models import load_tokenizer

    model = _load(spec)
    pad = load_tokenizer(spec["model"]).pad_token_id
    seconds = 0.0
    for ids in spec["prompts"]:
        x = torch.tensor([ids], device=model.device)
        torch.manual_seed(0)
        _sync(spec["device"])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                                 num_return_sequences=spec["n"], pad_token_id=pad)
        _sync(spec["device"])
        seconds += time.perf_counter() - t0
        assert out.shape == (spec["n"], len(ids) + spec["new_tokens"])
    return {"seconds": seconds, "roofline_tok_s": _child_roofline(model, spec)}


def side_llama_cpp(spec: dict) -> dict:
    """Runs under ``spec["python"]`` (an interpreter with llama-cpp-python): see :func:`llama_cpp_child`; the row's
    peak RSS is that process's own."""
    done = subprocess.run([spec["python"], __file__, "--llama-cpp-child", json.dumps(spec)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp_child(spec: dict) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=max(len(p) for p in spec["prompts"]) + spec["new_tokens"] + 8,
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], n_batch=512, seed=0,
                          verbose=False)
    seconds, prefill = 0.0, 0.0
    for ids in spec["prompts"]:
        for i in range(spec["n"]):  # generate() keeps the longest common prefix: later samples reuse the prompt
            t0 = time.perf_counter()
            for made, _ in enumerate(llm.generate(ids, temp=1.0, top_k=0, top_p=1.0, min_p=0.0), start=1):
                if made == 1 and i == 0:
                    prefill += time.perf_counter() - t0
                if made == spec["new_tokens"]:
                    break
            seconds += time.perf_counter() - t0
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "stats": {"prefill_s": prefill}, "peer_peak_rss_bytes": peak}))


SIDE_FUNCTIONS = {"engine": side_engine, "baseline": side_baseline, "transformers": side_transformers,
                  "llama.cpp": side_llama_cpp, "static": side_static, "graph": side_graph}


# --------------------------------------------------------------------------------------------- parent

def _roofline(model, batch: int, passes: int, device: str) -> float:
    """Decode tokens/s if one step cost only its matmuls at ``batch`` rows: ``F.linear`` over every weight of
    ``model`` in order (each read from memory once per step, as in decoding), LM head included; the median of
    ``passes`` passes (single passes vary by about 20 % on this CPU)."""
    import torch
    import torch.nn.functional as F

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(passes):
            _sync(device)
            t0 = time.perf_counter()
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return batch / sorted(times)[len(times) // 2]


def _parent_roofline(model_dir: str, batch: int, args) -> float:
    """:func:`_roofline` in the parent (for sides that cannot measure their own, i.e. llama.cpp)."""
    import torch

    from alignline.models import load_causal_lm

    torch.set_num_threads(args.threads)
    model = load_causal_lm(model_dir, dtype=args.dtype, device=args.device)
    return _roofline(model, batch, 3 if args.smoke else 11, args.device)


def _row(workload: str, side: str, shape: tuple, child: dict, res, roofline: float) -> dict:
    prompts, n, new, length = shape
    tokens = prompts * n * new
    stats = child.get("stats") or {}
    decode_s = stats.get("decode_s")
    row = {"workload": workload, "side": side, "prompt_tokens": length, "batch": min(64, prompts * n),
           "seconds": child["seconds"], "new_tok_s": tokens / child["seconds"], "prefill_s": stats.get("prefill_s"),
           "peak_rss_gb": child.get("peer_peak_rss_bytes", 0) / 1024**3 or res.peak_rss_gb,
           "roofline_tok_s": child.get("roofline_tok_s") or roofline, "parent_roofline_tok_s": roofline,
           "contention": res.contention}
    if decode_s:
        row["decode_tok_s"] = stats["decode_rows"] / decode_s
        row["decode_ms_per_token"] = 1000 * decode_s / stats["decode_rows"]
    row["share_of_roofline"] = row.get("decode_tok_s", row["new_tok_s"]) / row["roofline_tok_s"]
    return row


def _decode_floor(config: dict, shape: tuple) -> float:
    """The best share of the matmul roofline a decode can reach when its attention FLOPs run at the matmul
    rate: linear / (linear + attention) at the mean decode context (prompt + half the new tokens)."""
    from alignline.telemetry import decode_flops

    linear, attention = decode_flops(config, shape[3] + shape[2] // 2)
    return linear / (linear + attention)


def _verdict(rows: list[dict], config: dict, shapes: dict) -> list[str]:
    from alignline.telemetry import decode_flops

    by = {(r["workload"], r["side"]): r for r in rows}
    lines = []
    for workload, goal in (("a", 2.0), ("b", 3.0)):
        if (workload, "engine") in by and (workload, "baseline") in by:
            engine, baseline = by[workload, "engine"], by[workload, "baseline"]
            shape = shapes[workload]
            best = engine["prefill_s"] + shape[0] * shape[1] * shape[2] / engine["roofline_tok_s"]
            lines.append(f"{workload}: engine / baseline {baseline['seconds'] / engine['seconds']:.2f}x (goal >= "
                         f"{goal:.0f}x; the engine's prefill plus a decode at the roofline would give "
                         f"{baseline['seconds'] / best:.2f}x)")
    for r in rows:
        if r["side"] == "engine":
            lines.append(f"{r['workload']}: engine decode at {100 * r['share_of_roofline']:.0f}% of the roofline "
                         f"at batch {r['batch']} (goal >= 80%; attention FLOPs at the mean context cap it at "
                         f"{100 * _decode_floor(config, shapes[r['workload']]):.0f}%)")
    if ("c", "engine") in by and ("c128", "engine") in by:
        x = by["c", "engine"]["decode_ms_per_token"] / by["c128", "engine"]["decode_ms_per_token"]
        floor = sum(decode_flops(config, 2048 + 32)) / sum(decode_flops(config, 128 + 32))
        lines.append(f"per-token decode cost at 2048 context / at 128: {x:.2f}x (goal <= 1.3x; the attention "
                     f"FLOPs alone put the floor at {floor:.2f}x for this model)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", help=f"comma-separated from {','.join(WORKLOADS)} (default {FULL['workloads']})")
    p.add_argument("--sides", help=f"comma-separated from {','.join(SIDES)} (default: all)")
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline engine")
    p.add_argument("--llama-python", default=sys.executable, help="a Python that has llama-cpp-python")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every side runs (default cpu)")
    p.add_argument("--synthetic-prompts", action="store_true",
                   help="random ordinary tokens instead of ShareGPT turns (where the dataset asset is not installed)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights (default float32: bf16 matmuls are slow on CPUs without AVX-512 BF16)")
    p.add_argument("--llama-cpp-child", help=argparse.SUPPRESS)
    add_common_args(p, default_out=OUT, timeout=3600.0)
    a = finish_args(p.parse_args(argv), full=FULL, quick=QUICK, smoke=SMOKE, default_out=OUT)
    if a.llama_cpp_child:
        llama_cpp_child(json.loads(a.llama_cpp_child))
        return 0
    if a.child:  # named "<workload>-<side>"
        return harness.child_main(a, {a.child: SIDE_FUNCTIONS[a.child.split("-", 1)[1]]})
    if a.quick:
        WORKLOADS["a"] = (8, 4, 48, 128)
    work = harness.new_work_dir(a, "alignline-generate-bench-")
    model = model_path(a, work)
    from alignline.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    sides = a.sides.split(",")
    if "llama.cpp" in sides and subprocess.run([a.llama_python, "-c", "import llama_cpp"],
                                               capture_output=True).returncode != 0:
        print(f"llama.cpp row skipped: {a.llama_python} cannot import llama_cpp (pip install llama-cpp-python)")
        sides.remove("llama.cpp")
    if "graph" in sides and a.device != "cuda":
        print("graph row skipped: CUDA graphs need --device cuda")
        sides.remove("graph")
    rows, failures = [], {}
    for workload in a.workloads.split(","):
        shape = SMOKE_WORKLOAD if workload == "smoke" else WORKLOADS[workload]
        prompts = (synthetic_prompts(tokenizer, shape[3], shape[0], a.seed) if a.synthetic_prompts
                   else build_prompts(tokenizer, shape[3], shape[0]))
        roofline = _parent_roofline(model, min(a.max_batch, shape[0] * shape[1]), a)
        for side in sides:
            spec = {"model": model, "prompts": prompts, "n": shape[1], "new_tokens": shape[2], "threads": a.threads,
                    "max_batch": a.max_batch, "baseline_rev": a.baseline_rev, "python": a.llama_python,
                    "gguf": str(_gguf()), "device": a.device, "dtype": a.dtype, "roofline_passes": 3 if a.smoke else 11}
            child, res, _ = harness.run_in_child(__file__, f"{workload}-{side}", spec, a, work,
                                         harness.child_env(a.threads))
            if child is None:
                failures[f"{workload}-{side}"] = harness.failure_of(res)
                continue
            rows.append(_row(workload, side, shape, child, res, roofline))
            print({k: v for k, v in rows[-1].items() if k != "contention"}, flush=True)
    print(markdown_table(rows, [
        ("workload", "workload", ""), ("side", "side", ""), ("batch", "batch", ""), ("seconds", "s", ".1f"),
        ("prefill_s", "prefill s", ".1f"), ("new_tok_s", "new tok/s", ".1f"), ("decode_tok_s", "decode tok/s", ".1f"),
        ("roofline_tok_s", "roofline tok/s", ".1f"), ("share_of_roofline", "share of roofline", ".2f"),
        ("peak_rss_gb", "peak RSS GB", ".2f")]))
    shapes = {**WORKLOADS, "smoke": SMOKE_WORKLOAD}
    verdict = _verdict(rows, model_config(model), shapes)
    print("\n".join(verdict))
    harness.write_json(a.out, {"command": " ".join([".venv/bin/python", "benchmarks/generate_throughput.py",
                                            *(argv or sys.argv[1:])]),
                       "settings": {k: v for k, v in vars(a).items() if k not in ("child", "spec")},
                       "machine": machine_info(), "rows": rows, "verdict": verdict, "failures": failures})
    harness.drop_work_dir(a, work)
    return 1 if failures else 0


def _gguf() -> Path | None:
    """The SmolLM2 asset's .gguf (the file the alias imports), or None when the asset is not installed."""
    from alignline.errors import AlignlineError
    from alignline.models import ALIASES

    try:
        return ALIASES["smollm2-135m-instruct"].fetch(Path("."))
    except AlignlineError:
        return None


if __name__ == "__main__":
    sys.exit(main())
