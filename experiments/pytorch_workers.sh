#!/usr/bin/env bash
# PyTorch workers against quorum's own workers on the TensorFlow peer's job, interleaved in
# one run, with the peer's launch.py in the same loop for context (speed claims against
# TensorFlow come from ../shared/peers/side_by_side.sh, not from here) (each run in its own network namespace; needs root):
# 1 server + 4 workers, N = 3, the 784-512-512-10 MLP, batch 128, SGD 0.1, 300 steps, one
# compute thread per worker. Prints steps/s (skipping the first 20 steps), each worker's mean
# gradient time as the workers measured it in the run (4 processes sharing the cores; for
# PyTorch: the Python call, copies included), one gradient alone on one idle thread, and the
# compute-bound floor (workers x gradient alone / cores) over the measured step time.
#   experiments/pytorch_workers.sh [REPS] [OUT]
# Needs: a release build (cargo build --release -p quorum-cli), scripts/fetch-data.sh, the
# Python package with torch in $PYTHON's environment (pip install ./python torch), and
# TensorFlow's venv (made as ../shared/peers/side_by_side.sh makes it; TF_VENV).
set -u
cd "$(dirname "$0")/.."
REPS=${1:-3}; OUT=${2:-runs/pytorch_workers}
PEERS=$(realpath ../shared/peers/tf)
VENV=${TF_VENV:-${TMPDIR:-/tmp}/quorum-tf-venv}
export QUORUM=$(realpath "${QUORUM:-target/release/quorum}") PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import quorum.torch" || { echo "no quorum package for $PYTHON: pip install ./python torch" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import tensorflow" 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q tensorflow-cpu==2.21.0 || exit 1
fi
mkdir -p "$OUT"; OUT=$(realpath "$OUT")
for r in $(seq 1 "$REPS"); do
  echo "rep $r of $REPS"
  (cd "$PEERS" && ./netns.sh "$VENV/bin/python" launch.py --name k4n3 --mode sync --workers 4 -N 3 --sleep-ms 0 \
     --steps 300 --seed "$r" --run-dir "$OUT/tf/r$r" > "$OUT/tf-r$r.log" 2>&1)
  "$PEERS/netns.sh" bash experiments/pytorch_job.sh quorum "$OUT/quorum/r$r" "$r" > "$OUT/quorum-r$r.log" 2>&1
  "$PEERS/netns.sh" bash experiments/pytorch_job.sh pytorch "$OUT/pytorch/r$r" "$r" > "$OUT/pytorch-r$r.log" 2>&1
done
echo "one gradient alone, one thread"
cargo build -q --release -p quorum-compute --example gradient_time
RAYON_NUM_THREADS=1 target/release/examples/gradient_time 30 mlp native > "$OUT/alone-quorum.csv"
"$PYTHON" - > "$OUT/alone-pytorch.txt" <<'PY'
import statistics, time, torch
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                          torch.nn.Linear(512, 10))
x, y, ts = torch.randn(128, 784), torch.randint(10, (128,)), []
for i in range(60):
    t0 = time.perf_counter()
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    ts.append(time.perf_counter() - t0)
print(1000 * statistics.median(ts[10:]))
PY
(cd "$PEERS" && "$VENV/bin/python" local_baseline.py --inter 1 --steps 120 --reps 3 > "$OUT/alone-tf.json" 2>/dev/null)
python3 - "$OUT" "$(nproc)" <<'PY'
import csv, glob, json, statistics as st, sys
sys.path.insert(0, "experiments")
from steps_per_s import steps_per_s
out, cores = sys.argv[1], int(sys.argv[2])
alone = {
    "tf": json.load(open(f"{out}/alone-tf.json"))["intra1_step_median_ms"],
    "quorum": float(list(csv.DictReader(open(f"{out}/alone-quorum.csv")))[0]["median_ms"]),
    "pytorch": float(open(f"{out}/alone-pytorch.txt").read()),
}
def med(v): return st.median(v) if v else float("nan")
def quorum(kind):
    rates, grads = [], []
    for d in sorted(glob.glob(f"{out}/{kind}/r*")):
        try:
            rates.append(steps_per_s(d))
            w = [float(r["mean_compute_seconds"]) for r in csv.DictReader(open(f"{d}/workers.csv"))]
            grads.append(sum(w) / len(w))
        except Exception as e:
            print("skipped", d, e, file=sys.stderr)
    return rates, grads
def tf():
    v = []
    for d in sorted(glob.glob(f"{out}/tf/r*")):
        try:
            v.append(json.load(open(f"{d}/summary.json"))["global_steps_per_s"])
        except Exception as e:
            print("skipped", d, e, file=sys.stderr)
    return v, []
rows = [("TensorFlow 2.21 SyncReplicasOptimizer", "tf", tf()), ("quorum workers (native engine)", "quorum", quorum("quorum")),
        ("PyTorch workers (quorum Python package)", "pytorch", quorum("pytorch"))]
# The comparison is PyTorch workers against quorum's own; TensorFlow (launch.py, not
# side_by_side.sh) is printed for context, not as a claim.
base = med(rows[1][2][0])
print("| workers | steps/s (median; runs) | vs quorum workers | gradient ms in the run | gradient ms alone | step ms | floor / step |")
print("|---|---|---:|---:|---:|---:|---:|")
for name, key, (rates, grads) in rows:
    m = med(rates)
    g = f"{med(grads) * 1000:.1f}" if grads else "-"
    step = 1000 / m
    floor = 4 * alone[key] / cores  # four gradients per step on `cores` cores, at best
    print(f"| {name} | {m:.1f}; {', '.join(f'{x:.1f}' for x in rates)} | {m / base:.2f}x | {g} | {alone[key]:.1f} | "
          f"{step:.1f} | {floor / step:.2f} |")
PY
