"""The fixed-shape decode step (CUDA-graph ready): the same samples as the live step, no host reads, fixed shapes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignline.data.chat import prompt_ids
from alignline.data.records import Prompt
from alignline.errors import ConfigError
from alignline.generate.base import SamplingParams, sample_seed
from alignline.generate.hf import HFEngine

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts() -> list[Prompt]:
    texts = ["hi", "a much longer question about the weather in spring and summer", "tell me a story", "x"]
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": t}]) for i, t in enumerate(texts)]


def _gqa_model(tokenizer):
    import transformers

    from alignline.models import tiny_causal_lm_config

    config = tiny_causal_lm_config(vocab_size=len(tokenizer), num_key_value_heads=2).to_dict()
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    torch.manual_seed(3)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{k: config[k] for k in keep})).eval()


@pytest.mark.parametrize("max_batch", [1, 5, 64])
def test_static_step_gives_the_live_steps_samples(tiny_model, tiny_tokenizer, max_batch):
    """Sampled with stop strings and an end token that ends samples at very different lengths, so slots are
    refilled mid-call (from the same and from the next prompt) and sit idle at the end: every text, finish
    reason and log-prob equals the live step's."""
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, stop=["ab"], seed=5)
    engines = {kind: HFEngine(tiny_model, tiny_tokenizer, max_batch=max_batch, decode_step=kind)
               for kind in ("live", "static")}
    ids = [prompt_ids(tiny_tokenizer, p.messages) for p in _prompts()]
    seeds = [[sample_seed(5, f"p{i}", j) for j in range(3)] for i in range(len(ids))]
    free = engines["live"].sample_prompts(ids, seeds, sampling)
    ends = {free[0][0].token_ids[2], free[1][1].token_ids[10]}  # end samples early and midway
    for engine in engines.values():
        engine.end_ids = engine.end_ids | ends
    out = {kind: e.sample_prompts(ids, seeds, sampling, logprobs=True) for kind, e in engines.items()}
    lengths = [len(s.token_ids) for rows in out["live"] for s in rows]
    assert min(lengths) <= 2 and max(lengths) >= 15
    for live_rows, static_rows in zip(out["live"], out["static"], strict=True):
        for a, b in zip(live_rows, static_rows, strict=True):
            assert (b.token_ids, b.text, b.finish_reason, b.end_token) == \
                (a.token_ids, a.text, a.finish_reason, a.end_token)
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)


def test_static_step_greedy_equals_the_live_step_with_grouped_query_attention(tiny_tokenizer):
    model = _gqa_model(tiny_tokenizer)
    prompts = _prompts()
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    live = HFEngine(model, tiny_tokenizer, max_batch=6).generate(prompts, 2, greedy)
    static = HFEngine(model, tiny_tokenizer, max_batch=6, decode_step="static").generate(prompts, 2, greedy)
    assert [[r.text for r in rows] for rows in static] == [[r.text for r in rows] for rows in live]


def test_static_step_decodes_a_lora_wrapped_policy_as_the_live_step_does(tiny_model_dir, tiny_tokenizer):
    """A policy under training is LoRA-wrapped: the step calls the wrapped projections (adapters with non-zero
    weights here, so they change the output), and its samples equal the live step's."""
    from alignline.models import load_causal_lm
    from alignline.models.loading import LoraSettings, apply_lora

    policy = apply_lora(load_causal_lm(tiny_model_dir, dtype="float32"), LoraSettings(r=4, dropout=0.0))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.2)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=9)
    base = HFEngine(load_causal_lm(tiny_model_dir, dtype="float32"), tiny_tokenizer, max_batch=4)
    live = HFEngine(policy, tiny_tokenizer, max_batch=4).generate(_prompts(), 2, sampling)
    static = HFEngine(policy, tiny_tokenizer, max_batch=4, decode_step="static").generate(_prompts(), 2, sampling)
    texts = [[r.text for r in rows] for rows in live]
    assert [[r.text for r in rows] for rows in static] == texts
    assert [[r.text for r in rows] for rows in base.generate(_prompts(), 2, sampling)] != texts  # adapters matter


class _Recorder(TorchDispatchMode):
    """Every op run inside, with its outputs' shapes; indexing by a boolean mask (which waits for the device to
    count the mask) is recorded as ``bool-index``."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor))
        indices = args[1] if len(args) > 1 and isinstance(args[1], (tuple, list)) else ()
        masked = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)
        self.ops.append(("bool-index" if masked else str(func), shapes))
        return out


def test_static_step_reads_nothing_back_and_keeps_its_shapes(tiny_model, tiny_tokenizer):
    """What a CUDA graph needs, checked on CPU: the device part of the step calls no op that returns a value
    to the host (item, nonzero, boolean indexing), and two steps at different lengths run the same ops on the
    same shapes."""
    from alignline.generate.decoder import KVDecoder

    ids = [prompt_ids(tiny_tokenizer, p.messages) for p in _prompts()[:3]]
    decoder = KVDecoder(tiny_model, slots=5, rows=3, prompt_capacity=max(map(len, ids)), new_capacity=8)
    decoder.use_static_step(per_row=2, graph=False)
    decoder.prefill([0, 1, 2], ids)
    for slot, row in enumerate([0, 0, 1, 2, 2]):
        decoder.assign(slot, row)
    feed = torch.tensor([True, True, True, False, True])  # slot 3: just assigned, not fed
    traces = []
    for _ in range(2):
        decoder.static.load(torch.tensor([5, 6, 7, 8, 9]), feed)
        with _Recorder() as recorder:
            decoder.static.run()
        traces.append(recorder.ops)
        decoder.step(torch.tensor([5, 6, 7, 8, 9]), feed)
    reads = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.item",
             "bool-index"}
    assert not [op for op, _ in traces[0] if op.split(".default")[0].split(".Tensor")[0] in reads]
    assert traces[0] == traces[1] and len(traces[0]) > 50


def test_static_step_packs_fed_slots_by_row_and_parks_the_rest(tiny_model, tiny_tokenizer):
    """Rows 0 and 2 with per_row 2: fed slots at row * 2 + rank, slots not fed at the spare 3 * 2 + slot; a row
    with more fed slots than per_row is an internal error, not silent corruption."""
    from alignline.generate.decoder import KVDecoder

    decoder = KVDecoder(tiny_model, slots=4, rows=3, prompt_capacity=8, new_capacity=4)
    decoder.use_static_step(per_row=2, graph=False)
    for slot, row in enumerate([2, 0, 2, 0]):
        decoder.assign(slot, row)
    at = decoder.static.packing(torch.tensor([True, True, True, False]))
    assert at.tolist() == [2 * 2 + 0, 0 * 2 + 0, 2 * 2 + 1, 3 * 2 + 3]
    decoder.assign(1, 2)
    with pytest.raises(RuntimeError, match="per_row"):
        decoder.static.packing(torch.tensor([True, True, True, False]))


def test_decode_step_setting_is_checked(tiny_model, tiny_tokenizer):
    with pytest.raises(ConfigError, match="decode_step must be one of live, static, graph"):
        HFEngine(tiny_model, tiny_tokenizer, decode_step="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs the model on a GPU"):
            HFEngine(tiny_model, tiny_tokenizer, decode_step="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_gives_the_live_steps_samples(tiny_model, tiny_tokenizer):
    model = tiny_model.to("cuda")
    try:
        prompts = _prompts()
        sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=2)
        live = HFEngine(model, tiny_tokenizer, max_batch=5).generate(prompts, 3, sampling)
        graph = HFEngine(model, tiny_tokenizer, max_batch=5, decode_step="graph").generate(prompts, 3, sampling)
        assert [[r.text for r in rows] for rows in graph] == [[r.text for r in rows] for rows in live]
    finally:
        tiny_model.to("cpu")
