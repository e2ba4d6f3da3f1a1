#!/usr/bin/env bash
# Checks a TFJob manifest offline: renders the TF_CONFIG that Kubeflow's training operator
# gives each pod (service names <job>-<type>-<index>.<namespace>.svc:<port>), and asks
# `quorum node --print-topology` which role that pod takes with the manifest's run.toml.
# Every pod must resolve to its own role (the server or, with several PS replicas, its own
# shard; or worker i), and the configuration's `workers` and `shards` must match the Worker
# and PS replicas (quorum refuses to start otherwise).
# Usage: deploy/k8s/check.sh [MANIFEST] [QUORUM]   (defaults: deploy/k8s/quorum-tfjob.yaml,
# target/debug/quorum); NAMESPACE (default `default`) names the namespace.
set -euo pipefail
MANIFEST=${1:-deploy/k8s/quorum-tfjob.yaml}
Q=${2:-target/debug/quorum}
NS=${NAMESPACE:-default}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The ConfigMap's run.toml: the indented block under `run.toml: |`.
awk '/^  run.toml: \|/ { on = 1; next } on && /^    / { sub(/^    /, ""); print; next } on { exit }' \
    "$MANIFEST" > "$tmp/run.toml"
[ -s "$tmp/run.toml" ] || { echo "no run.toml in the ConfigMap of $MANIFEST" >&2; exit 1; }
# The TFJob's name, its replica counts and its port.
job=$(awk '/^kind: TFJob/ { t = 1 } t && /^  name:/ { print $2; exit }' "$MANIFEST")
replicas() { awk -v kind="    $1:" '$0 == kind { on = 1 } on && /replicas:/ { print $2; exit }' "$MANIFEST"; }
ps=$(replicas PS)
workers=$(replicas Worker)
port=$(awk '/^kind: TFJob/ { t = 1 } t && /containerPort:/ { print $3; exit }' "$MANIFEST")
[ -n "$job" ] && [ -n "$ps" ] && [ -n "$workers" ] && [ -n "$port" ] ||
    { echo "cannot read the TFJob's name, replicas and port from $MANIFEST" >&2; exit 1; }
echo "TFJob $job: $ps ps, $workers workers, port $port, namespace $NS"

addr() { echo "\"$job-$1-$2.$NS.svc:$port\""; }
cluster="\"ps\": [$(for i in $(seq 0 $((ps - 1))); do addr ps "$i"; done | paste -sd,)],"
cluster+=" \"worker\": [$(for i in $(seq 0 $((workers - 1))); do addr worker "$i"; done | paste -sd,)]"

fail=0
check() { # TYPE INDEX EXPECTED
    local tf="{\"cluster\": {$cluster}, \"task\": {\"type\": \"$1\", \"index\": $2}, \"environment\": \"cloud\"}"
    local out
    if ! out=$(TF_CONFIG=$tf "$Q" node --config "$tmp/run.toml" --print-topology 2>&1); then
        echo "FAIL $1 $2: $out"
        fail=1
    elif [[ $out != *"this process is the $3;"* ]]; then
        echo "FAIL $1 $2: expected the $3, got: $out"
        fail=1
    else
        echo "ok   $1-$2 -> $3 ($(echo "$out" | tail -n 1))"
    fi
}
# Several PS replicas are the shards of a sharded run (ps-0 runs the coordinator).
for i in $(seq 0 $((ps - 1))); do
    if [ "$ps" -gt 1 ]; then check ps "$i" "parameter server shard $i of $ps"; else check ps "$i" "parameter server"; fi
done
for i in $(seq 0 $((workers - 1))); do check worker "$i" "worker $i"; done
exit $fail
