"""Several CPU processes (gloo) train the same model as one process accumulating the same global batch: the
loop normalises by the trained units of the whole step across processes. Data parallel (DDP, under torchrun)
and fully sharded (FSDP2, under ``accelerate launch`` with configs/gpu/accelerate_fsdp.yaml), including a
sharded run interrupted and resumed from its gathered checkpoint, and a tail step where one process has no
micro-batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import conversation
from tests.test_dpo import make_pairs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _launch(tmp_path: Path, name: str, stage: str, cfg: dict, launcher: str, *, extra: tuple[str, ...] = (),
            fails_with: str | None = None) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = {
        "single": [sys.executable, "-m", "alignline"],
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_endpoint=localhost:0",
                "--rdzv_backend=c10d", "-m", "alignline"],
        # the shipped GPU config, on 2 CPU processes
        "fsdp": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(ROOT / "configs/gpu/accelerate_fsdp.yaml"), "--num_processes=2", "--main_process_port=0",
                 "--mixed_precision=no", "--fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer", *extra,
                 "-m", "alignline"],
    }[launcher]
    res = subprocess.run([*command, stage, str(path)], capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    if fails_with is not None:
        assert res.returncode != 0 and fails_with in " ".join(res.stderr.split()), res.stderr[-4000:]
    else:
        assert res.returncode == 0, res.stderr[-4000:]
    return Path(cfg["output_dir"])


def _same_model(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol), k


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "loss" in ln]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_tokenizer):
    """sft of a tiny model with tied embeddings (as SmolLM2's) on 16 conversations, 3 steps of 4: one process
    accumulating 2 micro-batches of 2, and the same split across 2 processes."""
    from transformers import LlamaForCausalLM

    from alignline.models import save_model, tiny_causal_lm_config

    tmp = tmp_path_factory.mktemp("sft_parallel")
    torch.manual_seed(0)
    tiny_model_dir = save_model(LlamaForCausalLM(tiny_causal_lm_config(len(tiny_tokenizer), tie_word_embeddings=True)),
                                tiny_tokenizer, tmp / "tied_model")
    data = tmp / "convs.jsonl"
    data.write_text("".join(json.dumps(conversation(i, turns=1 + i % 2)) + "\n" for i in range(16)))

    def cfg(name: str, accum: int, **train) -> dict:
        return {"model": str(tiny_model_dir), "output_dir": str(tmp / name),
                "data": {"train": str(data), "max_length": 128, "packing": False},
                "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "max_steps": 3, "grad_accum": accum, **train}}

    return tmp, cfg, _launch(tmp, "single", "sft", cfg("single", 2), "single")


def test_two_process_ddp_matches_single_process(sft_runs):
    tmp, cfg, single = sft_runs
    ddp = _launch(tmp, "ddp", "sft", cfg("ddp", 1), "ddp")
    _same_model(ddp, single)
    assert [round(x["loss"], 5) for x in _metrics(ddp)] == [round(x["loss"], 5) for x in _metrics(single)]


def test_fsdp_interrupted_and_resumed_matches_single_process(sft_runs):
    """Stopped after step 2 (a checkpoint gathered from the shards: whole tensors, tied names once), resumed
    (each process keeps its shard of the whole tensors), finished: the model and every step's loss equal the
    single-process run's."""
    tmp, cfg, single = sft_runs
    fsdp = _launch(tmp, "fsdp", "sft", cfg("fsdp", 1, stop_after_step=2, save_every=1), "fsdp")
    assert not (fsdp / "model").exists()
    assert len(_metrics(fsdp)) == 2
    ckpt = fsdp / "checkpoints" / "step-0000002"
    assert (ckpt / "COMPLETE").exists()
    stored = load_file(str(ckpt / "model.safetensors"))
    reference = load_file(str(single / "model" / "model.safetensors"))
    assert "lm_head.weight" not in stored and "lm_head.weight" not in reference  # tied: stored once
    assert {k: v.shape for k, v in stored.items()} == {k: v.shape for k, v in reference.items()}  # not shards
    _launch(tmp, "fsdp", "sft", cfg("fsdp", 1, save_every=1), "fsdp")  # stop_after_step is not a new config
    _same_model(fsdp, single)
    assert [round(x["loss"], 5) for x in _metrics(fsdp)] == [round(x["loss"], 5) for x in _metrics(single)]


def test_fsdp_dpo_with_an_empty_tail_matches_single_process(tmp_path, tiny_model_dir):
    """5 pairs, micro-batches of 1, 2 per step: the third step has one micro-batch, so the second process runs
    its weighted-0 stand-in (the all-gathers and reduce-scatters of every process must match)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(5)))

    def cfg(name: str, accum: int) -> dict:
        return {"model": str(tiny_model_dir), "output_dir": str(tmp_path / name),
                "data": {"train": str(pairs), "max_length": 128}, "loss": {"type": "dpo", "beta": 0.1},
                "train": {"epochs": 1, "batch_size": 1, "grad_accum": accum, "lr": 1e-3, "warmup_ratio": 0.0}}

    single = _launch(tmp_path, "single", "dpo", cfg("single", 2), "single")
    fsdp = _launch(tmp_path, "fsdp", "dpo", cfg("fsdp", 1), "fsdp")
    ref_single = json.loads((single / "ref_logps.json").read_text())["values"]
    ref_fsdp = json.loads((fsdp / "ref_logps.json").read_text())["values"]
    assert torch.allclose(torch.tensor(ref_fsdp), torch.tensor(ref_single), atol=1e-4)  # sums over ~40 tokens
    _same_model(fsdp, single)
    m_single, m_fsdp = _metrics(single), _metrics(fsdp)
    assert len(m_fsdp) == 3 and [x["units"] for x in m_fsdp] == [2, 2, 1]
    for key in ("loss", "rewards/chosen", "rewards/margin"):
        assert [round(x[key], 5) for x in m_fsdp] == [round(x[key], 5) for x in m_single], key


def test_what_fsdp_does_not_run_is_refused_before_training(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(4)))
    cfg = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "tso"), "minibatches": 2,
           "data": {"train": str(pairs), "max_length": 128}, "train": {"batch_size": 1}}
    tso = _launch(tmp_path, "tso", "tso", cfg, "fsdp", fails_with="tso does not run under FSDP yet")
    assert not (tso / "iter-1").exists()


@pytest.mark.parametrize("kind, message", [("DEEPSPEED", "DeepSpeed is not supported"),
                                           ("FSDP", "FSDP version 1 is not supported")])
def test_deepspeed_and_fsdp1_are_refused_with_the_alternative(monkeypatch, kind, message):
    """(accelerate itself stops FSDP1 on CPUs and never selects DeepSpeed there, so the launch is faked.)"""
    from types import SimpleNamespace

    import accelerate
    from accelerate.utils import DistributedType

    from alignline.errors import AlignlineError
    from alignline.train.accelerator import make_accelerator
    from alignline.train.loop import TrainSettings

    class LaunchedAccelerator:
        def __init__(self, **kwargs):
            self.state = SimpleNamespace(distributed_type=DistributedType[kind],
                                         fsdp_plugin=SimpleNamespace(fsdp_version=1))

        @property
        def distributed_type(self):
            return self.state.distributed_type

    monkeypatch.setattr(accelerate, "Accelerator", LaunchedAccelerator)
    with pytest.raises(AlignlineError, match=message):
        make_accelerator(TrainSettings())
