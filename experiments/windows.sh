#!/usr/bin/env bash
# HTTP/2 windows against the link's round trip (issue 17). A link with a round-trip delay
# between two network namespaces (experiments/delay_link.py: this kernel has no sch_netem,
# so a TUN pair forwards every packet after RTT/2), a `quorum ps` on one side with a
# synthetic model of PARAMS parameters, one light worker on the other (fake_workers: pulls
# the parameters and pushes a gradient each step, no math), N = 1. Per round trip: raw TCP
# bulk throughput on the same link (tcp_bulk.py, 2 GB), then for each window setting the
# bytes of parameters and gradients moved per second (pull + push of 4 x PARAMS bytes each
# step), REPS runs interleaved.
# Usage (root): experiments/windows.sh [PARAMS] [STEPS] [REPS] [RTT_MS...]
#        -> runs/windows/windows.csv
set -euo pipefail
cd "$(dirname "$0")/.."
PARAMS=${1:-25000000}
STEPS=${2:-10}
REPS=${3:-3}
shift 3 2>/dev/null || shift $#
RTTS=("$@")
[ ${#RTTS[@]} -gt 0 ] || RTTS=(0 1 10)
WINDOWS=${WINDOWS:-"2097152 adaptive 16777216"}
Q=${QUORUM:-target/release/quorum}
cargo build --release -q -p quorum-cli
cargo build --release -q -p quorum-net --example fake_workers
LOAD=target/release/examples/fake_workers
RUNS=runs/windows
rm -rf "$RUNS" && mkdir -p "$RUNS"
CSV=$RUNS/windows.csv
echo "rtt_ms,window,run,mb_per_s" > "$CSV"
export QUORUM_TOKEN=${QUORUM_TOKEN:-$(python3 -c "import secrets; print(secrets.token_hex(16))")}
link_pid=""
trap '[ -n "$link_pid" ] && kill "$link_pid" 2>/dev/null; wait 2>/dev/null || true' EXIT
for rtt in "${RTTS[@]}"; do
    python3 experiments/delay_link.py "$rtt" qa qb > "$RUNS/link-$rtt.log" 2>&1 &
    link_pid=$!
    for _ in $(seq 50); do grep -q "link up" "$RUNS/link-$rtt.log" && break; sleep 0.1; done
    ip netns exec qb python3 experiments/tcp_bulk.py recv 9000 > "$RUNS/raw-$rtt.log" &
    recv_pid=$!
    sleep 0.5
    ip netns exec qa python3 experiments/tcp_bulk.py send 10.77.0.2 9000 2e9 > /dev/null
    wait "$recv_pid"
    raw=$(grep -o '[0-9]* MB/s' "$RUNS/raw-$rtt.log" | awk '{print $1}')
    echo "$rtt,raw TCP,1,$raw" >> "$CSV"
    for rep in $(seq "$REPS"); do
        for w in $WINDOWS; do
            dir=$RUNS/rtt$rtt-$w-$rep
            ip netns exec qb "$Q" ps --model "synthetic:$PARAMS" --workers 1 --backups 0 --lr 0.1 --steps "$STEPS" \
                --eval-every 0 --checkpoint-seconds 0 --worker-timeout 600 --stall-timeout 600 \
                --http2-window "$w" --listen 10.77.0.2:7070 --out "$dir" > "$dir.log" 2>&1 &
            ps_pid=$!
            for _ in $(seq 300); do grep -q "listening on" "$dir.log" && break; sleep 0.1; done
            t0=$(date +%s.%N)
            QUORUM_H2_WINDOW=$w ip netns exec qa "$LOAD" 10.77.0.2:7070 1 "$PARAMS" > "$dir.load.log" 2>&1
            t1=$(date +%s.%N)
            wait "$ps_pid"
            mbs=$(python3 -c "print(round(2 * 4 * $PARAMS * $STEPS / ($t1 - $t0) / 1e6))")
            echo "$rtt,$w,$rep,$mbs" >> "$CSV"
            echo "rtt $rtt ms, window $w, run $rep: $mbs MB/s (raw TCP $raw MB/s)"
        done
    done
    kill "$link_pid"
    wait "$link_pid" 2>/dev/null || true
    link_pid=""
done
python3 - "$CSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
rtts = sorted({int(r["rtt_ms"]) for r in rows})
ws = [w for w in dict.fromkeys(r["window"] for r in rows)]
print("| window | " + " | ".join(f"{t} ms round trip, MB/s" for t in rtts) + " |")
print("|---|" + "---:|" * len(rtts))
for w in ws:
    cells = []
    for t in rtts:
        v = [float(r["mb_per_s"]) for r in rows if r["window"] == w and int(r["rtt_ms"]) == t]
        raw = [float(r["mb_per_s"]) for r in rows if r["window"] == "raw TCP" and int(r["rtt_ms"]) == t]
        med = statistics.median(v)
        cells.append(f"{med:.0f}" + ("" if w == "raw TCP" else f" ({med / raw[0]:.2f}× raw)"))
    print(f"| {w} | " + " | ".join(cells) + " |")
PY
