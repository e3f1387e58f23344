"""kill -9 of the real daemon loses no acknowledged telemetry (HARDENING.md, store row).

A robot sends telemetry with ids at ~500 msgs/s over the bot link and records every id the daemon
acked; the daemon is SIGKILLed mid-stream; every acked id must be in the SQLite database.
"""

from __future__ import annotations

import select
import socket
import sqlite3
import struct
import time

import orjson
from twisted.trial.unittest import SynchronousTestCase

from robonet.protocols.botlink import encode_obj
from tests.daemon import start_daemon

RATE = 500  # msgs/s
MIN_ACKED = 1000
DEADLINE = 20.0  # s


def _frames(buf: bytearray) -> list[dict[str, object]]:
    out = []
    while len(buf) >= 4:
        (n,) = struct.unpack_from(">I", buf, 0)
        if len(buf) < 4 + n:
            break
        out.append(orjson.loads(bytes(buf[4 : 4 + n])))
        del buf[: 4 + n]
    return out


class KillNineTests(SynchronousTestCase):
    def test_kill_9_loses_no_acked_row(self) -> None:
        """Every telemetry id acked before SIGKILL is in telemetry.sqlite3 after it."""
        daemon = start_daemon(self, faces=("botlink",), store=True)
        sock = socket.create_connection(("127.0.0.1", daemon.ports["botlink"]), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(encode_obj({"type": "hello", "proto": 1, "role": "robot", "device_id": "crash_bot"}))
        buf = bytearray()
        acked: set[int] = set()
        next_id = 1
        start = time.monotonic()
        while len(acked) < MIN_ACKED and time.monotonic() - start < DEADLINE:
            due = int((time.monotonic() - start) * RATE) + 1
            while next_id <= due:
                sock.sendall(
                    encode_obj({"type": "telemetry", "id": next_id, "battery": 50.0, "seq": next_id})
                )
                next_id += 1
            readable, _, _ = select.select([sock], [], [], 0.002)
            if readable:
                data = sock.recv(65536)
                self.assertTrue(data, "daemon closed the connection")
                buf += data
                for frame in _frames(buf):
                    if frame.get("type") == "ack":
                        acked.add(int(frame["id"]))  # type: ignore[call-overload]
        self.assertGreaterEqual(len(acked), MIN_ACKED, "not enough acks before the deadline")
        daemon.kill9()
        self.assertGreater(next_id - 1, len(acked) - 1)
        db = sqlite3.connect(str(daemon.state_dir / "telemetry.sqlite3"))
        self.addCleanup(db.close)
        stored = {
            int(orjson.loads(body)["id"])
            for (body,) in db.execute("SELECT body FROM telemetry WHERE device_id = 'crash_bot'")
        }
        self.assertEqual(acked - stored, set(), "acknowledged rows lost by kill -9")
