"""Advantage estimators, GAE, KL estimators and the policy-gradient losses against hand-computed values.

One group of 4 rewards ``r = [1, 0, 0, 1]`` (mean 0.5) is worked through for every group estimator:

* GRPO: deviations ``[.5, -.5, -.5, .5]``, unbiased variance ``4 * .25 / 3 = 1/3``, std ``0.577350``;
  ``A = .5 / (0.577350 + 1e-4) = 0.865875`` with the deviation's sign.
* Dr. GRPO: the deviations themselves, ``[.5, -.5, -.5, .5]``.
* RLOO: others' means ``[1/3, 2/3, 2/3, 1/3]``, ``A = [2/3, -2/3, -2/3, 2/3]``.
* REINFORCE++ with a second group ``[2, 2, 2, 2]``: ``a = [.5, -.5, -.5, .5, 0, 0, 0, 0]``, batch mean 0,
  unbiased std ``sqrt(1 / 7) = 0.377964``; ``A = .5 / 0.378065 = 1.322526``, second group 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignline.advantages import (
    ESTIMATORS,
    clipped_policy_loss,
    clipped_value_loss,
    dr_grpo,
    gae,
    grpo,
    kl_k1,
    kl_k3,
    reinforce_pp,
    rloo,
    token_weights,
    whiten,
)

R = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


def run(fn, rewards, T=3, **kw):
    P, G = rewards.shape
    mask = torch.ones(P, G, T, dtype=torch.float64)
    mask[..., -1] = torch.tensor([1.0, 0.0, 1.0, 0.0] * (P * G // 4)).view(P, G)  # two responses one token shorter
    adv, _ = fn(rewards, torch.zeros_like(mask), torch.zeros_like(mask), mask, **kw)
    assert torch.all(adv[mask == 0] == 0), "padding gets no advantage"
    return adv[..., 0]


@pytest.mark.parametrize("fn, expected", [
    (grpo, [0.5 / (math.sqrt(1 / 3) + 1e-4)] * 4),
    (dr_grpo, [0.5] * 4),
    (rloo, [2 / 3] * 4),
])
def test_group_estimators_hand_values(fn, expected):
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0])
    got = run(fn, R)[0]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64) * signs, atol=1e-9)


def test_grpo_value_in_docstring():
    assert abs(float(run(grpo, R)[0, 0]) - 0.865875) < 1e-6


def test_reinforce_pp_batch_normalised():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    got = run(reinforce_pp, rewards)
    a = 0.5 / (math.sqrt(1 / 7) + 1e-4)
    assert abs(a - 1.322526) < 1e-6
    assert torch.allclose(got[0], torch.tensor([a, -a, -a, a], dtype=torch.float64), atol=1e-9)
    assert torch.all(got[1] == 0)


@pytest.mark.parametrize("name", [n for n, e in ESTIMATORS.items() if e.group])
def test_equal_rewards_give_zero_not_nan(name):
    rewards = torch.full((3, 4), 0.7, dtype=torch.float64)
    got = run(ESTIMATORS[name].fn, rewards)
    assert torch.all(got == 0) and not torch.isnan(got).any()


def test_gae_three_steps_by_hand():
    """r = [0, 0, 1], V = [.5, .6, .7], gamma 1, lambda .5: delta = [.1, .1, .3]; A_3 = .3, A_2 = .1 + .5 * .3
    = .25, A_1 = .1 + .5 * .25 = .225; returns A + V = [.725, .85, 1.0]. A padded 4th position gets 0."""
    tr = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)
    v = torch.tensor([[[0.5, 0.6, 0.7, 9.0]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]], dtype=torch.float64)
    adv, ret = gae(tr.sum(-1), tr, v, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv[0, 0], torch.tensor([0.225, 0.25, 0.3, 0.0], dtype=torch.float64))
    assert torch.allclose(ret[0, 0], torch.tensor([0.725, 0.85, 1.0, 0.0], dtype=torch.float64))


def test_gae_discount():
    """gamma .5, lambda 1, V = 0, r = [0, 0, 1]: A_t = .5^(2 - t) -> [.25, .5, 1]."""
    tr = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    adv, _ = gae(tr.sum(-1), tr, torch.zeros_like(tr), torch.ones_like(tr), gamma=0.5, lam=1.0)
    assert torch.allclose(adv[0, 0], torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64))


def test_kl_estimators():
    pi, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5])
    assert torch.allclose(kl_k1(pi, ref), torch.tensor([1.0, 0.0]))
    assert torch.allclose(kl_k3(pi, ref), torch.tensor([math.exp(-1), 0.0]))
    # k3 is non-negative everywhere; both are unbiased estimates of KL(pi || ref) under samples of pi
    x = torch.linspace(-3, 3, 61)
    assert torch.all(kl_k3(torch.zeros_like(x), x) >= 0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    for est in (kl_k1, kl_k3):
        assert abs(float((p * est(p.log(), q.log())).sum()) - exact) < 1e-6


def test_clipped_policy_loss_by_hand():
    """rho = 1.5, A = 1, eps .2: min(1.5, 1.2) = 1.2 -> loss -1.2, clipped; rho = 1.5, A = -1: min(-1.5, -1.2)
    = -1.5 -> loss 1.5, not clipped; rho = .5, A = -1: min(-.5, -.8) = -.8 -> .8, clipped."""
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5]))
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([1.0, -1.0, -1.0]), eps_low=0.2, eps_high=0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, 0.8]))
    assert clipped.tolist() == [True, False, True]


def test_clipped_value_loss_by_hand():
    """V = 1, V_old = 0, R = 1, c = .2: unclipped 0, clipped (0.2 - 1)^2 = .64 -> .5 * .64 = .32."""
    got = clipped_value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), clip=0.2)
    assert torch.allclose(got, torch.tensor([0.32]))


def test_aggregations():
    n = torch.tensor([2, 4])
    w, u = token_weights("seq_mean_token_mean", n, 8)
    assert w.tolist() == [0.5, 0.25] and u.tolist() == [1, 1]
    w, u = token_weights("token_mean", n, 8)
    assert w.tolist() == [1, 1] and u.tolist() == [2, 4]
    w, u = token_weights("token_sum_norm", n, 8)
    assert w.tolist() == [0.125, 0.125] and u.tolist() == [1, 1]


def test_whiten_over_real_tokens_only():
    """Tokens [1, 2, 3] and one padded position: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1, std 1, so
    [-1, 0, 1] and the padding stays 0; a constant shift of the real tokens changes nothing."""
    adv = torch.tensor([[[1.0, 2.0, 3.0, 9.0]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]], dtype=torch.float64)
    expected = torch.tensor([[[-1.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(whiten(adv, mask), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(whiten(adv + 5.0, mask), expected, atol=1e-7, rtol=0)
