#!/usr/bin/env python3
"""A network link with a round-trip delay, between two network namespaces, for machines
without `tc netem` (this kernel has no sch_netem).

Creates namespaces NS_A and NS_B, each with a TUN device (10.77.0.1 in NS_A, 10.77.0.2 in
NS_B, MTU 65000), and forwards every IP packet between them after RTT/2 — a link with a
round-trip time of RTT and no other limit, at the packet level, so TCP's own flow control
(and HTTP/2's on top) see the delay as they would on a real link. Runs until killed (SIGTERM
or SIGINT), then removes the namespaces.

Usage (root): experiments/delay_link.py RTT_MS [NS_A NS_B]
    then e.g.: ip netns exec qa ping -c 3 10.77.0.2
"""

import fcntl
import heapq
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def sh(*args):
    subprocess.run(args, check=True)


def tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    rtt = float(sys.argv[1]) / 1000.0
    ns_a, ns_b = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("qa", "qb")
    for ns in (ns_a, ns_b):
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        sh("ip", "netns", "add", ns)
    fds = {}
    for ns, dev, addr in ((ns_a, "qtun-a", "10.77.0.1"), (ns_b, "qtun-b", "10.77.0.2")):
        fds[dev] = tun(dev)
        # The open file keeps the device; it works on from the namespace it moves to.
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", dev, "mtu", "65000", "up")
        sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev)
    a, b = fds["qtun-a"], fds["qtun-b"]
    peer = {a: b, b: a}
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    print(f"delay link up: {ns_a} 10.77.0.1 <-> {ns_b} 10.77.0.2, round trip {rtt * 1000:g} ms", flush=True)
    due = []  # (time to deliver, sequence, fd to write to, packet)
    seq = 0
    half = rtt / 2
    try:
        while not stop:
            timeout = max(0.0, due[0][0] - time.monotonic()) if due else 0.5
            try:
                ready, _, _ = select.select([a, b], [], [], timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in ready:
                # Drain what is there now; each packet leaves after half the round trip.
                for _ in range(64):
                    try:
                        pkt = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if half <= 0:
                        os.write(peer[fd], pkt)
                    else:
                        heapq.heappush(due, (now + half, seq, peer[fd], pkt))
                        seq += 1
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, fd, pkt = heapq.heappop(due)
                try:
                    os.write(fd, pkt)
                except BlockingIOError:
                    pass  # the receiving device's queue is full: dropped, as a real link would
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
