#!/usr/bin/env bash
# bench/gpu/run.sh: `make bench-gpu` and `make pipeline-gpu`, run ON the GPU machine from the repo
# root with the binaries `make build-cuda` packed (no Rust, no network needed there).
#
#   bash bench/gpu/run.sh bench [bench_gpu.py flags]     # the speed table (bench/gpu/bench_gpu.py)
#   bash bench/gpu/run.sh pipeline [make variables]      # stories260K pipeline on cuda vs CPU numbers
#   bash bench/gpu/run.sh kernels                        # only the CUDA kernel unit tests
#   bash bench/gpu/run.sh sanitize                       # those under compute-sanitizer (memcheck,
#                                                        # racecheck): what the emulation cannot see
# bench and pipeline start with the kernel tests (packed by build-cuda as bin/test-*; their
# CUDA cases compare the kernels with the CPU on the GPU) and go on whatever they report.
#
# Binaries: $BENCH_BIN, else dist/cuda/bin, unpacked from dist/cuda/qat-cuda-bin.tar.xz if absent.
# Data: $QAT_DATA, else ../shared/data, shared/data or dist/cuda/data (the copy build-cuda makes),
# whichever holds models/llama2-tokenizer. Python: $BENCH_PYTHON, else python3 (with torch).
# BENCH_GPU_SMOKE=1: `bench` on the CPU with the CPU binaries (target/release) and the bench venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:?usage: run.sh bench|pipeline [args]}
shift

data=
for d in "${QAT_DATA:-}" ../shared/data shared/data dist/cuda/data; do
    if [ -n "$d" ] && [ -d "$d/models/llama2-tokenizer" ]; then data=$(cd "$d" && pwd); break; fi
done
[ -n "$data" ] || { echo "run.sh: no data dir with models/llama2-tokenizer (set QAT_DATA)" >&2; exit 2; }

smoke=${BENCH_GPU_SMOKE:-}
[ "$smoke" = 0 ] && smoke=
if [ -n "$smoke" ]; then
    bin=${BENCH_BIN:-target/release}
    py=${BENCH_PYTHON:-${BENCH_VENV:-$HOME/.cache/qat/bench-venv}/bin/python}
else
    bin=${BENCH_BIN:-dist/cuda/bin}
    py=${BENCH_PYTHON:-python3}
    if [ ! -x "$bin/qat-sample" ] && [ -f dist/cuda/qat-cuda-bin.tar.xz ]; then
        echo "run.sh: unpacking dist/cuda/qat-cuda-bin.tar.xz" >&2
        mkdir -p dist/cuda && xz -dc dist/cuda/qat-cuda-bin.tar.xz | tar -C dist/cuda -xf -
        bin=dist/cuda/bin
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
fi
[ -x "$bin/qat-sample" ] || { echo "run.sh: no qat binaries in $bin (make build-cuda, then carry dist/cuda)" >&2; exit 2; }

# The unit tests of the crates with CUDA code paths (kernels, the clipping search), filtered to
# their CUDA cases.
kernels() {
    local t rc=0
    for t in "$bin"/test-*; do
        [ -x "$t" ] || continue
        echo "run.sh: $(basename "$t") cuda" >&2
        "$t" cuda --test-threads 1 --nocapture >&2 || rc=1
    done
    return $rc
}

# Each fused kernel's CUDA test (binary, name filter) and the switch that turns the kernel off (or
# the allocation settings of qat_model::tune_cuda_allocations back to the defaults)
# (README.md, CUDA). After a failed kernel test run, every kernel whose own test fails is switched
# off for the rest of the run (exported), so that the bench and the pipeline still measure the
# rest correctly; bench_gpu.py lists the switches it finds off under its table.
switch_tests="
qat-model norm::tests::cuda QAT_CUDA_FUSED_NORM
qat-model residual_add::tests::cuda QAT_CUDA_FUSED_ADD_NORM
qat-model llama::tests::joined_projections_on_cuda QAT_CUDA_FUSED_QKV
qat-model llama::tests::joined_projections_on_cuda QAT_CUDA_FUSED_GATE_UP
qat-model swiglu::tests::cuda_joined QAT_CUDA_FUSED_GATE_UP
qat-model swiglu::tests::cuda_matches QAT_CUDA_FUSED_SWIGLU
qat-model rope::tests::cuda QAT_CUDA_FUSED_ROPE
qat-model llama::tests::kv_written_into_the_cache_on_cuda QAT_CUDA_FUSED_KV_WRITE
qat-model causal_softmax::tests::cuda QAT_CUDA_FUSED_SOFTMAX
qat-model device::tests::cuda QAT_CUDA_SKIP_ALLOC_EVENTS
qat-model device::tests::cuda QAT_CUDA_KEEP_FREED_MEMORY
qat-quant fused::tests::cuda QAT_CUDA_FUSED_QUANT
qat-quant fused_asym::tests::cuda QAT_CUDA_FUSED_ASYM
qat-quant fused_nf::tests::cuda QAT_CUDA_FUSED_NF
qat-train optim::tests::cuda QAT_CUDA_FUSED_ADAMW
qat-train sum_squares::tests::cuda QAT_CUDA_FUSED_GRAD_NORM
qat-train bucket_lse::tests::cuda QAT_CUDA_FUSED_LOSS
qat-train grad_sum::tests::cuda QAT_CUDA_FUSED_GRAD_SUM
qat-sample device_rows::tests::cuda QAT_CUDA_FUSED_SAMPLE
qat-model attention::tests::cuda QAT_CUDA_FLASH_ATTENTION
qat-model llama::tests::flash QAT_CUDA_FLASH_ATTENTION
"
switch_off_failed_kernels() {
    local crate filter var t
    while read -r crate filter var; do
        [ -n "$crate" ] || continue
        t="$bin/test-$crate"
        [ -x "$t" ] || continue
        if ! "$t" "$filter" --test-threads 1 >/dev/null 2>&1; then
            echo "run.sh: $filter FAILED: $var=0 for the rest of this run" >&2
            export "$var=0"
        fi
    done <<< "$switch_tests"
}

# The CUDA cases of the packed tests under compute-sanitizer: out-of-bounds and misaligned
# accesses (memcheck) and shared-memory races (racecheck) in qat's own kernels, which the CPU
# emulation of the kernel tests cannot show. Each tool run is capped (SANITIZE_TIMEOUT, default
# 150 s), since the sanitizer slows kernels down many times.
sanitize() {
    local cs t tool rc=0
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | tail -1 || true)
    [ -n "$cs" ] || { echo "run.sh: compute-sanitizer not found" >&2; return 2; }
    for tool in memcheck racecheck; do
        for t in "$bin"/test-*; do
            [ -x "$t" ] || continue
            echo "run.sh: compute-sanitizer --tool $tool $(basename "$t") cuda" >&2
            timeout "${SANITIZE_TIMEOUT:-150}" "$cs" --tool "$tool" --error-exitcode 1 \
                "$t" cuda --test-threads 1 >&2 || { echo "run.sh: $tool FAILED on $(basename "$t")" >&2; rc=1; }
        done
    done
    return $rc
}

case $what in
kernels) kernels ;;
sanitize) sanitize ;;
bench)
    # BENCH_GPU_SKIP_TESTS=1: a second bench run of a session (bench/gpu/session.sh) skips them.
    if [ -z "$smoke" ] && [ -z "${BENCH_GPU_SKIP_TESTS:-}" ] && ! kernels; then
        echo "run.sh: CUDA KERNEL TESTS FAILED (see above); benchmarking anyway" >&2
        switch_off_failed_kernels
    fi
    exec "$py" bench/gpu/bench_gpu.py --bin "$bin" --data "$data" "$@" ;;
pipeline)
    if ! kernels; then
        echo "run.sh: CUDA KERNEL TESTS FAILED (see above); running the pipeline anyway" >&2
        switch_off_failed_kernels
    fi
    # Same recipe as `make pipeline` (whose CPU results README.md reports), on cuda, f32; without
    # the W4A8KV4 bit curriculum (6 more epochs) unless CURRICULUM_IN_REPORT=1 is passed, to fit
    # a device session's time.
    out=${OUT:-out/gpu}
    make -f pipelines/llm-qat.mk BIN="$bin" QAT_DATA="$data" OUT="$out" DEVICE_FLAGS="--device ${DEVICE:-cuda}" \
        CURRICULUM_IN_REPORT=0 "$@"
    # FP and RTN again with the same binary on the CPU: the exact reference for the GPU numbers.
    ref="$out/eval-cpu"
    mkdir -p "$ref"
    for s in FP W4 W4A8KV8 W4A8KV4; do
        name=rtn-$s; [ "$s" = FP ] && name=fp
        [ -s "$ref/$name.json" ] || "$bin/qat-eval" --model "$data/models/stories260K" --scheme "$s" -q \
            --corpus "$data/corpora/tinystories/TinyStories-valid.first800.txt" --mode docs --seq-len 512 > "$ref/$name.json"
    done
    exec "$py" bench/gpu/compare_ppl.py "$out/eval/stories260K" "$ref" ;;
*) echo "run.sh: unknown $what (bench, pipeline, kernels or sanitize)" >&2; exit 2 ;;
esac
