#!/usr/bin/env bash
# Experiment 6 — a real cluster on this machine: `quorum train` (server + 5 worker threads over
# loopback gRPC), the default job (784-512-512-10 MLP on MNIST, batch 128, momentum 0.9,
# 2 epochs of examples), with injected straggling before every gradient: 20 ms plus a Pareto
# tail (x_m 20 ms, alpha 1.5). Same machines, three policies, same accuracy target:
#   sync+b: N = 4, b = 1;  sync: N = 5;  async: 5 workers
# Learning rates follow the paper's rule: sync lr = g0 * N on the averaged gradient, async lr = g0
# with global-norm clipping at 5; g0 = 0.0125 (so sync 4+1 runs the default recipe's lr 0.05).
# Usage: experiments/cluster.sh   -> docs/results/cluster.{csv,md}, docs/results/cluster/*.{png,svg}
# Wall-clock: run it on an otherwise idle machine.
source "$(dirname "$0")/common.sh"
RUNS=runs/exp6-cluster
CSV=docs/results/cluster.csv
TARGET=${TARGET:-0.96}
DELAY=${DELAY:-pareto:0.02,0.02,1.5}
mkdir -p docs/results "$RUNS" && rm -f "$CSV"
for seed in $SEEDS; do
    for kind in sync+b sync async; do
        case $kind in
        sync+b) args=(--workers 5 --backups 1 --lr 0.0125 --scale-lr --eval-every 20) ;;
        sync) args=(--workers 5 --backups 0 --lr 0.0125 --scale-lr --eval-every 20) ;;
        async) args=(--workers 5 --policy async --lr 0.0125 --clip 5 --eval-every 80) ;;
        esac
        name=$kind-seed$seed
        echo "== $name: quorum train ${args[*]} --delay $DELAY --seed $seed"
        "$Q" train "${args[@]}" --delay "$DELAY" --seed "$seed" --out "$RUNS/$name" > "$RUNS/$name.log" 2>&1
        grep -E "wall time|final test accuracy" "$RUNS/$name.log" | sed 's/^/   /'
        python3 experiments/row.py "$CSV" "$RUNS/$name" --target "$TARGET" kind=$kind seed=$seed
    done
done
python3 - "$CSV" <<'PY' | tee docs/results/cluster.md
import csv, sys
from collections import defaultdict
cells = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    cells[r["kind"]].append(r)
def stat(v):
    return f"{sum(v)/len(v):.1f} ({min(v):.1f}–{max(v):.1f})" if v else "never"
print("| policy | wall s to target | reached | total wall s | final test accuracy, % |")
print("|---|---:|---:|---:|---:|")
for k in ("sync+b", "sync", "async"):
    rows = cells[k]
    t = [float(r["time_to_target"]) for r in rows if r["time_to_target"]]
    print(f"| {k} | {stat(t)} | {len(t)}/{len(rows)} | {stat([float(r['seconds']) for r in rows])} | "
          f"{stat([100 * float(r['final_test_accuracy']) for r in rows])} |")
PY
"$Q" plot "$RUNS/sync+b-seed1" "$RUNS/sync-seed1" "$RUNS/async-seed1" --label "sync 4+1" --label "sync 5" --label "async 5" \
    --out docs/results/cluster > /dev/null
