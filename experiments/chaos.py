#!/usr/bin/env python3
"""Chaos soak on real processes: `quorum ps` and N+b `quorum worker` processes on loopback
while a seeded schedule kills (-9) and restarts workers, freezes (SIGSTOP) and thaws
(SIGCONT) them, never more than b out at once, and twice kills the server with `kill -9`
and restarts it with `--resume`. With `--shards S` the model is split over S `quorum ps`
processes: a server kill takes one shard at random (the run stops, naming it), and every
shard restarts with `--resume --resume-step` the newest step all of them checkpointed.
With `--policy async` the same soak runs the async policy (each gradient its own update).
Then it checks, from the run's files:

- every step applied exactly once across the restarts, in order, with N distinct
  contributors, each of whose gradients was accepted for that step (async: one contributor,
  whose gradient was accepted just before with the step it was computed on + its staleness
  = the step);
- no checkpointed step lost: each restart resumed from the newest checkpoint on disk;
- the run reaches the accuracy of an undisturbed run of the same job (run first);
- every process that was not killed on purpose exits 0 (with shards: but the shards a
  killed shard stopped);
- with shards: every shard applied the same contributors at every step.

It prints the counts (faults, steps, longest and median pause between steps).

Usage: experiments/chaos.py [--seconds 180] [--seed 1] [--shards 1] [--policy sync|async]
                            [--quorum target/release/quorum]
Exit status 0 when every check holds.
"""

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N, B = 4, 2
WORKERS = N + B


POLICY = "sync"


def job(steps):
    # The synthetic least-squares model: the test loss says how far from the optimum.
    policy = ["--backups", str(B), "--lr", "0.2"] if POLICY == "sync" else ["--policy", "async", "--lr", "0.01"]
    return ["--model", "synthetic", "--workers", str(WORKERS), *policy,
            "--steps", str(steps), "--delay", "exp:0.02", "--eval-every", "500"]


def start_ps(q, args, out, log, listen="127.0.0.1:0"):
    p = subprocess.Popen([q, "ps", *args, "--out", str(out), "--listen", listen,
                          "--checkpoint-every", "100", "--worker-timeout", "2", "--stall-timeout", "60"],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        m = re.search(r"listening on (\S+)", line)
        if m:
            addr = m.group(1)
            break
    else:
        raise SystemExit(f"quorum ps did not start (see {log.name})")
    # Keep draining stdout so the server never blocks on a full pipe.
    import threading
    threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True).start()
    return p, addr, lines


def start_worker(q, args, addr, i, logdir, n):
    log = open(logdir / f"worker{i}-{n}.log", "w")
    return subprocess.Popen([q, "worker", *args, "--ps", addr, "--index", str(i),
                             "--worker-timeout", "2"], stdout=log, stderr=subprocess.STDOUT)


def checkpoints(run):
    return sorted(int(m.group(1)) for f in (run / "checkpoints").glob("ckpt-*.json")
                  if (m := re.match(r"ckpt-(\d+)\.json", f.name)))


def shard_dir(run, k):
    return run if k == 0 else run / f"shard-{k}"


def start_shards(q, args, run, logs, shards, addrs=None, extra=()):
    """Every shard's `quorum ps` (shard 0 first: the others follow it); their addresses."""
    procs, got = [], []
    for k in range(shards):
        sharded = ["--shards", str(shards), "--shard", str(k)] if shards > 1 else []
        if k > 0:
            sharded += ["--coordinator", got[0]]
        log = open(logs / f"ps{k}.log", "a")
        p, addr, lines = start_ps(q, [*args, *sharded, *extra], shard_dir(run, k), log,
                                  listen=addrs[k] if addrs else "127.0.0.1:0")
        procs.append((p, lines))
        got.append(addr)
    return procs, got


def last_train_loss(run, last=50):
    rows = list(open(run / "metrics.csv"))[1:]
    losses = [float(r.split(",")[3]) for r in rows[-last:] if r.split(",")[3]]
    return statistics.mean(losses)


def applied(run):
    return [(e["step"], e["contributors"]) for e in events(run) if e["event"] == "step_applied"]


def events(run):
    return [json.loads(l) for l in open(run / "events.jsonl")]


def check_steps(evs, steps):
    """Each step once, in order, N distinct contributors, each accepted for that step (async:
    one, accepted just before, its step + staleness = the step)."""
    accepted, nxt, last = set(), 0, None
    for e in evs:
        if e["event"] == "gradient_accepted":
            accepted.add((e["step"], e["worker"]))
            last = e
        elif e["event"] == "step_applied" and POLICY == "async":
            c = e["contributors"]
            assert e["step"] == nxt, f"step {e['step']} applied when {nxt} was due"
            assert last is not None and c == [last["worker"]], f"update {nxt}: contributors {c}, accepted {last}"
            assert last["step"] + last["staleness"] == nxt, f"update {nxt} applies {last} (its staleness does not add up)"
            last = None
            nxt += 1
        elif e["event"] == "step_applied":
            c = e["contributors"]
            assert e["step"] == nxt, f"step {e['step']} applied when {nxt} was due"
            assert len(set(c)) == len(c) == N, f"step {nxt}: contributors {c}"
            missing = [w for w in c if (nxt, w) not in accepted]
            assert not missing, f"step {nxt} counts {missing}, whose gradients were never accepted"
            nxt += 1
    assert nxt == steps, f"{nxt} steps applied, {steps} expected"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quorum", default=os.environ.get("QUORUM", "target/release/quorum"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--policy", choices=["sync", "async"], default="sync")
    a = ap.parse_args()
    global POLICY
    POLICY = a.policy
    q = a.quorum
    rnd = random.Random(a.seed)
    root = Path(a.out or tempfile.mkdtemp(prefix="quorum-chaos-"))
    root.mkdir(parents=True, exist_ok=True)

    # 1. Undisturbed run of a short job: its speed sizes the soak, its loss is the target.
    base = root / "undisturbed"
    shards = ["--shards", str(a.shards)]
    r = subprocess.run([q, "train", *job(1000), *shards, "--out", str(base)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    b = json.load(open(base / "summary.json"))
    steps = max(1000, int(b["steps_per_second"] * a.seconds * 0.8))
    r = subprocess.run([q, "train", *job(steps), *shards, "--out", str(base)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    target = json.load(open(base / "summary.json"))["final_test_loss"]
    print(f"undisturbed: {steps} steps, final test loss {target:.4g}", flush=True)

    # 2. The soak.
    run, logs = root / "chaos", root / "logs"
    logs.mkdir(exist_ok=True)
    ps_args = job(steps)
    servers, addrs = start_shards(q, ps_args, run, logs, a.shards)
    ps = servers[0][0]
    addr = ",".join(addrs)
    args = [*ps_args, "--shards", str(a.shards)]
    workers = {i: start_worker(q, args, addr, i, logs, 0) for i in range(WORKERS)}
    started = {i: 0 for i in range(WORKERS)}
    out_until = {}      # worker -> (time it is back, what to do then)
    frozen = set()
    counts = {"worker kill -9 + restart": 0, "worker SIGSTOP/SIGCONT": 0, "server kill -9 + resume": 0}
    resumes = []
    victims = []        # the shard each server kill took
    killed_ok = []      # processes killed on purpose (their exit status is ours)
    t0 = time.monotonic()
    server_kills = [a.seconds / 3, 2 * a.seconds / 3]
    next_fault = t0 + rnd.uniform(2, 5)
    while True:
        now = time.monotonic()
        if ps.poll() is not None and not server_kills:
            # The run is over: thaw the frozen (they hear "stop" or find the server gone);
            # the killed ones stay down.
            for i in list(frozen):
                os.kill(workers[i].pid, signal.SIGCONT)
            break
        for i, (back, what) in list(out_until.items()):
            if now >= back:
                if what == "cont":
                    os.kill(workers[i].pid, signal.SIGCONT)
                    frozen.discard(i)
                else:
                    started[i] += 1
                    workers[i] = start_worker(q, args, addr, i, logs, started[i])
                del out_until[i]
        if server_kills and now - t0 >= server_kills[0]:
            server_kills.pop(0)
            victim = rnd.randrange(a.shards)
            victims.append(victim)
            servers[victim][0].send_signal(signal.SIGKILL)
            for p, _ in servers:
                # The other shards stop on their own (the run cannot go on without the victim).
                p.wait(timeout=60)
                killed_ok.append(p)
            common = set(checkpoints(run))
            for k in range(1, a.shards):
                common &= set(checkpoints(shard_dir(run, k)))
            saved = max(common, default=0)
            time.sleep(rnd.uniform(0.2, 2.0))
            extra = ["--resume"] + (["--resume-step", str(saved)] if a.shards > 1 else [])
            servers, _ = start_shards(q, ps_args, run, logs, a.shards, addrs=addrs, extra=extra)
            ps = servers[0][0]
            counts["server kill -9 + resume"] += 1
            for p, lines in servers:
                resumes.append((saved, p, lines))
        elif now >= next_fault and now - t0 < a.seconds:
            candidates = [i for i in range(WORKERS) if i not in out_until]
            if len(out_until) < B and candidates:
                i = rnd.choice(candidates)
                if rnd.random() < 0.5:
                    workers[i].send_signal(signal.SIGKILL)
                    workers[i].wait()
                    killed_ok.append(workers[i])
                    out_until[i] = (now + rnd.uniform(0.5, 4.0), "restart")
                    counts["worker kill -9 + restart"] += 1
                else:
                    os.kill(workers[i].pid, signal.SIGSTOP)
                    frozen.add(i)
                    out_until[i] = (now + rnd.uniform(0.5, 6.0), "cont")
                    counts["worker SIGSTOP/SIGCONT"] += 1
            next_fault = now + rnd.uniform(1, 5)
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    ps_rc = ps.wait()
    shard_rcs = [p.wait(timeout=60) for p, _ in servers[1:]]
    # Workers killed on purpose and not restarted before the end are not waited for.
    live = {i: w for i, w in workers.items() if not (i in out_until and i not in frozen)}
    worker_rcs = {i: w.wait(timeout=90) for i, w in live.items()}

    # 3. The checks.
    failures = []
    def check(ok, what):
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            failures.append(what)
    check(ps_rc == 0 and all(rc == 0 for rc in shard_rcs), f"the last servers exit 0 (got {ps_rc}, {shard_rcs})")
    check(all(rc == 0 for rc in worker_rcs.values()), f"every worker not killed on purpose exits 0 ({worker_rcs})")
    evs = events(run)
    try:
        check_steps(evs, steps)
        each = f"{N} distinct accepted contributors" if POLICY == "sync" else "the gradient accepted just before"
        check(True, f"all {steps} steps applied once, in order, with {each}")
    except AssertionError as e:
        check(False, f"steps: {e}")
    if a.shards > 1:
        first = applied(run)
        same = all(applied(shard_dir(run, k)) == first for k in range(1, a.shards))
        check(same, f"every one of the {a.shards} shards applied the same contributors at all {len(first)} steps")
    for saved, p, lines in resumes:
        text = "".join(lines)
        m = re.search(r"resuming from step (\d+)", text)
        got = int(m.group(1)) if m else None
        check(got == saved, f"a restart resumed from step {got}, the newest checkpoint on disk was {saved}")
    s = json.load(open(run / "summary.json"))
    loss = s["final_test_loss"]
    if loss is not None:
        check(loss <= max(2 * target, 0.05), f"final test loss {loss:.4g} against {target:.4g} undisturbed")
    else:
        # Separate shard processes hold parts of the model and evaluate nothing: compare the
        # workers' mean training loss over the last 50 steps instead.
        ours, theirs = last_train_loss(run), last_train_loss(base)
        check(ours <= max(2 * theirs, 0.05), f"mean train loss of the last 50 steps {ours:.4g} against {theirs:.4g} undisturbed")
    times = [float(l.split(",")[1]) for l in list(open(run / "metrics.csv"))[1:]]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    rejected = sum(1 for e in evs if e["event"] == "rejected")
    repeated = sum(1 for e in evs if e["event"] == "gradient_repeated")
    print(f"faults injected over {elapsed:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + (f" (shards killed: {victims})" if a.shards > 1 else ""))
    print(f"steps {steps}; pause between steps: longest {max(gaps):.2f} s, median {1000 * statistics.median(gaps):.1f} ms; "
          f"{repeated} gradients sent again and counted once; {rejected} refused requests")
    print(f"run directory: {root}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
