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
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from alignline.config import Section, ShardSetting
from alignline.data.chat import ensure_chat_template, tokenise_prompt_response
from alignline.data.io import ShardedWriter, atomic_write_bytes, iter_jsonl, read_prompts, read_records
from alignline.data.records import Prompt, RankedSet, Response, Scored
from alignline.errors import AlignlineError, ConfigError, DataError
from alignline.generate.base import EngineSettings, LazyEngine, SamplingParams
from alignline.judges.cache import JudgeCache, ask_judge
from alignline.judges.evaluator import (
    DEFAULT_CRITERIA,
    EVALUATOR_VERSION,
    diagnose_evaluation,
    evaluator_prompt,
    parse_evaluation,
)
from alignline.judges.reward import score_responses
from alignline.models import load_reward_model, load_tokenizer, resolve_model
from alignline.stages.common import RunDir, console
from alignline.train.telemetry import Telemetry


class ScoreConfig(Section):
    """Configuration of ``alignline score``."""

    judge: Literal["reward_model", "evaluator", "verifier"] = "reward_model"
    """reward_model: a trained RM scores each response; evaluator: an LLM evaluator scores it per criterion;
    verifier: the fraction of the prompt's verifiable instructions it follows (no model)."""
    reward_model: str | None = None
    """reward_model: an RM saved by ``alignline rm`` (or any AutoModelForSequenceClassification with 1 label)."""
    evaluator: EngineSettings | None = None
    """evaluator: its engine (engine hf|openai, model, openai settings, dtype, max_batch)."""
    criteria: list[str] = Field(default_factory=lambda: list(DEFAULT_CRITERIA))
    """evaluator: the criteria each response is scored on (one call each); its score is their mean."""
    evaluator_sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=512))
    """evaluator: sampling (default greedy, 512 new tokens)."""
    evaluator_batch_size: int = Field(8, gt=0)
    """evaluator: prompts per engine call."""
    prompts: str
    """Prompt records the responses answer."""
    responses: str
    """Response records (prompt_id, sample_idx, text, ...): JSONL, Parquet or a directory of shards."""
    output_dir: str = "runs/score"
    """Where ranked-set shards, score_by_rank.png and manifest.json go."""
    scorer_id: str | None = None
    """Key of the score in each response's ``scores``; null: 'rm', 'evaluator' or 'verifier' (the judge)."""
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

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, v: list[str]) -> list[str]:
        if not v or any(not c.strip() for c in v) or len(set(v)) != len(v):
            raise ValueError("criteria must be a non-empty list of distinct names, e.g. [factuality, logic]")
        return v



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


Evaluation = dict[tuple[str, int], dict[str, float | None]]


def evaluate_responses(cfg: ScoreConfig, todo: list[tuple[Prompt, list[Response]]], engine, cache: JudgeCache,
                       counts: Counter, failures: list[dict]) -> Evaluation:
    """{(prompt id, sample idx): {criterion: score, or None when the evaluator's output did not parse}}."""
    jobs = [(p, r, c) for p, rs in todo for r in rs for c in cfg.criteria]
    texts = [evaluator_prompt(p.messages, r.text, c) for p, r, c in jobs]
    judge_id = f"llm:{cfg.evaluator.engine}:{cfg.evaluator.model}"
    outputs, calls = ask_judge(engine, texts, cfg.evaluator_sampling, cache, judge_id=judge_id,
                               template_version=EVALUATOR_VERSION, batch_size=cfg.evaluator_batch_size)
    counts["evaluator_calls"] += calls
    out: Evaluation = defaultdict(dict)
    for (p, r, c), raw in zip(jobs, outputs):
        parsed = parse_evaluation(raw)
        out[(p.id, r.sample_idx)][c] = None if parsed is None else parsed.score
        if raw is None:
            counts["evaluator_call_failures"] += 1
            failures.append({"prompt_id": p.id, "sample_idx": r.sample_idx, "criterion": c,
                             "reason": "the evaluator call failed at the engine", "output": None})
        elif parsed is None:
            counts["evaluator_parse_failures"] += 1
            failures.append({"prompt_id": p.id, "sample_idx": r.sample_idx, "criterion": c,
                             "reason": diagnose_evaluation(raw), "output": raw[:2000]})
    return out


def evaluator_scored(responses: list[Response], evaluation: Evaluation, scorer: str, counts: Counter) -> list[Scored]:
    """Responses with the mean of their parsed criteria; one with no parsed criterion is left out."""
    out = []
    for r in responses:
        per = evaluation[(r.prompt_id, r.sample_idx)]
        ok = {c: v for c, v in per.items() if v is not None}
        if len(ok) < len(per):
            counts["responses_with_failed_criteria"] += 1
        if not ok:
            counts["responses_unscored"] += 1
            continue
        scores = {**dict(getattr(r, "scores", {}) or {}), scorer: sum(ok.values()) / len(ok),
                  **{f"{scorer}/{c}": v for c, v in ok.items()}}
        out.append(Scored(**r.model_dump(), scores=scores))
    return out


def run(cfg: ScoreConfig) -> Path:
    if cfg.judge == "reward_model" and not cfg.reward_model:
        raise ConfigError("reward_model is required for judge=reward_model (a directory saved by `alignline rm`); "
                          "or set judge=evaluator evaluator.model=PATH")
    if cfg.judge == "evaluator" and cfg.evaluator is None:
        raise ConfigError("evaluator is required for judge=evaluator, e.g. evaluator.model=PATH (a model trained by "
                          "`alignline judge-sft`) or evaluator.engine=openai evaluator.model=NAME")
    scorer = cfg.scorer_id or {"reward_model": "rm"}.get(cfg.judge, cfg.judge)
    if cfg.judge == "reward_model":
        inputs = {"reward_model": cfg.reward_model, "prompts": cfg.prompts, "responses": cfg.responses}
    elif cfg.judge == "verifier":
        inputs = {"prompts": cfg.prompts, "responses": cfg.responses}
    else:
        inputs = {"evaluator": cfg.evaluator.model if cfg.evaluator.engine == "hf" else None,
                  "prompts": cfg.prompts, "responses": cfg.responses}
    rd = RunDir("score", cfg, cfg.output_dir, inputs)
    if rd.up_to_date():
        console.print(f"[green]score: {rd.path} is up to date[/green]; nothing to do")
        return rd.path
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    rd.start(state.wait_for_everyone)  # every process reads the old manifest before it is replaced
    index, total = (map(int, cfg.shard.split("/")) if cfg.shard else (state.process_index, state.num_processes))
    if cfg.judge == "reward_model":
        rm_path = resolve_model(cfg.reward_model)
        tokenizer = load_tokenizer(rm_path, trust_remote_code=cfg.trust_remote_code)
        ensure_chat_template(tokenizer)
        model = load_reward_model(rm_path, dtype=cfg.dtype,
                                  trust_remote_code=cfg.trust_remote_code).to(state.device).eval()

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
    if cfg.judge == "verifier":
        from alignline.judges.verifiable import VerifierJudge

        verifier = VerifierJudge()
        missing = [pid for pid in order if not prompts[pid].meta.get("instructions")]
        if missing:  # a clear error now, not mid-run
            raise DataError(f"judge=verifier needs verifiable instructions on every prompt it scores; {len(missing)} "
                            f"have none (first: '{missing[0]}'); attach them with prepare's instructions setting",
                            path=cfg.prompts, field="meta.instructions")
    writer = ShardedWriter(rd.path, name=f"ranked-{index:03d}-of-{total:03d}", shard_size=cfg.shard_size,
                           key=lambda obj: obj["prompt"]["id"], fresh=rd.fresh)
    done = writer.done_keys()
    counts["resumed_prompts"] = len(done)

    if cfg.judge == "evaluator":
        # outside the run dir's top level, where every .jsonl is read as ranked sets by the next stage
        aux = rd.path / "evaluator"
        suffix = "" if total == 1 else f"-{index:03d}-of-{total:03d}"
        failures: list[dict] = []
        # resumed prompts come from the cache at no cost, so the failure record covers the whole shard
        engine = LazyEngine(cfg.evaluator, device=state.device if cfg.evaluator.engine == "hf" else None)
        try:
            with JudgeCache(aux / f"judge_cache{suffix}.jsonl") as cache:
                evaluation = evaluate_responses(cfg, [(prompts[pid], grouped[pid]) for pid in order], engine, cache,
                                                counts, failures)
        finally:
            engine.close()
        atomic_write_bytes(aux / f"failures{suffix}.jsonl",
                           b"".join(json.dumps(f, ensure_ascii=False).encode() + b"\n" for f in failures))
        if counts["evaluator_call_failures"]:
            raise AlignlineError(f"{counts['evaluator_call_failures']} evaluator calls failed at the engine "
                                 f"(see {aux / f'failures{suffix}.jsonl'}); run the same command again to retry "
                                 "only those (the rest come from the cache)")

    def rm_scored(pid: str, prompt: Prompt, responses: list[Response]) -> list[Scored] | None:
        ids = [tokenise_prompt_response(tokenizer, prompt.messages, r.text, keep_tail=True,
                                        where=f"{cfg.responses}: prompt {pid} sample {r.sample_idx}")
               for r in responses]
        p_ids = ids[0][0]
        room = cfg.max_length - len(p_ids)
        if room < 1:
            counts["skipped_prompt_too_long"] += 1
            return None
        resp_ids = []
        for _, rid in ids:
            counts["responses_cut"] += len(rid) > room
            resp_ids.append(rid[:room])
        scores = score_responses(model, p_ids, resp_ids, pad_id=tokenizer.pad_token_id, chunk=cfg.chunk)
        # the prompt is computed once; the scalar head reads each response's last token
        tel.count(tel.params_of(model), len(p_ids) + sum(map(len, resp_ids)), len(resp_ids), grad=False)
        for r, s in zip(responses, scores):
            if not math.isfinite(s):
                raise DataError(f"the reward model gave a non-finite score ({s}) for prompt {pid} sample "
                                f"{r.sample_idx}; check the model ({cfg.reward_model})", path=cfg.responses)
        return [Scored(**r.model_dump(), scores={**dict(getattr(r, "scores", {}) or {}), scorer: s})
                for r, s in zip(responses, scores)]

    from tqdm.auto import tqdm

    tel = Telemetry(state.device)
    with writer, tel.phase("score"):
        for pid in tqdm(order, desc="score", disable=not state.is_local_main_process):
            if pid in done:
                continue
            prompt, responses = prompts[pid], grouped[pid]
            if cfg.judge == "evaluator":
                unsorted = evaluator_scored(responses, evaluation, scorer, counts)
                if not unsorted:
                    counts["skipped_prompts_without_scores"] += 1
                    continue
            elif cfg.judge == "verifier":
                unsorted = [Scored(**r.model_dump(), scores={**dict(getattr(r, "scores", {}) or {}),
                                                             scorer: verifier.score(prompt, r.text)})
                            for r in responses]
            else:
                unsorted = rm_scored(pid, prompt, responses)
                if unsorted is None:
                    continue
            scored = sorted(unsorted, key=lambda x: (-x.scores[scorer], x.sample_idx))
            for rank, x in enumerate(scored, start=1):
                x.rank = rank
            writer.add(RankedSet(prompt=prompt, responses=scored, scorer=scorer))
            counts["ranked_sets"] += 1
            counts["responses_scored"] += len(scored)
    state.wait_for_everyone()
    if state.is_main_process:
        sets = [RankedSet.model_validate(obj) for shard in sorted(rd.path.glob("ranked-*.jsonl"))
                for _, obj in iter_jsonl(shard)]
        title = {"reward_model": "Mean reward-model score at each rank (Xwin Fig. 5)",
                 "verifier": "Mean fraction of instructions followed at each rank"}.get(
            cfg.judge, f"Mean evaluator score ({', '.join(cfg.criteria)}) at each rank")
        plot_score_by_rank(sets, scorer, rd.path / "score_by_rank.png", title)
        rd.finish(counts, shards=[str(p) for p in sorted(rd.path.glob("ranked-*.jsonl"))], judge=cfg.judge,
                  phases=tel.summary(),
                  **({"template": EVALUATOR_VERSION, "criteria": cfg.criteria} if cfg.judge == "evaluator" else {}))
    console.print(f"[green]score done[/green]: {dict(counts)}\n  ranked sets: {rd.path}\n"
                  f"  mean score by rank: {rd.path / 'score_by_rank.png'}")
    return rd.path
