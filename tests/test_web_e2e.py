"""End to end against the real daemon (``twistd -n robonet`` on loopback) with the ``websockets``
library: a robot program like the original's, two dashboards, and a bot-link robot."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Any

import websockets
from twisted.trial import unittest

from tests.daemon import start_daemon

TIMEOUT = 10.0
TELEMETRY_PERIOD = 0.1  # the original robot program sends every 3 s


class Inbox:
    """Messages a client received, with waiting for one that matches."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, msg: Any) -> None:
        self.messages.append(msg)
        self._changed.set()

    async def wait(self, pred: Callable[[Any], bool], what: str) -> Any:
        async def find() -> Any:
            seen = 0
            while True:
                for msg in self.messages[seen:]:
                    if pred(msg):
                        return msg
                seen = len(self.messages)
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(find(), TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; got {self.messages[-5:]}") from None


async def ws_client(url: str) -> tuple[Any, Inbox, asyncio.Task[None]]:
    """Connect and keep reading into an Inbox in the background."""
    conn = await websockets.connect(url, open_timeout=TIMEOUT)
    inbox = Inbox()

    async def reader() -> None:
        try:
            async for raw in conn:
                inbox.add(json.loads(raw))
        except websockets.ConnectionClosed:
            pass

    return conn, inbox, asyncio.create_task(reader())


class BotLinkRobot:
    """A native bot link robot: 4-byte BE length + JSON; acks commands with {"type":"ack","id","sum"}."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.inbox = Inbox()
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, port: int, device_id: str) -> BotLinkRobot:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        robot = cls(reader, writer)
        robot.send({"type": "hello", "proto": 1, "role": "robot", "device_id": device_id})
        welcome = await asyncio.wait_for(robot.read_frame(), TIMEOUT)
        assert welcome[1]["type"] == "welcome", welcome
        robot.task = asyncio.create_task(robot.run())
        return robot

    def send(self, obj: Any) -> None:
        payload = json.dumps(obj).encode()
        self.writer.write(struct.pack(">I", len(payload)) + payload)

    async def read_frame(self) -> tuple[bytes, Any]:
        (n,) = struct.unpack(">I", await self.reader.readexactly(4))
        payload = await self.reader.readexactly(n)
        return payload, json.loads(payload)

    async def run(self) -> None:
        try:
            while True:
                payload, msg = await self.read_frame()
                if msg.get("id") is not None and msg.get("type") not in ("ack", "response", "error"):
                    self.send({"type": "ack", "id": msg["id"], "sum": sum(payload) & 0xFFFFFFFF})
                self.inbox.add(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            self.task.cancel()


class WebEndToEndTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = start_daemon(self)
        self.url = f"ws://127.0.0.1:{self.daemon.ports['web']}/ws/telemetry/"

    def test_robot_two_websites_and_a_bot_link_robot(self) -> None:
        """Both websites get telemetry_update from a WebSocket robot and a bot-link robot; a command from
        one website reaches each robot and is acked to that website only; closing the driving website
        stops the robot (deadman)."""
        asyncio.run(self._scenario())

    async def _scenario(self) -> None:
        robot, robot_in, robot_task = await ws_client(self.url + "?device_id=robot_01")
        greeting = await robot_in.wait(lambda m: m.get("status") == "connected", "robot greeting")
        self.assertEqual(greeting["message"], "Robot robot_01 connected to server")

        async def robot_program() -> None:
            battery = 85.0
            while True:
                await robot.send(
                    json.dumps(
                        {
                            "type": "telemetry",
                            "device_id": "robot_01",
                            "battery": battery,
                            "cpu": 45.0,
                            "temperature": 35.0,
                            "signal": 90.0,
                        }
                    )
                )
                battery -= 0.1
                await asyncio.sleep(TELEMETRY_PERIOD)

        sender = asyncio.create_task(robot_program())
        site_a, a_in, a_task = await ws_client(self.url)
        site_b, b_in, b_task = await ws_client(self.url)
        hello_a = await a_in.wait(lambda m: m.get("device_type") == "website", "website greeting")
        hello_b = await b_in.wait(lambda m: m.get("device_type") == "website", "website greeting")
        self.assertNotEqual(hello_a["website_id"], hello_b["website_id"])
        for inbox in (a_in, b_in):
            update = await inbox.wait(lambda m: m.get("type") == "telemetry_update", "telemetry_update")
            self.assertEqual(
                set(update),
                {"type", "device_id", "device_name", "battery", "cpu", "temperature", "signal", "timestamp"},
            )
            self.assertEqual(update["device_id"], "robot_01")
        ack = await robot_in.wait(lambda m: m.get("type") == "ack", "telemetry ack")
        self.assertEqual(ack["message"], "Telemetry data received and saved")

        await site_a.send(json.dumps({"type": "robot_move", "x": 0.5, "y": -0.3}))
        cmd = await robot_in.wait(lambda m: m.get("type") == "robot_move", "robot_move at the robot")
        self.assertEqual((cmd["x"], cmd["y"]), (0.5, -0.3))
        self.assertTrue(cmd["timestamp"].endswith("+00:00"))
        ack = await a_in.wait(lambda m: m.get("type") == "ack", "ack to the sender")
        self.assertEqual(ack["message"], "Command received: Robot move x=0.5, y=-0.3")

        bot = await BotLinkRobot.connect(self.daemon.ports["botlink"], "bl_01")
        bot.send(
            {"type": "telemetry", "id": 1, "battery": 61.0, "cpu": 10.0, "temperature": 30.0, "signal": 70.0}
        )
        for inbox in (a_in, b_in):
            update = await inbox.wait(
                lambda m: m.get("type") == "telemetry_update" and m.get("device_id") == "bl_01",
                "bot link telemetry",
            )
            self.assertEqual(update["battery"], 61.0)
        await site_b.send(json.dumps({"type": "set", "name": "speed", "value": 60, "device_id": "bl_01"}))
        cmd = await bot.inbox.wait(lambda m: m.get("type") == "set_speed", "set_speed at the bot link robot")
        self.assertEqual(cmd["value"], 60)
        self.assertIsInstance(cmd["id"], int)
        ack = await b_in.wait(lambda m: m.get("type") == "ack", "ack to website B")
        self.assertEqual(
            (ack["original_type"], ack["message"]), ("set", "Command received: Speed set to 60%")
        )
        self.assertFalse([m for m in b_in.messages if m.get("type") == "error"])
        self.assertFalse([m for m in a_in.messages if m.get("type") == "ack" and m["original_type"] == "set"])

        await site_a.close()
        stop = await robot_in.wait(lambda m: m.get("type") == "robot_move" and m["x"] == 0, "deadman stop")
        self.assertEqual((stop["x"], stop["y"]), (0, 0))

        sender.cancel()
        await bot.close()
        for conn in (robot, site_b):
            await conn.close()
        for task in (robot_task, a_task, b_task):
            await asyncio.wait_for(task, TIMEOUT)


class EchoEndToEndTests(unittest.SynchronousTestCase):
    def test_echo_endpoint(self) -> None:
        """With web.echo, /ws/echo echoes text and binary messages up to web.max_message and closes
        1009 above it (the Autobahn|Testsuite target, served with the relay's options)."""
        from websockets.sync.client import connect

        daemon = start_daemon(self, env={"ROBONET_WEB_ECHO": "true", "ROBONET_WEB_MAX_MESSAGE": "65536"})
        url = f"ws://127.0.0.1:{daemon.ports['web']}/ws/echo"
        with connect(url, max_size=None) as conn:
            conn.send("hello")
            self.assertEqual(conn.recv(timeout=TIMEOUT), "hello")
            conn.send(b"\x00\x01" * 30000)
            self.assertEqual(conn.recv(timeout=TIMEOUT), b"\x00\x01" * 30000)
            conn.send(["frag", "mented"])
            self.assertEqual(conn.recv(timeout=TIMEOUT), "fragmented")
            conn.send("x" * 70000)
            with self.assertRaises(websockets.ConnectionClosed) as ctx:
                conn.recv(timeout=TIMEOUT)
            self.assertEqual(ctx.exception.rcvd.code, 1009)  # type: ignore[union-attr]
