"""Parity with TRL 1.16's ``DPOTrainer``: on the same model, reference, data and first batch, our DPO, IPO
and hinge losses equal TRL's ``loss_type="sigmoid"``, ``"ipo"`` and ``"hinge"`` within 1e-4.

What TRL 1.16 does (``trl/trainer/dpo_trainer.py``):

* tokenisation (``DPOTrainer._prepare_dataset``): a *conversational* example is tokenised three times with the
  chat template: ``prompt`` with ``add_generation_prompt=True``, ``prompt + chosen`` and ``prompt + rejected``
  without it; the completion is everything after the common prefix. With ChatML this completion is
  ``response + "<|im_end|>" + "\\n"``: TRL trains on the newline the template writes after the end token,
  alignline (``tokenise_prompt_response``) stops at ``<|im_end|>``. A *standard* (plain-text) example
  gets ``eos_token`` appended to chosen/rejected, and ``prompt`` / ``prompt + completion`` are tokenised with
  ``tokenizer(text)``: given the prompt rendered by the same template, that is token-for-token ours.
* batch (``DataCollatorForPreference``): rows ``[prompt + chosen ..., prompt + rejected ...]``, right padded,
  ``completion_mask`` marking the completion tokens.
* log-probs: a fused LM head returns per-token log-probs of the completion tokens; sequences are **summed**
  (``ld_alpha=None``), for the policy and the reference model (``ref_model`` given, no precompute).
* losses with ``h = (pc - rc) - (pr - rr)``: ``sigmoid`` ``-logsigmoid(beta h)``; ``hinge``
  ``relu(1 - beta h)``; ``ipo`` ``(h_avg - 1 / (2 beta))^2`` where ``h_avg`` divides each side's summed log-ratio
  by its number of completion tokens, i.e. ours with ``length_normalize=True``. The batch loss is the mean.

TRL exposes no stand-alone loss function (the formulas are inline in ``DPOTrainer._compute_loss``), so the
comparison goes through ``trainer.compute_loss(model, first_batch)``; per-sequence log-probs are read with
``trainer.compute_ref_log_probs(model, batch)``, which runs any fused-head model on a batch.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from alignline.data.chat import render
from alignline.data.records import Pair
from alignline.losses import dpo_loss, hinge_loss, ipo_loss
from alignline.train.pairs import TokenisedPair, collate_pairs, pair_logps, tokenise_pairs

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

BETA = 0.1
TOL = 1e-4
NEWLINE = 12  # "\n" in the byte-level tiny tokenizer (2 specials + byte 10)

PAIRS = [
    {"prompt": [{"role": "user", "content": "Describe a cat."}],
     "chosen": "A cat is a small carnivorous mammal with soft fur and retractable claws.",
     "rejected": "No."},
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": "4",
     "rejected": "Let me think about it for a long while: two plus two is probably five."},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}],
     "chosen": "Green.", "rejected": "Blue again, obviously."},
    {"prompt": [{"role": "user", "content": "Say hi in Japanese."}], "chosen": "こんにちは", "rejected": "hello"},
]

OURS = {"sigmoid": (dpo_loss, False), "ipo": (ipo_loss, True), "hinge": (hinge_loss, False)}


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(policy, reference): the tiny model, and a copy with N(0, 0.02^2) noise on every weight, so that the
    log-ratios are not zero and the losses not trivially log 2 / 1 / 25."""
    from alignline.models import load_causal_lm

    policy = load_causal_lm(tiny_model_dir, dtype="float32").eval()
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return policy, ref


@pytest.fixture(scope="module")
def our_examples(tiny_tokenizer):
    pairs = [Pair(id=f"p{i}", **p) for i, p in enumerate(PAIRS)]
    return tokenise_pairs(pairs, tiny_tokenizer, max_length=1024, counts=Counter(),
                          max_drop_fraction=0.0)


def conversational_rows():
    return [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]


def standard_rows(tokenizer):
    """Plain-text rows: the prompt rendered by the chat template (with the generation prompt), the raw
    responses; TRL appends the eos token ``<|im_end|>`` to each response."""
    return [{"prompt": render(tokenizer, p["prompt"], add_generation_prompt=True), "chosen": p["chosen"],
             "rejected": p["rejected"]} for p in PAIRS]


def make_trainer(policy, ref, tokenizer, rows, loss_type, out_dir):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=len(rows), max_length=1024, beta=BETA,
        loss_type=loss_type, precompute_ref_log_probs=False, report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, train_sampling_strategy="sequential", seed=0, save_strategy="no",
        logging_strategy="no", disable_dropout=True,
    )
    # fresh copies: DPOTrainer patches the models' forward with its fused LM head
    return DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)


def trl_examples(trainer) -> list[TokenisedPair]:
    ds = trainer.train_dataset
    return [TokenisedPair(id=str(i), prompt_ids=list(ds[i]["prompt_ids"]), chosen_ids=list(ds[i]["chosen_ids"]),
                          rejected_ids=list(ds[i]["rejected_ids"])) for i in range(len(ds))]


def first_batch(trainer, examples):
    """The first batch of TRL's train dataloader; checks it holds ``examples`` in order."""
    batch = next(iter(trainer.get_train_dataloader()))
    n = len(examples)
    assert batch["input_ids"].shape[0] == 2 * n
    for i, ex in enumerate(examples):
        for row, resp in ((i, ex.chosen_ids), (n + i, ex.rejected_ids)):
            ids = ex.prompt_ids + resp
            assert batch["input_ids"][row, : len(ids)].tolist() == ids
            assert batch["completion_mask"][row].sum().item() == len(resp)
    return batch


def our_side(policy, ref, examples, pad_id, loss_type, layout="shared", grads=True):
    """(mean loss, policy grads, (pc, pr, rc, rr) summed logps) with our collate / pair_logps / loss."""
    loss_fn, normalize = OURS[loss_type]
    batch = collate_pairs(examples, pad_id, layout)
    pc, pr, nc, nr = pair_logps(policy, batch)
    with torch.no_grad():
        rc, rr, _, _ = pair_logps(ref, batch)
    if normalize:
        losses, _, _ = loss_fn(pc / nc, pr / nr, rc / nc, rr / nr, beta=BETA)
        # the stage's own path: length_normalize=True in pair_logps gives the same
        with torch.no_grad():
            qc, qr, _, _ = pair_logps(policy, batch, length_normalize=True)
            sc, sr, _, _ = pair_logps(ref, batch, length_normalize=True)
            alt, _, _ = loss_fn(qc, qr, sc, sr, beta=BETA)
        assert abs(alt.mean().item() - losses.mean().item()) < 1e-6
    else:
        losses, _, _ = loss_fn(pc, pr, rc, rr, beta=BETA)
    loss = losses.mean()
    g = torch.autograd.grad(loss, list(policy.parameters())) if grads else None
    return loss.item(), g, tuple(x.detach().double() for x in (pc, pr, rc, rr))


def trl_side(trainer, batch, grads=True):
    """(TRL's loss on the batch, its policy grads, (pc, pr, rc, rr) summed logps per sequence)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    pc, pr = trainer.compute_ref_log_probs(model, batch)
    rc, rr = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    return loss.item(), grads, tuple(x.double() for x in (pc, pr, rc, rr))


def _grad_rel_diff(a, b) -> float:
    fa = torch.cat([g.flatten() for g in a]).double()
    fb = torch.cat([g.flatten() for g in b]).double()
    return float((fa - fb).norm() / fb.norm())


# --------------------------------------------------------------------------------------------- tokenisation


def test_tokenisation_conversational_differs_by_trailing_newline(models, tiny_tokenizer, our_examples, tmp_path):
    """Conversational data: TRL's prompt ids equal ours; its completions are ours + ``"\\n"`` (the newline
    ChatML writes after ``<|im_end|>``, which TRL keeps in the completion and trains on)."""
    trainer = make_trainer(*models, tiny_tokenizer, conversational_rows(), "sigmoid", tmp_path)
    theirs = trl_examples(trainer)
    eos = tiny_tokenizer.eos_token_id
    for a, b in zip(our_examples, theirs, strict=True):
        assert b.prompt_ids == a.prompt_ids
        assert a.chosen_ids[-1] == eos and a.rejected_ids[-1] == eos
        assert b.chosen_ids == a.chosen_ids + [NEWLINE]
        assert b.rejected_ids == a.rejected_ids + [NEWLINE]
    assert tiny_tokenizer.decode([NEWLINE]) == "\n"
    # so TRL's summed log-probs are ours plus the log-prob of "\n" after "<|im_end|>" (policy and reference)
    policy, ref = models
    _, _, lp_trl = trl_side(trainer, first_batch(trainer, theirs), grads=False)
    _, _, lp_own = our_side(policy, ref, our_examples, tiny_tokenizer.pad_token_id, "sigmoid", grads=False)
    with torch.no_grad():
        for k, model in enumerate((policy, policy, ref, ref)):
            resps = [e.chosen_ids if k % 2 == 0 else e.rejected_ids for e in our_examples]
            nl = torch.stack([torch.log_softmax(model(input_ids=torch.tensor([e.prompt_ids + r])).logits[0, -1]
                                                .double(), -1)[NEWLINE] for e, r in zip(our_examples, resps)])
            assert torch.allclose(lp_trl[k] - lp_own[k], nl, atol=TOL, rtol=0), k


def test_tokenisation_standard_format_identical(models, tiny_tokenizer, our_examples, tmp_path):
    """Plain-text data with the template-rendered prompt: TRL's ids are exactly ours."""
    trainer = make_trainer(*models, tiny_tokenizer, standard_rows(tiny_tokenizer), "sigmoid", tmp_path)
    def token_ids(examples):
        return [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in examples]

    assert token_ids(trl_examples(trainer)) == token_ids(our_examples)


# -------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_parity_identical_tokens(models, tiny_tokenizer, our_examples, tmp_path, loss_type):
    """End to end on identical tokens (plain-text rows): TRL's first-batch loss and its policy gradient
    equal ours (our tokenisation, shared layout, our loss; the separate layout too for sigmoid) within 1e-4;
    per-sequence log-probs of the policy and the reference agree within 1e-4 per token."""
    policy, ref = models
    trainer = make_trainer(policy, ref, tiny_tokenizer, standard_rows(tiny_tokenizer), loss_type, tmp_path)
    batch = first_batch(trainer, our_examples)
    theirs, g_theirs, lp_theirs = trl_side(trainer, batch)
    for layout in ("shared", "separate") if loss_type == "sigmoid" else ("shared",):
        ours, g_ours, lp_ours = our_side(policy, ref, our_examples, tiny_tokenizer.pad_token_id, loss_type, layout)
        assert abs(ours - theirs) < TOL, (layout, ours, theirs)
        assert _grad_rel_diff(g_ours, g_theirs) < TOL, layout
        lens = torch.tensor([[len(e.chosen_ids), len(e.rejected_ids)] for e in our_examples], dtype=torch.float64)
        for k in range(4):
            per_tok = (lp_ours[k] - lp_theirs[k]).abs() / lens[:, k % 2]
            assert float(per_tok.max()) < TOL, (layout, k, per_tok)
    # not a trivial case: the reference differs from the policy, and the hinge is not saturated
    h = (lp_theirs[0] - lp_theirs[2]) - (lp_theirs[1] - lp_theirs[3])
    assert float(h.abs().max()) > 0.5
    assert bool((BETA * h < 1).all())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_parity_conversational(models, tiny_tokenizer, our_examples, tmp_path, loss_type):
    """Conversational rows (TRL's own tokenisation, completions ending ``<|im_end|>\\n``): our loss computed
    on TRL's token ids equals TRL's within 1e-4 (on our own tokenisation the losses differ, see
    :func:`test_tokenisation_conversational_differs_by_trailing_newline`)."""
    policy, ref = models
    trainer = make_trainer(policy, ref, tiny_tokenizer, conversational_rows(), loss_type, tmp_path)
    theirs_ex = trl_examples(trainer)
    batch = first_batch(trainer, theirs_ex)
    theirs, g_theirs, lp_theirs = trl_side(trainer, batch)
    ours, g_ours, lp_ours = our_side(policy, ref, theirs_ex, tiny_tokenizer.pad_token_id, loss_type)
    assert abs(ours - theirs) < TOL, (ours, theirs)
    assert _grad_rel_diff(g_ours, g_theirs) < TOL
    lens = torch.tensor([[len(e.chosen_ids), len(e.rejected_ids)] for e in theirs_ex], dtype=torch.float64)
    for k in range(4):
        assert float(((lp_ours[k] - lp_theirs[k]).abs() / lens[:, k % 2]).max()) < TOL, k
    # with our own tokenisation (no trailing "\n") the loss is measurably different from TRL's
    own, _, _ = our_side(policy, ref, our_examples, tiny_tokenizer.pad_token_id, loss_type, grads=False)
    assert abs(own - theirs) > 10 * TOL, (own, theirs)
