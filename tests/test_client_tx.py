"""Tests for robonet.client.tx (Twisted bot-link client) over iosim fake connections."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from robonet.client import AuthError, ChecksumError, RemoteError
from robonet.client.tx import (
    BotLinkClientProtocol,
    LegacyPollProtocol,
    LegacySendProtocol,
    connect_bot,
)
from robonet.protocols.botlink import FrameDecoder, additive_sum, encode_frame, legacy_ack


class FakeHub(Protocol):
    """Server side: welcomes a hello, then answers per ``mode``; records every frame."""

    def __init__(self, mode: str = "ack", hello_reply: dict[str, Any] | None = None) -> None:
        self.mode = mode
        self.hello_reply = hello_reply
        self.frames: list[dict[str, Any]] = []
        self.payloads: list[bytes] = []
        self.raw = b""
        self.decoder = FrameDecoder(1 << 20)
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        for payload in self.decoder.feed(data):
            msg = orjson.loads(payload)
            self.frames.append(msg)
            self.payloads.append(payload)
            self.answer(msg, payload)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True

    def send(self, obj: dict[str, Any]) -> bytes:
        payload = orjson.dumps(obj)
        self.transport.write(encode_frame(payload))  # type: ignore[union-attr]
        return payload

    def answer(self, msg: dict[str, Any], payload: bytes) -> None:
        t = msg.get("type")
        if t == "hello":
            self.send(
                self.hello_reply
                or {
                    "type": "welcome",
                    "proto": 1,
                    "session": "s",
                    "heartbeat_s": 10,
                    "device_id": msg.get("device_id") or "client-1",
                }
            )
            if self.hello_reply and self.hello_reply.get("type") == "error":
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if t == "ack" or "id" not in msg:
            return
        if t == "request":
            if msg["endpoint"] == "echo":
                self.send({"type": "response", "id": msg["id"], "status": "success", "data": msg["data"]})
            else:
                self.send(
                    {
                        "type": "response",
                        "id": msg["id"],
                        "status": "error",
                        "code": "unknown_endpoint",
                        "message": "no",
                    }
                )
        elif self.mode == "ack":
            self.send({"type": "ack", "id": msg["id"], "sum": additive_sum(payload)})
        elif self.mode == "badsum":
            self.send({"type": "ack", "id": msg["id"], "sum": 1})
        elif self.mode == "error":
            self.send({"type": "error", "code": "device_offline", "message": "gone", "ref": msg["id"]})


def pair(
    hub: FakeHub | None = None, clock: Clock | None = None, **kw: Any
) -> tuple[BotLinkClientProtocol, FakeHub, Any, Clock]:
    clock = clock or Clock()
    hub = hub or FakeHub()
    kw.setdefault("hello", {"type": "hello", "proto": 1, "role": "robot", "device_id": "robot_01"})
    client, server, pump = connectedServerAndClient(
        lambda: hub, lambda: BotLinkClientProtocol(clock=clock, **kw)
    )
    return client, server, pump, clock


def result(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


class WelcomeTests(SynchronousTestCase):
    def test_hello_then_welcome(self) -> None:
        """The client sends the hello first; whenWelcomed fires with the welcome."""
        client, hub, pump, _ = pair()
        self.assertEqual(hub.frames[0]["type"], "hello")
        self.assertEqual(self.successResultOf(client.whenWelcomed())["device_id"], "robot_01")

    def test_auth_failed(self) -> None:
        """An auth_failed reply fails whenWelcomed with AuthError and the link closes."""
        hub = FakeHub(hello_reply={"type": "error", "code": "auth_failed", "message": "bad token"})
        client, hub, pump, _ = pair(hub)
        pump.flush()
        self.failureResultOf(client.whenWelcomed(), AuthError)
        self.assertTrue(hub.lost)


class SendTests(SynchronousTestCase):
    def test_ack_verified(self) -> None:
        """send(ack=True) fires with the ack when its sum matches the payload sent."""
        client, hub, pump, _ = pair()
        d = client.send({"type": "telemetry", "battery": 80.5}, ack=True)
        pump.flush()
        ack = self.successResultOf(d)
        self.assertEqual(ack["sum"], additive_sum(hub.payloads[-1]))
        self.assertEqual(hub.frames[-1]["battery"], 80.5)

    def test_checksum_mismatch(self) -> None:
        """A wrong sum fails the Deferred with ChecksumError."""
        client, hub, pump, _ = pair(FakeHub(mode="badsum"))
        d = client.send({"type": "telemetry"}, ack=True)
        pump.flush()
        self.failureResultOf(d, ChecksumError)

    def test_error_with_ref(self) -> None:
        """An error frame referring to the id fails the Deferred with RemoteError."""
        client, hub, pump, _ = pair(FakeHub(mode="error"))
        d = client.command("robot_move", "robot_07", x=1, y=0)
        pump.flush()
        f = self.failureResultOf(d, RemoteError)
        self.assertEqual(f.value.code, "device_offline")
        self.assertEqual(hub.frames[-1]["device_id"], "robot_07")

    def test_timeout(self) -> None:
        """Without an ack within ack_timeout the Deferred fails with TimeoutError."""
        client, hub, pump, clock = pair(FakeHub(mode="silent"), ack_timeout=3.0)
        d = client.send({"type": "telemetry"}, ack=True)
        pump.flush()
        self.assertNoResult(d)
        clock.advance(3.0)
        self.failureResultOf(d, TimeoutError)

    def test_connection_lost_fails_pending(self) -> None:
        """Waiting sends fail with ConnectionError when the link drops."""
        client, hub, pump, _ = pair(FakeHub(mode="silent"))
        d = client.send({"type": "telemetry"}, ack=True)
        pump.flush()
        hub.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.failureResultOf(d, ConnectionError)
        self.failureResultOf(client.send({"type": "x"}), ConnectionError)

    def test_fire_and_forget(self) -> None:
        """send() without ack writes the message without an id and fires with None."""
        client, hub, pump, _ = pair()
        self.assertIsNone(self.successResultOf(client.send({"type": "telemetry", "cpu": 1})))
        pump.flush()
        self.assertEqual(hub.frames[-1], {"type": "telemetry", "cpu": 1})

    def test_request(self) -> None:
        """request() fires with the response data, or fails with RemoteError for an error response."""
        client, hub, pump, _ = pair()
        ok = client.request("echo", {"a": 1})
        bad = client.request("nope")
        pump.flush()
        self.assertEqual(self.successResultOf(ok), {"a": 1})
        self.assertEqual(self.failureResultOf(bad, RemoteError).value.code, "unknown_endpoint")


class IncomingTests(SynchronousTestCase):
    def test_command_acked_after_callback(self) -> None:
        """A command is passed to on_command and acked (with its sum) when the Deferred fires."""
        gate: Deferred[None] = Deferred()
        seen: list[dict[str, Any]] = []

        def on_command(msg: dict[str, Any]) -> Deferred[None]:
            seen.append(msg)
            return gate

        client, hub, pump, _ = pair(on_command=on_command)
        payload = hub.send({"type": "set_speed", "id": 9, "value": 60})
        pump.flush()
        self.assertEqual(seen[0]["value"], 60)
        self.assertFalse([f for f in hub.frames if f["type"] == "ack"])
        gate.callback(None)
        pump.flush()
        self.assertEqual(hub.frames[-1], {"type": "ack", "id": 9, "sum": additive_sum(payload)})

    def test_failing_command(self) -> None:
        """A failing on_command answers with an internal error referring to the command."""

        def on_command(msg: dict[str, Any]) -> None:
            raise ValueError("no motor")

        client, hub, pump, _ = pair(on_command=on_command)
        hub.send({"type": "robot_move", "id": 4, "x": 1, "y": 1})
        pump.flush()
        self.assertEqual(
            {k: hub.frames[-1][k] for k in ("type", "code", "ref")},
            {"type": "error", "code": "internal", "ref": 4},
        )
        self.flushLoggedErrors(ValueError)

    def test_ping_acked_and_messages(self) -> None:
        """Pings are acked; other frames reach on_message."""
        seen: list[dict[str, Any]] = []
        client, hub, pump, _ = pair(on_message=seen.append)
        payload = hub.send({"type": "ping", "id": 5})
        hub.send({"type": "telemetry_update", "device_id": "r2"})
        pump.flush()
        self.assertEqual(hub.frames[-1], {"type": "ack", "id": 5, "sum": additive_sum(payload)})
        self.assertEqual(seen, [{"type": "telemetry_update", "device_id": "r2"}])

    def test_garbage_ignored(self) -> None:
        """Non-JSON frames from the hub are ignored and the link keeps working."""
        client, hub, pump, _ = pair()
        hub.transport.write(encode_frame(b"{nope"))  # type: ignore[union-attr]
        d = client.send({"type": "telemetry"}, ack=True)
        pump.flush()
        self.successResultOf(d)

    def test_oversized_frame_closes(self) -> None:
        """A length prefix over max_frame closes the connection."""
        client, hub, pump, _ = pair()
        hub.transport.write(b"\xff\xff\xff\xff")  # type: ignore[union-attr]
        pump.flush()
        self.assertTrue(hub.lost)

    def test_heartbeat_ping_when_idle(self) -> None:
        """An idle client pings the hub every heartbeat_s/2."""
        client, hub, pump, clock = pair()
        clock.advance(5.0)
        pump.flush()
        self.assertEqual(hub.frames[-1]["type"], "ping")


class ConnectBotTests(SynchronousTestCase):
    def test_reconnects_and_keeps_assigned_id(self) -> None:
        """connect_bot's ClientService fires whenConnected after the welcome and reconnects after a drop,
        saying hello again with the id the hub assigned."""
        reactor = MemoryReactorClock()
        hubs: list[FakeHub] = []

        def make_hub() -> FakeHub:
            hubs.append(FakeHub())
            return hubs[-1]

        TCP4ServerEndpoint(reactor, 5100).listen(Factory.forProtocol(make_hub))  # type: ignore[arg-type]
        welcomes: list[str] = []
        svc = connect_bot(
            reactor,
            TCP4ClientEndpoint(reactor, "127.0.0.1", 5100),
            {"type": "hello", "proto": 1, "role": "client"},
            clock=reactor,
            on_welcome=lambda p, w: welcomes.append(w["device_id"]),
        )
        svc.startService()
        self.addCleanup(svc.stopService)
        completer = ConnectionCompleter(reactor)
        pump = completer.succeedOnce()
        assert pump is not None
        pump.flush()
        proto = self.successResultOf(svc.whenConnected())
        self.assertEqual(welcomes, ["client-1"])
        proto.transport.loseConnection()
        pump.flush()
        reactor.advance(60)
        pump2 = completer.succeedOnce()
        assert pump2 is not None
        pump2.flush()
        self.assertEqual(hubs[1].frames[0]["device_id"], "client-1")
        self.assertEqual(welcomes, ["client-1", "client-1"])


class ReplacedTests(SynchronousTestCase):
    def test_replaced_stops_service(self) -> None:
        """When the hub says "replaced", connect_bot's service stops instead of reconnecting."""
        reactor = MemoryReactorClock()
        hubs: list[FakeHub] = []
        factory = Factory.forProtocol(lambda: hubs.append(FakeHub()) or hubs[-1])  # type: ignore
        TCP4ServerEndpoint(reactor, 5100).listen(factory)
        hello = {"type": "hello", "proto": 1, "role": "robot", "device_id": "robot_01"}
        svc = connect_bot(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", 5100), hello, clock=reactor)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        completer = ConnectionCompleter(reactor)
        pump = completer.succeedOnce()
        assert pump is not None
        pump.flush()
        hubs[0].send({"type": "error", "code": "replaced", "message": "elsewhere", "ref": None})
        hubs[0].transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertFalse(svc.running)
        reactor.advance(120)
        self.assertIsNone(completer.succeedOnce())


class LegacyTests(SynchronousTestCase):
    def test_legacy_send_ack(self) -> None:
        """LegacySendProtocol writes one frame and succeeds on the matching 8-byte ACK."""
        proto = LegacySendProtocol(b'{"type":"sensor_data"}')

        class Hub(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(legacy_ack(data[4:]))  # type: ignore[union-attr]

        pump = connectedServerAndClient(Hub, lambda: proto)[2]
        pump.flush()
        self.assertIsNone(self.successResultOf(proto.done))

    def test_legacy_send_bad_ack(self) -> None:
        """A wrong ACK fails with ChecksumError; a close before 8 bytes with ConnectionError."""
        bad = LegacySendProtocol(b'{"type":"x"}')

        class BadHub(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"\x00\x00\x00\x01ACK\x00")  # type: ignore[union-attr]

        connectedServerAndClient(BadHub, lambda: bad)[2].flush()
        self.failureResultOf(bad.done, ChecksumError)

        short = LegacySendProtocol(b'{"type":"x"}')

        class ShortHub(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"\x00\x00")  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

        connectedServerAndClient(ShortHub, lambda: short)[2].flush()
        self.failureResultOf(short.done, ConnectionError)

    def test_legacy_poll(self) -> None:
        """LegacyPollProtocol sends raw REQUEST_INSTRUCTION and fires with the frame, or None on close."""
        got: list[bytes] = []
        poll = LegacyPollProtocol()

        class Hub(Protocol):
            def dataReceived(self, data: bytes) -> None:
                got.append(data)
                self.transport.write(encode_frame(b'{"type":"trial_response","message":"START"}'))  # type: ignore

        connectedServerAndClient(Hub, lambda: poll)[2].flush()
        self.assertEqual(got, [b"REQUEST_INSTRUCTION"])
        self.assertEqual(self.successResultOf(poll.done), {"type": "trial_response", "message": "START"})

        empty = LegacyPollProtocol()

        class Closer(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.loseConnection()  # type: ignore[union-attr]

        connectedServerAndClient(Closer, lambda: empty)[2].flush()
        self.assertIsNone(self.successResultOf(empty.done))


class LegacyFunctionTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.internet.protocol import ServerFactory

        self.reactor = MemoryReactorClock()
        self.hubs: list[Protocol] = []
        self.hub_class: type[Protocol] = Protocol
        factory = ServerFactory()
        factory.buildProtocol = lambda addr: self.hubs.append(self.hub_class()) or self.hubs[-1]  # type: ignore
        TCP4ServerEndpoint(self.reactor, 5100).listen(factory)
        self.endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 5100)
        self.completer = ConnectionCompleter(self.reactor)

    def test_legacy_send_times_out_unconnected(self) -> None:
        """legacy_send fails with TimeoutError when the connection never completes."""
        from robonet.client.tx import legacy_send

        d = legacy_send(self.endpoint, {"type": "x"}, clock=self.reactor, timeout=2.0)
        self.assertNoResult(d)
        self.reactor.advance(2.0)
        self.failureResultOf(d, TimeoutError)

    def test_legacy_send_times_out_without_ack(self) -> None:
        """legacy_send fails with TimeoutError when no ACK comes, and aborts the connection."""
        from robonet.client.tx import legacy_send

        d = legacy_send(self.endpoint, {"type": "x"}, clock=self.reactor, timeout=2.0)
        pump = self.completer.succeedOnce()
        assert pump is not None
        pump.flush()
        self.reactor.advance(2.0)
        pump.flush()
        self.failureResultOf(d, TimeoutError)

    def test_legacy_poll_none_after_wait(self) -> None:
        """legacy_poll fires with None after ``wait`` seconds without an instruction."""
        from robonet.client.tx import legacy_poll

        d = legacy_poll(self.endpoint, clock=self.reactor, wait=15.0)
        pump = self.completer.succeedOnce()
        assert pump is not None
        pump.flush()
        self.assertNoResult(d)
        self.reactor.advance(15.0)
        self.assertIsNone(self.successResultOf(d))

    def test_legacy_send_refused(self) -> None:
        """legacy_send fails with the connect error when the hub refuses."""
        from robonet.client.tx import legacy_send

        d = legacy_send(self.endpoint, {"type": "x"}, clock=self.reactor, timeout=2.0)
        self.completer.failOnce()
        from twisted.internet.error import ConnectionRefusedError as Refused

        self.failureResultOf(d, Refused)
