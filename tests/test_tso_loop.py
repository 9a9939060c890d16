"""tso-loop and self-reward on tiny random models: 4 prompts, n=2, 8 new tokens, one step per mini-batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from alignline.config import load_config
from alignline.errors import ConfigError
from alignline.stages import self_reward, tso_loop

IDS = ["p0", "p1", "p2", "p3"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """The tiny LM with a seeded scalar head, saved: a reward model whose scores are the same on every load."""
    from alignline.models import load_reward_model, save_model

    d = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    save_model(load_reward_model(tiny_model_dir, dtype="float32"), tiny_tokenizer, d)
    return d


@pytest.fixture
def data(tmp_path):
    """4 prompts with reference answers, a pre-computed member 'small', 3 held-out prompts with instructions."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": pid, "messages": [{"role": "user", "content": f"Tell me about {pid}."}],
         "reference": f"{pid} is a prompt."} for pid in IDS])
    small = write_jsonl(tmp_path / "small.jsonl", [
        {"prompt_id": pid, "sample_idx": k, "text": f"small says {pid} {k}", "source": "small"}
        for pid in IDS for k in range(2)])
    instr = [{"id": "no_commas", "kwargs": {}, "text": "(no commas)"},
             {"id": "all_lowercase", "kwargs": {}, "text": "(lowercase)"}]
    evals = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": f"e{i}", "messages": [{"role": "user", "content": f"Greet {i}."}], "meta": {"instructions": instr}}
        for i in range(3)])
    return {"prompts": prompts, "small": small, "eval": evals}


def common(tmp_path, model_dir, rm_dir, data, out):
    return {"prompts": data["prompts"], "model": str(model_dir), "output_dir": str(tmp_path / out),
            "sample": {"n": 2, "sampling": {"temperature": 1.0, "max_new_tokens": 8}, "dtype": "float32"},
            "score": {"reward_model": str(rm_dir), "dtype": "float32"},
            "eval_prompts": data["eval"], "eval_sampling": {"temperature": 0.0, "max_new_tokens": 8}}


TRAIN = {"max_steps": 1, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_ratio": 0.0}


def loop_cfg(tmp_path, model_dir, rm_dir, data, **matrix_over):
    spec = {"members": [{"name": "big", "version": "v2", "size": "tiny", "model": str(model_dir),
                         "engine": {"dtype": "float32"}},
                        {"name": "small", "version": "v1", "size": "tiny", "responses": data["small"]}],
            "positive": {"human": 1, "big": 1}, "negative": {"small": 1}, **matrix_over}
    (tmp_path / "matrix.yaml").write_text(yaml.safe_dump(spec))
    body = {**common(tmp_path, model_dir, rm_dir, data, "loop"), "matrix": str(tmp_path / "matrix.yaml"),
            "tso": {"minibatches": 2, "train": TRAIN, "data": {"max_length": 128}}}
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump(body))
    return load_config(tso_loop.TSOLoopConfig, tmp_path / "loop.yaml")


def test_register_rule_moves_the_previous_version_to_the_negative_set():
    """Stage 2 registers policy-v2: it joins positive (weight 1); policy-v1 leaves positive for negative (0.5);
    'keep' leaves policy-v1 in positive; 'drop' removes it from both sets; newest 'none' adds no weight."""
    m = {"members": [{"name": "policy-v1"}], "positive": {"human": 1.0, "policy-v1": 1.0}, "negative": {"small": 2.0}}
    new = {"name": "policy-v2", "version": "v2"}
    rule = tso_loop.RegisterSettings(previous_weight=0.5)
    out = tso_loop.register_version(m, new, "policy-v1", rule)
    assert out == {"members": [{"name": "policy-v1"}, new], "positive": {"human": 1.0, "policy-v2": 1.0},
                   "negative": {"small": 2.0, "policy-v1": 0.5}}
    assert m["positive"] == {"human": 1.0, "policy-v1": 1.0}  # the input is left as it was
    keep = tso_loop.register_version(m, new, "policy-v1", rule.model_copy(update={"previous": "keep"}))
    assert keep["positive"] == {"human": 1.0, "policy-v1": 1.0, "policy-v2": 1.0} and keep["negative"] == {"small": 2.0}
    drop = tso_loop.register_version(m, new, "policy-v1", rule.model_copy(update={"previous": "drop", "newest": "none"}))
    assert drop["positive"] == {"human": 1.0} and drop["negative"] == {"small": 2.0}
    assert [x["name"] for x in drop["members"]] == ["policy-v1", "policy-v2"]  # still listed


def test_unknown_member_or_name_clash_fails_before_anything_runs(tmp_path, tiny_model_dir, data):
    with pytest.raises(ConfigError, match="negative set names member 'gpt5', which does not exist"):
        tso_loop.run(loop_cfg(tmp_path, tiny_model_dir, "rm", data, negative={"gpt5": 1}))
    clash = {"members": [{"name": "policy-v2", "responses": data["small"]}], "positive": {"human": 1},
             "negative": {"policy-v2": 1}}
    with pytest.raises(ConfigError, match="member 'policy-v2' has the name the loop gives trained version v2"):
        tso_loop.run(loop_cfg(tmp_path, tiny_model_dir, "rm", data, **clash))
    assert not (tmp_path / "loop").exists()


def test_tso_loop_three_stages(tmp_path, tiny_model_dir, tiny_rm_dir, data, monkeypatch):
    out = tso_loop.run(loop_cfg(tmp_path, tiny_model_dir, tiny_rm_dir, data))
    versions = read_json(out / "versions.json")
    assert [v["version"] for v in versions] == ["v0", "v1", "v2", "v3"]
    for s in (1, 2, 3):
        v, tso_dir = versions[s], out / f"stage-{s}" / "tso"
        assert v["path"] == str(tso_dir / "versions" / "v2") and (Path(v["path"]) / "model.safetensors").exists()
        assert v["trained_from"] == versions[s - 1]["path"] and v["member"] == f"policy-v{s}"
        # mini-batch 1 is trained against the stage's starting policy, mini-batch 2 against mini-batch 1's result
        assert v["references"] == [str(Path(versions[s - 1]["path"]).resolve()), str(tso_dir / "versions" / "v1")]
        sources = {json.loads(ln)["source"] for f in (out / f"stage-{s}" / "policy_samples").glob("responses-*.jsonl")
                   for ln in f.read_text().splitlines()}
        assert sources == {f"policy-v{s - 1}@v{s - 1}"}  # the policy regenerated at every stage
        summary = read_json(out / f"stage-{s}" / "summary.json")
        pairs = read_json(out / f"stage-{s}" / "pairs" / "manifest.json")["counts"]
        assert summary["pairs"] == pairs and pairs["pairs"] == pairs["matrix_pairs"] + pairs["self_pairs"] > 0
        assert summary["training"]["loss"] == "dual_clip"
        assert [b["steps"] for b in summary["training"]["minibatches"]] == [1, 1]

    from safetensors.torch import load_file

    v0, v3 = (load_file(str(Path(versions[i]["path"]) / "model.safetensors")) for i in (0, 3))
    assert any(not torch.equal(v0[k], v3[k]) for k in v0)  # the stages trained

    registry = yaml.safe_load((out / "stage-3" / "matrix.yaml").read_text())
    policy = {m["name"]: m for m in registry["members"] if m["name"].startswith("policy")}
    assert {k: (m["version"], m["engine"]["model"]) for k, m in policy.items()} == \
        {f"policy-v{s}": (f"v{s}", versions[s]["path"]) for s in (1, 2, 3)}
    assert registry["positive"] == {"human": 1, "big": 1, "policy-v3": 1.0}
    assert registry["negative"] == {"small": 1, "policy-v1": 1.0, "policy-v2": 1.0}

    # stage 3 draws from the stage-2 matrix; 'big' was generated in stage 1 and policy-v1/v2 in stages 2/3
    sm = {m["name"]: m for m in yaml.safe_load((out / "stage-3" / "sample_matrix.yaml").read_text())["members"]}
    assert sm["big"]["responses"] == str(out / "stage-1" / "members" / "big")
    assert sm["policy-v1"]["responses"] == str(out / "stage-2" / "policy_samples")
    assert sm["policy-v2"]["responses"] == str(out / "stage-3" / "policy_samples")
    assert set(sm) == {"big", "small", "policy-v1", "policy-v2"}
    for s in (2, 3):
        assert not any((out / f"stage-{s}" / "members" / "big").glob("responses-*.jsonl"))  # copied, not sampled

    results = read_json(out / "results.json")
    assert results["method"] == "tso-loop" and list(results["stages"]) == ["0", "1", "2", "3"]
    for s, row in results["stages"].items():
        ev = read_json(out / f"stage-{s}" / "eval" / "results.json")
        assert row["model"] == versions[int(s)]["path"] and row["n_prompts"] == 3 and row["n_instructions"] == 6
        assert row["prompt_level_strict"] == ev["prompt_level_strict"]

    # a rerun generates and trains nothing, also when only the loop's own manifest is gone
    def forbidden(*a, **k):
        raise AssertionError("a rerun must not generate or train")

    monkeypatch.setattr("alignline.stages.tso.train", forbidden)
    monkeypatch.setattr("alignline.stages.sample.make_engine", forbidden)
    monkeypatch.setattr("alignline.stages.eval_verifiable.build_engine", forbidden)
    manifests = {p: p.read_bytes() for p in out.rglob("manifest.json") if p != out / "manifest.json"}
    assert tso_loop.run(loop_cfg(tmp_path, tiny_model_dir, tiny_rm_dir, data)) == out
    (out / "manifest.json").unlink()
    tso_loop.run(loop_cfg(tmp_path, tiny_model_dir, tiny_rm_dir, data))
    assert {p: p.read_bytes() for p in manifests} == manifests
    assert read_json(out / "manifest.json")["status"] == "complete"


def test_self_reward_three_stages_updates_the_reference(tmp_path, tiny_model_dir, tiny_rm_dir, data):
    body = {**common(tmp_path, tiny_model_dir, tiny_rm_dir, data, "sr"),
            "dpo": {"train": TRAIN, "data": {"max_length": 128}}}
    (tmp_path / "sr.yaml").write_text(yaml.safe_dump(body))
    out = self_reward.run(load_config(self_reward.SelfRewardConfig, tmp_path / "sr.yaml"))
    versions = read_json(out / "versions.json")
    assert [v["version"] for v in versions] == ["v0", "v1", "v2", "v3"]
    for s in (1, 2, 3):
        d = out / f"stage-{s}"
        assert versions[s]["path"] == str(d / "dpo" / "versions" / "v1") and versions[s]["trained_from"] == \
            versions[s - 1]["path"]
        # one mini-batch whose reference is the stage's starting policy: the reference moves every stage
        assert read_json(d / "dpo" / "iter-1" / "manifest.json")["reference"] == \
            str(Path(versions[s - 1]["path"]).resolve())
        cfg = yaml.safe_load((d / "dpo" / "config.yaml").read_text())
        assert cfg["minibatches"] == 1 and cfg["loss"]["type"] == "dpo" and cfg["model"] == versions[s - 1]["path"]
        sel = read_json(d / "pairs" / "manifest.json")
        assert sel["config"]["strategy"] == "best_worst" and sel["counts"]["pairs"] > 0
        assert read_json(d / "summary.json")["training"]["minibatches"][0]["steps"] == 1
    assert list(read_json(out / "results.json")["stages"]) == ["0", "1", "2", "3"]
