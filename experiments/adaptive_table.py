#!/usr/bin/env python3
"""Tables and chart data for experiments/adaptive.sh.

usage: adaptive_table.py RESULTS.csv RUNS_DIR OUT_DIR

Prints one Markdown table per scenario: the adaptive policy, the best fixed b (the b whose
mean virtual time to 96% over the seeds is lowest: an oracle that has seen every run), b = 0
and the deadline policy; then every fixed b. Writes OUT_DIR/adaptive_n_SCENARIO.csv (N per
step over virtual time, seed 1, adaptive and deadline) for the charts. Standard library only.
"""
import csv
import json
import math
import os
import statistics
import sys
from collections import defaultdict

# Virtual-time budget per scenario for the "accuracy at budget" column.
BUDGET = {"paper": 200.0, "shift": 250.0, "pareto": 300.0}


def mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.mean(xs) if xs else float("nan")


def accuracy_at(run, budget):
    acc = None
    with open(os.path.join(run, "metrics.csv")) as f:
        for m in csv.DictReader(f):
            if float(m["virtual_seconds"]) > budget:
                break
            if m.get("test_accuracy"):
                acc = float(m["test_accuracy"])
    return acc


def n_per_step(run):
    out = []
    with open(os.path.join(run, "events.jsonl")) as f:
        for line in f:
            e = json.loads(line)
            if e.get("event") == "step_applied":
                out.append((e["time"], len(e["contributors"])))
    return out


def main(results, runs, out_dir):
    rows = defaultdict(list)
    for r in csv.DictReader(open(results)):
        run = os.path.join(runs, f"{r['scenario']}-{r['setting']}-seed{r['seed']}")
        s = json.load(open(os.path.join(run, "summary.json")))
        r["run"] = run
        r["t96"] = float(r["time_to_target"]) if r["time_to_target"] else None
        r["acc_budget"] = accuracy_at(run, BUDGET[r["scenario"]])
        r["n"] = s["accepted"] / max(s["steps"], 1)
        rows[(r["scenario"], r["setting"])].append(r)

    def line(label, rs, scenario, best_t=None):
        t = [r["t96"] for r in rs]
        reached = [x for x in t if x is not None]
        tm = mean(reached) if len(reached) == len(rs) else float("nan")
        ratio = f"{tm / best_t:.2f}×" if best_t and not math.isnan(tm) else ""
        per_seed = ", ".join(f"{x:.0f}" if x is not None else "–" for x in t)
        return (
            f"| {label} | {len(reached)}/{len(rs)} | {tm:.0f} ({per_seed}) | {ratio} | "
            f"{100 * mean([r['acc_budget'] for r in rs]):.2f}% | "
            f"{100 * mean([float(r['final_test_accuracy']) for r in rs]):.2f}% | "
            f"{mean([r['n'] for r in rs]):.1f} | {mean([float(r['mean_step_seconds']) for r in rs]):.2f} |"
        )

    header = (
        "| policy | seeds at 96% | virtual s to 96% (per seed) | vs best fixed b | accuracy at budget | "
        "final accuracy | gradients per step | mean step s |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for scenario in dict.fromkeys(s for s, _ in rows):
        fixed = {k[1]: v for k, v in rows.items() if k[0] == scenario and k[1].startswith("b")}

        def t_of(rs):
            t = [r["t96"] for r in rs]
            return mean(t) if all(x is not None for x in t) else math.inf

        best = min(fixed, key=lambda b: t_of(fixed[b]))
        best_t = t_of(fixed[best])
        steps = rows[(scenario, best)][0]["steps"]
        print(f"\n### Scenario `{scenario}` (budget {BUDGET[scenario]:.0f} virtual s, {steps} steps)\n")
        print(header)
        print(line("adaptive", rows[(scenario, "adaptive")], scenario, best_t))
        print(line(f"best fixed: b = {best[1:]}", fixed[best], scenario, best_t))
        print(line("b = 0", fixed["b0"], scenario, best_t))
        print(line("deadline", rows[(scenario, "deadline")], scenario, best_t))
        print(f"\nEvery fixed b in `{scenario}`:\n")
        print(header)
        for b in sorted(fixed, key=lambda b: int(b[1:])):
            print(line(f"b = {b[1:]}", fixed[b], scenario, best_t))
        with open(os.path.join(out_dir, f"adaptive_n_{scenario}.csv"), "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["policy", "virtual_seconds", "n"])
            for policy in ("adaptive", "deadline"):
                rs = [r for r in rows[(scenario, policy)] if r["seed"] == "1"]
                for t, n in n_per_step(rs[0]["run"]) if rs else []:
                    w.writerow([policy, round(t, 3), n])


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
