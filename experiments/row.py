#!/usr/bin/env python3
"""Append one run's results to a CSV (one row per run; header written when the file is new,
and an existing file's column order kept).

usage: row.py RESULTS.csv RUN_DIR [--target ACC]... [KEY=VALUE ...]

Reads RUN_DIR/summary.json and RUN_DIR/metrics.csv as written by `quorum sim` or
`quorum train`. KEY=VALUE pairs come first in the row (the experiment's settings, e.g.
staleness=20 seed=2). With --target, the row also holds the (virtual or wall) seconds and
the training examples at the first evaluation whose test accuracy reached ACC (empty: never):
columns time_to_target and examples_to_target for one target, time_to_ACC and
examples_to_ACC for several.
Standard library only.
"""
import csv
import json
import os
import sys


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    out, run, rest = argv[0], argv[1], argv[2:]
    targets = []
    settings = []
    i = 0
    while i < len(rest):
        if rest[i] == "--target":
            targets.append(float(rest[i + 1]))
            i += 2
            continue
        key, _, value = rest[i].partition("=")
        settings.append((key, value))
        i += 1
    with open(os.path.join(run, "summary.json")) as f:
        s = json.load(f)
    seconds = s.get("virtual_seconds", s.get("wall_seconds"))
    row = dict(settings)
    row.update(
        policy=s.get("policy"),
        workers=s.get("workers"),
        backups=s.get("backups"),
        steps=s.get("steps"),
        seconds=seconds,
        mean_step_seconds=s.get("mean_step_seconds", ""),
        final_test_accuracy=s.get("final_test_accuracy"),
        test_error=round(1 - s["final_test_accuracy"], 6) if s.get("final_test_accuracy") is not None else "",
        mean_staleness=s.get("mean_staleness", ""),
        dropped=s.get("dropped"),
        target_step=s.get("target_step", ""),
        diverged=s.get("diverged", ""),
        validation_accuracy=s.get("validation_accuracy", ""),
    )
    if targets:
        with open(os.path.join(run, "metrics.csv")) as f:
            metrics = list(csv.DictReader(f))
    for target in targets:
        t, ex = "", ""
        for m in metrics:
            acc = m.get("test_accuracy") or ""
            if acc and float(acc) >= target:
                t = m.get("virtual_seconds") or m.get("seconds")
                ex = m.get("examples")
                break
        suffix = "target" if len(targets) == 1 else str(target)
        if len(targets) == 1:
            row["target"] = target
        row["time_to_" + suffix] = t
        row["examples_to_" + suffix] = ex
    row = {k: ("" if v is None else v) for k, v in row.items()}
    new = not os.path.exists(out) or os.path.getsize(out) == 0
    fields = list(row)
    if not new:
        # Appending: the file's own column order, whatever order this row's keys came in.
        with open(out, newline="") as f:
            fields = next(csv.reader(f))
        extra = [k for k in row if k not in fields]
        if extra:
            sys.exit(f"{out} has no column for {', '.join(extra)}: write these runs to a new file")
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow(row)


if __name__ == "__main__":
    main(sys.argv[1:])
