#!/usr/bin/env bash
# Experiment 5 — learning-rate sweep for sync with backups (N = 100, b = 6): the paper found
# that smaller rates reach a modest target sooner but never reach the top precisions.
# MNIST, 784-64-10 MLP, batch 16, momentum 0.9, lr = g0 * N on the averaged gradient with 20
# warm-up steps, 6 epochs, paper-calibrated delays; g0 over a 32x range (the paper: 8x).
# Usage: experiments/lr_sweep.sh   -> docs/results/lr_sweep.{csv,md}, docs/results/lr_sweep_*.{png,svg}
source "$(dirname "$0")/common.sh"
RUNS=runs/exp5-lr
CSV=docs/results/lr_sweep.csv
mkdir -p docs/results "$RUNS" && rm -f "$CSV"
# Runs already in $RUNS are reused (delete the folder to redo them).
for g0 in ${GRID:-0.00025 0.0005 0.001 0.002 0.004 0.008}; do
    for seed in $SEEDS; do
        name=g$g0-seed$seed
        [ -f "$RUNS/$name/summary.json" ] && { python3 experiments/row.py "$CSV" "$RUNS/$name" --target 0.93 --target 0.96 g0=$g0 seed=$seed; continue; }
        sim "$name" --workers 106 --backups 6 --lr "$g0" --scale-lr --warmup 20 --model mlp:64 --batch 16 --epochs 6 \
            --optimizer momentum:0.9 --delay paper --eval-every 10 --seed "$seed" &&
            python3 experiments/row.py "$CSV" "$RUNS/$name" --target 0.93 --target 0.96 g0=$g0 seed=$seed
    done
done
"$Q" plot --table "$CSV" --x g0 --y time_to_0.93 --title "Virtual seconds to 93% (N=100, b=6)" --out docs/results/lr_sweep_time93 > "$RUNS/time93.md"
"$Q" plot --table "$CSV" --x g0 --y time_to_0.96 --title "Virtual seconds to 96% (N=100, b=6)" --out docs/results/lr_sweep_time96 > "$RUNS/time96.md"
"$Q" plot --table "$CSV" --x g0 --y final_test_accuracy --title "Final test accuracy (N=100, b=6, 6 epochs)" --out docs/results/lr_sweep_accuracy > "$RUNS/final.md"
for f in time93 time96 final; do echo "## $f"; grep '^|' "$RUNS/$f.md"; done | tee docs/results/lr_sweep.md
