#!/usr/bin/env bash
# The adaptive policy (the server chooses N before each step) against the best fixed b found
# by sweeping, plain sync (b = 0) and the deadline policy, in three straggler scenarios. Real
# gradients in virtual time: MNIST, 784-64-10 MLP, batch 32, momentum 0.9, learning rate
# linear in N for every policy (0.002 x N at 100 machines, experiment 5's best; 0.008 x N at
# 20, the best of 0.002-0.012 for b = 2 there), 20 warm-up steps, evaluated every 5 steps.
#   paper   100 machines, the paper-calibrated compute times (log-normal body, rare Pareto tail)
#   shift   100 machines as in `paper`, but machines 0-24 run 3x slower from 50 s to 150 s
#   pareto  20 machines, 1 s plus a heavy Pareto tail (xm 0.1 s, alpha 1.5); machine 0 always 3x slower
# Each run goes a fixed number of steps (--target only records when 96% was first reached),
# so the table has both the time to 96% and the accuracy at a common virtual-time budget.
# Usage: experiments/adaptive.sh   -> docs/results/adaptive.{csv,md} and charts
source "$(dirname "$0")/common.sh"
RUNS=runs/exp-adaptive
CSV=docs/results/adaptive.csv
mkdir -p docs/results "$RUNS" && rm -f "$CSV"
base=(--model mlp:64 --batch 32 --optimizer momentum:0.9 --scale-lr --warmup 20 --eval-every 5 --target 0.96)
shift_faults=()
for w in $(seq 0 24); do shift_faults+=(--fault "lag:$w@50+100*3"); done

# run SCENARIO SETTING SEED ARGS...: one sim run, one CSV row.
run() {
    local scenario=$1 setting=$2 seed=$3
    shift 3
    sim "$scenario-$setting-seed$seed" "${base[@]}" --seed "$seed" "$@" &&
        python3 experiments/row.py "$CSV" "$RUNS/$scenario-$setting-seed$seed" --target 0.96 \
            scenario="$scenario" setting="$setting" seed="$seed"
}

for seed in $SEEDS; do
    paper=(--workers 100 --delay paper --steps 300 --lr 0.002)
    for b in 0 2 4 6 8 10 15 20; do run paper "b$b" "$seed" "${paper[@]}" --backups "$b"; done
    run paper deadline "$seed" "${paper[@]}" --policy deadline --deadline-timeout 1.7 --deadline-min 90
    run paper adaptive "$seed" "${paper[@]}" --policy adaptive

    shifted=(--workers 100 --delay paper --steps 300 --lr 0.002 "${shift_faults[@]}")
    for b in 0 4 8 15 25 30; do run shift "b$b" "$seed" "${shifted[@]}" --backups "$b"; done
    run shift deadline "$seed" "${shifted[@]}" --policy deadline --deadline-timeout 1.7 --deadline-min 50
    run shift adaptive "$seed" "${shifted[@]}" --policy adaptive

    pareto=(--workers 20 --delay slow:1,3,pareto:1,0.1,1.5 --steps 500 --lr 0.008)
    for b in 0 1 2 3 4 6; do run pareto "b$b" "$seed" "${pareto[@]}" --backups "$b"; done
    run pareto deadline "$seed" "${pareto[@]}" --policy deadline --deadline-timeout 1.3 --deadline-min 10
    run pareto adaptive "$seed" "${pareto[@]}" --policy adaptive
done

python3 experiments/adaptive_table.py "$CSV" "$RUNS" docs/results | tee docs/results/adaptive.md
for s in paper shift pareto; do
    "$Q" plot --table "docs/results/adaptive_n_$s.csv" --x virtual_seconds --y n --group policy \
        --title "N per step, $s scenario (seed 1)" --out "docs/results/adaptive_n_$s" > /dev/null
done
"$Q" plot "$RUNS/shift-adaptive-seed1" "$RUNS/shift-b30-seed1" "$RUNS/shift-b4-seed1" "$RUNS/shift-b0-seed1" \
    "$RUNS/shift-deadline-seed1" --label adaptive --label b=30 --label b=4 --label b=0 --label deadline \
    --out docs/results/adaptive_shift > /dev/null
