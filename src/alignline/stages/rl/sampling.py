"""The engine side of an ``alignline rl`` rollout: the engine the policy samples with, G responses per prompt,
and (engine ``openai``) the weight push that keeps the server's policy the one being trained.

The trained response tokens are the sampled ones plus the end token when the policy emitted it (finish
reason ``stop`` without stop strings), as TRL does, so the policy learns to stop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from alignline.data.records import Prompt
from alignline.errors import AlignlineError
from alignline.generate.base import sample_seed
from alignline.stages.rl.config import RLConfig


class RolloutSample(NamedTuple):
    """One sampled response as the rollout trains on it."""

    ids: list[int]
    """Response token ids, an emitted end token included."""
    text: str
    finish_reason: str
    logprobs: list[float] | None
    """The sampling policy's log-prob of each of ``ids`` (from the engine), or None: the run computes them."""


def sample_hf(engine, prompt_ids: list[list[int]], prompt_keys: list[str], G: int, sampling, iteration: int,
              end_id: int, *, logprobs: bool = False) -> list[list[RolloutSample]]:
    """A :class:`RolloutSample` per sample, per prompt. Sample i of prompt p in iteration k is seeded by
    ``sample_seed(seed, p, k * G + i)``. One engine call: its continuous batching keeps ``max_batch`` samples
    decoding until the whole rollout is done. The end token kept is the one drawn (``end_id`` where the engine
    does not say); ``logprobs`` asks the engine for the log-probs, which its fallback path does not give (None).
    """
    seeds = [[sample_seed(sampling.seed, key, iteration * G + i) for i in range(G)] for key in prompt_keys]
    out = []
    for samples in engine.sample_prompts(prompt_ids, seeds, sampling, logprobs=logprobs):
        group = []
        for x in samples:
            ended = x.finish_reason == "stop" and not sampling.stop
            ids = list(x.token_ids) + ([end_id if x.end_token is None else x.end_token] if ended else [])
            logps = None if x.logprobs is None else x.logprobs[: len(ids)]
            assert logps is None or len(logps) == len(ids), "the engine gives one log-prob per token"
            group.append(RolloutSample(ids, x.text, x.finish_reason, logps))
        out.append(group)
    return out


def sample_openai(engine, prompts: Sequence[Prompt], tokenizer, G: int, sampling, iteration: int
                  ) -> list[list[RolloutSample]]:
    """The same through an OpenAI-compatible server: texts are tokenised back with the chat template (no
    log-probs: the run computes them in its own pass)."""
    from alignline.data.chat import tokenise_prompt_response

    seeded = sampling.model_copy(update={"seed": sample_seed(sampling.seed, "rl-iteration", iteration)})
    out = []
    for p, responses in zip(prompts, engine.generate(list(prompts), G, seeded)):
        group = []
        for r in responses:
            if r.status != "ok":
                raise AlignlineError(f"the rollout server failed on prompt '{p.id}': {r.error}; check the server "
                                     "(engine openai settings)")
            _, ids = tokenise_prompt_response(tokenizer, p.messages, r.text, where=f"prompt {p.id}")
            group.append(RolloutSample(ids[:-1] if r.finish_reason == "length" else ids, r.text,
                                       r.finish_reason or "stop", None))
        out.append(group)
    return out


def make_rollout_engine(cfg: RLConfig, policy, tokenizer):
    from alignline.generate.engines import EngineSettings, build_engine

    settings = EngineSettings(engine=cfg.engine, model=cfg.model, openai=cfg.openai,
                              max_batch=cfg.rollout.max_batch, decode_step=cfg.rollout.decode_step)
    engine = build_engine(settings, loaded=(policy, tokenizer))
    if cfg.engine == "openai":
        engine.check_connection()  # an unreachable server is an error now, before any training
    return engine


def push_weights(cfg: RLConfig, policy, tokenizer, out: Path) -> None:
    """Save the policy and ask the server to reload it (SGLang's update_weights_from_disk body)."""
    import urllib.request

    from alignline.models.saving import save_model

    save_model(policy, tokenizer, out)
    req = urllib.request.Request(cfg.openai.weights_url, data=json.dumps({"model_path": str(out.resolve())}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        urllib.request.urlopen(req, timeout=600).read()
    except OSError as exc:
        raise AlignlineError(f"openai.weights_url={cfg.openai.weights_url}: the weight reload failed ({exc})") from None


class RolloutSampler:
    """Draws the G responses of each prompt of an iteration from the policy as the loop holds it now."""

    def __init__(self, cfg: RLConfig, engine, policy, tokenizer, root: Path, *, logprobs: bool):
        from alignline.data.chat import tokenise_prompt_response

        self.cfg, self.engine, self.policy, self.tokenizer, self.root = cfg, engine, policy, tokenizer, root
        self.logprobs = logprobs
        """Ask the engine for the sampling policy's log-probs (hf engine)."""
        self.end_id = tokenise_prompt_response(tokenizer, [{"role": "user", "content": "x"}], "y")[1][-1]

    def sample(self, iteration: int, prompts: list[Prompt], prompt_ids: list[list[int]]) -> list[list[RolloutSample]]:
        cfg = self.cfg
        G, sampling = cfg.rollout.group_size, cfg.rollout.sampling
        if cfg.engine == "hf":
            return sample_hf(self.engine, prompt_ids, [p.id for p in prompts], G, sampling, iteration, self.end_id,
                             logprobs=self.logprobs)
        if iteration > 0:
            push_weights(cfg, self.policy, self.tokenizer, self.root / "served_policy")
        return sample_openai(self.engine, prompts, self.tokenizer, G, sampling, iteration)
