#!/usr/bin/env bash
# How many parameter servers for this model, this many workers and this network? Timing-only
# simulation: a 25M-parameter model (Inception's size, 100 MB of f32), 100 machines (N = 96,
# b = 4), the paper's compute-time model, 10 Gb/s links (1.25 GB/s) for every worker and for
# every server, each way, 0.1 ms latency. The model is split evenly over S servers; every pull
# and push crosses a server link and queues there. Step time against S, and against the
# same cluster whose servers' links never queue.
# Usage: experiments/shards.sh   -> docs/results/shards.{csv,md} and shards.{png,svg}
source "$(dirname "$0")/common.sh"
RUNS=runs/exp-shards
CSV=docs/results/shards.csv
FREE=$RUNS/free.csv
mkdir -p docs/results "$RUNS" && rm -f "$CSV" "$FREE"
common=(--workers 100 --backups 4 --delay paper --timing-only --virtual-params 25000000 --steps 300
    --bandwidth 1.25e9 --latency 0.0001)
for seed in $SEEDS; do
    sim "free-seed$seed" "${common[@]}" --seed "$seed" > /dev/null &&
        python3 experiments/row.py "$FREE" "$RUNS/free-seed$seed" seed="$seed"
    for s in 1 2 4 6 8 10 12 16 20 24 32; do
        sim "s$s-seed$seed" "${common[@]}" --server-bandwidth 1.25e9 --shards "$s" --seed "$seed" > /dev/null &&
            python3 experiments/row.py "$CSV" "$RUNS/s$s-seed$seed" shards="$s" seed="$seed"
    done
done
python3 - "$CSV" "$FREE" <<'PY' | tee docs/results/shards.md
import csv, statistics, sys
from collections import defaultdict
step = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    step[int(r["shards"])].append(float(r["mean_step_seconds"]))
free = statistics.mean(float(r["mean_step_seconds"]) for r in csv.DictReader(open(sys.argv[2])))
print(f"Servers' links that never queue: {free:.3f} s a step (compute and the workers' own links).\n")
print("| servers S | mean step s (3 seeds) | × never-queueing | server link busy per step, s |")
print("|---:|---:|---:|---:|")
knee = None
for s in sorted(step):
    m = statistics.mean(step[s])
    # 100 pulls and 100 pushes of 100 MB per step, split over S links of 1.25 GB/s each way.
    busy = 100 * 1e8 / s / 1.25e9
    print(f"| {s} | {m:.3f} | {m / free:.2f}× | {busy:.2f} |")
    if knee is None and m <= 1.1 * free:
        knee = s
print(f"\nFewest servers within 10% of never-queueing links: S = {knee}.")
PY
"$Q" plot --table "$CSV" --x shards --y mean_step_seconds \
    --title "Step time vs parameter servers: 25M parameters, 100 machines, 10 Gb/s" --out docs/results/shards > /dev/null
