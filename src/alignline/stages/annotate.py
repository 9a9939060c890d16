"""``alignline annotate``: Xwin-Pair preference annotation of two responses per prompt.

For each prompt the first two usable responses (by sample index) are shown to a judge in an order
shuffled by a seed derived from the prompt id (cancelling position bias, reproducibly). Judges:

* ``verifier``: the fraction of the prompt's verifiable instructions each response follows; the gap sets
  the rating (thresholds in ``alignline.judges.pairwise.VERIFIER_RATING_THRESHOLDS``); a tie is no pair.
* ``llm``: a chat model (in-process ``hf`` engine) with this project's pairwise template; its output is
  parsed by a pure parser; a parse failure is recorded in ``failures.jsonl`` with its reason and never
  becomes a verdict. ``both_orders`` asks twice (A/B and B/A) and turns disagreement into ``unsure``.

Judge outputs are cached in ``judge_cache.jsonl`` under a key of (judge id, template version, sampling,
judge prompt): a rerun makes zero judge calls. Pairs are written in resumable shards.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignline.config import Section
from alignline.data.datasets_source import RecordsSource
from alignline.data.io import ShardedWriter, atomic_write_bytes, jsonl_bytes, read_prompts, read_records
from alignline.data.records import Pair, Prompt, Response
from alignline.generate.base import SamplingParams
from alignline.judges.cache import JudgeCache, ask_cached, user_calls
from alignline.judges.pairwise import (
    PAIRWISE_VERSION,
    diagnose_pairwise,
    pairwise_prompt,
    parse_pairwise,
    verifier_rating,
)
from alignline.stages.common import RunDir, check_failures, console, seeded_digest, usable_responses


def default_judge_sampling() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=384)


class JudgeSettings(Section):
    """Which judge annotates the pairs."""

    type: Literal["verifier", "llm"] = "verifier"
    """verifier: verifiable-instruction checks (needs meta.instructions); llm: a chat model as judge."""
    model: str | None = None
    """llm: the judge model (local HF dir, .gguf, alias or Hub id), run in process."""
    sampling: SamplingParams = Field(default_factory=default_judge_sampling)
    """llm: judge sampling (default greedy, 384 new tokens)."""
    both_orders: bool = False
    """llm: judge A/B and B/A; disagreeing verdicts become rating 'unsure'."""
    batch_size: int = Field(8, gt=0)
    """llm: judge prompts per engine call."""

    @model_validator(mode="after")
    def _llm_needs_a_model(self) -> JudgeSettings:
        """Checked with the config, so ``alignline run --dry-run`` sees it."""
        if self.type == "llm" and not self.model:
            raise ValueError("judge.model is required for judge.type=llm (a local model dir, .gguf or alias)")
        return self


class AnnotateConfig(Section):
    """Configuration of ``alignline annotate``."""

    prompts: RecordsSource
    """Prompt records (for the verifier: with meta.instructions)."""
    responses: str
    """Response records; the first two usable ones per prompt (by sample_idx) are compared."""
    output_dir: str = "runs/annotate"
    """Pair shards, judge_cache.jsonl, failures.jsonl, manifest.json."""
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    """The judge."""
    seed: int = 0
    """Seed of the per-prompt presentation order."""
    shard_size: int = Field(200, gt=0)
    """Pairs per output shard."""
    max_failure_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """The run ends failed (exit 2, its pairs and failures.jsonl written) when more than this fraction of the
    prompts judged now got no verdict (an output that did not parse in either order)."""


def presentation_swapped(seed: int, prompt_id: str) -> bool:
    """Whether the first response is shown as B: a fair coin derived from (seed, prompt id)."""
    return seeded_digest(seed, prompt_id)[0] % 2 == 1


def pick_two(prompts: dict[str, Prompt], responses: list[Response], counts: Counter, where: str):
    grouped = usable_responses(responses, prompts, where, counts)
    out = []
    for pid in prompts:
        rs = grouped.get(pid, [])
        if len(rs) < 2:
            counts["prompts_with_fewer_than_2_responses"] += 1
            continue
        if rs[0].text.strip() == rs[1].text.strip():
            counts["dropped_identical_responses"] += 1
            continue
        out.append((prompts[pid], rs[0], rs[1]))
    return out


def make_pair(prompt: Prompt, win: Response, lose: Response, rating: str, reason: str, **prov) -> Pair:
    return Pair(id=prompt.id, prompt=prompt.messages, chosen=win.text, rejected=lose.text, rating=rating,
                reason=reason, provenance={"chosen_sample": win.sample_idx, "rejected_sample": lose.sample_idx,
                                           "chosen_source": win.source, "rejected_source": lose.source, **prov})


def verifier_pairs(todo: list[tuple[Prompt, Response, Response]], writer: ShardedWriter, counts: Counter) -> None:
    """The response following more of the prompt's instructions wins; the gap sets the rating; a tie is no pair."""
    from alignline.judges.verifiable import VerifierJudge

    judge = VerifierJudge()
    for prompt, x, y in todo:
        sx, sy = judge.score(prompt, x.text), judge.score(prompt, y.text)
        rating = verifier_rating(abs(sx - sy))
        if rating is None:
            counts["ties"] += 1
            continue
        win, lose = (x, y) if sx > sy else (y, x)
        writer.add(make_pair(prompt, win, lose, rating, f"verifier: {max(sx, sy):.2f} vs {min(sx, sy):.2f} "
                             "of the instructions followed", judge="verifier",
                             scores={"chosen": max(sx, sy), "rejected": min(sx, sy)}))
        counts["pairs"] += 1


JudgeJob = tuple[int, int, str, tuple[Response, Response]]
"""(item index, order, judge prompt text, the responses shown as (A, B))."""


def llm_judge_outputs(cfg: AnnotateConfig, todo: list[tuple[Prompt, Response, Response]], cache_path: Path
                      ) -> tuple[str, list[JudgeJob], list[str], int]:
    """(judge id, the judge jobs, each job's raw output, calls made): only prompts missing from the judge cache
    are sent to the judge, which is loaded only then."""
    def load_judge():
        from alignline.generate.hf import HFEngine

        return HFEngine.from_path(cfg.judge.model)

    judge_id = f"llm:{cfg.judge.model}"
    jobs: list[JudgeJob] = []
    for idx, (prompt, x, y) in enumerate(todo):
        first = (y, x) if presentation_swapped(cfg.seed, prompt.id) else (x, y)
        orders = [first, first[::-1]] if cfg.judge.both_orders else [first]
        for o, (a, b) in enumerate(orders):
            jobs.append((idx, o, pairwise_prompt(prompt.messages, a.text, b.text), (a, b)))
    calls = user_calls([text for _, _, text, _ in jobs], cfg.judge.sampling, judge_id=judge_id,
                       template_version=PAIRWISE_VERSION)
    with JudgeCache(cache_path) as cache:
        raws, made = ask_cached(load_judge, calls, cache, batch_size=cfg.judge.batch_size)
    return judge_id, jobs, raws, made


def llm_pairs(cfg: AnnotateConfig, todo: list[tuple[Prompt, Response, Response]], run_dir: Path,
              writer: ShardedWriter, counts: Counter, failures: list[dict]) -> str:
    """Pairs from the llm judge's parsed verdicts (a parse failure is recorded, never a verdict); returns the
    judge id."""
    judge_id, jobs, raws, calls = llm_judge_outputs(cfg, todo, run_dir / "judge_cache.jsonl")
    verdicts: dict[int, list] = defaultdict(list)
    for (idx, o, _text, (a, b)), raw in zip(jobs, raws):
        v = parse_pairwise(raw)
        if v is None:
            failures.append({"prompt_id": todo[idx][0].id, "order": o, "reason": diagnose_pairwise(raw),
                             "output": raw[:2000]})
            counts["judge_parse_failures"] += 1
        verdicts[idx].append((v, a, b))
    for idx, (prompt, _x, _y) in enumerate(todo):
        vs = verdicts[idx]
        if any(v is None for v, _, _ in vs):
            continue  # a failure is a failure, not a verdict
        winners = [(a if v.winner == "A" else b) for v, a, b in vs]
        v0, a0, b0 = vs[0]
        win = winners[0]
        lose = b0 if win is a0 else a0
        rating = v0.degree
        if len(winners) == 2 and winners[0].sample_idx != winners[1].sample_idx:
            rating = "unsure"
            counts["order_inconsistent"] += 1
        writer.add(make_pair(prompt, win, lose, rating, v0.reason, judge=judge_id,
                             template=PAIRWISE_VERSION, shown_first=a0.sample_idx))
        counts["pairs"] += 1
    counts["judge_calls"] = calls
    return judge_id


def run(cfg: AnnotateConfig) -> Path:
    rd = RunDir("annotate", cfg, cfg.output_dir, {"prompts": cfg.prompts, "responses": cfg.responses,
                                                  "judge_model": cfg.judge.model})
    if rd.skip_if_done():
        return rd.path
    rd.start()
    counts: Counter = Counter()
    prompts = {p.id: p for p in read_prompts(cfg.prompts)}
    items = pick_two(prompts, read_records(cfg.responses, Response), counts, cfg.responses)
    writer = ShardedWriter(rd.path, name="pairs", shard_size=cfg.shard_size, key=lambda o: o["id"], fresh=rd.fresh)
    done = writer.done_keys()
    todo = [it for it in items if it[0].id not in done]
    counts["resumed_pairs"] = len(done)
    # items that failed before are not in `done`: they are judged again (from the cache) and re-reported
    failures: list[dict] = []
    with writer:
        if cfg.judge.type == "verifier":
            judge_id = "verifier"
            verifier_pairs(todo, writer, counts)
        else:
            judge_id = llm_pairs(cfg, todo, rd.path, writer, counts, failures)
    atomic_write_bytes(rd.path / "failures.jsonl", jsonl_bytes(failures, ensure_ascii=True))
    check_failures("annotate", len({f["prompt_id"] for f in failures}), len(todo), cfg.max_failure_fraction,
                   "judged prompts", rd.path / "failures.jsonl")
    rd.finish(counts, judge=judge_id, template=PAIRWISE_VERSION)
    console.print(f"[green]annotate done[/green] ({judge_id}): {dict(counts)}\n  pairs: {rd.path}"
                  + (f"\n  parse failures: {rd.path / 'failures.jsonl'}" if failures else ""))
    return rd.path
