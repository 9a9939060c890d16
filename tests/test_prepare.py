"""``alignline prepare`` end to end on a small, truncated ShareGPT file."""

from __future__ import annotations

import json

import yaml

from alignline.config import load_config
from alignline.data.io import read_conversations, read_prompts
from alignline.stages import prepare


def sharegpt_file(path, n=60):
    recs = []
    for i in range(n):
        conv = [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."},
                {"from": "human", "value": f"Follow-up {i}?"}, {"from": "chatgpt", "value": f"More {i}."}]
        if i % 10 == 0:
            conv.insert(0, {"from": "system", "value": "Be nice."})
        if i % 15 == 0:
            conv.append({"from": "tool", "value": "ignored"})
        recs.append({"id": f"conv{i}_0", "conversations": conv})
    recs.append({"id": "conv0_1", "conversations": [{"from": "gpt", "value": "continuation"},
                                                    {"from": "human", "value": "next?"},
                                                    {"from": "gpt", "value": "yes."}]})
    text = json.dumps(recs, indent=1)
    path.write_text(text[: len(text) - 40])  # truncated inside the last record
    return n  # the last (continuation) record is cut away


def test_prepare_sharegpt_splits(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "sg.json"
    sharegpt_file(src)
    cfg_path = tmp_path / "prep.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "path": str(src), "output_dir": str(tmp_path / "out"), "tokenizer": str(tiny_tokenizer_dir),
        "splits": {"sft": {"fraction": 0.5, "kind": "conversations"}, "eval": {"fraction": 0.3, "kind": "prompts"}},
        "instructions": {"splits": ["eval"], "seed": 7},
    }))
    out = prepare.run(load_config(prepare.PrepareConfig, cfg_path))
    summary = json.loads((out / "summary.json").read_text())
    assert "recovered 60 conversations" in summary["recovery"]
    counts = summary["counts"]
    assert counts["kept"] == 60 and counts["unknown_role:tool"] == 4
    sft = read_conversations(out / "sft.jsonl")
    ev = read_prompts(out / "eval.jsonl")
    sft_ids = {c.id for c in sft}
    ev_conv = {p.meta["conversation_id"] for p in ev}
    assert not sft_ids & ev_conv  # disjoint
    assert len(ev) == 2 * len(ev_conv)  # two assistant turns -> two prompts each
    assert all(p.reference for p in ev)
    for p in ev:  # 1-3 verifiable instructions, their text appended to the last user turn
        assert 1 <= len(p.meta["instructions"]) <= 3
        assert p.meta["instructions"][0]["text"] in p.messages[-1].content
    assert 18 <= len(sft) <= 42 and 6 <= len(ev_conv) <= 30 and len(sft) + len(ev_conv) <= 60
    # rerun: nothing to do
    again = prepare.run(load_config(prepare.PrepareConfig, cfg_path))
    assert json.loads((again / "manifest.json").read_text())["status"] == "complete"
