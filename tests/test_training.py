"""The shared loop: packing equivalence, batch-split invariance, exact resume, the NaN guard."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import tokenised_examples

from alignline.errors import TrainingDivergedError
from alignline.train.accelerator import make_accelerator
from alignline.train.batching import collate_packed, collate_padded, count_targets, plan_packed, plan_padded
from alignline.train.checkpoint import complete_checkpoints
from alignline.train.lm import causal_lm_loss
from alignline.train.loop import TrainSettings, train


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return tokenised_examples(tiny_tokenizer, 12)


def test_packing_equals_padding(tiny_model, examples, tiny_tokenizer):
    """Per-token loss of 6 examples packed into rows equals the same examples padded, within 1e-5."""
    tiny_model.eval()
    pad = tiny_tokenizer.pad_token_id
    batch = examples[:6]
    with torch.no_grad():
        s_pad, n_pad, _ = causal_lm_loss(tiny_model, collate_padded(batch, pad))
        rows = [batch[:3], batch[3:5], batch[5:]]
        s_pack, n_pack, _ = causal_lm_loss(tiny_model, collate_packed(rows, pad))
    assert n_pad == n_pack == sum(count_targets(collate_padded([e], pad)) for e in batch)
    assert abs(float(s_pad) / n_pad - float(s_pack) / n_pack) < 1e-5


def test_packing_examples_do_not_see_each_other(tiny_model, examples, tiny_tokenizer):
    """Changing the first example of a row leaves the second example's loss unchanged."""
    tiny_model.eval()
    pad = tiny_tokenizer.pad_token_id
    a, b, other = examples[0], examples[1], examples[7]
    with torch.no_grad():
        alone, _, _ = causal_lm_loss(tiny_model, collate_padded([b], pad))
        ab, _, _ = causal_lm_loss(tiny_model, collate_packed([[a, b]], pad))
        a_only, _, _ = causal_lm_loss(tiny_model, collate_padded([a], pad))
        ob, _, _ = causal_lm_loss(tiny_model, collate_packed([[other, b]], pad))
        o_only, _, _ = causal_lm_loss(tiny_model, collate_padded([other], pad))
    assert abs(float(ab - a_only) - float(alone)) < 1e-4
    assert abs(float(ob - o_only) - float(alone)) < 1e-4


def _run(model, examples, out_dir, pad, packing=False, resume=False, events=None, **kw):
    # fp32 everywhere (no bf16 autocast on GPUs): these tests compare runs to 1e-6 or bit for bit
    settings = TrainSettings(lr=1e-3, epochs=2, batch_size=kw.pop("batch_size", 2), seed=3, schedule="cosine",
                             warmup_steps=1, mixed_precision="no", **kw)
    lengths = [len(e["input_ids"]) for e in examples]
    if packing:
        def plan(epoch):
            return plan_packed(lengths, 256, settings.batch_size, settings.seed, epoch)

        def collate(rows):
            return collate_packed([[examples[i] for i in r] for r in rows], pad)
    else:
        def plan(epoch):
            return plan_padded(lengths, settings.batch_size, settings.seed, epoch)

        def collate(ix):
            return collate_padded([examples[i] for i in ix], pad)
    epoch_start = None
    if events is not None:  # record the hook's calls among the collates
        epoch_start, inner = (lambda epoch: events.append(("epoch", epoch))), collate

        def collate(ix):
            events.append(("batch", None))
            return inner(ix)
    acc = make_accelerator(settings)
    return train(model, accelerator=acc, settings=settings, out_dir=out_dir, plan=plan, collate=collate,
                 count_units=count_targets, step_fn=causal_lm_loss, resume=resume, epoch_start=epoch_start)


def _losses(path):
    return [json.loads(ln)["loss"] for ln in path.read_text().splitlines() if "loss" in json.loads(ln)]


def test_resume_is_exact(tiny_model_dir, examples, tiny_tokenizer, tmp_path):
    """Stop after step 4 of 12, resume: parameters and every logged loss equal an uninterrupted run."""
    from alignline.models import load_causal_lm

    pad = tiny_tokenizer.pad_token_id
    full = load_causal_lm(tiny_model_dir, dtype="float32")
    r_full = _run(full, examples, tmp_path / "full", pad, save_every=5)
    part = load_causal_lm(tiny_model_dir, dtype="float32")
    r1 = _run(part, examples, tmp_path / "part", pad, stop_after_step=4)
    assert r1.stopped_early and r1.steps == 4
    resumed = load_causal_lm(tiny_model_dir, dtype="float32")  # fresh weights: everything comes from the checkpoint
    r2 = _run(resumed, examples, tmp_path / "part", pad, resume=True)
    assert r_full.steps == r2.steps == 12
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert _losses(tmp_path / "full" / "metrics.jsonl") == _losses(tmp_path / "part" / "metrics.jsonl")


def test_epoch_start_runs_before_each_epochs_first_step_that_runs(tiny_model, examples, tiny_tokenizer, tmp_path):
    """12 examples, batch 2, 2 epochs: 6 steps per epoch. The hook runs before the first collate of each epoch;
    a run stopped after step 6 never starts epoch 1, and its resumption starts there (not at epoch 0); one
    stopped after step 4 resumes inside epoch 0, so the hook runs for epoch 0 again before its 2 last steps."""
    pad = tiny_tokenizer.pad_token_id
    batches = [("batch", None)]
    whole: list = []
    _run(tiny_model, examples, tmp_path / "whole", pad, events=whole)
    assert whole == [("epoch", 0)] + batches * 6 + [("epoch", 1)] + batches * 6
    cut, rest = [], []
    _run(tiny_model, examples, tmp_path / "cut6", pad, events=cut, stop_after_step=6)
    _run(tiny_model, examples, tmp_path / "cut6", pad, events=rest, resume=True)
    assert cut == [("epoch", 0)] + batches * 6 and rest == [("epoch", 1)] + batches * 6
    cut, rest = [], []
    _run(tiny_model, examples, tmp_path / "cut4", pad, events=cut, stop_after_step=4)
    _run(tiny_model, examples, tmp_path / "cut4", pad, events=rest, resume=True)
    assert cut == [("epoch", 0)] + batches * 4 and rest == [("epoch", 0)] + batches * 2 + [("epoch", 1)] + batches * 6


def test_gradient_accumulation_equals_bigger_batch(tiny_model_dir, examples, tiny_tokenizer, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 (and batch 1 x accum 4) give the same parameters: the loss is
    normalised by the trained tokens of the whole optimizer step, not per micro-batch."""
    from alignline.models import load_causal_lm

    pad = tiny_tokenizer.pad_token_id
    results = []
    for bs, acc in [(4, 1), (2, 2), (1, 4)]:
        m = load_causal_lm(tiny_model_dir, dtype="float32")
        # batches of 4 with the same order: plan_padded(order) then chunking gives identical step contents
        _run(m, examples, tmp_path / f"b{bs}", pad, batch_size=bs, grad_accum=acc, max_steps=3, max_grad_norm=None)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)
    assert torch.allclose(results[0], results[2], atol=1e-6)


def test_nan_guard_keeps_last_good_checkpoint(tiny_model, examples, tiny_tokenizer, tmp_path):
    pad = tiny_tokenizer.pad_token_id
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n, m = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), n, m

    settings = TrainSettings(lr=1e-3, epochs=1, batch_size=2, save_every=1)
    lengths = [len(e["input_ids"]) for e in examples]
    with pytest.raises(TrainingDivergedError, match=r"step 3: non-finite loss.*step-0000002"):
        train(tiny_model, accelerator=make_accelerator(settings), settings=settings, out_dir=tmp_path,
              plan=lambda e: plan_padded(lengths, 2, 0, e),
              collate=lambda ix: collate_padded([examples[i] for i in ix], pad),
              count_units=count_targets, step_fn=poisoned)
    ckpts = complete_checkpoints(tmp_path)
    assert [c.name for c in ckpts][-1] == "step-0000002"
    events = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "non_finite"
    for p in tiny_model.parameters():
        assert torch.isfinite(p).all()


def test_last_step_is_checkpointed_only_when_it_will_be_kept(tiny_model_dir, examples, tiny_tokenizer, tmp_path):
    """No save_every: a finished run writes no checkpoint (its stage would delete it once model/ is saved);
    keep_checkpoints_when_done, or a stage asking for it (final_checkpoint), gets the last step's."""
    from alignline.models import load_causal_lm

    pad = tiny_tokenizer.pad_token_id
    plain = _run(load_causal_lm(tiny_model_dir, dtype="float32"), examples, tmp_path / "plain", pad)
    assert plain.steps > 0 and complete_checkpoints(tmp_path / "plain") == []
    kept = _run(load_causal_lm(tiny_model_dir, dtype="float32"), examples, tmp_path / "kept", pad,
                keep_checkpoints_when_done=True)
    assert [c.name for c in complete_checkpoints(tmp_path / "kept")] == [f"step-{kept.steps:07d}"]


def test_packed_training_logs_the_loss_of_its_examples(tiny_model_dir, examples, tiny_tokenizer, tmp_path):
    """The loop on packed rows: the first step's logged loss is the per-token cross-entropy of the examples packed
    into its rows, computed one padded row per example with the same starting weights (within 1e-5), and every
    step is trained (one per micro-batch of the plan: 2 epochs)."""
    from alignline.models import load_causal_lm

    pad = tiny_tokenizer.pad_token_id
    lengths = [len(e["input_ids"]) for e in examples]
    first_rows = plan_packed(lengths, 256, 2, 3, 0)[0]  # _run's plan: 256 tokens a row, 2 rows a step, seed 3
    reference = load_causal_lm(tiny_model_dir, dtype="float32").eval()
    with torch.no_grad():
        total, n, _ = causal_lm_loss(reference, collate_padded([examples[i] for r in first_rows for i in r], pad))
    r = _run(load_causal_lm(tiny_model_dir, dtype="float32"), examples, tmp_path, pad, packing=True)
    assert r.steps == len(plan_packed(lengths, 256, 2, 3, 0)) + len(plan_packed(lengths, 256, 2, 3, 1))
    assert _losses(tmp_path / "metrics.jsonl")[0] == pytest.approx(float(total) / n, abs=1e-5)


def test_gradient_checkpointing_all_or_every_other_layer_trains_the_same(tiny_model_dir, examples, tiny_tokenizer,
                                                                         tmp_path):
    """Recomputing activations in backward changes memory, not maths: 3 steps with checkpointing on every layer
    and on every 2nd layer (checkpoint_every=2), and selective checkpointing (matmul outputs kept) on the first
    checkpointed layer, end at the parameters of a run without it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from alignline.models import load_causal_lm

    pad = tiny_tokenizer.pad_token_id
    results, flags = [], []
    for name, kw in [("off", {}), ("all", {"gradient_checkpointing": True}),
                     ("half", {"gradient_checkpointing": True, "checkpoint_every": 2}),
                     ("selective", {"gradient_checkpointing": True, "selective_layers": 1})]:
        m = load_causal_lm(tiny_model_dir, dtype="float32")
        _run(m, examples, tmp_path / name, pad, max_steps=3, **kw)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
        flags.append([layer.gradient_checkpointing for layer in m.modules()
                      if isinstance(layer, GradientCheckpointingLayer)])
    assert flags[1] == [True] * len(flags[1]) and flags[2] == [i % 2 == 0 for i in range(len(flags[2]))]
    for r in results[1:]:
        assert torch.allclose(results[0], r, atol=1e-6)


def test_free_memory_trim_changes_memory_not_maths(tiny_model_dir, examples, tiny_tokenizer, tmp_path, monkeypatch):
    """free_memory=trim calls malloc_trim after every micro-batch's backward and on every 10th decoder-layer
    call in training mode, and ends at exactly the parameters of free_memory=keep. Training the same model
    twice (tso does) keeps one hook per layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    import alignline.train.memory as memory_mod
    from alignline.models import load_causal_lm

    libc = memory_mod._glibc()
    if libc is None:
        pytest.skip("needs glibc")
    trims = []

    class CountingLibc:
        def malloc_trim(self, pad):
            trims.append(pad)
            return libc.malloc_trim(pad)

        def mallopt(self, *a):
            raise AssertionError("trim must not change malloc's thresholds")

    monkeypatch.setattr(memory_mod, "_glibc", lambda: CountingLibc())
    pad = tiny_tokenizer.pad_token_id
    params = {}
    for mode in ("keep", "trim"):
        m = load_causal_lm(tiny_model_dir, dtype="float32")
        trims.clear()
        r = _run(m, examples, tmp_path / mode, pad, max_steps=3, free_memory=mode)
        params[mode] = torch.cat([p.detach().flatten() for p in m.parameters()])
        n_layers = sum(isinstance(x, GradientCheckpointingLayer) for x in m.modules())
        micro_batches = 3  # 3 steps x 1 micro-batch
        if mode == "keep":
            assert trims == []
        else:
            assert r.steps == 3
            assert len(trims) == micro_batches + (micro_batches * n_layers) // 10
            _run(m, examples, tmp_path / "again", pad, max_steps=1, free_memory=mode)
            assert all(len(x._forward_pre_hooks) == 1 for x in m.modules() if isinstance(x, GradientCheckpointingLayer))
    assert torch.equal(params["keep"], params["trim"])
