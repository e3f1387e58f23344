"""LabAuto (seed 001) and witch-core (seed 002) scripts against a real line link on 127.0.0.1:0.

Each test listens with the real :class:`LineLinkFactory` on an ephemeral loopback port and runs a
blocking client script in a worker thread: the seed's example ``client.py`` unchanged but for its
import (``robonet.client.Connection``), the same script with the *original* LabAuto ``Connection``
class (copied verbatim below, to prove the wire behaviour rather than our client), a script using
``wait_for`` / ``send_json`` / ``receive_json``, and witch-core requests pipelined over raw TCP and
through ``robonet.client.Client``. Every socket has a timeout, so a broken server fails the test
instead of hanging it; the listening port and every server-side connection are closed in cleanup.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from robonet.client import Client, Connection
from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Message
from robonet.protocols.linelink import LineLinkFactory
from robonet.registry import Device

SOCKET_TIMEOUT = 5.0


class OriginalConnection:
    """LabAuto.network.Connection exactly as in seed 001 (prints included)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = ""

    @classmethod
    def connect(cls, host_ip: str, port: int) -> OriginalConnection:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(SOCKET_TIMEOUT)  # the only addition: a broken server fails the test, never hangs it
        s.connect((host_ip, port))
        print(f"Connected to {host_ip}:{port}")
        return cls(s)

    def send(self, msg: str) -> None:
        self.sock.sendall((msg + "\n").encode())
        print(f"[SEND] {msg}")

    def receive(self) -> str:
        while True:
            if "\n" in self.buffer:
                line, self.buffer = self.buffer.split("\n", 1)
                line = line.strip()
                if line:
                    print(f"[RECV] {line}")
                    return line
            chunk = self.sock.recv(1024).decode()
            if not chunk:
                raise ConnectionError("Connection closed by peer")
            self.buffer += chunk

    def wait_for(self, target: str) -> str:
        while True:
            msg = self.receive()
            if msg == target:
                return msg

    def send_json(self, obj: Any) -> None:
        self.send(json.dumps(obj))

    def receive_json(self) -> Any:
        return json.loads(self.receive())

    def close(self) -> None:
        self.sock.close()


class TimedConnection(Connection):
    """robonet.client.Connection whose socket times out (so a broken server cannot hang the test)."""

    @classmethod
    def connect(cls, host_ip: str, port: int, verbose: bool = False) -> TimedConnection:
        conn = super().connect(host_ip, port, verbose=verbose)
        conn.sock.settimeout(SOCKET_TIMEOUT)
        return conn  # type: ignore[return-value]


def seed_client_script(Connection: Any, port: int) -> str:  # noqa: N803 - the seed's own name
    """Seed 001's client.py, unchanged except that host/port and the class are parameters."""
    conn = Connection.connect("127.0.0.1", port)
    conn.send("hello")
    reply = conn.receive()
    # send JSON
    conn.send_json({"cmd": "move", "steps": 100})
    conn.close()
    return str(reply)


def lab_script(Connection: Any, port: int) -> dict[str, Any]:  # noqa: N803
    """A typical LabAuto experiment script: handshake, wait for readiness, exchange JSON."""
    conn = Connection.connect("127.0.0.1", port)
    conn.send("hello")
    greeting = conn.receive()
    conn.send("start")
    conn.wait_for("ready")
    conn.send_json({"cmd": "measure", "channel": 2})
    result = conn.receive_json()
    conn.close()
    return {"greeting": greeting, "result": result}


def two_lab_scripts(Connection: Any, port: int) -> dict[str, Any]:  # noqa: N803
    """Two LabAuto scripts synchronised through robonet with bare text lines (``line`` commands).

    ``bench`` names itself, then only waits for ``ready``; ``script`` sends it ``ready`` and waits
    for ``bench``'s ``DONE``.
    """
    bench = Connection.connect("127.0.0.1", port)
    script = Connection.connect("127.0.0.1", port)
    try:
        bench.send_json({"type": "hello", "role": "robot", "device_id": "bench"})
        bench.receive_json()  # the welcome: the device is registered from here on
        script.send_json({"type": "hello", "role": "robot", "device_id": "script"})
        script.receive_json()
        script.send_json({"type": "line", "id": 1, "device_id": "bench", "text": "ready"})
        ack = script.receive_json()
        got = bench.wait_for("ready")
        bench.send_json({"type": "line", "device_id": "script", "text": "DONE"})
        done = script.wait_for("DONE")
    finally:
        bench.close()
        script.close()
    return {"ack": ack, "got": got, "done": done}


class LineLinkOverTCPTests(TestCase):
    """Real sockets on 127.0.0.1, bounded by socket timeouts; everything closed in cleanup."""

    timeout = 30

    def setUp(self) -> None:
        self.config = load_config(None, environ={}, overrides={})
        self.hub = Hub(self.config, reactor)
        self.factory = LineLinkFactory(self.hub, self.config, reactor)
        self.listener = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port: int = self.listener.getHost().port  # type: ignore[attr-defined]
        self.addCleanup(self._shutdown)
        self.json_seen: list[dict[str, Any]] = []
        self.hub.register_callback("json", lambda m, d: self.json_seen.append(m.body))

    async def _shutdown(self) -> None:
        await defer.maybeDeferred(self.listener.stopListening)
        for proto in list(self.factory.connections):
            if proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
        await self._until(lambda: not self.factory.connections)

    async def _until(self, check: Any, limit: float = 5.0) -> None:
        """Let the reactor run until ``check()`` is true (at most ``limit`` seconds)."""
        waited = 0.0
        while not check():
            if waited >= limit:
                self.fail("condition not reached")
            await task.deferLater(reactor, 0.01, lambda: None)
            waited += 0.01

    async def test_two_lab_scripts_talk_text(self) -> None:
        """Two LabAuto scripts' wait_for("ready") / "DONE" handshake works through robonet (issue 11)."""
        result = await threads.deferToThread(two_lab_scripts, TimedConnection, self.port)
        self.assertEqual((result["ack"]["type"], result["ack"]["id"]), ("ack", 1))
        self.assertEqual((result["got"], result["done"]), ("ready", "DONE"))

    async def test_seed_client_with_robonet_connection(self) -> None:
        """Seed 001's client.py runs unchanged with `from robonet.client import Connection`."""
        reply = await threads.deferToThread(seed_client_script, TimedConnection, self.port)
        self.assertEqual(reply, "ok")
        await self._until(lambda: self.json_seen)
        self.assertEqual(self.json_seen, [{"cmd": "move", "steps": 100}])

    async def test_seed_client_with_original_labauto_class(self) -> None:
        """The same script with the original LabAuto Connection class (verbatim) gets the same result."""
        reply = await threads.deferToThread(seed_client_script, OriginalConnection, self.port)
        self.assertEqual(reply, "ok")
        await self._until(lambda: self.json_seen)
        self.assertEqual(self.json_seen, [{"cmd": "move", "steps": 100}])
        await self._until(lambda: not self.factory.connections)
        dev = self.hub.registry.devices()[0]
        self.assertEqual((dev.face, dev.role, dev.online), ("line", "client", False))

    async def test_lab_script_with_handlers(self) -> None:
        """wait_for / send_json / receive_json against hub handlers, one answering through a Deferred."""
        texts: list[str] = []

        def on_text(text: str, origin: str) -> str | None:
            texts.append(text)
            return {"hello": "ok", "start": "ready"}.get(text)

        def on_json(obj: Any, origin: str) -> defer.Deferred[Any]:
            # Answer later, as a handler waiting on an instrument would.
            return task.deferLater(reactor, 0.05, lambda: {"channel": obj["channel"], "value": 4.2})

        self.hub.register_endpoint("text", on_text)
        self.hub.register_endpoint("json", on_json)
        for cls in (TimedConnection, OriginalConnection):
            got = await threads.deferToThread(lab_script, cls, self.port)
            self.assertEqual(got, {"greeting": "ok", "result": {"channel": 2, "value": 4.2}})
        self.assertEqual(texts, ["hello", "start", "hello", "start"])

    async def test_witch_core_pipelined_over_tcp(self) -> None:
        """Several witch-core requests in one TCP segment are all answered, in order."""

        def script(port: int) -> list[Any]:
            with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as s:
                s.sendall(
                    b'{"request": "ping"}\n{"endpoint": "echo", "data": "Hello"}\n'
                    b'{"endpoint": "nope"}\n{"request": "echo", "data": [1]}\n'
                )
                buf = b""
                while buf.count(b"\n") < 4:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            return [json.loads(x) for x in buf.splitlines()]

        replies = await threads.deferToThread(script, self.port)
        self.assertEqual(len(replies), 4)
        self.assertEqual(replies[0]["pong"], True)
        self.assertEqual(replies[1]["data"], "Hello")
        self.assertEqual(replies[2]["message"], "Unknown endpoint: nope")
        self.assertEqual(replies[3]["echo"], [1])

    async def test_witch_core_client(self) -> None:
        """robonet.client.Client (witch-core's API) gets the spec's replies from the line link."""

        def script(port: int) -> list[Any]:
            client = Client(host="127.0.0.1", port=port, timeout=SOCKET_TIMEOUT, auto_reconnect=False)
            assert client.connect()
            try:
                return [
                    client.send_and_receive({"endpoint": "echo", "data": "Hello"}),
                    client.send_and_receive({"request": "ping"}),
                    client.send_and_receive({"request": "info"}),
                ]
            finally:
                client.disconnect()

        echo, ping, info = await threads.deferToThread(script, self.port)
        self.assertEqual((echo["status"], echo["data"]), ("success", "Hello"))
        self.assertEqual(ping["pong"], True)
        self.assertEqual(info["data"]["port"], self.port)
        self.assertEqual(info["data"]["server_id"], self.hub.node.node_id)

    async def test_robot_on_line_link(self) -> None:
        """A robot speaking the envelope over TCP receives a hub command and its ack resolves it."""
        got: list[tuple[Message, Device]] = []
        self.hub.register_callback("telemetry", lambda m, d: got.append((m, d)))

        def robot(port: int) -> dict[str, Any]:
            conn = TimedConnection.connect("127.0.0.1", port)
            conn.send_json({"type": "hello", "role": "robot", "device_id": "laser"})
            welcome = conn.receive_json()
            assert welcome["type"] == "welcome", welcome
            conn.send_json({"type": "telemetry", "battery": 77, "id": 1})
            ack = conn.receive_json()
            assert ack["type"] == "ack" and ack["id"] == 1, ack
            line = conn.receive()
            cmd = json.loads(line)
            conn.send_json({"type": "ack", "id": cmd["id"], "sum": sum(line.encode()) & 0xFFFFFFFF})
            conn.close()
            return dict(cmd)

        robot_done = threads.deferToThread(robot, self.port)
        await self._until(lambda: got)
        reached = await self.hub.command({"type": "robot_move", "direction": "left"}, "tester", "laser")
        cmd = await robot_done
        self.assertEqual(reached, ["laser"])
        self.assertEqual((cmd["type"], cmd["direction"]), ("robot_move", "left"))
        self.assertEqual(self.hub.registry.field("laser.battery"), 77)
        self.assertNotIn("bad_checksum", self.hub.stats.errors)  # the robot's sum matched our line
