#!/usr/bin/env bash
# One command for issue 15's ratios: quorum's MLP and CNN gradients against the machine's
# arithmetic limit (numpy/OpenBLAS on one thread), measured side by side in one run, for the
# default build (matrix products by the `gemm` crate) and, where the system has OpenBLAS
# (`apt install libopenblas-dev`), the `openblas` build.
# Usage: experiments/gradient_limit.sh [ROUNDS]   (makes runs/venv-numpy with numpy once;
# ENGINE=burn times burn's autodiff instead of the native engine, built with --features burn)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-runs/venv-numpy}
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q numpy; }
BIN=target/release/examples
builds=()
features=()
[ "${ENGINE:-native}" = native ] || features=(--features "${ENGINE}")
cargo build -q --release -p quorum-compute --example gradient_time "${features[@]}"
cp "$BIN/gradient_time" "$BIN/gradient_time-gemm"
builds+=("gemm crate=$BIN/gradient_time-gemm")
if ldconfig -p | grep libopenblas.so >/dev/null; then
    cargo build -q --release -p quorum-compute --example gradient_time --features openblas "${features[@]}"
    cp "$BIN/gradient_time" "$BIN/gradient_time-openblas"
    builds+=("openblas feature=$BIN/gradient_time-openblas")
fi
OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "$VENV/bin/python" experiments/gradient_limit.py "${1:-5}" "${builds[@]}"
