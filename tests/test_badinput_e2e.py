"""Bad input against one real daemon's bot link (HARDENING.md "bot link" and "all TCP" rows).

Each case is followed by a well-behaved robot that must still be served (hello, telemetry acked),
and the daemon must still be alive with no traceback in its log. The 1,000-idle-connections case
runs its own daemon with ``max_per_ip`` raised (they all come from 127.0.0.1).

The wall-clock and RSS thresholds (memory flat under a 50 MB declared frame, deep nesting rejected
within 2 s, a real client served within 2 s of 1,000 idle sockets) are measured by
``benchmarks/badinput.py``; these tests check the behaviour: refused, closed, counted, still serving.
"""

from __future__ import annotations

import atexit
import resource
import select
import selectors
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psutil
from twisted.trial.unittest import SynchronousTestCase

from robonet.protocols.botlink import encode_frame
from tests.daemon import Daemon, start_daemon
from tests.test_daemon_e2e import RawConn, checksum, served

WAIT_CAP = 5.0


class _ClassScope:
    """What start_daemon needs from a test case, for a daemon shared by a whole class."""

    def __init__(self) -> None:
        self.cleanups: list[Callable[[], Any]] = []

    def mktemp(self) -> str:
        path = tempfile.mkdtemp(prefix="robonet-badinput-")
        self.cleanups.append(lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def addCleanup(self, fn: Callable[..., Any], *args: Any) -> None:
        self.cleanups.append(lambda: fn(*args))

    def run_cleanups(self) -> None:
        while self.cleanups:
            self.cleanups.pop()()


_shared: dict[str, Daemon] = {}


def shared_daemon() -> Daemon:
    """The one daemon every ``BadInputTests`` case talks to, started by the first case that runs.

    trial has no ``setUpClass``; the daemon is stopped (and its state removed) when the test process
    exits, under pytest and trial alike.
    """
    if "daemon" not in _shared:
        scope = _ClassScope()
        atexit.register(scope.run_cleanups)
        _shared["daemon"] = start_daemon(scope, faces=("botlink",), store=True)
    return _shared["daemon"]


class BadInputTests(SynchronousTestCase):
    """One daemon takes every kind of bad bot-link input and keeps serving."""

    daemon: Daemon

    def setUp(self) -> None:
        self.daemon = shared_daemon()
        self.port = self.daemon.ports["botlink"]
        self.assertTrue(self.daemon.alive(), self.daemon.log()[-2000:])

    def tearDown(self) -> None:
        served(self, self.daemon)
        self.assertNotIn("Traceback", self.daemon.log())
        self.assertNotIn("Unhandled", self.daemon.log())

    def conn(self, hello: bool = False, **kw: Any) -> RawConn:
        c = RawConn(self.port, **kw)
        self.addCleanup(c.close)
        if hello:
            c.hello(role="robot")
        return c

    def assertClosedWith(self, c: RawConn, code: str) -> None:
        frames = c.at_eof()
        self.assertEqual([(f["type"], f["code"]) for f in frames], [("error", code)])

    def test_length_zero(self) -> None:
        """Length prefix 0: bad_frame and close (before and after hello)."""
        for hello in (False, True):
            c = self.conn(hello)
            c.send_raw(b"\x00\x00\x00\x00" + b"junk")
            self.assertClosedWith(c, "bad_frame")

    def test_length_2_31(self) -> None:
        """Length prefix 2**31: frame_too_large and close at once (nothing of it is read)."""
        for hello in (False, True):
            c = self.conn(hello)
            c.send_raw(struct.pack(">I", 2**31))
            self.assertClosedWith(c, "frame_too_large")

    def test_50_mb_declared(self) -> None:
        """A 50 MB declared length is refused on the prefix, before the payload is read."""
        c = self.conn(True)
        c.send_raw(struct.pack(">I", 50 * 2**20) + b"x" * 65536)
        self.assertClosedWith(c, "frame_too_large")

    def test_http_garbage(self) -> None:
        """An HTTP request on the bot link (a huge 'length') is refused and closed."""
        c = self.conn()
        c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertClosedWith(c, "frame_too_large")

    def test_truncated_then_close(self) -> None:
        """A frame cut short and then closed is discarded: nothing is ingested or acked."""
        c = self.conn()
        c.hello(role="robot", device_id="truncated-robot")
        c.send_raw(encode_frame(b'{"type":"telemetry","id":1,"battery":1}')[:20])
        c.close()
        c2 = self.conn()
        c2.hello(role="client")
        devices = c2.request("devices")["data"]["devices"]
        dev = next(x for x in devices if x["device_id"] == "truncated-robot")
        self.assertEqual(dev["latest"], {})

    def test_invalid_utf8(self) -> None:
        """Invalid UTF-8 gets bad_json, never an ack; the connection stays usable."""
        c = self.conn(True)
        c.send_raw(encode_frame(b'{"type":"telemetry","id":5,"x":"\xff\xfe"}'))
        err = c.recv()
        self.assertEqual((err["type"], err["code"]), ("error", "bad_json"))
        payload = c.send({"type": "ping", "id": 6})
        self.assertEqual(c.recv(), {"type": "ack", "id": 6, "sum": checksum(payload)})

    def test_non_objects(self) -> None:
        """[] 1 "x" null each get not_object, never an ack; the connection stays usable."""
        c = self.conn(True)
        for payload in (b"[]", b"1", b'"x"', b"null"):
            c.send_raw(encode_frame(payload))
            err = c.recv()
            self.assertEqual((err["type"], err["code"]), ("error", "not_object"), payload)
        c.send({"type": "ping", "id": 1})
        self.assertEqual(c.recv()["type"], "ack")

    def test_missing_type(self) -> None:
        """A frame without type gets missing_type with its ref."""
        c = self.conn(True)
        c.send({"id": 3, "battery": 1})
        err = c.recv()
        self.assertEqual((err["code"], err["ref"]), ("missing_type", 3))

    def test_deep_nesting(self) -> None:
        """100,000-deep nesting is rejected quickly (bad_json); the connection stays usable."""
        c = self.conn(True)
        c.send_raw(encode_frame(b"[" * 100_000))
        self.assertEqual(c.recv()["code"], "bad_json")
        c.send({"type": "ping", "id": 1})
        self.assertEqual(c.recv()["type"], "ack")

    def test_deep_nesting_before_hello(self) -> None:
        """Before hello the same 100 KB frame is over the 64 KiB hello cap: frame_too_large, close."""
        c = self.conn()
        c.send_raw(encode_frame(b"[" * 100_000))
        self.assertClosedWith(c, "frame_too_large")

    def test_unknown_endpoint(self) -> None:
        """An unknown endpoint gets an error response with code unknown_endpoint."""
        c = self.conn(True)
        reply = c.request("no_such_endpoint")
        self.assertEqual((reply["status"], reply["code"]), ("error", "unknown_endpoint"))

    def test_per_ip_cap(self) -> None:
        """With the default cap (64) the 65th connection from one IP gets rate_limited; others still work."""
        held = []
        for i in range(64):
            held.append(self.conn(source="127.0.0.5"))
            held[-1].hello(role="client", device_id=f"cap-{i}")
        extra = self.conn(source="127.0.0.5")
        self.assertClosedWith(extra, "rate_limited")
        served(self, self.daemon, device_id="other-ip")
        held[0].close()
        # once the hub has seen that close, a slot is free again
        deadline = time.monotonic() + WAIT_CAP
        while True:
            again = self.conn(source="127.0.0.5")
            again.send({"type": "hello", "proto": 1, "role": "client"})
            reply = again.recv()
            if reply["type"] == "welcome" or time.monotonic() > deadline:
                break
        self.assertEqual(reply["type"], "welcome")


class IdleFloodTests(SynchronousTestCase):
    """1,000 idle connections: a real client is still served; the hello deadline sheds them all."""

    def test_thousand_idle(self) -> None:
        """1,000 sockets that never say hello do not stop a good robot; all are closed at hello_timeout."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 2600
        if soft < need:
            if hard != resource.RLIM_INFINITY and hard < need:
                self.skipTest(f"RLIMIT_NOFILE hard limit {hard} < {need}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        d = start_daemon(
            self,
            faces=("botlink",),
            store=False,
            env={"ROBONET_BOTLINK_MAX_PER_IP": "2000", "ROBONET_BOTLINK_HELLO_TIMEOUT": "3"},
        )
        control = RawConn(d.ports["botlink"])
        self.addCleanup(control.close)
        control.hello(role="client", device_id="control")
        idle = []
        for i in range(1000):
            c = RawConn(d.ports["botlink"])
            self.addCleanup(c.close)
            idle.append(c)
            if i % 40 == 39:
                # a round trip lets the daemon accept the queued connections: Twisted's default
                # listen backlog is 50, and a full accept queue costs a 1 s SYN retransmit
                control.send({"type": "ping", "id": i})
                control.recv_type("ack")
        served(self, d)
        # every idle socket gets the hello-deadline error and EOF
        sel = selectors.DefaultSelector()
        self.addCleanup(sel.close)
        for c in idle:
            sel.register(c.sock, selectors.EVENT_READ, c)
        remaining = len(idle)
        deadline = time.monotonic() + 15
        while remaining and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                if key.data.sock.recv(65536) == b"":
                    sel.unregister(key.fileobj)
                    remaining -= 1
        self.assertEqual(remaining, 0)
        stats = control.request("stats")["data"]
        self.assertEqual(stats["connections"]["botlink"], 1)
        self.assertGreaterEqual(stats["errors"]["bad_hello"], 1000)
        self.assertTrue(d.alive())


class ConnectBurstTests(SynchronousTestCase):
    """HARDENING.md "all TCP": 500 connects/s for 5 s."""

    def test_connect_burst_fds_return_to_baseline(self) -> None:
        """2,500 connect-and-close cycles at ~500/s: the daemon keeps serving and its open file
        descriptors are back to the baseline within 5 s."""
        d = start_daemon(self, faces=("botlink",), store=False)
        proc = psutil.Process(d.pid)
        served(self, d, "before-burst")
        baseline = proc.num_fds()
        start = time.monotonic()
        for i in range(2500):
            due = start + i / 500.0
            pause = due - time.monotonic()
            if pause > 0:
                select.select([], [], [], pause)
            with socket.create_connection(("127.0.0.1", d.ports["botlink"]), timeout=5):
                pass
        served(self, d, "after-burst")
        deadline = time.monotonic() + 5.0
        while proc.num_fds() > baseline and time.monotonic() < deadline:
            select.select([], [], [], 0.1)
        self.assertLessEqual(proc.num_fds(), baseline)
        self.assertTrue(d.alive())
