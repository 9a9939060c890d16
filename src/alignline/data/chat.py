"""Chat rendering and tokenisation, in one place.

Label masks are built here, once, at tokenisation: for every assistant turn we render the conversation up
to that turn with the generation prompt (the *prefix*) and up to the end of the turn (the *prefix+response*)
and require that the prefix's tokens are exactly a prefix of the prefix+response tokens. If a chat template
or tokenizer breaks that (templates that rewrite earlier turns, merges across the boundary), masks would be
silently wrong, so it is a hard :class:`PrefixMismatchError`.

The trained span of a turn is the assistant's text plus its end-of-turn token; anything the template adds
after the end token (e.g. ChatML's trailing newline) is not trained.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from alignline.data.records import Conversation, Message, Prompt
from alignline.errors import AlignlineError

IGNORE = -100

#: Used for base models whose tokenizer has no chat template (e.g. Gemma 3 270M base). Plain-text role
#: headers after the tokenizer's BOS token (texts are encoded without added special tokens, and Gemma
#: without its BOS produces garbage); assistant turns end with the EOS token, so a trained model stops
#: after its turn.
#: Other turns do not: an EOS inside the prompt makes a base model restart rather than answer (Gemma 3
#: 270M then only repeats "### Assistant:"). An untrained base model does not emit EOS at its turn's end:
#: sample it with a stop string such as "\n### " (the next role header).
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


class PrefixMismatchError(AlignlineError):
    """The tokenised prompt is not a prefix of the tokenised prompt + response."""


def ensure_chat_template(tokenizer) -> bool:
    """Give ``tokenizer`` the fallback template if it has none; returns True when the fallback was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def _dicts(messages: list[Message] | list[dict]) -> list[dict]:
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


def render(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        _dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode(tokenizer, text: str) -> list[int]:
    # The template already carries any BOS/special tokens it wants.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, messages) -> list[int]:
    """Token ids of a prompt rendered with the generation prompt (what a sampler feeds the model)."""
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def _mismatch(where: str, prefix: list[int], full: list[int], tokenizer) -> PrefixMismatchError:
    i = next((k for k, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
    a = tokenizer.decode(prefix[max(0, i - 3): i + 3])
    b = tokenizer.decode(full[max(0, i - 3): i + 3])
    return PrefixMismatchError(
        f"{where}: the tokenised prompt is not a prefix of prompt + response (first difference at token {i}: "
        f"prompt has {a!r}, prompt + response has {b!r}). The chat template or tokenizer changes earlier "
        "tokens when a response is appended, so label masks would be wrong; use a template that renders "
        "earlier turns unchanged (or the fallback template: chat_template=fallback)."
    )


def _trim_after_eos(span_ids: list[int], eos_ids: set[int]) -> int:
    """Length of the span up to and including its last end-of-turn token (the whole span if none)."""
    for k in range(len(span_ids) - 1, -1, -1):
        if span_ids[k] in eos_ids:
            return k + 1
    return len(span_ids)


def end_token_ids(tokenizer) -> set[int]:
    ids = set()
    for tok in (tokenizer.eos_token, "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        if tok is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass
class Tokenised:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained
    source_id: str = ""
    truncated: bool = False
    """Only a prefix of the conversation was tokenised (``max_tokens``): positions up to that many tokens are those
    of the whole conversation, later ones are not."""

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def tokenise_conversation(
    tokenizer, messages, *, train_on: Literal["all", "last"] = "all", where: str = "conversation",
    eos_ids: set[int] | None = None, max_tokens: int | None = None,
) -> Tokenised:
    """Token ids and labels of a conversation ending in an assistant turn.

    ``train_on="all"`` trains every assistant turn, ``"last"`` only the final one (rejection sampling).
    ``max_tokens``: only the first that many tokens are wanted (truncation), so only a prefix of the text is
    tokenised: the messages are cut after a character budget (4 characters a token, plus a margin) that grows
    until the prefix yields ``max_tokens`` + :data:`PREFIX_MARGIN` tokens. The work is bounded by ``max_tokens``,
    not by the record's size, and the first ``max_tokens`` positions are those of the whole conversation.
    """
    msgs = _dicts(messages)
    eos_ids = end_token_ids(tokenizer) if eos_ids is None else eos_ids
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    if max_tokens is None:
        return _tokenise_turns(tokenizer, msgs, turns, where, eos_ids)
    budget = 4 * (max_tokens + PREFIX_MARGIN) + 256
    while True:
        cut = _cut_messages(msgs, budget)
        ex = _tokenise_turns(tokenizer, cut, [i for i in turns if i < len(cut)], where, eos_ids)
        if cut is msgs or len(ex.input_ids) >= max_tokens + PREFIX_MARGIN:
            ex.truncated = cut is not msgs
            return ex
        budget *= 4


PREFIX_MARGIN = 32
"""Tokens past ``max_tokens`` that a cut prefix must also yield: the tokens at the cut (a word cut in two, the
template's end of the cut turn) differ from the whole conversation's."""


def _cut_messages(msgs: list[dict], budget: int) -> list[dict]:
    """``msgs`` itself when their contents hold at most ``budget`` characters; else the messages up to that many
    characters (the message that crosses it cut, the later ones left out)."""
    used = 0
    for k, m in enumerate(msgs):
        if used + len(m["content"]) > budget:
            return [*msgs[:k], {**m, "content": m["content"][: budget - used]}]
        used += len(m["content"])
    return msgs


def _tokenise_turns(tokenizer, msgs: list[dict], turns: list[int], where: str, eos_ids: set[int]) -> Tokenised:
    full = encode(tokenizer, render(tokenizer, msgs, add_generation_prompt=False))
    labels = [IGNORE] * len(full)
    for i in turns:
        prefix = encode(tokenizer, render(tokenizer, msgs[:i], add_generation_prompt=True))
        upto = encode(tokenizer, render(tokenizer, msgs[: i + 1], add_generation_prompt=False))
        if upto[: len(prefix)] != prefix:
            raise _mismatch(f"{where}, turn {i}", prefix, upto, tokenizer)
        if full[: len(upto)] != upto:
            raise _mismatch(f"{where}, turn {i} (within the whole conversation)", upto, full, tokenizer)
        end = len(prefix) + _trim_after_eos(upto[len(prefix):], eos_ids)
        labels[len(prefix): end] = full[len(prefix): end]
    return Tokenised(full, labels)


def tokenise_prompt_response(tokenizer, prompt_messages, response: str, *, where: str = "pair",
                             eos_ids: set[int] | None = None, keep_tail: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids incl. its end token) with the prefix property checked (DPO / RM).

    ``keep_tail`` keeps what the template writes after the end token (ChatML's newline): reward models read
    their score at the last token, and a final token that is not the pad token keeps that position the
    same under ``AutoModelForSequenceClassification``'s last-non-pad pooling.
    """
    eos_ids = end_token_ids(tokenizer) if eos_ids is None else eos_ids
    msgs = _dicts(prompt_messages)
    prefix = encode(tokenizer, render(tokenizer, msgs, add_generation_prompt=True))
    full = encode(tokenizer, render(tokenizer, [*msgs, {"role": "assistant", "content": response}],
                                    add_generation_prompt=False))
    if full[: len(prefix)] != prefix:
        raise _mismatch(where, prefix, full, tokenizer)
    resp = full[len(prefix):]
    return prefix, (resp if keep_tail else resp[: _trim_after_eos(resp, eos_ids)])


def fit_to_length(
    ex: Tokenised, max_length: int, mode: Literal["blocks", "truncate"], stats: Counter
) -> list[Tokenised]:
    """Cut an example to ``max_length`` tokens.

    ``blocks`` (Xwin SFT: long conversations are cut into parts of at most ``max_length``) returns
    consecutive blocks; ``truncate`` keeps the first block. A block with no trained token is dropped and
    counted in ``stats["dropped_no_response_after_truncation"]``; truncation never yields an empty response.
    """
    if len(ex.input_ids) <= max_length:
        return [ex]
    stats["over_length"] += 1
    starts = range(0, len(ex.input_ids), max_length) if mode == "blocks" else [0]
    out = []
    for s in starts:
        block = Tokenised(ex.input_ids[s: s + max_length], ex.labels[s: s + max_length], ex.source_id)
        # Position 0 of a block is never predicted (no left context within the block).
        if block.labels and block.labels[0] != IGNORE:
            block.labels[0] = IGNORE
        if block.n_trained == 0:
            stats["dropped_no_response_after_truncation"] += 1
            continue
        out.append(block)
    return out


def unfold(
    conv: Conversation, tokenizer=None, *, max_tokens: int = 4096, stats: Counter | None = None,
) -> list[Prompt]:
    """One Prompt per assistant turn: history + that user turn, the original answer kept as ``reference``.

    With a tokenizer, history is shortened from the oldest turns (the system turn is kept) until the
    rendered prompt plus the reference fits ``max_tokens``; an instance whose last user turn alone does
    not fit is dropped and counted (``stats["unfold_dropped_too_long"]``).
    """
    stats = Counter() if stats is None else stats
    msgs = list(conv.messages)
    out = []
    k = 0
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            continue
        history = msgs[:i]
        if tokenizer is not None:
            system = [history[0]] if history[0].role == "system" else []
            body = history[len(system):]
            while True:
                n = len(prompt_ids(tokenizer, system + body)) + len(encode(tokenizer, m.content))
                if n <= max_tokens or len(body) <= 1:
                    break
                body = body[2:]  # drop the oldest user/assistant exchange
                stats["unfold_history_shortened"] += 1
            history = system + body
            if n > max_tokens:
                stats["unfold_dropped_too_long"] += 1
                k += 1
                continue
        out.append(Prompt(
            id=f"{conv.id}#{k}", messages=history, reference=m.content,
            meta={**conv.meta, "conversation_id": conv.id, "turn": k},
        ))
        stats["unfolded_instances"] += 1
        k += 1
    return out
