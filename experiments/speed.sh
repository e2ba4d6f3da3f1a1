#!/usr/bin/env bash
# The issue's speed job: 784-512-512-10 MLP, batch 128 per worker, plain SGD lr 0.1,
# 1 server + 4 workers (N=3, b=1) on this machine, with and without an exponential 20 ms
# delay before each gradient; plus one worker alone (per-step overhead = step time minus
# gradient time). Prints medians over REPEATS runs; every run's summary stays in runs/speed/.
# Usage: experiments/speed.sh [REPEATS] [STEPS]   (release build: cargo build --release -p quorum-cli)
# QUORUM=path/to/quorum and OUT=dir compare two builds side by side (runs kept in OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-5}
STEPS=${2:-300}
Q=${QUORUM:-target/release/quorum}
[ -x "$Q" ] || cargo build --release -p quorum-cli
OUT=${OUT:-runs/speed}
mkdir -p "$OUT"
common=(--model mlp --dataset mnist --batch 128 --optimizer sgd --lr 0.1 --eval-every 0 --steps "$STEPS")
run() { # name, extra args...
  local name=$1; shift
  for i in $(seq 1 "$REPEATS"); do
    "$Q" train "${common[@]}" "$@" --seed "$i" --out "$OUT/$name-$i" > "$OUT/$name-$i.log" 2>&1
  done
}
run cluster --workers 4 --backups 1 --threads 1
run cluster-exp20ms --workers 4 --backups 1 --threads 1 --delay exp:0.02
run single --workers 1 --backups 0 --threads 1
python3 - "$OUT" "$REPEATS" <<'PY'
import json, csv, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
def runs(name):
    return [f"{out}/{name}-{i}" for i in range(1, n + 1)]
def sps(d): return json.load(open(f"{d}/summary.json"))["steps_per_second"]
def compute(d):
    rows = list(csv.DictReader(open(f"{d}/workers.csv")))
    return statistics.mean(float(r["mean_compute_seconds"]) for r in rows if int(r["sent"]) > 0)
def miscounted(d):
    # Each worker's own count of gradients the server used (its push replies, printed in the
    # run's log) against the server's record (how many applied steps list it as a
    # contributor). A gradient counted twice, or lost, makes them differ. Must be 0.
    import re
    own = {int(m[1]): int(m[2]) for m in re.finditer(r"^  w(\d+): \d+ gradients sent, (\d+) used", open(f"{d}.log").read(), re.M)}
    served = {}
    for line in open(f"{d}/events.jsonl"):
        e = json.loads(line)
        if e["event"] == "step_applied":
            for w in e["contributors"]:
                served[w] = served.get(w, 0) + 1
    assert own, f"no worker lines in {d}.log"
    return sum(own[w] != served.get(w, 0) for w in own)
med = statistics.median
c, c20, s1 = runs("cluster"), runs("cluster-exp20ms"), runs("single")
g = med([compute(d) for d in c])
g1 = med([compute(d) for d in s1])
floor = 1.0 / (4 * g1 / 2)
print(f"gradient time (one worker alone, median)      {1000*g1:.2f} ms")
print(f"gradient time inside the 4-worker cluster     {1000*g:.2f} ms")
print(f"4+1 cluster, no stragglers: steps/s median    {med([sps(d) for d in c]):.1f}  (runs: {', '.join(f'{sps(d):.1f}' for d in c)})")
print(f"4+1 cluster, exp 20 ms delay: steps/s median  {med([sps(d) for d in c20]):.1f}  (runs: {', '.join(f'{sps(d):.1f}' for d in c20)})")
print(f"compute-bound floor 2 cores/(4 x gradient)    {floor:.1f} steps/s")
print(f"  ratio to floor                              {med([sps(d) for d in c])/floor:.2f}")
step1 = med([1.0/sps(d) for d in s1])
print(f"one worker: step time {1000*step1:.2f} ms, gradient {1000*g1:.2f} ms, overhead {1000*(step1-g1):.2f} ms")
print(f"workers whose own count of used gradients differs from the server's: {sum(miscounted(d) for d in c + c20)}")
PY
