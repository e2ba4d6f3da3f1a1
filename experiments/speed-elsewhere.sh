#!/usr/bin/env bash
# The speed job, two builds side by side, on another machine (one with more cores, say) that
# has neither the toolchain nor the data:
#   experiments/speed-elsewhere.sh pack OLD_QUORUM   # here: this build's and OLD_QUORUM's binaries
#                                                    # and MNIST into runs/device/ (~26 MB)
#   experiments/speed-elsewhere.sh run OUT           # there, from a checkout holding runs/device/:
#                                                    # experiments/speed.sh 3 300 with each build,
#                                                    # medians of both in OUT/compare.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=runs/device
case "${1:-}" in
pack)
    old=${2:?usage: speed-elsewhere.sh pack OLD_QUORUM}
    [ -x target/release/quorum ] || cargo build --release -p quorum-cli
    mkdir -p "$PACK"
    tar czf "$PACK/data.tgz" -C data mnist
    gzip -c target/release/quorum > "$PACK/quorum-new.gz"
    gzip -c "$old" > "$PACK/quorum-old.gz"
    du -sh "$PACK"
    ;;
run)
    out=${2:?usage: speed-elsewhere.sh run OUT}
    mkdir -p data "$out" && tar xzf "$PACK/data.tgz" -C data
    nproc
    for b in new old; do
        gunzip -c "$PACK/quorum-$b.gz" > "/tmp/quorum-$b" && chmod +x "/tmp/quorum-$b"
        QUORUM=/tmp/quorum-$b OUT=runs/speed-$b experiments/speed.sh 3 300 | tee "$out/speed-$b.txt"
    done
    python3 - runs > "$out/compare.txt" <<'PY'
import csv, glob, json, statistics, sys
med = statistics.median
def sps(d): return json.load(open(f"{d}/summary.json"))["steps_per_second"]
def compute(d):
    rows = list(csv.DictReader(open(f"{d}/workers.csv")))
    return statistics.mean(float(r["mean_compute_seconds"]) for r in rows if int(r["sent"]) > 0)
for b in ["new", "old"]:
    runs = lambda name: sorted(glob.glob(f"{sys.argv[1]}/speed-{b}/{name}-[0-9]*/"))
    c, c20, s1 = runs("cluster"), runs("cluster-exp20ms"), runs("single")
    over = [1000 * (1 / sps(d) - compute(d)) for d in s1]
    print(f"{b}: 4 workers {med(map(sps, c)):.1f} steps/s, exp 20 ms delay {med(map(sps, c20)):.1f}, "
          f"one worker {med(map(sps, s1)):.1f} (gradient {1000 * med(map(compute, s1)):.2f} ms, overhead {med(over):.2f} ms)")
PY
    cat "$out/compare.txt"
    ;;
*)
    echo "usage: experiments/speed-elsewhere.sh pack OLD_QUORUM | run OUT" >&2
    exit 2
    ;;
esac
