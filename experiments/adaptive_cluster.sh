#!/usr/bin/env bash
# The adaptive policy on a real `quorum train` cluster (1 server + 6 worker processes over
# gRPC on loopback) with injected delays: every worker sleeps a log-normal time (median 50 ms,
# sigma 0.3) per gradient, workers 0 and 1 four times that. MNIST, 784-128-10 MLP, batch 128,
# momentum 0.9, lr 0.01 x N, 400 steps, evaluated every 20 steps. Wall-clock time, so run it
# on an otherwise idle machine; REPS interleaved repetitions.
#   b0        sync, N = 6      waits for the slow pair every step
#   b2        sync, N = 4      the two slow machines as backups (the best fixed b here)
#   b1        sync, N = 5
#   deadline  close at 90 ms once 3 gradients are in (all 6 if they come sooner)
#   adaptive  the server chooses N in 1..6
# Usage: experiments/adaptive_cluster.sh [REPS]  -> docs/results/adaptive_cluster.{csv,md}
source "$(dirname "$0")/common.sh"
REPS=${1:-2}
RUNS=runs/exp-adaptive-cluster
CSV=docs/results/adaptive_cluster.csv
mkdir -p docs/results "$RUNS" && rm -f "$CSV"
common=(--model mlp:128 --workers 6 --delay slow:2,4,lognormal:0.05,0.3 --steps 400 --eval-every 20
    --scale-lr --lr 0.01 --batch 128)
declare -A policy=(
    [b0]="--backups 0"
    [b1]="--backups 1"
    [b2]="--backups 2"
    [deadline]="--policy deadline --deadline-timeout 0.09 --deadline-min 3"
    [adaptive]="--policy adaptive"
)
for rep in $(seq "$REPS"); do
    for name in b0 b1 b2 deadline adaptive; do
        out="$RUNS/$name-rep$rep"
        echo "== $name (rep $rep)"
        # shellcheck disable=SC2086
        "$Q" train "${common[@]}" ${policy[$name]} --seed "$rep" --out "$out" > "$out.log" 2>&1 || { tail -3 "$out.log"; exit 1; }
        python3 experiments/row.py "$CSV" "$out" --target 0.95 setting="$name" rep="$rep"
    done
done
python3 - "$CSV" "$RUNS" <<'PY' | tee docs/results/adaptive_cluster.md
import csv, json, statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    rows[r["setting"]].append(r)
def med(xs):
    xs = [float(x) for x in xs if x not in ("", None)]
    return statistics.median(xs) if xs else float("nan")
print("| policy | runs at 95% | wall s to 95% (median) | steps/s (median) | gradients per step | final accuracy (median) |")
print("|---|---:|---:|---:|---:|---:|")
for name in ["b0", "b1", "b2", "deadline", "adaptive"]:
    rs = rows[name]
    sums = [json.load(open(f"{sys.argv[2]}/{name}-rep{r['rep']}/summary.json")) for r in rs]
    reached = [r["time_to_target"] for r in rs if r["time_to_target"]]
    print(f"| {name} | {len(reached)}/{len(rs)} | {med(reached):.1f} | {med([s['steps_per_second'] for s in sums]):.1f} | "
          f"{med([s['accepted'] / s['steps'] for s in sums]):.2f} | {100 * med([s['final_test_accuracy'] for s in sums]):.2f}% |")
PY
