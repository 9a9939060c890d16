"""Reward-model scoring: pairs for training, and many responses of one prompt with the prompt computed once.

The score of ``prompt + response`` is the linear head applied to the backbone's hidden state at the last
token of the sequence (the template's tail after the end-of-turn token included; see
``tokenise_prompt_response(keep_tail=True)``), which is where ``AutoModelForSequenceClassification``
reads it too, so a saved reward model scores the same under plain transformers.

:func:`score_responses` runs the prompt once, keeps its key/value cache, and scores the responses in
chunks that reuse that cache (copied per chunk), instead of recomputing the prompt for every response.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from alignline.data.chat import ensure_chat_template, tokenise_prompt_response
from alignline.generate.hf_generic import cache_keyword, cache_of
from alignline.models.heads import backbone_of, score_head
from alignline.train.pairs import model_inputs, padded_width

if TYPE_CHECKING:
    from alignline.telemetry import Telemetry


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) for a batch from ``collate_pairs`` (either layout)."""
    hidden = backbone_of(model)(**model_inputs(model, padded_width(batch)), use_cache=False).last_hidden_state
    ends = batch["ends"]
    h_c = hidden[ends[:, 0], ends[:, 1]]
    h_r = hidden[ends[:, 2], ends[:, 3]]
    head = score_head(model)
    return head(h_c).squeeze(-1).float(), head(h_r).squeeze(-1).float()


@torch.no_grad()
def score_responses(model, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]], *, pad_id: int,
                    chunk: int = 16) -> list[float]:
    """Scores of ``prompt + response`` for every response, the prompt's forward pass done once."""
    device = next(model.parameters()).device
    backbone, head = backbone_of(model), score_head(model)
    P = len(prompt_ids)
    prompt = torch.tensor([list(prompt_ids)], device=device)
    keyword = cache_keyword(backbone)
    base_cache = cache_of(backbone(input_ids=prompt, use_cache=True))
    scores: list[float] = []
    for s in range(0, len(responses), chunk):
        group = responses[s: s + chunk]
        n, width = len(group), max(len(r) for r in group)
        ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, P + width), dtype=torch.long, device=device)
        mask[:, :P] = 1
        for i, r in enumerate(group):
            ids[i, : len(r)] = torch.tensor(list(r), device=device)
            mask[i, P: P + len(r)] = 1
        cache = copy.deepcopy(base_cache)
        cache.batch_repeat_interleave(n)
        pos = torch.arange(P, P + width, device=device).unsqueeze(0).expand(n, -1)
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                          **{keyword: cache}).last_hidden_state
        last = torch.tensor([len(r) - 1 for r in group], device=device)
        scores.extend(head(hidden[torch.arange(n, device=device), last]).squeeze(-1).float().tolist())
    return scores


@torch.no_grad()
def score_plain(model, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]], *, pad_id: int,
                batch_size: int = 8) -> list[float]:
    """The reference path: every ``prompt + response`` as its own right-padded row (prompt recomputed)."""
    device = next(model.parameters()).device
    backbone, head = backbone_of(model), score_head(model)
    seqs = [list(prompt_ids) + list(r) for r in responses]
    out: list[float] = []
    for s in range(0, len(seqs), batch_size):
        group = seqs[s: s + batch_size]
        width = max(len(x) for x in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(group):
            ids[i, : len(x)] = torch.tensor(x, device=device)
            mask[i, : len(x)] = 1
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = torch.tensor([len(x) - 1 for x in group], device=device)
        out.extend(head(hidden[torch.arange(len(group), device=device), last]).squeeze(-1).float().tolist())
    return out


@dataclass
class RewardModelJudge:
    """A reward model with its tokenizer, as ``score``, the rl reward ``rm`` and tso's regeneration all use it.

    :meth:`score` scores one prompt's responses with the prompt computed once (:func:`score_responses`), each
    ``prompt + response`` cut to ``max_length`` tokens: a response beyond it is cut (counted ``responses_cut``),
    a prompt that alone fills it is not scored (``None``, counted ``skipped_prompt_too_long``)."""

    model: Any
    tokenizer: Any
    max_length: int
    chunk: int = 16

    @classmethod
    def load(cls, path: str, *, device, dtype: str = "auto", trust_remote_code: bool = False, max_length: int,
             chunk: int = 16) -> RewardModelJudge:
        """The reward model at ``path`` on ``device``; ``dtype`` "auto" is the device's own
        (:func:`alignline.models.device.pick_dtype`)."""
        from alignline.models.loading import load_reward_model, load_tokenizer, resolve_model

        resolved = resolve_model(path)
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        ensure_chat_template(tokenizer)
        model = load_reward_model(resolved, dtype=dtype, device=device, trust_remote_code=trust_remote_code).eval()
        return cls(model, tokenizer, max_length, chunk)

    def tokenise(self, messages, texts: Sequence[str], wheres: Sequence[str], counts: Counter
                 ) -> tuple[list[int], list[list[int]]] | None:
        """(prompt ids, each response's ids cut to fit ``max_length``), or None when the prompt alone fills it."""
        ids = [tokenise_prompt_response(self.tokenizer, messages, t, keep_tail=True, where=w)
               for t, w in zip(texts, wheres, strict=True)]
        prompt_ids = ids[0][0]
        room = self.max_length - len(prompt_ids)
        if room < 1:
            counts["skipped_prompt_too_long"] += 1
            return None
        cut = sum(len(rid) > room for _, rid in ids)
        if cut:
            counts["responses_cut"] += cut
        return prompt_ids, [rid[:room] for _, rid in ids]

    def score(self, messages, texts: Sequence[str], wheres: Sequence[str], counts: Counter,
              tel: Telemetry | None = None) -> list[float] | None:
        """The score of every response of one prompt, or None when the prompt alone fills ``max_length``; the
        work is counted in ``tel`` when given."""
        tokenised = self.tokenise(messages, texts, wheres, counts)
        if tokenised is None:
            return None
        prompt_ids, response_ids = tokenised
        scores = score_responses(self.model, prompt_ids, response_ids, pad_id=self.tokenizer.pad_token_id,
                                 chunk=self.chunk)
        if tel is not None:  # the prompt is computed once; the scalar head reads each response's last token
            tel.count(tel.params_of(self.model), len(prompt_ids) + sum(map(len, response_ids)), len(response_ids),
                      grad=False)
        return scores
