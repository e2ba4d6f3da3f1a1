#!/usr/bin/env bash
# The GPU route: burn's autodiff on a GPU through wgpu (`--features wgpu`, `engine = "wgpu"`).
#
# 0. The GPU's gradients against the native engine's, value by value (a test).
# 1. One MLP and one CNN gradient on the GPU, next to the native engine on one CPU core.
# 2. The 4-worker job (N = 3, b = 1; MLP 784-512-512-10, batch 128, SGD 0.1, 300 steps) with
#    every worker's gradients on the GPU, next to the same job on the native engine.
# 3. The paper's CNN (batch 64, 100 steps) the same way.
#
# Needs a GPU with a Vulkan (or Metal / DirectX 12) driver: `vulkaninfo --summary` lists it.
# Without one, Mesa's software Vulkan (Debian: `apt install mesa-vulkan-drivers`) runs the same
# commands on the CPU: a check that the route works, not a speed.
#
# Usage: experiments/gpu.sh [OUT]   (default runs/gpu; the release build with wgpu takes
# about 20 minutes the first time on 2 cores; MLP_STEPS, CNN_STEPS and REPEATS shorten it,
# e.g. on a software Vulkan)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
MLP_STEPS=${MLP_STEPS:-300}
CNN_STEPS=${CNN_STEPS:-100}
REPEATS=${REPEATS:-20}
mkdir -p "$OUT"
BIN=${CARGO_TARGET_DIR:-target}/release

cargo build -q --release -p quorum-cli --features wgpu
cargo build -q --release -p quorum-compute --features wgpu --example gradient_time
cp "$BIN/examples/gradient_time" "$OUT/gradient_time"
[ -d data/mnist ] || scripts/fetch-data.sh

{
    echo "== device"
    vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName|deviceType" || true
    nvidia-smi -L 2>/dev/null || true
} | tee "$OUT/device.txt"

echo "== the GPU's gradients against the native engine's, value by value"
cargo test -q --release -p quorum-compute --features wgpu --lib the_gradient_on_a_gpu 2>&1 | tail -3 | tee "$OUT/check.txt"

echo "== one gradient (ms): native engine on one CPU core, burn on the GPU" | tee "$OUT/gradients.txt"
for model in mlp cnn; do
    RAYON_NUM_THREADS=1 "$OUT/gradient_time" "$REPEATS" "$model" native | tail -n +2
    "$OUT/gradient_time" "$REPEATS" "$model" wgpu | tail -n +2
done | tee -a "$OUT/gradients.txt"

row() { # label run-directory
    python3 - "$1" "$2/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[2]))
print(f"{sys.argv[1]:<28} {s['steps']:>5} steps  {s['steps_per_second']:7.2f} steps/s  "
      f"test accuracy {100 * (s['final_test_accuracy'] or 0):.2f}%")
EOF
}

echo "== 4 workers, N = 3: steps/s with the native engine and with every worker on the GPU" | tee "$OUT/jobs.txt"
for model in mlp cnn; do
    if [ "$model" = mlp ]; then args=(--batch 128 --steps "$MLP_STEPS"); else args=(--batch 64 --steps "$CNN_STEPS"); fi
    for engine in native wgpu; do
        run="$OUT/$model-$engine"
        "$BIN/quorum" train --model "$model" --engine "$engine" --workers 4 --backups 1 \
            --optimizer sgd --lr 0.1 --eval-every 0 --checkpoint-every 0 --checkpoint-seconds 0 \
            "${args[@]}" --out "$run" > "$run.log" 2>&1 || { tail -5 "$run.log"; exit 1; }
        row "$model, $engine" "$run"
    done
done | tee -a "$OUT/jobs.txt"
echo "wrote $OUT/{device.txt,check.txt,gradients.txt,jobs.txt} and one run directory per job"
