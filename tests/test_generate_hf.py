"""The in-process engine: prefill once per prompt, per-sample seeds, stopping, filtering (tiny random Llama)."""

from __future__ import annotations

import pydantic
import pytest
import torch

from alignline.data.chat import prompt_ids
from alignline.data.records import Prompt
from alignline.errors import ConfigError
from alignline.generate.base import Engine, SamplingParams, sample_seed
from alignline.generate.hf import HFEngine, cut_at_stop, draw, filter_logits, generate_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(pid: str = "p1", text: str = "hello there, how are you today?") -> Prompt:
    return Prompt(id=pid, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}])


def _texts(responses) -> list[str]:
    return [r.text for r in responses]


SAMPLED = dict(temperature=1.0, max_new_tokens=16)


# ------------------------------------------------------------------------------------------------ base


def test_sample_seed_is_stable_and_depends_on_every_part():
    s = sample_seed(0, "p1", 0)
    assert s == sample_seed(0, "p1", 0) == 6800549054059139775
    assert 0 <= s < 2**63
    assert len({s, sample_seed(1, "p1", 0), sample_seed(0, "p2", 0), sample_seed(0, "p1", 1)}) == 4


def test_sampling_params_validate():
    assert SamplingParams().model_dump() == dict(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=256,
                                                 stop=[], seed=0)
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                dict(max_new_tokens=0), dict(unknown=1)):
        with pytest.raises(pydantic.ValidationError):
            SamplingParams(**bad)


def test_draw_follows_the_probabilities_and_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0]])
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    u = torch.cat([u, torch.tensor([0.0, 1.0 - 2**-53])])
    picked = draw(probs.expand(len(u), -1), u)
    counts = torch.bincount(picked, minlength=7).tolist()
    assert counts[0] == counts[2] == counts[6] == 0
    assert abs(counts[1] - 100) <= 2 and abs(counts[3] - 200) <= 2 and abs(counts[4] - 300) <= 2
    assert picked[-2].item() == 1 and picked[-1].item() == 5


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.6))  # 0.5 < 0.6: keep the second too
    assert (p[0] > 0).tolist() == [True, True, False, False]
    p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert (p[0] > 0).tolist() == [True, False, False, False]


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


# --------------------------------------------------------------------------------------------- engine


def test_engine_protocol_and_fields(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer, source="tiny")
    assert isinstance(engine, Engine) and engine.name == "hf"
    sampling = SamplingParams(**SAMPLED, seed=3)
    out = engine.generate([_prompt("a"), _prompt("b", "another question")], 3, sampling)
    assert [[r.sample_idx for r in rs] for rs in out] == [[0, 1, 2], [0, 1, 2]]
    for pid, rs in zip("ab", out, strict=True):
        for r in rs:
            assert r.prompt_id == pid and r.source == "tiny" and r.sampling == sampling.model_dump()
            assert r.seed == sample_seed(3, pid, r.sample_idx)
            assert r.finish_reason in ("stop", "length") and r.status == "ok"


def test_greedy_equals_model_generate(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    ids = prompt_ids(tiny_tokenizer, _prompt().messages)
    ours = engine.sample(ids, [0, 1], SamplingParams(temperature=0, max_new_tokens=20))
    x = torch.tensor([ids])
    ref = tiny_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20,
                              pad_token_id=tiny_tokenizer.pad_token_id)[0, len(ids):].tolist()
    ref = ref[: ref.index(tiny_tokenizer.eos_token_id)] if tiny_tokenizer.eos_token_id in ref else ref
    assert ours[0].token_ids == ours[1].token_ids == ref
    assert len(ref) == 20 and ours[0].finish_reason == "length"
    # the peer path gives the same greedy text
    peer = generate_reference(tiny_model, tiny_tokenizer, _prompt(), 2, SamplingParams(temperature=0, max_new_tokens=20))
    assert _texts(peer) == [ours[0].text] * 2


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    greedy = _texts(engine.generate([_prompt()], 1, SamplingParams(temperature=0, max_new_tokens=20))[0])
    top_k = engine.generate([_prompt()], 3, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=20))[0]
    top_p = engine.generate([_prompt()], 3, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=20))[0]
    assert _texts(top_k) == _texts(top_p) == greedy * 3


def test_sample_depends_only_on_seed_prompt_and_index(tiny_model, tiny_tokenizer):
    sampling = SamplingParams(temperature=1.0, top_k=100, top_p=0.95, max_new_tokens=16, seed=7)
    batched = HFEngine(tiny_model, tiny_tokenizer).generate([_prompt()], 4, sampling)[0]
    one_by_one = HFEngine(tiny_model, tiny_tokenizer, max_batch=1).generate([_prompt()], 4, sampling)[0]
    chunked6 = HFEngine(tiny_model, tiny_tokenizer, max_batch=4).generate([_prompt()], 6, sampling)[0]
    other_first = HFEngine(tiny_model, tiny_tokenizer).generate([_prompt("zz", "x"), _prompt()], 6, sampling)[1]
    assert _texts(batched) == _texts(one_by_one) == _texts(chunked6)[:4] == _texts(other_first)[:4]
    assert len(set(_texts(chunked6))) == 6  # the samples differ from one another


def test_different_seed_gives_different_text(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    a = engine.generate([_prompt()], 2, SamplingParams(**SAMPLED, seed=0))[0]
    b = engine.generate([_prompt()], 2, SamplingParams(**SAMPLED, seed=1))[0]
    again = engine.generate([_prompt()], 2, SamplingParams(**SAMPLED, seed=0))[0]
    assert _texts(a) == _texts(again)
    assert a[0].text != b[0].text and a[1].text != b[1].text


def test_prompt_is_prefilled_once_per_prompt(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer, max_batch=2)  # n=5 in 2 slots: each slot takes several samples
    prompts = [_prompt("a"), _prompt("b", "second")]
    engine.generate(prompts, 5, SamplingParams(temperature=1.0, max_new_tokens=6))
    lengths = [len(prompt_ids(tiny_tokenizer, p.messages)) for p in prompts]
    assert engine.stats["prefill_tokens"] == sum(lengths)  # each prompt once, not once per sample or chunk
    assert engine.stats["decode_steps"] <= 2 * 5 * 5  # at most max_new_tokens - 1 fed tokens per sample


def test_stop_strings_cut_the_text(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    ids = prompt_ids(tiny_tokenizer, _prompt().messages)
    full = engine.sample(ids, [0], SamplingParams(temperature=0, max_new_tokens=30))[0]
    # a two-character printable ASCII stop string from the middle of the greedy text
    k = next(k for k in range(3, len(full.text) - 1)
             if all(c.isascii() and c.isprintable() for c in full.text[k: k + 2]))
    stop = full.text[k: k + 2]
    cut = engine.sample(ids, [0], SamplingParams(temperature=0, max_new_tokens=30, stop=["never there", stop]))[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(full.token_ids) and full.token_ids[: len(cut.token_ids)] == cut.token_ids
    # through generate(): same text on Response records
    r = engine.generate([_prompt()], 2, SamplingParams(temperature=0, max_new_tokens=30, stop=[stop]))[0]
    assert _texts(r) == [cut.text] * 2 and {x.finish_reason for x in r} == {"stop"}


def test_end_token_stops_and_max_new_tokens_is_length(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    ids = prompt_ids(tiny_tokenizer, _prompt().messages)
    full = engine.sample(ids, [0], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    end = full.token_ids[5]
    first = full.token_ids.index(end)
    engine.end_ids = engine.end_ids | {end}  # pretend that token ends the turn too
    stopped = engine.sample(ids, [0, 1], SamplingParams(temperature=0, max_new_tokens=12))
    for s in stopped:
        assert s.finish_reason == "stop" and s.token_ids == full.token_ids[:first]
        assert s.text == tiny_tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)


def test_rows_finishing_early_do_not_change_the_others(tiny_model, tiny_tokenizer):
    # With a common byte as end token some samples stop early and leave the batch; the rest must be unchanged.
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5)
    engine = HFEngine(tiny_model, tiny_tokenizer)
    ids = prompt_ids(tiny_tokenizer, _prompt().messages)
    seeds = [sample_seed(5, "p1", i) for i in range(6)]
    free = engine.sample(ids, seeds, sampling)
    end = free[0].token_ids[3]
    engine.end_ids = engine.end_ids | {end}
    stopped = engine.sample(ids, seeds, sampling)
    single = [engine.sample(ids, [s], sampling)[0] for s in seeds]
    assert [s.token_ids for s in stopped] == [s.token_ids for s in single]
    assert stopped[0].finish_reason == "stop" and len(stopped[0].token_ids) <= 3
    assert any(s.finish_reason == "length" for s in stopped)  # others went on after row 0 left the batch
    for a, b in zip(free, stopped, strict=True):
        cut = a.token_ids.index(end) if end in a.token_ids else len(a.token_ids)
        assert b.token_ids == a.token_ids[:cut]


def test_n_must_be_positive(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    for n in (0, -1):
        with pytest.raises(ConfigError, match=r"\bn\b"):
            engine.generate([_prompt()], n, SamplingParams())
        with pytest.raises(ConfigError, match=r"\bn\b"):
            generate_reference(tiny_model, tiny_tokenizer, _prompt(), n, SamplingParams())
    with pytest.raises(ConfigError, match="max_batch"):
        HFEngine(tiny_model, tiny_tokenizer, max_batch=0)


def test_training_mode_is_restored(tiny_model, tiny_tokenizer):
    tiny_model.train()
    HFEngine(tiny_model, tiny_tokenizer).generate([_prompt()], 1, SamplingParams(max_new_tokens=2))
    assert tiny_model.training


def test_from_path_and_reference_sampling(tiny_model_dir):
    engine = HFEngine.from_path(tiny_model_dir, dtype="float32")
    assert engine.source == str(tiny_model_dir)
    out = engine.generate([_prompt()], 2, SamplingParams(max_new_tokens=4))[0]
    assert len(out) == 2 and all(len(r.text) <= 4 * 4 for r in out)
    ref = generate_reference(engine.model, engine.tokenizer, _prompt(), 3, SamplingParams(**SAMPLED))
    assert [r.sample_idx for r in ref] == [0, 1, 2] and all(r.finish_reason in ("stop", "length") for r in ref)
    assert _texts(ref) == _texts(generate_reference(engine.model, engine.tokenizer, _prompt(), 3,
                                                    SamplingParams(**SAMPLED)))


def test_prompts_batched_together_equal_one_prompt_at_a_time(tiny_model, tiny_tokenizer):
    # Prompts of different lengths share one left-padded batch when n * prompts fits in max_batch; the padding
    # must be invisible: the same tokens as decoding each prompt alone, greedy and sampled, with rows leaving.
    prompts = [_prompt("a", "hi"), _prompt("b", "a much longer question about the weather in spring"),
               _prompt("c", "tell me a story"), _prompt("d", "x")]
    for sampling in (SamplingParams(temperature=0, max_new_tokens=12),
                     SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3)):
        together = HFEngine(tiny_model, tiny_tokenizer, max_batch=12).generate(prompts, 3, sampling)
        alone = HFEngine(tiny_model, tiny_tokenizer, max_batch=3).generate(prompts, 3, sampling)
        assert [_texts(r) for r in together] == [_texts(r) for r in alone]
        assert [[r.prompt_id for r in rows] for rows in together] == [[p.id] * 3 for p in prompts]

    engine = HFEngine(tiny_model, tiny_tokenizer, max_batch=12)
    ids = [prompt_ids(tiny_tokenizer, p.messages) for p in prompts]
    seeds = [[sample_seed(0, p.id, i) for i in range(3)] for p in prompts]
    free = engine.sample_prompts(ids, seeds, SamplingParams(temperature=1.0, max_new_tokens=12))
    end = free[1][0].token_ids[2]
    engine.end_ids = engine.end_ids | {end}
    stopped = engine.sample_prompts(ids, seeds, SamplingParams(temperature=1.0, max_new_tokens=12))
    for a_rows, b_rows in zip(free, stopped, strict=True):
        for a, b in zip(a_rows, b_rows, strict=True):
            cut = a.token_ids.index(end) if end in a.token_ids else len(a.token_ids)
            assert b.token_ids == a.token_ids[:cut]


def test_continuous_batching_keeps_every_slot_busy_while_samples_wait(tiny_model, tiny_tokenizer, monkeypatch):
    # A common token ends samples: lengths vary from 1 to 24 tokens. While the queue holds samples, every slot
    # must hold one (a finished sample's slot is refilled in the same step, from the same or the next prompt).
    from alignline.generate.continuous import ContinuousBatch

    seen: list[tuple[int, int, int]] = []
    advance = ContinuousBatch._advance

    def traced(self):
        seen.append((len(self.queue), sum(job is not None for job in self.job), len(self.job)))
        return advance(self)

    monkeypatch.setattr(ContinuousBatch, "_advance", traced)
    engine = HFEngine(tiny_model, tiny_tokenizer, max_batch=5)
    prompts = [_prompt("a", "hi"), _prompt("b", "a much longer question about spring"), _prompt("c", "x")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, seed=2)
    free = engine.generate(prompts, 4, sampling)
    engine.end_ids = engine.end_ids | {tiny_tokenizer.convert_tokens_to_ids("e")}
    seen.clear()
    out = engine.generate(prompts, 4, sampling)
    lengths = [len(tiny_tokenizer(r.text)["input_ids"]) for rows in out for r in rows]
    assert min(lengths) < 6 and max(lengths) > 12  # very different lengths
    waiting = [(live, slots) for queued, live, slots in seen if queued]
    assert waiting and all(live == slots == 5 for live, slots in waiting)
    for a, b in zip(free, out, strict=True):  # the end token cuts each sample; nothing else changes
        for x, y in zip(a, b, strict=True):
            assert x.text.startswith(y.text)


def test_texts_do_not_depend_on_batch_size_or_prompt_order(tiny_model, tiny_tokenizer):
    prompts = [_prompt(f"p{i}", "question " + "word " * (3 * i)) for i in range(6)]
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=14, seed=11)
    texts = {}
    for max_batch in (1, 7, 64):
        rows = HFEngine(tiny_model, tiny_tokenizer, max_batch=max_batch).generate(prompts, 4, sampling)
        texts[max_batch] = {(r.prompt_id, r.sample_idx): r.text for rs in rows for r in rs}
    shuffled = [prompts[i] for i in (3, 0, 5, 1, 4, 2)]
    rows = HFEngine(tiny_model, tiny_tokenizer, max_batch=7).generate(shuffled, 4, sampling)
    texts["shuffled"] = {(r.prompt_id, r.sample_idx): r.text for rs in rows for r in rs}
    assert texts[1] == texts[7] == texts[64] == texts["shuffled"]
    assert len(set(texts[1].values())) > 12  # samples differ


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "qwen3"])
def test_greedy_equals_model_generate_across_decoder_families(kind, tiny_tokenizer):
    import transformers

    from alignline.models import tiny_causal_lm_config

    base = tiny_causal_lm_config(vocab_size=len(tiny_tokenizer), num_key_value_heads=2).to_dict()
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    settings = {k: base[k] for k in keep}
    config = {"llama-gqa": lambda: transformers.LlamaConfig(**settings),
              "qwen2": lambda: transformers.Qwen2Config(**settings),
              "qwen3": lambda: transformers.Qwen3Config(**settings, head_dim=16)}[kind]()
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    engine = HFEngine(model, tiny_tokenizer)
    assert engine.fallback_reason is None
    prompts = [prompt_ids(tiny_tokenizer, _prompt(text=t).messages) for t in ("hello", "a longer prompt here")]
    ours = engine.sample_prompts(prompts, [[0, 1], [2]], SamplingParams(temperature=0, max_new_tokens=16))
    for ids, rows in zip(prompts, ours, strict=True):
        x = torch.tensor([ids])
        ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                             pad_token_id=tiny_tokenizer.pad_token_id)[0, len(ids):].tolist()
        ref = ref[: ref.index(tiny_tokenizer.eos_token_id)] if tiny_tokenizer.eos_token_id in ref else ref
        assert all(r.token_ids == ref for r in rows)


def test_logprobs_are_the_models_own_for_every_token_and_the_end_token(tiny_model, tiny_tokenizer):
    """Sampled at temperature 0.7 with top-k 20 (so the drawing distribution differs from the model's), each
    returned log-prob equals log_softmax of a full forward over prompt + tokens at that token, the end token's
    last; the texts are those of a call without log-probs."""
    prompts = [_prompt("a"), _prompt("b", "a longer second question, with more tokens in it")]
    ids = [prompt_ids(tiny_tokenizer, p.messages) for p in prompts]
    seeds = [[sample_seed(0, p.id, i) for i in range(3)] for p in prompts]
    sampling = SamplingParams(temperature=0.7, top_k=20, max_new_tokens=10, seed=1)
    engine = HFEngine(tiny_model, tiny_tokenizer, max_batch=4)
    plain = engine.sample_prompts(ids, seeds, sampling)
    end = plain[0][0].token_ids[3]
    engine.end_ids = engine.end_ids | {end}  # some samples end on a drawn end token
    plain = engine.sample_prompts(ids, seeds, sampling)
    scored = engine.sample_prompts(ids, seeds, sampling, logprobs=True)
    ended = 0
    for prompt, rows_a, rows_b in zip(ids, plain, scored, strict=True):
        for a, b in zip(rows_a, rows_b, strict=True):
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
            assert a.logprobs is None
            tokens = b.token_ids + ([b.end_token] if b.end_token is not None else [])
            ended += b.end_token is not None
            assert (b.end_token is None or b.end_token in engine.end_ids) and len(b.logprobs) == len(tokens)
            with torch.no_grad():
                logits = tiny_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1]
            want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens).view(-1, 1)).view(-1)
            torch.testing.assert_close(torch.tensor(b.logprobs), want, atol=1e-5, rtol=0)
    assert ended


def test_fallback_path_gives_the_same_samples(tiny_model, tiny_tokenizer):
    prompts = [_prompt("a"), _prompt("b", "second question")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, stop=["ab"], seed=4)
    fast = HFEngine(tiny_model, tiny_tokenizer, max_batch=3)
    generic = HFEngine(tiny_model, tiny_tokenizer, max_batch=3)
    generic.fallback_reason = "forced by the test"
    assert [_texts(r) for r in fast.generate(prompts, 4, sampling)] == \
        [_texts(r) for r in generic.generate(prompts, 4, sampling)]


def test_no_deprecation_warning_from_our_calls(tiny_model, tiny_tokenizer):
    import warnings

    for forced in (None, "generic"):
        engine = HFEngine(tiny_model, tiny_tokenizer, max_batch=3)
        engine.fallback_reason = forced or engine.fallback_reason
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.generate([_prompt()], 4, SamplingParams(temperature=1.0, max_new_tokens=6))
        bad = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
        assert not bad, [str(w.message) for w in bad]


def test_a_prompt_that_fills_the_context_is_a_clear_error(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer, max_context=16)
    with pytest.raises(ConfigError, match="context of 16 tokens"):
        engine.sample(list(range(3, 19)), [0], SamplingParams(max_new_tokens=4))
    short = engine.sample(list(range(3, 13)), [0], SamplingParams(temperature=0, max_new_tokens=40))[0]
    assert len(short.token_ids) <= 6 and short.finish_reason in ("stop", "length")  # cut at the context


def test_half_precision_weights_decode(tiny_model_dir, tiny_tokenizer):
    from alignline.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, dtype="bfloat16")
    engine = HFEngine(model, tiny_tokenizer)
    engine.end_ids = frozenset()
    rows = engine.generate([_prompt(), _prompt("b", "another")], 3, SamplingParams(temperature=1.0, max_new_tokens=7))
    assert all(r.finish_reason == "length" and r.text for rs in rows for r in rs)
    assert engine.stats["decode_rows"] == 6 * 6  # 6 samples, each fed 6 tokens after its first
