"""Model cards: every stage that saves a model writes README.md in the Hub's form, which huggingface_hub parses
back; its metadata (base_model, library_name, tags, pipeline_tag, license, datasets) and body; a pipeline's
progression row added to the evaluated policies' cards; no secret in a card; a card changes neither the
weights files nor any fingerprint."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard, ModelCardData
from tests.conftest import conversation
from tests.test_dpo import make_pairs

from alignline import api
from alignline.data.io import fingerprint
from alignline.models import save_model
from alignline.models.card import (
    CardFacts,
    hub_dataset_id,
    hub_model_id,
    model_card_text,
    scrub_secrets,
    update_card_section,
    write_model_card,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def hub_parent(tmp_path, tiny_model_dir):
    """The tiny model as if it came from the Hub: a card naming SmolLM2 as its base, license apache-2.0."""
    d = tmp_path / "parent"
    shutil.copytree(tiny_model_dir, d)
    data = ModelCardData(base_model=SMOL, license="apache-2.0", library_name="transformers")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n# A model from the Hub\n").save(d / "README.md")
    return d


def load(model_dir) -> ModelCard:
    return ModelCard.load(model_dir / "README.md")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_card_metadata_body_and_command(tmp_path, hub_parent):
    data = write_jsonl(tmp_path / "convs.jsonl", [conversation(i) for i in range(8)])
    result = api.run("sft", {"model": str(hub_parent), "output_dir": str(tmp_path / "sft"),
                             "data": {"train": data, "eval": data, "max_length": 128},
                             "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3}})
    card = load(result.model_dir)
    assert card.data.base_model == SMOL and card.data.license == "apache-2.0"  # inherited from the parent's card
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["sft", "alignline"] and card.data.datasets is None  # a local file is no Hub dataset
    m = result.manifest
    assert f"| final train loss | {m['final_metrics']['loss']:.4g} |" in card.text
    start, end = m["eval_metrics_start"]["loss"], m["eval_metrics"]["loss"]
    assert f"| held-out loss | {start:.4g} -> {end:.4g} |" in card.text
    assert "| conversations | 8 |" in card.text and f"| train | {data} |" in card.text
    assert f"`{hub_parent}`" in card.text and "| train.lr | 0.001 |" in card.text
    assert f"alignline sft {tmp_path / 'sft' / 'config.yaml'}" in card.text
    assert (tmp_path / "sft" / "config.yaml").read_text().strip() in card.text  # the config that command reads


def test_dpo_lora_adapter_card_says_peft(tmp_path, hub_parent):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8))
    result = api.run("dpo", {"model": str(hub_parent), "output_dir": str(tmp_path / "dpo"),
                             "data": {"train": pairs, "max_length": 128}, "train": {"epochs": 1, "batch_size": 8},
                             "loss": {"type": "hinge"}, "lora": {"r": 4, "save": "adapter"}})
    assert (result.model_dir / "adapter_config.json").is_file()
    card = load(result.model_dir)  # ours, replacing the one peft writes
    assert card.data.library_name == "peft" and card.data.base_model == SMOL
    assert card.data.tags == ["dpo", "rso", "hinge", "alignline"]
    assert "LoRA adapter" in card.text and "| loss.type | hinge |" in card.text and "| lora.r | 4 |" in card.text
    accuracy = result.manifest["final_metrics"]["rewards/accuracy"]
    assert f"| final train rewards/accuracy | {accuracy:.4g} |" in card.text


def test_reward_model_card_has_its_held_out_accuracy(tmp_path, tiny_model_dir):
    rows = make_pairs(8)
    for i, r in enumerate(rows):
        r["rating"] = ["significantly", "slightly"][i % 2]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = api.run("rm", {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "rm"),
                            "data": {"train": pairs, "eval": pairs, "max_length": 128},
                            "train": {"epochs": 1, "batch_size": 4}})
    card = load(result.model_dir)
    assert card.data.pipeline_tag == "text-classification" and card.data.tags == ["reward-model", "reward-trainer",
                                                                                  "alignline"]
    assert card.data.base_model is None  # a hand-made parent: no Hub ancestor known
    ev = json.loads((result.output_dir / "eval.json").read_text())
    assert f"| pairwise accuracy | {ev['accuracy']:.4g} |" in card.text and "| accuracy split | eval |" in card.text
    assert f"| accuracy (slightly) | {ev['accuracy_by_rating']['slightly']['accuracy']:.4g} |" in card.text
    assert result.metrics["eval/accuracy"] == ev["accuracy"]


def test_hub_ids_of_parents_and_datasets(tmp_path, hub_parent, tiny_model_dir):
    assert hub_model_id("smollm2-135m-instruct") == SMOL  # an alias: the repository it was made from
    assert hub_model_id("Qwen/Qwen2.5-0.5B-Instruct@abc123") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert hub_model_id(str(hub_parent)) == SMOL and hub_model_id(str(tiny_model_dir)) is None
    assert hub_model_id(str(tmp_path / "model.gguf")) is None and hub_model_id(None) is None
    assert hub_dataset_id("hf:org/data@v1") == "org/data" and hub_dataset_id({"name": "org/data"}) == "org/data"
    assert hub_dataset_id("data/pairs.jsonl") is None
    facts = CardFacts(stage="dpo", method="m", tags=["dpo"], parent="smollm2-135m-instruct",
                      data={"train": "hf:org/pairs", "eval": "local.jsonl"})
    card = ModelCard(model_card_text(facts, adapter=False))
    assert card.data.datasets == ["org/pairs"] and card.data.license == "apache-2.0"


def test_no_secret_reaches_a_card(tmp_path, monkeypatch):
    from alignline.stages.cards import stage_card
    from alignline.stages.rl import RLConfig

    monkeypatch.setenv("OPENAI_API_KEY", "plain-env-key-0123456789")
    cfg = RLConfig(model="m", prompts="p.jsonl", output_dir=str(tmp_path),
                   openai={"api_key": "sk-verysecretkey0123456789", "base_url": "http://user:pw@host:1/v1"})
    facts = stage_card("rl", cfg, method="rl", tags=["grpo"], data={}, counts={}, settings=("openai.api_key",),
                       evaluation={"note": "hf_abcdefghijklmnopqrstuvwxyz0123 and plain-env-key-0123456789"})
    text = model_card_text(facts, adapter=False)
    for secret in ("sk-verysecretkey0123456789", "hf_abcdefghijklmnopqrstuvwxyz0123", "plain-env-key-0123456789",
                   "user:pw"):
        assert secret not in text
    assert scrub_secrets("key sk-abcdefghijklmnopqrstu end") == "key ********** end"


def test_the_card_changes_no_weights_and_no_fingerprint(tmp_path, tiny_model, tiny_tokenizer):
    facts = CardFacts(stage="sft", method="m", tags=["sft"], parent=None)
    plain, carded = save_model(tiny_model, tiny_tokenizer, tmp_path / "a"), \
        save_model(tiny_model, tiny_tokenizer, tmp_path / "b", card=facts)
    assert sorted(p.name for p in carded.iterdir()) == sorted([*(p.name for p in plain.iterdir()), "README.md"])
    for p in plain.iterdir():
        assert p.read_bytes() == (carded / p.name).read_bytes(), p.name
    before = fingerprint(carded)
    assert before == fingerprint(plain)  # a card is documentation, not content
    update_card_section(carded, "pipeline", "## In pipeline x\n\nrow 1")
    update_card_section(carded, "pipeline", "## In pipeline x\n\nrow 2")  # replaced, not appended
    text = (carded / "README.md").read_text()
    assert text.count("## In pipeline x") == 1 and "row 2" in text and "row 1" not in text
    assert fingerprint(carded) == before and ModelCard.load(carded / "README.md").data.tags == ["sft", "alignline"]
    assert update_card_section(plain, "pipeline", "x") is None  # no card: nothing written


def test_pipeline_adds_each_policys_progression_row(tmp_path, monkeypatch):
    """The hand-made pipeline run of tests/test_progression.py: base (sft), zeta (tso, evaluated at versions/v2),
    alpha (rl); each evaluated model's card gets its own row of the table the summary prints."""
    from tests.test_progression import OUT, fake_pipeline_run

    from alignline.pipeline.cards import refresh_model_cards
    from alignline.report.progression import cells, progression

    monkeypatch.chdir(tmp_path)
    doc = fake_pipeline_run(tmp_path / OUT) | {"pipeline": "configs/demo/pipeline.yaml", "overrides": ["vars.n=4"]}
    models = {"base": f"{OUT}/base/model", "zeta": f"{OUT}/zeta/versions/v2", "alpha": f"{OUT}/alpha/model"}
    for name, model in models.items():
        (tmp_path / model).mkdir(parents=True)
        write_model_card(tmp_path / model, CardFacts(stage=name, method=name, tags=[name], parent=None), adapter=False)
    rows = progression(doc)
    assert len(refresh_model_cards(doc, rows)) == 3
    for row, line in zip(rows, cells(rows)):
        text = (tmp_path / models[row.policy.name] / "README.md").read_text()
        assert "| " + " | ".join(line) + " |" in text and "## In pipeline demo" in text
        assert "alignline run configs/demo/pipeline.yaml vars.n=4" in text
        assert ModelCard.load(tmp_path / models[row.policy.name] / "README.md").data.tags[0] == row.policy.name
    assert "+0.833 +- 0.167 * vs zeta" in (tmp_path / models["alpha"] / "README.md").read_text()



def test_a_pipeline_run_writes_the_row_into_the_evaluated_models_card(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                       monkeypatch):
    """sft -> eval.bestofn (a tiny seeded reward model, 2 samples) -> eval.verifiable: the sft model is a policy,
    and after the run its card holds its progression row; a rerun leaves every stage up to date."""
    import torch

    from alignline.models import load_reward_model
    from alignline.report.progression import cells, progression

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_model(load_reward_model(tiny_model_dir, dtype="float32"), tiny_tokenizer, tmp_path / "rm")
    instructions = [{"id": "no_commas", "kwargs": {}, "text": "(no commas)"}]
    write_jsonl(tmp_path / "eval.jsonl", [{"id": f"e{i}", "messages": [{"role": "user", "content": f"Greet {i}."}],
                                          "meta": {"instructions": instructions}} for i in range(3)])
    write_jsonl(tmp_path / "convs.jsonl", [conversation(i) for i in range(4)])
    (tmp_path / "pipe.yaml").write_text(json.dumps({"name": "cards", "output_root": "out", "stages": [
        {"name": "sft", "stage": "sft", "config": {"model": str(tiny_model_dir), "train": {"max_steps": 1},
                                                   "data": {"train": "convs.jsonl", "max_length": 128}}},
        {"name": "eval_sft", "stage": "eval.bestofn", "config": {
            "model": "${sft}/model", "prompts": "eval.jsonl", "reward_model": "rm", "n": 2,
            "sampling": {"temperature": 1.0, "max_new_tokens": 8}}},
        {"name": "verify_sft", "stage": "eval.verifiable", "config": {
            "prompts": "eval.jsonl", "model": {"responses": "${eval_sft}/samples", "name": "sft"}}}]}))
    result = api.run_pipeline("pipe.yaml", report=False)
    rows = progression(result.manifest)
    assert [r.policy.name for r in rows] == ["sft"] and list(result.metrics) == ["sft"]
    text = (tmp_path / "out" / "sft" / "model" / "README.md").read_text()
    assert "| " + " | ".join(cells(rows)[0]) + " |" in text and f"alignline run {tmp_path / 'pipe.yaml'}" in text
    assert ModelCard.load(tmp_path / "out" / "sft" / "model" / "README.md").data.tags == ["sft", "alignline"]
    again = api.run_pipeline("pipe.yaml", report=False)  # the refreshed card changes no stage's inputs
    assert [s["result"]["status"] for s in again.manifest["stages"]] == ["skipped-up-to-date"] * 3
