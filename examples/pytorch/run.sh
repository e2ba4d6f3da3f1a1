#!/usr/bin/env bash
# One quorum server and 4 PyTorch workers (N = 3, b = 1) training MNIST on this machine, then
# the test accuracy of the final checkpoint.
#
#   bash examples/pytorch/run.sh                  # the MLP, 400 steps
#   MODEL=cnn STEPS=300 bash examples/pytorch/run.sh   (LR sets the learning rate)
#
# Needs the package (pip install ./python torch) and the data (bash scripts/fetch-data.sh).
# QUORUM picks the quorum binary (default: target/release/quorum, else target/debug/quorum);
# KILL=I kills worker I mid-run (b = 1 absorbs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-mlp}
STEPS=${STEPS:-400}
WORKERS=${WORKERS:-4}
OUT=${OUT:-runs/pytorch-$MODEL}
# Momentum 0.9 on the server (its default); the CNN needs a smaller rate than the MLP.
if [[ $MODEL == cnn ]]; then LR=${LR:-0.02}; else LR=${LR:-0.05}; fi
PY=${PYTHON:-python3}
if [[ -z "${QUORUM:-}" ]]; then
  QUORUM=target/release/quorum
  [[ -x $QUORUM ]] || QUORUM=target/debug/quorum
fi
[[ -x $QUORUM ]] || { echo "no quorum binary at $QUORUM: cargo build --release -p quorum-cli" >&2; exit 1; }

rm -rf "$OUT" && mkdir -p "$OUT"
$PY examples/pytorch/mnist.py init --model "$MODEL" --out "$OUT/init.safetensors"
$QUORUM ps --params "$OUT/init.safetensors" --workers "$WORKERS" --backups 1 --steps "$STEPS" --lr "$LR" \
  --listen 127.0.0.1:0 --out "$OUT" ${PS_ARGS:-} > "$OUT/ps.log" &
ps_pid=$!
trap 'kill $ps_pid ${eval_pid:-} ${pids[*]:-} 2>/dev/null || true' EXIT
until grep -o 'listening on [0-9.:]*' "$OUT/ps.log" >/dev/null 2>&1; do
  kill -0 $ps_pid 2>/dev/null || { cat "$OUT/ps.log"; exit 1; }
  sleep 0.1
done
addr=$(grep -o 'listening on [0-9.:]*' "$OUT/ps.log" | head -1 | cut -d' ' -f3)
echo "quorum ps on $addr: $MODEL, $WORKERS PyTorch workers, b = 1, $STEPS steps (log: $OUT/ps.log)"
pids=()
# Not a worker: reports test accuracy every EVAL_EVERY steps to the server (progress line,
# metrics.csv, TensorBoard, summary.json).
$PY examples/pytorch/mnist.py evaluator --model "$MODEL" --ps "$addr" --every "${EVAL_EVERY:-100}" \
  > "$OUT/evaluator.log" 2>&1 &
eval_pid=$!
for ((i = 0; i < WORKERS; i++)); do
  $PY examples/pytorch/mnist.py worker --model "$MODEL" --ps "$addr" --index $i > "$OUT/worker-$i.log" 2>&1 &
  pids+=($!)
done
if [[ -n "${KILL:-}" ]]; then
  until [[ $(grep -c step_applied "$OUT/events.jsonl" 2>/dev/null || true) -ge $((STEPS / 3)) ]]; do sleep 0.2; done
  kill -9 "${pids[$KILL]}" && echo "killed worker $KILL (kill -9) at step $(grep -c step_applied "$OUT/events.jsonl")"
fi
wait $ps_pid
wait $eval_pid || { echo "the evaluator failed:"; cat "$OUT/evaluator.log"; }
tail -n 6 "$OUT/ps.log"
$PY examples/pytorch/mnist.py evaluate --model "$MODEL" --run "$OUT" ${MIN_ACCURACY:+--min-accuracy $MIN_ACCURACY}
