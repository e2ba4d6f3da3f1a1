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
#        MODEL=cnn SEEDS=1 experiments/staleness.sh   -> docs/results/staleness-cnn.{csv,png,svg}
#        (the paper's own CNN; ~7 min of one core per run, 9 runs per seed)
# THREADS: compute threads per run (default 1).
source "$(dirname "$0")/common.sh"
MODEL=${MODEL:-mlp}
SUFFIX=""
[ "$MODEL" = mlp ] || SUFFIX="-$MODEL"
RUNS=runs/exp1-staleness$SUFFIX
CSV=docs/results/staleness$SUFFIX.csv
# STALENESS="10 20": only these (rows appended to the CSV); LR_K: lr = 0.05 * min(1, LR_K / S)
# (default 10: the MLP's rule; the CNN needs LR_K=1, see docs/results.md §1).
mkdir -p docs/results
[ -n "${STALENESS:-}" ] || rm -f "$CSV"
EPOCH=860 # steps of 64 examples in one epoch of the 55 000 training images
for S in ${STALENESS:-0 5 10 20 50}; do
    for seed in $SEEDS; do
        W=$((S + 1))
        lr=$(python3 -c "print(round(0.05 * min(1, ${LR_K:-10} / $S), 6) if $S else 0.05)")
        args=(--workers "$W" --policy async --delay const:1 --model "$MODEL" --threads "${THREADS:-1}" --batch 64 --epochs 3 --optimizer sgd --lr "$lr"
            --lr-decay "linear:$((2 * EPOCH)),$((3 * EPOCH))" --ema 0.999 --eval-every 430 --seed "$seed")
        if [ "$S" -ge 5 ]; then
            # Steps during a ramp of R virtual seconds ~ R (W+1)/2: one epoch's worth.
            args+=(--join-ramp "$((2 * EPOCH / (W + 1)))")
        fi
        if [ "$S" -ge 20 ]; then
            args+=(--warmup "$EPOCH" --restarts 3)
        fi
        name=s$S-seed$seed-lr$lr
        if sim "$name" "${args[@]}"; then
            python3 experiments/row.py "$CSV" "$RUNS/$name" staleness=$S seed=$seed lr=$lr \
                lr_rule="0.05·min(1, ${LR_K:-10}/S)"
        else
            echo "staleness=$S seed=$seed: every attempt diverged" | tee -a "$RUNS/diverged.txt"
        fi
    done
done
TITLE=$(echo "$MODEL" | tr a-z A-Z)
"$Q" plot --table "$CSV" --x staleness --y test_error --group lr_rule --title "Test error vs staleness ($TITLE, MNIST, 3 epochs)" --out "docs/results/staleness$SUFFIX"
