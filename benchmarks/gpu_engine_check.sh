#!/usr/bin/env bash
# The sampling engine's GPU check (issue 15) as one device call: the CUDA-graph decode step's tests on the GPU,
# then benchmarks/generate_throughput.py with the live, static and graph steps and transformers side by side.
#
#   benchmarks/gpu_engine_check.sh prepare    # here, once: .device/ (ignored by git) with what the GPU machine lacks
#   benchmarks/gpu_engine_check.sh run        # there: the device tool's run, command
#                                             #   "bash benchmarks/gpu_engine_check.sh run", carry [".device"], timeout_s 540
#
# The GPU machine has torch, transformers, tokenizers and numpy but not pydantic, and neither the SmolLM2 asset
# (98 MB, over the 64 MiB a call carries) nor ShareGPT. So `prepare` puts pydantic's wheels and SmolLM2's shape
# (config and tokenizer, no weights) into .device/; `run` gives that shape random bf16 weights (decode speed does
# not depend on the values: every sample runs to exactly the requested new tokens) and uses random-token prompts.
# Results come back under $OUT: tests.log, bench.log, generate_throughput_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
    local py=.venv/bin/python
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
    rm -rf .device && mkdir -p .device/whl .device/shape
    local model
    model=$($py -c 'from alignline.models import resolve_model; print(resolve_model("smollm2-135m-instruct"))')
    cp "$model"/config.json "$model"/generation_config.json "$model"/tokenizer.json "$model"/tokenizer_config.json \
        "$model"/chat_template.jinja .device/shape/
    local versions
    versions=$($py -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in
        ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
    # shellcheck disable=SC2086
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device/whl $versions
    du -sh .device
}

run() {
    : "${OUT:?run on the device machine (its tool sets OUT)}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/bench.log"
    python3 - <<'EOF'
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
config = AutoConfig.from_pretrained(".device/shape")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
model.save_pretrained("/tmp/smollm2-random", safe_serialization=True)
AutoTokenizer.from_pretrained(".device/shape").save_pretrained("/tmp/smollm2-random")
print("torch", torch.__version__, "transformers", transformers.__version__, "random SmolLM2 saved")
EOF
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_static_step.py 2>&1 | tee "$OUT/tests.log" || true
    timeout 330 python3 benchmarks/generate_throughput.py --device cuda --dtype bfloat16 \
        --model-path /tmp/smollm2-random --synthetic-prompts --workloads a,b,c --sides engine,static,graph,transformers \
        --max-wait 0 --out "$OUT/generate_throughput_cuda.json" 2>&1 | tee -a "$OUT/bench.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
