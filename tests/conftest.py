"""Shared fixtures: a tiny random-initialised Llama and a byte-level tokenizer, built offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: the tiny model decodes far faster single-threaded, above all on a busy
    machine (thread contention). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from alignline.models import make_tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from alignline.models import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny causal LM (2 layers, hidden 64) with the tiny tokenizer: a valid `model:` for stages."""
    from transformers import LlamaForCausalLM

    from alignline.models import save_model, tiny_causal_lm_config

    d = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_causal_lm_config(vocab_size=len(tiny_tokenizer)))
    save_model(model, tiny_tokenizer, d)
    return d


@pytest.fixture
def tiny_model(tiny_model_dir):
    from alignline.models import load_causal_lm

    return load_causal_lm(tiny_model_dir, dtype="float32")


def conversation(i: int, turns: int = 1, system: bool = False) -> dict:
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"question {i}.{t}: what is {i} plus {t}?"})
        msgs.append({"role": "assistant", "content": f"The answer is {i + t}." + " ok" * ((i * 7 + t) % 5)})
    return {"id": f"c{i}", "messages": msgs}


def tokenised_examples(tokenizer, n: int) -> list[dict]:
    """``n`` training examples (input_ids, labels) from ``conversation(i, turns=1 + i % 3)``."""
    from alignline.data.chat import tokenise_conversation

    out = []
    for i in range(n):
        ex = tokenise_conversation(tokenizer, conversation(i, turns=1 + i % 3)["messages"])
        out.append({"input_ids": ex.input_ids, "labels": ex.labels})
    return out
