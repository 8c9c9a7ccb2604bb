#!/usr/bin/env bash
# `make bench`: installs the pinned PyTorch environment (first time only), then runs bench/bench.py,
# which times qat-sample / qat-distill / qat-eval against their PyTorch references back to back.
#
#   BENCH_VENV   where the venv lives (default: $HOME/.cache/qat/bench-venv; ~6 GB, since the
#                PyPI torch wheel is the CUDA build and needs the nvidia-* wheels to import)
#   PYTHON       the interpreter that creates it (default: python3)
# Other arguments are passed to bench.py (see `bench/run.sh --help`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${BENCH_VENV:-$HOME/.cache/qat/bench-venv}"
req="$here/requirements.txt"
stamp="$venv/.bench-requirements-$(sha256sum "$req" | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
    echo "bench: installing the PyTorch side into $venv (pinned in bench/requirements.txt)" >&2
    "${PYTHON:-python3}" -m venv "$venv"
    # --no-deps: exactly the pinned set, nothing resolved at install time.
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$req"
    touch "$stamp"
fi
exec "$venv/bin/python" "$here/bench.py" "$@"
