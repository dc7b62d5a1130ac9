#!/usr/bin/env python3
"""A WAN path at the packet level, for UDP and TCP alike: joins two interfaces at layer 2 and
delays every frame by a fixed one-way delay, dropping a random fraction in each direction.

    ns a ── veth ──► [IF_A  this program  IF_B] ── veth ──► ns b
                      read (AF_PACKET) → drop with probability LOSS → hold DELAY → write

Run it in a middle network namespace that owns IF_A and IF_B (no IP addresses there). The
kernel has no netem here; this does in userspace what netem's `delay` and `loss random` do, so
that TCP (ssh -L) and QUIC (pgferry) see the same path and react to it with their own
congestion control. A TCP-terminating relay would hide exactly that. Rate limits come from
`tc tbf` on the interfaces (the emulator's writes go through their qdiscs). Turn GRO, GSO and
TSO off on all four veth ends first, so that frames are real packets of at most the MTU.

Stops by itself after --max-seconds. Prints one line of counters when it ends (SIGTERM too).
"""
import argparse
import collections
import random
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def open_if(name):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
    s.bind((name, 0))
    s.setblocking(False)
    return s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("if_a")
    p.add_argument("if_b")
    p.add_argument("--delay-ms", type=float, default=15.0, help="one-way delay (RTT/2)")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability per frame, percent")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=7200.0)
    a = p.parse_args()

    rng = random.Random(a.seed)
    delay = a.delay_ms / 1000.0
    loss = a.loss / 100.0
    sa, sb = open_if(a.if_a), open_if(a.if_b)
    out = {sa: sb, sb: sa}
    # One FIFO per direction: a fixed delay keeps frames in order, as a real path mostly does.
    queues = {sa: collections.deque(), sb: collections.deque()}
    stats = {"forwarded": 0, "dropped": 0, "send_errors": 0}
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    deadline = time.monotonic() + a.max_seconds
    print("wan-emulator: %s <-> %s, one-way delay %.1f ms, loss %.3f%% each way" % (
        a.if_a, a.if_b, a.delay_ms, a.loss), flush=True)
    while not stop["now"] and time.monotonic() < deadline:
        now = time.monotonic()
        heads = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(heads) - now) if heads else 0.2
        readable, _, _ = select.select([sa, sb], [], [], min(timeout, 0.2))
        now = time.monotonic()
        for s in readable:
            while True:
                try:
                    frame, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue  # our own writes, seen again on the way out
                if loss and rng.random() < loss:
                    stats["dropped"] += 1
                    continue
                queues[s].append((now + delay, frame))
        for s, q in queues.items():
            while q and q[0][0] <= now:
                _, frame = q.popleft()
                try:
                    out[s].send(frame)
                    stats["forwarded"] += 1
                except OSError:
                    # The rate limiter's queue is full: the bottleneck drops, as a router does.
                    stats["send_errors"] += 1
    print("wan-emulator: forwarded %(forwarded)d, dropped %(dropped)d (random loss), "
          "%(send_errors)d not accepted by the link" % stats, flush=True)


if __name__ == "__main__":
    sys.exit(main())
