"""``alignline eval bestofn``: best-of-n curves (Xwin Fig. 3/4).

Samples N responses per held-out prompt from the policy (``sample``), ranks them with the reward model
(``score``), or takes sets a ``score`` stage already ranked (``ranked``), then for n = 1, 2, 4, ..., N reports the gold judge's score of the reward model's best among
the first n samples (by sample index), and the oracle best-of-n (the gold judge's best among the first n).
The gold judge is the ``verifier`` (the fraction of the prompt's verifiable instructions followed, strict).
Writes ``bestofn.json`` and ``bestofn.png``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import atomic_write_json, read_prompts, read_records
from alignline.data.records import RankedSet
from alignline.errors import DataError
from alignline.generate.base import DecodeStep, SamplingParams
from alignline.stages import sample, score
from alignline.stages.common import RunDir, console


class BestOfNConfig(Section):
    """Configuration of ``alignline eval bestofn``."""

    model: str | None = None
    """The policy to evaluate (sampled here); not with ``ranked``."""
    prompts: RecordsSource
    """Held-out prompts with verifiable instructions in meta (``prepare`` with ``instructions.splits``)."""
    reward_model: str | None = None
    """The reward model that picks the best of n; not with ``ranked``."""
    ranked: str | None = None
    """Instead of model + reward_model: a ``score`` output (ranked sets of these prompts' responses, e.g. the
    best-of-N sets of a pipeline); nothing is sampled or scored, n up to N comes from its first N samples."""
    output_dir: str = "runs/bestofn"
    """samples/, ranked/, bestofn.json, bestofn.png."""
    n: int = Field(16, ge=1)
    """N: samples per prompt (paper: 64); n runs over powers of two up to N."""
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.7, max_new_tokens=256))
    """Sampling of the policy."""
    max_prompts: int | None = None
    """Only the first this many prompts."""
    max_batch: int = Field(64, gt=0)
    """Sequences decoded together (continuous batching over all prompts); raise it on a GPU."""
    decode_step: DecodeStep = "live"
    """hf: live (default), static or graph (the decode step replayed as a CUDA graph; GPU only)."""
    gold: Literal["verifier"] = "verifier"
    """The gold judge."""
    gold_mode: Literal["strict", "loose"] = "strict"
    """Verifier mode of the gold score."""

    @model_validator(mode="after")
    def _check(self) -> BestOfNConfig:
        if self.ranked is not None and (self.model is not None or self.reward_model is not None):
            raise ValueError("give either ranked=DIR (sets already scored), or model and reward_model, not both")
        if self.ranked is None and (self.model is None or self.reward_model is None):
            raise ValueError("give model and reward_model (to sample and score here), or ranked=DIR")
        return self


def ns_up_to(n: int) -> list[int]:
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return [*out, n]


def curves(sets: list[RankedSet], gold: dict[tuple[str, int], float], n_max: int) -> list[dict]:
    """Mean gold score of the RM's best and of the oracle's best among the first n samples, per n."""
    rows = []
    for n in ns_up_to(n_max):
        picked, oracle, rm_scores = [], [], []
        for s in sets:
            first = [r for r in s.responses if r.sample_idx < n]
            if not first:
                continue
            best = max(first, key=lambda r: (r.scores[s.scorer], -r.sample_idx))
            picked.append(gold[(s.prompt.id, best.sample_idx)])
            oracle.append(max(gold[(s.prompt.id, r.sample_idx)] for r in first))
            rm_scores.append(best.scores[s.scorer])
        k = max(len(picked), 1)
        rows.append({"n": n, "gold_of_rm_best": sum(picked) / k, "gold_oracle_best": sum(oracle) / k,
                     "rm_score_of_best": sum(rm_scores) / k, "prompts": len(picked)})
    return rows


def plot(rows: list[dict], out_png: Path, title: str) -> Path:
    from alignline.report.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ns = [r["n"] for r in rows]
    ax.plot(ns, [r["gold_of_rm_best"] for r in rows], marker="o", label="gold score of RM's best-of-n")
    ax.plot(ns, [r["gold_oracle_best"] for r in rows], marker="s", linestyle="--", label="oracle best-of-n")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("n (samples)")
    ax.set_ylabel("gold judge score")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def run(cfg: BestOfNConfig) -> Path:
    inputs = {"model": cfg.model, "prompts": cfg.prompts, "reward_model": cfg.reward_model}
    # without `ranked` the fingerprints are those of the settings before it existed: such runs stay up to date
    rd = RunDir("bestofn", cfg, cfg.output_dir, {**inputs, "ranked": cfg.ranked} if cfg.ranked else inputs,
                () if cfg.ranked else ("ranked",))
    if rd.skip_if_done():
        return rd.path
    rd.start()
    if cfg.ranked is None:
        samples_dir = sample.run(sample.SampleConfig(
            prompts=cfg.prompts, model=cfg.model, output_dir=str(rd.path / "samples"), n=cfg.n,
            sampling=cfg.sampling, max_prompts=cfg.max_prompts, max_batch=cfg.max_batch, decode_step=cfg.decode_step,
            prompts_per_shard=max(1, cfg.max_batch // cfg.n)))
        ranked_dir = score.run(score.ScoreConfig(
            reward_model=cfg.reward_model, prompts=cfg.prompts, responses=str(samples_dir),
            output_dir=str(rd.path / "ranked")))
    else:
        ranked_dir = Path(cfg.ranked)
    from alignline.judges.verifiable import VerifierJudge

    judge = VerifierJudge(mode=cfg.gold_mode)
    sets = [s for p in sorted(ranked_dir.glob("ranked-*.jsonl")) for s in read_records(p, RankedSet)]
    if cfg.ranked is not None:
        prompt_ids = [p.id for p in read_prompts(cfg.prompts)]
        strangers = sorted({s.prompt.id for s in sets} - set(prompt_ids))
        if strangers:
            raise DataError(f"ranked set for a prompt that is not in {cfg.prompts}", path=cfg.ranked,
                            field="prompt.id", found=repr(strangers[0]),
                            expected="the prompts file that the score stage ranked (prompts=...)")
        kept = set(prompt_ids[: cfg.max_prompts])
        sets = [s for s in sets if s.prompt.id in kept]
        if not sets:
            raise DataError(f"no ranked sets (ranked-*.jsonl) for the prompts of {cfg.prompts}", path=cfg.ranked)
    gold = {(s.prompt.id, r.sample_idx): judge.score(s.prompt, r.text) for s in sets for r in s.responses}
    rows = curves(sets, gold, cfg.n)
    atomic_write_json(rd.path / "bestofn.json", {"model": cfg.model, "reward_model": cfg.reward_model,
                                                 "ranked": cfg.ranked, "rows": rows})
    plot(rows, rd.path / "bestofn.png", f"best-of-n: {Path(cfg.model or cfg.ranked).name}")
    rd.finish(Counter(prompts=len(sets), responses=len(gold)), rows=rows)
    lines = "\n".join(f"  n={r['n']:>3}: RM best {r['gold_of_rm_best']:.3f}   oracle {r['gold_oracle_best']:.3f}"
                      f"   (RM score {r['rm_score_of_best']:.3f})" for r in rows)
    console.print(f"[green]bestofn done[/green] (gold: verifier, {cfg.gold_mode}; {len(sets)} prompts)\n{lines}\n"
                  f"  plot: {rd.path / 'bestofn.png'}")
    return rd.path
