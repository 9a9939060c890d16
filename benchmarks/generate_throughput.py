"""Sampling throughput: alignline's hf engine (prompt prefilled once, cache reused for the n samples) vs
transformers' ``generate(num_return_sequences=n)`` (the prompt prefilled n times), same model and sampling.

    .venv/bin/python benchmarks/generate_throughput.py            # n=16, prompt 512, 128 new tokens
    .venv/bin/python benchmarks/generate_throughput.py --quick    # smoke run

Each side runs in its own child process (peak RSS is its own), on one ShareGPT prompt cut to
``--prompt-tokens`` tokens, with ``--repeats`` prompts. Timed: the generate call only. Both sides are
forced to produce exactly ``--new-tokens`` tokens per sample (end tokens ignored) so they do equal work;
new tokens/s = n x new tokens x prompts / seconds. Results: stdout and benchmarks/results/generate_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (benchmarks/ is sys.path[0]): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (
    child_env,
    machine_info,
    markdown_table,
    run_child,
    wait_until_quiet,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "generate_throughput.json"


def build_prompts(model_path: str, prompt_tokens: int, count: int) -> list[list[int]]:
    from alignline.data.chat import prompt_ids
    from alignline.data.sharegpt import normalise_sharegpt, read_sharegpt
    from alignline.models import load_tokenizer

    tok = load_tokenizer(model_path)
    raw, _ = read_sharegpt()
    convs, _ = normalise_sharegpt(raw[:3000], strip_leading_assistant=True)
    out = []
    for c in convs:
        text = c.messages[-2].content if c.messages[-2].role == "user" else c.messages[0].content
        body = tok(text, add_special_tokens=False)["input_ids"]
        if len(body) < prompt_tokens:
            continue
        frame = prompt_ids(tok, [{"role": "user", "content": "x"}])
        keep = prompt_tokens - (len(frame) - 1)
        ids = prompt_ids(tok, [{"role": "user", "content": tok.decode(body[:keep])}])
        out.append(ids[:prompt_tokens] if len(ids) > prompt_tokens else ids)
        if len(out) == count:
            return out
    raise SystemExit("not enough long prompts")


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from alignline.generate.base import SamplingParams
    from alignline.generate.hf import HFEngine
    from alignline.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(spec["model"], dtype="float32").eval()
    tok = load_tokenizer(spec["model"])
    sp = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=spec["new_tokens"], seed=0)
    n, times = spec["n"], []
    if spec["side"] == "alignline":
        engine = HFEngine(model, tok, max_batch=n)
        engine.end_ids = frozenset()  # equal work: never stop early
        for ids in spec["prompts"]:
            t0 = time.perf_counter()
            samples = engine.sample(ids, list(range(n)), sp)
            times.append(time.perf_counter() - t0)
            assert all(len(s.token_ids) == spec["new_tokens"] for s in samples)
    else:
        for ids in spec["prompts"]:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                                     top_p=1.0, top_k=0, max_new_tokens=spec["new_tokens"],
                                     min_new_tokens=spec["new_tokens"], num_return_sequences=n,
                                     pad_token_id=tok.pad_token_id)
            times.append(time.perf_counter() - t0)
            assert out.shape == (n, len(ids) + spec["new_tokens"])
    return {"seconds": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="prompts timed per side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        spec = json.loads(Path(a.spec).read_text())
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return 0
    if a.quick:
        a.n, a.prompt_tokens, a.new_tokens, a.repeats = 4, 64, 8, 1
    from alignline.models import resolve_model

    model = str(resolve_model("smollm2-135m-instruct"))
    prompts = build_prompts(model, a.prompt_tokens, a.repeats)
    work = ROOT / "benchmarks" / "results" / "work-generate"  # git-ignored
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for side in ("alignline", "transformers"):
        quiet = wait_until_quiet(max_wait_s=0 if a.quick else 600)
        spec = {"side": side, "model": model, "prompts": prompts, "n": a.n, "new_tokens": a.new_tokens,
                "threads": a.threads, "result": str(work / f"{side}.json")}
        (work / f"{side}.spec.json").write_text(json.dumps(spec))
        res = run_child([sys.executable, __file__, "--child", side, "--spec", str(work / f"{side}.spec.json")],
                        log_path=work / f"{side}.log", env=child_env(a.threads), timeout_s=3600)
        if res.returncode != 0:
            print(res.tail())
            return 1
        secs = json.loads((work / f"{side}.json").read_text())["seconds"]
        tokens = a.n * a.new_tokens * len(secs)
        rows.append({"side": side, "seconds": sum(secs), "new_tok_s": tokens / sum(secs),
                     "peak_rss_gb": res.peak_rss_gb, "loadavg": quiet["loadavg"]})
    ratio = rows[0]["new_tok_s"] / rows[1]["new_tok_s"]
    table = markdown_table(rows, [("side", "engine", ""), ("seconds", "generate s", ".1f"),
                                  ("new_tok_s", "new tokens/s", ".1f"), ("peak_rss_gb", "peak RSS GB", ".2f")])
    print(table)
    print(f"ratio alignline / transformers num_return_sequences: {ratio:.2f}x (goal >= 1.5x)")
    write_json(OUT if not a.quick else OUT.with_name("generate_throughput_quick.json"), {
        "command": " ".join([".venv/bin/python", "benchmarks/generate_throughput.py", *(argv or sys.argv[1:])]),
        "settings": {"n": a.n, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                     "prompts": len(prompts), "threads": a.threads},
        "machine": machine_info(), "rows": rows, "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
