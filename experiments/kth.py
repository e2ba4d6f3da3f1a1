#!/usr/bin/env python3
"""Mean time to the k-th gradient of a step, for every k, from a run's arrivals.csv.

usage: kth.py ARRIVALS.csv OUT.csv SOURCE SEED
Appends rows `source,seed,k,mean_seconds,within_2s` (within_2s: fraction of steps whose k-th
gradient arrived within 2 s of the step opening) over the steps that received every rank.
Standard library only.
"""
import csv
import os
import sys
from collections import defaultdict


def main(arrivals, out, source, seed):
    by_step = defaultdict(dict)
    with open(arrivals) as f:
        for r in csv.DictReader(f):
            by_step[int(r["step"])][int(r["k"])] = float(r["seconds"])
    kmax = max(max(ks) for ks in by_step.values())
    full = [ks for ks in by_step.values() if len(ks) == kmax]
    new = not os.path.exists(out) or os.path.getsize(out) == 0
    with open(out, "a", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if new:
            w.writerow(["source", "seed", "k", "mean_seconds", "within_2s"])
        for k in range(1, kmax + 1):
            times = [ks[k] for ks in full]
            w.writerow([source, seed, k, round(sum(times) / len(times), 4), round(sum(t <= 2.0 for t in times) / len(times), 4)])
    print(f"{source} seed {seed}: {len(full)} steps with all {kmax} gradients")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
