"""Wall-clock and RSS thresholds of HARDENING.md's "bot link" and "all TCP" rows, against the real daemon.

These used to be asserts inside tests/test_badinput_e2e.py; timing and memory figures depend on the
machine's load, so they are measured here and the tests check only behaviour (refused, closed,
counted, still serving). Each check prints its figure, its bound and PASS/FAIL; the exit status is
the number of failed checks.

    python benchmarks/badinput.py            # all checks
    python benchmarks/badinput.py --idle 1000

Checks (bounds from HARDENING.md):

- ``declared_50mb_rss``: RSS growth after a 50 MB length prefix plus 64 KiB of payload (< 20 MB);
- ``deep_nesting_s``: seconds until a 100,000-deep ``[`` frame gets ``bad_json`` (< 2 s);
- ``idle_served_s``: seconds to serve a good robot (hello + acked telemetry) while ``--idle``
  sockets (default 1,000) sit without hello (< 2 s);
- ``burst_s``: seconds for 2,500 connect/close cycles paced at 500/s (< 15 s, i.e. never stalled).
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from robonet.protocols.botlink import encode_frame  # noqa: E402
from tests.daemon import start_daemon  # noqa: E402
from tests.test_daemon_e2e import RawConn, checksum  # noqa: E402


class Scope:
    """The two methods start_daemon needs from a test case."""

    def __init__(self) -> None:
        import tempfile

        self._dir = Path(tempfile.mkdtemp(prefix="robonet-bench-badinput-"))
        self.cleanups: list[Any] = []

    def mktemp(self) -> str:
        return str(self._dir / f"d{len(self.cleanups)}")

    def addCleanup(self, fn: Any, *args: Any) -> None:
        self.cleanups.append((fn, args))

    def close(self) -> None:
        import shutil

        while self.cleanups:
            fn, args = self.cleanups.pop()
            fn(*args)
        shutil.rmtree(self._dir, ignore_errors=True)


def serve_good(port: int) -> None:
    conn = RawConn(port)
    try:
        conn.hello(role="robot", device_id="bench-robot")
        payload = conn.send({"type": "telemetry", "id": 1, "battery": 77.5})
        reply = conn.recv()
        assert reply == {"type": "ack", "id": 1, "sum": checksum(payload)}, reply
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle", type=int, default=1000, help="idle sockets for idle_served_s")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 2 * args.idle + 600)
    if hard != resource.RLIM_INFINITY:
        want = min(hard, want)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    results: list[tuple[str, float, float]] = []
    scope = Scope()
    try:
        d = start_daemon(scope, faces=("botlink",), store=True)
        port = d.ports["botlink"]
        proc = psutil.Process(d.pid)
        serve_good(port)

        before = proc.memory_info().rss
        c = RawConn(port)
        c.hello(role="robot")
        c.send_raw(struct.pack(">I", 50 * 2**20) + b"x" * 65536)
        c.at_eof()
        c.close()
        results.append(("declared_50mb_rss_mb", (proc.memory_info().rss - before) / 2**20, 20.0))

        c = RawConn(port)
        c.hello(role="robot")
        started = time.monotonic()
        c.send_raw(encode_frame(b"[" * 100_000))
        assert c.recv()["code"] == "bad_json"
        results.append(("deep_nesting_s", time.monotonic() - started, 2.0))
        c.close()

        d2 = start_daemon(
            scope,
            faces=("botlink",),
            store=False,
            env={"ROBONET_BOTLINK_MAX_PER_IP": str(args.idle + 100), "ROBONET_BOTLINK_HELLO_TIMEOUT": "30"},
        )
        control = RawConn(d2.ports["botlink"])
        control.hello(role="client", device_id="control")
        idle = []
        for i in range(args.idle):
            idle.append(RawConn(d2.ports["botlink"]))
            if i % 40 == 39:  # let the daemon drain its accept queue (listen backlog 50)
                control.send({"type": "ping", "id": i})
                control.recv_type("ack")
        started = time.monotonic()
        serve_good(d2.ports["botlink"])
        results.append(("idle_served_s", time.monotonic() - started, 2.0))
        for conn in idle:
            conn.close()
        control.close()

        start = time.monotonic()
        for i in range(2500):
            pause = start + i / 500.0 - time.monotonic()
            if pause > 0:
                select.select([], [], [], pause)
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        results.append(("burst_s", time.monotonic() - start, 15.0))
        serve_good(port)
    finally:
        scope.close()
    failed = 0
    for name, value, bound in results:
        ok = value < bound
        failed += not ok
        print(f"{name:24} {value:10.3f}  (< {bound:g})  {'PASS' if ok else 'FAIL'}")
    print(f"load average {' '.join(f'{x:.2f}' for x in psutil.getloadavg())}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
