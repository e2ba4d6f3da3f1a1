#!/usr/bin/env bash
# Experiment 3 — choosing b for a fixed budget of 100 machines.
# (a) Iterations to reach 96% test accuracy as a function of N, with real gradients in virtual
#     time: MNIST, 784-64-10 MLP, batch 32 per gradient (the paper's B), momentum 0.9,
#     lr = 0.002 * N on the averaged gradient, 20 warm-up steps, evaluated every 5 steps.
#     (The iteration count does not depend on the compute-time model: sync steps are exact.)
# (b) Mean step time of every split N + b = 100 under the paper-calibrated model (timing only,
#     2000 steps), and of N workers alone with b = 0.
# time-to-target(N, b) = iterations(N) x step time(N, b): the best split minimises it.
# The buyer's question: speed-up of N + b machines over N machines (same iterations, so the
# ratio of step times), and that speed-up per machine (x N / (N + b)).
# Usage: experiments/choose_b.sh   -> docs/results/choose_b.{csv,md}, docs/results/choose_b*.{png,svg}
source "$(dirname "$0")/common.sh"
RUNS=runs/exp3-choose-b
mkdir -p docs/results "$RUNS"
ITERS=$RUNS/iterations.csv
rm -f "$ITERS" "$RUNS/buyer.csv"
NS=${NS:-"50 60 70 80 85 90 92 94 96 98 100"}
for n in $NS; do
    for seed in $SEEDS; do
        name=iters-n$n-seed$seed
        sim "$name" --workers "$n" --backups 0 --delay const:1 --model mlp:64 --batch 32 --optimizer momentum:0.9 --lr 0.002 --scale-lr \
            --warmup 20 --steps 2000 --eval-every 5 --target 0.96 --stop-at-target --seed "$seed" &&
            python3 experiments/row.py "$ITERS" "$RUNS/$name" n=$n seed=$seed
    done
done
for seed in $SEEDS; do
    "$Q" sim --timing-only --delay paper --steps 2000 --seed "$seed" --sweep-backups 0..50 --budget 100 \
        --out "$RUNS/sweep-budget100-seed$seed" > "$RUNS/sweep-budget100-seed$seed.log"
    for n in 50 90 96; do
        for b in 0 1 2 4 8; do
            "$Q" sim --timing-only --delay paper --steps 2000 --seed "$seed" --workers $((n + b)) --backups "$b" \
                --out "$RUNS/buyer-n$n-b$b-seed$seed" > /dev/null
            python3 experiments/row.py "$RUNS/buyer.csv" "$RUNS/buyer-n$n-b$b-seed$seed" n=$n b=$b seed=$seed
        done
    done
done
python3 - "$RUNS" <<'PY'
import csv, json, os, sys
from collections import defaultdict
runs = sys.argv[1]
iters = defaultdict(list)
for r in csv.DictReader(open(f"{runs}/iterations.csv")):
    j = json.load(open(f"{runs}/iters-n{r['n']}-seed{r['seed']}/summary.json"))
    if j.get("target_step") is not None:
        iters[int(r["n"])].append(j["target_step"])
step = defaultdict(list)  # (N, b) -> mean step seconds, one per seed and sweep
for d in sorted(os.listdir(runs)):
    if d.startswith("sweep-budget") and os.path.isdir(f"{runs}/{d}"):
        for r in csv.DictReader(open(f"{runs}/{d}/sweep.csv")):
            step[(int(r["aggregate"]), int(r["backups"]))].append(float(r["mean_step_seconds"]))
mean = lambda v: sum(v) / len(v)
# (a) time to target for every split of 100 machines, one row per seed
with open("docs/results/choose_b.csv", "w") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["n", "b", "seed", "iterations", "step_seconds", "time_to_target"])
    for n, its in sorted(iters.items()):
        if (n, 100 - n) not in step:
            continue
        st = mean(step[(n, 100 - n)])
        for i, it in enumerate(its):
            w.writerow([n, 100 - n, i + 1, it, round(st, 4), round(it * st, 1)])
best = min(((mean(its) * mean(step[(n, 100 - n)]), n) for n, its in iters.items() if (n, 100 - n) in step))
with open("docs/results/choose_b.md", "w") as out:
    print("| N | b | iterations to 96% (mean, min–max) | step s | time to target s |", file=out)
    print("|---:|---:|---:|---:|---:|", file=out)
    for n, its in sorted(iters.items()):
        st = mean(step[(n, 100 - n)])
        print(f"| {n} | {100 - n} | {mean(its):.0f} ({min(its)}–{max(its)}) | {st:.3f} | {mean(its) * st:.0f} |", file=out)
    print(f"\nBest split of 100 machines: N = {best[1]}, b = {100 - best[1]} ({best[0]:.0f} virtual s).\n", file=out)
    print("| N | b | step s | speed-up over N alone | speed-up per machine |", file=out)
    print("|---:|---:|---:|---:|---:|", file=out)
    buyer = defaultdict(list)
    for r in csv.DictReader(open(f"{runs}/buyer.csv")):
        buyer[(int(r["n"]), int(r["b"]))].append(float(r["mean_step_seconds"]))
    for n in (50, 90, 96):
        base = mean(buyer[(n, 0)])
        for b in (0, 1, 2, 4, 8):
            st = mean(buyer[(n, b)])
            print(f"| {n} | {b} | {st:.3f} | {base / st:.3f} | {base / st * n / (n + b):.3f} |", file=out)
print(open("docs/results/choose_b.md").read())
PY
"$Q" plot --table docs/results/choose_b.csv --x n --y time_to_target --title "Virtual seconds to 96% with 100 machines (N + b = 100)" \
    --out docs/results/choose_b > /dev/null
"$Q" plot --table "$ITERS" --x n --y target_step --title "Iterations to 96% test accuracy vs N" --out docs/results/choose_b_iterations > /dev/null
