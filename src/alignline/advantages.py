"""Advantage estimators and the policy-gradient losses of ``alignline rl``: pure functions of tensors.

Shapes: ``P`` prompts per iteration, ``G`` responses per prompt (the group), ``T`` the longest response in
tokens (shorter ones are padded and masked). Every estimator has the same signature::

    estimator(rewards [P, G], token_rewards [P, G, T], values [P, G, T], mask [P, G, T], **params)
        -> (advantages [P, G, T], returns [P, G, T] | None)

``rewards`` is each response's total reward (the score plus any per-token KL penalty), ``token_rewards``
the same reward spread over its tokens (the score at the last token, a KL penalty at every token), ``values``
the critic's value of the state before each token (zeros without a critic) and ``mask`` 1 at real tokens.
Group estimators give every token of a response its sequence advantage; GAE gives each token its own. A
group whose rewards are all equal gets advantage 0 for every member (never NaN); stages count such groups.

The stage looks an estimator up in :data:`ESTIMATORS` by the configured name and hands it to the training
step; neither the step nor the loop branches on which one it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
STD_EPS = 1e-4
"""Added to the group std before dividing (GRPO; TRL 1.16 uses the same 1e-4)."""


def _shifted(rewards: Tensor) -> Tensor:
    """Rewards minus the group's first reward: the estimators are shift-invariant, and a group of equal rewards
    becomes exact zeros (a mean of equal floats can round away from them)."""
    return rewards - rewards[..., :1]


def _broadcast(seq_adv: Tensor, mask: Tensor) -> Tensor:
    return seq_adv.unsqueeze(-1).to(mask.dtype) * mask


def grpo(rewards: Tensor, token_rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, None]:
    """GRPO (Shao et al. 2024, eq. 3 outcome supervision): ``A_i = (r_i - mean(r)) / (std(r) + 1e-4)`` within
    the group, the unbiased std (``torch.std``, as TRL), the same advantage at every token.

    Worked example, one group of 4 rewards ``[1, 0, 0, 1]``: mean 0.5, deviations ``[.5, -.5, -.5, .5]``,
    unbiased variance ``4 * 0.25 / 3 = 1/3``, std 0.57735; ``A = [0.86588, -0.86588, -0.86588, 0.86588]``
    (``0.5 / 0.57745``)."""
    rewards = _shifted(rewards)
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    return _broadcast((rewards - mean) / (std + STD_EPS), mask), None


def dr_grpo(rewards: Tensor, token_rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, None]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", eq. 3): ``A_i = r_i - mean(r)``, no
    division by the std. (Its other half, no per-response length normalisation, is the loss aggregation
    ``token_sum_norm``.) Group ``[1, 0, 0, 1]``: ``A = [0.5, -0.5, -0.5, 0.5]``."""
    rewards = _shifted(rewards)
    return _broadcast(rewards - rewards.mean(-1, keepdim=True), mask), None


def rloo(rewards: Tensor, token_rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, None]:
    """RLOO (Ahmadian et al. 2024, eq. 6): ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))``.
    Group ``[1, 0, 0, 1]``: the others' means are ``[1/3, 2/3, 2/3, 1/3]``, ``A = [2/3, -2/3, -2/3, 2/3]``."""
    G = rewards.shape[-1]
    rewards = _shifted(rewards)
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (G - 1)
    return _broadcast(rewards - baseline, mask), None


def reinforce_pp(rewards: Tensor, token_rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, None]:
    """REINFORCE++ with a group baseline (Hu et al. 2025, "REINFORCE++", the ``reinforce_baseline`` variant):
    ``a_i = r_i - mean_group(r)``, then normalised over the whole batch, ``A = (a - mean(a)) / (std(a) + 1e-4)``
    (mean and unbiased std over all P * G responses).

    Worked example, two groups ``[1, 0, 0, 1]`` and ``[2, 2, 2, 2]``: ``a = [.5, -.5, -.5, .5, 0, 0, 0, 0]``,
    batch mean 0, unbiased variance ``4 * 0.25 / 7 = 1/7``, std 0.37796; first group
    ``A = [1.32253, -1.32253, -1.32253, 1.32253]`` (``0.5 / 0.378065``), second group 0 (zero variance)."""
    rewards = _shifted(rewards)
    a = rewards - rewards.mean(-1, keepdim=True)
    flat = a.flatten()
    std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
    return _broadcast((a - flat.mean()) / (std + STD_EPS), mask), None


def gae(rewards: Tensor, token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over each response's tokens, as PPO for
    LLMs uses it (Ouyang et al. 2022): ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` after the last token
    0, ``A_t = delta_t + gamma * lam * A_{t+1}``, returns ``R_t = A_t + V_t`` (the value targets).
    Padding (mask 0) gets 0. Responses must be right-padded (tokens first, then padding).

    Worked example, 3 tokens, ``r = [0, 0, 1]``, ``V = [0.5, 0.6, 0.7]``, gamma 1, lambda 0.5:
    ``delta = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3]``;
    ``A_3 = 0.3``, ``A_2 = 0.1 + 0.5 * 0.3 = 0.25``, ``A_1 = 0.1 + 0.5 * 0.25 = 0.225``;
    ``R = [0.725, 0.85, 1.0]``."""
    T = token_rewards.shape[-1]
    m = mask.to(values.dtype)
    v = values * m
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[..., 0])
    for t in reversed(range(T)):
        next_v = v[..., t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = token_rewards[..., t] + gamma * next_v - v[..., t]
        running = (delta + gamma * lam * running) * m[..., t]
        adv[..., t] = running
    return adv, (adv + v) * m



def whiten(advantages: Tensor, mask: Tensor) -> Tensor:
    """Advantages normalised over a rollout's real tokens: ``(A - mean) / (std + 1e-8)`` with the mean and the
    unbiased std taken over positions where ``mask`` is 1, padding left 0 (PPO's ``ppo.whiten``).

    Worked example, one response of tokens ``[1, 2, 3]`` and a padded position: mean 2, unbiased variance
    ``(1 + 0 + 1) / 2 = 1``, so ``[-1, 0, 1, 0]`` (up to the 1e-8)."""
    m = mask.to(advantages.dtype)
    n = m.sum()
    mean = (advantages * m).sum() / n
    var = (((advantages - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (advantages - mean) / (var.sqrt() + 1e-8) * m

@dataclass(frozen=True)
class Estimator:
    """An estimator with what the stage must provide for it."""

    fn: Callable[..., tuple[Tensor, Tensor | None]]
    group: bool
    """Needs G >= 2 responses per prompt (a group baseline)."""
    critic: bool
    """Needs a value model (PPO)."""
    aggregation: str
    """Default loss aggregation (see :data:`AGGREGATIONS`)."""


ESTIMATORS: dict[str, Estimator] = {
    "grpo": Estimator(grpo, group=True, critic=False, aggregation="seq_mean_token_mean"),
    "dr_grpo": Estimator(dr_grpo, group=True, critic=False, aggregation="token_sum_norm"),
    "rloo": Estimator(rloo, group=True, critic=False, aggregation="seq_mean_token_mean"),
    "reinforce_pp": Estimator(reinforce_pp, group=True, critic=False, aggregation="token_mean"),
    "gae": Estimator(gae, group=False, critic=True, aggregation="token_mean"),
}


# ----------------------------------------------------------------------------------------- KL estimators

def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 (Schulman 2020, "Approximating KL divergence"): ``log pi - log ref`` per token; unbiased for
    KL(pi || ref) under samples of pi, can be negative. ``logps = -1, ref = -2``: ``1``."""
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3: ``exp(ref - pi) - (ref - pi) - 1`` per token; unbiased, always >= 0 (GRPO's KL term, eq. 4).
    ``logps = -1, ref = -2``: ``exp(-1) + 1 - 1 = 0.36788``; equal log-probs: 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


# --------------------------------------------------------------------------------------------- losses

def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, *, eps_low: float = 0.2,
                        eps_high: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), as GRPO uses it:
    ``-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`` with ``rho = exp(logps - old_logps)``.
    Shapes ``[T]`` (flat response tokens) -> (loss ``[T]``, clipped ``[T]`` bool: the clipped side was taken
    and it differs). ``rho = 1.5, A = 1, eps 0.2``: ``-1.2`` (clipped); ``rho = 1.5, A = -1``: ``1.5``."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).detach()


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *, clip: float = 0.2) -> Tensor:
    """PPO's clipped value loss per token (as in OpenAI's baselines and TRL's PPO):
    ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``. Shapes ``[T] -> [T]``.
    ``V = 1, V_old = 0, R = 1, c = 0.2``: ``0.5 * max(0, 0.64) = 0.32``."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)


# ----------------------------------------------------------------------------------- loss aggregation

def token_weights(aggregation: str, lengths: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """Per-sequence token weight and unit count for a loss aggregation: the loss of a micro-batch is
    ``sum_t w_seq(t) * loss_t`` and the loop divides the step's sum by its units. ``lengths`` [S] -> (w [S],
    units [S]). See :data:`AGGREGATIONS`."""
    return AGGREGATIONS[aggregation](lengths.to(torch.float64), max_new_tokens)


AGGREGATIONS: dict[str, Callable[[Tensor, int], tuple[Tensor, Tensor]]] = {
    # GRPO (and TRL's loss_type="grpo"): mean over each response's tokens, then mean over responses
    "seq_mean_token_mean": lambda n, m: (1.0 / n.clamp(min=1), torch.ones_like(n)),
    # DAPO / TRL's "dapo" and "bnpo" with one step per rollout: mean over all tokens of the step
    "token_mean": lambda n, m: (torch.ones_like(n), n),
    # Dr. GRPO: token sums divided by a constant (max_new_tokens), mean over responses
    "token_sum_norm": lambda n, m: (torch.full_like(n, 1.0 / m), torch.ones_like(n)),
}
"""How per-token losses become the step's loss (weights and units per sequence); a setting, not code in the
loop."""
