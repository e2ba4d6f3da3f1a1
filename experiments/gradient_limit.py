"""How close quorum's gradients are to the machine's arithmetic limit, measured in one run.

For the MLP (784-512-512-10, batch 128) it times the eight matrix products its gradient
needs (three forward, three for the weights, two for the layer inputs) in numpy/OpenBLAS
on one thread, and quorum's whole gradient (loss, activations, bias, everything) on one
thread; for the paper's CNN (32-32-64-64, batch 64) it counts the arithmetic of its
products and divides by the SGEMM peak measured here (1024^3, OpenBLAS, one thread).
Rounds alternate numpy and quorum so that drift on a noisy machine hits both; the table
gives medians over rounds.

Usage: python3 experiments/gradient_limit.py ROUNDS LABEL=GRADIENT_TIME_BINARY...
(experiments/gradient_limit.sh builds the binaries, one per build of quorum to compare, and
the numpy environment.)
"""
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def median_seconds(f, n):
    f()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


def mlp_products(rng):
    b, d0, d1, d2, d3 = 128, 784, 512, 512, 10
    m = lambda *s: rng.standard_normal(s).astype(np.float32)
    x, w1, w2, w3 = m(b, d0), m(d0, d1), m(d1, d2), m(d2, d3)
    h1, h2, g1, g2, g3 = m(b, d1), m(b, d2), m(b, d1), m(b, d2), m(b, d3)

    def run():
        x @ w1, h1 @ w2, h2 @ w3  # forward
        x.T @ g1, h1.T @ g2, h2.T @ g3  # weight gradients
        g3 @ w3.T, g2 @ w2.T  # input gradients of the top two layers

    flops = 2 * b * (d0 * d1 + d1 * d2 + d2 * d3) * 2 + 2 * b * (d3 * d2 + d2 * d1)
    return run, flops


def cnn_flops(b=64, side=28, channels=(32, 32, 64, 64), classes=10):
    total, cin, s = 0, 1, side
    for i, cout in enumerate(channels):
        mac = cout * cin * 9 * b * s * s
        total += 2 * mac * (2 if i == 0 else 3)  # forward, weights, and (not the first) input
        cin = cout
        if i % 2 == 1:
            s //= 2
    features = cin * s * s
    total += 2 * b * features * classes * 3
    return total


ENGINE = os.environ.get("ENGINE", "native")


def quorum(binary, model):
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    # gradient_time times the CNN a tenth as often as the MLP: 50 MLP and 5 CNN gradients
    # (after warm-up ones), their median.
    out = subprocess.run([binary, "50", model, ENGINE], env=env, capture_output=True, text=True, check=True)
    row = out.stdout.strip().splitlines()[-1].split(",")
    return float(row[3]) / 1e3


def main():
    rounds = int(sys.argv[1])
    builds = [arg.split("=", 1) for arg in sys.argv[2:]]
    rng = np.random.default_rng(0)
    mlp_run, mlp_flops = mlp_products(rng)
    a, b = rng.standard_normal((1024, 1024), dtype=np.float32), rng.standard_normal((1024, 1024), dtype=np.float32)
    peaks, numpy_mlp = [], []
    mlp = {label: [] for label, _ in builds}
    cnn = {label: [] for label, _ in builds}
    for r in range(rounds):
        peaks.append(2 * 1024**3 / median_seconds(lambda: a @ b, 7))
        numpy_mlp.append(median_seconds(mlp_run, 50))
        line = f"round {r + 1}: peak {peaks[-1] / 1e9:.1f} GFLOP/s, numpy MLP products {numpy_mlp[-1] * 1e3:.2f} ms"
        for label, binary in builds:
            mlp[label].append(quorum(binary, "mlp"))
            cnn[label].append(quorum(binary, "cnn"))
            line += f"; {label}: MLP {mlp[label][-1] * 1e3:.2f} ms, CNN {cnn[label][-1] * 1e3:.1f} ms"
        print(line, flush=True)
    peak, np_mlp = statistics.median(peaks), statistics.median(numpy_mlp)
    cnn_floor = cnn_flops() / peak
    print()
    print(f"| one core, medians of {rounds} rounds | ms | ratio |")
    print("|---|---:|---:|")
    print(f"| SGEMM peak (OpenBLAS, 1024^3) | {peak / 1e9:.1f} GFLOP/s | |")
    print(f"| MLP: its 8 matrix products in numpy/OpenBLAS ({mlp_flops / 1e9:.2f} GFLOP) | {np_mlp * 1e3:.2f} | 1 |")
    for label, _ in builds:
        q = statistics.median(mlp[label])
        print(f"| MLP: quorum's whole gradient, {label} | {q * 1e3:.2f} | {q / np_mlp:.2f} (goal <= 1.2) |")
    print(f"| CNN: its arithmetic ({cnn_flops() / 1e9:.2f} GFLOP) at the SGEMM peak | {cnn_floor * 1e3:.1f} | 1 |")
    for label, _ in builds:
        q = statistics.median(cnn[label])
        print(f"| CNN: quorum's whole gradient, {label} | {q * 1e3:.1f} | {q / cnn_floor:.2f} (goal <= 1.5) |")
    # The same ratios round by round (each against its own round's measurements), for the spread.
    print()
    for label, _ in builds:
        m = sorted(q / n for q, n in zip(mlp[label], numpy_mlp))
        c = sorted(q * p / cnn_flops() for q, p in zip(cnn[label], peaks))
        print(f"{label}, round by round: MLP {', '.join(f'{x:.2f}' for x in m)} (median {statistics.median(m):.2f}); "
              f"CNN {', '.join(f'{x:.2f}' for x in c)} (median {statistics.median(c):.2f})")


if __name__ == "__main__":
    main()
