#!/usr/bin/env bash
# Deadline vs backup workers under the paper's straggler tail (the paper's "future work":
# time-outs instead of backups). 100 machines, the paper-calibrated compute-time model, real
# gradients in virtual time: MNIST, 784-64-10 MLP, batch 32, momentum 0.9, lr 0.002 x 100
# (scaled by the 100 machines for every policy: each step averages the gradients it takes),
# 20 warm-up steps, evaluated every 5 steps, until 96% test accuracy (or 2000 steps).
#   sync N=100 b=0      waits for every machine
#   sync N=96  b=4      the paper's region (experiment 3's best split)
#   deadline T, min 90  closes when every machine is in, or at T seconds with at least 90
# Usage: experiments/deadline.sh   -> docs/results/deadline.{csv,md}
source "$(dirname "$0")/common.sh"
RUNS=runs/exp-deadline
CSV=docs/results/deadline.csv
mkdir -p docs/results "$RUNS" && rm -f "$CSV"
common=(--workers 100 --delay paper --model mlp:64 --batch 32 --optimizer momentum:0.9 --lr 0.002 --scale-lr
    --warmup 20 --steps 2000 --eval-every 5 --target 0.96 --stop-at-target)
for seed in $SEEDS; do
    sim sync-b0-seed$seed "${common[@]}" --backups 0 --seed "$seed" &&
        python3 experiments/row.py "$CSV" "$RUNS/sync-b0-seed$seed" --target 0.96 policy=sync setting=b0 seed=$seed
    sim sync-b4-seed$seed "${common[@]}" --backups 4 --seed "$seed" &&
        python3 experiments/row.py "$CSV" "$RUNS/sync-b4-seed$seed" --target 0.96 policy=sync setting=b4 seed=$seed
    for t in 1.6 1.7 1.8 2.0 2.5; do
        sim deadline-t$t-seed$seed "${common[@]}" --policy deadline --deadline-timeout "$t" --deadline-min 90 --seed "$seed" &&
            python3 experiments/row.py "$CSV" "$RUNS/deadline-t$t-seed$seed" --target 0.96 policy=deadline setting=t$t seed=$seed
    done
done
python3 - "$CSV" "$RUNS" <<'PY' | tee docs/results/deadline.md
import csv, json, statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    rows[(r["policy"], r["setting"])].append(r)
def mean(xs):
    xs = [float(x) for x in xs if x not in ("", None)]
    return statistics.mean(xs) if xs else float("nan")
print("| policy | setting | seeds reaching 96% | virtual s to 96% | steps to 96% | mean step s | gradients per step | final accuracy |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for (p, s), rs in rows.items():
    runs = [json.load(open(f"{sys.argv[2]}/{p}-{s}-seed{r['seed']}/summary.json")) for r in rs]
    reached = [r["time_to_target"] for r in rs if r["time_to_target"]]
    steps = [j["target_step"] for j in runs if j.get("target_step") is not None]
    print(f"| {p} | {s} | {len(reached)}/{len(rs)} | {mean(reached):.0f} | {mean(steps):.0f} | "
          f"{mean(j['mean_step_seconds'] for j in runs):.2f} | {mean(j['accepted'] / max(j['steps'], 1) for j in runs):.1f} | "
          f"{100 * mean(j['final_test_accuracy'] for j in runs):.2f}% |")
PY
