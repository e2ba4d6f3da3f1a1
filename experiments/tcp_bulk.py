#!/usr/bin/env python3
"""Raw TCP bulk throughput, the yardstick for experiments/windows.sh.

Usage: tcp_bulk.py recv PORT             (prints what it received, MB/s)
       tcp_bulk.py send HOST PORT BYTES
"""
import socket, sys, time
if sys.argv[1] == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(1)
    c, _ = s.accept(); n = 0; t0 = None
    while True:
        d = c.recv(1 << 20)
        if not d: break
        if t0 is None: t0 = time.monotonic()
        n += len(d)
    dt = time.monotonic() - t0
    print(f"received {n/1e6:.0f} MB in {dt:.2f} s: {n/dt/1e6:.0f} MB/s")
else:
    host, port, total = sys.argv[2], int(sys.argv[3]), int(float(sys.argv[4]))
    t = time.monotonic(); c = socket.create_connection((host, port)); print(f"connect {1000*(time.monotonic()-t):.2f} ms")
    buf = b"x" * (1 << 20); sent = 0
    while sent < total:
        c.sendall(buf); sent += len(buf)
    c.close()
