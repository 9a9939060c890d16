"""``alignline rl``: online RL with a group policy gradient (GRPO, Dr. GRPO, RLOO, REINFORCE++) or PPO.

One iteration (design section 4, "Online RL"): draw ``rollout.prompts`` prompts -> the engine samples
``rollout.group_size`` (G) responses each from the current policy -> the reward function scores them ->
no-grad passes give the sampling policy's, the reference's and the critic's per-token values (the G responses
of a prompt share one row, :mod:`alignline.train.groups`) -> the estimator turns rewards into advantages
(:mod:`alignline.advantages`) -> ``loss.epochs`` passes of the clipped-ratio loss through the one training loop.
The rollout is a shard on disk (:mod:`alignline.train.rollout`) written before it is trained on.

The whole run is one call of :func:`alignline.train.loop.train` whose "epochs" are the iterations: the plan of
iteration k is a fixed number of micro-batches of response indices, and the first micro-batch of iteration k
asks for its rollout, sampled then with the weights the loop holds at that moment (or read back from its
shard after a resume). So optimizer state, schedule, checkpoints and exact resume are the loop's own.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from alignline.advantages import (
    ESTIMATORS,
    KL_ESTIMATORS,
    clipped_policy_loss,
    clipped_value_loss,
    token_weights,
)
from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.generate.base import DecodeStep, SamplingParams
from alignline.generate.endpoint import OpenAIConnection
from alignline.rewards import RewardSpec
from alignline.stages.common import Dtype, TrustRemoteCode
from alignline.train.loop import TrainSettings


class RolloutSettings(Section):
    """How each iteration's rollout is drawn."""

    prompts: int = Field(8, gt=0)
    """Prompts per iteration."""
    group_size: int = Field(8, gt=0)
    """G: responses per prompt (group estimators need at least 2)."""
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=128))
    """Sampling of the policy (sample i of prompt p in iteration k: seed sample_seed(seed, p, k * G + i))."""
    max_batch: int = Field(64, gt=0)
    """hf engine: responses decoded together (slots refilled from the rollout's queue as responses finish)."""
    decode_step: DecodeStep = "live"
    """hf engine: live (default), static or graph (the decode step replayed as a CUDA graph; GPU only)."""
    pass_batch: int = Field(4, gt=0)
    """Prompts (groups) per forward in the no-grad passes (sampling policy, reference, critic)."""
    engine_logprobs: bool = True
    """hf engine: take the sampling policy's log-probs (the clipped ratio's denominator, needed when an
    iteration takes more than one optimizer step or the KL is in the reward) from the decode steps that drew
    the tokens, instead of a no-grad pass of the policy over the rollout. They agree up to float rounding
    (about 1e-5; the decode attends over a KV cache, the pass over whole rows); false recomputes them exactly
    as the training forward does, as verl does. The engine's generic fallback path always recomputes."""


class PGLoss(Section):
    """The estimator and the clipped-ratio loss."""

    estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"] = "grpo"
    """grpo (group mean and std), dr_grpo (no std, no length normalisation), rloo (leave-one-out mean),
    reinforce_pp (group mean, batch-normalised), gae (PPO: value head, gamma, lambda)."""
    epochs: int = Field(1, gt=0)
    """mu: optimisation passes over each rollout."""
    clip_low: float = Field(0.2, gt=0, lt=1)
    """epsilon of the ratio's lower clip (1 - eps)."""
    clip_high: float = Field(0.2, gt=0)
    """epsilon of the ratio's upper clip (1 + eps; DAPO raises it to 0.28)."""
    aggregation: Literal["seq_mean_token_mean", "token_mean", "token_sum_norm"] | None = None
    """How token losses become the step's loss; null: the estimator's own (grpo, rloo: seq_mean_token_mean;
    dr_grpo: token_sum_norm, divided by max_new_tokens; reinforce_pp, gae: token_mean)."""

    @property
    def aggregation_name(self) -> str:
        return self.aggregation or ESTIMATORS[self.estimator].aggregation


class KLSettings(Section):
    """KL to a reference policy."""

    coef: float = Field(0.0, ge=0)
    """Coefficient (0: no reference pass at all)."""
    estimator: Literal["k1", "k3"] = "k3"
    """k1: log pi - log ref; k3: exp(ref - pi) - (ref - pi) - 1 (GRPO's)."""
    where: Literal["loss", "reward"] = "loss"
    """loss: added per token to the loss (GRPO); reward: subtracted from each token's reward (PPO)."""
    reference: str | None = None
    """Reference model; null: the starting policy. Held frozen (no gradient, no optimizer state)."""


class PPOSettings(Section):
    """The critic and GAE (loss.estimator: gae)."""

    critic: str | None = None
    """Initialise the critic from this reward model (alignline rm); null: from the starting policy with a new
    scalar head."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    value_clip: float = Field(0.2, gt=0)
    """Clip of the value change in the value loss."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    whiten: bool = True
    """Normalise the advantages over the rollout's tokens (mean 0, std 1)."""


class EvalSettings(Section):
    """Greedy answers on held-out prompts with verifiable instructions (the loop's eval hook)."""

    prompts: RecordsSource | None = None
    """Held-out prompts with meta.instructions; null: no evaluation."""
    max_prompts: int | None = Field(None, gt=0)
    """Only the first this many."""
    max_new_tokens: int = Field(256, gt=0)
    """Length limit of the greedy answers."""


def default_rl_train() -> TrainSettings:
    # one optimizer step per rollout (64 responses: 8 x 8 accumulation), constant lr
    return TrainSettings(lr=1e-6, epochs=1, batch_size=8, grad_accum=8, schedule="constant", max_grad_norm=1.0)


class PolicyServer(OpenAIConnection):
    """The vLLM/SGLang server that serves the policy (engine=openai)."""

    weights_url: str | None = None
    """The server's weight-reload endpoint (SGLang: http://HOST:PORT/update_weights_from_disk), posted the saved
    policy's directory before each rollout after the first."""


class RLConfig(Section):
    """Configuration of ``alignline rl``."""

    model: str
    """Starting policy (HF dir, .gguf, alias or Hub id); usually an SFT model."""
    prompts: RecordsSource
    """Training prompts (with meta.instructions for the verifier reward)."""
    output_dir: str = "runs/rl"
    """Run directory: rollouts/, checkpoints/, metrics.jsonl, iterations.jsonl, model/ (and critic/)."""
    iterations: int = Field(20, gt=0)
    """Rollouts (each followed by loss.epochs passes); replaces train.epochs."""
    engine: Literal["hf", "openai"] = "hf"
    """hf: the policy samples in this process; openai: a vLLM/SGLang server serving the policy."""
    openai: PolicyServer = Field(default_factory=lambda: PolicyServer())
    """openai engine: base_url, api_key_env, max_concurrency, ... (see alignline sample; the key is never
    written to a file), and weights_url: the server's reload endpoint."""
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    """Prompts per iteration, G, sampling."""
    reward: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(type="verifier")])
    """Reward terms, summed with their weights; a bare name (verifier) stands for one term."""
    length_penalty: float = Field(0.0, ge=0)
    """Subtract this times (response tokens / max_new_tokens) from each reward."""
    loss: PGLoss = Field(default_factory=PGLoss)
    """Estimator and clipping."""
    kl: KLSettings = Field(default_factory=KLSettings)
    """KL to the reference."""
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    """Critic and GAE (used with loss.estimator gae)."""
    train: TrainSettings = Field(default_factory=default_rl_train)
    """Loop settings: batch_size responses per micro-batch, grad_accum micro-batches per step (epochs: ignored)."""
    eval: EvalSettings = Field(default_factory=EvalSettings)
    """Held-out greedy evaluation (train.eval_every steps, and at the start and the end)."""
    max_prompt_tokens: int = Field(1024, gt=0)
    """Prompts longer than this (rendered) are dropped and counted."""
    dtype: Dtype = "auto"
    """auto: float32 weights (bf16 autocast on GPUs that support it)."""
    trust_remote_code: TrustRemoteCode
    resume: bool = True
    """Continue from the newest complete checkpoint and the rollouts on disk."""

    @field_validator("reward", mode="before")
    @classmethod
    def _bare_names(cls, v):
        items = v if isinstance(v, list) else [v]
        return [{"type": x} if isinstance(x, str) else x for x in items]

    @model_validator(mode="after")
    def _check(self):
        est = ESTIMATORS[self.loss.estimator]
        G = self.rollout.group_size
        if est.group and G < 2:
            raise ValueError(f"loss.estimator={self.loss.estimator} compares the responses of a group: "
                             f"rollout.group_size must be >= 2 (found {G}); raise it or use estimator gae")
        per_step = self.train.batch_size * self.train.grad_accum
        if (self.rollout.prompts * G) % per_step:
            raise ValueError(f"rollout.prompts x rollout.group_size = {self.rollout.prompts * G} responses must be a "
                             f"multiple of train.batch_size x train.grad_accum = {per_step} (responses per optimizer "
                             "step), so every step weighs the same number of responses")
        if not self.reward:
            raise ValueError("reward is empty: give at least one term (e.g. reward: verifier)")
        if self.engine == "openai" and not self.openai.base_url:
            raise ValueError("engine=openai needs openai.base_url (the vLLM/SGLang server serving the policy)")
        if self.engine == "openai" and self.iterations > 1 and not self.openai.weights_url:
            raise ValueError("engine=openai with iterations > 1 needs openai.weights_url, the server's weight "
                             "reload endpoint, or the server keeps sampling the starting policy")
        return self

    @property
    def steps_per_iteration(self) -> int:
        per_step = self.train.batch_size * self.train.grad_accum
        return self.loss.epochs * math.ceil(self.rollout.prompts * self.rollout.group_size / per_step)


def metric_names(cfg: RLConfig) -> tuple[str, ...]:
    """Per-step sums the loop logs (each divided by the step's units); iterations.jsonl turns them into
    per-token means. kl only with a reference, value_loss only with a critic."""
    return ("response_tokens", "pg_loss", "clipped", "entropy", "ratio") + (("kl",) if cfg.kl.coef > 0 else ()) \
        + (("value_loss",) if ESTIMATORS[cfg.loss.estimator].critic else ())


def estimator_params(cfg: RLConfig) -> dict:
    return {"gamma": cfg.ppo.gamma, "lam": cfg.ppo.lam} if ESTIMATORS[cfg.loss.estimator].critic else {}


# --------------------------------------------------------------------------------------- training step

def rl_step_fn(cfg: RLConfig):
    """``step_fn`` for the loop: the clipped-ratio loss (+ KL in the loss, + PPO's value loss), summed with the
    aggregation's token weights; metrics are sums over the micro-batch's response tokens."""
    from alignline.train.groups import group_token_logps, group_token_values
    from alignline.train.rollout import policy_and_critic

    kl_fn = KL_ESTIMATORS[cfg.kl.estimator]
    kl_in_loss = cfg.kl.coef > 0 and cfg.kl.where == "loss"

    def step(model, batch):
        policy, critic = policy_and_critic(model)
        logps, entropy = group_token_logps(policy, batch, entropy=True)
        old = batch["old_logps"].to(logps.dtype) if "old_logps" in batch else logps.detach()
        per_token, clipped = clipped_policy_loss(logps, old, batch["advantages"].to(logps.dtype),
                                                 eps_low=cfg.loss.clip_low, eps_high=cfg.loss.clip_high)
        w = batch["weight"].to(logps.dtype)
        metrics = {"response_tokens": float(w.numel()), "pg_loss": float((per_token.detach()).sum()),
                   "clipped": float(clipped.sum()), "entropy": float(entropy.sum()),
                   "ratio": float(torch.exp(logps.detach() - old).sum())}
        if "ref_logps" in batch:
            kl = kl_fn(logps, batch["ref_logps"].to(logps.dtype))
            metrics["kl"] = float(kl.detach().sum())
            if kl_in_loss:
                per_token = per_token + cfg.kl.coef * kl
        loss = (per_token * w).sum()
        if critic is not None:
            values = group_token_values(critic, batch)
            vl = clipped_value_loss(values, batch["old_values"].to(values.dtype), batch["returns"].to(values.dtype),
                                    clip=cfg.ppo.value_clip)
            metrics["value_loss"] = float(vl.detach().sum())
            loss = loss + cfg.ppo.vf_coef * (vl * w).sum()
        return loss, int(batch["units"]), metrics

    return step


def make_plan(cfg: RLConfig):
    """Micro-batches of iteration k: ``loss.epochs`` passes, each over the prompts in a seeded order with a
    prompt's responses kept together (so they share rows); indices are k * P * G + response index."""
    P, G, mb = cfg.rollout.prompts, cfg.rollout.group_size, cfg.train.batch_size

    def plan(iteration: int) -> list[list[int]]:
        out = []
        for epoch in range(cfg.loss.epochs):
            order = list(range(P))
            random.Random(cfg.train.seed * 1_000_003 + iteration * 1_009 + epoch).shuffle(order)
            seqs = [iteration * P * G + p * G + g for p in order for g in range(G)]
            out += [seqs[s: s + mb] for s in range(0, len(seqs), mb)]
        return out

    return plan


def collate_rollout(records: list[dict], local: list[int], pad_id: int, aggregation: str, max_new_tokens: int
                    ) -> dict[str, torch.Tensor]:
    """Tensors of the responses ``local`` (indices into ``records``): consecutive responses of one prompt
    share a row; per-token fields flattened in the same order as the targets."""
    from alignline.train.groups import collate_groups

    items: list[dict] = []
    for i in local:
        r = records[i]
        if items and items[-1]["key"] == r["prompt_id"]:
            items[-1]["responses"].append(r["response"])
        else:
            items.append({"key": r["prompt_id"], "prompt": r["prompt"], "responses": [r["response"]]})
    chosen = [records[i] for i in local]
    batch = collate_groups(items, pad_id)
    lengths = torch.tensor([len(r["response"]) for r in chosen])
    w, units = token_weights(aggregation, lengths, max_new_tokens)
    batch["weight"] = w.repeat_interleave(lengths)
    batch["units"] = units.sum()
    for key in ("advantages", "old_logps", "ref_logps", "old_values", "returns"):
        if chosen[0].get(key) is not None:
            batch[key] = torch.tensor([x for r in chosen for x in r[key]], dtype=torch.float64)
    return batch



def run(cfg: RLConfig):
    """Run the stage (the body lives in :mod:`alignline.stages.rl_run`)."""
    from alignline.stages.rl_run import run as run_rl

    return run_rl(cfg)
