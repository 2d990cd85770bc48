#!/usr/bin/env bash
# One prepared GPU check: the GPU tests, then the LoRA benchmark table. Writes its log, JSON and a
# markdown table to $OUT (when set) and the markdown table under benchmarks/results/ (card, date,
# versions in its header). Needs no network: installs the checkout with --no-deps.
#   bash benchmarks/device_check.sh                # full grid (about 5 minutes on an H100)
#   BENCH_ARGS="--tokens 8192 --shapes 4096x4096 --ranks 16" bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT" benchmarks/results
LOG="$OUT/device_check.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
exec > >(tee "$LOG") 2>&1

echo "== $(date -u +%FT%TZ) device check"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"

echo "== GPU tests: kernels on CUDA with explicit blocks, then the gpu-marked tests (autotuned, compile)"
FASTPEFT_AUTOTUNE=0 timeout 240 pytest -q -x tests/test_kernels_lora.py -m "not gpu" -p no:cacheprovider
rc_small=$?
timeout 180 pytest -q tests/ -m gpu -p no:cacheprovider
rc_gpu=$?

echo "== benchmark"
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
stamp=$(date -u +%Y-%m-%d)
timeout 330 fastpeft bench --quiet --warmup-ms 10 --rep-ms 40 ${BENCH_ARGS:-} \
    --json "$OUT/bench_lora.json" --markdown "$OUT/bench_lora.md" --plot "$OUT/bench_lora.png"
rc_bench=$?
if [ -f "$OUT/bench_lora.md" ]; then
    cp "$OUT/bench_lora.md" "benchmarks/results/lora-${card}-${stamp}.md"
fi
echo "== done: small-shape tests rc=$rc_small, gpu tests rc=$rc_gpu, bench rc=$rc_bench"
[ "$rc_small" -eq 0 ] && [ "$rc_gpu" -eq 0 ] && [ "$rc_bench" -eq 0 ]
