"""A tiny byte-level tokenizer and a tiny random Llama config, built offline: the test suite's and the
benchmarks' ``--smoke`` model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers

#: SmolLM2's ChatML template without its default system prompt; used by :func:`make_tiny_tokenizer`.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_SPECIALS = ("<|im_start|>", "<|im_end|>")
TINY_EOS_ID = 1
"""Id of ``<|im_end|>`` (eos and pad) in :func:`make_tiny_tokenizer`'s vocabulary."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def make_tiny_tokenizer(out_dir: str | Path):
    """A byte-level tokenizer (ids 0-1: ``<|im_start|>``, ``<|im_end|>``; 2-257: the bytes) saved to out_dir.

    One token per byte and no merges: any text is encoded without unknowns, and encoding is additive
    (``enc(a + b) == enc(a) + enc(b)``) for any split, so prompt/response boundaries are always stable.
    ``<|im_end|>`` is both eos and pad; the chat template is SmolLM2's ChatML (:data:`TINY_CHAT_TEMPLATE`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    vocab.update({ch: len(_TINY_SPECIALS) + b for b, ch in _bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _TINY_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>", model_max_length=1024,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def tiny_causal_lm_config(vocab_size: int, **overrides) -> transformers.LlamaConfig:
    """A tiny random Llama config for tests: 2 layers, hidden 64, 4 heads, MLP 128, 1024 positions.

    eos and pad default to :data:`TINY_EOS_ID` (``<|im_end|>`` of :func:`make_tiny_tokenizer`); no bos.
    """
    from transformers import LlamaConfig

    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=TINY_EOS_ID, pad_token_id=TINY_EOS_ID, tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)
