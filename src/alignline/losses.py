"""Preference losses: pure functions of per-sequence log-probabilities.

Every function takes tensors of shape ``[B]`` (one value per pair):

* ``policy_chosen_logps``, ``policy_rejected_logps``: log pi(y | x) summed over response tokens
  (or averaged, when a stage asks for length normalisation);
* ``ref_chosen_logps``, ``ref_rejected_logps``: the same under the reference model (no gradient);

and returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``. The implicit rewards are
``r_w = beta * (log pi(y_w) - log ref(y_w))`` and ``r_l = beta * (log pi(y_l) - log ref(y_l))``, detached.
With ``h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]``:

* DPO (Rafailov et al. 2023, eq. 7):      ``-log sigmoid(beta * h)``
* IPO (Azar et al. 2023, eq. 17):         ``(h - 1 / (2 * tau))^2``
* cDPO (label smoothing eps):             ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
* RSO hinge (Liu et al. 2023, eq. 8):     ``max(0, 1 - beta * h)``
* TSO dual-clip (Chen et al. 2024):       ``-log sigmoid(min(r_w, m_pos) - max(r_l, -m_neg))``

The training loop receives one of these (bound to its hyper-parameters); it never branches on names.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


def _rewards(beta: float, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """DPO, sigmoid form: ``-log sigmoid(beta * h)``. Shapes ``[B] -> [B]``; ``h = 0`` gives ``log 2``."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * h)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))


def cdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO: the preference label is flipped with probability ``eps = label_smoothing``:
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. Shapes ``[B] -> [B]``."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """IPO: ``(h - 1 / (2 * tau))^2`` with ``tau = beta``. Shapes ``[B] -> [B]``.

    The IPO paper (and TRL) use *length-averaged* log-probs; the stage passes those when
    ``loss.length_normalize`` is on (the default for IPO)."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """RSO / SLiC hinge: ``max(0, 1 - beta * h)``. Shapes ``[B] -> [B]``."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = torch.relu(1 - beta * h)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))


def dual_clip_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                   ref_rejected_logps: Tensor, *, beta: float = 0.1, margin_chosen: float = 20.0,
                   margin_rejected: float = 10.0) -> LossOutput:
    """TSO dual-clip reward loss, **our reading** of the paper (its equation was lost in extraction).

    ``-log sigmoid(min(r_w, m_pos) - max(r_l, -m_neg))`` with ``r = beta * (log pi - log ref)``,
    ``m_pos = margin_chosen`` (paper: 20) and ``m_neg = margin_rejected`` (paper: 10). While
    ``r_w < m_pos`` and ``r_l > -m_neg`` it equals DPO exactly. Once the rejected reward falls below
    ``-m_neg`` its term is constant, so it stops pushing (and, through shared parameters, stops dragging the
    chosen reward down); the smaller margin makes the rejected side clip first, as the paper describes.
    The chosen side likewise stops being pushed up past ``m_pos``. Shapes ``[B] -> [B]``.
    """
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(torch.clamp(r_w, max=margin_chosen) - torch.clamp(r_l, min=-margin_rejected))
    return losses, r_w.detach(), r_l.detach()


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> LossOutput:
    """Reward-model loss (Xwin-RM, Bradley-Terry): ``-log sigmoid(r(x, y_w) - r(x, y_l) - m)``.

    ``chosen_rewards``, ``rejected_rewards``: the RM's scalar scores ``[B]``; ``margin``: optional ``[B]``
    (e.g. by rating level, as in Llama 2), 0 when None. Returns ``(losses, chosen_rewards, rejected_rewards)``
    with the rewards detached. Equal rewards and no margin give ``log 2``.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff), chosen_rewards.detach(), rejected_rewards.detach()


def sft_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Optional SFT term on the chosen response: per-token negative log-likelihood ``-logp / n``, ``[B]``."""
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


PairLoss = Callable[[Tensor, Tensor, Tensor, Tensor], LossOutput]

LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "dual_clip": dual_clip_loss,
}


def bind(name: str, **params: float) -> PairLoss:
    """The loss ``name`` with its hyper-parameters fixed: what a stage hands the training loop."""
    return partial(LOSSES[name], **params)
