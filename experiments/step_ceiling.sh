#!/usr/bin/env bash
# How close can any implementation get to the compute-bound floor of shared_memory.sh's job
# (784-512-512-10 MLP on MNIST, batch 128, N = 3 of 4 workers, one compute thread each, on
# this machine's cores), and how close does quorum get? Interleaved, round by round:
#   1. one MLP gradient timed alone on one thread (gradient_time) -> the floor,
#      cores / (4 x gradient), as shared_memory.sh computes it;
#   2. the step_ceiling example: four threads in one process computing the same gradients on
#      MNIST, the N-th gradient of each step closing it at once under a lock (sum, norm, SGD
#      into the next step's parameters), overtaken ones stopped half-way; no server, network,
#      async runtime or copies: the most the job's shape allows on these cores;
#   3. quorum's own job through shared memory (shared_memory.sh's command).
# Usage: experiments/step_ceiling.sh [REPS] [OUT]   (release build; data fetched)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-5}; OUT=${2:-runs/step_ceiling}
Q=$(realpath "${QUORUM:-target/release/quorum}")
[ -x "$Q" ] || cargo build --release -p quorum-cli
cargo build -q --release -p quorum-compute --example gradient_time --example step_ceiling
mkdir -p "$OUT"
: > "$OUT/gradient.csv"; : > "$OUT/ceiling.csv"
for r in $(seq 1 "$REPS"); do
  RAYON_NUM_THREADS=1 target/release/examples/gradient_time 50 mlp native | tail -1 >> "$OUT/gradient.csv"
  MNIST_DIR=data/mnist RAYON_NUM_THREADS=1 target/release/examples/step_ceiling 300 4 3 | tail -1 >> "$OUT/ceiling.csv"
  rm -rf "$OUT/quorum-$r"
  "$Q" train --model mlp --dataset mnist --batch 128 --optimizer sgd --lr 0.1 --eval-every 0 \
    --steps 300 --seed "$r" --threads 1 --workers 4 --backups 1 --shared-memory true \
    --out "$OUT/quorum-$r" > "$OUT/quorum-$r.log" 2>&1
done
python3 - "$OUT" "$REPS" "$(nproc)" <<'PY'
import statistics as st, sys
sys.path.insert(0, "experiments")
from steps_per_s import steps_per_s as rate
out, reps, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
grad = [float(l.split(",")[3]) / 1000 for l in open(f"{out}/gradient.csv")]
floor = [cores / (4 * g) for g in grad]
ceil = [float(l.split(",")[1]) for l in open(f"{out}/ceiling.csv")]
mnist_grad = [float(l.split(",")[0]) for l in open(f"{out}/ceiling.csv")]
q = [rate(f"{out}/quorum-{r}") for r in range(1, reps + 1)]
f = lambda v: ", ".join(f"{x:.2f}" for x in v)
print(f"MLP gradient alone, one thread: {1000 * st.median(grad):.2f} ms (on MNIST, in the ceiling's process: {st.median(mnist_grad):.2f} ms)")
print(f"floor {cores} cores / (4 x gradient): {st.median(floor):.1f} steps/s")
print(f"ceiling (no server, network or runtime): {st.median(ceil):.1f} steps/s, of the floor round by round: median {st.median([c / fl for c, fl in zip(ceil, floor)]):.2f} ({f([c / fl for c, fl in zip(ceil, floor)])})")
print(f"quorum, shared memory: {st.median(q):.1f} steps/s, of the floor: median {st.median([x / fl for x, fl in zip(q, floor)]):.2f} ({f([x / fl for x, fl in zip(q, floor)])})")
print(f"quorum / ceiling, round by round: median {st.median([x / c for x, c in zip(q, ceil)]):.2f} ({f([x / c for x, c in zip(q, ceil)])})")
PY
