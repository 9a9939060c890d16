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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny model is far faster single-threaded, above all on a busy machine (thread contention).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    lengths: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(ids.shape[1])

    handle = tiny_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine = HFEngine(tiny_model, tiny_tokenizer, max_batch=2)  # n=5 -> 3 chunks per prompt
        engine.generate([_prompt("a"), _prompt("b", "second")], 5, SamplingParams(temperature=1.0, max_new_tokens=6))
    finally:
        handle.remove()
    assert sum(1 for n in lengths if n > 1) == 2
    assert len(lengths) <= 2 + 2 * 3 * 5  # then at most max_new_tokens - 1 one-token steps per chunk


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


def test_prompts_sharing_a_batch_are_prefilled_in_one_pass(tiny_model, tiny_tokenizer):
    shapes: list[tuple[int, int]] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shapes.append(tuple(ids.shape))

    handle = tiny_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        prompts = [_prompt("a"), _prompt("b", "second"), _prompt("c", "third one, longer")]
        HFEngine(tiny_model, tiny_tokenizer, max_batch=8).generate(prompts, 4, SamplingParams(max_new_tokens=5))
    finally:
        handle.remove()
    prefills = [s for s in shapes if s[1] > 1]
    assert [s[0] for s in prefills] == [2, 1]  # 8 // 4 = 2 prompts per batch: the two shortest, then one
    assert all(s[0] <= 8 for s in shapes)
