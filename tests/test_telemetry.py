"""Telemetry: the useful-FLOP formula, token and logit-position counts, phases and per-step figures that the
stages write into metrics.jsonl and the manifest (the benchmarks read these instead of patching the stages)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from alignline.models import tiny_causal_lm_config
from alignline.telemetry import (
    GB,
    EngineStats,
    RssWatch,
    Telemetry,
    decode_flops,
    logit_positions,
    matmul_shapes,
    param_counts,
    read_run,
    real_tokens,
    step_split,
    useful_flops,
)
from alignline.train.batching import collate_packed, collate_padded
from alignline.train.pairs import TokenisedPair, collate_pairs

# the tiny model of the useful_flops docstring: hidden 64, 2 layers, MLP 128, vocabulary 300
BODY = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
HEAD = 300 * 64


def test_useful_flops_matches_the_docstring_example():
    assert BODY == 82_240 and HEAD == 19_200
    assert useful_flops(BODY, HEAD, 100, 40, grad=True) == 53_952_000
    assert useful_flops(BODY, HEAD, 100, 40, grad=False) == 17_984_000


def test_matmul_shapes_are_the_useful_flop_model_by_shape():
    """The tiny model at 10 tokens: per layer q, k, v, o 64 x 64 each (4 heads x 16 = 64 wide, kv as wide),
    gate and up 64 x 128, down 128 x 64, the head 64 x 300 once: 2 x (4 x 4,096 + 3 x 8,192) + 19,200 = 101,120
    weights, which are BODY less its 2 x 2 x 64 + 64 = 320 norm weights, plus HEAD. A forward over 10 tokens is
    2 x 10 x 101,120 = 2,022,400 FLOPs by shape, and useful_flops(BODY - 320, HEAD, 10, 10) says the same."""
    config = tiny_causal_lm_config(vocab_size=300).to_dict()
    shapes = matmul_shapes(config, 10)
    assert shapes["q"] == (10, 64, 64, 1) and shapes["k/v"] == (10, 64, 64, 2) and shapes["down"] == (10, 128, 64, 1)
    by_shape = sum(2 * m * k * n * per_layer * 2 for m, k, n, per_layer in shapes.values())
    assert by_shape == 2_022_400 == useful_flops(BODY - 320, HEAD, 10, 10, grad=False)


def test_decode_flops_by_hand():
    """One token at context 100: linear 2 x 101,120 = 202,240 (see above); attention 4 x 2 layers x 4 heads x 16
    x 100 = 51,200; with grouped-query attention (2 kv heads) the weights shrink by 2 layers x 2 x 64 x 32 =
    8,192 (k and v 32 wide instead of 64): linear 2 x 92,928 = 185,856, attention unchanged."""
    assert decode_flops(tiny_causal_lm_config(vocab_size=300).to_dict(), 100) == (202_240.0, 51_200.0)
    gqa = tiny_causal_lm_config(vocab_size=300, num_key_value_heads=2).to_dict()
    assert decode_flops(gqa, 100) == (185_856.0, 51_200.0)


def test_read_run_keeps_step_records_and_the_manifest_phases(tmp_path):
    """metrics.jsonl holds an evaluation line (no tokens_per_s), two step records and a blank line: the steps
    come back in order; step_split sums their laps (forward 0.5 + 1.5 = 2, backward 1 + 2 = 3, optimizer 0.25 +
    0.25 = 0.5)."""
    steps = [{"step": 1, "tokens_per_s": 10.0, "time/forward_s": 0.5, "time/backward_s": 1.0,
              "time/optimizer_s": 0.25}, {"step": 2, "tokens_per_s": 12.0, "time/forward_s": 1.5,
                                          "time/backward_s": 2.0, "time/optimizer_s": 0.25}]
    lines = [json.dumps({"step": 0, "eval/loss": 1.0}), json.dumps(steps[0]), "", json.dumps(steps[1])]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    phases = {"train": {"seconds": 4.0, "calls": 1}}
    (tmp_path / "manifest.json").write_text(json.dumps({"phases": phases, "counts": {"pairs": 3}}))
    run = read_run(tmp_path)
    assert run == {"steps": steps, "phases": phases, "counts": {"pairs": 3}}
    assert step_split(run["steps"]) == {"forward": 2.0, "backward": 3.0, "optimizer": 0.5}


def test_rss_watch_calls_a_subclass_sample_and_engine_stats_add_up():
    class Counting(RssWatch):
        def __init__(self):
            super().__init__(interval_s=0.001)
            self.calls = 0

        def sample(self):
            self.calls += 1
            super().sample()

    watch = Counting()
    watch.sample()
    peak = watch.take()  # samples once more, through the subclass
    assert watch.calls == 2 and peak > 0
    stats = EngineStats()
    stats.add(decode_s=0.5, decode_steps=1)
    stats.add(decode_s=0.25, decode_steps=1, prefill_tokens=7)
    assert stats == {"decode_s": 0.75, "decode_steps": 2, "prefill_tokens": 7}


@pytest.mark.parametrize("tied", [False, True])
def test_param_counts_split_body_and_head(tied):
    model = LlamaForCausalLM(tiny_causal_lm_config(vocab_size=300, tie_word_embeddings=tied))
    assert param_counts(model) == (BODY, HEAD)
    rm = LlamaForSequenceClassification(tiny_causal_lm_config(vocab_size=300, num_labels=1))
    assert param_counts(rm) == (BODY, 64)  # the scalar head: 64 x 1, no bias


def test_real_tokens_and_logit_positions_by_hand():
    a = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
    b = {"input_ids": [5, 6, 9], "labels": [-100, 6, 9]}
    padded = collate_padded([a, b], pad_id=0)
    assert real_tokens(padded) == 7 and logit_positions(padded) == 4  # targets 7, 8 | 6, 9
    packed = collate_packed([[a], [b]], pad_id=0)  # two rows, the second padded by one token
    assert packed["input_ids"].numel() == 8 and real_tokens(packed) == 7
    assert logit_positions(packed) == 4
    pair = TokenisedPair(id="x", prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6, 7, 8, 9])
    short = TokenisedPair(id="y", prompt_ids=[1], chosen_ids=[4], rejected_ids=[6])
    shared = collate_pairs([pair, short], pad_id=0, layout="shared")
    assert real_tokens(shared) == (3 + 2 + 4) + (1 + 1 + 1)  # prompt once per pair, padding not counted
    # response tokens only; the first chosen and first rejected token share the prompt's last position
    assert logit_positions(shared) == (2 + 4 - 1) + (1 + 1 - 1)
    separate = collate_pairs([pair, short], pad_id=0, layout="separate")
    assert real_tokens(separate) == (3 + 2) + (3 + 4) + (1 + 1) + (1 + 1)
    assert logit_positions(separate) == 8


def test_phases_nest_and_keep_their_peaks():
    tel = Telemetry("cpu")
    with tel.phase("outer"):
        with tel.phase("inner") as inner:
            block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
            base = tel.lifetime.get("peak_rss_gb", 0.0)
        del block
        tel.add(tokens=5)
    tel.add(tokens=99)  # no phase open: counted nowhere
    s = tel.summary()
    assert s["inner"]["calls"] == 1 and s["inner"]["seconds"] > 0
    assert inner["peak_rss_gb"] >= 60 / 1024  # at least the 64 MiB held when the phase closed
    assert s["outer"]["peak_rss_gb"] >= s["inner"]["peak_rss_gb"]  # the outer phase includes the inner one
    assert s["outer"]["tokens"] == 5 and "tokens" not in s["inner"]
    assert s["process"]["peak_rss_gb"] >= s["outer"]["peak_rss_gb"] >= base
    assert s["process"]["process_peak_rss_gb"] * GB > 0


def _steps_and_phases(out):
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    return steps, json.loads((out / "manifest.json").read_text())["phases"]


def test_sft_records_phases_steps_tokens_and_flops(tmp_path, tiny_model_dir, tiny_tokenizer):
    from alignline.data.chat import tokenise_conversation
    from alignline.data.records import Conversation
    from alignline.models import load_causal_lm
    from alignline.stages.sft import SFTConfig, run

    convs = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"q {i}"},
                                          {"role": "assistant", "content": "a" * (3 + i)}]} for i in range(4)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    out = run(SFTConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "sft"),
                        data={"train": str(data), "max_length": 128, "packing": False},
                        train={"epochs": 1, "batch_size": 4, "lr": 1e-3, "mixed_precision": "no", "save_every": 1}))
    steps, phases = _steps_and_phases(out)
    ex = [tokenise_conversation(tiny_tokenizer, Conversation.model_validate(c).messages) for c in convs]
    tokens, trained = sum(len(e.input_ids) for e in ex), sum(e.n_trained for e in ex)
    body, head = param_counts(load_causal_lm(tiny_model_dir, dtype="float32"))
    (step,) = steps  # one step of all 4 conversations
    assert step["tokens"] == tokens and step["logit_positions"] == step["units"] == trained
    assert step["flops"] == 6 * (body * tokens + head * trained)
    for key in ("time/forward_s", "time/backward_s", "time/optimizer_s", "mem/peak_rss_gb"):
        assert step[key] > 0, key
    assert step["time/step_s"] >= step["time/forward_s"] + step["time/backward_s"] + step["time/optimizer_s"]
    for name in ("train", "checkpoint", "save_model"):
        assert phases[name]["seconds"] > 0 and phases[name]["calls"] == 1 and phases[name]["peak_rss_gb"] > 0
    assert phases["train"]["tokens"] == tokens and phases["train"]["flops"] == step["flops"]
    assert phases["train"]["steps"] == 1 and phases["params"] == {"body": body, "head": head}
    assert "tokens" not in phases["checkpoint"]


def test_dpo_reference_pass_counts_no_grad_flops(tmp_path, tiny_model_dir, tiny_tokenizer):
    from alignline.data.io import read_pairs
    from alignline.stages import dpo
    from alignline.train.pairs import tokenise_pairs

    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Number {i}?"}],
              "chosen": f"It is {i}." + " Yes." * i, "rejected": "No idea." * (1 + i % 2)} for i in range(6)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "dpo"),
                                data={"train": str(path), "max_length": 128},
                                train={"epochs": 1, "batch_size": 3, "grad_accum": 1, "warmup_steps": 0,
                                       "mixed_precision": "no"}))
    steps, phases = _steps_and_phases(out)
    ex = tokenise_pairs(read_pairs(path), tiny_tokenizer, max_length=128, counts=Counter())
    tokens = sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in ex)
    responses = sum(len(e.chosen_ids) + len(e.rejected_ids) - 1 for e in ex)  # shared layout: see above
    ref = phases["reference"]
    assert ref["seconds"] > 0 and ref["tokens"] == tokens and ref["logit_positions"] == responses
    body, head = phases["params"]["body"], phases["params"]["head"]
    assert ref["flops"] == 2 * (body * tokens + head * responses)
    assert sum(s["tokens"] for s in steps) == tokens and sum(s["logit_positions"] for s in steps) == responses
    assert phases["train"]["flops"] == 3 * ref["flops"]  # the same passes with gradients: 6 / 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reference_seconds"] == pytest.approx(ref["seconds"], abs=1e-4)
