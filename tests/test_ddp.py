"""Two CPU processes (gloo) under torchrun give the same model as one process accumulating the same
global batch: the loop normalises by the trained tokens of the whole step across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import conversation


def test_two_process_ddp_matches_single_process(tmp_path, tiny_model_dir):
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(conversation(i, turns=1 + i % 2)) + "\n" for i in range(16)))
    base = {"model": str(tiny_model_dir), "data": {"train": str(data), "max_length": 128, "packing": False},
            "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "max_steps": 3}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, procs, accum in [("ddp", 2, 1), ("single", 1, 2)]:
        cfg = {**base, "output_dir": str(tmp_path / name), "train": {**base["train"], "grad_accum": accum}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                    "--rdzv_endpoint=localhost:0", "--rdzv_backend=c10d",
                    "-m", "alignline", "sft", str(path)] if procs > 1 else [sys.executable, "-m", "alignline", "sft", str(path)]
        res = subprocess.run(launcher, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = load_file(str(Path(cfg["output_dir"]) / "model" / "model.safetensors"))
    assert runs["ddp"].keys() == runs["single"].keys()
    for k in runs["ddp"]:
        assert torch.allclose(runs["ddp"][k], runs["single"][k], atol=1e-5), k
    m = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    s = [json.loads(ln) for ln in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [round(x["loss"], 5) for x in m] == [round(x["loss"], 5) for x in s]
