#!/usr/bin/env bash
# A bad network: `quorum ps` and 4 `quorum worker` processes (N = 3, b = 1) in two network
# namespaces made here, joined by a veth pair, with random packet loss both ways (iptables'
# `statistic` match) and, optionally, a bandwidth limit (tc tbf). The speed job's model:
# 784-512-512-10 MLP, batch 128, SGD 0.1, one compute thread per worker, 300 steps.
# For each loss rate it checks that every step was applied once, in order, with N distinct
# contributors, and prints the median step time against the clean link.
# Needs root, iproute2 and iptables (apt-get install iproute2 iptables). `tc netem` (delay,
# jitter) is used when the kernel has it, else the runs are loss-only and the script says so.
# Usage: experiments/badnet.sh [LOSSES="0 0.02 0.05"] [RATE=1gbit] [DELAY=5ms]
set -euo pipefail
cd "$(dirname "$0")/.."
Q=${QUORUM:-target/release/quorum}
[ -x "$Q" ] || cargo build --release -p quorum-cli
[ -d data/mnist ] || scripts/fetch-data.sh
LOSSES=${LOSSES:-"0 0.02 0.05"}
RATE=${RATE:-1gbit}
DELAY=${DELAY:-5ms}
OUT=${OUT:-runs/badnet}
mkdir -p "$OUT"
# The server listens on a non-loopback address, so it insists on a join token.
export QUORUM_TOKEN=${QUORUM_TOKEN:-$(head -c 24 /dev/urandom | base64)}
PS_NS=quorum-ps-$$ W_NS=quorum-w-$$
cleanup() { ip netns del "$PS_NS" 2>/dev/null || true; ip netns del "$W_NS" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$PS_NS"
ip netns add "$W_NS"
ip link add qps$$ type veth peer name qw$$
ip link set qps$$ netns "$PS_NS"
ip link set qw$$ netns "$W_NS"
ip -n "$PS_NS" addr add 10.77.0.1/24 dev qps$$
ip -n "$W_NS" addr add 10.77.0.2/24 dev qw$$
for ns in "$PS_NS" "$W_NS"; do
    ip -n "$ns" link set lo up
done
ip -n "$PS_NS" link set qps$$ up
ip -n "$W_NS" link set qw$$ up
netem=no
if ip netns exec "$PS_NS" tc qdisc add dev qps$$ root netem delay "$DELAY" 1ms rate "$RATE" 2>/dev/null; then
    ip netns exec "$W_NS" tc qdisc add dev qw$$ root netem delay "$DELAY" 1ms rate "$RATE"
    netem=yes
else
    echo "this kernel has no tc netem: no added delay or jitter; bandwidth limited to $RATE by tbf, loss by iptables"
    for pair in "$PS_NS qps$$" "$W_NS qw$$"; do
        set -- $pair
        ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst 256kbit latency 50ms
    done
fi
job=(--model mlp --dataset mnist --batch 128 --optimizer sgd --lr 0.1 --eval-every 100 --steps 300
    --workers 4 --backups 1 --threads 1 --worker-timeout 10)
for loss in $LOSSES; do
    for ns in "$PS_NS" "$W_NS"; do
        ip netns exec "$ns" iptables -F INPUT
        if [ "$loss" != 0 ]; then
            ip netns exec "$ns" iptables -A INPUT -m statistic --mode random --probability "$loss" -j DROP
        fi
    done
    run="$OUT/loss-$loss"
    rm -rf "$run"
    ip netns exec "$PS_NS" "$Q" ps "${job[@]}" --listen 10.77.0.1:7070 --out "$run" > "$run.ps.log" 2>&1 &
    ps_pid=$!
    pids=()
    for i in 0 1 2 3; do
        ip netns exec "$W_NS" "$Q" worker "${job[@]}" --ps 10.77.0.1:7070 --index "$i" > "$run.w$i.log" 2>&1 &
        pids+=($!)
    done
    wait "$ps_pid"
    for p in "${pids[@]}"; do wait "$p"; done
    python3 - "$run" "$loss" <<'PY'
import json, statistics, sys
run, loss = sys.argv[1], float(sys.argv[2])
nxt = 0
for line in open(f"{run}/events.jsonl"):
    e = json.loads(line)
    if e["event"] == "step_applied":
        c = e["contributors"]
        assert e["step"] == nxt and len(set(c)) == len(c) == 3, e
        nxt += 1
s = json.load(open(f"{run}/summary.json"))
assert nxt == s["steps"] == 300, (nxt, s["steps"])
t = [float(l.split(",")[1]) for l in list(open(f"{run}/metrics.csv"))[1:]]
gaps = [b - a for a, b in zip(t, t[1:])]
print(f"loss {100 * loss:.0f}%: 300 steps correct (3 distinct contributors each), median step {1000 * statistics.median(gaps):.1f} ms, "
      f"p99 {1000 * sorted(gaps)[int(0.99 * len(gaps))]:.1f} ms, {s['steps_per_second']:.1f} steps/s, "
      f"test accuracy {100 * (s['final_test_accuracy'] or 0):.2f}%")
PY
done
echo "netem: $netem"
