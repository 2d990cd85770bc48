#!/usr/bin/env bash
# One prepared GPU check: the GPU tests, then the LoRA, many-adapter and sparse-delta benchmark tables. Writes its
# log, JSON and a markdown table to $OUT (when set) and the markdown table under benchmarks/results/ (card, date,
# versions in its header). Needs no network: installs the checkout with --no-deps.
#   bash benchmarks/device_check.sh                # full grid (about 5 minutes on an H100)
#   BENCH_ARGS="--tokens 8192 --shapes 4096x4096 --ranks 16" BENCH_MULTI_ARGS="--adapters 64" \
#       BENCH_SPARSE_ARGS="--density 0.01 --block 1 32" bash benchmarks/device_check.sh
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
FASTPEFT_AUTOTUNE=0 timeout 200 pytest -q -x tests/test_kernels_lora.py tests/test_kernels_multi.py -m "not gpu" \
    -p no:cacheprovider
rc_small=$?
FASTPEFT_AUTOTUNE=0 timeout 150 pytest -q -x tests/test_kernels_sparse.py -m "not gpu" -p no:cacheprovider
rc_small=$(( rc_small | $? ))
timeout 150 pytest -q tests/ -m gpu -p no:cacheprovider
rc_gpu=$?

echo "== benchmark"
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
stamp=$(date -u +%Y-%m-%d)
timeout 240 fastpeft bench lora --quiet --warmup-ms 10 --rep-ms 30 ${BENCH_ARGS:-} \
    --json "$OUT/bench_lora.json" --markdown "$OUT/bench_lora.md" --plot "$OUT/bench_lora.png"
rc_bench=$?
timeout 120 fastpeft bench multi --quiet --warmup-ms 10 --rep-ms 30 ${BENCH_MULTI_ARGS:-} \
    --json "$OUT/bench_multi.json" --markdown "$OUT/bench_multi.md"
rc_multi=$?
timeout 90 fastpeft bench sparse --quiet --warmup-ms 5 --rep-ms 20 ${BENCH_SPARSE_ARGS:-} \
    --json "$OUT/bench_sparse.json" --markdown "$OUT/bench_sparse.md"
rc_sparse=$?
for t in lora multi sparse; do
    if [ -f "$OUT/bench_$t.md" ]; then cp "$OUT/bench_$t.md" "benchmarks/results/$t-${card}-${stamp}.md"; fi
done
echo "== done: small-shape tests rc=$rc_small, gpu tests rc=$rc_gpu, bench lora rc=$rc_bench, multi rc=$rc_multi," \
    "sparse rc=$rc_sparse"
[ "$rc_small" -eq 0 ] && [ "$rc_gpu" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_multi" -eq 0 ] && [ "$rc_sparse" -eq 0 ]
