"""Line link face (robonet/protocols/linelink.py; spec/linelink.md, docs/linelink.rst).

Every test drives a fresh protocol from the real :class:`LineLinkFactory` over a
:class:`StringTransport`, with a real :class:`Hub` and a :class:`task.Clock`; no sockets.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Event, HubError, Message, Priority, iso_utc
from robonet.protocols.botlink import additive_sum
from robonet.protocols.linelink import (
    ABORT_AFTER,
    BAD_JSON,
    BAD_UTF8,
    OBJECT,
    SERVER_FULL,
    TEXT,
    LineLinkFactory,
    LineLinkProtocol,
    LineSplitter,
    decode_line,
    encode_answer,
    encode_event,
)
from robonet.registry import Device

T0 = 1_700_000_000.0
TS = iso_utc(T0)  # "2023-11-14T22:13:20.000000+00:00"


class Transport(StringTransport):
    """StringTransport that counts write calls and records aborts."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 5555), peerAddress=IPv4Address("TCP", host, port)
        )
        self.writes = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class FakeBatch:
    """A store batch (services/store.py shape): ``when_committed(ok, failed, *args)``."""

    def __init__(self) -> None:
        self.waiters: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def when_committed(self, ok: Any, failed: Any, *args: Any) -> None:
        self.waiters.append((ok, failed, args))

    def commit(self) -> None:
        for ok, _, args in self.waiters:
            ok(*args)

    def fail(self) -> None:
        for _, failed, args in self.waiters:
            failed(Failure(RuntimeError("disk full")), *args)


class FakeStore:
    """``append`` puts every row into the current batch until :meth:`next_batch`."""

    def __init__(self) -> None:
        self.batch = FakeBatch()
        self.rows: list[tuple[Any, ...]] = []

    def append(self, device_id: str, mtype: str, at: float, body: Any, raw: Any) -> FakeBatch:
        self.rows.append((device_id, mtype, at, body, raw))
        return self.batch


class Rig:
    """A hub, a factory and a clock; ``connect`` opens one fake connection."""

    def __init__(self, store: Any = None, text_replies: Any = None, **sections: dict[str, Any]) -> None:
        sections.setdefault("line", {}).setdefault("idle_timeout", 30)
        self.config = load_config(None, environ={}, overrides=sections)
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.hub = Hub(self.config, self.clock, store=store)
        self.factory = LineLinkFactory(self.hub, self.config, self.clock, text_replies=text_replies)
        self._port = 40000

    def connect(self, host: str = "10.1.2.3") -> tuple[LineLinkProtocol, Transport]:
        self._port += 1
        addr = IPv4Address("TCP", host, self._port)
        proto = self.factory.buildProtocol(addr)
        tr = Transport(host, self._port)
        proto.makeConnection(tr)
        return proto, tr

    @staticmethod
    def drop(proto: LineLinkProtocol) -> None:
        proto.connectionLost(Failure(ConnectionDone()))


def out(tr: Transport) -> list[bytes]:
    """The lines written so far (without newlines); clears the transport."""
    data = tr.value()
    tr.clear()
    assert data == b"" or data.endswith(b"\n"), data
    return data.split(b"\n")[:-1] if data else []


def out_json(tr: Transport) -> list[Any]:
    return [orjson.loads(line) for line in out(tr)]


# --- pure parts ----------------------------------------------------------------------------------


class LineSplitterTests(SynchronousTestCase):
    def test_many_lines_in_one_read(self) -> None:
        """Every complete line of one read comes back, in order; the partial tail is kept."""
        s = LineSplitter(100)
        self.assertEqual(s.feed(b"a\nbb\nccc\ndd"), ([b"a", b"bb", b"ccc"], False))
        self.assertEqual(s.pending, 2)
        self.assertEqual(s.feed(b"dd\n"), ([b"dddd"], False))
        self.assertEqual(s.pending, 0)

    def test_byte_by_byte(self) -> None:
        """A line dribbled one byte per read is reassembled exactly."""
        s = LineSplitter(100)
        got: list[bytes] = []
        for b in b'{"x": 1}\r\nsecond\n':
            lines, over = s.feed(bytes([b]))
            self.assertFalse(over)
            got.extend(lines)
        self.assertEqual(got, [b'{"x": 1}', b"second"])

    def test_strip_and_blank(self) -> None:
        """Trailing \\r and surrounding whitespace are stripped; blank lines are dropped."""
        s = LineSplitter(100)
        self.assertEqual(s.feed(b"  hi there \r\n\r\n \t \n\nx\n"), ([b"hi there", b"x"], False))

    def test_max_line_exact_is_accepted(self) -> None:
        """A line of exactly max_line bytes is fine; one more byte is an overflow."""
        s = LineSplitter(10)
        self.assertEqual(s.feed(b"0123456789\n"), ([b"0123456789"], False))
        self.assertEqual(s.feed(b"0123456789A\n"), ([], True))

    def test_overflow_before_newline(self) -> None:
        """An over-long partial line is reported at once, without waiting for its newline."""
        s = LineSplitter(10)
        self.assertEqual(s.feed(b"012345"), ([], False))
        self.assertEqual(s.feed(b"6789AB"), ([], True))
        self.assertEqual(s.pending, 0)

    def test_lines_before_overflow_returned(self) -> None:
        """Lines before the over-long one are returned with the overflow flag."""
        s = LineSplitter(5)
        self.assertEqual(s.feed(b"ok\nthis is too long\nlater\n"), ([b"ok"], True))

    def test_tail_overflow_in_same_read(self) -> None:
        """An over-long tail after complete lines is an overflow too."""
        s = LineSplitter(5)
        self.assertEqual(s.feed(b"ok\n0123456789"), ([b"ok"], True))


class DecodeLineTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        """`{` lines are JSON objects; anything else valid UTF-8 is text (even JSON arrays/numbers)."""
        self.assertEqual(decode_line(b'{"a": 1}'), (OBJECT, {"a": 1}))
        self.assertEqual(decode_line(b"hello"), (TEXT, "hello"))
        self.assertEqual(decode_line(b"[1, 2]"), (TEXT, "[1, 2]"))
        self.assertEqual(decode_line(b"42"), (TEXT, "42"))
        self.assertEqual(decode_line("grüße".encode()), (TEXT, "grüße"))

    def test_bad(self) -> None:
        """Broken JSON, invalid UTF-8 (text or JSON) and over-deep JSON are classified as errors."""
        self.assertEqual(decode_line(b"{nope")[0], BAD_JSON)
        self.assertEqual(decode_line(b"\xff\xfe"), (BAD_UTF8, "line is not valid UTF-8"))
        self.assertEqual(decode_line(b'{"a": "\xff"}'), (BAD_UTF8, "line is not valid UTF-8"))
        self.assertEqual(decode_line(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}")[0], BAD_JSON)

    def test_encode_answer(self) -> None:
        """Answers: None/"" -> nothing; str -> one line; bytes decoded; others JSON."""
        self.assertIsNone(encode_answer(None))
        self.assertIsNone(encode_answer("  "))
        self.assertEqual(encode_answer("ok"), b"ok\n")
        self.assertEqual(encode_answer("two\nlines\r\nhere"), b"two lines here\n")
        self.assertEqual(encode_answer(b"raw"), b"raw\n")
        self.assertEqual(encode_answer({"a": [1]}), b'{"a":[1]}\n')
        self.assertRaises(TypeError, encode_answer, {1, 2})

    def test_encode_event(self) -> None:
        """Fan-out events become envelope lines; the source frame's id is never forwarded."""
        ev = Event("data", "r1", "telemetry", {"type": "telemetry", "id": 4, "battery": 80}, 5.0)
        self.assertEqual(
            orjson.loads(encode_event(ev)), {"type": "telemetry", "battery": 80, "device_id": "r1", "ts": 5.0}
        )
        st = Event("status", "r1", "device_up", {"device_id": "r1"}, 5.0, Priority.CONTROL)
        self.assertEqual(
            orjson.loads(encode_event(st)),
            {"type": "device_update", "event": "device_up", "device": {"device_id": "r1"}, "ts": 5.0},
        )


# --- witch-core dialect --------------------------------------------------------------------------


class WitchCoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig()
        self.proto, self.tr = self.rig.connect()

    def test_endpoint_success_exact(self) -> None:
        """{"endpoint","data"} -> exactly {"status":"success","data":R,"timestamp":T}."""
        self.proto.dataReceived(b'{"endpoint": "echo", "data": "Hello"}\n')
        self.assertEqual(
            self.tr.value(), b'{"status":"success","data":"Hello","timestamp":"%s"}\n' % TS.encode()
        )

    def test_protocol_name(self) -> None:
        """{"protocol_name": P} is the same as endpoint P."""
        self.proto.dataReceived(b'{"protocol_name": "echo", "data": {"k": [1, 2]}}\n')
        self.assertEqual(out_json(self.tr), [{"status": "success", "data": {"k": [1, 2]}, "timestamp": TS}])

    def test_unknown_endpoint_exact(self) -> None:
        """An unknown endpoint -> exactly the spec's error line."""
        self.proto.dataReceived(b'{"endpoint": "nope", "data": 1}\n{"protocol_name": "nada"}\n')
        self.assertEqual(
            self.tr.value(),
            b'{"status":"error","message":"Unknown endpoint: nope","timestamp":"%s"}\n'
            b'{"status":"error","message":"Unknown endpoint: nada","timestamp":"%s"}\n'
            % (TS.encode(), TS.encode()),
        )

    def test_handler_failure_exact(self) -> None:
        """A handler exception -> "Error processing endpoint: ..." and the connection keeps serving."""

        def boom(data: Any, origin: str) -> Any:
            raise ValueError("boom")

        self.rig.hub.register_endpoint("boom", boom)
        self.proto.dataReceived(b'{"endpoint": "boom"}\n')
        self.assertEqual(
            out_json(self.tr),
            [{"status": "error", "message": "Error processing endpoint: ValueError: boom", "timestamp": TS}],
        )
        self.flushLoggedErrors(ValueError)
        self.proto.dataReceived(b'{"request": "ping"}\n')
        self.assertEqual(len(out(self.tr)), 1)

    def test_handler_gets_data_and_origin(self) -> None:
        """The handler gets D and the connection's id (line-<ip>:<port>)."""
        seen: list[Any] = []

        def look(data: Any, origin: str) -> str:
            seen.append((data, origin))
            return "seen"

        self.rig.hub.register_endpoint("look", look)
        self.proto.dataReceived(b'{"endpoint": "look", "data": {"x": 1}}\n')
        self.assertEqual(seen, [({"x": 1}, "line-10.1.2.3:40001")])

    def test_non_json_result(self) -> None:
        """A result orjson cannot encode -> an "Error processing endpoint" line, not a crash."""
        self.rig.hub.register_endpoint("bad", lambda data, origin: {1, 2})
        self.proto.dataReceived(b'{"endpoint": "bad"}\n')
        [reply] = out_json(self.tr)
        self.assertEqual(reply["status"], "error")
        self.assertTrue(reply["message"].startswith("Error processing endpoint: "))

    def test_request_ping_exact(self) -> None:
        """{"request":"ping"} -> exactly pong with server_time and timestamp."""
        self.proto.dataReceived(b'{"request": "ping"}\n')
        self.assertEqual(
            self.tr.value(),
            b'{"status":"success","pong":true,"server_time":"%s","timestamp":"%s"}\n'
            % (TS.encode(), TS.encode()),
        )

    def test_request_echo_exact(self) -> None:
        """{"request":"echo","data":D} -> exactly {"status":"success","echo":D,...}; no data -> {}."""
        self.proto.dataReceived(b'{"request": "echo", "data": [1, "a"]}\n{"request": "echo"}\n')
        self.assertEqual(
            self.tr.value(),
            b'{"status":"success","echo":[1,"a"],"timestamp":"%s"}\n'
            b'{"status":"success","echo":{},"timestamp":"%s"}\n' % (TS.encode(), TS.encode()),
        )

    def test_request_status_and_info(self) -> None:
        """status/info carry server id, name, real uptime, client_count, max_clients, port, ..."""
        self.rig.clock.advance(12.5)
        self.proto, self.tr = self.rig.connect()
        self.rig.connect()
        self.proto.dataReceived(b'{"request": "status"}\n{"request": "info"}\n')
        status, info = out_json(self.tr)
        ts = iso_utc(T0 + 12.5)
        for reply in (status, info):
            self.assertEqual(reply["status"], "success")
            self.assertEqual(reply["timestamp"], ts)
            data = reply["data"]
            node = self.rig.hub.node
            self.assertEqual(data["server_id"], node.node_id)
            self.assertEqual(data["server_name"], node.name)
            self.assertEqual(data["name"], node.name)
            self.assertEqual(data["uptime"], 12.5)
            self.assertEqual(data["client_count"], 3)
            self.assertEqual(data["max_clients"], 256)
            self.assertEqual(data["port"], 5555)
            self.assertEqual(data["project_id"], "default")
            self.assertEqual(data["protocols"], ["robonet/1", "witch-core", "labauto"])
            self.assertIn("echo", data["endpoints"])

    def test_unknown_request(self) -> None:
        """An unknown request type -> "Unknown request type: X" (witch-core's wording)."""
        self.proto.dataReceived(b'{"request": "dance"}\n')
        self.assertEqual(
            out_json(self.tr),
            [{"status": "error", "message": "Unknown request type: dance", "timestamp": TS}],
        )

    def test_pipelined_replies_in_order_with_deferred(self) -> None:
        """Several lines in one read are all answered in order, even when one handler is slow."""
        slow: defer.Deferred[Any] = defer.Deferred()
        self.rig.hub.register_endpoint("slow", lambda data, origin: slow)
        self.proto.dataReceived(
            b'{"request": "echo", "data": 1}\n{"endpoint": "slow"}\n{"endpoint": "echo", "data": 3}\nhello\n'
            b'{"request": "echo", "data": 4}\n'
        )
        self.assertEqual(out(self.tr), [b'{"status":"success","echo":1,"timestamp":"%s"}' % TS.encode()])
        self.rig.clock.advance(1)
        slow.callback("two")
        ts = iso_utc(T0 + 1).encode()
        self.assertEqual(
            out(self.tr),
            [
                b'{"status":"success","data":"two","timestamp":"%s"}' % ts,
                b'{"status":"success","data":3,"timestamp":"%s"}' % TS.encode(),
                b"ok",
                b'{"status":"success","echo":4,"timestamp":"%s"}' % TS.encode(),
            ],
        )

    def test_one_write_per_read(self) -> None:
        """The replies to 200 pipelined lines of one read go out in a single transport.write."""
        before = self.tr.writes
        self.proto.dataReceived(b"".join(b'{"endpoint": "echo", "data": %d}\n' % i for i in range(200)))
        self.assertEqual(self.tr.writes - before, 1)
        self.assertEqual([r["data"] for r in out_json(self.tr)], list(range(200)))

    def test_split_request_across_reads(self) -> None:
        """A request split over several reads is answered once complete."""
        self.proto.dataReceived(b'{"request": "pi')
        self.assertEqual(self.tr.value(), b"")
        self.proto.dataReceived(b'ng"}\r\n')
        self.assertEqual(len(out(self.tr)), 1)


# --- LabAuto dialect -----------------------------------------------------------------------------


class LabAutoTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig()
        self.proto, self.tr = self.rig.connect()

    def test_builtin_text_replies(self) -> None:
        """Without a text endpoint: hello -> ok, ping -> pong, any other text -> no reply."""
        self.proto.dataReceived(b"hello\nmeasurement done\nping\r\n")
        self.assertEqual(self.tr.value(), b"ok\npong\n")

    def test_custom_text_replies(self) -> None:
        """The factory's text_replies table replaces the built-in one."""
        rig = Rig(text_replies={"READY?": "ready"})
        proto, tr = rig.connect()
        proto.dataReceived(b"READY?\nhello\n")
        self.assertEqual(tr.value(), b"ready\n")

    def test_text_goes_to_callbacks(self) -> None:
        """Text lines reach hub callbacks as {"type":"text","text":...} from a client device."""
        got: list[tuple[Message, Device]] = []
        self.rig.hub.register_callback("text", lambda m, d: got.append((m, d)))
        self.proto.dataReceived(b"  start run 7 \n")
        [(msg, dev)] = got
        self.assertEqual(
            (msg.type, msg.body, msg.source), ("text", {"type": "text", "text": "start run 7"}, dev.device_id)
        )
        self.assertEqual((dev.device_id, dev.face, dev.role), ("line-10.1.2.3:40001", "line", "client"))
        self.assertEqual(self.tr.value(), b"")

    def test_json_goes_to_callbacks(self) -> None:
        """A JSON object without type/endpoint/protocol_name/request is a "json" message; no reply."""
        got: list[Message] = []
        self.rig.hub.register_callback("json", lambda m, d: got.append(m))
        self.proto.dataReceived(b'{"cmd": "move", "steps": 100}\n')
        self.assertEqual([(m.type, m.body) for m in got], [("json", {"cmd": "move", "steps": 100})])
        self.assertEqual(self.tr.value(), b"")

    def test_text_endpoint_answers(self) -> None:
        """A registered "text" endpoint answers with one line: str, dict as JSON, None = nothing."""
        answers = {"hello": "welcome", "dict": {"n": 1}, "multi": "a\nb"}
        self.rig.hub.register_endpoint("text", lambda data, origin: answers.get(data))
        self.proto.dataReceived(b"hello\nsilence\ndict\nmulti\n")
        self.assertEqual(self.tr.value(), b'welcome\n{"n":1}\na b\n')

    def test_json_endpoint_deferred_answer(self) -> None:
        """A "json" endpoint returning a Deferred answers when it fires, keeping request order."""
        pending: list[defer.Deferred[Any]] = []

        def on_json(data: Any, origin: str) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            pending.append(d)
            return d

        self.rig.hub.register_endpoint("json", on_json)
        self.proto.dataReceived(b'{"cmd": "measure"}\nhello\n')
        self.assertEqual(self.tr.value(), b"")
        pending[0].callback({"result": 42})
        self.assertEqual(self.tr.value(), b'{"result":42}\nok\n')

    def test_endpoint_failure_answers_error_line(self) -> None:
        """A failing text endpoint answers one witch-core style error line."""

        def bad(data: Any, origin: str) -> Any:
            raise KeyError(data)

        self.rig.hub.register_endpoint("text", bad)
        self.proto.dataReceived(b"x\n")
        [reply] = out_json(self.tr)
        self.assertEqual(reply["status"], "error")
        self.assertEqual(reply["message"], "Error processing endpoint: KeyError: 'x'")
        self.flushLoggedErrors(KeyError)

    def test_invalid_utf8_text(self) -> None:
        """Invalid UTF-8 -> error line (bad_frame); the connection keeps serving."""
        self.proto.dataReceived(b"\xff\xfe\x80\nhello\n")
        first, second = out(self.tr)
        self.assertEqual(
            orjson.loads(first),
            {"status": "error", "code": "bad_frame", "message": "line is not valid UTF-8", "timestamp": TS},
        )
        self.assertEqual(second, b"ok")
        self.assertFalse(self.tr.disconnecting)
        self.assertEqual(self.rig.hub.stats.errors["bad_frame"], 1)


# --- robonet envelope ----------------------------------------------------------------------------


class EnvelopeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig()
        self.hub = self.rig.hub

    def robot(self, device_id: str = "laser") -> tuple[LineLinkProtocol, Transport]:
        proto, tr = self.rig.connect()
        proto.dataReceived(b'{"type":"hello","role":"robot","device_id":"%s"}\n' % device_id.encode())
        [welcome] = out_json(tr)
        self.assertEqual(welcome["type"], "welcome")
        return proto, tr

    def test_welcome(self) -> None:
        """A robot hello gets the bot-link welcome and registers the device on face line."""
        proto, tr = self.rig.connect()
        proto.dataReceived(b'{"type":"hello","proto":1,"role":"robot","device_id":"laser","name":"Laser"}\n')
        [w] = out_json(tr)
        node = self.hub.node
        self.assertEqual(
            {k: v for k, v in w.items() if k != "session"},
            {
                "type": "welcome",
                "proto": 1,
                "server": {"id": node.node_id, "name": node.name, "version": node.version},
                "heartbeat_s": 10,
                "max_frame": 65536,
                "device_id": "laser",
            },
        )
        self.assertEqual(len(w["session"]), 36)
        dev = self.hub.registry.get("laser")
        assert dev is not None
        self.assertEqual(
            (dev.face, dev.role, dev.name, dev.online, dev.link), ("line", "robot", "Laser", True, proto)
        )

    def test_hello_without_device_id(self) -> None:
        """A hello without device_id keeps the anonymous name and returns it in the welcome."""
        proto, tr = self.rig.connect()
        proto.dataReceived(b'{"type":"hello","role":"client"}\n')
        [w] = out_json(tr)
        self.assertEqual(w["device_id"], "line-10.1.2.3:40001")

    def test_robot_receives_command_and_ack_resolves(self) -> None:
        """hub.command to a line-link robot writes a JSON line with an id; its ack fires the Deferred."""
        proto, tr = self.robot()
        result: list[Any] = []
        self.hub.command({"type": "robot_move", "direction": "forward"}, "tester", "laser").addBoth(
            result.append
        )
        [line] = out(tr)
        cmd = orjson.loads(line)
        self.assertEqual(cmd, {"type": "robot_move", "direction": "forward", "timestamp": TS, "id": 1})
        self.assertEqual(result, [])
        proto.dataReceived(b'{"type":"ack","id":1,"sum":%d}\n' % additive_sum(line))
        self.assertEqual(result, [["laser"]])

    def test_delivery_timeout(self) -> None:
        """No ack within botlink.ack_timeout -> HubError delivery_timeout."""
        proto, tr = self.robot()
        result: list[Any] = []
        self.hub.command({"type": "stop"}, "tester", "laser").addBoth(result.append)
        self.rig.clock.advance(4.9)
        self.assertEqual(result, [])
        self.rig.clock.advance(0.2)
        [f] = result
        self.assertIsInstance(f.value, HubError)
        self.assertEqual(f.value.code, "delivery_timeout")
        proto.dataReceived(b'{"type":"ack","id":1}\n')  # late ack: ignored

    def test_robot_error_fails_delivery(self) -> None:
        """A robot's {"type":"error","ref":id} fails that command with the robot's code."""
        proto, tr = self.robot()
        result: list[Any] = []
        self.hub.command({"type": "stop"}, "tester", "laser").addBoth(result.append)
        proto.dataReceived(b'{"type":"error","code":"busy","message":"moving","ref":1}\n')
        self.assertEqual((result[0].value.code, result[0].value.message), ("busy", "moving"))

    def test_connection_lost_fails_delivery(self) -> None:
        """A robot that disconnects fails its pending commands (device_offline) and goes offline."""
        proto, tr = self.robot()
        result: list[Any] = []
        self.hub.command({"type": "stop"}, "tester", "laser").addBoth(result.append)
        self.rig.drop(proto)
        self.assertEqual(result[0].value.code, "device_offline")
        dev = self.hub.registry.get("laser")
        assert dev is not None
        self.assertFalse(dev.online)
        self.assertEqual(self.rig.clock.getDelayedCalls(), [])

    def test_client_command_to_robot_end_to_end(self) -> None:
        """A line client's command reaches a line robot; the robot's ack becomes the client's ack."""
        robot, rtr = self.robot()
        client, ctr = self.rig.connect()
        line = b'{"type":"set","name":"speed","value":3,"device_id":"laser","id":9}'
        client.dataReceived(line + b"\n")
        [cmd_line] = out(rtr)
        cmd = orjson.loads(cmd_line)
        self.assertEqual(
            cmd, {"type": "set_speed", "value": 3, "device_id": "laser", "timestamp": TS, "id": 1}
        )
        self.assertEqual(ctr.value(), b"")
        robot.dataReceived(b'{"type":"ack","id":1}\n')
        self.assertEqual(ctr.value(), b'{"type":"ack","id":9,"sum":%d}\n' % additive_sum(line))

    def test_command_errors(self) -> None:
        """Commands to an offline device / of unknown type get bot-link errors with ref."""
        client, tr = self.rig.connect()
        client.dataReceived(
            b'{"type":"robot_move","device_id":"ghost","id":5}\n{"type":"set","name":"x","id":6}\n'
        )
        self.assertEqual(
            out_json(tr),
            [
                {
                    "type": "error",
                    "code": "device_offline",
                    "message": "device ghost is not connected",
                    "ref": 5,
                },
                {"type": "error", "code": "unknown_command", "message": "unknown setting 'x'", "ref": 6},
            ],
        )

    def test_data_acked_without_store(self) -> None:
        """Data with an id is ingested and acked with the additive sum of the line."""
        proto, tr = self.robot()
        line = b'{"type":"telemetry","id":3,"battery":85.0,"cpu":45.2}'
        proto.dataReceived(line + b"\r\n" + b'{"type":"telemetry","battery":80}\n')
        self.assertEqual(tr.value(), b'{"type":"ack","id":3,"sum":%d}\n' % additive_sum(line))
        self.assertEqual(self.hub.registry.field("laser.battery"), 80)

    def test_data_acked_only_after_commit(self) -> None:
        """With a store, acks wait for the batch commit and go out together; a failed commit -> errors."""
        store = FakeStore()
        self.rig = Rig(store=store)
        self.hub = self.rig.hub
        proto, tr = self.robot()
        a = b'{"type":"telemetry","id":1,"battery":1}'
        b = b'{"type":"telemetry","id":2,"battery":2}'
        proto.dataReceived(a + b"\n" + b + b"\n")
        self.assertEqual(tr.value(), b"")
        self.assertEqual(len(store.batch.waiters), 1)
        self.assertEqual(store.rows[0][4], a)
        before = tr.writes
        store.batch.commit()
        self.assertEqual(tr.writes - before, 1)
        self.assertEqual(
            out(tr),
            [
                b'{"type":"ack","id":1,"sum":%d}' % additive_sum(a),
                b'{"type":"ack","id":2,"sum":%d}' % additive_sum(b),
            ],
        )
        store.batch = FakeBatch()
        proto.dataReceived(b'{"type":"telemetry","id":3,"battery":3}\n')
        store.batch.fail()
        self.assertEqual(
            out_json(tr),
            [{"type": "error", "code": "internal", "message": "message could not be stored", "ref": 3}],
        )

    def test_request_response(self) -> None:
        """Envelope requests get bot-link responses (success and unknown_endpoint)."""
        proto, tr = self.rig.connect()
        proto.dataReceived(
            b'{"type":"request","id":4,"endpoint":"echo","data":[1]}\n{"type":"request","id":5,"endpoint":"zz"}\n'
        )
        self.assertEqual(
            out_json(tr),
            [
                {"type": "response", "id": 4, "status": "success", "data": [1]},
                {
                    "type": "response",
                    "id": 5,
                    "status": "error",
                    "code": "unknown_endpoint",
                    "message": "Unknown endpoint: zz",
                },
            ],
        )

    def test_ping_acked(self) -> None:
        """{"type":"ping","id":N} is acked with the line's sum; without id nothing is sent."""
        proto, tr = self.rig.connect()
        proto.dataReceived(b'{"type":"ping","id":7}\n{"type":"ping"}\n')
        self.assertEqual(
            tr.value(), b'{"type":"ack","id":7,"sum":%d}\n' % additive_sum(b'{"type":"ping","id":7}')
        )

    def test_bad_envelopes_keep_connection(self) -> None:
        """Bad id, non-string type, second hello -> bot-link errors; the connection stays usable."""
        proto, tr = self.robot()
        proto.dataReceived(
            b'{"type":"telemetry","id":-1}\n{"type":5,"id":2}\n{"type":"hello","id":3}\n{"type":"ping","id":4}\n'
        )
        replies = out_json(tr)
        self.assertEqual(
            [(r["type"], r.get("code"), r.get("ref")) for r in replies[:3]],
            [("error", "bad_frame", None), ("error", "missing_type", 2), ("error", "bad_hello", 3)],
        )
        self.assertEqual(replies[3]["type"], "ack")
        self.assertFalse(tr.disconnecting)

    def test_bad_hellos_close(self) -> None:
        """A hello with a bad role, proto or device_id -> error and close."""
        for line, code in (
            (b'{"type":"hello","role":"peer"}', "bad_hello"),
            (b'{"type":"hello","proto":2}', "proto_unsupported"),
            (b'{"type":"hello","device_id":""}', "bad_hello"),
            (b'{"type":"hello","device_id":["x"]}', "bad_hello"),
        ):
            proto, tr = self.rig.connect()
            proto.dataReceived(line + b"\n")
            [err] = out_json(tr)
            self.assertEqual((err["type"], err["code"]), ("error", code))
            self.assertTrue(tr.disconnecting)

    def test_replaced(self) -> None:
        """A second hello with the same device_id closes the first connection with `replaced`."""
        first, tr1 = self.robot()
        second, tr2 = self.robot()
        [err] = out_json(tr1)
        self.assertEqual((err["code"], err["ref"]), ("replaced", None))
        self.assertTrue(tr1.disconnecting)
        self.rig.drop(first)
        dev = self.hub.registry.get("laser")
        assert dev is not None
        self.assertTrue(dev.online)
        self.assertIs(dev.link, second)

    def test_subscribe(self) -> None:
        """{"type":"subscribe"} makes the connection a fan-out subscriber; unsubscribe stops it."""
        watcher, wtr = self.rig.connect()
        watcher.dataReceived(b'{"type":"subscribe","id":1}\n')
        self.assertEqual(
            out_json(wtr)[0], {"type": "ack", "id": 1, "sum": additive_sum(b'{"type":"subscribe","id":1}')}
        )
        robot, _ = self.robot()
        robot.dataReceived(b'{"type":"telemetry","battery":50,"id":8}\n')
        lines = out_json(wtr)
        self.assertEqual(lines[0]["type"], "device_update")
        self.assertEqual(lines[0]["event"], "device_up")
        self.assertEqual(lines[1], {"type": "telemetry", "battery": 50, "device_id": "laser", "ts": T0})
        watcher.dataReceived(b'{"type":"unsubscribe"}\n')
        robot.dataReceived(b'{"type":"telemetry","battery":49}\n')
        self.assertEqual(wtr.value(), b"")
        self.assertEqual(self.hub.subscriber_count, 0)

    def test_ack_with_wrong_sum_still_acks(self) -> None:
        """An ack whose sum does not match still resolves the command (bot-link rule), counted."""
        proto, tr = self.robot()
        result: list[Any] = []
        self.hub.command({"type": "stop"}, "tester", "laser").addBoth(result.append)
        proto.dataReceived(b'{"type":"ack","id":1,"sum":12345}\n')
        self.assertEqual(result, [["laser"]])
        self.assertEqual(self.hub.stats.errors["bad_checksum"], 1)

    def test_requests_do_not_register_devices(self) -> None:
        """Requests and commands alone leave no device record; text/data register a line client."""
        proto, tr = self.rig.connect()
        proto.dataReceived(b'{"request":"ping"}\n{"endpoint":"echo"}\n{"type":"request","endpoint":"echo"}\n')
        self.assertEqual(self.hub.registry.devices(), [])
        proto.dataReceived(b"note\n")
        [dev] = self.hub.registry.devices()
        self.assertEqual(
            (dev.device_id, dev.face, dev.role, dev.dialect),
            ("line-10.1.2.3:40001", "line", "client", "labauto"),
        )
        self.rig.drop(proto)
        self.assertFalse(dev.online)

    def test_slow_subscriber_closed(self) -> None:
        """A subscriber whose transport stays paused past web.slow_timeout is closed (rate_limited)."""
        watcher, wtr = self.rig.connect()
        watcher.dataReceived(b'{"type":"subscribe"}\n')
        producer = wtr.producer
        assert producer is not None
        producer.pauseProducing()
        robot, _ = self.robot()
        robot.dataReceived(b'{"type":"telemetry","battery":50}\n')
        self.assertEqual(wtr.value(), b"")
        self.rig.clock.advance(self.rig.config.web.slow_timeout)
        [err] = out_json(wtr)
        self.assertEqual((err["type"], err["code"]), ("error", "rate_limited"))
        self.assertTrue(wtr.disconnecting)
        self.assertEqual(self.hub.subscriber_count, 0)

    def test_error_shape_follows_dialect(self) -> None:
        """Dialect-less errors use the bot-link shape once the connection spoke the envelope."""
        proto, tr = self.robot()
        proto.dataReceived(b"{broken\n")
        [err] = out_json(tr)
        self.assertEqual((err["type"], err["code"], err["ref"]), ("error", "bad_json", None))


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig(auth={"mode": "token", "tokens": {"s3cret": "robot", "all": "any"}})

    def test_unauthorized_before_hello(self) -> None:
        """With token auth, text, witch requests and envelope data before hello -> unauthorized, close."""
        for line in (b"hello", b'{"request":"ping"}', b'{"type":"telemetry","id":1}'):
            proto, tr = self.rig.connect()
            proto.dataReceived(line + b"\n")
            [err] = out_json(tr)
            self.assertEqual(err["code"], "unauthorized")
            self.assertTrue(tr.disconnecting)

    def test_tokens(self) -> None:
        """A bad token or a role the token does not grant -> auth_failed; a good one -> welcome."""
        for line, first in (
            (b'{"type":"hello","role":"robot","token":"nope"}', "error"),
            (b'{"type":"hello","role":"client","token":"s3cret"}', "error"),
            (b'{"type":"hello","role":"robot","token":"s3cret","device_id":"r"}', "welcome"),
            (b'{"type":"hello","role":"client","token":"all"}', "welcome"),
        ):
            proto, tr = self.rig.connect()
            proto.dataReceived(line + b"\n")
            [reply] = out_json(tr)
            self.assertEqual(reply["type"], first, line)
            if first == "error":
                self.assertEqual(reply["code"], "auth_failed")
            else:
                proto.dataReceived(b"hello\n")
                self.assertEqual(tr.value(), b"ok\n")


# --- limits and timeouts -------------------------------------------------------------------------


class LimitTests(SynchronousTestCase):
    def test_over_long_line(self) -> None:
        """A line over line.max_line -> frame_too_large error and close; earlier lines are answered."""
        rig = Rig(line={"max_line": 100})
        proto, tr = rig.connect()
        proto.dataReceived(b"hello\n" + b"x" * 101 + b"\nping\n")
        first, err = out(tr)
        self.assertEqual(first, b"ok")
        self.assertEqual(
            orjson.loads(err),
            {
                "status": "error",
                "code": "frame_too_large",
                "message": "line longer than 100 bytes",
                "timestamp": TS,
            },
        )
        self.assertTrue(tr.disconnecting)
        proto.dataReceived(b"hello\n")
        self.assertEqual(tr.value(), b"")

    def test_over_long_partial_line(self) -> None:
        """An unterminated line over the cap is refused without waiting for its newline."""
        rig = Rig(line={"max_line": 100})
        proto, tr = rig.connect()
        proto.dataReceived(b"y" * 60)
        self.assertFalse(tr.disconnecting)
        proto.dataReceived(b"y" * 60)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(proto.splitter.pending, 0)

    def test_max_clients(self) -> None:
        """Over line.max_clients -> exactly {"status":"error","message":"server full"} and close."""
        rig = Rig(line={"max_clients": 2})
        a, _ = rig.connect()
        rig.connect("10.9.9.9")
        c, ctr = rig.connect("10.7.7.7")
        self.assertEqual(ctr.value(), SERVER_FULL)
        self.assertEqual(SERVER_FULL, b'{"status":"error","message":"server full"}\n')
        self.assertTrue(ctr.disconnecting)
        c.dataReceived(b"hello\n")
        self.assertEqual(ctr.value(), SERVER_FULL)
        rig.drop(c)
        self.assertEqual(len(rig.factory.connections), 2)
        rig.drop(a)
        d, dtr = rig.connect()
        d.dataReceived(b"hello\n")
        self.assertEqual(dtr.value(), b"ok\n")
        self.assertEqual(rig.hub.stats.errors["server_full"], 1)

    def test_per_ip_cap(self) -> None:
        """More than botlink.max_per_ip connections from one address are refused; others still admitted."""
        rig = Rig(botlink={"max_per_ip": 2})
        rig.connect()
        rig.connect()
        _, tr = rig.connect()
        [err] = out_json(tr)
        self.assertEqual((err["status"], err["code"]), ("error", "rate_limited"))
        self.assertTrue(tr.disconnecting)
        _, other = rig.connect("10.4.4.4")
        self.assertFalse(other.disconnecting)

    def test_first_line_deadline(self) -> None:
        """No complete line within botlink.hello_timeout -> idle_timeout error and close."""
        rig = Rig()
        proto, tr = rig.connect()
        proto.dataReceived(b"partial")
        rig.clock.advance(9.9)
        self.assertFalse(tr.disconnecting)
        rig.clock.advance(0.2)
        [err] = out_json(tr)
        self.assertEqual((err["code"], err["message"]), ("idle_timeout", "no complete line within 10 s"))
        self.assertTrue(tr.disconnecting)

    def test_idle_timeout(self) -> None:
        """After lines, line.idle_timeout without a complete line closes; each line resets it."""
        rig = Rig()
        proto, tr = rig.connect()
        proto.dataReceived(b"ping\n")
        rig.clock.advance(25)
        proto.dataReceived(b"ping\n")
        rig.clock.advance(25)
        proto.dataReceived(b"dribble")  # partial lines do not count
        self.assertFalse(tr.disconnecting)
        rig.clock.advance(5.1)
        self.assertEqual(
            out(tr)[-1],
            b'{"status":"error","code":"idle_timeout","message":"no line received for 30 s","timestamp":"%s"}'
            % iso_utc(T0 + 55.1).encode(),
        )
        self.assertTrue(tr.disconnecting)

    def test_idle_paused_while_reply_owed(self) -> None:
        """A client waiting on a slow handler is not idle; the timer restarts after the reply."""
        rig = Rig()
        slow: defer.Deferred[Any] = defer.Deferred()
        rig.hub.register_endpoint("slow", lambda data, origin: slow)
        proto, tr = rig.connect()
        proto.dataReceived(b'{"endpoint":"slow"}\n')
        rig.clock.pump([10] * 10)
        self.assertFalse(tr.disconnecting)
        rig.clock.advance(9)
        slow.callback(1)
        self.assertEqual(len(out(tr)), 1)
        rig.clock.advance(29.9)
        self.assertFalse(tr.disconnecting)
        rig.clock.advance(0.2)
        self.assertTrue(tr.disconnecting)

    def test_idle_when_peer_not_reading(self) -> None:
        """A connection paused because it does not read its replies is closed by the idle timer."""
        rig = Rig()
        proto, tr = rig.connect()
        proto.dataReceived(b"ping\n")
        producer = tr.producer
        assert producer is not None
        producer.pauseProducing()
        rig.clock.advance(30)
        self.assertEqual(orjson.loads(out(tr)[-1])["message"], "replies not read for 30 s")
        self.assertTrue(tr.disconnecting)

    def test_abort_if_peer_does_not_drain(self) -> None:
        """A closed connection whose peer does not read is aborted after ABORT_AFTER seconds."""
        rig = Rig(line={"max_line": 10})
        proto, tr = rig.connect()
        proto.dataReceived(b"z" * 20)
        self.assertTrue(tr.disconnecting)
        self.assertIsNone(tr.producer)  # unregistered, else loseConnection would wait for it
        rig.clock.advance(ABORT_AFTER)
        self.assertTrue(tr.aborted)
        rig.drop(proto)
        self.assertEqual(rig.clock.getDelayedCalls(), [])

    def test_backpressure_stops_reading(self) -> None:
        """When the transport's buffer is full (producer paused) the connection stops reading."""
        rig = Rig()
        proto, tr = rig.connect()
        self.assertTrue(tr.streaming)
        producer = tr.producer
        assert producer is not None
        producer.pauseProducing()
        self.assertEqual(tr.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(tr.producerState, "producing")

    def test_counters(self) -> None:
        """Connections per face are counted up and down."""
        rig = Rig()
        proto, _ = rig.connect()
        self.assertEqual(rig.hub.stats.connections["line"], 1)
        rig.drop(proto)
        self.assertEqual(rig.hub.stats.connections["line"], 0)
        self.assertEqual(len(rig.factory.connections), 0)


class BadInputTests(SynchronousTestCase):
    """Garbage, deep JSON, wrong types, floods: clear errors, counted, and the connection still serves."""

    def assert_serves(self, proto: LineLinkProtocol, tr: Transport) -> None:
        tr.clear()
        proto.dataReceived(b'{"request":"echo","data":"still here"}\n')
        self.assertEqual(out_json(tr), [{"status": "success", "echo": "still here", "timestamp": TS}])
        self.assertFalse(tr.disconnecting)

    def test_garbage(self) -> None:
        """Random bytes, NULs, broken JSON and invalid UTF-8 get error lines; nothing crashes."""
        rig = Rig()
        proto, tr = rig.connect()
        proto.dataReceived(b'\x00\x01\x02\n{\n{}}\n{"a":\xff}\n\xc3\x28\n{"endpoint"\n\x1b[2J\n')
        lines = out(tr)
        codes = [orjson.loads(x)["code"] for x in lines if x.startswith(b"{")]
        self.assertEqual(codes, ["bad_json", "bad_json", "bad_frame", "bad_frame", "bad_json"])
        self.assert_serves(proto, tr)

    def test_deep_json(self) -> None:
        """JSON nested past orjson's limit is bad_json, not a crash or a hang."""
        rig = Rig()
        proto, tr = rig.connect()
        proto.dataReceived(b'{"a":' + b"[" * 30000 + b"]" * 30000 + b"}\n")
        [err] = out_json(tr)
        self.assertEqual(err["code"], "bad_json")
        self.assert_serves(proto, tr)

    def test_wrong_types(self) -> None:
        """Non-string endpoint/type/device_id and odd payloads get errors; the connection serves on."""
        rig = Rig()
        proto, tr = rig.connect()
        proto.dataReceived(
            b'{"endpoint": 5}\n{"protocol_name": null}\n{"request": [1]}\n'
            b'{"type":"request","id":1,"endpoint":{}}\n{"type":"robot_move","device_id":7,"id":2}\n'
        )
        replies = out_json(tr)
        self.assertEqual(replies[0]["message"], "Unknown endpoint: 5")
        self.assertEqual(replies[1]["message"], "Unknown endpoint: None")
        self.assertEqual(replies[2]["message"], "Unknown request type: [1]")
        self.assertEqual((replies[3]["type"], replies[3]["code"]), ("response", "unknown_endpoint"))
        self.assertEqual(
            (replies[4]["type"], replies[4]["code"], replies[4]["ref"]), ("error", "bad_frame", 2)
        )
        self.assert_serves(proto, tr)

    def test_flood(self) -> None:
        """20,000 bad lines in a few reads are all answered and counted; a good request still works."""
        rig = Rig()
        proto, tr = rig.connect()
        chunk = b"{bad\n" * 5000
        for _ in range(4):
            proto.dataReceived(chunk)
        self.assertEqual(len(out(tr)), 20000)
        self.assertEqual(rig.hub.stats.errors["bad_json"], 20000)
        self.assert_serves(proto, tr)

    def test_other_connections_undisturbed(self) -> None:
        """One connection's fatal error does not affect another connection."""
        rig = Rig(line={"max_line": 50})
        bad, btr = rig.connect()
        good, gtr = rig.connect()
        bad.dataReceived(b"q" * 100)
        self.assertTrue(btr.disconnecting)
        self.assert_serves(good, gtr)


class EnvelopeRegressionTests(SynchronousTestCase):
    """Issue 11: the line link judges proto, device ids and targets by the shared envelope rules."""

    def setUp(self) -> None:
        self.rig = Rig()
        self.hub = self.rig.hub

    def test_proto_true_refused(self) -> None:
        """proto true is proto_unsupported, as on the bot link (it was accepted: True == 1)."""
        proto, tr = self.rig.connect()
        proto.dataReceived(b'{"type":"hello","proto":true,"role":"robot","device_id":"laser"}\n')
        [err] = out_json(tr)
        self.assertEqual((err["type"], err["code"]), ("error", "proto_unsupported"))
        self.assertTrue(tr.disconnecting)
        self.assertEqual(self.hub.registry.devices(), [])

    def test_bad_target_string(self) -> None:
        """A device_id that is a string but not a valid id is bad_frame (one rule for every face)."""
        proto, tr = self.rig.connect()
        proto.dataReceived(b'{"type":"stop","id":3,"device_id":"a b"}\n')
        [err] = out_json(tr)
        self.assertEqual((err["code"], err["ref"]), ("bad_frame", 3))


class LineTextCommandTests(SynchronousTestCase):
    """The ``line`` command: a bare text line to a LabAuto-dialect device, acked like any command."""

    def setUp(self) -> None:
        self.rig = Rig()
        self.hub = self.rig.hub

    def named(self, device_id: str, role: str = "robot") -> tuple[LineLinkProtocol, Transport]:
        proto, tr = self.rig.connect()
        hello = {"type": "hello", "role": role, "device_id": device_id}
        proto.dataReceived(orjson.dumps(hello) + b"\n")
        [welcome] = out_json(tr)
        self.assertEqual(welcome["type"], "welcome")
        return proto, tr

    def test_in_default_allowlist(self) -> None:
        """``line`` is a command out of the box."""
        self.assertIn("line", self.hub.commands)

    def test_hub_command_writes_bare_text(self) -> None:
        """Any face's ``line`` command reaches the device as exactly ``text\\n``, and is acked at once."""
        _oven, otr = self.named("oven")
        result: list[Any] = []
        self.hub.command({"type": "line", "text": "ready"}, "tester", "oven").addBoth(result.append)
        self.assertEqual(otr.value(), b"ready\n")
        self.assertEqual(result, [["oven"]])

    def test_two_labauto_connections_talk(self) -> None:
        """Two LabAuto connections exchange text lines through the hub (wait_for('ready') / 'DONE')."""
        _a, atr = self.named("script_a")
        b, btr = self.named("script_b")
        a = _a
        a.dataReceived(b'{"type":"line","id":1,"device_id":"script_b","text":"ready"}\n')
        self.assertEqual(btr.value(), b"ready\n")
        btr.clear()
        [ack] = out_json(atr)
        self.assertEqual((ack["type"], ack["id"]), ("ack", 1))
        b.dataReceived(b'{"type":"line","device_id":"script_a","text":"DONE"}\n')
        self.assertEqual(atr.value(), b"DONE\n")
        self.assertEqual(btr.value(), b"")  # no id: fire and forget

    def test_offline_target(self) -> None:
        """A ``line`` to a device that is not connected gets device_offline, like other commands."""
        a, atr = self.named("script_a")
        a.dataReceived(b'{"type":"line","id":2,"device_id":"nobody","text":"ready"}\n')
        [err] = out_json(atr)
        self.assertEqual((err["code"], err["ref"]), ("device_offline", 2))

    def test_bad_text(self) -> None:
        """Missing, empty, non-string or multi-line text is bad_frame; nothing is written."""
        _oven, otr = self.named("oven")
        a, atr = self.named("script_a")
        for bad in (None, "", 5, "a\nb"):
            body: dict[str, Any] = {"type": "line", "id": 3, "device_id": "oven"}
            if bad is not None:
                body["text"] = bad
            a.dataReceived(orjson.dumps(body) + b"\n")
            [err] = out_json(atr)
            self.assertEqual((err["code"], err["ref"]), ("bad_frame", 3), bad)
        self.assertEqual(otr.value(), b"")

    def test_not_reading_times_out(self) -> None:
        """While the device does not read (write buffer full), delivery_timeout after ack_timeout."""
        oven, otr = self.named("oven")
        oven.transport.producer.pauseProducing()  # type: ignore[union-attr]
        result: list[Any] = []
        self.hub.command({"type": "line", "text": "ready"}, "tester", "oven").addErrback(
            lambda f: result.append(f.value.code)
        )
        self.assertEqual(result, [])
        self.rig.clock.advance(self.rig.config.botlink.ack_timeout)
        self.assertEqual(result, ["delivery_timeout"])

    def test_resumed_reading_delivers(self) -> None:
        """A line waiting for a non-reading device is acked when it reads again."""
        oven, otr = self.named("oven")
        producer = oven.transport.producer  # type: ignore[union-attr]
        producer.pauseProducing()
        result: list[Any] = []
        self.hub.command({"type": "line", "text": "go"}, "tester", "oven").addBoth(result.append)
        producer.resumeProducing()
        self.assertEqual(result, [["oven"]])
        self.rig.clock.advance(60)
        self.assertEqual(result, [["oven"]])

    def test_labauto_wait_for_through_robonet(self) -> None:
        """A seed LabAuto script's wait_for('ready') pattern: a plain text client sends, the text arrives.

        The LabAuto device names itself with one hello line (ignored by wait_for), then only reads.
        """
        _dev, dtr = self.named("bench")
        sender, str_ = self.rig.connect()
        sender.dataReceived(b"start\n")  # LabAuto text: ingested as usual
        sender.dataReceived(b'{"type":"line","device_id":"bench","text":"ready"}\n')
        lines = dtr.value().split(b"\n")
        self.assertIn(b"ready", lines)
