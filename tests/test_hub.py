"""Hub model ids and Hub datasets: huggingface_hub's real download code against a local stand-in for the Hub
(tests/fake_hub.py), the offline path from a cache laid out as huggingface_hub lays it, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from tests.fake_hub import FakeHub, directory_files, write_cached_repo

from alignline.errors import DataError, ModelError

TOKEN = "hf_plantedTokenThatMustNeverReachAFile"


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def trl_conversations(n: int) -> list[dict]:
    """TRL's conversational layout (no id); row 3 is long, for data.max_record_chars to drop."""
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus 1?"},
                          {"role": "assistant", "content": f"It is {i + 1}."}], "source": "test"} for i in range(n)]
    rows[3]["messages"][1]["content"] = "x" * 500
    return rows


@pytest.fixture
def hub():
    server = FakeHub()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(tmp_path, hub, monkeypatch):
    """This process online against ``hub``, with its own Hub and datasets caches (conftest sets offline mode,
    which huggingface_hub read at import: its constant is set back for the test)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_TOKEN": TOKEN, "NO_PROXY": "127.0.0.1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def alignline(*args, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "alignline", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=600)


# --------------------------------------------------------------------------- the whole path, through the CLI

def test_sft_from_hub_model_and_dataset_online_then_offline(tmp_path, hub, tiny_model_dir):
    """`alignline sft model=org/tiny data.train=hf:org/data` downloads through huggingface_hub from the local
    endpoint, trains, records the commits; then with the server stopped and HF_HUB_OFFLINE=1 a new run trains
    from the cache alone, the first run is up to date (its commits read from the cache), and the planted token
    is in no file written anywhere under the test's directory."""
    files = directory_files(tiny_model_dir)
    files["README.md"] = b"---\nlicense: mit\n---\n"  # not needed to load: never fetched
    files["extras/pytorch_model.bin"] = b"not fetched"
    model_commit = hub.add("model", "org/tiny", files)
    data_commit = hub.add("dataset", "org/data", {"data/train.jsonl": jsonl(trl_conversations(8))})
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "0", "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_TOKEN": TOKEN,
           "NO_PROXY": "127.0.0.1"}
    args = ["sft", "model=org/tiny", "data.train=hf:org/data", "data.max_length=64", "data.max_record_chars=200",
            "train.epochs=1", "train.max_steps=2", "train.batch_size=2"]

    online = alignline(*args, f"output_dir={tmp_path / 'online'}", env=env)
    assert online.returncode == 0, online.stderr
    fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    model_files = {p.rsplit("/", 1)[1] for p in fetched if p.startswith("/org/tiny/")}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= model_files
    assert not {"README.md", "pytorch_model.bin"} & model_files
    assert any(p.endswith("/data/train.jsonl") for p in fetched)
    repo_requests = [r for r in hub.requests if "/org/" in r[1]]  # not the library's own registry look-ups
    assert repo_requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in repo_requests)  # from HF_TOKEN
    manifest = json.loads((tmp_path / "online" / "manifest.json").read_text())
    assert manifest["inputs"]["model"] == "org/tiny" and manifest["inputs"]["train"] == "hf:org/data"
    assert manifest["input_fingerprints"]["model"] == f"hf:org/tiny@{model_commit}"
    assert manifest["input_fingerprints"]["train"] == f"hf:org/data@{data_commit}?split=train"
    # 8 rows, row 3 dropped with its position: the dataset, its split and the row index
    assert manifest["counts"]["conversations"] == 7 and manifest["counts"]["dropped_over_max_record_chars"] == 1
    assert manifest["counts"]["dropped_lines"][0].startswith("hf:org/data[train]:3: ")

    hub.stop()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    again = alignline(*args, f"output_dir={tmp_path / 'offline'}", env=offline)
    assert again.returncode == 0, again.stderr
    second = json.loads((tmp_path / "offline" / "manifest.json").read_text())
    assert second["status"] == "complete"
    assert second["input_fingerprints"] == manifest["input_fingerprints"]
    assert (tmp_path / "offline" / "model" / "model.safetensors").is_file()
    rerun = alignline(*args, f"output_dir={tmp_path / 'online'}", env=offline)
    assert rerun.returncode == 0 and "up to date" in rerun.stderr

    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in online.stderr + online.stdout + again.stderr + again.stdout


# --------------------------------------------------------------------------- models

def test_hub_model_downloads_only_what_loading_needs(hub, hub_env, tiny_model_dir):
    from alignline.models import load_causal_lm, resolve_model_source

    files = {**directory_files(tiny_model_dir), "onnx/model.onnx": b"x", "training_args.bin": b"x",
             "consolidated.safetensors": b"a second copy of the weights"}
    commit = hub.add("model", "org/tiny", files)
    path, snapshot = resolve_model_source(f"org/tiny@{commit}")
    assert snapshot.commit == commit and path.name == commit
    assert sorted(p.name for p in path.iterdir()) == sorted(f for f in directory_files(tiny_model_dir))
    assert load_causal_lm(f"org/tiny@{commit}", dtype="float32").config.num_hidden_layers == 2


def test_hub_repo_with_only_pickled_weights_is_refused_before_downloading(hub, hub_env):
    from alignline.models import resolve_model

    hub.add("model", "org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"pickle", "tokenizer.json": b"{}"})
    with pytest.raises(ModelError, match=r"org/pickled has only pickled weights \(pytorch_model.bin\).*safetensors"):
        resolve_model("org/pickled")
    assert not any("/resolve/" in path for _, path, _ in hub.requests)  # refused from the file list alone


def test_unknown_hub_repo_and_revision_say_what_to_do(hub, hub_env, tiny_model_dir):
    from alignline.models import resolve_model

    with pytest.raises(ModelError, match=r"org/missing was not found on http://127.0.0.1:\d+.*HF_TOKEN.*; nor is "
                                         r"there a local directory") as err:
        resolve_model("org/missing")
    assert TOKEN not in str(err.value)
    hub.add("model", "org/tiny", directory_files(tiny_model_dir))
    with pytest.raises(ModelError, match="org/tiny@nope was not found"):
        resolve_model("org/tiny@nope")  # the stand-in answers an unknown revision as the Hub does a missing repo


def test_offline_model_from_a_cache_laid_out_as_huggingface_hub_writes_it(tmp_path, monkeypatch, tiny_model_dir):
    from alignline.models import load_tokenizer, resolve_model_source

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # conftest: HF_HUB_OFFLINE=1
    commit = write_cached_repo(tmp_path / "cache", "model", "org/cached", directory_files(tiny_model_dir))
    path, snapshot = resolve_model_source("org/cached")
    assert path == tmp_path / "cache" / "models--org--cached" / "snapshots" / commit and snapshot.commit == commit
    assert load_tokenizer("org/cached").pad_token is not None


def test_offline_uncached_id_is_a_clear_error(tmp_path, monkeypatch):
    from alignline.models import resolve_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelError, match=r"model org/absent@v1 is not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*"
                                         r"`hf download org/absent --revision v1`"):
        resolve_model("org/absent@v1")


def test_local_directory_wins_over_a_hub_id_of_the_same_spelling(tmp_path, monkeypatch, tiny_model_dir):
    from alignline.models import resolve_model_source

    (tmp_path / "org").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    path, snapshot = resolve_model_source("org/tiny")
    assert path == tmp_path / "org" / "tiny" and snapshot is None


def test_hub_snapshot_is_fingerprinted_by_its_commit(tmp_path):
    """Two snapshot directories of the same repository and commit fingerprint alike whatever their bytes: the
    commit names the files (no hashing of gigabytes); another commit fingerprints differently."""
    from alignline.data.io import fingerprint

    commit = "a" * 40
    a = tmp_path / "one" / "models--org--m" / "snapshots" / commit
    b = tmp_path / "two" / "models--org--m" / "snapshots" / commit
    c = tmp_path / "two" / "models--org--m" / "snapshots" / ("b" * 40)
    for d, text in ((a, "1"), (b, "2"), (c, "1")):
        d.mkdir(parents=True)
        (d / "config.json").write_text(text)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


# --------------------------------------------------------------------------- datasets

def test_hub_dataset_config_split_and_revision(hub, hub_env):
    """A dataset card's configs: the mapping form (name, config, split, revision) and its text form read the
    same rows, through datasets, at the commit asked for."""
    from alignline.data.io import read_prompts
    from alignline.stages.sample import SampleConfig

    card = (b"---\nconfigs:\n- config_name: small\n  data_files:\n  - split: test\n    path: small/test.jsonl\n"
            b"  - split: train\n    path: small/train.jsonl\n---\n")
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(3)]
    commit = hub.add("dataset", "org/prompts", {"README.md": card, "small/test.jsonl": jsonl(rows),
                                                "small/train.jsonl": jsonl(rows[:1])})
    cfg = SampleConfig.model_validate({"prompts": {"name": "org/prompts", "config": "small", "split": "test",
                                                   "revision": commit}, "model": "m"})
    assert cfg.prompts == f"hf:org/prompts@{commit}?config=small&split=test"
    prompts = read_prompts(cfg.prompts)
    assert [p.messages[0].content for p in prompts] == ["question 0", "question 1", "question 2"]
    assert prompts[2].reference == "answer 2"  # a prompt-completion row's completion is the reference answer
    with pytest.raises(DataError, match=r"hf:org/prompts\[small/validation\].*datasets cannot read it"):
        read_prompts("hf:org/prompts?config=small&split=validation")


def test_malformed_hub_dataset_name():
    from alignline.data.io import read_prompts

    with pytest.raises(DataError, match=r"not a Hub dataset name; expected hf:ORG/NAME.*found unknown setting"):
        read_prompts("hf:org/prompts?subset=x")


def test_offline_dataset_from_the_cache_and_uncached_error(tmp_path, monkeypatch):
    from alignline.data.io import read_conversations

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    write_cached_repo(tmp_path / "cache", "dataset", "org/chat", {"train.jsonl": jsonl(trl_conversations(4))})
    convs = read_conversations("hf:org/chat")
    assert len(convs) == 4 and convs[0].meta == {"source": "test"}  # TRL's extra column kept in meta
    with pytest.raises(DataError, match=r"`hf download org/other --repo-type dataset`"):
        read_conversations("hf:org/other")


def test_save_to_disk_directories_and_arrow_files(tmp_path):
    """A Dataset / DatasetDict written by save_to_disk and a bare Arrow file read as records; a bad row names the
    source, the split and the row index (0-based, as dataset[i])."""
    import datasets

    from alignline.data.io import read_pairs

    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "score_chosen": 8.0} for i in range(3)]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs[:2]),
                          "test": datasets.Dataset.from_list(pairs)}).save_to_disk(str(tmp_path / "dict"))
    read = read_pairs(tmp_path / "saved")
    assert [p.chosen for p in read] == ["good 0", "good 1", "good 2"] and read[0].provenance == {"score_chosen": 8.0}
    assert len(read_pairs(tmp_path / "dict")) == 2  # the train split
    assert len(read_pairs(tmp_path / "dict" / "test")) == 3  # one split's own directory
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert [p.id for p in read_pairs(arrow)] == [p.id for p in read]

    bad = [{**p, "rating": "better"} for p in pairs[:2]] + [{**pairs[2], "rating": "huge"}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(bad), "dev": datasets.Dataset.from_list(bad)}
                         ).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"a DatasetDict without a train split.*give its directory"):
        read_pairs(tmp_path / "bad")
    with pytest.raises(DataError, match=rf"{tmp_path / 'bad' / 'test'}:2, field 'rating'"):
        read_pairs(tmp_path / "bad" / "test")
    dropped: list[str] = []
    kept = read_pairs(tmp_path / "saved", drop=lambda o: "long" if o["chosen"] == "good 1" else None, dropped=dropped)
    assert len(kept) == 2 and dropped == [f"{tmp_path / 'saved'}:1: long"]


def test_trl_prompt_completion_layout_as_conversations(tmp_path):
    """TRL's prompt-completion layout, standard (strings) and conversational (message lists), is one
    conversation: the prompt's turns then the completion's."""
    from alignline.data.io import read_conversations

    rows = [{"prompt": "hi", "completion": "hello"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": "hello"}]}]
    (tmp_path / "pc.jsonl").write_bytes(jsonl(rows))
    a, b = read_conversations(tmp_path / "pc.jsonl")
    assert [m.role for m in a.messages] == ["user", "assistant"] and a.messages[1].content == "hello"
    assert [m.role for m in b.messages] == ["system", "user", "assistant"]


def test_pipeline_config_takes_a_dataset_mapping(tmp_path):
    from alignline.stages.sft import SFTConfig

    cfg = SFTConfig.model_validate(yaml.safe_load("model: org/m\ndata:\n  train: {name: org/d, revision: v2}\n"))
    assert cfg.data.train == "hf:org/d@v2"
    with pytest.raises(ValueError, match="name, config, split and revision"):
        SFTConfig.model_validate({"data": {"train": {"name": "org/d", "subset": "x"}}})


def test_input_fingerprint_of_hub_ids(tmp_path, monkeypatch, tiny_model_dir):
    """A cached Hub id is fingerprinted by id and commit; an id the Hub (here: the cache) does not know, such as a
    model served under that name by an OpenAI-compatible endpoint, by its text; a Hub dataset by id, commit and
    split."""
    from alignline.stages.common import input_fingerprint

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    commit = write_cached_repo(tmp_path / "cache", "model", "org/cached", directory_files(tiny_model_dir))
    data = write_cached_repo(tmp_path / "cache", "dataset", "org/d", {"train.jsonl": jsonl(trl_conversations(4))})
    assert input_fingerprint("org/cached") == f"hf:org/cached@{commit}"
    assert input_fingerprint("meta-llama/Served-Name") == "meta-llama/Served-Name"
    assert input_fingerprint("hf:org/d?split=test") == f"hf:org/d@{data}?split=test"


def test_unreachable_hub_falls_back_to_the_cache(tmp_path, hub, hub_env, tiny_model_dir):
    """Online, but no answer from the endpoint: the cached snapshot stands in (as transformers does); without
    one, the error says the Hub could not be reached."""
    from alignline.models import resolve_model_source

    commit = write_cached_repo(tmp_path / "hub", "model", "org/cached", directory_files(tiny_model_dir))
    hub.stop()
    assert resolve_model_source("org/cached")[1].commit == commit
    with pytest.raises(ModelError, match=r"org/other: could not fetch it from http://127.0.0.1:\d+ .*HF_HUB_OFFLINE=1"):
        resolve_model_source("org/other")
