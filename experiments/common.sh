# Shared by the experiment scripts: the binary, output folders, and a logged sim run.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=${QUORUM:-target/debug/quorum}
[ -x "$Q" ] || cargo build -q -p quorum-cli
[ -d data/mnist ] || scripts/fetch-data.sh
SEEDS=${SEEDS:-"1 2 3"}
# sim NAME ARGS...: runs `quorum sim --out $RUNS/NAME ARGS`, logs to $RUNS/NAME.log; returns sim's status.
sim() {
    local name=$1
    shift
    mkdir -p "$RUNS"
    echo "== $name: quorum sim $*"
    "$Q" sim --out "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1 || { tail -1 "$RUNS/$name.log"; return 1; }
    grep -E "final test accuracy|reached|not reached|virtual time" "$RUNS/$name.log" | sed 's/^/   /'
}
# ps_address LOG: waits (up to 30 s) for a `quorum ps` logging to LOG to print its address; echoes it.
ps_address() {
    local addr=""
    for _ in $(seq 300); do
        addr=$(grep -o 'listening on [0-9.:]*' "$1" 2>/dev/null | awk '{print $3}' || true)
        [ -n "$addr" ] && { echo "$addr"; return 0; }
        sleep 0.1
    done
    echo "ps did not start" >&2
    cat "$1" >&2
    return 1
}
