#!/usr/bin/env bash
# Experiment 2 — the straggler tail. 100 workers, b = 0: the time until the k-th gradient of a
# step reaches the server, for every k, from
#   paper:   the simulator's paper-calibrated model (log-normal body + rare Pareto tail), 2000 steps
#   pareto:  another heavy tail: 1.2 s + Pareto(x_m 0.2 s, alpha 2), 2000 steps
#   cluster: a real `quorum train` over loopback gRPC with 100 worker threads, synthetic model,
#            the paper model injected as delays, 20 steps (wall time)
# Usage: experiments/tail.sh   -> docs/results/tail_kth.{csv,png,svg}, docs/results/tail-*/arrivals_cdf.*
source "$(dirname "$0")/common.sh"
RUNS=runs/exp2-tail
CSV=docs/results/tail_kth.csv
mkdir -p docs/results "$RUNS" && rm -f "$CSV"
for seed in $SEEDS; do
    sim paper-seed$seed --timing-only --workers 100 --backups 0 --delay paper --steps 2000 --seed "$seed"
    python3 experiments/kth.py "$RUNS/paper-seed$seed/arrivals.csv" "$CSV" paper "$seed"
    sim pareto-seed$seed --timing-only --workers 100 --backups 0 --delay pareto:1.2,0.2,2 --steps 2000 --seed "$seed"
    python3 experiments/kth.py "$RUNS/pareto-seed$seed/arrivals.csv" "$CSV" pareto "$seed"
    echo "== cluster-seed$seed: quorum train, 100 workers, delay paper"
    "$Q" train --model synthetic --workers 100 --backups 0 --delay paper --steps 20 --eval-every 0 --seed "$seed" \
        --out "$RUNS/cluster-seed$seed" > "$RUNS/cluster-seed$seed.log" 2>&1
    python3 experiments/kth.py "$RUNS/cluster-seed$seed/arrivals.csv" "$CSV" cluster "$seed"
done
"$Q" plot --table "$CSV" --x k --y mean_seconds --group source --title "Mean time to collect k of 100 gradients" \
    --out docs/results/tail_kth > "$RUNS/tail_kth.md"
for src in paper pareto cluster; do
    "$Q" plot "$RUNS/$src-seed1" --label "$src" --out "docs/results/tail-$src" > /dev/null
done
# The paper's ranks, fraction of steps within 2 s (mean over seeds).
python3 - "$CSV" <<'PY' | tee docs/results/tail.md
import csv, sys
from collections import defaultdict
acc = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    acc[(r["source"], int(r["k"]))].append((float(r["mean_seconds"]), float(r["within_2s"])))
print("| source | " + " | ".join(f"k={k}" for k in (1, 50, 90, 97, 98, 99, 100)) + " |")
print("|---|" + "---:|" * 7)
for src in ("paper", "pareto", "cluster"):
    cells = []
    for k in (1, 50, 90, 97, 98, 99, 100):
        v = acc[(src, k)]
        cells.append(f"{sum(m for m, _ in v) / len(v):.2f} s / {100 * sum(w for _, w in v) / len(v):.0f}%")
    print(f"| {src} | " + " | ".join(cells) + " |")
PY
