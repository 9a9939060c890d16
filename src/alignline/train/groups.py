"""Groups of responses to one prompt as tensors, and their per-token log-probabilities (``alignline rl``).

**Prefix-shared layout** (default): one row holds ``prompt + r_1 + ... + r_k``. Every response's positions
continue from the end of the prompt, and a 4-D attention mask lets each response token see the prompt and
the earlier tokens of its own response only. The prompt is computed once for the whole group, and the first
token of every response is predicted from the last prompt position, so each response token gets exactly the
log-prob it would get in a separate ``prompt + response`` row. This generalises the pair rows of
:mod:`alignline.train.pairs` (``prompt + chosen + rejected``) to k responses and reuses its pieces: the
padded width, the 4-D additive mask and the chunked target log-probs.

**Separate layout**: one right-padded ``prompt + response`` row per response, a plain causal mask; the
reference the shared layout is tested against.

The LM head (or a critic's value head) runs only on the positions that predict a response token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from alignline.train.pairs import _ROWS, model_inputs, padded_width, row_tensors, token_logps

Layout = Literal["shared", "separate"]


def collate_groups(items: Sequence[dict], pad_id: int, layout: Layout = "shared") -> dict[str, torch.Tensor]:
    """Tensors for :func:`group_token_logps` from ``items``, each ``{"prompt": ids, "responses": [ids, ...]}``.

    Responses are numbered in order over all items (``seq``); every response token is a target:
    ``src`` (index into the kept positions that predicts it), ``tgt`` (the token), ``seq`` (its response).
    Shared layout: one row per item; separate layout: one row per response.
    """
    rows: list[tuple[list[int], list[int], list[tuple[int, int]]]] = []  # ids, positions, response blocks
    targets: list[tuple[int, int, int, int]] = []  # (row, predicting position, token, response index)
    s = 0
    for item in items:
        p = list(item["prompt"])
        P = len(p)
        if layout == "shared":
            ids, pos, blocks = list(p), list(range(P)), []
            for r in item["responses"]:
                start = len(ids)
                targets += [(len(rows), P - 1 if j == 0 else start + j - 1, t, s) for j, t in enumerate(r)]
                ids += list(r)
                pos += list(range(P, P + len(r)))
                blocks.append((start, len(ids)))
                s += 1
            rows.append((ids, pos, blocks))
        else:
            for r in item["responses"]:
                targets += [(len(rows), P - 1 + j, t, s) for j, t in enumerate(r)]
                rows.append((p + list(r), list(range(P + len(r))), []))
                s += 1
    batch, lengths = row_tensors([(ids, pos) for ids, pos, _ in rows], targets, pad_id)
    width = batch["input_ids"].shape[1]
    batch.update({
        "tgt": torch.tensor([t[2] for t in targets]), "seq": torch.tensor([t[3] for t in targets]),
        "n_seqs": torch.tensor(s), "n_tokens": lengths.sum(),
    })
    if layout == "shared":
        # causal, within the row, and a response's queries never see another response's keys
        idx = torch.arange(width)
        allowed = (idx[None, :] <= idx[:, None]).unsqueeze(0) & (idx[None, None, :] < lengths[:, None, None])
        for i, (_, _, blocks) in enumerate(rows):
            for a, (q0, q1) in enumerate(blocks):
                for b, (k0, k1) in enumerate(blocks):
                    if a != b:
                        allowed[i, q0:q1, k0:k1] = False
        allowed |= torch.eye(width, dtype=torch.bool).unsqueeze(0)  # padding rows attend to themselves
        batch["allowed"] = allowed.unsqueeze(1)
    else:
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return batch


@torch.no_grad()
def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of each row of [N, V] logits, ``_ROWS`` rows at a time; [N]."""
    out = []
    for s in range(0, logits.shape[0], _ROWS):
        chunk = logits[s: s + _ROWS]
        logp = torch.log_softmax(chunk, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


def group_token_logps(model, batch: dict[str, torch.Tensor], *, entropy: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-prob of every response token [T], its position's entropy [T] or None), in ``batch["seq"]`` order.

    ``entropy`` (no gradient) is read from the same logits before the log-prob backward reuses them."""
    padded = padded_width(batch)
    out = model(**model_inputs(model, padded), logits_to_keep=padded["keep"], use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    del out  # the backward overwrites the logits in place: nothing else may hold them
    ent = _entropy(logits.detach())[batch["src"]] if entropy else None
    return token_logps(logits, batch["src"], batch["tgt"]), ent


def group_token_values(critic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A critic's value of the state before every response token [T]: its scalar head (``score``) on the
    backbone's hidden state at the position that predicts the token."""
    from alignline.models.heads import backbone_of, score_head

    padded = padded_width(batch)
    hidden = backbone_of(critic)(**model_inputs(critic, padded), use_cache=False).last_hidden_state
    kept = hidden[padded["keep"]]
    return score_head(critic)(kept[batch["src"]]).squeeze(-1).float()


def per_sequence(values: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of per-token ``values`` [T] per response: [n]."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, seq, values)


@torch.no_grad()
def token_passes(policy, ref, critic, groups: list[dict], *, pad_id: int, batch: int, want_old: bool
                 ) -> dict[str, list[list[float]]]:
    """Per-response token lists from the no-grad passes over prefix-shared group rows: ``old_logps`` (the
    policy, if ``want_old``), ``ref_logps`` (if ``ref``), ``old_values`` (if ``critic``)."""
    models = {"old_logps": policy if want_old else None, "ref_logps": ref, "old_values": critic}
    out: dict[str, list[list[float]]] = {k: [] for k, m in models.items() if m is not None}
    for s in range(0, len(groups), batch):
        chunk = groups[s: s + batch]
        b = {k: v.to(policy.device) for k, v in collate_groups(chunk, pad_id).items()}
        lengths = [len(r) for g in chunk for r in g["responses"]]
        for key, m in models.items():
            if m is None:
                continue
            was = m.training
            m.eval()
            flat = group_token_values(m, b) if key == "old_values" else group_token_logps(m, b)[0]
            m.train(was)
            out[key] += [t.tolist() for t in flat.double().cpu().split(lengths)]
    return out
