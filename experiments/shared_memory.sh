#!/usr/bin/env bash
# The 4-worker job of ../shared/peers/side_by_side.sh (784-512-512-10 MLP on MNIST, batch 128,
# SGD 0.1, 300 steps, N = 3 of 4, one compute thread per worker), with the workers' values over
# gRPC (`--shared-memory false`) and through shared memory, interleaved with one MLP gradient
# timed alone on one thread, so the compute-bound floor (cores / (4 x gradient)) comes from
# the same minutes. Extra arguments go to both runs (e.g. `--delay exp:0.02`).
# Usage: experiments/shared_memory.sh [REPS] [OUT] [ARGS...]   (release build; data fetched)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}; OUT=${2:-runs/shared_memory}; shift $(( $# > 2 ? 2 : $# ))
Q=$(realpath "${QUORUM:-target/release/quorum}")
G=target/release/examples/gradient_time
[ -x "$Q" ] || cargo build --release -p quorum-cli
# Always (a no-op when up to date): experiments/gradient_limit.sh leaves this path holding its
# last build, the `openblas` one where the system has OpenBLAS, which would make the floor slow.
cargo build -q --release -p quorum-compute --example gradient_time
NETNS=../shared/peers/tf/netns.sh
[ -x "$NETNS" ] || NETNS=env  # no namespaces: plain loopback
mkdir -p "$OUT"
: > "$OUT/gradient.csv"  # this run's gradients only (it is appended to below)
for r in $(seq 1 "$REPS"); do
  RAYON_NUM_THREADS=1 "$G" 50 mlp native | tail -1 >> "$OUT/gradient.csv"
  for shm in false true; do
    rm -rf "$OUT/$shm-$r"
    "$NETNS" "$Q" train --model mlp --dataset mnist --batch 128 --optimizer sgd --lr 0.1 --eval-every 0 \
      --steps 300 --seed "$r" --threads 1 --workers 4 --backups 1 --shared-memory "$shm" "$@" \
      --out "$OUT/$shm-$r" > "$OUT/$shm-$r.log" 2>&1
  done
done
python3 - "$OUT" "$REPS" "$(nproc)" <<'PY'
import statistics as st, sys
sys.path.insert(0, "experiments")
from steps_per_s import steps_per_s as rate
out, reps, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
grad = [float(l.split(",")[3]) for l in open(f"{out}/gradient.csv")]
g = st.median(grad) / 1000
floor = cores / (4 * g)
rows = {shm: [rate(f"{out}/{shm}-{r}") for r in range(1, reps + 1)] for shm in ("false", "true")}
print(f"MLP gradient alone, one thread: {1000 * g:.2f} ms (median of {', '.join(f'{x:.2f}' for x in grad)})")
print(f"compute-bound floor {cores} cores / (4 x gradient): {floor:.1f} steps/s")
for shm, label in (("false", "gRPC"), ("true", "shared memory")):
    v = rows[shm]
    print(f"{label:14s} {st.median(v):6.1f} steps/s (runs {', '.join(f'{x:.1f}' for x in v)}), {st.median(v) / floor:.2f} of the floor")
ratios = [b / a for a, b in zip(rows["false"], rows["true"])]
print(f"shared memory / gRPC, run by run: median {st.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})")
PY
