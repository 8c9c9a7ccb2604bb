#!/usr/bin/env bash
# scripts/cuda-toolkit.sh: a CUDA 13.0 toolkit (nvcc, headers, libraries) from pinned PyPI wheels,
# for building qat with `--features cuda` on a machine with no GPU and no system CUDA.
# Recipe and reasons: README.md ("CUDA"). Idempotent: a finished install is kept (stamp file).
#
#   scripts/cuda-toolkit.sh VENV      # prints nothing on success but the CUDA_HOME path
#
# 1. pip-installs the wheels into VENV (they unpack into one toolkit-shaped folder,
#    VENV/lib/python3.X/site-packages/nvidia/cu13/{bin,include,lib,nvvm}).
# 2. Adds the unversioned .so links the linker asks for (-lcublas etc.).
# 3. Builds a stub libcuda.so (every cu* function of cudarc's driver bindings, returning an
#    error) into cu13/lib/stubs: only linked against; the GPU machine's real libcuda.so.1 loads.
set -euo pipefail

VENV=${1:?usage: cuda-toolkit.sh VENV}
# nvcc stays at 13.0: it emits PTX ISA 9.0, which the H100 machine's driver (580) can JIT.
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.1.0.3
nvidia-curand==10.4.0.35"
STAMP_NAME=".qat-cuda-toolkit-$(echo $WHEELS | sha256sum | cut -c1-12)"
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    $PY -m venv "$VENV"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CUDA_HOME="$SITE/nvidia/cu13"
if [ -f "$CUDA_HOME/$STAMP_NAME" ]; then
    echo "$CUDA_HOME"
    exit 0
fi

# shellcheck disable=SC2086 # word splitting of the wheel list is intended
"$VENV/bin/pip" install -q --disable-pip-version-check $WHEELS >&2

# 2. Unversioned links (curand's soname is .so.10, the others .so.13).
cd "$CUDA_HOME/lib"
for lib in cublas cublasLt nvrtc cudart curand; do
    versioned=$(ls "lib$lib.so."* 2>/dev/null | grep -E "^lib$lib\.so\.[0-9]+$" | head -n1)
    [ -n "$versioned" ] || { echo "cuda-toolkit: lib$lib.so.* missing in $CUDA_HOME/lib" >&2; exit 2; }
    ln -sf "$versioned" "lib$lib.so"
done

# 3. The libcuda stub, from the cu* functions cudarc declares (cudarc is in cargo's registry
#    once `cargo fetch` has run; CUDARC_DRIVER_SYS overrides the file).
SYS=${CUDARC_DRIVER_SYS:-$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | sort -V | tail -n1)}
[ -f "$SYS" ] || { echo "cuda-toolkit: cudarc's src/driver/sys/mod.rs not found: run \`cargo fetch\` first" >&2; exit 2; }
mkdir -p stubs
grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$SYS" | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void){return 999;}"}' > stubs/libcuda_stub.c
n=$(wc -l < stubs/libcuda_stub.c)
[ "$n" -gt 100 ] || { echo "cuda-toolkit: only $n driver functions found in $SYS" >&2; exit 2; }
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/libcuda_stub.c

touch "$CUDA_HOME/$STAMP_NAME"
echo "$CUDA_HOME"
