from collections import Counter

import pytest
from tests.conftest import conversation

from alignline.data.chat import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE,
    PrefixMismatchError,
    Tokenised,
    fit_to_length,
    tokenise_conversation,
    tokenise_prompt_response,
    unfold,
)
from alignline.data.records import Conversation

MSGS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


def trained_spans(tok, ex: Tokenised) -> list[str]:
    """Decode each maximal run of trained tokens."""
    spans, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_golden_masks_all_turns(tiny_tokenizer):
    """The trained tokens decode to exactly each assistant text plus its end token, nothing else."""
    ex = tokenise_conversation(tiny_tokenizer, MSGS, train_on="all")
    assert trained_spans(tiny_tokenizer, ex) == ["Hello! How can I help?<|im_end|>", "Blue.<|im_end|>"]


def test_golden_masks_last_turn_only(tiny_tokenizer):
    ex = tokenise_conversation(tiny_tokenizer, MSGS, train_on="last")
    assert trained_spans(tiny_tokenizer, ex) == ["Blue.<|im_end|>"]


def test_fallback_template_masks(tiny_tokenizer):
    tok = tiny_tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
        ex = tokenise_conversation(tok, MSGS)
        eos = tok.eos_token
        assert trained_spans(tok, ex) == [f"Hello! How can I help?{eos}", f"Blue.{eos}"]
        text = tok.apply_chat_template(MSGS, tokenize=False)
        assert text.count(eos) == sum(m["role"] == "assistant" for m in MSGS)  # none after user/system turns
    finally:
        tok.chat_template = saved


def test_prefix_mismatch_is_a_hard_error(tiny_tokenizer):
    """A template that renders earlier assistant turns differently once more turns follow breaks the
    prefix property; that must raise, naming the place."""
    tok = tiny_tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
            "{{ '<|im_start|>assistant\n[elided]<|im_end|>\n' }}"
            "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        )
        with pytest.raises(PrefixMismatchError, match=r"conv-7, turn 2.*not a prefix"):
            tokenise_conversation(tok, MSGS, where="conv-7")
    finally:
        tok.chat_template = saved


def test_prompt_response_split(tiny_tokenizer):
    prompt, resp = tokenise_prompt_response(tiny_tokenizer, MSGS[:2], "Hey.")
    assert tiny_tokenizer.decode(resp) == "Hey.<|im_end|>"
    assert tiny_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_truncation_never_leaves_an_empty_response():
    """10 tokens, trained only at 7..9. Blocks of 4: [0..3] no target -> dropped, [4..7] target at 7 (its
    position 3), [8..9] position 0 is never a target, position 1 (=9) is -> kept."""
    ex = Tokenised(list(range(10)), [IGNORE] * 7 + [7, 8, 9])
    counts = Counter()
    blocks = fit_to_length(ex, 4, "blocks", counts)
    assert [b.input_ids for b in blocks] == [[4, 5, 6, 7], [8, 9]]
    assert blocks[1].labels == [IGNORE, 9]
    assert counts == Counter(over_length=1, dropped_no_response_after_truncation=1)
    counts = Counter()
    assert fit_to_length(ex, 4, "truncate", counts) == []
    assert counts["dropped_no_response_after_truncation"] == 1


def test_unfold_keeps_reference_and_history(tiny_tokenizer):
    conv = Conversation.model_validate(conversation(3, turns=3, system=True))
    prompts = unfold(conv, tiny_tokenizer, max_tokens=4096)
    assert [p.id for p in prompts] == ["c3#0", "c3#1", "c3#2"]
    assert [len(p.messages) for p in prompts] == [2, 4, 6]
    assert prompts[2].reference == conv.messages[6].content
    assert prompts[1].messages[-1].content == conv.messages[3].content
    assert prompts[0].meta == {"conversation_id": "c3", "turn": 0}


def test_unfold_token_limit_drops_oldest_history_then_instance(tiny_tokenizer):
    conv = Conversation.model_validate(conversation(3, turns=3, system=True))
    stats = Counter()
    full = unfold(conv, tiny_tokenizer, max_tokens=10_000)
    from alignline.data.chat import encode, prompt_ids

    n_last = len(prompt_ids(tiny_tokenizer, full[2].messages)) + len(encode(tiny_tokenizer, full[2].reference))
    n_single = len(prompt_ids(tiny_tokenizer, [full[2].messages[0], full[2].messages[-1]])) + len(
        encode(tiny_tokenizer, full[2].reference))
    limited = unfold(conv, tiny_tokenizer, max_tokens=n_last - 1, stats=stats)
    last = limited[-1]
    assert last.messages[0].role == "system" and len(last.messages) < 6
    assert stats["unfold_history_shortened"] >= 1
    stats = Counter()
    ids = [p.id for p in unfold(conv, tiny_tokenizer, max_tokens=n_single - 1, stats=stats)]
    assert "c3#2" not in ids
    assert stats["unfold_dropped_too_long"] >= 1
