"""kill -9 of the real daemon loses no acknowledged telemetry (HARDENING.md, store row).

A robot sends telemetry with ids at ~500 msgs/s over the bot link and records every id the daemon
acked; the daemon is SIGKILLed mid-stream; every acked id must be in the database: the SQLite file,
and (second class) a real PostgreSQL started by tests/pg.py (skipped only without its binaries).
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
from tests import pg
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
    dsn = ""

    def env(self) -> dict[str, str]:
        return {}

    def stored_ids(self, daemon: object) -> set[int]:
        db = sqlite3.connect(str(daemon.state_dir / "telemetry.sqlite3"))  # type: ignore[attr-defined]
        self.addCleanup(db.close)
        return {
            int(orjson.loads(body)["id"])
            for (body,) in db.execute("SELECT body FROM telemetry WHERE device_id = 'crash_bot'")
        }

    def test_kill_9_loses_no_acked_row(self) -> None:
        """Every telemetry id acked before SIGKILL is in the store's database after it."""
        daemon = start_daemon(self, faces=("botlink",), store=True, env=self.env())
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
        stored = self.stored_ids(daemon)
        self.assertEqual(acked - stored, set(), "acknowledged rows lost by kill -9")


class PostgresKillNineTests(KillNineTests):
    """The same against ``store.backend = "postgresql"``."""

    skip = pg.SKIP_REASON

    def env(self) -> dict[str, str]:
        self.dsn = pg.shared_server().fresh_database()
        return {"ROBONET_STORE_BACKEND": "postgresql", "ROBONET_STORE_DSN": self.dsn}

    def stored_ids(self, daemon: object) -> set[int]:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute("SELECT (body::json->>'id')::int FROM telemetry WHERE device_id = 'crash_bot'")
            return {int(r[0]) for r in rows}
