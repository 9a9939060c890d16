"""Decontamination: find training text that overlaps an evaluation benchmark's prompts, by word n-grams.

The overlap is open-instruct's n-gram match (its ``decontamination/search.py``; Tülu 3 decontaminated with
8-grams), computed here in memory instead of through an Elasticsearch index. Texts are lower-cased and split
into words (runs of letters, digits and ``_``; punctuation and whitespace do not count). A benchmark prompt of
``L >= n`` words has ``L - n + 1`` word n-grams. A training text *covers* a word of the prompt when that word
lies in one of the prompt's n-grams that also occurs in the training text; the overlap of the pair is the
covered words over ``L``, and the training text matches the prompt when the overlap is at least the
threshold. A benchmark prompt shorter than ``n`` words has no n-gram: it matches only a training text of
exactly its words (an exact copy, up to case and punctuation); a few common words are not contamination.

The benchmark's n-grams are indexed once (:class:`OverlapIndex`); each training text then costs one pass
over its own n-grams, each a dictionary lookup.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from alignline.data.benchmarks import BENCHMARKS, benchmark_path
from alignline.data.io import iter_rows
from alignline.errors import ConfigError, DataError

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``, in order (what n-grams are made of)."""
    return _WORD.findall(text.lower())


def ngrams(seq: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    """The ``len(seq) - n + 1`` consecutive n-grams of ``seq`` (none when it is shorter than ``n``)."""
    return zip(*(seq[k:] for k in range(n)))


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One prompt of an evaluation benchmark: which benchmark (as configured), the file and line it is on, its
    text."""

    benchmark: str
    file: str
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Match:
    """A training text's largest overlap with a benchmark prompt (share of the prompt's words covered)."""

    prompt: BenchmarkPrompt
    overlap: float


def resolve_benchmark(name_or_path: str) -> list[BenchmarkPrompt]:
    """The prompts of a benchmark given by the name of an installed one (:data:`alignline.data.benchmarks.
    BENCHMARKS`: ``ifeval``) or by the path of its prompt file."""
    if name_or_path in BENCHMARKS:
        path = benchmark_path(name_or_path)  # a clear error, with how to install it, when it is missing
    else:
        path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"decontaminate.benchmarks: {name_or_path!r} is not a file; give the path of a JSONL or "
                          f"Parquet file of benchmark prompts or one of the names {sorted(BENCHMARKS)}")
    return read_benchmark_prompts(path, label=name_or_path)


def read_benchmark_prompts(path: str | Path, label: str) -> list[BenchmarkPrompt]:
    """Every prompt of a benchmark file: a record's ``prompt`` string (IFEval's ``input_data.jsonl``), or each
    user turn of its ``messages`` (an alignline Prompt record, e.g. a ``prepare`` prompt split)."""
    out: list[BenchmarkPrompt] = []
    for line, obj in iter_rows(path):
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            texts = [obj["prompt"]]
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            texts = [m["content"] for m in obj["messages"]
                     if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]
            if not texts:
                raise DataError("no user turn to decontaminate against", path=str(path), line=line,
                                field="messages", expected="at least one {role: user, content: <text>} turn")
        else:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError("not a benchmark prompt", path=str(path), line=line, field="prompt",
                            expected="a `prompt` string (as IFEval's input_data.jsonl) or `messages` with user "
                                     "turns (an alignline Prompt record)", found=str(found))
        out.extend(BenchmarkPrompt(label, str(path), line, t) for t in texts if t.strip())
    if not out:
        raise DataError("holds no benchmark prompts", path=str(path), expected="one prompt record per line")
    return out


class OverlapIndex:
    """The word n-grams of a set of benchmark prompts, for :meth:`match` against training texts."""

    def __init__(self, prompts: Sequence[BenchmarkPrompt], ngram: int, threshold: float):
        self.prompts, self.n, self.threshold = list(prompts), ngram, threshold
        self.lengths: list[int] = []
        self.grams: dict[tuple[str, ...], list[tuple[int, int]]] = defaultdict(list)
        """n-gram -> (prompt index, start word) of every place it occurs in a benchmark prompt."""
        self.whole: dict[tuple[str, ...], list[int]] = defaultdict(list)
        """The prompts shorter than n words, by their words (they match only exact copies)."""
        for i, prompt in enumerate(self.prompts):
            w = words(prompt.text)
            self.lengths.append(len(w))
            if len(w) < ngram:
                if w:
                    self.whole[tuple(w)].append(i)
                continue
            for start, gram in enumerate(ngrams(w, ngram)):
                self.grams[gram].append((i, start))

    @property
    def short_prompts(self) -> int:
        """Benchmark prompts shorter than n words."""
        return sum(len(ids) for ids in self.whole.values())

    def match(self, text: str) -> Match | None:
        """The benchmark prompt that ``text`` overlaps most, when the overlap reaches the threshold (ties: the
        earlier prompt); None otherwise."""
        w = words(text)
        exact = self.whole.get(tuple(w))
        if exact:
            return Match(self.prompts[exact[0]], 1.0)
        if len(w) < self.n:
            return None
        covered: dict[int, set[int]] = defaultdict(set)
        for gram in self.grams.keys() & ngrams(w, self.n):
            for i, start in self.grams[gram]:
                covered[i].update(range(start, start + self.n))
        if not covered:
            return None
        best = min(covered, key=lambda i: (-len(covered[i]) / self.lengths[i], i))
        overlap = len(covered[best]) / self.lengths[best]
        return Match(self.prompts[best], overlap) if overlap >= self.threshold else None
