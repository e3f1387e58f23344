"""End-to-end: the official Foxglove client (``@foxglove/ws-protocol``, run by Node) against the
real daemon (tests.daemon.start_daemon) with a bot-link robot on 127.0.0.1.

The client (tests/node/client.js) receives serverInfo and advertise, subscribes to the robot's
telemetry and gets messages that decode to what the robot sent; it then advertises
``/<id>/robot_move`` and publishes one, which the bot-link robot receives. Skipped only when
``node`` or the pinned npm packages (``npm ci`` in tests/node, done by .ci/run) are missing.
"""

from __future__ import annotations

import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.daemon import start_daemon
from tests.test_daemon_e2e import RawConn, checksum

NODE_DIR = Path(__file__).resolve().parent / "node"
DEADLINE = 30.0


class NodeClient:
    """``node client.js`` in a subprocess; :meth:`next_event` reads its JSON lines with a deadline."""

    def __init__(self, testcase: SynchronousTestCase, url: str, device_id: str) -> None:
        node = shutil.which("node")
        if node is None:
            raise SkipTest("node is not installed (Debian package nodejs; .ci/run installs it)")
        if not (NODE_DIR / "node_modules" / "@foxglove" / "ws-protocol" / "package.json").exists():
            raise SkipTest("@foxglove/ws-protocol is not installed: run `npm ci` in tests/node")
        self.proc = subprocess.Popen(
            [node, str(NODE_DIR / "client.js"), url, device_id, "2"],
            cwd=str(NODE_DIR),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        testcase.addCleanup(self.stop)
        self.deadline = time.monotonic() + DEADLINE
        self.buffer = b""
        self.events: list[dict[str, Any]] = []

    def next_event(self) -> dict[str, Any]:
        """The next line the script printed (AssertionError after the deadline or on exit)."""
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"node client timed out; events so far: {self.events}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(f"node client exited: {self.events}\n{err[-2000:]}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        event: dict[str, Any] = orjson.loads(line)
        self.events.append(event)
        return event

    def until(self, name: str) -> dict[str, Any]:
        """Read events until one called ``name``."""
        while True:
            event = self.next_event()
            if event["event"] == name:
                return event
            if event["event"] in ("timeout", "error"):
                raise AssertionError(f"node client failed: {self.events}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


class OfficialClientTests(SynchronousTestCase):
    """The reference client library speaks to robonet's Foxglove face."""

    def test_subscribe_and_publish(self) -> None:
        """serverInfo + advertise; telemetry decodes to what the robot sent; a robot_move reaches it."""
        if shutil.which("node") is None:
            raise SkipTest("node is not installed (Debian package nodejs; .ci/run installs it)")
        d = start_daemon(self, "--name", "fox-hub", faces=("botlink", "foxglove"), store=False)
        robot = RawConn(d.ports["botlink"])
        self.addCleanup(robot.close)
        robot.hello(role="robot", device_id="robot_01")
        sent = [{"type": "telemetry", "id": 1, "battery": 77.5, "cpu": 12.25, "temperature": 40}]
        payload = robot.send(sent[0])
        self.assertEqual(robot.recv(), {"type": "ack", "id": 1, "sum": checksum(payload)})

        client = NodeClient(self, f"ws://127.0.0.1:{d.ports['foxglove']}/", "robot_01")
        info = client.until("serverInfo")["info"]
        self.assertEqual(info["name"], "fox-hub")
        self.assertIn("clientPublish", info["capabilities"])
        self.assertEqual(info["supportedEncodings"], ["json"])
        channels = {c["topic"]: c for c in client.until("advertise")["channels"]}
        tele = channels["/robot_01/telemetry"]
        self.assertEqual((tele["encoding"], tele["schemaName"]), ("json", "robonet.telemetry"))
        sub = client.until("subscribed")
        first = client.until("message")  # the newest value, sent on subscribe
        sent.append({"type": "telemetry", "id": 2, "battery": 76.0, "cpu": 3.5, "temperature": 41})
        payload = robot.send(sent[1])
        self.assertEqual(robot.recv(), {"type": "ack", "id": 2, "sum": checksum(payload)})
        second = client.until("message")
        for msg, want in ((first, sent[0]), (second, sent[1])):
            self.assertEqual(msg["subscriptionId"], sub["subscriptionId"])
            self.assertEqual({k: msg["data"].get(k) for k in want}, want)
            self.assertGreater(int(msg["timestamp"]), 1_600_000_000 * 10**9)  # receive time in ns
        client.until("published")
        cmd = robot.recv_type("robot_move")
        self.assertEqual((cmd["x"], cmd["y"]), (0.5, -0.25))
        robot.send({"type": "ack", "id": cmd["id"], "sum": 0})
        client.until("done")
        statuses = [e for e in client.events if e["event"] == "status"]
        self.assertEqual(statuses, [])
        self.assertTrue(d.alive())
