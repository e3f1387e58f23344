"""The WebSocket relay (spec/websocket.md) without sockets: Autobahn's memory agent, a fake clock.

Every row of the spec's server -> client table is checked with its exact JSON; then commands and
their acks, ``set`` normalisation, targeting, errors (unknown command, invalid JSON, binary, bad
UTF-8, oversized frames, a deflate bomb), the deadman (both kinds), Origin and token checks, slow
websites (conflation, drops, close 1008), the producer hand-over and write batching.
"""

from __future__ import annotations

import zlib
from typing import Any

import attrs
import orjson
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Command, HubError, Message, iso_utc
from robonet.protocols import websocket as ws
from robonet.protocols.websocket import RelayFactory, RelayProtocol

T0 = 1_733_740_245.0  # 2024-12-09T10:30:45Z
SERVER = IPv4Address("TCP", "127.0.0.1", 8000)
PEER = IPv4Address("TCP", "127.0.0.1", 31337)


class Client(WebSocketClientProtocol):
    """A test client: records decoded messages and how the connection closed."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Any] = []
        self.raw: list[tuple[bytes, bool]] = []
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.raw.append((payload, isBinary))
        self.received.append(orjson.loads(payload) if not isBinary else payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)

    def send_obj(self, obj: Any) -> None:
        self.sendMessage(orjson.dumps(obj))

    def take(self) -> list[Any]:
        """Everything received since the last take()."""
        out, self.received = self.received, []
        return out


class Pumper:
    """Synchronous pumper for the memory agent: moves bytes and runs due calls on the test clock."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []

    def add(self, pump: iosim.IOPump) -> None:
        self.pumps.append(pump)

    def flush(self) -> None:
        for _ in range(1000):
            self.clock.advance(0)
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved
            due = any(c.getTime() <= self.clock.seconds() for c in self.clock.getDelayedCalls())
            if not moved and not due:
                return
        raise AssertionError("pumping never settled")


@attrs.define
class FakeBatch:
    """A store Batch whose commit the test settles by hand."""

    waiters: list[tuple[Any, Any, tuple[Any, ...]]] = attrs.Factory(list)

    def when_committed(self, ok: Any, failed: Any, *args: Any) -> None:
        self.waiters.append((ok, failed, args))

    def commit(self) -> None:
        for ok, _failed, args in self.waiters:
            ok(*args)

    def fail(self) -> None:
        for _ok, failed, args in self.waiters:
            failed(Failure(RuntimeError("disk full")), *args)


@attrs.define
class FakeStore:
    """Just enough TelemetryStore: append() returns a FakeBatch per row."""

    batches: list[FakeBatch] = attrs.Factory(list)
    rows: list[tuple[str, str, dict[str, Any]]] = attrs.Factory(list)

    def append(
        self, device_id: str, mtype: str, at: float, body: dict[str, Any], raw: bytes | None
    ) -> FakeBatch:
        self.rows.append((device_id, mtype, body))
        batch = FakeBatch()
        self.batches.append(batch)
        return batch


@attrs.define(eq=False)
class FakeLink:
    """A robot on another face (e.g. the bot link): records the commands the hub delivers."""

    face: str = "botlink"
    commands: list[Command] = attrs.Factory(list)
    closed: list[tuple[str, str]] = attrs.Factory(list)

    def deliver(self, command: Command) -> Deferred[Any] | None:
        self.commands.append(command)
        return succeed(None)

    def close_link(self, code: str, message: str) -> None:
        self.closed.append((code, message))


class Relay:
    """A hub + RelayFactory on a MemoryReactorClock, with clients connected through the memory agent."""

    def __init__(self, testcase: unittest.SynchronousTestCase, store: Any = None, **sections: dict[str, Any]):
        overrides: dict[str, dict[str, Any]] = {"hub": {"state_dir": testcase.mktemp(), "name": "test-hub"}}
        for name, values in sections.items():
            overrides.setdefault(name, {}).update(values)
        self.config = load_config(environ={}, overrides=overrides)
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.hub = Hub(self.config, self.clock, store=store)
        self.factory = RelayFactory(self.hub, self.clock)
        self.servers: list[RelayProtocol] = []
        self.pumper = Pumper(self.clock)
        self.agent = create_memory_agent(self.clock, self.pumper, self._server)
        testcase.addCleanup(self.factory.shutdown)

    def _server(self) -> RelayProtocol:
        proto = self.factory.buildProtocol(PEER)
        assert isinstance(proto, RelayProtocol)
        self.servers.append(proto)
        return proto

    def open(self, query: str = "", **options: Any) -> Deferred[Client]:
        """Start a connection to ``/ws/telemetry/<query>``; pumped, so the Deferred has fired."""
        d: Deferred[Client] = self.agent.open(f"ws://localhost:8000/ws/telemetry/{query}", options, Client)
        self.flush()
        return d

    def connect(self, query: str = "", **options: Any) -> Client:
        """Open and return the client (fails the test if the handshake failed)."""
        results: list[Any] = []
        self.open(query, **options).addBoth(results.append)
        assert results and isinstance(results[0], Client), f"connection failed: {results}"
        return results[0]  # type: ignore[no-any-return]

    def refused(self, query: str = "", **options: Any) -> str:
        """Open a connection that the server must refuse; return the client's reason (has the HTTP status).

        (Autobahn's agent never fires its Deferred for a failed handshake, hence the pump lookup.)
        """
        results: list[Any] = []
        self.open(query, **options).addBoth(results.append)
        assert not results, f"connection was not refused: {results}"
        client = self.pumper.pumps[-1].client
        client = getattr(client, "_wrappedProtocol", client)
        assert isinstance(client, Client) and client.closed is not None
        return str(client.wasNotCleanReason)

    def robot(self, device_id: str = "robot_01") -> Client:
        client = self.connect(f"?device_id={device_id}")
        client.take()
        return client

    def website(self) -> Client:
        client = self.connect()
        client.take()
        return client

    def flush(self) -> None:
        self.pumper.flush()

    def server_of(self, index: int = -1) -> RelayProtocol:
        return self.servers[index]


def exact(payload_obj: dict[str, Any]) -> dict[str, Any]:
    """Readability helper: the expected JSON object."""
    return payload_obj


class RobotRowsTests(unittest.SynchronousTestCase):
    """The spec table's rows for robots, exact JSON."""

    def test_robot_greeting(self) -> None:
        """A connection with ?device_id= is a robot and gets the original greeting."""
        relay = Relay(self)
        robot = relay.connect("?device_id=robot_01")
        self.assertEqual(
            robot.take(),
            [
                {
                    "status": "connected",
                    "device_type": "robot",
                    "device_id": "robot_01",
                    "message": "Robot robot_01 connected to server",
                }
            ],
        )
        dev = relay.hub.registry.get("robot_01")
        assert dev is not None
        self.assertEqual((dev.face, dev.role, dev.status), ("web", "robot", "online"))

    def test_device_id_is_url_decoded(self) -> None:
        """The device id in the query string is URL-decoded."""
        relay = Relay(self)
        robot = relay.connect("?device_id=robot%5F01%C3%A9")
        self.assertEqual(robot.take()[0]["device_id"], "robot_01\u00e9")
        self.assertIsNotNone(relay.hub.registry.get("robot_01\u00e9"))
        self.assertIn("[400]", relay.refused("?device_id=a%20b"))

    def test_robot_connect_and_disconnect_notices(self) -> None:
        """Websites get the original connected / disconnected robot_status notices (and device_update)."""
        relay = Relay(self)
        site = relay.website()
        robot = relay.robot("robot_01")
        got = site.take()
        self.assertEqual(
            got[0],
            {
                "type": "robot_status",
                "status": "connected",
                "device_type": "robot",
                "device_id": "robot_01",
                "message": "Robot robot_01 has connected",
            },
        )
        self.assertEqual([m["type"] for m in got[1:]], ["device_update"])
        self.assertEqual(got[1]["event"], "device_up")
        robot.sendClose()
        relay.flush()
        got = site.take()
        self.assertEqual(
            got[0],
            {
                "type": "robot_status",
                "status": "disconnected",
                "device_type": "robot",
                "device_id": "robot_01",
                "message": "Robot robot_01 has disconnected",
            },
        )
        self.assertEqual(relay.hub.registry.get("robot_01").status, "offline")  # type: ignore[union-attr]

    def test_telemetry_ack_and_update(self) -> None:
        """Robot telemetry: the exact ack to the robot, the exact telemetry_update to every website."""
        relay = Relay(self)
        sites = [relay.website(), relay.website()]
        robot = relay.robot("robot_01")
        for s in sites:
            s.take()
        robot.send_obj(
            {"type": "telemetry", "battery": 85.0, "cpu": 45.2, "temperature": 34.8, "signal": 89.5}
        )
        relay.flush()
        self.assertEqual(
            robot.take(),
            [
                {
                    "type": "ack",
                    "original_type": "telemetry",
                    "status": "received",
                    "message": "Telemetry data received and saved",
                }
            ],
        )
        expected = {
            "type": "telemetry_update",
            "device_id": "robot_01",
            "device_name": "robot_01",
            "battery": 85.0,
            "cpu": 45.2,
            "temperature": 34.8,
            "signal": 89.5,
            "timestamp": iso_utc(T0),
        }
        for s in sites:
            self.assertEqual(s.take(), [expected])

    def test_telemetry_ack_waits_for_commit(self) -> None:
        """With a store, the telemetry ack goes out only once the row's batch has committed."""
        store = FakeStore()
        relay = Relay(self, store=store)
        robot = relay.robot()
        robot.send_obj({"type": "telemetry", "battery": 50})
        relay.flush()
        self.assertEqual(robot.take(), [])
        self.assertEqual(store.rows, [("robot_01", "telemetry", {"type": "telemetry", "battery": 50})])
        store.batches[0].commit()
        relay.flush()
        self.assertEqual(robot.take()[0]["message"], "Telemetry data received and saved")

    def test_failed_commit_is_an_error_not_an_ack(self) -> None:
        """A failed COMMIT gets an error to the robot, never the ack."""
        store = FakeStore()
        relay = Relay(self, store=store)
        robot = relay.robot()
        robot.send_obj({"type": "telemetry", "battery": 50})
        relay.flush()
        store.batches[0].fail()
        relay.flush()
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(
            robot.take(),
            [
                {
                    "type": "error",
                    "code": "internal",
                    "original_type": "telemetry",
                    "message": "could not save the message",
                }
            ],
        )

    def test_video_frame(self) -> None:
        """video_frame: ack "Video frame received"; websites get {type, device_id, frame_data, timestamp}."""
        relay = Relay(self)
        site = relay.website()
        robot = relay.robot()
        site.take()
        robot.send_obj({"type": "video_frame", "frame_data": "aGVsbG8=", "timestamp": "robot-clock"})
        relay.flush()
        self.assertEqual(
            robot.take(),
            [
                {
                    "type": "ack",
                    "original_type": "video_frame",
                    "status": "received",
                    "message": "Video frame received",
                }
            ],
        )
        self.assertEqual(
            site.take(),
            [
                {
                    "type": "video_frame",
                    "device_id": "robot_01",
                    "frame_data": "aGVsbG8=",
                    "timestamp": iso_utc(T0),
                }
            ],
        )

    def test_status(self) -> None:
        """Robot status -> robot_status {type, device_id, status, message, timestamp} to websites, no ack."""
        relay = Relay(self)
        site = relay.website()
        robot = relay.robot()
        site.take()
        robot.send_obj({"type": "status", "status": "climbing", "message": "step 3 of 12"})
        relay.flush()
        self.assertEqual(robot.take(), [])
        self.assertEqual(
            site.take(),
            [
                {
                    "type": "robot_status",
                    "device_id": "robot_01",
                    "status": "climbing",
                    "message": "step 3 of 12",
                    "timestamp": iso_utc(T0),
                }
            ],
        )

    def test_other_types_are_ingested_and_acked(self) -> None:
        """Any other robot type: "<type> received" ack, forwarded as {type, device_id, ...body, timestamp}."""
        relay = Relay(self)
        site = relay.website()
        robot = relay.robot()
        site.take()
        robot.send_obj({"type": "sensor_data", "data_points": [{"angle": 0, "distance_cm": 45.2}]})
        relay.flush()
        self.assertEqual(
            robot.take(),
            [
                {
                    "type": "ack",
                    "original_type": "sensor_data",
                    "status": "received",
                    "message": "sensor_data received",
                }
            ],
        )
        self.assertEqual(
            site.take(),
            [
                {
                    "type": "sensor_data",
                    "device_id": "robot_01",
                    "data_points": [{"angle": 0, "distance_cm": 45.2}],
                    "timestamp": iso_utc(T0),
                }
            ],
        )
        self.assertEqual(relay.hub.registry.field("robot_01.sensor_data.data_points")[0]["angle"], 0)

    def test_robot_bad_input_is_never_forwarded(self) -> None:
        """Non-JSON, arrays, scalars, deep nesting and a missing type from a robot: an error to the robot,
        nothing to websites, and the robot is still served afterwards."""
        relay = Relay(self)
        site = relay.website()
        robot = relay.robot()
        site.take()
        for bad in (b"not json", b"[1,2]", b"1", b'"x"', b"null", b"[" * 2000 + b"]" * 2000, b"{"):
            robot.sendMessage(bad)
            relay.flush()
            self.assertEqual(robot.take(), [{"error": "Invalid JSON format"}], bad[:20])
        robot.send_obj({"battery": 1})
        relay.flush()
        self.assertEqual(
            robot.take(),
            [
                {
                    "type": "error",
                    "code": "missing_type",
                    "original_type": None,
                    "message": "message has no type",
                }
            ],
        )
        self.assertEqual(site.take(), [])
        robot.send_obj({"type": "telemetry", "battery": 1})
        relay.flush()
        self.assertEqual(robot.take()[0]["original_type"], "telemetry")
        self.assertEqual(site.take()[0]["type"], "telemetry_update")
        errors = relay.hub.stats.errors
        self.assertEqual((errors["bad_json"], errors["not_object"], errors["missing_type"]), (3, 4, 1))

    def test_replaced_robot(self) -> None:
        """A second connection with the same id replaces the first, which is told why and closed."""
        relay = Relay(self)
        first = relay.robot("robot_01")
        second = relay.robot("robot_01")
        relay.flush()
        self.assertEqual(first.take()[0]["code"], "replaced")
        self.assertIsNotNone(first.closed)
        self.assertEqual(first.closed[1], 1000)  # type: ignore[index]
        second.send_obj({"type": "telemetry", "battery": 2})
        relay.flush()
        self.assertEqual(second.take()[0]["original_type"], "telemetry")
        self.assertEqual(relay.hub.registry.get("robot_01").status, "online")  # type: ignore[union-attr]


class WebsiteRowsTests(unittest.SynchronousTestCase):
    """The spec table's rows for websites, exact JSON."""

    def test_website_greeting_robots_and_snapshot(self) -> None:
        """A website gets the greeting (with website_id), a "currently connected" line per robot on any
        face, then the snapshot of every device."""
        relay = Relay(self)
        relay.robot("robot_01")
        link = FakeLink()
        bl = relay.hub.connect(link, "bl_01", face="botlink", role="robot", address="10.0.0.5:4000")
        relay.hub.ingest(bl, Message("telemetry", {"type": "telemetry", "battery": 77}, "bl_01", T0))
        site = relay.connect()
        got = site.take()
        self.assertEqual(
            got[0],
            {
                "status": "connected",
                "device_type": "website",
                "message": "Dashboard connected to server",
                "website_id": "website-1",
            },
        )
        self.assertEqual(
            got[1:3],
            [
                {
                    "type": "robot_status",
                    "status": "connected",
                    "device_type": "robot",
                    "device_id": rid,
                    "message": f"Robot {rid} is currently connected",
                }
                for rid in ("bl_01", "robot_01")
            ],
        )
        self.assertEqual(got[3]["type"], "snapshot")
        devices = {d["device_id"]: d for d in got[3]["devices"]}
        self.assertEqual(set(devices), {"robot_01", "bl_01"})
        self.assertEqual(devices["bl_01"]["latest"]["telemetry"]["battery"], 77)
        self.assertEqual(len(got), 4)

    def test_every_website_has_its_own_id_and_gets_everything(self) -> None:
        """Websites are website-1, website-2, ... and all of them receive fan-out (the original kept one)."""
        relay = Relay(self)
        a, b = relay.connect(), relay.connect()
        self.assertEqual([a.take()[0]["website_id"], b.take()[0]["website_id"]], ["website-1", "website-2"])
        robot = relay.robot()
        a.take()
        b.take()
        robot.send_obj({"type": "telemetry", "battery": 3})
        relay.flush()
        self.assertEqual([m["type"] for m in a.take()], ["telemetry_update"])
        self.assertEqual([m["type"] for m in b.take()], ["telemetry_update"])

    def test_bot_link_robot_telemetry_and_commands(self) -> None:
        """A robot on another face: its telemetry reaches websites, website commands reach its link."""
        relay = Relay(self)
        site = relay.website()
        link = FakeLink()
        dev = relay.hub.connect(link, "bl_01", face="botlink", role="robot", address="10.0.0.5:4000")
        relay.flush()
        self.assertEqual(site.take()[0]["message"], "Robot bl_01 has connected")
        relay.hub.ingest(dev, Message("telemetry", {"type": "telemetry", "battery": 61}, "bl_01", T0))
        relay.flush()
        self.assertEqual(site.take()[0]["battery"], 61)
        site.send_obj({"type": "robot_move", "x": 1, "y": 0})
        relay.flush()
        self.assertEqual(site.take()[0]["original_type"], "robot_move")
        self.assertEqual(
            [(c.type, c.target, c.origin) for c in link.commands], [("robot_move", "bl_01", "website-1")]
        )
        self.assertEqual(link.commands[0].body["x"], 1)


class CommandTests(unittest.SynchronousTestCase):
    """Website -> server commands: acks, forwarding, set, targeting, errors."""

    def setUp(self) -> None:
        self.relay = Relay(self)
        self.robot = self.relay.robot("robot_01")
        self.site = self.relay.website()

    def command(self, obj: Any) -> tuple[list[Any], list[Any]]:
        """Send ``obj`` from the website; return (website's messages, robot's messages)."""
        self.site.send_obj(obj)
        self.relay.flush()
        return self.site.take(), self.robot.take()

    def test_robot_move(self) -> None:
        """robot_move: the exact ack to the sender; the robot gets {type, x, y, timestamp (server UTC)}."""
        to_site, to_robot = self.command({"type": "robot_move", "x": 0.5, "y": -0.3})
        self.assertEqual(
            to_site,
            [
                {
                    "type": "ack",
                    "original_type": "robot_move",
                    "status": "received",
                    "message": "Command received: Robot move x=0.5, y=-0.3",
                }
            ],
        )
        self.assertEqual(to_robot, [{"type": "robot_move", "x": 0.5, "y": -0.3, "timestamp": iso_utc(T0)}])
        self.assertTrue(to_robot[0]["timestamp"].endswith("+00:00"))

    def test_ack_messages_print_values_as_python(self) -> None:
        """Ack messages show values as Python prints them: ints, floats, None, booleans, strings."""
        cases = [
            ({"type": "camera_move", "x": -1, "y": 0.25}, "Command received: Camera move x=-1, y=0.25"),
            ({"type": "set_speed", "value": 60}, "Command received: Speed set to 60%"),
            ({"type": "set_brightness", "value": 75.5}, "Command received: Brightness set to 75.5%"),
            ({"type": "robot_move"}, "Command received: Robot move x=None, y=None"),
            ({"type": "robot_move", "x": True, "y": "up"}, "Command received: Robot move x=True, y=up"),
            ({"type": "set_speed", "value": 1e21}, "Command received: Speed set to 1e+21%"),
            ({"type": "stop"}, "Command received: stop"),
        ]
        for obj, message in cases:
            to_site, to_robot = self.command(obj)
            self.assertEqual(to_site[0]["message"], message)
            self.assertEqual(to_robot[0]["type"], obj["type"])

    def test_set_is_normalised(self) -> None:
        """{"type":"set","name":"speed"|"brightness"} is acked like set_* and reaches the robot as set_*."""
        to_site, to_robot = self.command({"type": "set", "name": "speed", "value": 60})
        self.assertEqual(
            to_site,
            [
                {
                    "type": "ack",
                    "original_type": "set",
                    "status": "received",
                    "message": "Command received: Speed set to 60%",
                }
            ],
        )
        self.assertEqual(to_robot, [{"type": "set_speed", "value": 60, "timestamp": iso_utc(T0)}])
        to_site, to_robot = self.command({"type": "set", "name": "brightness", "value": 30})
        self.assertEqual(to_site[0]["message"], "Command received: Brightness set to 30%")
        self.assertEqual(to_robot[0]["type"], "set_brightness")

    def test_set_with_unknown_name(self) -> None:
        """set with another name is an unknown_command error; nothing reaches the robot."""
        to_site, to_robot = self.command({"type": "set", "name": "volume", "value": 3})
        self.assertEqual(
            to_site,
            [
                {
                    "type": "error",
                    "code": "unknown_command",
                    "original_type": "set",
                    "message": "unknown setting volume",
                }
            ],
        )
        self.assertEqual(to_robot, [])

    def test_unknown_command(self) -> None:
        """An unknown type: {"type":"error","code":"unknown_command","original_type":T}; no ack/forward."""
        to_site, to_robot = self.command({"type": "fly", "x": 1})
        self.assertEqual(to_site, [{"type": "error", "code": "unknown_command", "original_type": "fly"}])
        self.assertEqual(to_robot, [])
        to_site, _ = self.command({"x": 1})
        self.assertEqual(to_site, [{"type": "error", "code": "unknown_command", "original_type": None}])
        self.assertEqual(self.relay.hub.stats.errors["unknown_command"], 2)

    def test_targeting(self) -> None:
        """device_id targets one robot; without it every robot gets the command."""
        other = self.relay.robot("robot_02")
        self.site.take()
        to_site, to_robot = self.command({"type": "set_speed", "value": 10, "device_id": "robot_02"})
        self.assertEqual(to_robot, [])
        self.assertEqual(other.take()[0]["value"], 10)
        self.command({"type": "set_speed", "value": 20})
        self.assertEqual(other.take()[0]["value"], 20)

    def test_offline_target(self) -> None:
        """A command for a robot that is not connected is acked (received), then reported device_offline."""
        to_site, _ = self.command({"type": "robot_move", "x": 1, "y": 1, "device_id": "ghost"})
        self.assertEqual([m["type"] for m in to_site], ["ack", "error"])
        self.assertEqual(
            to_site[1],
            {
                "type": "error",
                "code": "device_offline",
                "original_type": "robot_move",
                "message": "device ghost is not connected",
            },
        )

    def test_delivery_timeout_is_reported(self) -> None:
        """A link's later failure (delivery_timeout) reaches the sender as an error."""
        d: Deferred[Any] = Deferred()

        @attrs.define(eq=False)
        class SlowLink(FakeLink):
            def deliver(self, command: Command) -> Deferred[Any] | None:
                return d

        self.relay.hub.connect(SlowLink(), "slow_01", face="botlink", role="robot", address="x")
        self.relay.flush()
        self.site.take()
        to_site, _ = self.command({"type": "stop", "device_id": "slow_01"})
        self.assertEqual([m["type"] for m in to_site], ["ack"])
        d.errback(HubError("delivery_timeout", "no ack within 5 s"))
        self.relay.flush()
        self.assertEqual(
            self.site.take(),
            [
                {
                    "type": "error",
                    "code": "delivery_timeout",
                    "original_type": "stop",
                    "message": "no ack within 5 s",
                }
            ],
        )

    def test_invalid_json_from_website(self) -> None:
        """Non-JSON, arrays and scalars get {"error":"Invalid JSON format"}; the website still works after."""
        for bad in (b"hello", b"[1]", b"42", b"null", b'{"type":'):
            self.site.sendMessage(bad)
            self.relay.flush()
            self.assertEqual(self.site.take(), [{"error": "Invalid JSON format"}])
        self.assertEqual(self.robot.take(), [])
        to_site, to_robot = self.command({"type": "set_speed", "value": 5})
        self.assertEqual(to_site[0]["type"], "ack")
        self.assertEqual(to_robot[0]["value"], 5)

    def test_wrong_target_type(self) -> None:
        """A non-string device_id is a bad_request error; nothing is forwarded."""
        to_site, to_robot = self.command({"type": "stop", "device_id": 5})
        self.assertEqual(
            to_site,
            [
                {
                    "type": "error",
                    "code": "bad_request",
                    "original_type": "stop",
                    "message": "device_id must be a string",
                }
            ],
        )
        self.assertEqual(to_robot, [])

    def test_truncated_frame_then_close(self) -> None:
        """Half a frame and then a closed connection: the robot goes offline, the website is told, and a
        new robot connection is served."""
        self.robot.transport.write(b"\x81\xfe\x10\x00\x01\x02\x03\x04partial")  # type: ignore[union-attr]
        self.robot.transport.loseConnection()  # type: ignore[union-attr]
        self.relay.flush()
        self.assertEqual(self.site.take()[0]["message"], "Robot robot_01 has disconnected")
        again = self.relay.robot("robot_01")
        again.send_obj({"type": "telemetry", "battery": 9})
        self.relay.flush()
        self.assertEqual(again.take()[0]["original_type"], "telemetry")

    def test_binary_frames_get_an_error(self) -> None:
        """Binary messages are not JSON text: an error (bad_frame), the connection stays usable."""
        self.site.sendMessage(b'{"type":"stop"}', isBinary=True)
        self.relay.flush()
        self.assertEqual(
            self.site.take(),
            [
                {
                    "type": "error",
                    "code": "bad_frame",
                    "message": "binary messages are not supported; send JSON text",
                }
            ],
        )
        self.assertEqual(self.robot.take(), [])
        self.assertIsNone(self.site.closed)
        to_site, _ = self.command({"type": "stop"})
        self.assertEqual(to_site[0]["type"], "ack")

    def test_request_endpoint(self) -> None:
        """{"type":"request"} reaches hub endpoints from a website or a robot."""
        self.site.send_obj({"type": "request", "id": 7, "endpoint": "echo", "data": {"a": 1}})
        self.relay.flush()
        self.assertEqual(
            self.site.take(), [{"type": "response", "id": 7, "status": "success", "data": {"a": 1}}]
        )
        self.robot.send_obj({"type": "request", "id": 8, "endpoint": "nope"})
        self.relay.flush()
        self.assertEqual(
            self.robot.take(),
            [
                {
                    "type": "response",
                    "id": 8,
                    "status": "error",
                    "code": "unknown_endpoint",
                    "message": "Unknown endpoint: nope",
                }
            ],
        )


class LimitsTests(unittest.SynchronousTestCase):
    """Autobahn limits: oversized frames and messages, a deflate bomb, invalid UTF-8."""

    def test_oversized_frame_closes_1009(self) -> None:
        """A frame over web.max_message closes with 1009; other connections are not disturbed."""
        relay = Relay(self, web={"max_message": 1024})
        site = relay.website()
        robot = relay.robot()
        robot.sendMessage(b'{"type":"telemetry","pad":"' + b"x" * 2000 + b'"}')
        relay.flush()
        self.assertIsNotNone(robot.closed)
        self.assertEqual(robot.closed[1], 1009)  # type: ignore[index]
        self.assertEqual(relay.hub.registry.get("robot_01").status, "offline")  # type: ignore[union-attr]
        site.take()
        site.send_obj({"type": "stop"})
        relay.flush()
        self.assertEqual([m["type"] for m in site.take()], ["ack"])

    def test_oversized_fragmented_message_closes_1009(self) -> None:
        """A message over the cap in small fragments closes with 1009 too."""
        relay = Relay(self, web={"max_message": 1024})
        site = relay.website()
        site.beginMessage()
        for _ in range(20):
            site.sendMessageFrame(b"x" * 100)
        relay.flush()
        self.assertEqual(site.closed[1], 1009)  # type: ignore[index]

    def test_deflate_bomb_closes_1009(self) -> None:
        """permessage-deflate is accepted, but a message inflating past web.max_message closes with 1009
        while inflating (the whole bomb is never inflated)."""
        relay = Relay(self, web={"max_message": 64 * 1024})
        server = relay._server()
        factory = WebSocketClientFactory("ws://localhost:8000/ws/telemetry/", reactor=relay.clock)
        factory.protocol = Client
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=lambda r: (
                PerMessageDeflateResponseAccept(r) if isinstance(r, PerMessageDeflateResponse) else None
            ),
        )
        client = factory.buildProtocol(SERVER)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True, hostAddress=SERVER, peerAddress=PEER),
            client,
            iosim.FakeTransport(client, isServer=False, hostAddress=PEER, peerAddress=SERVER),
            greet=False,
        )
        relay.pumper.add(pump)
        relay.flush()
        self.assertIsNotNone(client._perMessageCompress, "deflate was not negotiated")
        bomb = b'{"type":"stop","pad":"' + b"a" * (100 * 1024 * 1024) + b'"}'
        compressed = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = compressed.compress(bomb) + compressed.flush(zlib.Z_SYNC_FLUSH)
        del bomb
        self.assertLess(len(data), 200 * 1024)
        client.sendFrame(opcode=1, payload=data[:-4], rsv=4)  # RFC 7692: drop the 00 00 ff ff tail
        relay.flush()
        self.assertEqual(server.localCloseCode, 1009)
        # Autobahn stops parsing after a failed inflate, so the close reply goes unread: the
        # connection is dropped after the close handshake timeout.
        relay.clock.advance(ws.CLOSE_HANDSHAKE_TIMEOUT + 0.5)
        relay.flush()
        self.assertEqual(client.closed[1], 1009)  # type: ignore[index]
        self.assertEqual(relay.factory.websites.members, {})

    def test_invalid_utf8_closes_1007(self) -> None:
        """A text frame that is not UTF-8 closes with 1007."""
        relay = Relay(self)
        site = relay.website()
        other = relay.website()
        site.sendMessage(b'{"type":"stop","x":"\xff\xfe"}')
        relay.flush()
        self.assertEqual(site.closed[1], 1007)  # type: ignore[index]
        other.send_obj({"type": "stop"})
        relay.flush()
        self.assertEqual([m["type"] for m in other.take()], ["ack"])


class DeadmanTests(unittest.SynchronousTestCase):
    """Stopping robots whose driver went away."""

    def test_driver_disconnects(self) -> None:
        """When the website that last moved a robot (and its camera) disconnects, both are stopped at once."""
        relay = Relay(self)
        robot = relay.robot()
        site = relay.website()
        site.send_obj({"type": "robot_move", "x": 0.7, "y": 0.1})
        site.send_obj({"type": "camera_move", "x": 0.2, "y": 0})
        relay.flush()
        robot.take()
        site.sendClose()
        relay.flush()
        got = robot.take()
        self.assertEqual(
            sorted((m["type"], m["x"], m["y"]) for m in got), [("camera_move", 0, 0), ("robot_move", 0, 0)]
        )

    def test_only_the_last_driver_counts(self) -> None:
        """A website that is no longer the last to move the robot does not stop it when it leaves;
        camera stop only if it moved the camera."""
        relay = Relay(self)
        robot = relay.robot()
        a, b = relay.website(), relay.website()
        a.send_obj({"type": "robot_move", "x": 1, "y": 0})
        relay.flush()
        b.send_obj({"type": "robot_move", "x": 0, "y": 1})
        relay.flush()
        robot.take()
        a.sendClose()
        relay.flush()
        self.assertEqual(robot.take(), [])
        b.sendClose()
        relay.flush()
        self.assertEqual([(m["type"], m["x"], m["y"]) for m in robot.take()], [("robot_move", 0, 0)])

    def test_deadman_timeout(self) -> None:
        """With teleop.deadman_ms, a moving robot that stops getting motion commands is stopped; fresh
        commands postpone it; a stop command disarms it."""
        relay = Relay(self, teleop={"deadman_ms": 500})
        robot = relay.robot()
        site = relay.website()
        site.send_obj({"type": "robot_move", "x": 1, "y": 0})
        relay.flush()
        robot.take()
        relay.clock.advance(0.4)
        site.send_obj({"type": "robot_move", "x": 1, "y": 0.5})
        relay.flush()
        relay.clock.advance(0.4)
        relay.flush()
        self.assertEqual([m["x"] for m in robot.take()], [1])
        relay.clock.advance(0.1)
        relay.flush()
        self.assertEqual([(m["type"], m["x"], m["y"]) for m in robot.take()], [("robot_move", 0, 0)])
        site.send_obj({"type": "robot_move", "x": 0, "y": 0})
        relay.flush()
        robot.take()
        relay.clock.advance(5)
        relay.flush()
        self.assertEqual(robot.take(), [])

    def test_deadman_off_by_default(self) -> None:
        """With teleop.deadman_ms = 0 (off; the default is 500) nothing is sent while the driver
        stays connected."""
        relay = Relay(self, teleop={"deadman_ms": 0})
        robot = relay.robot()
        site = relay.website()
        site.send_obj({"type": "robot_move", "x": 1, "y": 0})
        relay.flush()
        robot.take()
        relay.clock.advance(60)
        relay.flush()
        self.assertEqual(robot.take(), [])


class OriginAndTokenTests(unittest.SynchronousTestCase):
    """Who may connect."""

    def test_hostile_origin_refused(self) -> None:
        """A browser Origin that is not the page's host is refused (403) and counted; others keep working."""
        relay = Relay(self)
        site = relay.website()
        self.assertIn("[403]", relay.refused("", origin="http://evil.example"))
        self.assertEqual(relay.hub.stats.errors["forbidden_origin"], 1)
        site.send_obj({"type": "stop"})
        relay.flush()
        self.assertEqual(site.take()[0]["type"], "ack")

    def test_same_host_and_no_origin_allowed(self) -> None:
        """The page's own origin and clients without Origin (robot programs) are accepted."""
        relay = Relay(self)
        relay.connect("", origin="http://localhost:8000")
        relay.connect("?device_id=r1")

    def test_allowed_origins_config(self) -> None:
        """web.allowed_origins replaces the same-host rule (patterns allowed)."""
        relay = Relay(self, web={"allowed_origins": ["https://*.example.org"]})
        relay.connect("", origin="https://ops.example.org")
        self.assertIn("[403]", relay.refused("", origin="http://localhost:8000"))

    def test_origin_rules(self) -> None:
        """origin_allowed: host and port must match, default ports implied, null refused."""
        ok = ws.origin_allowed
        self.assertTrue(ok("http://hub.local:8000", "hub.local:8000", []))
        self.assertTrue(ok("http://hub.local", "hub.local:80", []))
        self.assertTrue(ok("https://hub.local", "HUB.local:443", []))
        self.assertFalse(ok("http://hub.local:8001", "hub.local:8000", []))
        self.assertFalse(ok("http://evil.example", "hub.local", []))
        self.assertFalse(ok("null", "hub.local", []))
        self.assertTrue(ok("null", "hub.local", ["null"]))
        self.assertFalse(ok("file://x", "hub.local", []))
        self.assertTrue(ok("http://anything", "hub.local", ["*"]))

    def test_token_auth(self) -> None:
        """auth.mode=token: ?token= must be known; its role decides robot or website."""
        relay = Relay(self, auth={"mode": "token", "tokens": {"r-secret": "robot", "d-secret": "website"}})
        for query, status in (
            ("", "[401]"),
            ("?token=wrong", "[401]"),
            ("?device_id=r1", "[401]"),
            ("?device_id=r1&token=d-secret", "[403]"),
            ("?token=r-secret", "[400]"),
        ):
            self.assertIn(status, relay.refused(query), query)
        self.assertGreaterEqual(relay.hub.stats.errors["unauthorized"], 5)
        site = relay.connect("?token=d-secret")
        self.assertEqual(site.take()[0]["device_type"], "website")
        robot = relay.connect("?device_id=r1&token=r-secret")
        self.assertEqual(robot.take()[0]["device_type"], "robot")


class SlowWebsiteTests(unittest.SynchronousTestCase):
    """Bounded per-website queues driven by the transport's producer callbacks."""

    def test_producer_handover(self) -> None:
        """The relay replaces whatever producer (twisted.web's HTTP channel) the transport had."""
        relay = Relay(self)

        class OldProducer:
            def pauseProducing(self) -> None: ...
            def resumeProducing(self) -> None: ...
            def stopProducing(self) -> None: ...

        server = relay._server()
        transport = iosim.FakeTransport(server, isServer=True, hostAddress=SERVER, peerAddress=PEER)
        transport.registerProducer(OldProducer(), True)
        server.makeConnection(transport)
        self.assertIs(transport.producer, server)
        self.assertTrue(transport.streamingProducer)

    def test_slow_website_conflated_then_closed_1008(self) -> None:
        """While a website's transport is paused its telemetry is conflated per robot (drops counted),
        control messages are kept; after web.slow_timeout it is closed with 1008. A fast website
        gets everything meanwhile."""
        relay = Relay(self, web={"slow_timeout": 5, "max_queue_bytes": 4096})
        slow, fast = relay.website(), relay.website()
        robots = [relay.robot("r1"), relay.robot("r2")]
        slow.take()
        fast.take()
        slow_server = relay.factory.websites.members["website-1"]
        slow_server.pauseProducing()
        for i in range(100):
            for robot in robots:
                robot.send_obj({"type": "telemetry", "battery": i})
        relay.flush()
        self.assertEqual(len([m for m in fast.take() if m["type"] == "telemetry_update"]), 200)
        self.assertEqual(slow.take(), [])
        queue = slow_server.queue
        assert queue is not None
        self.assertLessEqual(queue.queued_bytes, 4096)
        self.assertEqual(relay.hub.stats.drops["slow_conflated"], 198)
        relay.clock.advance(5)
        relay.flush()
        self.assertIsNotNone(slow.closed)
        self.assertEqual(slow.closed[1], 1008)  # type: ignore[index]
        self.assertEqual(relay.hub.stats.drops["slow_subscriber_closed"], 1)
        self.assertNotIn("website-1", relay.factory.websites.members)
        robots[0].send_obj({"type": "telemetry", "battery": 1})
        relay.flush()
        self.assertEqual([m["battery"] for m in fast.take()], [1])

    def test_resume_delivers_newest(self) -> None:
        """A website that catches up gets the held control messages and the newest telemetry per robot."""
        relay = Relay(self)
        site = relay.website()
        robot = relay.robot()
        site.take()
        server = relay.factory.websites.members["website-1"]
        server.pauseProducing()
        for i in range(10):
            robot.send_obj({"type": "telemetry", "battery": i})
        robot.send_obj({"type": "status", "status": "ok", "message": "fine"})
        relay.flush()
        server.resumeProducing()
        relay.flush()
        got = site.take()
        self.assertEqual([m["type"] for m in got], ["robot_status", "telemetry_update"])
        self.assertEqual(got[1]["battery"], 9)

    def test_one_write_per_iteration(self) -> None:
        """Everything a website is owed within one reactor iteration goes out in one transport.write."""
        relay = Relay(self)
        relay.website()
        link = FakeLink()
        dev = relay.hub.connect(link, "bl_01", face="botlink", role="robot", address="x")
        relay.flush()
        server = relay.factory.websites.members["website-1"]
        writes: list[bytes] = []
        real_write = server.transport.write  # type: ignore[union-attr]

        def write(data: bytes) -> None:
            writes.append(data)
            real_write(data)

        server.transport.write = write  # type: ignore[union-attr,method-assign]
        for i in range(5):
            relay.hub.ingest(dev, Message("sensor_data", {"type": "sensor_data", "n": i}, "bl_01", T0))
        self.assertEqual(writes, [])
        relay.clock.advance(0)
        self.assertEqual(len(writes), 1)
        self.assertEqual(writes[0].count(b'"sensor_data"'), 5)

    def test_text_frame_encoding(self) -> None:
        """text_frame uses the 7-bit, 16-bit and 64-bit length forms of RFC 6455."""
        self.assertEqual(ws.text_frame(b"ab"), b"\x81\x02ab")
        self.assertEqual(ws.text_frame(b"x" * 126)[:4], b"\x81\x7e\x00\x7e")
        self.assertEqual(ws.text_frame(b"x" * 70000)[:10], b"\x81\x7f" + (70000).to_bytes(8, "big"))


class SeamRegressionTests(unittest.SynchronousTestCase):
    """Issue 11 defects of the relay: each failed before the fix."""

    def test_request_result_not_json_gets_an_error(self) -> None:
        """An endpoint returning a value JSON cannot carry gets an ``internal`` error response
        (as on the bot and line links), counted; before, the request got no answer at all."""
        relay = Relay(self)
        relay.hub.register_endpoint("weird", lambda data, origin: {"x": object()})
        site = relay.website()
        robot = relay.robot("robot_01")
        site.take()
        for client in (site, robot):
            client.send_obj({"type": "request", "id": 3, "endpoint": "weird"})
            relay.flush()
            self.assertEqual(
                client.take(),
                [
                    {
                        "type": "response",
                        "id": 3,
                        "status": "error",
                        "code": "internal",
                        "message": "endpoint result is not JSON-serialisable",
                    }
                ],
            )
        self.assertEqual(relay.hub.stats.errors["internal"], 2)

    def test_admin_token_works_for_robots_and_websites(self) -> None:
        """An ``admin`` (or ``any``) token opens robot and website connections, as on the bot link."""
        relay = Relay(self, auth={"mode": "token", "tokens": {"adm": "admin", "all": "any", "r": "robot"}})
        for token in ("adm", "all"):
            robot = relay.connect(f"?device_id=r_{token}&token={token}")
            self.assertEqual(robot.take()[0]["device_type"], "robot")
            site = relay.connect(f"?token={token}")
            self.assertEqual(site.take()[0]["device_type"], "website")
        self.assertIn("[400]", relay.refused("?token=r"))  # a robot token still needs device_id
        self.assertIn("[401]", relay.refused("?device_id=x&token=nope"))

    def test_token_rule(self) -> None:
        """staircase.token_role: the one rule for ?token= (unknown, robot without id, website with id)."""
        from robonet.protocols.staircase import token_role

        tokens = {"r": "robot", "w": "website", "a": "admin"}
        self.assertEqual(token_role(tokens, "", ""), "unknown")
        self.assertEqual(token_role(tokens, "zz", "x"), "unknown")
        self.assertEqual(token_role(tokens, "r", ""), "needs_device_id")
        self.assertEqual(token_role(tokens, "w", "x"), "not_robot")
        self.assertEqual(
            [token_role(tokens, t, d) for t, d in (("r", "x"), ("w", ""), ("a", ""), ("a", "x"))], [""] * 4
        )

    def test_robot_device_name_is_relayed(self) -> None:
        """A robot's own ``device_name`` (robot_client.py sends "Robot robot_01") is relayed in
        telemetry_update; without one the id stands in (the original server's fallback)."""
        relay = Relay(self)
        site = relay.website()
        robot = relay.robot("robot_01")
        site.take()
        robot.send_obj({"type": "telemetry", "device_name": "Robot robot_01", "battery": 85.0})
        relay.flush()
        updates = [m for m in site.take() if m["type"] == "telemetry_update"]
        self.assertEqual([u["device_name"] for u in updates], ["Robot robot_01"])
        self.assertEqual(relay.hub.registry.get("robot_01").name, "Robot robot_01")  # type: ignore[union-attr]
        other = relay.robot("robot_02")
        other.send_obj({"type": "telemetry", "battery": 50.0})
        relay.flush()
        updates = [m for m in site.take() if m["type"] == "telemetry_update"]
        self.assertEqual([u["device_name"] for u in updates], ["robot_02"])

    def test_device_name_change_is_announced_once(self) -> None:
        """The name is taken from each message; websites get one device_update when it changes."""
        relay = Relay(self)
        site = relay.website()
        robot = relay.robot("robot_01")
        site.take()
        for _ in range(3):
            robot.send_obj({"type": "telemetry", "device_name": "Robot A", "battery": 1.0})
        relay.flush()
        got = site.take()
        self.assertEqual([m["event"] for m in got if m["type"] == "device_update"], ["device_update"])
        self.assertEqual([m["device_name"] for m in got if m["type"] == "telemetry_update"], ["Robot A"] * 3)

    def test_autobahn_timers_run_on_the_injected_clock(self) -> None:
        """Autobahn's keepalive runs on the relay's clock: a ping after AUTO_PING_INTERVAL of the
        test clock, and a peer that never answers it is dropped AUTO_PING_TIMEOUT later."""
        relay = Relay(self)
        robot = relay.robot("robot_01")
        pings: list[Any] = []
        robot.onPing = pings.append  # type: ignore[method-assign]  # never answers with a pong
        relay.clock.advance(ws.AUTO_PING_INTERVAL + 1)
        relay.flush()
        self.assertEqual(len(pings), 1)
        self.assertIsNone(robot.closed)
        relay.clock.advance(ws.AUTO_PING_TIMEOUT + 1)
        relay.flush()
        self.assertIsNotNone(robot.closed)
        self.assertEqual(relay.hub.registry.get("robot_01").status, "offline")  # type: ignore[union-attr]

    def test_clock_timer(self) -> None:
        """ClockTimer runs calls on the given clock, batched per 200 ms window (one reactor timer),
        never early and at most a window late; cancel() is safe before and after; a window whose
        calls are all cancelled leaves no reactor timer; a failing call does not stop the others."""
        clock = MemoryReactorClock()
        calls: list[int] = []
        timer = ws.ClockTimer(clock)
        done = timer.call_later(2.0, calls.append, 1)
        dropped = timer.call_later(1.95, calls.append, 2)
        timer.call_later(1.9, lambda: 1 / 0)
        timer.call_later(1.85, calls.append, 3)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        dropped.cancel()
        clock.advance(1.85)
        self.assertEqual(calls, [])  # never early
        clock.advance(0.15)
        self.assertEqual(sorted(calls), [1, 3])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        done.cancel()
        dropped.cancel()
        gone = [timer.call_later(5.0, calls.append, 9) for _ in range(3)]
        self.assertEqual((len(clock.getDelayedCalls()), timer.pending()), (1, 3))
        for call in gone:
            call.cancel()
        self.assertEqual((clock.getDelayedCalls(), timer.pending()), ([], 0))
        clock.advance(10)
        self.assertEqual(sorted(calls), [1, 3])

    def test_use_clock_fails_loudly(self) -> None:
        """If Autobahn stops providing the timer attribute, use_clock raises instead of leaving
        timers on the global reactor."""

        class Bare:
            pass

        self.assertRaises(RuntimeError, ws.use_clock, Bare(), MemoryReactorClock())  # type: ignore[arg-type]
