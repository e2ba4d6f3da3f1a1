#!/usr/bin/env bash
# Accuracy targets of quorum-compute, measured with the simulator (real gradients, virtual time).
# Usage: experiments/accuracy.sh [OUT_DIR]   (default runs/accuracy). Needs scripts/fetch-data.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/accuracy}
Q=${QUORUM:-target/debug/quorum}
mkdir -p "$OUT"
run() { name=$1; shift; echo "== $name: quorum sim $*"; "$Q" sim --out "$OUT/$name" "$@" | tee "$OUT/$name.log"; }

# MLP 784-512-512-10 on MNIST, one worker, momentum SGD, linear decay over the last half.
run mlp-mnist --workers 1 --delay const:1 --model mlp --dataset mnist --batch 128 --epochs 8 --optimizer momentum:0.9 --lr 0.05 --lr-decay linear:1720,3440 --eval-every 860
# MLP on Fashion-MNIST, same recipe.
run mlp-fashion --workers 1 --delay const:1 --model mlp --dataset fashion-mnist --batch 128 --epochs 8 --optimizer momentum:0.9 --lr 0.05 --lr-decay linear:1720,3440 --eval-every 860
# Sync is mini-batch SGD: N=8, b=2 with batch 16 per worker vs one worker with batch 128, same examples.
run sync-8-2-b16 --workers 10 --backups 2 --model mlp --dataset mnist --batch 16 --epochs 3 --optimizer momentum:0.9 --lr 0.05 --delay exp:1 --eval-every 430
run single-b128 --workers 1 --delay const:1 --model mlp --dataset mnist --batch 128 --epochs 3 --optimizer momentum:0.9 --lr 0.05 --eval-every 430
# The paper's MNIST CNN (4 conv 3x3 layers, 2 max-pools), one worker.
run cnn-mnist --workers 1 --delay const:1 --model cnn:16,16,32,32 --dataset mnist --batch 64 --epochs 4 --optimizer momentum:0.9 --lr 0.02 --lr-decay linear:1720,3440 --eval-every 860
