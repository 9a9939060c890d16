"""``alignline score``: rank every prompt's responses with a reward model (Xwin-Set).

For each prompt the prompt's forward pass is done once and its key/value cache reused for all N
responses (:func:`alignline.judges.reward.score_responses`). Output: RankedSet records, responses sorted
best first with ranks 1..N, in resumable shards (a rerun after a kill continues without duplicates), plus
``score_by_rank.png``: the mean score at each rank (Xwin Fig. 5). ``shard: i/N`` (or several processes
under ``accelerate launch``) scores every N-th prompt.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.config import Section, ShardSetting
from alignline.data.chat import ensure_chat_template, tokenise_prompt_response
from alignline.data.io import ShardedWriter, iter_jsonl, read_prompts, read_records
from alignline.data.records import RankedSet, Response, Scored
from alignline.errors import DataError
from alignline.judges.reward import score_responses
from alignline.models import load_reward_model, load_tokenizer, resolve_model
from alignline.stages.common import RunDir, console


class ScoreConfig(Section):
    """Configuration of ``alignline score``."""

    reward_model: str
    """A reward model saved by ``alignline rm`` (or any AutoModelForSequenceClassification with 1 label)."""
    prompts: str
    """Prompt records the responses answer."""
    responses: str
    """Response records (prompt_id, sample_idx, text, ...): JSONL, Parquet or a directory of shards."""
    output_dir: str = "runs/score"
    """Where ranked-set shards, score_by_rank.png and manifest.json go."""
    scorer_id: str = "rm"
    """Key of the score in each response's ``scores``."""
    max_length: int = Field(4096, gt=8)
    """prompt + response beyond this many tokens: the response is cut (counted)."""
    chunk: int = Field(16, gt=0)
    """Responses per forward pass (all share one prompt cache)."""
    shard_size: int = Field(50, gt=0)
    """Ranked sets per output shard file."""
    shard: ShardSetting = None
    """'i/N': score only prompts i, i+N, i+2N, ... (for several machines); null: all (or per process)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory."""



def plot_score_by_rank(sets: list[RankedSet], scorer: str, out_png: Path) -> Path | None:
    from alignline.report.plots import _plt

    by_rank: dict[int, list[float]] = defaultdict(list)
    for rs in sets:
        for r in rs.responses:
            by_rank[r.rank].append(r.scores[scorer])
    if not by_rank:
        return None
    plt = _plt()
    ranks = sorted(by_rank)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ranks, [sum(by_rank[k]) / len(by_rank[k]) for k in ranks], marker="o", markersize=3)
    ax.set_xlabel("rank (1 = best)")
    ax.set_ylabel(f"mean {scorer} score")
    ax.set_title("Mean reward-model score at each rank (Xwin Fig. 5)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def run(cfg: ScoreConfig) -> Path:
    rd = RunDir("score", cfg, cfg.output_dir, {"reward_model": cfg.reward_model, "prompts": cfg.prompts,
                                               "responses": cfg.responses})
    if rd.up_to_date():
        console.print(f"[green]score: {rd.path} is up to date[/green]; nothing to do")
        return rd.path
    rd.start()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    index, total = (map(int, cfg.shard.split("/")) if cfg.shard else (state.process_index, state.num_processes))
    rm_path = resolve_model(cfg.reward_model)
    tokenizer = load_tokenizer(rm_path, trust_remote_code=cfg.trust_remote_code)
    ensure_chat_template(tokenizer)
    model = load_reward_model(rm_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code).to(state.device).eval()

    prompts = {p.id: p for p in read_prompts(cfg.prompts)}
    counts: Counter = Counter()
    grouped: dict[str, list[Response]] = defaultdict(list)
    for r in read_records(cfg.responses, Response):
        if r.prompt_id not in prompts:
            raise DataError(f"response {r.prompt_id}/{r.sample_idx} answers a prompt that is not in {cfg.prompts}",
                            path=cfg.responses, field="prompt_id", found=repr(r.prompt_id))
        if r.status != "ok":
            counts["skipped_failed_responses"] += 1
            continue
        if not r.text.strip():
            counts["skipped_empty_responses"] += 1
            continue
        grouped[r.prompt_id].append(r)
    order = [pid for pid in prompts if pid in grouped][index::total]
    writer = ShardedWriter(rd.path, name=f"ranked-{index:03d}-of-{total:03d}", shard_size=cfg.shard_size,
                           key=lambda obj: obj["prompt"]["id"])
    done = writer.done_keys()
    counts["resumed_prompts"] = len(done)
    from tqdm.auto import tqdm

    with writer:
        for pid in tqdm(order, desc="score", disable=not state.is_local_main_process):
            if pid in done:
                continue
            prompt, responses = prompts[pid], grouped[pid]
            ids = [tokenise_prompt_response(tokenizer, prompt.messages, r.text, keep_tail=True,
                                            where=f"{cfg.responses}: prompt {pid} sample {r.sample_idx}")
                   for r in responses]
            p_ids = ids[0][0]
            room = cfg.max_length - len(p_ids)
            if room < 1:
                counts["skipped_prompt_too_long"] += 1
                continue
            resp_ids = []
            for _, rid in ids:
                counts["responses_cut"] += len(rid) > room
                resp_ids.append(rid[:room])
            scores = score_responses(model, p_ids, resp_ids, pad_id=tokenizer.pad_token_id, chunk=cfg.chunk)
            for r, s in zip(responses, scores):
                if not math.isfinite(s):
                    raise DataError(f"the reward model gave a non-finite score ({s}) for prompt {pid} sample "
                                    f"{r.sample_idx}; check the model ({cfg.reward_model})", path=cfg.responses)
            scored = sorted(
                (Scored(**r.model_dump(), scores={**dict(getattr(r, "scores", {}) or {}), cfg.scorer_id: s})
                 for r, s in zip(responses, scores)),
                key=lambda x: (-x.scores[cfg.scorer_id], x.sample_idx),
            )
            for rank, x in enumerate(scored, start=1):
                x.rank = rank
            writer.add(RankedSet(prompt=prompt, responses=scored, scorer=cfg.scorer_id))
            counts["ranked_sets"] += 1
            counts["responses_scored"] += len(scored)
    state.wait_for_everyone()
    if state.is_main_process:
        sets = [RankedSet.model_validate(obj) for shard in sorted(rd.path.glob("ranked-*.jsonl"))
                for _, obj in iter_jsonl(shard)]
        plot_score_by_rank(sets, cfg.scorer_id, rd.path / "score_by_rank.png")
        rd.finish(counts, shards=[str(p) for p in sorted(rd.path.glob("ranked-*.jsonl"))])
    console.print(f"[green]score done[/green]: {dict(counts)}\n  ranked sets: {rd.path}\n"
                  f"  mean score by rank: {rd.path / 'score_by_rank.png'}")
    return rd.path
