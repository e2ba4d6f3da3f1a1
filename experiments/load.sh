#!/usr/bin/env bash
# Load test (issue 5): one `quorum ps` and 64 `quorum worker` processes on loopback, synthetic
# model, N = 60, b = 4, for about SECONDS (default 120) of training. Checks from the run's own
# files that no step was lost or applied twice and that every step had N distinct workers,
# samples the server's memory (RSS) once a second, and requires every process to exit 0.
# Usage: experiments/load.sh [SECONDS]   -> runs/load/{summary.json,events.jsonl,memory.csv,...}
source "$(dirname "$0")/common.sh"
SECONDS_WANTED=${1:-120}
RUNS=runs/load
rm -rf "$RUNS" && mkdir -p "$RUNS"
COMMON=(--model synthetic:10000 --workers 64 --backups 4 --lr 0.2 --worker-timeout 30 --stall-timeout 60 --eval-every 0)

# launch STEPS DIR: ps + 64 worker processes; sets PS_PID and WORKER_PIDS.
launch() {
    "$Q" ps "${COMMON[@]}" --steps "$1" --listen 127.0.0.1:0 --out "$2" > "$2.ps.log" 2>&1 &
    PS_PID=$!
    local addr
    addr=$(ps_address "$2.ps.log") || exit 1
    WORKER_PIDS=()
    for i in $(seq 0 63); do
        "$Q" worker "${COMMON[@]}" --threads 1 --ps "$addr" --index "$i" > "$2.w$i.log" 2>&1 &
        WORKER_PIDS+=($!)
    done
}

# Calibrate: steps per second of this machine for this job (20 s run).
launch 1000000 "$RUNS/calibrate"
sleep 20
kill -TERM "$PS_PID"
wait "$PS_PID" || true
wait "${WORKER_PIDS[@]}" || true
RATE=$(python3 -c "import json; s=json.load(open('$RUNS/calibrate/summary.json')); print(s['steps'] / s['wall_seconds'])")
STEPS=$(python3 -c "print(max(100, int($RATE * $SECONDS_WANTED)))")
echo "calibration: $RATE steps/s -> $STEPS steps for ~$SECONDS_WANTED s"

launch "$STEPS" "$RUNS/run"
echo "seconds,rss_kib" > "$RUNS/memory.csv"
start=$(date +%s)
while kill -0 "$PS_PID" 2>/dev/null; do
    rss=$(awk '/VmRSS/{print $2}' "/proc/$PS_PID/status" 2>/dev/null || true)
    [ -n "$rss" ] && echo "$(($(date +%s) - start)),$rss" >> "$RUNS/memory.csv"
    sleep 1
done
fail=0
wait "$PS_PID" || { echo "ps exited non-zero"; fail=1; }
for i in "${!WORKER_PIDS[@]}"; do
    wait "${WORKER_PIDS[$i]}" || { echo "worker $i exited non-zero: $(tail -1 "$RUNS/run.w$i.log")"; fail=1; }
done
python3 - "$RUNS/run" "$RUNS/memory.csv" <<'PY'
import csv, json, sys
run, mem = sys.argv[1], sys.argv[2]
s = json.load(open(f"{run}/summary.json"))
applied, accepted = [], {}
for line in open(f"{run}/events.jsonl"):
    e = json.loads(line)
    kind = e.get("type") or e.get("event") or next(iter(e))
    body = e if "type" in e or "event" in e else e[kind]
    if kind == "step_applied":
        applied.append((body["step"], body["contributors"]))
    elif kind == "gradient_accepted":
        key = (body["step"], body["worker"])
        accepted[key] = accepted.get(key, 0) + 1
steps = [a[0] for a in applied]
assert steps == list(range(len(steps))), "steps applied out of order, twice, or with gaps"
assert len(steps) == s["steps"], (len(steps), s["steps"])
bad = [st for st, c in applied if len(c) != 60 or len(set(c)) != 60]
assert not bad, f"steps without 60 distinct contributors: {bad[:5]}"
dup = [k for k, n in accepted.items() if n > 1]
assert not dup, f"gradients accepted twice: {dup[:5]}"
rows = [int(r["rss_kib"]) for r in csv.DictReader(open(mem))]
q = max(1, len(rows) // 4)
first, last = sorted(rows[:q])[q // 2], sorted(rows[-q:])[q // 2]
print(f"steps {s['steps']} in {s['wall_seconds']:.1f} s ({s['steps_per_second']:.1f} steps/s), "
      f"{s['accepted']} gradients accepted, {s['dropped']} dropped late, {s['rejected']} rejected")
print(f"every step applied exactly once, in order, each with 60 distinct workers; no gradient accepted twice")
print(f"server RSS: median of the first quarter {first / 1024:.1f} MiB, of the last quarter {last / 1024:.1f} MiB, "
      f"max {max(rows) / 1024:.1f} MiB over {len(rows)} samples")
PY
[ "$fail" = 0 ] && echo "all 65 processes exited 0"
exit "$fail"
