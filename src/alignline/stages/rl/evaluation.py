"""The held-out evaluation of ``alignline rl``: greedy answers checked by the verifier, and the paired
change of the strict pass rate from the first evaluation to the last."""

from __future__ import annotations

import math
from pathlib import Path

from alignline.data.io import atomic_write_bytes, iter_jsonl, jsonl_bytes, read_prompts
from alignline.errors import DataError
from alignline.stages.rl.config import RLConfig


def eval_fn(cfg: RLConfig, tokenizer, root: Path):
    """The loop's evaluation: greedy answers on held-out prompts, verifier pass rates with standard errors;
    the per-instruction results of the first and the latest call go to eval_start.jsonl / eval_last.jsonl."""
    from alignline.generate.base import SamplingParams
    from alignline.generate.hf import HFEngine
    from alignline.judges.verifiable import verify
    from alignline.train.actor_critic import policy_and_critic

    prompts = read_prompts(cfg.eval.prompts)[: cfg.eval.max_prompts]
    bare = [p.id for p in prompts if not p.meta.get("instructions")]
    if bare:
        raise DataError(f"{len(bare)} eval prompts carry no verifiable instructions (e.g. '{bare[0]}')",
                        path=cfg.eval.prompts, field="meta.instructions")
    greedy = SamplingParams(temperature=0, max_new_tokens=cfg.eval.max_new_tokens)

    def evaluate(model) -> dict[str, float]:
        policy, _ = policy_and_critic(model)
        answers = HFEngine(policy, tokenizer, max_batch=cfg.rollout.max_batch,
                           decode_step=cfg.rollout.decode_step).generate(prompts, 1, greedy)
        rows = []
        for p, (a,) in zip(prompts, answers):
            s, lo = verify(a.text, p.meta["instructions"], "strict"), verify(a.text, p.meta["instructions"], "loose")
            rows.append({"prompt_id": p.id, "strict": s.followed, "loose": lo.followed, "text": a.text})
        inst = [x for r in rows for x in r["strict"]]
        rate = sum(inst) / len(inst)
        start = root / "eval_start.jsonl"
        atomic_write_bytes(root / ("eval_last.jsonl" if start.exists() else "eval_start.jsonl"), jsonl_bytes(rows))
        return {"instruction_strict": rate, "instruction_strict_se": math.sqrt(rate * (1 - rate) / len(inst)),
                "instruction_loose": sum(x for r in rows for x in r["loose"]) / len(inst),
                "prompt_strict": sum(all(r["strict"]) for r in rows) / len(rows), "instructions": len(inst),
                "response_words": mean_words(rows)}

    return evaluate


def paired_change(root: Path) -> dict | None:
    """Instruction-level strict pass rate, last eval minus first, with its paired standard error."""
    a, b = root / "eval_start.jsonl", root / "eval_last.jsonl"
    if not (a.exists() and b.exists()):
        return None
    x = [v for _, row in iter_jsonl(a) for v in row["strict"]]
    y = [v for _, row in iter_jsonl(b) for v in row["strict"]]
    if len(x) != len(y):
        raise DataError(f"{len(x)} instructions checked at the start, {len(y)} at the end: the two evaluations "
                        "are not of the same prompts", path=str(b))
    d = [float(q) - float(p) for p, q in zip(x, y)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    return {"start": sum(x) / n, "end": sum(y) / n, "change": mean, "paired_se": sd / math.sqrt(n), "n": n,
            "start_words": mean_words(r for _, r in iter_jsonl(a)), "end_words": mean_words(r for _, r in iter_jsonl(b))}


def mean_words(rows) -> float:
    """Mean length in words of the answers (beside a pass rate: a policy that stops answering passes many
    instructions vacuously)."""
    lengths = [len(r["text"].split()) for r in rows]
    return sum(lengths) / max(len(lengths), 1)
