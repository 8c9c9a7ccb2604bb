#!/usr/bin/env bash
# Runs the cargo-fuzz targets of this directory, FUZZ_SECONDS each (default 180), starting from
# the committed seeds (seeds/<target>/) and the local corpus (corpus/<target>/, not committed).
#
#   bash fuzz/run.sh                      # all targets: shard_reader packed_reader scheme
#   FUZZ_SECONDS=600 bash fuzz/run.sh scheme
#
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly --profile minimal`,
# `cargo install cargo-fuzz`). A crash stops the script; libFuzzer writes the input to
# fuzz/artifacts/<target>/. Fix it, then keep the input as a regression test of the normal
# suite: copy it to tests/data/fuzz/<target>/ (tests/fuzz_regressions.rs replays every file there
# through the same API). Regenerate the seeds with `python3 fuzz/make_seeds.py`.
set -euo pipefail
cd "$(dirname "$0")"
secs="${FUZZ_SECONDS:-180}"
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=(shard_reader packed_reader scheme); fi
cargo +nightly fuzz build
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== $t: ${secs}s" >&2
    cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1
done
