#!/usr/bin/env bash
# bench/gpu/session.sh: everything issue 8 asks of a GPU, in one command that fits a device lease,
# most valuable first, each part given what is left of a time budget. Run ON the GPU machine from
# the repo root, with dist/cuda carried (`make build-cuda CUDA_TESTS=1`):
#
#   bash bench/gpu/session.sh OUT [BUDGET_S]     # e.g. the device tool's $OUT, 560
#
#   1. `make bench-gpu RECORD=1` without its kernels stage: the kernel tests' CUDA cases, then the
#      speed table against PyTorch and the profiles (--deadline-s: 45% of the budget);
#   2. `make pipeline-gpu`: stories260K end to end on cuda, compared with the CPU perplexities
#      (with 150 s or more left; stopped 90 s before the budget ends, and resumable);
#   3. the bench's kernels stage, GPU time by kernel from Nsight Compute (with 90 s or more left;
#      into OUT/kernels);
#   4. `make sanitize-gpu`: the kernel tests under compute-sanitizer (with 60 s or more left).
# Logs and results go to OUT (8 files at most: results.json, table.md, RESULTS.md, bench.log,
# pipeline.log, sanitize.log, kernels/results.json, kernels/table.md). Exit 0 when every part
# that ran passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: session.sh OUT [BUDGET_S]}
budget=${2:-560}
mkdir -p "$out"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
rc=0
# Most valuable first (bench_gpu.py runs them in this order, and its deadline skips the rest): the
# four goals' rows, with the flash kernels' right after the default ones they may replace, then
# goal 3's online-teacher reading, then the rows that say what each fused part gains, the profile,
# gradient accumulation (distill-accum), BitDistiller's quantizer (distill-bitdistiller) and the
# allocation settings (sample-alloc).
stages=sample,distill,eval,eval-flash,distill-flash,distill-teacher,sample-flash,sample-host,distill-composed,profile,distill-accum,distill-bitdistiller,sample-alloc

make bench-gpu RECORD=1 BENCH_GPU_FLAGS="--results $out --deadline-s $((budget * 45 / 100)) --stages $stages" \
    2>&1 | tee "$out/bench.log" || rc=1
cp bench/RESULTS.md "$out/" 2>/dev/null

if [ "$(left)" -ge 150 ]; then
    echo "session.sh: pipeline-gpu with $(left) s left" >&2
    timeout "$(($(left) - 90))" make pipeline-gpu > "$out/pipeline.log" 2>&1 || rc=1
    tail -n 30 "$out/pipeline.log"
else
    echo "session.sh: pipeline-gpu SKIPPED, $(left) s left" | tee "$out/pipeline.log" >&2
fi

if [ "$(left)" -ge 90 ]; then
    echo "session.sh: bench-gpu kernels stage with $(left) s left" >&2
    BENCH_GPU_SKIP_TESTS=1 timeout "$(($(left) - 30))" make bench-gpu \
        BENCH_GPU_FLAGS="--results $out/kernels --deadline-s $(($(left) - 60)) --stages kernels" \
        2>&1 | tail -n 60 || rc=1
else
    echo "session.sh: kernels SKIPPED, $(left) s left" >&2
fi

if [ "$(left)" -ge 60 ]; then
    echo "session.sh: sanitize-gpu with $(left) s left" >&2
    SANITIZE_TIMEOUT=$(($(left) / 8)) make sanitize-gpu > "$out/sanitize.log" 2>&1 || rc=1
    grep -E "ERROR SUMMARY|FAILED|run.sh:" "$out/sanitize.log" | tail -n 20
else
    echo "session.sh: sanitize-gpu SKIPPED, $(left) s left" >&2
fi
echo "session.sh: done in $((SECONDS - start)) s, rc $rc" >&2
exit $rc
