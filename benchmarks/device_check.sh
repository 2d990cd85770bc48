#!/usr/bin/env bash
# One prepared GPU check (issue 12 item 6), at most ~8 minutes: in this order
#   1. the GPU tests (the gpu-marked tests but those of torch.compile and CUDA graphs, whose inductor compiles
#      would eat the benches' time: they are step 4; then the kernels with explicit blocks); meanwhile the profile
#      and the benches' groups warm triton's cache in the background (their autotuning compiles, side by side);
#   2. `fastpeft bench lora | multi | sparse | qlora | dora` at the target shapes (M=8192; K x N = 4096x4096, then
#      4096x14336 and 14336x4096; r=16; p 0 and 0.1; 64 adapters; 1 % sparse, unstructured and 32x32 blocks; RoSA
#      rows in --sparse), each fastpeft row with its error against a reference path in the same run;
#   3. benchmarks/profile_lora.py: the per-kernel torch.profiler table of LoRA fwd+bwd at M=8192, K=N=4096,
#      r=16, p in {0, 0.1} (kernel, µs, bytes moved, TB/s or TFLOP/s, % of peak), the TMA GEMM against
#      cuBLAS, then the decode tables (M 1/16/64) eager and under CUDA graphs: one adapter, and 8 adapters one per
#      token on the BGMV and the grouped paths; last, the other TMA kernels beside their alternatives (64 adapters
#      at prefill grouped vs fused; a 1 % block-sparse delta on densify + cuBLAS, the pointer and the TMA GEMM);
#   4. the gpu-marked torch.compile and CUDA-graph tests (reduce-overhead with dropout among them), in what is left.
# Everything goes to $OUT and the tables to benchmarks/results/ named by card and date (bench_lora.md ->
# bench-lora-CARD-DATE.md); headers carry card, torch, triton and date. The device tool brings back at most 8 files
# from $OUT, so after each step its JSON and markdown move into one archive, device-check-CARD-DATE.tar.gz, under
# those names: $OUT holds the log, the archive and at most the running step's files, wherever a timeout cuts
# (`tar xzf device-check-*.tar.gz -C benchmarks/results` here, after the call).
# Each step has its own timeout inside a total budget (BUDGET seconds, default 470) and a guaranteed share of it
# (SHARE below): a step runs at most until only the shares of the selected steps after it are left, so that a slow
# step (the tests, whose compiles nobody has timed on a card yet) cannot take the benches' time. A cut step gets
# SIGINT first: pytest then prints its summary of what ran, a bench keeps the rows it has written.
#   bash benchmarks/device_check.sh               # on the card (first, here: bash benchmarks/device_wheels.sh, and
#                                                 # the device call with carry [".whl"]: bitsandbytes for QLoRA)
#   bash benchmarks/device_check.sh --smoke       # dry run on the CPU under TRITON_INTERPRET=1, tiny shapes;
#                                                 # what needs CUDA is skipped with a printed line
#   bash benchmarks/device_check.sh --sparse      # the sparse ops only (issue 12 item 5), BUDGET default 420 s:
#       1. their tests with explicit blocks (test_kernels_sparse.py, the floor's in test_timed_choice.py);
#       2. their gpu-marked tests (autotuned: the LLM shape, torch.compile, the floor timed on the card, backend
#          "auto" with the ops added to AUTO_OPS, bitwise reproducibility);
#       3. `fastpeft bench sparse` at M=8192, 4096x4096, 1 %, blocks 1 and 32, alone and as RoSA (r=16), 240 s of
#          the budget kept for it. What it must show before the ops join AUTO_OPS: kernels/__init__.py.
#     (--smoke --sparse: the same steps' dry run.)
#   bash benchmarks/device_check.sh --only="bench lora 4096x4096,profile"   # a rerun of some steps only: those whose
#       name (as printed after "==") contains one of the comma-separated words; BUDGET=SECONDS bounds the rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
SPARSE_ONLY=0
ONLY=""
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        --sparse) SPARSE_ONLY=1 ;;
        --only=*) ONLY="${arg#--only=}" ;;
        *) echo "usage: $0 [--smoke] [--sparse] [--only=WORD,WORD...]"; exit 2 ;;
    esac
done
# selected NAME: whether step NAME runs (every step without --only; else those naming one of its words).
selected() {
    [ -z "$ONLY" ] && return 0
    local word
    IFS=',' read -ra words <<< "$ONLY"
    for word in "${words[@]}"; do
        [ -n "$word" ] && [[ "$1" == *"$word"* ]] && return 0
    done
    return 1
}
stamp=$(date -u +%Y-%m-%d)
if [ "$SMOKE" = 1 ]; then
    OUT="${OUT:-$(mktemp -d /tmp/fastpeft-smoke-XXXX)}"
    BUDGET="${BUDGET:-1500}"
    export TRITON_INTERPRET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    OUT="${OUT:-benchmarks/results/device-check-$stamp}"
    if [ "$SPARSE_ONLY" = 1 ]; then BUDGET="${BUDGET:-420}"; else BUDGET="${BUDGET:-470}"; fi
    export TRITON_INTERPRET=0
fi
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
mkdir -p "$OUT" benchmarks/results
RUN_ID=$(date -u +%H%M%S)
LOG="$OUT/device_check${ONLY:+-only-$RUN_ID}.log"  # a rerun (--only) keeps the first run's log
exec > >(tee "$LOG") 2>&1

SUMMARY=()
FAILED=0
# The guaranteed share of each step, seconds (a card run; --smoke has no shares: its budget is generous). The
# shares of a full run add up to 430 of the 470 s: the ~20 s of install and version prints come first, and the
# slack goes to whichever step needs it first. Not yet calibrated on a card: the summary prints each step's seconds.
declare -A SHARE=(
    ["gpu-marked tests (autotuned; not compile / CUDA graphs)"]=45
    ["kernel tests lora / lora_tma / multi / bgmv (explicit blocks)"]=40
    ["kernel tests sparse + the floor's (explicit blocks)"]=20
    ["bench lora 4096x4096"]=80
    ["bench lora 4096x14336, 14336x4096"]=35
    ["bench multi"]=35
    ["bench sparse"]=35
    ["bench qlora"]=30
    ["bench dora"]=30
    ["profile_lora"]=80
    ["gpu-marked CUDA-graph + compile tests"]=0
    # --sparse
    ["sparse kernel + floor tests (explicit blocks)"]=60
    ["gpu-marked sparse tests (autotuned, compile, the floor timed)"]=60
    ["sparse bench sparse"]=240
)
PLAN=()  # the selected steps of this run, in the order they run: plan NAME... before the first one
plan() {
    local name
    for name in "$@"; do
        if [ "$SMOKE" = 0 ] && selected "$name"; then PLAN+=("$name"); fi
    done
}
# reserved NAME: the shares of the planned steps after NAME, seconds.
reserved() {
    local name after=0 sum=0
    for name in "${PLAN[@]}"; do
        if [ "$after" = 1 ]; then sum=$(( sum + ${SHARE[$name]:-0} )); fi
        if [ "$name" = "$1" ]; then after=1; fi
    done
    echo "$sum"
}
# The signal that cuts a step: SIGINT (pytest prints its summary, a bench stops between rows), or SIGTERM where
# this script was started with SIGINT ignored (as a background job is), which its commands would inherit.
CUT=INT
if [ -n "$(trap -p INT)" ]; then CUT=TERM; fi
# run NAME SECONDS CMD...: CMD under `timeout`, cut to what is left of the budget less the later steps' shares;
# skipped when under 15 s is left. At the cut CMD gets $CUT, and SIGKILL 10 s later if still running.
run() {
    local name=$1 t=$2
    shift 2
    if ! selected "$name"; then
        echo "== not selected: $name"
        return
    fi
    local later
    later=$(reserved "$name")
    local left=$(( BUDGET - later - SECONDS ))
    if [ "$left" -lt 15 ]; then
        echo "== SKIPPED $name: the ${BUDGET}s budget is spent (${later}s kept for the later steps)"
        SUMMARY+=("$name: skipped (budget)")
        FAILED=1
        return
    fi
    if [ "$t" -gt "$left" ]; then t=$left; fi
    echo "== [$SECONDS s] $name (timeout ${t}s; ${later}s kept for the later steps)"
    local t0=$SECONDS
    timeout -s "$CUT" -k 10 "$t" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        SUMMARY+=("$name: TIMEOUT after ${t}s")
    else
        SUMMARY+=("$name: rc=$rc, $(( SECONDS - t0 ))s")
    fi
    if [ "$rc" -ne 0 ]; then FAILED=1; fi
    pack
}
# pack: every file of $OUT but the log and the archive moves into $PACKED under its benchmarks/results/ name, and
# the archive of $PACKED is rewritten (atomically: a cut leaves the previous one whole).
pack() {
    local f base
    for f in "$OUT"/*; do
        [ -f "$f" ] || continue
        case "$f" in "$LOG"|"$ARCHIVE"|*.tar.gz.part) continue ;; esac
        base=$(basename "$f")
        mv "$f" "$PACKED/$(echo "${base%.*}" | tr _ -)-${card}-${stamp}.${base##*.}"
    done
    if compgen -G "$PACKED/*" > /dev/null; then
        tar czf "$ARCHIVE.part" -C "$PACKED" . && mv "$ARCHIVE.part" "$ARCHIVE"
    fi
}
skip() { echo "SKIPPED (needs CUDA): $*"; SUMMARY+=("$*: skipped (needs CUDA)"); }

echo "== $(date -u +%FT%TZ) device check$([ "$SMOKE" = 1 ] && echo ' --smoke (CPU, TRITON_INTERPRET=1)') -> $OUT"
if [ "$SMOKE" = 1 ]; then
    skip "nvidia-smi and the editable install"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    $PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
    # Wheels the image lacks (bitsandbytes), fetched offline by benchmarks/device_wheels.sh and carried as .whl/.
    if compgen -G ".whl/*.whl" > /dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || echo "wheel install failed: .whl/ skipped"
    fi
fi
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
$PY -c "
import importlib.util as u
for m in ('peft', 'transformers', 'bitsandbytes'):
    if u.find_spec(m) is None:
        print(m, 'missing' + (': the QLoRA GPU rows need it (benchmarks/device_wheels.sh, carry .whl)' if m == 'bitsandbytes' else ''))
    else:
        print(m, __import__(m).__version__)
" 2>&1 | grep -v 'kernels-community'
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
if [ "$SMOKE" = 1 ]; then card="cpu-smoke"; fi
PACKED=$(mktemp -d)
ARCHIVE="$OUT/device-check-${card}-${stamp}${ONLY:+-only-$RUN_ID}.tar.gz"

if [ "$SPARSE_ONLY" = 1 ]; then
    # The sparse ops' tests: in test_timed_choice.py only the sparse ones (-k sparse) run on CUDA tensors.
    SPARSE_TESTS="tests/test_kernels_sparse.py tests/test_timed_choice.py"
    if [ "$SMOKE" = 1 ]; then
        SPARSE="--tokens 32 --shape 64x64 --density 0.05 --block 1 32 --lora-rank 0 16 --dtype float32"
        SPARSE="$SPARSE --warmup-ms 1 --rep-ms 2"
    else
        SPARSE="--tokens 8192 --shape 4096x4096 --density 0.01 --block 1 32 --lora-rank 0 16 --warmup-ms 5 --rep-ms 20"
    fi
    plan "sparse kernel + floor tests (explicit blocks)" "gpu-marked sparse tests (autotuned, compile, the floor timed)" \
        "sparse bench sparse"
    echo "== 1. sparse tests"
    if [ "$SMOKE" = 1 ]; then
        run "sparse floor tests (interpreter)" 600 $PY -m pytest -q -x -p no:cacheprovider tests/test_timed_choice.py \
            -m "not gpu" -k sparse
        skip "gpu-marked sparse tests"
    else
        # shellcheck disable=SC2086
        run "sparse kernel + floor tests (explicit blocks)" 150 env FASTPEFT_AUTOTUNE=0 $PY -m pytest -v -rfE \
            --maxfail=10 -p no:cacheprovider $SPARSE_TESTS -m "not gpu" -k sparse
        # shellcheck disable=SC2086
        run "gpu-marked sparse tests (autotuned, compile, the floor timed)" 120 $PY -m pytest -v -rfE \
            -p no:cacheprovider $SPARSE_TESTS tests/test_determinism.py -m gpu -k "sparse or use_deterministic"
    fi
    echo "== 2. fastpeft bench sparse (ratios to nn.Linear measured in one run; path: what the floor ran)"
    # shellcheck disable=SC2086
    run "sparse bench sparse" 240 $PY -m fastpeft bench sparse --quiet $SPARSE --json "$OUT/bench_sparse.json" \
        --markdown "$OUT/bench_sparse.md"
    if [ "$SMOKE" = 0 ]; then cp "$PACKED"/* benchmarks/results/ 2>/dev/null; fi
    if [ -f "$ARCHIVE" ]; then echo "== tables: $ARCHIVE"; fi
    echo "== done in ${SECONDS}s (budget ${BUDGET}s):"
    for s in "${SUMMARY[@]}"; do echo "   $s"; done
    [ "$FAILED" -eq 0 ]
    exit
fi

plan "gpu-marked tests (autotuned; not compile / CUDA graphs)" \
    "kernel tests lora / lora_tma / multi / bgmv (explicit blocks)" "kernel tests sparse + the floor's (explicit blocks)" \
    "bench lora 4096x4096" "bench lora 4096x14336, 14336x4096" "bench multi" "bench sparse" "bench qlora" "bench dora" \
    "profile_lora" "gpu-marked CUDA-graph + compile tests"
# The benches' options (step 2) and the profile's (step 3).
if [ "$SMOKE" = 1 ]; then
    LORA1="--tokens 16 --shapes 64x80 --ranks 16 --dtype float32 --warmup-ms 1 --rep-ms 2"
    LORA2_SHAPES="80x64"
    LORA2="--tokens 16 --shapes $LORA2_SHAPES --ranks 16 --dtype float32 --warmup-ms 1 --rep-ms 2"
    MULTI="--decode 4 --prefill 32 --adapters 2 --ranks 16 --shape 64x64 --dtype float32 --warmup-ms 1 --rep-ms 2"
    SPARSE="--tokens 32 --shape 64x64 --density 0.05 --block 1 32 --dtype float32 --warmup-ms 1 --rep-ms 2"
    QLORA="--tokens 1 16 --shapes 128x64 --ranks 16 --dtype float32 --warmup-ms 1 --rep-ms 2"
    DORA="--tokens 16 --shapes 64x80 --ranks 16 --dtype float32 --warmup-ms 1 --rep-ms 2"
    PROFILE="--smoke"
else
    LORA1="--tokens 8192 --shapes 4096x4096 --ranks 16 --warmup-ms 10 --rep-ms 30"
    LORA2_SHAPES="4096x14336 14336x4096"
    LORA2="--tokens 8192 --shapes $LORA2_SHAPES --ranks 16 --warmup-ms 10 --rep-ms 30"
    MULTI="--decode 16 64 --prefill 8192 --adapters 1 64 --ranks mixed --shape 4096x4096 --warmup-ms 10 --rep-ms 30"
    SPARSE="--tokens 8192 --shape 4096x4096 --density 0.01 --block 1 32 --warmup-ms 5 --rep-ms 20"
    QLORA="--tokens 1 16 64 512 8192 --shapes 4096x4096 --ranks 16 --warmup-ms 5 --rep-ms 20"
    DORA="--tokens 8192 --shapes 4096x4096 --ranks 16 --warmup-ms 10 --rep-ms 30"
    PROFILE="--tokens 8192 --k 4096 --n 4096 --rank 16 --dropout 0 0.1 --decode 1 16 64"
fi

# The warm-up: each bench's first calls autotune, compiling every config one after another in its process. While the
# tests run, the profile and the benches' groups run side by side in the background (WARM_JOBS at a time, 1 ms
# timings, output to /tmp) and leave their kernels compiled in triton's on-disk cache; step 2 stops whatever is
# still running. The
# timings it takes are thrown away, and no choice it makes outlives its process (autotuning and fastpeft's timed
# choices are per process), so the sharing of the card cannot bias a table.
WARM_PID=""
WARM_N=0
WARM_LOG=$(mktemp /tmp/fastpeft-warm-XXXX.log)
if [ "$SMOKE" = 1 ]; then WARM_JOBS="${WARM_JOBS:-2}"; else WARM_JOBS="${WARM_JOBS:-8}"; fi
warm_start() {
    if ! command -v setsid > /dev/null; then return; fi
    local fast="--warmup-ms 1 --rep-ms 1 --quiet" cmds=() d sh B="-m fastpeft bench"
    # the profile first: the longest job (its tables are written to /tmp and thrown away)
    if selected "profile_lora"; then cmds+=("benchmarks/profile_lora.py $PROFILE --out $WARM_LOG.profile"); fi
    if selected "bench lora 4096x4096"; then
        for d in 0 0.1; do
            cmds+=("$B lora $LORA1 --dropout $d --modes fwd $fast" "$B lora $LORA1 --dropout $d --modes fwd+bwd $fast")
        done
    fi
    if selected "bench lora 4096x14336, 14336x4096"; then
        for sh in $LORA2_SHAPES; do
            for d in 0 0.1; do cmds+=("$B lora $LORA2 --shapes $sh --dropout $d --modes fwd+bwd $fast"); done
        done
    fi
    if selected "bench multi"; then cmds+=("$B multi $MULTI --prefill $fast" "$B multi $MULTI --decode $fast"); fi
    if selected "bench sparse"; then
        cmds+=("$B sparse $SPARSE --block 1 $fast" "$B sparse $SPARSE --block 32 $fast")
    fi
    if selected "bench dora"; then cmds+=("$B dora $DORA --dropout 0 $fast" "$B dora $DORA --dropout 0.1 $fast"); fi
    if selected "bench qlora"; then cmds+=("$B qlora $QLORA $fast"); fi
    if [ "${#cmds[@]}" = 0 ]; then return; fi
    printf '%s\n' "${cmds[@]}" > "$WARM_LOG.cmds"
    # xargs runs each line as the arguments of `$PY`, WARM_JOBS at a time, in a process group of its own
    setsid xargs -P "$WARM_JOBS" -L 1 $PY < "$WARM_LOG.cmds" > "$WARM_LOG" 2>&1 &
    WARM_PID=$!
    WARM_N=${#cmds[@]}
    echo "== [$SECONDS s] warm-up: $WARM_N jobs (the profile, the bench groups) in the background, $WARM_JOBS at a" \
        "time (log $WARM_LOG)"
}
warm_stop() {
    if [ -z "$WARM_PID" ]; then return; fi
    if kill -0 "$WARM_PID" 2> /dev/null; then
        kill -TERM -- -"$WARM_PID" 2> /dev/null  # not INT: a background job ignores it
        sleep 3
        kill -KILL -- -"$WARM_PID" 2> /dev/null
        echo -n "== [$SECONDS s] warm-up stopped (the benches start): "
    else
        echo -n "== [$SECONDS s] warm-up done: "
    fi
    wait "$WARM_PID" 2> /dev/null
    echo "$(grep -c -e "median ms" -e "^wrote .*profile_lora.md" "$WARM_LOG") of $WARM_N jobs ran to the end"
    grep -E "Error|error:|Traceback" "$WARM_LOG" | head -5
    WARM_PID=""
}

# The tests compile a few hundred kernel variants (and inductor graphs): with pytest-xdist (in the GPU image) 8
# processes compile them side by side on the card's CPU cores. No test asserts a time, so sharing the card is safe.
XDIST=()
if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "${XDIST_WORKERS:-8}"); fi
echo "== 1. tests${XDIST[*]:+ (pytest ${XDIST[*]})}"
warm_start
if [ "$SMOKE" = 1 ]; then
    # The interpreter runs the kernel tests on CPU tensors; a small subset keeps the dry run short.
    run "kernel tests (interpreter subset)" 600 $PY -m pytest -q -x -p no:cacheprovider "${XDIST[@]}" tests/test_kernels_lora_tma.py \
        tests/test_kernels_lora.py tests/test_kernels_bgmv.py tests/test_roofline.py \
        -k "M33 or bit_for_bit or pointer_kernel or subtiles or roofline or launches"
    skip "gpu-marked tests (pytest -m gpu)"
else
    # The gpu-marked tests first: they run the autotuned configs at the LLM shapes and the card-only cases (the TMA
    # kernels' waits on a real persistent grid), and leave those configs compiled in triton's cache for the benches.
    # torch.compile and CUDA-graph tests (inductor compiles: the slow ones) wait for step 4. Up to 10 failures a
    # step are reported (not -x): each is a finding for the one rerun. -v: each outcome is in the log as it comes,
    # so a step cut by SIGTERM (no summary then) still shows what ran and what failed.
    run "gpu-marked tests (autotuned; not compile / CUDA graphs)" 80 $PY -m pytest -v -rfE --maxfail=10 \
        -p no:cacheprovider "${XDIST[@]}" tests/ -m gpu --ignore=tests/test_compile.py --ignore=tests/test_cuda_graphs.py
    run "kernel tests lora / lora_tma / multi / bgmv (explicit blocks)" 120 env FASTPEFT_AUTOTUNE=0 $PY -m pytest -v \
        -rfE --maxfail=10 -p no:cacheprovider "${XDIST[@]}" tests/test_kernels_lora.py tests/test_kernels_lora_tma.py \
        tests/test_kernels_multi.py tests/test_kernels_bgmv.py tests/test_fp16_range.py -m "not gpu"
    run "kernel tests sparse + the floor's (explicit blocks)" 90 env FASTPEFT_AUTOTUNE=0 $PY -m pytest -v -rfE \
        --maxfail=10 -p no:cacheprovider "${XDIST[@]}" tests/test_kernels_sparse.py tests/test_timed_choice.py \
        -m "not gpu" -k sparse
fi

warm_stop
echo "== 2. fastpeft bench (ratios to nn.Linear measured in one run)"
# shellcheck disable=SC2086  # the option strings are word lists
run "bench lora 4096x4096" 130 $PY -m fastpeft bench lora --quiet $LORA1 --dropout 0 0.1 \
    --json "$OUT/bench_lora.json" --markdown "$OUT/bench_lora.md"
# shellcheck disable=SC2086
run "bench lora 4096x14336, 14336x4096" 90 $PY -m fastpeft bench lora --quiet $LORA2 --dropout 0 0.1 \
    --modes fwd+bwd --json "$OUT/bench_lora_wide.json" --markdown "$OUT/bench_lora_wide.md"
# shellcheck disable=SC2086
run "bench multi" 80 $PY -m fastpeft bench multi --quiet $MULTI --json "$OUT/bench_multi.json" \
    --markdown "$OUT/bench_multi.md"
# shellcheck disable=SC2086
run "bench sparse" 90 $PY -m fastpeft bench sparse --quiet $SPARSE --json "$OUT/bench_sparse.json" \
    --markdown "$OUT/bench_sparse.md"
# shellcheck disable=SC2086
run "bench qlora" 60 $PY -m fastpeft bench qlora --quiet $QLORA --json "$OUT/bench_qlora.json" \
    --markdown "$OUT/bench_qlora.md"
run "bench dora" 60 $PY -m fastpeft bench dora --quiet $DORA --dropout 0 0.1 --json "$OUT/bench_dora.json" \
    --markdown "$OUT/bench_dora.md"

echo "== 3. per-kernel profile (torch.profiler) and the decode table, eager and under CUDA graphs"
if [ "$SMOKE" = 1 ]; then
    run "profile_lora --smoke" 600 $PY benchmarks/profile_lora.py $PROFILE --out "$OUT"
else
    # shellcheck disable=SC2086
    run "profile_lora" 110 $PY benchmarks/profile_lora.py $PROFILE --out "$OUT"
fi

echo "== 4. torch.compile and CUDA-graph tests (what is left of the budget)"
if [ "$SMOKE" = 1 ]; then
    skip "gpu-marked torch.compile / CUDA-graph tests"
else
    run "gpu-marked CUDA-graph + compile tests" 150 $PY -m pytest -v -rfE -p no:cacheprovider "${XDIST[@]}" \
        tests/test_cuda_graphs.py tests/test_compile.py -m gpu
fi

if [ "$SMOKE" = 1 ]; then
    echo "smoke: tables stay in $ARCHIVE (not copied to benchmarks/results/)"
else
    # markdown and JSON rows alike: `fastpeft bench plot` charts the rows later, off the card
    cp "$PACKED"/* benchmarks/results/ 2>/dev/null
    if [ -f "$ARCHIVE" ]; then echo "== tables: $ARCHIVE"; fi
fi
echo "== done in ${SECONDS}s (budget ${BUDGET}s):"
for s in "${SUMMARY[@]}"; do echo "   $s"; done
[ "$FAILED" -eq 0 ]
