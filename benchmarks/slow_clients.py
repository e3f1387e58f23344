"""Slow and hostile dashboards against the real daemon: HARDENING.md's web-row thresholds.

Moved here from tests/test_slow_client.py (the tests keep the behaviour: bounded, closed, counted).
Uses that module's load generator and raw-socket helpers. Prints each figure with its bound and
PASS/FAIL; the exit status is the number of failed checks. Run it on a quiet machine.

    python benchmarks/slow_clients.py [--duration 20]

- ``rss_growth_mb``: daemon RSS peak minus baseline while a robot sends 1,000 msgs/s of ~1 KB for
  ``--duration`` s to 2 reading and 5 non-reading dashboards (< 20 MB);
- ``fast_fraction``: the worse fast reader's share of the messages sent (>= 0.95);
- ``latency_p50_ms``: robot send to fast-reader receipt, median (< 50 ms);
- ``ping_rss_mb``: RSS growth while one dashboard floods pings and never reads the pongs (< 5 MB);
- ``healthz_s``: a real client's /healthz while 300 sockets dribble HTTP headers (< 2 s);
- ``dribblers_cut_s``: until all 300 are cut with ``web.header_timeout = 2`` (< 6 s).
"""

from __future__ import annotations

import argparse
import asyncio
import select
import socket
import sys
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.badinput import Scope  # noqa: E402
from tests.daemon import start_daemon  # noqa: E402
from tests.test_slow_client import SLOW_ENV, SLOW_TIMEOUT, run_load, select_wait, ws_handshake  # noqa: E402


def pings(port: int, pid: int) -> float:
    """RSS growth in MB while a non-reading dashboard floods pings until the server stops reading."""
    proc = psutil.Process(pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    ws_handshake(sock, port)
    baseline = proc.memory_info().rss
    mask = b"\x01\x02\x03\x04"
    ping = bytes((0x89, 0x84)) + mask + bytes(c ^ mask[i] for i, c in enumerate(b"ping"))
    sock.setblocking(False)
    sent, blocked_since = 0, None
    while sent < 2_000_000:
        try:
            n = sock.send(ping * 1000)
        except BlockingIOError:
            n = 0
        sent += n // len(ping)
        if n:
            blocked_since = None
            continue
        now = time.monotonic()
        blocked_since = blocked_since or now
        if now - blocked_since > 3:
            break
        select_wait(sock)
    growth = (proc.memory_info().rss - baseline) / 2**20
    sock.close()
    return growth


def dribblers(port: int) -> tuple[float, float]:
    """(seconds for a real /healthz, seconds until all 300 dribbling sockets are cut)."""
    socks = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
        pass
    healthz = time.monotonic() - started
    open_socks = set(socks)
    while open_socks and time.monotonic() - started < 30:
        readable, _, _ = select.select(list(open_socks), [], [], 0.5)
        for s in readable:
            open_socks.discard(s)
        for s in open_socks:
            try:
                s.send(b"a")
            except OSError:
                pass
    cut = time.monotonic() - started
    for s in socks:
        s.close()
    return healthz, cut


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args()
    scope = Scope()
    checks: list[tuple[str, float, str, float]] = []
    try:
        d = start_daemon(scope, env=SLOW_ENV)
        r = asyncio.run(run_load(d.ports["web"], d.pid, args.duration))
        print(f"load run: {r}")
        checks.append(("rss_growth_mb", r["rss_growth"] / 2**20, "<", 20.0))
        checks.append(("fast_fraction", min(r["fast_received"]) / max(1, r["sent"]), ">=", 0.95))
        checks.append(("latency_p50_ms", r["latency_p50_ms"] or 0.0, "<", 50.0))
        d2 = start_daemon(scope, env={"ROBONET_WEB_SLOW_TIMEOUT": str(SLOW_TIMEOUT)})
        checks.append(("ping_rss_mb", pings(d2.ports["web"], d2.pid), "<", 5.0))
        d3 = start_daemon(scope, env={"ROBONET_WEB_HEADER_TIMEOUT": "2"})
        healthz, cut = dribblers(d3.ports["web"])
        checks.append(("healthz_s", healthz, "<", 2.0))
        checks.append(("dribblers_cut_s", cut, "<", 6.0))
    finally:
        scope.close()
    failed = 0
    for name, value, op, bound in checks:
        ok = value < bound if op == "<" else value >= bound
        failed += not ok
        print(f"{name:18} {value:10.3f}  ({op} {bound:g})  {'PASS' if ok else 'FAIL'}")
    print(f"load average {' '.join(f'{x:.2f}' for x in psutil.getloadavg())} (machine may be shared)")
    return failed


if __name__ == "__main__":
    sys.exit(main())
