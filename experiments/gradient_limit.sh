#!/usr/bin/env bash
# One command for issue 15's ratios: quorum's MLP and CNN gradients against the machine's
# arithmetic limit (numpy/OpenBLAS on one thread), measured side by side in one run.
# Usage: experiments/gradient_limit.sh [ROUNDS]   (makes runs/venv-numpy with numpy once)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-runs/venv-numpy}
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q numpy; }
cargo build -q --release -p quorum-compute --example gradient_time
OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "$VENV/bin/python" experiments/gradient_limit.py target/release/examples/gradient_time "${1:-5}"
