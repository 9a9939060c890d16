"""``alignline score``: rank every prompt's responses with a reward model (Xwin-Set), an evaluator (TSO) or the
verifier.

``judge: reward_model``: for each prompt the prompt's forward pass is done once and its key/value cache
reused for all N responses (:func:`alignline.judges.reward.score_responses`).

``judge: evaluator``: an LLM evaluator (any engine; e.g. one trained by ``alignline judge-sft``) scores each
response once per criterion with this project's evaluator template; the response's score is the mean over
the criteria whose output parsed (each criterion's score is kept as ``<scorer>/<criterion>``). A criterion
that failed to parse is recorded in ``evaluator/failures.jsonl`` and counted; a response with no parsed
criterion gets no score and is left out of its ranked set (counted). Evaluator outputs are cached in
``evaluator/judge_cache.jsonl``: a rerun makes zero calls (one file of each per process when sharded).

``judge: verifier``: the fraction of the prompt's verifiable instructions (``meta.instructions``, from
``prepare``'s instructions setting) each response follows, strict mode; no model. Responses that tie keep
sample order, so a set whose samples all score the same still has a rank 1 and a last rank (``select``'s
``best_worst`` drops pairs of equal score).

Output: RankedSet records, responses sorted best first with ranks 1..N, in resumable shards (a rerun after
a kill continues without duplicates), plus ``score_by_rank.png``: the mean score at each rank (Xwin Fig. 5).
``shard: i/N`` (or several processes under ``accelerate launch``) scores every N-th prompt.

Each judge is a :class:`alignline.judges.scorers.Scorer`; this module keeps the run directory, sharding,
resuming and ranking.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from pydantic import Field

from alignline.config import ShardSetting
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import ShardedWriter, iter_jsonl, read_prompts, read_records
from alignline.data.records import Prompt, RankedSet, Response
from alignline.judges.scorers import JudgeSettings, Scorer, make_scorer
from alignline.stages.common import RunDir, console, iter_usable
from alignline.telemetry import Telemetry


class ScoreConfig(JudgeSettings):
    """Configuration of ``alignline score``: the judge's settings (:class:`JudgeSettings`) and what it scores."""

    prompts: RecordsSource
    """Prompt records the responses answer."""
    responses: str
    """Response records (prompt_id, sample_idx, text, ...): JSONL, Parquet or a directory of shards."""
    output_dir: str = "runs/score"
    """Where ranked-set shards, score_by_rank.png and manifest.json go."""
    shard_size: int = Field(50, gt=0)
    """Ranked sets per output shard file."""
    shard: ShardSetting = None
    """'i/N': score only prompts i, i+N, i+2N, ... (for several machines); null: all (or per process)."""


def plot_score_by_rank(sets: list[RankedSet], scorer: str, out_png: Path,
                       title: str = "Mean reward-model score at each rank (Xwin Fig. 5)") -> Path | None:
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
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def grouped_responses(cfg: ScoreConfig, prompts: dict[str, Prompt], counts: Counter) -> dict[str, list[Response]]:
    """The usable responses of each prompt (failed and empty ones skipped, counted), in file order."""
    grouped: dict[str, list[Response]] = defaultdict(list)
    for r in iter_usable(read_records(cfg.responses, Response), prompts, cfg.responses, counts, skip_reason):
        grouped[r.prompt_id].append(r)
    return grouped


def skip_reason(r: Response) -> str:
    """score counts failed and empty responses apart."""
    return "skipped_failed_responses" if r.status != "ok" else "skipped_empty_responses"


def rank_and_write(scorer: Scorer, order: list[str], prompts: dict[str, Prompt], grouped: dict[str, list[Response]],
                   writer: ShardedWriter, counts: Counter, tel: Telemetry, progress: bool) -> None:
    """Score the prompts of ``order`` not yet in ``writer`` and write each as a RankedSet, best first (ties keep
    sample order)."""
    from tqdm.auto import tqdm

    done = writer.done_keys()
    with writer, tel.phase("score"):
        for pid in tqdm(order, desc="score", disable=not progress):
            if pid in done:
                continue
            prompt = prompts[pid]
            unsorted = scorer.score(prompt, grouped[pid], counts, tel)
            if unsorted is None:
                continue
            scored = sorted(unsorted, key=lambda x: (-x.scores[scorer.id], x.sample_idx))
            for rank, x in enumerate(scored, start=1):
                x.rank = rank
            writer.add(RankedSet(prompt=prompt, responses=scored, scorer=scorer.id))
            counts["ranked_sets"] += 1
            counts["responses_scored"] += len(scored)


def run(cfg: ScoreConfig) -> Path:
    scorer = make_scorer(cfg, prompts=cfg.prompts, responses=cfg.responses)
    rd = RunDir("score", cfg, cfg.output_dir, {**scorer.inputs, "prompts": cfg.prompts, "responses": cfg.responses})
    if rd.skip_if_done():
        return rd.path
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    rd.start(state.wait_for_everyone)  # every process reads the old manifest before it is replaced
    index, total = (map(int, cfg.shard.split("/")) if cfg.shard else (state.process_index, state.num_processes))
    scorer.load(state.device)
    prompts = {p.id: p for p in read_prompts(cfg.prompts)}
    counts: Counter = Counter()
    grouped = grouped_responses(cfg, prompts, counts)
    order = [pid for pid in prompts if pid in grouped][index::total]
    scorer.check([prompts[pid] for pid in order])
    writer = ShardedWriter(rd.path, name=f"ranked-{index:03d}-of-{total:03d}", shard_size=cfg.shard_size,
                           key=lambda obj: obj["prompt"]["id"], fresh=rd.fresh)
    counts["resumed_prompts"] = len(writer.done_keys())
    # resumed prompts come from the cache at no cost, so the evaluator's failure record covers the whole shard
    scorer.prepare([(prompts[pid], grouped[pid]) for pid in order], rd.path, (index, total), counts)
    tel = Telemetry(state.device)
    rank_and_write(scorer, order, prompts, grouped, writer, counts, tel, state.is_local_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        sets = [RankedSet.model_validate(obj) for shard in sorted(rd.path.glob("ranked-*.jsonl"))
                for _, obj in iter_jsonl(shard)]
        plot_score_by_rank(sets, scorer.id, rd.path / "score_by_rank.png", scorer.title)
        rd.finish(counts, shards=[str(p) for p in sorted(rd.path.glob("ranked-*.jsonl"))], judge=scorer.judge,
                  phases=tel.summary(), **scorer.manifest)
    console.print(f"[green]score done[/green]: {dict(counts)}\n  ranked sets: {rd.path}\n"
                  f"  mean score by rank: {rd.path / 'score_by_rank.png'}")
    return rd.path
