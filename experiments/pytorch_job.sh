#!/usr/bin/env bash
# One job of experiments/pytorch_workers.sh (run inside a fresh network namespace by it):
# `quorum ps` + 4 workers (N = 3, b = 1) on MNIST, the 784-512-512-10 MLP, batch 128, SGD
# 0.1, 300 steps, one compute thread per worker, no evaluation.
#   experiments/pytorch_job.sh quorum|pytorch OUT SEED
# quorum: quorum's own workers (`quorum worker`, the native engine); pytorch: PyTorch workers
# (examples/pytorch/mnist.py over the quorum Python package).
set -euo pipefail
kind=$1 out=$2 seed=$3
Q=${QUORUM:-target/release/quorum}
PY=${PYTHON:-python3}
common=(--workers 4 --backups 1 --optimizer sgd --lr 0.1 --steps 300 --eval-every 0 --batch 128 --seed "$seed"
        --threads 1 --checkpoint-seconds 0 --model mlp --dataset mnist)
mkdir -p "$out"
if [[ $kind == pytorch ]]; then
  $PY examples/pytorch/mnist.py init --model mlp --seed "$seed" --out "$out/init.safetensors" > /dev/null
  "$Q" ps --params "$out/init.safetensors" "${common[@]}" --listen 127.0.0.1:7070 --out "$out" > "$out/ps.log" 2>&1 &
else
  "$Q" ps "${common[@]}" --listen 127.0.0.1:7070 --out "$out" > "$out/ps.log" 2>&1 &
fi
ps_pid=$!
until grep -q 'listening on' "$out/ps.log" 2>/dev/null; do sleep 0.05; done
for i in 0 1 2 3; do
  if [[ $kind == pytorch ]]; then
    $PY examples/pytorch/mnist.py worker --model mlp --seed "$seed" --ps 127.0.0.1:7070 --index $i --threads 1 \
      > "$out/worker-$i.log" 2>&1 &
  else
    "$Q" worker "${common[@]}" --ps 127.0.0.1:7070 --index $i > "$out/worker-$i.log" 2>&1 &
  fi
done
wait $ps_pid
wait
