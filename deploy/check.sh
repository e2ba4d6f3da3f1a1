#!/usr/bin/env bash
# Checks deploy/tfjob.yaml offline: renders each pod's TF_CONFIG as Kubeflow's training
# operator sets it (every replica as <job>-<type>-<index>.<namespace>.svc:2222, the pod's own
# type and index) and runs `quorum node --print-topology` with it and deploy/config.toml,
# asserting that every PS pod resolves to its own shard (with ps-0 as the coordinator) and
# every Worker pod to its own worker index with every shard's address.
# Usage: deploy/check.sh [QUORUM]   (default target/debug/quorum)
set -euo pipefail
cd "$(dirname "$0")/.."
Q=${1:-target/debug/quorum}
[ -x "$Q" ] || cargo build -q -p quorum-cli
job=$(awk '/^  name:/{print $2; exit}' deploy/tfjob.yaml)
ps=$(awk '/^    PS:/{f=1} f&&/replicas:/{print $2; exit}' deploy/tfjob.yaml)
workers=$(awk '/^    Worker:/{f=1} f&&/replicas:/{print $2; exit}' deploy/tfjob.yaml)
python3 - "$Q" "$job" "$ps" "$workers" <<'PY'
import json, os, subprocess, sys
q, job, ps, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
addr = lambda kind, i: f"{job}-{kind}-{i}.default.svc:2222"
cluster = {"ps": [addr("ps", i) for i in range(ps)], "worker": [addr("worker", i) for i in range(workers)]}
def node(kind, i):
    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": kind, "index": i}}))
    out = subprocess.run([q, "node", "--config", "deploy/config.toml", "--print-topology"], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{kind}-{i}: quorum node refused its TF_CONFIG:\n{out.stdout}{out.stderr}")
    return out.stdout
servers = ",".join(cluster["ps"])
for k in range(ps):
    text = node("ps", k)
    want = f"shard {k} of {ps}" + (f", coordinator {cluster['ps'][0]}" if k else "")
    assert want in text and "listening on 0.0.0.0:2222" in text, f"ps-{k}: expected `{want}` in:\n{text}"
    assert (f"/shard-{k}" in text) == (k > 0), f"ps-{k}: run directory:\n{text}"
    print(f"ps-{k}: {text.splitlines()[-1]}")
for i in range(workers):
    text = node("worker", i)
    want = f"quorum worker {i}, servers {servers}"
    assert want in text, f"worker-{i}: expected `{want}` in:\n{text}"
    print(f"worker-{i}: {text.splitlines()[-1]}")
print(f"every pod of {job} ({ps} PS, {workers} Worker) resolves to its role and shard")
PY
