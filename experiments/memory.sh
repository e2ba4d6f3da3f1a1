#!/usr/bin/env bash
# Server memory against the number of workers (issue 4): `quorum ps` with a synthetic
# model of PARAMS parameters (default 10M = 40 MB of f32) and N workers (b = 0), loaded by
# N light workers in one other process (crates/net/examples/fake_workers.rs: each its own
# connection, pulling every step's parameters and pushing a full gradient). Records the
# server's peak resident memory (VmHWM) for each N.
# WINDOW: the HTTP/2 windows of the server and the workers (default 2097152, quorum's; or
# adaptive).
# Usage: experiments/memory.sh [STEPS] [PARAMS] [N...]   -> runs/memory/memory.csv
QUORUM=${QUORUM:-target/release/quorum}
source "$(dirname "$0")/common.sh"
[ -x "$Q" ] || cargo build --release -q -p quorum-cli
STEPS=${1:-4}
PARAMS=${2:-10000000}
shift 2 2>/dev/null || shift $#
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(1 10 50 100)
cargo build --release -q -p quorum-net --example fake_workers
LOAD=target/release/examples/fake_workers
RUNS=runs/memory
rm -rf "$RUNS" && mkdir -p "$RUNS"
echo "workers,params,steps,wall_seconds,peak_rss_mib,model_mib" > "$RUNS/memory.csv"
for n in "${SIZES[@]}"; do
    dir="$RUNS/n$n"
    "$Q" ps --model "synthetic:$PARAMS" --workers "$n" --backups 0 --lr 0.1 --steps "$STEPS" --eval-every 0 \
        --http2-window "${WINDOW:-2097152}" --worker-timeout 600 --stall-timeout 600 --listen 127.0.0.1:0 --out "$dir" > "$dir.ps.log" 2>&1 &
    ps_pid=$!
    addr=$(ps_address "$dir.ps.log") || exit 1
    QUORUM_H2_WINDOW=${WINDOW:-2097152} "$LOAD" "$addr" "$n" "$PARAMS" > "$dir.load.log" 2>&1 &
    load_pid=$!
    peak=0
    while kill -0 "$ps_pid" 2>/dev/null; do
        hwm=$(awk '/VmHWM/{print $2}' "/proc/$ps_pid/status" 2>/dev/null || true)
        [ -n "$hwm" ] && peak=$hwm
        sleep 0.2
    done
    wait "$ps_pid" || { echo "ps exited non-zero:"; tail -3 "$dir.ps.log"; exit 1; }
    wait "$load_pid" || { echo "load exited non-zero:"; tail -3 "$dir.load.log"; exit 1; }
    wall=$(python3 -c "import json; print(round(json.load(open('$dir/summary.json'))['wall_seconds'], 1))")
    python3 -c "print(f'$n,$PARAMS,$STEPS,$wall,{$peak/1024:.0f},{$PARAMS*4/2**20:.0f}')" >> "$RUNS/memory.csv"
    tail -1 "$RUNS/memory.csv"
done
column -s, -t "$RUNS/memory.csv"
