#!/usr/bin/env bash
# Sharded parameter servers on loopback (issue 17): a synthetic model of PARAMS parameters
# (default 100M = 400 MB of f32), WORKERS light workers (crates/net/examples/fake_workers.rs:
# each pulls every step from every shard at once and pushes every shard its slice; no
# gradient math), and S = 1, 2, 4 servers as separate `quorum ps` processes (b = 0).
# Per S: steps/s, each shard's resident memory while training (the median of samples taken
# every 0.2 s over the second half of the run: a shard's start-up, which builds the whole
# synthetic model once, is left out), and whether every shard applied the same contributors
# at every step.
# Usage: experiments/shards_loopback.sh [STEPS] [PARAMS] [WORKERS] [S...]
#        -> runs/shards-loopback/shards.csv
QUORUM=${QUORUM:-target/release/quorum}
source "$(dirname "$0")/common.sh"
[ -x "$Q" ] || cargo build --release -q -p quorum-cli
STEPS=${1:-10}
PARAMS=${2:-100000000}
WORKERS=${3:-2}
shift 3 2>/dev/null || shift $#
SHARDS=("$@")
[ ${#SHARDS[@]} -gt 0 ] || SHARDS=(1 2 4)
cargo build --release -q -p quorum-net --example fake_workers
LOAD=target/release/examples/fake_workers
RUNS=runs/shards-loopback
rm -rf "$RUNS" && mkdir -p "$RUNS"
echo "shards,params,workers,steps,steps_per_second,rss_mib_per_shard,model_mib,same_contributors" > "$RUNS/shards.csv"
for s in "${SHARDS[@]}"; do
    dir="$RUNS/s$s"
    mkdir -p "$dir"
    pids=() addrs=()
    for k in $(seq 0 $((s - 1))); do
        extra=(--shards "$s" --shard "$k")
        [ "$k" -gt 0 ] && extra+=(--coordinator "${addrs[0]}")
        "$Q" ps --model "synthetic:$PARAMS" --workers "$WORKERS" --backups 0 --lr 0.1 --steps "$STEPS" \
            --eval-every 0 --checkpoint-seconds 0 --worker-timeout 600 --stall-timeout 600 \
            --listen 127.0.0.1:0 --out "$dir/shard-$k" "${extra[@]}" > "$dir/shard-$k.log" 2>&1 &
        pids+=($!)
        addrs+=("$(ps_address "$dir/shard-$k.log")") || exit 1
    done
    all=$(IFS=,; echo "${addrs[*]}")
    "$LOAD" "$all" "$WORKERS" "$PARAMS" > "$dir/load.log" 2>&1 &
    load_pid=$!
    : > "$dir/rss.txt"
    while kill -0 "${pids[0]}" 2>/dev/null; do
        line=""
        for p in "${pids[@]}"; do
            line+="$(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0) "
        done
        echo "$line" >> "$dir/rss.txt"
        sleep 0.2
    done
    for p in "${pids[@]}"; do wait "$p" || { echo "a shard exited non-zero:"; tail -3 "$dir"/shard-*.log; exit 1; }; done
    wait "$load_pid" || { echo "load exited non-zero:"; tail -3 "$dir/load.log"; exit 1; }
    python3 - "$dir" "$s" "$PARAMS" "$WORKERS" "$STEPS" >> "$RUNS/shards.csv" <<'PY'
import json, statistics, sys
d, s, params, workers, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def applied(k):
    out = []
    for line in open(f"{d}/shard-{k}/events.jsonl"):
        e = json.loads(line)
        if e["event"] == "step_applied":
            out.append((e["step"], e["contributors"]))
    return out
same = all(applied(k) == applied(0) for k in range(s)) and len(applied(0)) == int(steps)
summary = json.load(open(f"{d}/shard-0/summary.json"))
rows = [list(map(int, l.split())) for l in open(f"{d}/rss.txt") if l.split()]
late = rows[len(rows) // 2:] or rows
rss = [statistics.median(r[k] for r in late) / 1024 for k in range(s)]
print(f"{s},{params},{workers},{steps},{summary['steps_per_second']:.2f},{' '.join(f'{x:.0f}' for x in rss)},"
      f"{params * 4 / 2**20:.0f},{same}")
PY
    tail -1 "$RUNS/shards.csv"
done
column -s, -t "$RUNS/shards.csv"
