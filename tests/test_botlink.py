"""Unit tests for the bot link's native dialect (spec/botlink.md): hello, acks, requests, commands,
heartbeats, timeouts, replacement, the per-IP cap, auth and store-batched acks.

Every test builds a fresh protocol from the real :class:`BotLinkFactory` over a real :class:`Hub`
with a :class:`task.Clock`; the wire is a :class:`StringTransport`. The helpers here
(:func:`make_hub`, :class:`Wire`, :class:`FakeStore`) are shared with the legacy and framing tests.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import orjson
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import robonet
from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import HubError
from robonet.protocols.botlink import BotLinkFactory, BotLinkProtocol, FrameDecoder, encode_frame

ROBOT_IP = "192.0.2.10"
CLIENT_IP = "192.0.2.20"


def checksum(payload: bytes) -> int:
    """The spec's additive checksum, computed independently of robonet's own helper."""
    return sum(payload) % 2**32


class FakeBatch:
    """A store batch: callers wait with ``when_committed``; the test settles it."""

    def __init__(self) -> None:
        self.waiters: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def when_committed(self, ok: Any, failed: Any, *args: Any) -> None:
        self.waiters.append((ok, failed, args))

    def commit(self) -> None:
        waiters, self.waiters = self.waiters, []
        for ok, _failed, args in waiters:
            ok(*args)

    def fail(self, failure: Failure) -> None:
        waiters, self.waiters = self.waiters, []
        for _ok, failed, args in waiters:
            failed(failure, *args)


class FakeStore:
    """A TelemetryStore stand-in: ``append`` records the row and returns the current batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, dict[str, Any], bytes | None]] = []
        self.batch = FakeBatch()

    def append(self, device_id: str, mtype: str, at: float, body: dict[str, Any], raw: bytes | None) -> Any:
        self.rows.append((device_id, mtype, at, body, raw))
        return self.batch

    def next_batch(self) -> FakeBatch:
        self.batch = FakeBatch()
        return self.batch


def make_hub(
    testcase: SynchronousTestCase,
    *,
    botlink: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    hub: dict[str, Any] | None = None,
    store: Any = None,
) -> tuple[Hub, BotLinkFactory, task.Clock]:
    """A real Hub (config from ``overrides`` only, no environment) and the real bot-link factory."""
    clock = task.Clock()
    clock.advance(1_700_000_000.0)
    overrides: dict[str, dict[str, Any]] = {"hub": {"state_dir": testcase.mktemp(), **(hub or {})}}
    if botlink:
        overrides["botlink"] = botlink
    if auth:
        overrides["auth"] = auth
    config = load_config(environ={}, overrides=overrides)
    the_hub = Hub(config, clock, store=store)
    return the_hub, BotLinkFactory(the_hub, config.botlink, clock, config.auth), clock


class Wire:
    """One fake TCP connection to a fresh protocol built by ``factory``; decodes what it writes."""

    def __init__(self, factory: BotLinkFactory, ip: str = ROBOT_IP, port: int | None = None) -> None:
        self.addr = IPv4Address("TCP", ip, port or next(_ports))
        self.proto = factory.buildProtocol(self.addr)
        self.transport = StringTransport(peerAddress=self.addr)
        self.proto.makeConnection(self.transport)
        self._decoder = FrameDecoder(2**32 - 1)
        self.lost = False
        self.welcome: dict[str, Any] | None = None

    def raw(self, data: bytes) -> None:
        """Deliver ``data`` as one read."""
        self.proto.dataReceived(data)

    def send(self, obj: Any) -> bytes:
        """Send ``obj`` as one frame; returns the JSON payload sent."""
        payload = orjson.dumps(obj)
        self.proto.dataReceived(encode_frame(payload))
        return payload

    def written(self) -> bytes:
        """Raw bytes written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def frames(self) -> list[dict[str, Any]]:
        """Frames written since the last call, decoded."""
        return [orjson.loads(p) for p in self._decoder.feed(self.written())]

    def one(self) -> dict[str, Any]:
        """Exactly one frame was written since the last call: return it."""
        frames = self.frames()
        assert len(frames) == 1, frames
        return frames[0]

    def hello(self, **fields: Any) -> dict[str, Any]:
        """Say hello (``proto`` 1); returns the welcome."""
        obj = {"type": "hello", "proto": 1, **fields}
        self.send(obj)
        reply = self.one()
        assert reply["type"] == "welcome", reply
        self.welcome = reply
        return reply

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame the protocol holds."""
        assert isinstance(self.proto, BotLinkProtocol)
        return self.proto._decoder.pending

    @property
    def closed(self) -> bool:
        """The protocol asked its transport to close."""
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """Deliver connectionLost (what the reactor does after loseConnection or a peer close)."""
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(ConnectionDone()))


_ports = itertools.count(40000)


class HelloTests(SynchronousTestCase):
    """The hello/welcome exchange (spec section 1)."""

    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)

    def test_welcome_fields(self) -> None:
        """The welcome has proto, a uuid4 session, the server identity, heartbeat, max_frame, device_id."""
        w = Wire(self.factory)
        welcome = w.hello(role="robot", device_id="robot_01", name="Robot 1")
        self.assertEqual(
            set(welcome), {"type", "proto", "session", "server", "heartbeat_s", "max_frame", "device_id"}
        )
        self.assertEqual(welcome["proto"], 1)
        self.assertEqual(uuid.UUID(welcome["session"]).version, 4)
        self.assertEqual(
            welcome["server"],
            {"id": self.hub.node.node_id, "name": self.hub.node.name, "version": robonet.__version__},
        )
        self.assertEqual(welcome["heartbeat_s"], 10)
        self.assertEqual(welcome["max_frame"], 1048576)
        self.assertEqual(welcome["device_id"], "robot_01")
        self.assertFalse(w.closed)

    def test_sessions_differ(self) -> None:
        """Each connection gets its own session id."""
        a = Wire(self.factory).hello(device_id="a")
        b = Wire(self.factory).hello(device_id="b")
        self.assertNotEqual(a["session"], b["session"])

    def test_device_registered(self) -> None:
        """After the welcome the device is online in the registry with its face, role, name and address."""
        w = Wire(self.factory, port=41234)
        w.hello(role="robot", device_id="robot_01", name="Robot 1")
        dev = self.hub.registry.get("robot_01")
        assert dev is not None
        self.assertEqual(
            (dev.status, dev.face, dev.role, dev.name, dev.address, dev.dialect),
            ("online", "botlink", "robot", "Robot 1", f"{ROBOT_IP}:41234", "robonet/1"),
        )
        self.assertIs(dev.link, w.proto)

    def test_assigned_device_id(self) -> None:
        """A hello without device_id gets a fresh id in the welcome, registered; role defaults to client."""
        a = Wire(self.factory).hello()
        b = Wire(self.factory).hello()
        self.assertTrue(a["device_id"])
        self.assertNotEqual(a["device_id"], b["device_id"])
        dev = self.hub.registry.get(a["device_id"])
        assert dev is not None
        self.assertEqual((dev.role, dev.status), ("client", "online"))

    def test_proto_unsupported(self) -> None:
        """A hello with proto 2 gets proto_unsupported and the connection closes; no device is registered."""
        w = Wire(self.factory)
        w.send({"type": "hello", "proto": 2, "role": "robot", "device_id": "r"})
        err = w.one()
        self.assertEqual((err["type"], err["code"]), ("error", "proto_unsupported"))
        self.assertTrue(w.closed)
        self.assertIsNone(self.hub.registry.get("r"))
        self.assertEqual(self.hub.stats.errors.get("proto_unsupported"), 1)

    def test_proto_must_be_integer_one(self) -> None:
        """proto true or 1.0 is not the integer 1: proto_unsupported and close."""
        for proto in (True, 1.0, "1"):
            w = Wire(self.factory)
            w.send({"type": "hello", "proto": proto, "role": "robot", "device_id": "r"})
            self.assertEqual(w.one()["code"], "proto_unsupported")
            self.assertTrue(w.closed)

    def test_bad_role(self) -> None:
        """A hello with an unknown role gets bad_hello and close."""
        w = Wire(self.factory)
        w.send({"type": "hello", "proto": 1, "role": "overlord", "device_id": "r"})
        err = w.one()
        self.assertEqual((err["type"], err["code"]), ("error", "bad_hello"))
        self.assertTrue(w.closed)
        self.assertIsNone(self.hub.registry.get("r"))

    def test_bad_device_id(self) -> None:
        """device_id must be a string of 1..128 characters: otherwise bad_hello and close."""
        for bad in (5, "", "x" * 129, ["a"]):
            w = Wire(self.factory)
            w.send({"type": "hello", "proto": 1, "role": "robot", "device_id": bad})
            self.assertEqual(w.one()["code"], "bad_hello", bad)
            self.assertTrue(w.closed)
        w = Wire(self.factory)
        self.assertEqual(w.hello(device_id="x" * 128)["device_id"], "x" * 128)

    def test_second_hello(self) -> None:
        """A second hello on a welcomed link is an error (bad_hello with its ref); the link stays open."""
        w = Wire(self.factory)
        w.hello(device_id="r")
        w.send({"type": "hello", "proto": 1, "id": 4})
        err = w.one()
        self.assertEqual((err["code"], err["ref"]), ("bad_hello", 4))
        self.assertFalse(w.closed)

    def test_peer_without_acceptor(self) -> None:
        """role=peer on a hub that does not accept peer links is refused with bad_hello."""
        w = Wire(self.factory)
        w.send({"type": "hello", "proto": 1, "role": "peer", "device_id": "hub-2"})
        self.assertEqual(w.one()["code"], "bad_hello")
        self.assertTrue(w.closed)

    def test_hello_timeout(self) -> None:
        """A connection that sends nothing is closed with an error once hello_timeout passes, and counted."""
        w = Wire(self.factory)
        self.clock.advance(9.9)
        self.assertFalse(w.closed)
        self.clock.advance(0.1)
        err = w.one()
        self.assertEqual((err["type"], err["code"]), ("error", "bad_hello"))
        self.assertTrue(w.closed)
        self.assertEqual(self.hub.stats.errors.get("bad_hello"), 1)

    def test_partial_hello_times_out(self) -> None:
        """A hello frame that never completes is closed at hello_timeout, and its bytes dropped."""
        w = Wire(self.factory)
        w.raw(encode_frame(b'{"type":"hello","proto":1}')[:10])
        self.clock.advance(10)
        self.assertTrue(w.closed)
        self.assertEqual(w.one()["code"], "bad_hello")

    def test_hello_cancels_timeout(self) -> None:
        """A welcomed connection is not closed at hello_timeout."""
        w = Wire(self.factory)
        w.hello(device_id="r")
        self.clock.advance(15)
        self.assertFalse(w.closed)
        self.assertEqual(w.frames(), [])


class AuthTests(SynchronousTestCase):
    """auth.mode = token: hello needs a token granting its role; nothing else before the welcome."""

    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(
            self,
            auth={"mode": "token", "tokens": {"robot-tok": "robot", "client-tok": "client", "adm": "admin"}},
        )

    def test_good_token(self) -> None:
        """A hello with a token for its role is welcomed."""
        w = Wire(self.factory)
        w.hello(role="robot", device_id="r", token="robot-tok")
        self.assertTrue(self.hub.registry.get("r").online)  # type: ignore[union-attr]

    def test_admin_token_any_role(self) -> None:
        """A token granting admin is accepted for any role."""
        Wire(self.factory).hello(role="robot", device_id="r", token="adm")
        Wire(self.factory).hello(role="client", device_id="c", token="adm")

    def test_auth_failed(self) -> None:
        """A wrong, missing, non-string or other-role token gets auth_failed and close; no device."""
        for token in ("nope", None, 7, "client-tok"):
            w = Wire(self.factory)
            hello: dict[str, Any] = {"type": "hello", "proto": 1, "role": "robot", "device_id": "r"}
            if token is not None:
                hello["token"] = token
            w.send(hello)
            err = w.one()
            self.assertEqual((err["type"], err["code"]), ("error", "auth_failed"), token)
            self.assertTrue(w.closed)
            self.assertIsNone(self.hub.registry.get("r"))
        self.assertEqual(self.hub.stats.errors["auth_failed"], 4)

    def test_data_before_hello_unauthorized(self) -> None:
        """Telemetry before hello: unauthorized (ref = its id) and close, never an ack; nothing ingested."""
        w = Wire(self.factory)
        w.send({"type": "telemetry", "id": 3, "battery": 50})
        err = w.one()
        self.assertEqual((err["type"], err["code"], err["ref"]), ("error", "unauthorized", 3))
        self.assertTrue(w.closed)
        self.assertEqual(self.hub.registry.devices(), [])
        self.assertNotIn("telemetry", self.hub.stats.msgs_in)

    def test_garbage_before_hello_unauthorized(self) -> None:
        """With auth on, invalid JSON or a non-object before hello is refused and closed, not kept open."""
        for payload in (b"\xff\xfe", b"[1]", b"null"):
            w = Wire(self.factory)
            w.raw(encode_frame(payload))
            err = w.one()
            self.assertEqual((err["code"], err["ref"]), ("unauthorized", None))
            self.assertTrue(w.closed)

    def test_command_before_hello_unauthorized(self) -> None:
        """A command before hello is refused with unauthorized and never reaches a robot."""
        robot = Wire(self.factory)
        robot.hello(role="robot", device_id="r", token="robot-tok")
        w = Wire(self.factory, ip=CLIENT_IP)
        w.send({"type": "robot_move", "id": 1, "device_id": "r", "x": 1})
        self.assertEqual(w.one()["code"], "unauthorized")
        self.assertTrue(w.closed)
        self.assertEqual(robot.frames(), [])

    def test_frames_after_refusal_ignored(self) -> None:
        """Frames that follow a refused frame in the same read are not processed."""
        w = Wire(self.factory)
        w.raw(
            encode_frame(orjson.dumps({"type": "telemetry", "id": 1}))
            + encode_frame(orjson.dumps({"type": "hello", "proto": 1, "token": "adm", "device_id": "x"}))
        )
        frames = w.frames()
        self.assertEqual([f["code"] for f in frames], ["unauthorized"])
        self.assertIsNone(self.hub.registry.get("x"))

    def test_legacy_poll_unauthorized(self) -> None:
        """A Cartobot poll from an IP not named in legacy_names is refused when auth is on."""
        w = Wire(self.factory)
        w.raw(b"REQUEST_INSTRUCTION")
        self.assertEqual(w.one()["code"], "unauthorized")
        self.assertTrue(w.closed)


class AckTests(SynchronousTestCase):
    """Acks with the additive checksum (spec section 3) and content errors (section 7)."""

    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)
        self.w = Wire(self.factory)
        self.w.hello(role="robot", device_id="robot_01")

    def test_ack_sum(self) -> None:
        """A frame with an id is acked with that id and sum = sum(payload bytes) mod 2**32."""
        payload = self.w.send(
            {"type": "telemetry", "id": 7, "battery": 85.0, "cpu": 45.2, "temperature": 34.8, "signal": 89.5}
        )
        self.assertEqual(self.w.one(), {"type": "ack", "id": 7, "sum": checksum(payload)})

    def test_ack_sum_non_ascii(self) -> None:
        """The checksum is over the UTF-8 bytes as received (not the characters)."""
        payload = '{"type":"status","id":1,"message":"Grüße ✓ 日本"}'.encode()
        self.w.raw(encode_frame(payload))
        self.assertEqual(self.w.one(), {"type": "ack", "id": 1, "sum": checksum(payload)})

    def test_ack_sum_wraps(self) -> None:
        """The checksum wraps modulo 2**32 (a payload whose byte sum exceeds it)."""
        big = b'{"type":"blob","id":2,"x":"' + b"\xc3\xbf" * 11_200_000 + b'"}'
        factory = make_hub(self, botlink={"max_frame": 32 * 1024 * 1024})[1]
        w = Wire(factory)
        w.hello(device_id="r")
        w.raw(encode_frame(big))
        ack = w.one()
        self.assertGreater(sum(big), 2**32)
        self.assertEqual(ack["sum"], checksum(big))

    def test_no_id_no_ack(self) -> None:
        """A frame without id is processed (latest value updated) but not acknowledged."""
        self.w.send({"type": "telemetry", "battery": 12})
        self.assertEqual(self.w.written(), b"")
        self.assertEqual(self.hub.registry.field("robot_01.battery"), 12)

    def test_frames_in_one_read(self) -> None:
        """Several frames in one read are all acked, in order, in one write."""
        payloads = [orjson.dumps({"type": "telemetry", "id": i, "battery": i}) for i in range(5)]
        writes: list[bytes] = []
        real_write = self.w.transport.write

        def write(data: bytes) -> None:
            writes.append(data)
            real_write(data)

        self.w.transport.write = write  # type: ignore[method-assign]
        self.w.raw(b"".join(encode_frame(p) for p in payloads))
        self.assertEqual(
            self.w.frames(), [{"type": "ack", "id": i, "sum": checksum(p)} for i, p in enumerate(payloads)]
        )
        self.assertEqual(len(writes), 1)

    def test_ingested(self) -> None:
        """Acked data updates the device's latest values and the stats counters."""
        self.w.send({"type": "telemetry", "id": 1, "battery": 85.0})
        dev = self.hub.registry.get("robot_01")
        assert dev is not None
        self.assertEqual(dev.latest["telemetry"], {"type": "telemetry", "id": 1, "battery": 85.0})
        self.assertEqual(self.hub.stats.msgs_in["telemetry"], 1)
        self.assertEqual(self.hub.stats.msgs_out["ack"], 1)

    def test_callbacks_run_before_ack(self) -> None:
        """Registered callbacks for the type have run when the ack is written."""
        seen: list[tuple[int, bytes]] = []
        self.hub.register_callback(
            "sensor_data",
            lambda msg, dev: seen.append((msg.id, self.w.transport.value())),  # type: ignore[arg-type]
        )
        self.w.send({"type": "sensor_data", "id": 9})
        self.assertEqual(seen, [(9, b"")])
        self.assertEqual(self.w.one()["id"], 9)

    def test_bad_ids(self) -> None:
        """An id that is not an integer 0..2**53 gets bad_frame (ref null) and no ack; the link stays open."""
        for bad in (-1, 2**53 + 1, "7", 1.5, True):
            self.w.send({"type": "telemetry", "id": bad})
            err = self.w.one()
            self.assertEqual((err["type"], err["code"], err["ref"]), ("error", "bad_frame", None), bad)
        self.w.send({"type": "telemetry", "id": 2**53})
        self.assertEqual(self.w.one()["type"], "ack")
        self.assertFalse(self.w.closed)

    def test_content_errors_keep_connection(self) -> None:
        """bad_json, not_object, missing_type: an error frame, never an ack; later frames are acked."""
        cases = [
            (b"{nope", "bad_json", None),
            (b'{"type":"x","v":"\xff\xfe"}', "bad_json", None),
            (b"[]", "not_object", None),
            (b"1", "not_object", None),
            (b'"x"', "not_object", None),
            (b"null", "not_object", None),
            (b'{"id":3}', "missing_type", 3),
            (b'{"id":4,"type":5}', "missing_type", 4),
        ]
        for payload, code, ref in cases:
            self.w.raw(encode_frame(payload))
            err = self.w.one()
            self.assertEqual((err["type"], err["code"], err["ref"]), ("error", code, ref), payload)
            self.assertTrue(err["message"])
        self.assertFalse(self.w.closed)
        payload = self.w.send({"type": "telemetry", "id": 8})
        self.assertEqual(self.w.one(), {"type": "ack", "id": 8, "sum": checksum(payload)})
        self.assertEqual(self.hub.stats.errors["bad_json"], 2)
        self.assertEqual(self.hub.stats.errors["not_object"], 4)
        self.assertEqual(self.hub.stats.errors["missing_type"], 2)

    def test_deep_nesting(self) -> None:
        """JSON nested deeper than orjson's limit is bad_json, and the link stays usable."""
        self.w.raw(encode_frame(b"[" * 100_000))
        self.assertEqual(self.w.one()["code"], "bad_json")
        self.w.send({"type": "telemetry", "id": 1})
        self.assertEqual(self.w.one()["type"], "ack")

    def test_heartbeat_ping(self) -> None:
        """A ping with an id is acked with its checksum; a ping without id is not answered."""
        payload = self.w.send({"type": "ping", "id": 9})
        self.assertEqual(self.w.one(), {"type": "ack", "id": 9, "sum": checksum(payload)})
        self.w.send({"type": "ping"})
        self.assertEqual(self.w.written(), b"")

    def test_stray_ack_ignored(self) -> None:
        """An ack for an id the hub never sent is ignored (no reply, no close)."""
        self.w.send({"type": "ack", "id": 999, "sum": 1})
        self.w.send({"type": "error", "code": "busy", "ref": 999})
        self.assertEqual(self.w.written(), b"")
        self.assertFalse(self.w.closed)


class IdleTests(SynchronousTestCase):
    """idle_timeout (spec section 6)."""

    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)

    def test_idle_timeout(self) -> None:
        """No frame for idle_timeout closes the link with an idle_timeout error; a frame restarts the wait."""
        w = Wire(self.factory)
        w.hello(role="robot", device_id="r")
        self.clock.advance(20)
        w.send({"type": "ping"})
        self.clock.advance(29.9)
        self.assertFalse(w.closed)
        self.clock.advance(0.1)
        err = w.one()
        self.assertEqual((err["type"], err["code"]), ("error", "idle_timeout"))
        self.assertTrue(w.closed)
        self.assertEqual(self.hub.stats.errors["idle_timeout"], 1)
        w.lose()
        self.assertEqual(self.hub.registry.get("r").status, "offline")  # type: ignore[union-attr]

    def test_partial_frame_does_not_count(self) -> None:
        """Bytes of a frame that never completes do not keep the link alive."""
        w = Wire(self.factory)
        w.hello(device_id="r")
        self.clock.advance(15)
        w.raw(b"\x00\x00\x00\x10{")
        self.clock.advance(15)
        self.assertTrue(w.closed)
        self.assertEqual(w.one()["code"], "idle_timeout")

    def test_configured_idle_timeout(self) -> None:
        """botlink.idle_timeout is honoured."""
        _hub, factory, clock = make_hub(self, botlink={"idle_timeout": 3, "hello_timeout": 100})
        w = Wire(factory)
        w.hello(device_id="r")
        clock.advance(2.9)
        self.assertFalse(w.closed)
        clock.advance(0.1)
        self.assertTrue(w.closed)


class RequestTests(SynchronousTestCase):
    """Requests to endpoints (spec section 5)."""

    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)
        self.robot = Wire(self.factory)
        self.robot.hello(role="robot", device_id="robot_01", name="R1")
        self.robot.send({"type": "telemetry", "battery": 80})
        self.w = Wire(self.factory, ip=CLIENT_IP)
        self.w.hello(role="client", device_id="script")

    def request(self, endpoint: Any, data: Any = None, rid: int = 3) -> dict[str, Any]:
        self.w.send({"type": "request", "id": rid, "endpoint": endpoint, "data": data})
        reply = self.w.one()
        self.assertEqual((reply["type"], reply["id"]), ("response", rid))
        return reply

    def ok(self, endpoint: str, data: Any = None) -> Any:
        reply = self.request(endpoint, data)
        self.assertEqual(reply["status"], "success", reply)
        self.assertEqual(set(reply), {"type", "id", "status", "data"})
        return reply["data"]

    def test_ping(self) -> None:
        """ping answers pong with the server time."""
        data = self.ok("ping")
        self.assertTrue(data["pong"])
        self.assertTrue(data["server_time"].startswith("2023-11-14T22:13:20"))

    def test_echo(self) -> None:
        """echo returns its data unchanged."""
        self.assertEqual(self.ok("echo", {"a": [1, 2, {"b": None}]}), {"a": [1, 2, {"b": None}]})

    def test_status(self) -> None:
        """status reports the node and the online counts."""
        data = self.ok("status")
        self.assertEqual(data["server_id"], self.hub.node.node_id)
        self.assertEqual(data["version"], robonet.__version__)
        self.assertEqual((data["devices_online"], data["robots_online"], data["client_count"]), (2, 1, 2))

    def test_info(self) -> None:
        """info lists proto 1, every built-in endpoint and the command types."""
        data = self.ok("info")
        self.assertEqual(data["proto"], 1)
        self.assertEqual(data["server_id"], self.hub.node.node_id)
        for name in ("ping", "echo", "status", "info", "devices", "stats", "peer_list"):
            self.assertIn(name, data["endpoints"])
        self.assertIn("robot_move", data["commands"])
        self.assertIn("robonet/1", data["protocols"])

    def test_devices(self) -> None:
        """devices lists device records (with latest values); data.role filters."""
        data = self.ok("devices")
        self.assertEqual(data["count"], 2)
        robot = next(d for d in data["devices"] if d["device_id"] == "robot_01")
        for key in (
            "device_id",
            "name",
            "face",
            "role",
            "address",
            "status",
            "hub",
            "connected_at",
            "last_seen",
            "latest",
            "latest_at",
        ):
            self.assertIn(key, robot)
        self.assertEqual((robot["name"], robot["face"], robot["status"]), ("R1", "botlink", "online"))
        self.assertEqual(robot["latest"]["telemetry"]["battery"], 80)
        only = self.ok("devices", {"role": "robot"})
        self.assertEqual([d["device_id"] for d in only["devices"]], ["robot_01"])

    def test_stats(self) -> None:
        """stats counts messages in/out, errors and online devices."""
        self.w.raw(encode_frame(b"nope"))
        self.w.frames()
        data = self.ok("stats")
        self.assertEqual(data["messages_in"]["telemetry"], 1)
        self.assertEqual(data["errors"]["bad_json"], 1)
        self.assertEqual(data["devices"]["online"], 2)
        self.assertEqual(data["devices"]["by_role"], {"robot": 1, "client": 1})
        self.assertEqual(data["connections"], {"botlink": 2})

    def test_peer_list(self) -> None:
        """peer_list is empty without federation."""
        self.assertEqual(self.ok("peer_list"), {"peers": []})

    def test_unknown_endpoint(self) -> None:
        """An unknown endpoint gets a response with status error and code unknown_endpoint (no ack)."""
        reply = self.request("nope")
        self.assertEqual(
            (reply["status"], reply["code"], set(reply)),
            ("error", "unknown_endpoint", {"type", "id", "status", "code", "message"}),
        )
        self.assertIn("nope", reply["message"])
        self.assertEqual(self.hub.stats.errors["unknown_endpoint"], 1)
        self.assertFalse(self.w.closed)

    def test_endpoint_not_string(self) -> None:
        """A request whose endpoint is missing or not a string gets unknown_endpoint."""
        self.assertEqual(self.request(None)["code"], "unknown_endpoint")
        self.assertEqual(self.request(["ping"])["code"], "unknown_endpoint")

    def test_deferred_endpoint(self) -> None:
        """An endpoint returning a Deferred is answered when it fires."""
        d: defer.Deferred[Any] = defer.Deferred()
        self.hub.register_endpoint("slow", lambda data, origin: d)
        self.w.send({"type": "request", "id": 5, "endpoint": "slow"})
        self.assertEqual(self.w.written(), b"")
        d.callback({"done": True})
        self.assertEqual(
            self.w.one(), {"type": "response", "id": 5, "status": "success", "data": {"done": True}}
        )

    def test_endpoint_origin(self) -> None:
        """The endpoint sees the requesting device's id as origin."""
        self.hub.register_endpoint("whoami", lambda data, origin: origin)
        self.assertEqual(self.ok("whoami"), "script")

    def test_endpoint_crash(self) -> None:
        """A raising endpoint gives an internal error response; the link stays open."""

        def boom(data: Any, origin: str) -> Any:
            raise ValueError("kaput")

        self.hub.register_endpoint("boom", boom)
        reply = self.request("boom")
        self.assertEqual((reply["status"], reply["code"]), ("error", "internal"))
        self.flushLoggedErrors(ValueError)
        self.assertFalse(self.w.closed)

    def test_endpoint_hub_error(self) -> None:
        """An endpoint failing with HubError answers with that code."""
        self.hub.register_endpoint("deny", lambda data, origin: defer.fail(HubError("rate_limited", "later")))
        reply = self.request("deny")
        self.assertEqual((reply["code"], reply["message"]), ("rate_limited", "later"))

    def test_unserialisable_result(self) -> None:
        """A result that is not JSON-serialisable becomes an internal error response."""
        self.hub.register_endpoint("odd", lambda data, origin: {"x": object()})
        self.assertEqual(self.request("odd")["code"], "internal")

    def test_request_closed_before_answer(self) -> None:
        """A response for a connection that has gone is dropped without error."""
        d: defer.Deferred[Any] = defer.Deferred()
        self.hub.register_endpoint("slow", lambda data, origin: d)
        self.w.send({"type": "request", "id": 5, "endpoint": "slow"})
        self.w.lose()
        d.callback(1)
        self.assertEqual(self.w.written(), b"")


class CommandTests(SynchronousTestCase):
    """Commands from clients to robots (spec section 4; ARCHITECTURE.md routing)."""

    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)
        self.robot = Wire(self.factory)
        self.robot.hello(role="robot", device_id="robot_01")
        self.client = Wire(self.factory, ip=CLIENT_IP)
        self.client.hello(role="client", device_id="script")

    def test_routed_and_acked(self) -> None:
        """A command reaches its robot with a fresh id; the robot's ack becomes the sender's ack (own sum)."""
        payload = self.client.send({"type": "robot_move", "id": 5, "device_id": "robot_01", "x": 0.5, "y": 0})
        cmd = self.robot.one()
        self.assertEqual(
            {k: cmd[k] for k in ("type", "x", "y", "device_id")},
            {"type": "robot_move", "x": 0.5, "y": 0, "device_id": "robot_01"},
        )
        self.assertIsInstance(cmd["id"], int)
        self.assertTrue(cmd["timestamp"].startswith("2023-11-14T22:13:20"))
        self.assertEqual(self.client.written(), b"")
        self.robot.send({"type": "ack", "id": cmd["id"], "sum": 0})
        self.assertEqual(self.client.one(), {"type": "ack", "id": 5, "sum": checksum(payload)})
        self.assertEqual(self.hub.stats.msgs_out["robot_move"], 1)
        self.assertEqual(self.hub.stats.ack_rtt.count, 1)

    def test_command_ids_increase(self) -> None:
        """Commands to one robot get distinct ids."""
        for i in range(3):
            self.client.send({"type": "stop", "id": i, "device_id": "robot_01"})
        ids = [f["id"] for f in self.robot.frames()]
        self.assertEqual(len(set(ids)), 3)

    def test_delivery_timeout(self) -> None:
        """A robot that does not ack within ack_timeout: the sender gets delivery_timeout with its ref."""
        self.client.send({"type": "robot_move", "id": 5, "device_id": "robot_01", "x": 1})
        cmd = self.robot.one()
        self.clock.advance(4.9)
        self.assertEqual(self.client.written(), b"")
        self.clock.advance(0.1)
        err = self.client.one()
        self.assertEqual((err["type"], err["code"], err["ref"]), ("error", "delivery_timeout", 5))
        self.assertEqual(self.hub.stats.errors["delivery_timeout"], 1)
        self.robot.send({"type": "ack", "id": cmd["id"], "sum": 0})  # late: ignored
        self.assertEqual(self.client.written(), b"")

    def test_robot_error_propagates(self) -> None:
        """A robot's error frame with ref = the command's id reaches the sender with the sender's ref."""
        self.client.send({"type": "camera_move", "id": 6, "device_id": "robot_01", "pan": 10})
        cmd = self.robot.one()
        self.robot.send({"type": "error", "code": "busy", "message": "moving", "ref": cmd["id"]})
        err = self.client.one()
        self.assertEqual((err["code"], err["ref"], err["message"]), ("busy", 6, "moving"))
        self.clock.advance(10)
        self.assertEqual(self.client.written(), b"")

    def test_robot_disconnects_pending(self) -> None:
        """A robot that disconnects with a command pending: the sender gets device_offline."""
        self.client.send({"type": "stop", "id": 2, "device_id": "robot_01"})
        self.robot.lose()
        err = self.client.one()
        self.assertEqual((err["code"], err["ref"]), ("device_offline", 2))

    def test_device_offline(self) -> None:
        """A command to an unknown or offline device gets device_offline at once."""
        self.client.send({"type": "stop", "id": 1, "device_id": "ghost"})
        self.assertEqual(self.client.one()["code"], "device_offline")
        self.robot.lose()
        self.client.send({"type": "stop", "id": 2, "device_id": "robot_01"})
        err = self.client.one()
        self.assertEqual((err["code"], err["ref"]), ("device_offline", 2))

    def test_unknown_set(self) -> None:
        """`set` with an unknown name is unknown_command."""
        self.client.send({"type": "set", "id": 1, "name": "warp", "value": 9, "device_id": "robot_01"})
        err = self.client.one()
        self.assertEqual((err["code"], err["ref"]), ("unknown_command", 1))
        self.assertEqual(self.robot.written(), b"")

    def test_set_normalised(self) -> None:
        """`set` {name: speed|brightness, value} reaches the robot as set_speed / set_brightness."""
        self.client.send({"type": "set", "id": 1, "name": "speed", "value": 50, "device_id": "robot_01"})
        cmd = self.robot.one()
        self.assertEqual((cmd["type"], cmd["value"]), ("set_speed", 50))
        self.assertNotIn("name", cmd)
        self.client.send(
            {"type": "set", "id": 2, "name": "brightness", "value": 0.3, "device_id": "robot_01"}
        )
        self.assertEqual(self.robot.one()["type"], "set_brightness")

    def test_token_not_forwarded(self) -> None:
        """Reserved sender fields (token, ts, ref) are not forwarded to the robot."""
        self.client.send(
            {"type": "stop", "id": 1, "device_id": "robot_01", "token": "t", "ts": 1.0, "ref": 3}
        )
        cmd = self.robot.one()
        for key in ("token", "ts", "ref"):
            self.assertNotIn(key, cmd)

    def test_broadcast(self) -> None:
        """A command without device_id goes to every robot; the sender is acked once all acked."""
        robot2 = Wire(self.factory, ip="192.0.2.11")
        robot2.hello(role="robot", device_id="robot_02")
        payload = self.client.send({"type": "stop", "id": 8})
        c1, c2 = self.robot.one(), robot2.one()
        self.assertEqual((c1["type"], c2["type"]), ("stop", "stop"))
        self.robot.send({"type": "ack", "id": c1["id"]})
        self.assertEqual(self.client.written(), b"")
        robot2.send({"type": "ack", "id": c2["id"]})
        self.assertEqual(self.client.one(), {"type": "ack", "id": 8, "sum": checksum(payload)})

    def test_broadcast_skips_clients_and_sender(self) -> None:
        """A broadcast reaches robots only, not clients; with no robot it is acked at once."""
        other = Wire(self.factory, ip=CLIENT_IP)
        other.hello(role="client", device_id="other")
        self.robot.lose()
        self.client.send({"type": "stop", "id": 8})
        self.assertEqual(self.client.one()["type"], "ack")
        self.assertEqual(other.written(), b"")

    def test_broadcast_partial(self) -> None:
        """A broadcast is acked if one robot acks and another times out; fails only if all fail."""
        robot2 = Wire(self.factory, ip="192.0.2.11")
        robot2.hello(role="robot", device_id="robot_02")
        self.client.send({"type": "stop", "id": 8})
        c1 = self.robot.one()
        robot2.one()
        self.robot.send({"type": "ack", "id": c1["id"]})
        self.clock.advance(5)
        self.assertEqual(self.client.one()["type"], "ack")
        self.client.send({"type": "stop", "id": 9})
        self.robot.frames()
        robot2.frames()
        self.clock.advance(5)
        err = self.client.one()
        self.assertEqual((err["code"], err["ref"]), ("delivery_timeout", 9))

    def test_command_without_id(self) -> None:
        """A command without id is delivered; the sender gets no ack but does get errors (ref null)."""
        self.client.send({"type": "stop", "device_id": "robot_01"})
        cmd = self.robot.one()
        self.robot.send({"type": "ack", "id": cmd["id"]})
        self.assertEqual(self.client.written(), b"")
        self.client.send({"type": "stop", "device_id": "ghost"})
        err = self.client.one()
        self.assertEqual((err["code"], err["ref"]), ("device_offline", None))

    def test_sender_gone(self) -> None:
        """If the sender disconnects before the robot acks, the late ack goes nowhere."""
        self.client.send({"type": "stop", "id": 1, "device_id": "robot_01"})
        cmd = self.robot.one()
        self.client.lose()
        self.robot.send({"type": "ack", "id": cmd["id"]})
        self.assertEqual(self.client.written(), b"")


class ReplaceAndCapTests(SynchronousTestCase):
    """A second connection with the same id replaces the first; per-IP connection cap."""

    def test_replaced(self) -> None:
        """The older connection gets an error with code replaced and is closed; the device stays online."""
        hub, factory, _clock = make_hub(self)
        first = Wire(factory)
        first.hello(role="robot", device_id="robot_01")
        second = Wire(factory)
        second.hello(role="robot", device_id="robot_01")
        err = first.one()
        self.assertEqual((err["type"], err["code"]), ("error", "replaced"))
        self.assertTrue(first.closed)
        self.assertFalse(second.closed)
        first.lose()
        dev = hub.registry.get("robot_01")
        assert dev is not None
        self.assertEqual((dev.status, dev.link), ("online", second.proto))
        self.assertEqual(hub.stats.errors["replaced"], 1)

    def test_replaced_commands_go_to_new_link(self) -> None:
        """After a replacement, commands reach the new connection."""
        _hub, factory, _clock = make_hub(self)
        first = Wire(factory)
        first.hello(role="robot", device_id="r")
        second = Wire(factory)
        second.hello(role="robot", device_id="r")
        first.frames()
        client = Wire(factory, ip=CLIENT_IP)
        client.hello(device_id="c")
        client.send({"type": "stop", "id": 1, "device_id": "r"})
        self.assertEqual(second.one()["type"], "stop")
        self.assertEqual(first.written(), b"")

    def test_max_per_ip(self) -> None:
        """Over max_per_ip, one IP's connections are rate_limited and closed; other IPs, freed slots work."""
        hub, factory, _clock = make_hub(self, botlink={"max_per_ip": 2})
        a, b = Wire(factory), Wire(factory)
        c = Wire(factory)
        err = c.one()
        self.assertEqual((err["type"], err["code"]), ("error", "rate_limited"))
        self.assertTrue(c.closed)
        self.assertNotIsInstance(c.proto, BotLinkProtocol)
        self.assertEqual(hub.stats.errors["rate_limited"], 1)
        other = Wire(factory, ip=CLIENT_IP)
        other.hello(device_id="x")
        a.lose()
        d = Wire(factory)
        d.hello(device_id="d")
        self.assertFalse(b.closed)

    def test_connection_counts(self) -> None:
        """stats.connections tracks open bot-link connections."""
        hub, factory, _clock = make_hub(self)
        a, b = Wire(factory), Wire(factory)
        self.assertEqual(hub.stats.connections["botlink"], 2)
        a.lose()
        b.lose()
        self.assertEqual(hub.stats.connections["botlink"], 0)
        self.assertEqual(len(factory.limiter), 0)


class StoreBatchTests(SynchronousTestCase):
    """With the store on, data is acked only after its batch is committed (HARDENING.md, store row)."""

    def setUp(self) -> None:
        self.store = FakeStore()
        self.hub, self.factory, self.clock = make_hub(self, store=self.store)
        self.w = Wire(self.factory)
        self.w.hello(role="robot", device_id="robot_01")

    def test_ack_after_commit(self) -> None:
        """No ack until when_committed fires; then every waiting ack, in order."""
        p1 = self.w.send({"type": "telemetry", "id": 1, "battery": 1})
        p2 = self.w.send({"type": "telemetry", "id": 2, "battery": 2})
        self.assertEqual(self.w.written(), b"")
        self.store.batch.commit()
        self.assertEqual(
            self.w.frames(),
            [{"type": "ack", "id": 1, "sum": checksum(p1)}, {"type": "ack", "id": 2, "sum": checksum(p2)}],
        )

    def test_rows_appended_raw(self) -> None:
        """Each data frame is appended to the store with its device, type, receive time and raw payload."""
        payload = self.w.send({"type": "telemetry", "battery": 1})
        self.assertEqual(len(self.store.rows), 1)
        device_id, mtype, at, body, raw = self.store.rows[0]
        self.assertEqual(
            (device_id, mtype, at, raw), ("robot_01", "telemetry", self.clock.seconds(), payload)
        )
        self.assertEqual(body["battery"], 1)

    def test_two_batches(self) -> None:
        """Acks wait for their own batch: committing the second batch does not ack the first's frames."""
        first = self.store.batch
        self.w.send({"type": "telemetry", "id": 1})
        second = self.store.next_batch()
        self.w.send({"type": "telemetry", "id": 2})
        second.commit()
        self.assertEqual([f["id"] for f in self.w.frames()], [2])
        first.commit()
        self.assertEqual([f["id"] for f in self.w.frames()], [1])

    def test_no_id_never_acked(self) -> None:
        """Frames without id are stored but never acked."""
        self.w.send({"type": "telemetry"})
        self.store.batch.commit()
        self.assertEqual(self.w.written(), b"")

    def test_commit_failure(self) -> None:
        """A failed commit answers each waiting frame with an internal error carrying its ref; no ack."""
        self.w.send({"type": "telemetry", "id": 1})
        self.w.send({"type": "telemetry", "id": 2})
        self.store.batch.fail(Failure(RuntimeError("disk full")))
        frames = self.w.frames()
        self.assertEqual(
            [(f["type"], f["code"], f["ref"]) for f in frames],
            [("error", "internal", 1), ("error", "internal", 2)],
        )
        self.assertEqual(self.hub.stats.errors["internal"], 2)
        self.assertFalse(self.w.closed)

    def test_closed_before_commit(self) -> None:
        """A connection that closed before the commit gets nothing written."""
        self.w.send({"type": "telemetry", "id": 1})
        self.w.lose()
        self.store.batch.commit()
        self.assertEqual(self.w.written(), b"")

    def test_ping_not_stored(self) -> None:
        """Pings and requests are answered at once and never stored."""
        self.w.send({"type": "ping", "id": 1})
        self.w.send({"type": "request", "id": 2, "endpoint": "ping"})
        self.assertEqual([f["type"] for f in self.w.frames()], ["ack", "response"])
        self.assertEqual(self.store.rows, [])


class IdleWatchTests(SynchronousTestCase):
    """The factory-wide idle timer (one DelayedCall for all connections' deadlines)."""

    def test_rewatch_does_not_hide_a_nearer_deadline(self) -> None:
        """When a due connection re-watches far ahead, a connection due a moment later still fires on time."""
        from robonet.protocols.botlink import IdleWatch

        clock = task.Clock()
        watch = IdleWatch(clock)
        fired: list[tuple[str, float]] = []

        class Conn:
            def __init__(self, name: str, again: float | None) -> None:
                self.name, self.again = name, again

            def idle_check(self, now: float) -> None:
                fired.append((self.name, now))
                if self.again is not None:
                    watch.watch(self, now + self.again)  # type: ignore[arg-type]
                    self.again = None

        watch.watch(Conn("a", 30.0), 3.0)  # type: ignore[arg-type]
        watch.watch(Conn("b", None), 3.5)  # type: ignore[arg-type]
        clock.advance(3.0)
        self.assertEqual(fired, [("a", 3.0)])
        clock.advance(0.5)
        self.assertEqual(fired, [("a", 3.0), ("b", 3.5)])
        clock.advance(29.5)
        self.assertEqual(fired[-1], ("a", 33.0))
        self.assertEqual(len(watch), 0)
        self.assertEqual(clock.getDelayedCalls(), [])


class FirstWriteTests(SynchronousTestCase):
    """The first write of a connection goes straight to a plain TCP socket (idle-connection memory)."""

    def _transport(self, send: Any, tls: bool = False) -> Any:
        from twisted.internet import tcp
        from twisted.internet.interfaces import ISSLTransport
        from zope.interface import alsoProvides

        class Sock:
            def __init__(self) -> None:
                self.sent: list[bytes] = []

            def send(self, data: bytes) -> int:
                return int(send(self, data))

        t = tcp.Connection.__new__(tcp.Connection)
        t.socket = Sock()
        t.written = []
        t.write = t.written.append
        if tls:
            alsoProvides(t, ISSLTransport)
        return t

    def test_whole_send_bypasses_the_buffer(self) -> None:
        """A send the kernel takes whole never touches transport.write."""
        from robonet.protocols.botlink import _first_write

        t = self._transport(lambda s, d: s.sent.append(d) or len(d))
        _first_write(t, b"welcome")
        self.assertEqual((t.socket.sent, t.written), ([b"welcome"], []))

    def test_partial_send_and_blocking_fall_back_in_order(self) -> None:
        """What the kernel did not take goes through transport.write, after what it took."""
        from robonet.protocols.botlink import _first_write

        t = self._transport(lambda s, d: s.sent.append(d[:3]) or 3)
        _first_write(t, b"welcome")
        self.assertEqual((t.socket.sent, t.written), ([b"wel"], [b"come"]))

        def blocked(s: Any, d: bytes) -> int:
            raise BlockingIOError()

        t = self._transport(blocked)
        _first_write(t, b"welcome")
        self.assertEqual(t.written, [b"welcome"])

    def test_tls_and_fake_transports_use_write(self) -> None:
        """TLS transports (and test transports without a socket) always use transport.write."""
        from robonet.protocols.botlink import _first_write

        t = self._transport(lambda s, d: s.sent.append(d) or len(d), tls=True)
        _first_write(t, b"welcome")
        self.assertEqual((t.socket.sent, t.written), ([], [b"welcome"]))
        st = StringTransport()
        _first_write(st, b"welcome")
        self.assertEqual(st.value(), b"welcome")
