"""End-to-end: the real ``twistd -n robonet`` (tests.daemon.start_daemon) driven over 127.0.0.1.

Raw sockets speak the bot link byte for byte (native robonet/1 and legacy Cartobot); one test uses
the blocking ``robonet.client.BotClient``. Every socket has a timeout; the daemon is stopped by PID.
:class:`RawConn` is shared with tests.test_badinput_e2e.
"""

from __future__ import annotations

import signal
import socket
import struct
from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase

from robonet.client import BotClient
from robonet.protocols.botlink import FrameDecoder, encode_frame
from tests.daemon import Daemon, start_daemon

WAIT = 5.0


def checksum(payload: bytes) -> int:
    return sum(payload) % 2**32


class RawConn:
    """A blocking bot-link connection with bounded waits."""

    def __init__(self, port: int, source: str | None = None, timeout: float = WAIT) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.decoder = FrameDecoder(2**32 - 1)
        self.frames: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj: Any) -> bytes:
        payload = orjson.dumps(obj)
        self.sock.sendall(encode_frame(payload))
        return payload

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` raw bytes (legacy ACKs), not through the frame decoder."""
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def recv(self) -> dict[str, Any]:
        """The next frame, decoded (ConnectionError if the hub closes first)."""
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the hub")
            self.frames.extend(self.decoder.feed(data))
        obj: dict[str, Any] = orjson.loads(self.frames.pop(0))
        return obj

    def recv_type(self, mtype: str) -> dict[str, Any]:
        """The next frame of type ``mtype`` (others skipped)."""
        while True:
            frame = self.recv()
            if frame.get("type") == mtype:
                return frame

    def at_eof(self) -> list[dict[str, Any]]:
        """Read until the hub closes; return the frames that came first."""
        out = []
        while True:
            try:
                out.append(self.recv())
            except ConnectionError:
                return out

    def hello(self, **fields: Any) -> dict[str, Any]:
        self.send({"type": "hello", "proto": 1, **fields})
        welcome = self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    def request(self, endpoint: str, data: Any = None, rid: int = 1000) -> dict[str, Any]:
        self.send({"type": "request", "id": rid, "endpoint": endpoint, "data": data})
        reply = self.recv_type("response")
        assert reply["id"] == rid, reply
        return reply

    def close(self) -> None:
        self.sock.close()


def served(testcase: SynchronousTestCase, daemon: Daemon, device_id: str = "good-robot") -> None:
    """A well-behaved robot is still served: hello, telemetry acked with the right sum."""
    conn = RawConn(daemon.ports["botlink"])
    try:
        conn.hello(role="robot", device_id=device_id)
        payload = conn.send({"type": "telemetry", "id": 1, "battery": 77.5})
        testcase.assertEqual(conn.recv(), {"type": "ack", "id": 1, "sum": checksum(payload)})
    finally:
        conn.close()
    testcase.assertTrue(daemon.alive())


class DaemonTests(SynchronousTestCase):
    """The installed plugin, config, hub and bot link working together."""

    def test_native_exchange(self) -> None:
        """Telemetry is acked (after the store's commit); a client's command reaches the robot and the
        robot's ack returns; devices and stats show what is connected; SIGTERM stops the daemon cleanly."""
        d = start_daemon(self, faces=("botlink",), store=True)
        port = d.ports["botlink"]
        robot = RawConn(port)
        self.addCleanup(robot.close)
        welcome = robot.hello(role="robot", device_id="robot_01", name="Robot 1")
        self.assertEqual(welcome["device_id"], "robot_01")
        for i in range(1, 4):
            payload = robot.send({"type": "telemetry", "id": i, "battery": 80 + i, "cpu": 1.5})
            self.assertEqual(robot.recv(), {"type": "ack", "id": i, "sum": checksum(payload)})

        client = RawConn(port)
        self.addCleanup(client.close)
        client.hello(role="client", device_id="script")
        cmd_payload = client.send(
            {"type": "robot_move", "id": 41, "device_id": "robot_01", "x": 0.5, "y": -0.25}
        )
        cmd = robot.recv()
        self.assertEqual((cmd["type"], cmd["x"], cmd["y"]), ("robot_move", 0.5, -0.25))
        robot.send({"type": "ack", "id": cmd["id"], "sum": 0})
        self.assertEqual(client.recv(), {"type": "ack", "id": 41, "sum": checksum(cmd_payload)})

        devices = client.request("devices")["data"]
        by_id = {dev["device_id"]: dev for dev in devices["devices"]}
        self.assertEqual(by_id["robot_01"]["status"], "online")
        self.assertEqual(by_id["robot_01"]["name"], "Robot 1")
        self.assertEqual(by_id["robot_01"]["latest"]["telemetry"]["battery"], 83)
        self.assertEqual(by_id["script"]["role"], "client")
        stats = client.request("stats")["data"]
        self.assertEqual(stats["messages_in"]["telemetry"], 3)
        self.assertEqual(stats["messages_out"]["robot_move"], 1)
        self.assertEqual(stats["devices"]["by_role"], {"robot": 1, "client": 1})
        self.assertEqual(stats["connections"]["botlink"], 2)
        self.assertEqual(stats["store"]["rows_written"], 3)  # acked rows are committed rows

        robot.close()
        client.close()
        self.assertIn(d.stop(), (0, -signal.SIGTERM))  # twistd re-raises the signal that stopped it
        log = d.log()
        self.assertIn("Server Shut Down", log)
        self.assertNotIn("Traceback", log)

    def test_legacy_exchange(self) -> None:
        """A Cartobot bot: one connection per message with the 8-byte ACK; REQUEST_INSTRUCTION pulls a
        queued instruction; a poll with nothing queued is closed without reply after legacy_poll_wait."""
        d = start_daemon(
            self, faces=("botlink",), store=False, env={"ROBONET_BOTLINK_LEGACY_POLL_WAIT": "0.5"}
        )
        port = d.ports["botlink"]
        for payload in (
            b'{"type": "system_status", "message": "hi"}',
            orjson.dumps(
                {
                    "type": "sensor_data",
                    "timestamp": 1234,
                    "sensor_type": "ultrasonic_scanner",
                    "data_points": [{"angle": 0, "distance_cm": 45.2}],
                    "data_count": 1,
                }
            ),
        ):
            bot = RawConn(port)
            bot.send_raw(struct.pack(">I", len(payload)) + payload)
            self.assertEqual(bot.recv_exact(8), struct.pack(">I", checksum(payload)) + b"ACK\x00")
            bot.close()

        client = RawConn(port)
        self.addCleanup(client.close)
        client.hello(role="client", device_id="dash")
        dev = next(
            x for x in client.request("devices")["data"]["devices"] if x["device_id"] == "bot-127.0.0.1"
        )
        self.assertEqual((dev["status"], dev["dialect"]), ("online", "cartobot"))
        self.assertEqual(dev["latest"]["sensor_data"]["data_points"][0]["distance_cm"], 45.2)
        move = {"type": "movement_instruction", "distance_cm": 25, "angle_degrees": 90}
        client.send({**move, "id": 7, "device_id": "bot-127.0.0.1"})
        self.assertEqual(client.recv()["type"], "ack")

        poll = RawConn(port)
        poll.send_raw(b"REQUEST_INSTRUCTION")
        self.assertEqual(poll.at_eof(), [move])
        poll.close()
        empty = RawConn(port)
        empty.send_raw(b"REQUEST_")
        empty.send_raw(b"INSTRUCTION")
        self.assertEqual(empty.sock.recv(100), b"")
        empty.close()
        self.assertTrue(d.alive())

    def test_botclient(self) -> None:
        """The blocking BotClient library against the real daemon: telemetry acked, command round trip,
        request, and the legacy mode (8-byte ACK checked by the client, instruction pull)."""
        d = start_daemon(self, faces=("botlink",), store=False, env={"ROBONET_BOTLINK_LEGACY_POLL_WAIT": "1"})
        port = d.ports["botlink"]
        got: list[dict[str, Any]] = []
        robot = BotClient("127.0.0.1", port, device_id="robot_07", role="robot", timeout=WAIT)
        self.addCleanup(robot.close)
        robot.on_command(got.append)
        robot.connect()
        ack = robot.send({"type": "telemetry", "battery": 50.0}, ack=True)
        assert ack is not None
        self.assertEqual(ack["type"], "ack")
        client = BotClient("127.0.0.1", port, role="client", timeout=WAIT)
        self.addCleanup(client.close)
        client.connect()
        self.assertEqual(client.command("camera_move", "robot_07", pan=5)["type"], "ack")
        self.assertEqual([(c["type"], c["pan"]) for c in got], [("camera_move", 5)])
        self.assertEqual(client.request("echo", {"a": 1}), {"a": 1})

        bot = BotClient("127.0.0.1", port, legacy=True, timeout=WAIT)
        bot.send({"type": "system_status", "message": "boot"})
        client.command("trial_response", "bot-127.0.0.1", message="START")
        self.assertEqual(bot.poll_instruction(wait=WAIT), {"type": "trial_response", "message": "START"})
        self.assertIsNone(bot.poll_instruction(wait=WAIT))
        self.assertTrue(d.alive())
