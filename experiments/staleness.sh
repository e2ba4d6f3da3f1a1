#!/usr/bin/env bash
# Experiment 1 — staleness hurts. MNIST, the 784-512-512-10 MLP (the paper's CNN is ~8x slower
# here), plain SGD lr 0.05 annealed linearly to 0 over the last epoch, batch 64, EMA 0.999,
# 3 epochs. Gradients are applied with a controlled staleness S: async with S+1 workers of
# equal, constant speed applies every gradient exactly S updates late.
# Stabilisers as in the paper, for S >= 5: the staleness ramps up over the first epoch
# (workers join one by one); for S >= 20 also a lower learning rate (0.05 * 10 / S, reached
# by a linear warm-up over the first epoch) and random restarts (3 attempts, the best on the
# validation split is kept). Without them lr 0.05 diverges at S = 50 (and lr 0.1 at S = 10).
# Usage: experiments/staleness.sh   -> docs/results/staleness.{csv,png,svg}
source "$(dirname "$0")/common.sh"
RUNS=runs/exp1-staleness
CSV=docs/results/staleness.csv
mkdir -p docs/results && rm -f "$CSV"
EPOCH=860 # steps of 64 examples in one epoch of the 55 000 training images
for S in ${STALENESS:-0 5 10 20 50}; do
    for seed in $SEEDS; do
        W=$((S + 1))
        lr=0.05
        [ "$S" -ge 20 ] && lr=$(python3 -c "print(0.05 * 10 / $S)")
        args=(--workers "$W" --policy async --delay const:1 --model mlp --batch 64 --epochs 3 --optimizer sgd --lr "$lr"
            --lr-decay "linear:$((2 * EPOCH)),$((3 * EPOCH))" --ema 0.999 --eval-every 430 --seed "$seed")
        if [ "$S" -ge 5 ]; then
            # Steps during a ramp of R virtual seconds ~ R (W+1)/2: one epoch's worth.
            args+=(--join-ramp "$((2 * EPOCH / (W + 1)))")
        fi
        if [ "$S" -ge 20 ]; then
            args+=(--warmup "$EPOCH" --restarts 3)
        fi
        name=s$S-seed$seed
        if sim "$name" "${args[@]}"; then
            python3 experiments/row.py "$CSV" "$RUNS/$name" staleness=$S seed=$seed lr=$lr
        else
            echo "staleness=$S seed=$seed: every attempt diverged" | tee -a "$RUNS/diverged.txt"
        fi
    done
done
"$Q" plot --table "$CSV" --x staleness --y test_error --title "Test error vs staleness (MLP, MNIST, 3 epochs)" --out docs/results/staleness
