"""Settings of ``alignline rl`` (one config model, :class:`RLConfig`, validated before any model loads)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignline.advantages import ESTIMATORS
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

    @property
    def min_words_guard(self) -> int:
        """The verifier terms' floor on answer words (0: no guard); reported per rollout as ``under_min_words``."""
        return max((s.min_words for s in self.reward if s.type == "verifier"), default=0)

    @property
    def needs_old_logps(self) -> bool:
        """The sampling policy's log-probs are needed: an iteration takes more than one optimizer step (the
        clipped ratio's denominator), or the KL is in the reward."""
        return self.steps_per_iteration > 1 or (self.kl.coef > 0 and self.kl.where == "reward")


def metric_names(cfg: RLConfig) -> tuple[str, ...]:
    """Per-step sums the loop logs (each divided by the step's units); iterations.jsonl turns them into
    per-token means. kl only with a reference, value_loss only with a critic."""
    return ("response_tokens", "pg_loss", "clipped", "entropy", "ratio") + (("kl",) if cfg.kl.coef > 0 else ()) \
        + (("value_loss",) if ESTIMATORS[cfg.loss.estimator].critic else ())


def estimator_params(cfg: RLConfig) -> dict:
    return {"gamma": cfg.ppo.gamma, "lam": cfg.ppo.lam} if ESTIMATORS[cfg.loss.estimator].critic else {}
