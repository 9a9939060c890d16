"""The dpo and tso stages end to end on a tiny model; reference handling; drops; mini-batch boundaries."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignline.config import load_config
from alignline.errors import DataError
from alignline.stages import dpo, tso
from alignline.train.pairs import collate_pairs, pair_logps, tokenise_pairs


def make_pairs(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        out.append({
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": f"Say something about the number {i}."}],
            "chosen": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}." + " Indeed." * (i % 3),
            "rejected": "I don't know." + " Sorry." * (i % 4),
        })
    return out


@pytest.fixture
def pair_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(24)))
    return path


def dpo_cfg(tmp_path, model_dir, pair_file, **over):
    base = {"model": str(model_dir), "output_dir": str(tmp_path / "dpo"),
            "data": {"train": str(pair_file), "eval": str(pair_file), "max_length": 128},
            # fp32 everywhere: the exactness tests below compare runs bit for bit (no bf16 autocast on GPUs)
            "train": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 0,
                      "mixed_precision": "no"}}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(base))
    return load_config(dpo.DPOConfig, path, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("loss", ["dpo", "ipo", "cdpo", "hinge", "dual_clip"])
def test_dpo_stage_trains_every_loss(tmp_path, tiny_model_dir, pair_file, loss):
    cfg = dpo_cfg(tmp_path, tiny_model_dir, pair_file, **{"loss.type": loss})
    out = dpo.run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["pairs_kept"] == 24
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "loss" in m]
    assert len(train_rows) == 6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert key in train_rows[0]
    # step 1 starts at the reference: implicit rewards are 0 there (policy == reference)
    assert abs(train_rows[0]["rewards/margin"]) < 1e-4
    assert metrics[0]["step"] == 0 and abs(metrics[0]["eval/rewards/margin"]) < 1e-4
    assert metrics[-1]["eval/rewards/margin"] > 0  # it learned to prefer chosen on these (train = eval) pairs
    assert (out / "reward_curves.png").stat().st_size > 1000
    assert (out / "model" / "model.safetensors").exists()


def test_reference_logps_are_computed_once_and_stored(tmp_path, tiny_model_dir, pair_file, tiny_tokenizer):
    """ref_logps.json holds the starting policy's log-probs; a rerun after deleting the model reuses it."""
    from alignline.models import load_causal_lm

    cfg = dpo_cfg(tmp_path, tiny_model_dir, pair_file, **{"train.max_steps": 2})
    out = dpo.run(cfg)
    stored = json.loads((out / "ref_logps.json").read_text())
    from collections import Counter

    from alignline.data.io import read_pairs

    ex = tokenise_pairs(read_pairs(pair_file), tiny_tokenizer, max_length=128, counts=Counter())
    model = load_causal_lm(tiny_model_dir, dtype="float32").eval()
    with torch.no_grad():
        c, r, _, _ = pair_logps(model, collate_pairs(ex[:5], tiny_tokenizer.pad_token_id))
    for i in range(5):
        assert stored["ids"][i] == ex[i].id
        assert abs(stored["values"][i][0] - float(c[i])) < 1e-4 and abs(stored["values"][i][1] - float(r[i])) < 1e-4


def test_dropped_pairs_are_counted_and_capped(tmp_path, tiny_model_dir, tiny_tokenizer):
    """2 identical, 1 prompt too long, of 22: 13.6 % > 10 % is an error; with the cap at 0.2 they are counted."""
    from collections import Counter

    from alignline.data.records import Pair

    pairs = [Pair.model_validate(p) for p in make_pairs(19)]
    pairs.append(Pair(id="same", prompt=[{"role": "user", "content": "x"}], chosen="a b", rejected="a b "))
    pairs.append(Pair(id="same2", prompt=[{"role": "user", "content": "y"}], chosen="c", rejected="c"))
    pairs.append(Pair(id="long", prompt=[{"role": "user", "content": "z" * 400}], chosen="c", rejected="d"))
    with pytest.raises(DataError, match=r"3 of 22 pairs \(14%\) would be dropped.*max_drop_fraction=0.1"):
        tokenise_pairs(pairs, tiny_tokenizer, max_length=128, counts=Counter())
    counts = Counter()
    kept = tokenise_pairs(pairs, tiny_tokenizer, max_length=128, counts=counts, max_drop_fraction=0.2)
    assert len(kept) == 19
    assert counts["dropped_identical_text"] == 2 and counts["dropped_prompt_too_long"] == 1


def tso_cfg(tmp_path, model_dir, pair_file, **over):
    base = {"model": str(model_dir), "output_dir": str(tmp_path / "tso"), "minibatches": 3,
            "data": {"train": str(pair_file), "max_length": 128},
            "train": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_ratio": 0.0,
                      "mixed_precision": "no"}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tso.yaml"
    path.write_text(yaml.safe_dump(base))
    return load_config(tso.TSOConfig, path, [f"{k}={v}" for k, v in over.items()])


def test_tso_reference_swaps_exactly_at_minibatch_boundaries(tmp_path, tiny_model_dir, pair_file, tiny_tokenizer):
    """The stored reference log-probs of mini-batch k equal the log-probs of version v{k-1}."""
    from alignline.models import load_causal_lm

    out = tso.run(tso_cfg(tmp_path, tiny_model_dir, pair_file, keep_versions="true"))  # v1, v2 are read below
    versions = json.loads((out / "versions.json").read_text())
    assert [v["version"] for v in versions] == [0, 1, 2, 3]
    parts = json.loads((out / "minibatches.json").read_text())["ids"]
    assert sorted(len(p) for p in parts) == [8, 8, 8] and len({i for p in parts for i in p}) == 24
    from collections import Counter

    from alignline.data.io import read_pairs

    ex = {e.id: e for e in tokenise_pairs(read_pairs(pair_file), tiny_tokenizer, max_length=128, counts=Counter())}
    for k in (1, 2, 3):
        stored = json.loads((out / f"iter-{k}" / "ref_logps.json").read_text())
        model = load_causal_lm(versions[k - 1]["path"], dtype="float32").eval()
        batch = [ex[i] for i in stored["ids"]]
        with torch.no_grad():
            c, r, _, _ = pair_logps(model, collate_pairs(batch, tiny_tokenizer.pad_token_id))
        got = torch.tensor(stored["values"], dtype=torch.float64)
        assert torch.allclose(got[:, 0], c.double(), atol=1e-4) and torch.allclose(got[:, 1], r.double(), atol=1e-4)
        if k > 1:  # and they differ from the starting model's: the reference really moved
            m0 = load_causal_lm(versions[0]["path"], dtype="float32").eval()
            with torch.no_grad():
                c0, _, _, _ = pair_logps(m0, collate_pairs(batch, tiny_tokenizer.pad_token_id))
            assert not torch.allclose(c0.double(), got[:, 0], atol=1e-3)
    assert (out / "reward_curves.png").exists()
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "versions" / "v2" / "README.md")  # each version's card names the one before
    assert card.data.tags == ["tso", "dpo", "dual-clip", "alignline"] and f"`{versions[1]['path']}`" in card.text
    assert "| minibatch | 2 |" in card.text and "| minibatch_pairs | 8 |" in card.text


def test_tso_resume_in_the_middle_of_a_minibatch(tmp_path, tiny_model_dir, pair_file):
    full = tso.run(tso_cfg(tmp_path / "a", tiny_model_dir, pair_file))
    part_cfg = tso_cfg(tmp_path / "b", tiny_model_dir, pair_file, stop_at="[2, 1]")
    tso.run(part_cfg)
    assert not (tmp_path / "b" / "tso" / "versions" / "v2").exists()
    resumed = tso.run(tso_cfg(tmp_path / "b", tiny_model_dir, pair_file))
    a = load_file(str(full / "versions" / "v3" / "model.safetensors"))
    b = load_file(str(resumed / "versions" / "v3" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tso_redone_on_changed_pairs_retrains_every_minibatch(tmp_path, tiny_model_dir, pair_file):
    """The same pair ids with other rejected texts: a finished run in the same directory is redone from
    scratch (no finished mini-batch or cached reference reused), and equals a run in a new directory."""
    first = tso.run(tso_cfg(tmp_path / "a", tiny_model_dir, pair_file, minibatches=2))
    changed = make_pairs(24)
    for p in changed:
        p["rejected"] = "No idea at all, " + p["rejected"]
    pair_file.write_text("".join(json.dumps(p) + "\n" for p in changed))
    again = tso.run(tso_cfg(tmp_path / "a", tiny_model_dir, pair_file, minibatches=2))
    clean = tso.run(tso_cfg(tmp_path / "b", tiny_model_dir, pair_file, minibatches=2))
    assert again == first
    a = load_file(str(again / "versions" / "v2" / "model.safetensors"))
    b = load_file(str(clean / "versions" / "v2" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in (1, 2):
        assert (json.loads((again / f"iter-{k}" / "ref_logps.json").read_text())["values"]
                == json.loads((clean / f"iter-{k}" / "ref_logps.json").read_text())["values"])


def test_tso_regenerates_self_pairs_between_minibatches(tmp_path, tiny_model_dir, pair_file):
    """With `regenerate`, mini-batches 2..K get best-vs-worst pairs from the current policy's own samples,
    ranked by a reward model, recorded in iter-k/self_pairs.jsonl with their provenance."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"Hi {i}"}]}) + "\n"
                               for i in range(6)))
    cfg = tso_cfg(tmp_path, tiny_model_dir, pair_file, **{
        "regenerate": json.dumps({"prompts": str(prompts), "reward_model": str(tiny_model_dir), "n": 3,
                                  "sampling": {"temperature": 1.0, "max_new_tokens": 8}})})
    out = tso.run(cfg)
    assert not (out / "iter-1" / "self_pairs.jsonl").exists()
    for k in (2, 3):
        rows = [json.loads(ln) for ln in (out / f"iter-{k}" / "self_pairs.jsonl").read_text().splitlines()]
        assert rows and all(r["provenance"]["source"] == f"policy-v{k - 1}" for r in rows)
        assert all(r["provenance"]["scores"][0] > r["provenance"]["scores"][1] for r in rows)
        ref_ids = json.loads((out / f"iter-{k}" / "ref_logps.json").read_text())["ids"]
        assert {r["id"] for r in rows} <= set(ref_ids)  # trained in mini-batch k, with v{k-1} as reference
