"""Parity with TRL 1.16's GRPO loss: on the same model, fixed rollouts, advantages, sampling-policy and reference
log-probs, ``alignline rl``'s step loss equals ``GRPOTrainer._compute_loss`` within 1e-5 (and so do the
gradients), for TRL's ``loss_type="grpo"`` (our aggregation seq_mean_token_mean), ``"dr_grpo"``
(token_sum_norm) and ``"dapo"`` (token_mean, one step per rollout), with the k3 KL in the loss.

TRL settings that differ from its defaults here: ``bf16=False`` (fp32 on both sides) and
``use_bias_correction_kl=False``: TRL 1.16 by default multiplies the per-token k3 KL by the importance ratio
``pi / pi_old`` (equal to 1, so no difference, when the rollout is trained in one step); alignline's KL term is
the plain k3 estimate. Prompts have equal lengths: TRL left-pads prompts without shifting position ids.

TRL's batch: left-padded prompts, right-padded completions, ``advantages`` [B], ``old_per_token_logps`` and
``ref_per_token_logps`` [B, T]. Ours: the same token ids as prefix-shared group rows (the responses of a
prompt in one row) and the same per-token values, flattened.
"""

from __future__ import annotations

import pytest
import torch

from alignline.stages.rl import step as rl_step
from alignline.stages.rl.config import RLConfig
from alignline.stages.rl.rollout import RolloutRecord

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PROMPTS = [[5, 6, 7, 8, 9], [20, 21, 22, 23, 24]]  # equal lengths: TRL left-pads prompts without shifting positions
RESPONSES = [[[30, 31, 2], [40, 41, 42, 43, 44], [50], [51, 52, 2]],
             [[60, 61, 62, 63], [64, 2], [65, 66, 67, 68, 69, 70], [71, 72, 2]]]
MAX_NEW = 8
BETA = 0.04


def trl_trainer(model, tokenizer, loss_type, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=MAX_NEW, beta=BETA, loss_type=loss_type, report_to=[], use_cpu=True,
                      epsilon=0.2, logging_steps=1, save_strategy="no", bf16=False,
                      use_bias_correction_kl=False)
    data = datasets.Dataset.from_list([{"prompt": "hello"}] * 8)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=data, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def fixed_values(n_tokens: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_tokens, generator=g, dtype=torch.float64) - 0.5) * scale


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "seq_mean_token_mean"), ("dr_grpo", "token_sum_norm"),
                                                    ("dapo", "token_mean")])
def test_grpo_loss_equals_trl(tiny_model, tiny_tokenizer, tmp_path, loss_type, aggregation):
    from alignline.train.groups import group_token_logps

    seqs = [(p, r) for p, rs in zip(PROMPTS, RESPONSES) for r in rs]
    B, T, Pw = len(seqs), max(len(r) for _, r in seqs), max(len(p) for p in PROMPTS)
    pad = tiny_tokenizer.pad_token_id
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 0.0, 0.8])
    records = [RolloutRecord(iteration=0, prompt_id=str(PROMPTS.index(p)), sample_idx=i, prompt=p, response=r,
                             text="", finish_reason="stop", score=0.0, parts={}, passed=None,
                             advantages=[float(advantages[i])] * len(r))
               for i, (p, r) in enumerate(seqs)]
    # the sampling policy and the reference: the model's own log-probs moved by fixed offsets (some ratios clip)
    tiny_model.eval()
    batch = rl_step.collate_rollout(records, pad, aggregation, MAX_NEW)
    with torch.no_grad():
        current = group_token_logps(tiny_model, batch)[0].double()
    old = current + fixed_values(len(current), 1, 0.6)
    ref = current + fixed_values(len(current), 2, 1.0)
    lengths = [len(r) for _, r in seqs]
    for r, o, f in zip(records, old.split(lengths), ref.split(lengths)):
        r.old_logps, r.ref_logps = o.tolist(), f.tolist()
    batch = rl_step.collate_rollout(records, pad, aggregation, MAX_NEW)

    cfg = RLConfig(model="m", prompts="p", kl={"coef": BETA, "estimator": "k3", "where": "loss"},
                   loss={"aggregation": aggregation, "clip_low": 0.2, "clip_high": 0.2},
                   rollout={"prompts": 2, "group_size": 4}, train={"batch_size": 8, "grad_accum": 1})
    tiny_model.zero_grad()
    loss_sum, units, _ = rl_step.rl_step_fn(cfg)(tiny_model, batch)
    ours = loss_sum / units
    ours.backward()
    our_grads = [p.grad.clone() for p in tiny_model.parameters()]

    trainer = trl_trainer(tiny_model, tiny_tokenizer, loss_type, tmp_path)
    prompt_ids = torch.full((B, Pw), pad)
    prompt_mask = torch.zeros((B, Pw), dtype=torch.long)
    completion_ids = torch.full((B, T), pad)
    completion_mask = torch.zeros((B, T), dtype=torch.long)
    old_t = torch.zeros(B, T)
    ref_t = torch.zeros(B, T)
    for i, ((p, r), o, f) in enumerate(zip(seqs, old.split(lengths), ref.split(lengths))):
        prompt_ids[i, Pw - len(p):] = torch.tensor(p)
        prompt_mask[i, Pw - len(p):] = 1
        completion_ids[i, : len(r)] = torch.tensor(r)
        completion_mask[i, : len(r)] = 1
        old_t[i, : len(r)] = o.float()
        ref_t[i, : len(r)] = f.float()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old_t,
              "ref_per_token_logps": ref_t, "num_items_in_batch": completion_mask.sum()}
    model = trainer.model
    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    assert abs(float(ours) - float(theirs)) < 1e-5, (float(ours), float(theirs))
    for a, b in zip(our_grads, [p.grad for p in model.parameters()]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
