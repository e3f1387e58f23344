"""The Foxglove WebSocket face (foxglove.websocket.v1) without sockets: codec and server.

The codec's every op and bad input; then the server through Autobahn's memory agent on a fake
clock: serverInfo and advertise, channels per (device, type), subscribe/unsubscribe and binary
messageData, the point cloud of ultrasonic scans, unadvertise on device_down, client publish
(commands, cmd_vel, deadman), auth, limits (oversized frames, max_clients, handshake deadline)
and a client that never reads (conflated, bounded, closed).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import attrs
import orjson
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test import iosim
from twisted.trial import unittest

from robonet import schemas
from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Command, Message
from robonet.protocols import foxglove as fg
from robonet.services.foxglove import FoxgloveFactory, FoxgloveProtocol
from robonet.tap import Options

T0 = 1_733_740_245.0
PEER = IPv4Address("TCP", "127.0.0.1", 31337)
SUB = [fg.SUBPROTOCOL]


# --- codec ---------------------------------------------------------------------------------------


class CodecTests(unittest.SynchronousTestCase):
    """Pure encoders and parsers (spec field names and byte layouts)."""

    def test_server_info(self) -> None:
        """serverInfo carries name, capabilities, supportedEncodings, metadata and sessionId."""
        obj = orjson.loads(fg.server_info("hub-a", ["clientPublish"], ["json"], "s1", {"k": "v"}))
        self.assertEqual(
            obj,
            {
                "op": "serverInfo",
                "name": "hub-a",
                "capabilities": ["clientPublish"],
                "supportedEncodings": ["json"],
                "metadata": {"k": "v"},
                "sessionId": "s1",
            },
        )

    def test_status_advertise_unadvertise(self) -> None:
        """status/advertise/unadvertise JSON shapes."""
        self.assertEqual(
            orjson.loads(fg.status(fg.ERROR, "bad")), {"op": "status", "level": 2, "message": "bad"}
        )
        self.assertEqual(orjson.loads(fg.status(fg.INFO, "x", "id1"))["id"], "id1")
        ch = fg.Channel(3, "/r/telemetry", "json", "robonet.telemetry", "{}", "jsonschema")
        self.assertEqual(
            orjson.loads(fg.advertise([ch])),
            {
                "op": "advertise",
                "channels": [
                    {
                        "id": 3,
                        "topic": "/r/telemetry",
                        "encoding": "json",
                        "schemaName": "robonet.telemetry",
                        "schema": "{}",
                        "schemaEncoding": "jsonschema",
                    }
                ],
            },
        )
        self.assertEqual(orjson.loads(fg.unadvertise([1, 2])), {"op": "unadvertise", "channelIds": [1, 2]})

    def test_message_data_layout(self) -> None:
        """messageData: opcode 0x01, u32 LE subscription id, u64 LE ns, payload."""
        data = fg.message_data(0x01020304, 0x1122334455667788, b"{}")
        self.assertEqual(data, b"\x01\x04\x03\x02\x01\x88\x77\x66\x55\x44\x33\x22\x11{}")
        self.assertEqual(fg.message_data_header(7, 9) + b"x", fg.message_data(7, 9, b"x"))
        self.assertEqual(fg.time_message(5), b"\x02" + struct.pack("<Q", 5))
        self.assertEqual(fg.to_ns(1.5), 1_500_000_000)
        self.assertEqual(fg.to_ns(-1.0), 0)

    def test_ws_frame_headers(self) -> None:
        """Binary frame heads for 7-bit, 16-bit and 64-bit payload lengths."""
        self.assertEqual(fg.ws_binary_header(5), b"\x82\x05")
        self.assertEqual(fg.ws_binary_header(300), b"\x82\x7e\x01\x2c")
        self.assertEqual(fg.ws_binary_header(70000), b"\x82\x7f" + struct.pack("!Q", 70000))
        self.assertEqual(fg.ws_text_frame(b"hi"), b"\x81\x02hi")

    def test_parse_ops(self) -> None:
        """subscribe, unsubscribe, client advertise and unadvertise parse to their classes."""
        self.assertEqual(
            fg.parse_client_text(b'{"op":"subscribe","subscriptions":[{"id":0,"channelId":3}]}'),
            fg.Subscribe(((0, 3),)),
        )
        self.assertEqual(
            fg.parse_client_text(b'{"op":"unsubscribe","subscriptionIds":[0,1]}'), fg.Unsubscribe((0, 1))
        )
        op = fg.parse_client_text(
            b'{"op":"advertise","channels":[{"id":1,"topic":"/cmd_vel","encoding":"json","schemaName":"T"}]}'
        )
        self.assertEqual(op, fg.ClientAdvertise((fg.ClientChannel(1, "/cmd_vel", "json", "T"),)))
        self.assertEqual(
            fg.parse_client_text(b'{"op":"unadvertise","channelIds":[1]}'), fg.ClientUnadvertise((1,))
        )

    def test_parse_bad_text(self) -> None:
        """Bad text messages raise FoxgloveError with a code per kind of mistake."""
        cases = {
            b"not json": "bad_json",
            b"\xff\xfe": "bad_json",
            b"[1]": "not_object",
            b"{}": "missing_op",
            b'{"op":5}': "missing_op",
            b'{"op":"launch"}': "unknown_op",
            b'{"op":"getParameters","parameterNames":[]}': "unsupported_op",
            b'{"op":"subscribe"}': "bad_request",
            b'{"op":"subscribe","subscriptions":[1]}': "bad_request",
            b'{"op":"subscribe","subscriptions":[{"id":true,"channelId":1}]}': "bad_request",
            b'{"op":"subscribe","subscriptions":[{"id":-1,"channelId":1}]}': "bad_request",
            b'{"op":"subscribe","subscriptions":[{"id":4294967296,"channelId":1}]}': "bad_request",
            b'{"op":"subscribe","subscriptions":[{"id":1,"channelId":"1"}]}': "bad_request",
            b'{"op":"unsubscribe","subscriptionIds":[1.5]}': "bad_request",
            b'{"op":"advertise","channels":[{"id":1,"topic":5,"encoding":"json"}]}': "bad_request",
            b'{"op":"unadvertise","channelIds":"1"}': "bad_request",
        }
        for payload, code in cases.items():
            with self.assertRaises(fg.FoxgloveError, msg=payload) as cm:
                fg.parse_client_text(payload)
            self.assertEqual(cm.exception.code, code, payload)

    def test_parse_binary(self) -> None:
        """clientMessageData: opcode 0x01 + u32 LE channel id + payload; garbage is bad_frame."""
        self.assertEqual(fg.parse_client_binary(b"\x01\x02\x00\x00\x00{}"), (2, b"{}"))
        self.assertEqual(fg.parse_client_binary(b"\x01\x02\x00\x00\x00"), (2, b""))
        for garbage in (b"", b"\x01", b"\x01\x00\x00\x00", b"\x02\x01\x00\x00\x00{}", b"\xff" * 100):
            with self.assertRaises(fg.FoxgloveError) as cm:
                fg.parse_client_binary(garbage)
            self.assertEqual(cm.exception.code, "bad_frame")

    def test_twist_mapping(self) -> None:
        """y = linear.x, x = -angular.z, clamped to [-1, 1]; missing parts are 0."""
        self.assertEqual(
            fg.twist_to_robot_move(
                {"linear": {"x": 0.5, "y": 0, "z": 0}, "angular": {"x": 0, "y": 0, "z": 0.25}}
            ),
            {"type": "robot_move", "x": -0.25, "y": 0.5},
        )
        self.assertEqual(
            fg.twist_to_robot_move({"linear": {"x": 3}, "angular": {"z": -7}}),
            {"type": "robot_move", "x": 1.0, "y": 1.0},
        )
        self.assertEqual(fg.twist_to_robot_move({}), {"type": "robot_move", "x": 0.0, "y": 0.0})
        for bad in ([], {"linear": 1}, {"linear": {"x": "fast"}}, {"angular": {"z": True}}):
            with self.assertRaises(fg.FoxgloveError):
                fg.twist_to_robot_move(bad)
        with self.assertRaises(fg.FoxgloveError):
            fg.twist_to_robot_move({"linear": {"x": float("nan")}})

    def test_point_cloud(self) -> None:
        """A scan becomes a foxglove.PointCloud in metres: 90 deg ahead (+x), 0 deg right (-y)."""
        body = {
            "data_points": [
                {"angle": 90, "distance_cm": 100},
                {"angle": 0, "distance_cm": 50},
                {"angle": 45, "distance_cm": -1},
                {"angle": "x", "distance_cm": 1},
                7,
            ]
        }
        points = fg.scan_points(body)
        self.assertEqual(points, [(90.0, 100.0), (0.0, 50.0)])
        self.assertIsNone(fg.scan_points({"data_points": "no"}))
        assert points is not None
        pc = fg.scan_point_cloud(points, "robot_01", 1_500_000_001)
        self.assertEqual(pc["timestamp"], {"sec": 1, "nsec": 500_000_001})
        self.assertEqual(pc["frame_id"], "robot_01")
        self.assertEqual(pc["point_stride"], 16)
        self.assertEqual([f["name"] for f in pc["fields"]], ["x", "y", "z", "distance"])
        raw = base64.b64decode(pc["data"])
        self.assertEqual(len(raw), 32)
        x0, y0, z0, d0 = struct.unpack_from("<ffff", raw, 0)
        x1, y1, _, d1 = struct.unpack_from("<ffff", raw, 16)
        self.assertAlmostEqual(x0, 1.0, places=5)
        self.assertAlmostEqual(y0, 0.0, places=5)
        self.assertEqual((z0, d0), (0.0, 1.0))
        self.assertAlmostEqual(x1, 0.0, places=5)
        self.assertAlmostEqual(y1, -0.5, places=5)
        self.assertAlmostEqual(d1, 0.5, places=5)


# --- server --------------------------------------------------------------------------------------


class Client(WebSocketClientProtocol):
    """Records JSON ops and binary messages; ``closed`` is (wasClean, code, reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[dict[str, Any]] = []
        self.binary: list[bytes] = []
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.binary.append(payload)
        else:
            self.ops.append(orjson.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)

    def send_op(self, obj: Any) -> None:
        self.sendMessage(orjson.dumps(obj))

    def take(self) -> list[dict[str, Any]]:
        out, self.ops = self.ops, []
        return out

    def take_data(self) -> list[tuple[int, int, Any]]:
        """Binary messageData received since last time, as (subscription id, ns, decoded payload)."""
        out = []
        for b in self.binary:
            assert b[0] == 1, b
            sub_id, ns = struct.unpack_from("<IQ", b, 1)
            out.append((sub_id, ns, orjson.loads(b[13:])))
        self.binary = []
        return out

    def statuses(self) -> list[dict[str, Any]]:
        return [op for op in self.take() if op["op"] == "status"]


class Pumper:
    """Moves bytes between memory transports and runs due calls on the fake clock."""

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


@attrs.define(eq=False)
class FakeLink:
    """A robot on another face: records the commands the hub delivers."""

    face: str = "botlink"
    commands: list[Command] = attrs.Factory(list)

    def deliver(self, command: Command) -> Deferred[Any] | None:
        self.commands.append(command)
        return succeed(None)

    def close_link(self, code: str, message: str) -> None:
        pass


class Face:
    """A hub and a FoxgloveFactory on a MemoryReactorClock; clients through the memory agent."""

    def __init__(self, testcase: unittest.SynchronousTestCase, **sections: dict[str, Any]) -> None:
        overrides: dict[str, dict[str, Any]] = {"hub": {"state_dir": testcase.mktemp(), "name": "test-hub"}}
        for name, values in sections.items():
            overrides.setdefault(name, {}).update(values)
        self.config = load_config(environ={}, overrides=overrides)
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.hub = Hub(self.config, self.clock)
        self.factory = FoxgloveFactory(self.hub, self.clock)
        self.servers: list[FoxgloveProtocol] = []
        self.pumper = Pumper(self.clock)
        self.agent = create_memory_agent(self.clock, self.pumper, self._server)
        self.links: dict[str, FakeLink] = {}
        testcase.addCleanup(self.factory.shutdown)

    def _server(self) -> FoxgloveProtocol:
        proto = self.factory.buildProtocol(PEER)
        assert isinstance(proto, FoxgloveProtocol)
        self.servers.append(proto)
        return proto

    def open(self, query: str = "", **options: Any) -> list[Any]:
        options.setdefault("protocols", SUB)
        results: list[Any] = []
        self.agent.open(f"ws://localhost:8765/{query}", options, Client).addBoth(results.append)
        self.flush()
        return results

    def connect(self, query: str = "", **options: Any) -> Client:
        results = self.open(query, **options)
        assert results and isinstance(results[0], Client), f"connection failed: {results}"
        return results[0]  # type: ignore[no-any-return]

    def refused(self, query: str = "", **options: Any) -> str:
        results = self.open(query, **options)
        assert not results, f"connection was not refused: {results}"
        client = self.pumper.pumps[-1].client
        client = getattr(client, "_wrappedProtocol", client)
        assert isinstance(client, Client) and client.closed is not None
        return str(client.wasNotCleanReason)

    def client(self) -> Client:
        """A connected client with serverInfo and the first advertise taken."""
        c = self.connect()
        c.take()
        return c

    def robot(self, device_id: str = "robot_01") -> FakeLink:
        link = FakeLink()
        self.links[device_id] = link
        self.hub.connect(link, device_id, face="botlink", role="robot", address="127.0.0.1:1")
        return link

    def send(self, device_id: str, mtype: str, **fields: Any) -> dict[str, Any]:
        dev = self.hub.registry.get(device_id)
        assert dev is not None
        body = {"type": mtype, **fields}
        self.hub.ingest(dev, Message(mtype, body, device_id, self.clock.seconds()))
        self.flush()
        return body

    def down(self, device_id: str) -> None:
        self.hub.disconnect(self.links[device_id], device_id)
        self.flush()

    def flush(self) -> None:
        self.pumper.flush()

    def channel(self, topic: str) -> int:
        for ch in self.factory.manager.channels.values():
            if ch.channel.topic == topic:
                return ch.channel.id
        raise AssertionError(f"no channel {topic}")


def advertised(ops: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """topic -> channel from every advertise in ``ops``."""
    return {c["topic"]: c for op in ops if op["op"] == "advertise" for c in op["channels"]}


class HandshakeTests(unittest.SynchronousTestCase):
    """Opening a connection: subprotocol, serverInfo, advertise, limits, deadline."""

    def test_server_info_then_advertise(self) -> None:
        """A client gets serverInfo (hub name, clientPublish, json) then one advertise of every channel."""
        face = Face(self)
        face.robot()
        face.send("robot_01", "telemetry", battery=90)
        c = face.connect()
        self.assertEqual(c.websocket_protocol_in_use, fg.SUBPROTOCOL)
        ops = c.take()
        self.assertEqual(ops[0]["op"], "serverInfo")
        self.assertEqual(ops[0]["name"], "test-hub")
        self.assertEqual(ops[0]["capabilities"], ["clientPublish"])
        self.assertEqual(ops[0]["supportedEncodings"], ["json"])
        self.assertIn("sessionId", ops[0])
        self.assertEqual(ops[1]["op"], "advertise")
        self.assertEqual([ch["topic"] for ch in ops[1]["channels"]], ["/robot_01/telemetry"])
        self.assertEqual(len(ops), 2)
        self.assertEqual(face.hub.stats.connections, {"foxglove": 1})

    def test_empty_advertise_when_no_channels(self) -> None:
        """With no data yet the first advertise is empty (spec: at least one advertise on connect)."""
        face = Face(self)
        ops = face.connect().take()
        self.assertEqual(ops[1], {"op": "advertise", "channels": []})

    def test_subprotocol_required(self) -> None:
        """A client that does not offer foxglove.websocket.v1 is refused with 400, counted."""
        face = Face(self)
        self.assertIn("400", face.refused(protocols=["other"]))
        self.assertEqual(face.hub.stats.errors.get("bad_subprotocol"), 1)

    def test_max_clients(self) -> None:
        """Beyond foxglove.max_clients a client is refused with 503; a slot frees on close."""
        face = Face(self, foxglove={"max_clients": 2})
        a = face.client()
        face.client()
        self.assertIn("503", face.refused())
        self.assertEqual(face.hub.stats.errors.get("too_many_clients"), 1)
        a.sendClose()
        face.flush()
        face.client()

    def test_handshake_deadline(self) -> None:
        """A TCP connection that never completes the handshake is dropped after handshake_timeout."""
        face = Face(self, foxglove={"handshake_timeout": 5})
        proto = face.factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        face.clock.advance(4)
        self.assertFalse(transport.disconnecting)
        face.clock.advance(2)
        self.assertTrue(transport.disconnecting)


class ChannelTests(unittest.SynchronousTestCase):
    """Channels per (device, type), subscribe/unsubscribe, messageData, unadvertise."""

    def test_channel_per_device_and_type(self) -> None:
        """New data advertises /<device>/<type> with robonet.<type> JSON Schema to every client."""
        face = Face(self)
        c1, c2 = face.client(), face.client()
        face.robot()
        face.send("robot_01", "telemetry", battery=90)
        face.send("robot_01", "telemetry", battery=89)
        face.send("robot_01", "custom_thing", v=1)
        for c in (c1, c2):
            chans = advertised(c.take())
            self.assertEqual(sorted(chans), ["/robot_01/custom_thing", "/robot_01/telemetry"])
            tele = chans["/robot_01/telemetry"]
            self.assertEqual(tele["encoding"], "json")
            self.assertEqual(tele["schemaName"], "robonet.telemetry")
            self.assertEqual(tele["schemaEncoding"], "jsonschema")
            self.assertIn("battery", orjson.loads(tele["schema"])["properties"])
            self.assertEqual(orjson.loads(chans["/robot_01/custom_thing"]["schema"])["type"], "object")

    def test_subscribe_gets_latest_then_stream(self) -> None:
        """Subscribing sends the newest value at once, then every message, with receive time in ns."""
        face = Face(self)
        c = face.client()
        face.robot()
        face.send("robot_01", "telemetry", battery=90)
        cid = face.channel("/robot_01/telemetry")
        c.take()
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 7, "channelId": cid}]})
        face.flush()
        self.assertEqual(c.take_data(), [(7, int(T0 * 1e9), {"type": "telemetry", "battery": 90})])
        face.clock.advance(0.25)
        body = face.send("robot_01", "telemetry", battery=88, cpu=12.5)
        self.assertEqual(c.take_data(), [(7, int((T0 + 0.25) * 1e9), body)])
        self.assertEqual(c.take(), [])

    def test_only_subscribed_channels_flow(self) -> None:
        """Messages go only to clients subscribed to that channel; unsubscribe stops them."""
        face = Face(self)
        c, other = face.client(), face.client()
        face.robot()
        face.send("robot_01", "telemetry", battery=90)
        face.send("robot_01", "system_status", status="ok")
        cid = face.channel("/robot_01/telemetry")
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 1, "channelId": cid}]})
        face.flush()
        c.take_data()
        face.send("robot_01", "system_status", status="still ok")
        face.send("robot_01", "telemetry", battery=80)
        self.assertEqual([d[2]["battery"] for d in c.take_data()], [80])
        self.assertEqual(other.take_data(), [])
        c.send_op({"op": "unsubscribe", "subscriptionIds": [1]})
        face.flush()
        face.send("robot_01", "telemetry", battery=70)
        self.assertEqual(c.take_data(), [])
        self.assertEqual(c.statuses(), [])

    def test_scan_point_cloud_channel(self) -> None:
        """A scan opens /<id>/sensor_data and /<id>/sensor_data/points (foxglove.PointCloud)."""
        face = Face(self)
        c = face.client()
        face.robot()
        face.send("robot_01", "sensor_data", data_points=[{"angle": 90, "distance_cm": 200}])
        chans = advertised(c.take())
        self.assertEqual(chans["/robot_01/sensor_data"]["schemaName"], "robonet.sensor_data")
        pts = chans["/robot_01/sensor_data/points"]
        self.assertEqual(pts["schemaName"], "foxglove.PointCloud")
        self.assertEqual(orjson.loads(pts["schema"])["properties"]["data"]["contentEncoding"], "base64")
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 2, "channelId": pts["id"]}]})
        face.flush()
        c.take_data()
        face.send("robot_01", "sensor_data", data_points=[{"angle": 90, "distance_cm": 150}])
        [(sub, _, pc)] = c.take_data()
        self.assertEqual((sub, pc["frame_id"], pc["point_stride"]), (2, "robot_01", 16))
        x, y, _z, d = struct.unpack("<ffff", base64.b64decode(pc["data"]))
        self.assertAlmostEqual(x, 1.5, places=5)
        self.assertAlmostEqual(d, 1.5, places=5)

    def test_unadvertise_on_device_down(self) -> None:
        """device_down unadvertises the device's channels and ends subscriptions; back = new ids."""
        face = Face(self)
        c = face.client()
        face.robot("robot_01")
        face.robot("robot_02")
        face.send("robot_01", "telemetry", battery=90)
        face.send("robot_02", "telemetry", battery=50)
        old = face.channel("/robot_01/telemetry")
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 1, "channelId": old}]})
        face.flush()
        c.take()
        c.take_data()
        face.down("robot_01")
        self.assertEqual(c.take(), [{"op": "unadvertise", "channelIds": [old]}])
        face.robot("robot_01")
        face.send("robot_01", "telemetry", battery=91)
        new = face.channel("/robot_01/telemetry")
        self.assertNotEqual(new, old)
        self.assertEqual(c.take_data(), [])
        self.assertEqual(advertised(c.take())["/robot_01/telemetry"]["id"], new)
        # the subscription id is free again
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 1, "channelId": new}]})
        face.flush()
        self.assertEqual(len(c.take_data()), 1)
        self.assertEqual(c.statuses(), [])

    def test_max_channels(self) -> None:
        """Beyond foxglove.max_channels data of new channels is dropped and counted."""
        face = Face(self, foxglove={"max_channels": 2})
        c = face.client()
        face.robot()
        for t in ("a", "b", "c"):
            face.send("robot_01", t, v=1)
        self.assertEqual(sorted(advertised(c.take())), ["/robot_01/a", "/robot_01/b"])
        self.assertEqual(face.hub.stats.drops.get("foxglove_channels_full"), 1)


class BadInputTests(unittest.SynchronousTestCase):
    """Every mistake gets a status of level error on that connection, is counted, and the
    connection keeps working."""

    def assertError(self, face: Face, c: Client, code: str, text: str) -> None:
        face.flush()
        statuses = c.statuses()
        self.assertEqual(len(statuses), 1, statuses)
        self.assertEqual(statuses[0]["level"], fg.ERROR)
        self.assertIn(text, statuses[0]["message"])
        self.assertGreaterEqual(face.hub.stats.errors.get(code, 0), 1, face.hub.stats.errors)

    def still_works(self, face: Face, c: Client) -> None:
        face.robot("robot_ok")
        face.send("robot_ok", "telemetry", battery=1)
        cid = face.channel("/robot_ok/telemetry")
        c.take()
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 999, "channelId": cid}]})
        face.flush()
        self.assertEqual(len(c.take_data()), 1)
        self.assertIsNone(c.closed)

    def test_bad_messages(self) -> None:
        """Unknown op, non-JSON, arrays, unsupported ops, binary garbage: status errors, counted."""
        face = Face(self)
        c = face.client()
        cases: list[tuple[bytes, bool, str, str]] = [
            (b'{"op":"launch"}', False, "unknown_op", "unknown op"),
            (b"hello", False, "bad_json", "not valid JSON"),
            (b"[]", False, "not_object", "JSON object"),
            (b'{"op":"fetchAsset","uri":"x","requestId":1}', False, "unsupported_op", "not supported"),
            (b"\x07garbage", True, "bad_frame", "opcode"),
            (b"\x01", True, "bad_frame", "too short"),
            (b"\x01\x09\x00\x00\x00{}", True, "unknown_channel", "not advertised"),
        ]
        for payload, binary, code, text in cases:
            c.sendMessage(payload, isBinary=binary)
            self.assertError(face, c, code, text)
        self.still_works(face, c)
        self.assertEqual(len(face.factory.manager.clients), 1)

    def test_subscribe_errors(self) -> None:
        """Unknown channel, a reused subscription id, a second subscription of one channel."""
        face = Face(self)
        c = face.client()
        face.robot()
        face.send("robot_01", "telemetry", battery=90)
        cid = face.channel("/robot_01/telemetry")
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 1, "channelId": 12345}]})
        self.assertError(face, c, "unknown_channel", "unknown channel 12345")
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 1, "channelId": cid}]})
        face.flush()
        c.take_data()
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 1, "channelId": cid}]})
        self.assertError(face, c, "subscription_in_use", "already in use")
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 2, "channelId": cid}]})
        self.assertError(face, c, "already_subscribed", "already subscribed")
        c.send_op({"op": "unsubscribe", "subscriptionIds": [55]})
        self.assertError(face, c, "unknown_subscription", "unknown subscription 55")
        face.send("robot_01", "telemetry", battery=1)
        self.assertEqual([d[0] for d in c.take_data()], [1])

    def test_oversized_frame_closes_1009(self) -> None:
        """A frame over foxglove.max_message closes that client with 1009; others are untouched."""
        face = Face(self, foxglove={"max_message": 1024})
        big, other = face.client(), face.client()
        big.sendMessage(b"x" * 2000)
        face.flush()
        assert big.closed is not None
        self.assertEqual(big.closed[1], 1009)
        self.assertIsNone(other.closed)
        self.assertEqual(len(face.factory.manager.clients), 1)
        self.still_works(face, other)


class PublishTests(unittest.SynchronousTestCase):
    """Client publish: commands through hub.command, cmd_vel, errors, deadman."""

    def advertise(self, face: Face, c: Client, topic: str, cid: int = 1, encoding: str = "json") -> None:
        c.send_op(
            {
                "op": "advertise",
                "channels": [{"id": cid, "topic": topic, "encoding": encoding, "schemaName": "x"}],
            }
        )
        face.flush()

    def publish(self, face: Face, c: Client, cid: int, obj: Any) -> None:
        c.sendMessage(b"\x01" + struct.pack("<I", cid) + orjson.dumps(obj), isBinary=True)
        face.flush()

    def test_command_to_one_robot(self) -> None:
        """/<device_id>/robot_move delivers robot_move to that robot, origin foxglove-<n>."""
        face = Face(self)
        r1, r2 = face.robot("robot_01"), face.robot("robot_02")
        c = face.client()
        self.advertise(face, c, "/robot_01/robot_move")
        self.publish(face, c, 1, {"x": 0.5, "y": -0.25})
        self.assertEqual(
            [(m.type, m.body["x"], m.body["y"], m.origin) for m in r1.commands],
            [("robot_move", 0.5, -0.25, "foxglove-1")],
        )
        self.assertEqual(r2.commands, [])
        self.assertEqual(c.statuses(), [])
        self.assertEqual(face.hub.stats.msgs_in.get("robot_move"), 1)

    def test_cmd_vel(self) -> None:
        """/cmd_vel (Twist) goes to every robot as robot_move; /<id>/cmd_vel to one robot."""
        face = Face(self)
        r1, r2 = face.robot("robot_01"), face.robot("robot_02")
        c = face.client()
        self.advertise(face, c, "/cmd_vel", 1)
        self.advertise(face, c, "/robot_02/cmd_vel", 2)
        twist = {"linear": {"x": 0.8, "y": 0, "z": 0}, "angular": {"x": 0, "y": 0, "z": 0.5}}
        self.publish(face, c, 1, twist)
        self.assertEqual([(m.body["x"], m.body["y"]) for m in r1.commands], [(-0.5, 0.8)])
        self.assertEqual([(m.body["x"], m.body["y"]) for m in r2.commands], [(-0.5, 0.8)])
        self.publish(face, c, 2, twist)
        self.assertEqual((len(r1.commands), len(r2.commands)), (1, 2))
        self.assertEqual(r2.commands[-1].type, "robot_move")
        self.publish(face, c, 2, {"linear": "fast"})
        self.assertEqual(c.statuses()[0]["level"], fg.ERROR)

    def test_publish_errors(self) -> None:
        """Bad topics, encodings, reused ids, non-object payloads and offline targets: status errors."""
        face = Face(self)
        c = face.client()
        self.advertise(face, c, "/robot_01/self_destruct")
        self.assertIn("cannot publish", c.statuses()[0]["message"])
        self.advertise(face, c, "/a/b/c")
        self.assertIn("cannot publish", c.statuses()[0]["message"])
        self.advertise(face, c, "/robot_01/robot_move", encoding="protobuf")
        self.assertIn("encoding", c.statuses()[0]["message"])
        self.advertise(face, c, "/ghost/robot_move", 1)
        self.advertise(face, c, "/ghost/robot_move", 1)
        self.assertIn("already advertised", c.statuses()[0]["message"])
        self.publish(face, c, 1, [1, 2])
        self.assertIn("JSON object", c.statuses()[0]["message"])
        c.sendMessage(b"\x01\x01\x00\x00\x00{nope", isBinary=True)
        face.flush()
        self.assertIn("not valid JSON", c.statuses()[0]["message"])
        self.publish(face, c, 1, {"x": 0.1, "y": 0.1})
        [st] = c.statuses()
        self.assertIn("device_offline", st["message"])
        errors = face.hub.stats.errors
        for code in (
            "bad_topic",
            "unsupported_encoding",
            "channel_in_use",
            "not_object",
            "bad_json",
            "device_offline",
        ):
            self.assertGreaterEqual(errors.get(code, 0), 1, code)
        c.send_op({"op": "unadvertise", "channelIds": [9]})
        face.flush()
        self.assertIn("unknown client channel 9", c.statuses()[0]["message"])

    def test_max_client_channels(self) -> None:
        """A client may advertise at most foxglove.max_client_channels channels."""
        face = Face(self, foxglove={"max_client_channels": 1})
        c = face.client()
        self.advertise(face, c, "/cmd_vel", 1)
        self.advertise(face, c, "/robot_move", 2)
        self.assertIn("at most 1", c.statuses()[0]["message"])

    def test_deadman_on_disconnect_and_unadvertise(self) -> None:
        """A client that drove a robot and goes away (or unadvertises) stops it: robot_move x=0 y=0."""
        face = Face(self)
        r1 = face.robot("robot_01")
        c = face.client()
        self.advertise(face, c, "/robot_01/robot_move")
        self.publish(face, c, 1, {"x": 0.5, "y": 0.5})
        c.send_op({"op": "unadvertise", "channelIds": [1]})
        face.flush()
        self.assertEqual([(m.origin, m.body["x"], m.body["y"]) for m in r1.commands][-1], ("deadman", 0, 0))
        self.advertise(face, c, "/robot_01/robot_move", 2)
        self.publish(face, c, 2, {"x": 0.1, "y": 0.2})
        c.sendClose()
        face.flush()
        self.assertEqual([(m.origin, m.body["x"]) for m in r1.commands][-1], ("deadman", 0))
        self.assertEqual(len(r1.commands), 4)

    def test_deadman_timeout(self) -> None:
        """With teleop.deadman_ms, a robot that gets no more cmd_vel is stopped."""
        face = Face(self, teleop={"deadman_ms": 500})
        r1 = face.robot("robot_01")
        c = face.client()
        self.advertise(face, c, "/robot_01/cmd_vel")
        self.publish(face, c, 1, {"linear": {"x": 1}})
        face.clock.advance(0.6)
        face.flush()
        self.assertEqual([(m.origin, m.body["x"], m.body["y"]) for m in r1.commands][-1], ("deadman", 0, 0))


class AuthTests(unittest.SynchronousTestCase):
    """auth.mode = token: ?token= or Authorization: Bearer; refusals are status errors then 1008."""

    AUTH = {"mode": "token", "tokens": {"good": "client", "bot": "robot"}}

    def test_no_token(self) -> None:
        """Without a token: a status error saying why, no serverInfo, close 1008, counted."""
        face = Face(self, auth=self.AUTH)
        c = face.connect()
        ops = c.take()
        self.assertEqual([op["op"] for op in ops], ["status"])
        self.assertEqual(ops[0]["level"], fg.ERROR)
        self.assertIn("unauthorized", ops[0]["message"])
        assert c.closed is not None
        self.assertEqual(c.closed[1], 1008)
        self.assertEqual(face.hub.stats.errors.get("unauthorized"), 1)
        self.assertEqual(face.factory.manager.clients, {})
        self.assertEqual(face.factory.admitted, 0)

    def test_wrong_and_robot_tokens(self) -> None:
        """A wrong token and a robot's token are refused the same way."""
        face = Face(self, auth=self.AUTH)
        for query in ("?token=bad", "?token=bot"):
            c = face.connect(query)
            self.assertIn("unauthorized", c.take()[0]["message"])
            self.assertIsNotNone(c.closed)

    def test_query_and_bearer_tokens(self) -> None:
        """?token= and Authorization: Bearer both let a client in."""
        face = Face(self, auth=self.AUTH)
        self.assertEqual(face.connect("?token=good").take()[0]["op"], "serverInfo")
        c = face.connect(headers={"Authorization": "Bearer good"})
        self.assertEqual(c.take()[0]["op"], "serverInfo")
        self.assertIsNone(c.closed)


class SlowClientTests(unittest.SynchronousTestCase):
    """A client that never reads: output conflated per channel, bounded, closed after slow_timeout."""

    def test_never_reads(self) -> None:
        """While paused, telemetry is conflated to one message per channel; closed 1008 when stalled."""
        face = Face(self, foxglove={"slow_timeout": 5, "max_queue_bytes": 4096})
        c, fast = face.client(), face.client()
        face.robot()
        face.send("robot_01", "telemetry", battery=90)
        cid = face.channel("/robot_01/telemetry")
        for client in (c, fast):
            client.send_op({"op": "subscribe", "subscriptions": [{"id": 1, "channelId": cid}]})
        face.flush()
        c.take_data()
        fast.take_data()
        slow_server = face.servers[0]
        slow_server.pauseProducing()
        for i in range(1000):
            face.send("robot_01", "telemetry", battery=i % 100, pad="x" * 100)
        q = slow_server.queue
        assert q is not None
        self.assertLess(q.queued_bytes, 4096)
        self.assertEqual(len(fast.take_data()), 1000)
        self.assertGreaterEqual(face.hub.stats.drops.get("slow_conflated", 0), 999)
        face.clock.advance(6)
        face.flush()
        self.assertEqual(face.hub.stats.drops.get("slow_subscriber_closed"), 1)
        self.assertTrue(q.closed)
        self.assertIsNone(fast.closed)

    def test_resume_sends_newest(self) -> None:
        """A client that pauses and resumes gets the newest value of each channel."""
        face = Face(self)
        c = face.client()
        face.robot()
        face.send("robot_01", "telemetry", battery=90)
        cid = face.channel("/robot_01/telemetry")
        c.send_op({"op": "subscribe", "subscriptions": [{"id": 1, "channelId": cid}]})
        face.flush()
        c.take_data()
        server = face.servers[0]
        server.pauseProducing()
        for i in range(10):
            face.send("robot_01", "telemetry", battery=i)
        server.resumeProducing()
        face.flush()
        self.assertEqual([d[2]["battery"] for d in c.take_data()], [9])


class TapTests(unittest.SynchronousTestCase):
    """--foxglove on the command line."""

    def test_option(self) -> None:
        """--foxglove sets foxglove.listen (repeatable); none disables the face."""
        opts = Options()
        opts.parseOptions(["--state-dir", self.mktemp(), "--foxglove", "tcp:1234", "--foxglove", "tcp:1235"])
        assert opts.config is not None
        self.assertEqual(opts.config.foxglove.listen, ("tcp:1234", "tcp:1235"))
        opts = Options()
        opts.parseOptions(["--state-dir", self.mktemp(), "--foxglove", "none"])
        assert opts.config is not None
        self.assertEqual(opts.config.foxglove.listen, ())
        self.assertEqual(load_config(environ={}).foxglove.listen, ("tcp:8765",))

    def test_schemas_topics(self) -> None:
        """The point-cloud topic is not a /<device>/<type> topic a client could publish on."""
        self.assertIsNone(schemas.parse_topic(schemas.points_topic_for("r")))
        self.assertEqual(schemas.point_cloud_schema().name, "foxglove.PointCloud")
