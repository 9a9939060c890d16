"""Preference losses against hand-computed values, and pair log-probs in both layouts against a naive
computation.

Notation: ``h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]``,
``r_w = beta * (log pi(y_w) - log ref(y_w))``, ``r_l = beta * (log pi(y_l) - log ref(y_l))``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from alignline.data.records import Pair
from alignline.losses import (
    LOSSES,
    bind,
    cdpo_loss,
    dpo_loss,
    dual_clip_loss,
    hinge_loss,
    ipo_loss,
    sft_nll,
)
from alignline.train.pairs import collate_pairs, pair_logps, token_logps, tokenise_pairs

D = torch.float64


def t(*xs: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=D, requires_grad=grad)


# --------------------------------------------------------------------------------------------------- DPO


def test_dpo_zero_margin_is_log2():
    """h = 0 (policy == ref, or equal log-ratios) gives -log sigmoid(0) = log 2 = 0.693147..., rewards 0."""
    losses, rw, rl = dpo_loss(t(-5.0, -7.0), t(-9.0, -3.0), t(-5.0, -6.0), t(-9.0, -2.0), beta=0.1)
    # pair 0: h = 0 - 0 = 0; pair 1: h = (-7 + 6) - (-3 + 2) = -1 - (-1) = 0
    assert torch.allclose(losses, torch.full((2,), math.log(2), dtype=D), atol=1e-12, rtol=0)
    assert torch.allclose(rw, t(0.0, -0.1)) and torch.allclose(rl, t(0.0, -0.1))


def test_dpo_hand_value():
    """beta = 0.1, policy (chosen, rejected) = (-10, -12), ref = (-11, -11):

    h = (-10 - (-11)) - (-12 - (-11)) = 1 - (-1) = 2;  beta * h = 0.2;
    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694;
    r_w = 0.1 * 1 = 0.1,  r_l = 0.1 * (-1) = -0.1.
    """
    losses, rw, rl = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert losses.shape == (1,)
    assert abs(losses.item() - 0.5981388693815918) < 1e-12
    assert abs(rw.item() - 0.1) < 1e-12 and abs(rl.item() + 0.1) < 1e-12
    assert not rw.requires_grad and not rl.requires_grad


def test_dpo_gradient_hand_value():
    """d/d(log pi(y_w)) of -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.2)
    = -0.1 * 0.4501660027 = -0.04501660027; the rejected gradient is the negative of that."""
    pc, pr = t(-10.0, grad=True), t(-12.0, grad=True)
    losses, _, _ = dpo_loss(pc, pr, t(-11.0), t(-11.0), beta=0.1)
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    expected = -0.1 / (1 + math.exp(0.2))
    assert abs(gc.item() - expected) < 1e-12 and abs(gr.item() + expected) < 1e-12


# -------------------------------------------------------------------------------------------------- cDPO


def test_cdpo_without_smoothing_equals_dpo():
    """label_smoothing = 0: -(1 - 0) log sigmoid(beta h) - 0 = DPO, for random inputs."""
    g = torch.Generator().manual_seed(0)
    x = [-20 * torch.rand(16, generator=g, dtype=D) for _ in range(4)]
    a = cdpo_loss(*x, beta=0.3, label_smoothing=0.0)
    b = dpo_loss(*x, beta=0.3)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_cdpo_hand_value():
    """beta = 0.1, eps = 0.1, h = 2 (the DPO case above): -0.9 log sigmoid(0.2) - 0.1 log sigmoid(-0.2)
    = 0.9 * 0.5981388694 + 0.1 * 0.7981388694  (since -log sigmoid(-x) = -log sigmoid(x) + x)
    = 0.5981388694 + 0.1 * 0.2 = 0.6181388694."""
    losses, _, _ = cdpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.1)
    assert abs(losses.item() - 0.6181388693815918) < 1e-12


def test_cdpo_half_smoothing_is_symmetric():
    """eps = 0.5: loss(h) = -0.5 [log sigmoid(beta h) + log sigmoid(-beta h)] = loss(-h). Swapping chosen and
    rejected flips the sign of h."""
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(16, generator=g, dtype=D) for _ in range(4))
    a, _, _ = cdpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.5)
    b, _, _ = cdpo_loss(pr, pc, rr, rc, beta=0.2, label_smoothing=0.5)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # and it is minimal (log 2) at h = 0, larger elsewhere
    h0, _, _ = cdpo_loss(t(-3.0), t(-3.0), t(-3.0), t(-3.0), beta=0.2, label_smoothing=0.5)
    assert abs(h0.item() - math.log(2)) < 1e-12
    assert bool((a >= math.log(2) - 1e-12).all())


# --------------------------------------------------------------------------------------------------- IPO


def test_ipo_hand_values():
    """IPO, (h - 1 / (2 beta))^2:
    beta = 0.1, h = 2:  1 / (2 * 0.1) = 5,  (2 - 5)^2 = 9;
    beta = 0.5, h = 2:  1 / (2 * 0.5) = 1,  (2 - 1)^2 = 1;
    beta = 0.25, h = 2: 1 / (2 * 0.25) = 2, (2 - 2)^2 = 0 (the target margin)."""
    for beta, want in ((0.1, 9.0), (0.5, 1.0), (0.25, 0.0)):
        losses, rw, rl = ipo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=beta)
        assert abs(losses.item() - want) < 1e-12, beta
        assert abs(rw.item() - beta) < 1e-12 and abs(rl.item() + beta) < 1e-12


def test_ipo_gradient_hand_value():
    """d/d(log pi(y_w)) (h - 5)^2 = 2 (h - 5) = 2 * (2 - 5) = -6 at beta = 0.1, h = 2."""
    pc = t(-10.0, grad=True)
    losses, _, _ = ipo_loss(pc, t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    (gc,) = torch.autograd.grad(losses.sum(), pc)
    assert abs(gc.item() + 6.0) < 1e-12


# ------------------------------------------------------------------------------------------------- hinge


def test_hinge_hand_values_and_zero_gradient_above_margin():
    """max(0, 1 - beta h) with beta = 0.1, so the margin is 1 / beta = 10:
    policy (-5, -12), ref (-11, -11): h = 6 - (-1) = 7 < 10 -> 1 - 0.7 = 0.3, d/d(log pi(y_w)) = -beta = -0.1;
    policy (0, -12),  ref (-11, -11): h = 11 - (-1) = 12 > 10 -> max(0, 1 - 1.2) = 0, gradient 0."""
    pc, pr = t(-5.0, 0.0, grad=True), t(-12.0, -12.0, grad=True)
    losses, rw, rl = hinge_loss(pc, pr, t(-11.0, -11.0), t(-11.0, -11.0), beta=0.1)
    assert torch.allclose(losses, t(0.3, 0.0), atol=1e-12, rtol=0)
    assert torch.allclose(rw, t(0.6, 1.1)) and torch.allclose(rl, t(-0.1, -0.1))
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    assert torch.allclose(gc, t(-0.1, 0.0), atol=1e-12, rtol=0)
    assert torch.allclose(gr, t(0.1, 0.0), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------- dual clip


def _inside_margins(n: int, beta: float, m_pos: float, m_neg: float, seed: int):
    """Random log-probs whose rewards lie strictly inside (-m_neg, m_pos) on both sides."""
    g = torch.Generator().manual_seed(seed)
    rc = -50 * torch.rand(n, generator=g, dtype=D)
    rr = -50 * torch.rand(n, generator=g, dtype=D)
    r_w = (torch.rand(n, generator=g, dtype=D) * 2 - 1) * 0.99 * min(m_pos, m_neg)
    r_l = (torch.rand(n, generator=g, dtype=D) * 2 - 1) * 0.99 * m_neg
    return rc + r_w / beta, rr + r_l / beta, rc, rr


def test_dual_clip_equals_dpo_inside_margins():
    """While r_w < m_pos and r_l > -m_neg the clamps are inactive: loss, gradients and rewards equal DPO's."""
    beta, m_pos, m_neg = 0.1, 2.0, 1.0
    pc, pr, rc, rr = _inside_margins(64, beta, m_pos, m_neg, seed=2)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    a, aw, al = dual_clip_loss(pc, pr, rc, rr, beta=beta, margin_chosen=m_pos, margin_rejected=m_neg)
    assert bool((aw < m_pos).all()) and bool((al > -m_neg).all())
    b, bw, bl = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert torch.allclose(aw, bw, atol=1e-12, rtol=0) and torch.allclose(al, bl, atol=1e-12, rtol=0)
    ga = torch.autograd.grad(a.sum(), (pc, pr))
    gb = torch.autograd.grad(b.sum(), (pc, pr))
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, atol=1e-12, rtol=0)


def test_dual_clip_rejected_side_clips():
    """beta = 0.1, m_neg = 10: policy rejected -250 vs ref -100 gives r_l = 0.1 * (-150) = -15 < -10, so
    the rejected term is the constant -(-10) and d loss / d log pi(y_l) = 0 exactly; the chosen side
    (r_w = 0.1 * (-9 + 10) = 0.1 < 20) still gets -beta * sigmoid(-(0.1 + 10)) != 0.
    loss = -log sigmoid(0.1 - (-10)) = log(1 + e^-10.1) = 4.1095e-5; rewards are the unclipped 0.1 and -15."""
    pc, pr = t(-9.0, grad=True), t(-250.0, grad=True)
    losses, rw, rl = dual_clip_loss(pc, pr, t(-10.0), t(-100.0), beta=0.1, margin_chosen=20.0, margin_rejected=10.0)
    assert abs(losses.item() - math.log1p(math.exp(-10.1))) < 1e-15
    assert abs(rw.item() - 0.1) < 1e-12 and abs(rl.item() + 15.0) < 1e-12
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    assert gr.item() == 0.0
    assert gc.item() != 0.0
    assert abs(gc.item() + 0.1 / (1 + math.exp(10.1))) < 1e-15


def test_dual_clip_chosen_side_clips():
    """beta = 0.1, m_pos = 2: policy chosen -70 vs ref -100 gives r_w = 0.1 * 30 = 3 > 2, so
    d loss / d log pi(y_w) = 0 while the rejected side (r_l = 0.1 * (-11 + 10) = -0.1 > -m_neg) still moves:
    loss = -log sigmoid(2 - (-0.1)) = log(1 + e^-2.1), d / d log pi(y_l) = beta * sigmoid(-2.1)."""
    pc, pr = t(-70.0, grad=True), t(-11.0, grad=True)
    losses, rw, rl = dual_clip_loss(pc, pr, t(-100.0), t(-10.0), beta=0.1, margin_chosen=2.0, margin_rejected=1.0)
    assert abs(losses.item() - math.log1p(math.exp(-2.1))) < 1e-12
    assert abs(rw.item() - 3.0) < 1e-12 and abs(rl.item() + 0.1) < 1e-12
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    assert gc.item() == 0.0
    assert abs(gr.item() - 0.1 / (1 + math.exp(2.1))) < 1e-12


def test_dual_clip_both_sides_clipped_is_constant():
    """Both clamps active: loss = -log sigmoid(m_pos + m_neg) = log(1 + e^-3) with m_pos = 2, m_neg = 1, and
    no gradient reaches either log-prob; the rewards stay unclipped (3 and -5)."""
    pc, pr = t(-70.0, grad=True), t(-60.0, grad=True)
    losses, rw, rl = dual_clip_loss(pc, pr, t(-100.0), t(-10.0), beta=0.1, margin_chosen=2.0, margin_rejected=1.0)
    assert abs(losses.item() - math.log1p(math.exp(-3.0))) < 1e-12
    assert abs(rw.item() - 3.0) < 1e-12 and abs(rl.item() + 5.0) < 1e-12
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    assert gc.item() == 0.0 and gr.item() == 0.0


# ----------------------------------------------------------------------------------------------- SFT NLL


def test_sft_nll_hand_values():
    """-logp / n: -(-6) / 3 = 2.0; -(-2.5) / 5 = 0.5; a zero length is clamped to 1: -(-3) / 1 = 3.0."""
    out = sft_nll(t(-6.0, -2.5, -3.0), torch.tensor([3.0, 5.0, 0.0], dtype=D))
    assert torch.allclose(out, t(2.0, 0.5, 3.0), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------- purity / batching

ALL = [
    ("dpo", {"beta": 0.1}),
    ("cdpo", {"beta": 0.1, "label_smoothing": 0.2}),
    ("ipo", {"beta": 0.1}),
    ("hinge", {"beta": 0.1}),
    ("dual_clip", {"beta": 0.5, "margin_chosen": 2.0, "margin_rejected": 1.0}),
]


def _random_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [-30 * torch.rand(n, generator=g, dtype=D) for _ in range(4)]


@pytest.mark.parametrize(("name", "params"), ALL, ids=[a for a, _ in ALL])
def test_batch_split_invariance(name, params):
    """mean over 8 = (3 * mean(first 3) + 5 * mean(last 5)) / 8 = (4 * mean(first 4) + 4 * mean(last 4)) / 8."""
    loss = bind(name, **params)
    x = _random_batch(8, seed=3)
    full, rw, rl = loss(*x)
    assert full.shape == rw.shape == rl.shape == (8,)
    for k in (3, 4):
        a, _, _ = loss(*(v[:k] for v in x))
        b, _, _ = loss(*(v[k:] for v in x))
        assert torch.allclose(full.mean(), (k * a.mean() + (8 - k) * b.mean()) / 8, atol=1e-12, rtol=0)
        assert torch.allclose(full, torch.cat([a, b]), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("name", "params"), ALL, ids=[a for a, _ in ALL])
def test_losses_are_per_example(name, params):
    """Changing every input of example 3 changes losses[3] (and its rewards) and nothing else."""
    loss = bind(name, **params)
    x = _random_batch(8, seed=4)
    before = loss(*x)
    y = [v.clone() for v in x]
    y[0][3] += 1.5  # policy chosen up, policy rejected down: every loss here moves
    y[1][3] -= 2.0
    y[2][3] -= 0.25
    after = loss(*y)
    others = [i for i in range(8) if i != 3]
    for u, v in zip(before, after):
        assert torch.equal(u[others], v[others])
    assert before[1][3] != after[1][3] and before[2][3] != after[2][3]
    if name != "hinge" or before[0][3] > 0 or after[0][3] > 0:
        assert before[0][3] != after[0][3]


def test_registry_and_bind():
    assert set(LOSSES) == {"dpo", "cdpo", "ipo", "hinge", "dual_clip"}
    x = _random_batch(4, seed=5)
    assert torch.equal(bind("ipo", beta=0.3)(*x)[0], ipo_loss(*x, beta=0.3)[0])


# ------------------------------------------------------------------------------- pair log-probs: layouts

LAYOUT_PAIRS = [
    # chosen much longer than rejected
    {"prompt": [{"role": "user", "content": "Describe a cat."}],
     "chosen": "A cat is a small carnivorous mammal with soft fur, whiskers and retractable claws; it purrs.",
     "rejected": "No."},
    # rejected much longer than chosen
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": "4",
     "rejected": "Let me think about it for a long while: two plus two, carrying nothing, is probably five."},
    # multi-turn prompt with a system turn
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}],
     "chosen": "Green.", "rejected": "Blue again, obviously."},
    # similar lengths
    {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "Hi there!", "rejected": "Go away."},
    # non-ASCII (several byte tokens per character)
    {"prompt": [{"role": "user", "content": "Translate 'thanks' to Japanese."}],
     "chosen": "ありがとう", "rejected": "merci"},
    # long prompt, equal-length responses
    {"prompt": [{"role": "user", "content": "Repeat after me: " + "la " * 20}],
     "chosen": "la la la", "rejected": "no no no"},
]


@pytest.fixture(scope="module")
def layout_examples(tiny_tokenizer):
    pairs = [Pair(id=f"p{i}", **p) for i, p in enumerate(LAYOUT_PAIRS)]
    counts = Counter()
    ex = tokenise_pairs(pairs, tiny_tokenizer, max_length=512, counts=counts, max_drop_fraction=0.0)
    assert len(ex) == len(pairs) and counts["responses_truncated"] == 0
    return ex


def _naive_logps(model, ex: dict) -> tuple[float, float]:
    """One pair at a time: full log_softmax over model(prompt + response).logits, gathered at the response."""
    out = []
    P = ex.prompt_length
    for resp in (ex.chosen_ids, ex.rejected_ids):
        ids = torch.tensor([ex.prompt_ids + resp])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        out.append(sum(float(logp[P - 1 + j, tok]) for j, tok in enumerate(resp)))
    return out[0], out[1]


def test_shared_equals_separate_equals_naive(tiny_model, tiny_tokenizer, layout_examples):
    """Per token (sum / length), the shared layout, the separate layout and the naive per-pair computation
    agree within 1e-5; lengths count the response tokens including the end token."""
    model = tiny_model.eval()
    pad = tiny_tokenizer.pad_token_id
    lens_c = torch.tensor([len(e.chosen_ids) for e in layout_examples], dtype=torch.float32)
    lens_r = torch.tensor([len(e.rejected_ids) for e in layout_examples], dtype=torch.float32)
    assert (lens_c[0] > 5 * lens_r[0]) and (lens_r[1] > 5 * lens_c[1])
    with torch.no_grad():
        shared = pair_logps(model, collate_pairs(layout_examples, pad, "shared"))
        separate = pair_logps(model, collate_pairs(layout_examples, pad, "separate"))
        shared_n = pair_logps(model, collate_pairs(layout_examples, pad, "shared"), length_normalize=True)
        naive = torch.tensor([_naive_logps(model, e) for e in layout_examples], dtype=torch.float64)
    for out in (shared, separate, shared_n):
        assert torch.equal(out[2], lens_c) and torch.equal(out[3], lens_r)
    for seg, lens in ((0, lens_c), (1, lens_r)):
        s, p = shared[seg].double() / lens, separate[seg].double() / lens
        n = naive[:, seg] / lens
        assert (s - p).abs().max() < 1e-5, (s - p).abs().max()
        assert (s - n).abs().max() < 1e-5, (s - n).abs().max()
        assert (p - n).abs().max() < 1e-5, (p - n).abs().max()
        assert (shared_n[seg].double() - s).abs().max() < 1e-6
    # random weights: a token log-prob is about -log(vocab) = -5.55, so the sums are far from zero
    assert bool((shared[0] < -1).all())


def test_shared_layout_ignores_rejected_for_chosen(tiny_model, tiny_tokenizer, layout_examples):
    """The chosen log-prob in the shared row does not depend on the rejected tokens (nor the reverse)."""
    model = tiny_model.eval()
    pad = tiny_tokenizer.pad_token_id
    ex = layout_examples[0]
    other = dataclasses.replace(ex, rejected_ids=layout_examples[1].rejected_ids)
    with torch.no_grad():
        a = pair_logps(model, collate_pairs([ex], pad, "shared"))
        b = pair_logps(model, collate_pairs([other], pad, "shared"))
    assert abs(float(a[0][0] - b[0][0])) < 1e-5 * len(ex.chosen_ids)
    assert abs(float(a[1][0] - b[1][0])) > 1e-3


def test_layout_gradients_agree(tiny_model, tiny_tokenizer, layout_examples):
    """d/dtheta sum_pairs (log pi(y_w) - log pi(y_l)) agrees between layouts: ||g_s - g_p|| <= 1e-5 ||g_p||
    overall and per parameter tensor (plus a small absolute floor for near-zero tensors)."""
    model = tiny_model.eval()
    pad = tiny_tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for layout in ("shared", "separate"):
        c, r, _, _ = pair_logps(model, collate_pairs(layout_examples, pad, layout))
        grads[layout] = torch.autograd.grad((c - r).sum(), params)
    gs = torch.cat([g.flatten() for g in grads["shared"]]).double()
    gp = torch.cat([g.flatten() for g in grads["separate"]]).double()
    assert gp.norm() > 1.0
    assert (gs - gp).norm() <= 1e-5 * gp.norm(), float((gs - gp).norm() / gp.norm())
    for a, b in zip(grads["shared"], grads["separate"]):
        a, b = a.double(), b.double()
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-6, float((a - b).norm() / b.norm())


def test_pair_logps_dpo_end_to_end(tiny_model, tiny_tokenizer, layout_examples):
    """The DPO loss on model log-probs with the model as its own reference is log 2 for every pair."""
    model = tiny_model.eval()
    with torch.no_grad():
        c, r, _, _ = pair_logps(model, collate_pairs(layout_examples, tiny_tokenizer.pad_token_id))
    losses, rw, rl = dpo_loss(c, r, c.clone(), r.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert float(rw.abs().max()) == 0.0 and float(rl.abs().max()) == 0.0


def test_token_logps_values_and_gradient_match_log_softmax():
    """token_logps (chunked log-sum-exp, in-place backward) equals log_softmax gathered at (src, tgt), values
    and logits gradient, in float64: 130 rows (3 chunks of 64), row 5 predicts two targets (the shared layout's
    last prompt position), row 7 none; an uneven upstream gradient. Backward twice is an error, not a silent
    wrong answer (the logits were overwritten)."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(130, 50, generator=g, dtype=torch.float64)).requires_grad_()
    src = torch.tensor([5, 5, 0, 64, 129, 100, 3])
    tgt = torch.tensor([1, 2, 49, 0, 7, 7, 3])
    up = torch.tensor([0.5, -1.0, 2.0, 1.0, -0.25, 3.0, 1.5], dtype=torch.float64)
    expected = torch.log_softmax(logits, dim=-1)[src, tgt]
    (ref_grad,) = torch.autograd.grad((expected * up).sum(), logits)
    work = logits.detach().clone().requires_grad_()
    mid = work * 1.0  # the backward overwrites its input: give it a non-leaf, as the LM head's output is
    got = token_logps(mid, src, tgt)
    assert (got - expected).abs().max() < 1e-12
    (got * up).sum().backward(retain_graph=True)
    assert (work.grad - ref_grad).abs().max() < 1e-12
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (got * up).sum().backward()
    with torch.no_grad():
        assert (token_logps(logits, src, tgt) - expected).abs().max() < 1e-12
