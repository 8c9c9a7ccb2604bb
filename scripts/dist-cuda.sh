#!/usr/bin/env bash
# scripts/dist-cuda.sh: packs the CUDA binaries for carrying to a GPU machine (`make build-cuda`).
#
#   scripts/dist-cuda.sh RELEASE_DIR DIST_DIR [QAT_DATA [TESTS]]
#
# Strips the five qat-* binaries of RELEASE_DIR into DIST_DIR/bin (ignored by git), then packs
# them into DIST_DIR/qat-cuda-bin.tar.xz: the binaries share ~33 MB of candle's sm_90 kernels
# each, which xz's 64 MiB window stores once (5 x ~12 MB gzipped would not fit the 64 MiB a
# device call carries). `make bench-gpu` unpacks it on the GPU machine when DIST_DIR/bin is absent.
# With QAT_DATA, also copies the few data files the GPU runs read (~4 MB: the Llama-2 tokenizer,
# stories260K, the TinyStories dev file) into DIST_DIR/data: ../shared does not travel.
# TESTS: a file listing unit-test executables (`name path` lines, scripts/test-executables.py) of
# the crates with CUDA code paths; they are packed as bin/test-NAME, for the CUDA checks that
# bench/gpu/run.sh runs on the GPU machine (where there is no cargo).
# Carry DIST_DIR/qat-cuda-bin.tar.xz and DIST_DIR/data (not DIST_DIR/bin: ~0.2 GB unpacked).
set -euo pipefail
rel=${1:?usage: dist-cuda.sh RELEASE_DIR DIST_DIR [QAT_DATA]}
dist=${2:?usage: dist-cuda.sh RELEASE_DIR DIST_DIR [QAT_DATA]}
data=${3:-}
tests=${4:-}
mkdir -p "$dist/bin"
for b in qat-sample qat-distill qat-eval qat-clip qat-pack; do
    strip -o "$dist/bin/$b.tmp" "$rel/$b"
    mv "$dist/bin/$b.tmp" "$dist/bin/$b"
done
if [ -n "$tests" ] && [ -s "$tests" ]; then  # absent or empty: no test binaries
    while read -r name path; do
        strip -o "$dist/bin/test-$name" "$path"
    done < "$tests"
fi
tar -C "$dist" -cf - bin | xz -9e -T1 > "$dist/qat-cuda-bin.tar.xz.tmp"
mv "$dist/qat-cuda-bin.tar.xz.tmp" "$dist/qat-cuda-bin.tar.xz"
(cd "$dist/bin" && sha256sum -- *) > "$dist/SHA256SUMS"
ls -l "$dist/bin" "$dist/qat-cuda-bin.tar.xz" >&2

if [ -n "$data" ]; then
    for f in models/llama2-tokenizer/tokenizer.json models/llama2-tokenizer/tokenizer_config.json \
        models/stories260K/config.json models/stories260K/model.safetensors models/stories260K/tokenizer.json \
        models/stories260K/tokenizer_config.json corpora/tinystories/TinyStories-valid.first800.txt; do
        mkdir -p "$dist/data/$(dirname "$f")"
        cp "$data/$f" "$dist/data/$f"
        chmod u+w "$dist/data/$f"
    done
fi
du -sh "$dist/qat-cuda-bin.tar.xz" ${data:+"$dist/data"} >&2
