"""Tests for robonet.client.BotClient against a fake bot-link server on 127.0.0.1.

The fake server runs one thread per connection with a behaviour function written by each test;
everything blocks with bounded timeouts and is closed in cleanup.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase

from robonet.client import AuthError, BotClient, ChecksumError, HelloRejected, RemoteError
from robonet.protocols.botlink import LEGACY_POLL, additive_sum, encode_frame, legacy_ack

WAIT = 5.0


class ServerConn:
    """The server side of one accepted connection, with blocking helpers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT)
        self.buf = b""

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("client closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_payload(self) -> bytes:
        (n,) = struct.unpack(">I", self.read_exact(4))
        return self.read_exact(n)

    def read_frame(self) -> dict[str, Any]:
        obj: dict[str, Any] = orjson.loads(self.read_payload())
        return obj

    def read_until_type(self, t: str) -> dict[str, Any]:
        """Next frame of type ``t`` (skipping heartbeat pings)."""
        while True:
            f = self.read_frame()
            if f.get("type") == t:
                return f

    def send(self, obj: dict[str, Any]) -> bytes:
        payload = orjson.dumps(obj)
        self.sock.sendall(encode_frame(payload))
        return payload

    def welcome(self, hello: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        hello = hello or self.read_frame()
        w = {
            "type": "welcome",
            "proto": 1,
            "session": "s-1",
            "server": {"id": "n1", "name": "hub", "version": "0"},
            "heartbeat_s": 10,
            "max_frame": 1048576,
            "device_id": hello.get("device_id") or "robot-assigned",
        }
        w.update(extra)
        self.send(w)
        return hello

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class FakeServer:
    """Accepts connections on 127.0.0.1 and runs ``behaviours`` in order, one per connection.

    Each behaviour gets a :class:`ServerConn`; what it returns (or raises) is put on ``results``.
    """

    def __init__(self, behaviours: list[Callable[[ServerConn], Any]]) -> None:
        self.behaviours = list(behaviours)
        self.results: queue.Queue[Any] = queue.Queue()
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(WAIT)
        self.port = self.lsock.getsockname()[1]
        self.conns: list[ServerConn] = []
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while self.behaviours:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            conn = ServerConn(sock)
            self.conns.append(conn)
            t = threading.Thread(target=self._run, args=(self.behaviours.pop(0), conn), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, behaviour: Callable[[ServerConn], Any], conn: ServerConn) -> None:
        try:
            self.results.put(behaviour(conn))
        except BaseException as e:  # handed to the test through the queue
            self.results.put(e)

    def result(self) -> Any:
        r = self.results.get(timeout=WAIT)
        if isinstance(r, BaseException):
            raise r
        return r

    def stop(self) -> None:
        self.behaviours.clear()
        self.lsock.close()
        for c in self.conns:
            c.close()
        for t in [self.acceptor, *self.threads]:
            t.join(WAIT)


class BotClientTestsBase(SynchronousTestCase):
    def serve(self, *behaviours: Callable[[ServerConn], Any]) -> FakeServer:
        server = FakeServer(list(behaviours))
        self.addCleanup(server.stop)
        return server

    def client(self, server: FakeServer, **kw: Any) -> BotClient:
        kw.setdefault("timeout", WAIT)
        kw.setdefault("reconnect_delay", 0.0)
        c = BotClient("127.0.0.1", server.port, **kw)
        self.addCleanup(c.close)
        return c


class HelloTests(BotClientTestsBase):
    def test_connect_sends_hello_and_returns_welcome(self) -> None:
        """connect() sends the hello with role/device_id/name/token and returns the welcome."""

        def behaviour(conn: ServerConn) -> dict[str, Any]:
            return conn.welcome()

        server = self.serve(behaviour)
        c = self.client(server, device_id="robot_01", name="Robot 1", token="t0k", role="robot")
        welcome = c.connect()
        hello = server.result()
        self.assertEqual(
            hello,
            {
                "type": "hello",
                "proto": 1,
                "role": "robot",
                "device_id": "robot_01",
                "name": "Robot 1",
                "token": "t0k",
            },
        )
        assert welcome is not None
        self.assertEqual(welcome["type"], "welcome")
        self.assertTrue(c.is_connected)

    def test_assigned_device_id_is_kept(self) -> None:
        """A hub-assigned device_id from the welcome becomes the client's device_id."""
        server = self.serve(lambda conn: conn.welcome())
        c = self.client(server, role="client")
        c.connect()
        server.result()
        self.assertEqual(c.device_id, "robot-assigned")

    def test_auth_failed_raises_auth_error(self) -> None:
        """An auth_failed error frame answering the hello raises AuthError (a ConnectionError)."""

        def behaviour(conn: ServerConn) -> None:
            conn.read_frame()
            conn.send({"type": "error", "code": "auth_failed", "message": "invalid token", "ref": None})
            conn.close()

        server = self.serve(behaviour)
        c = self.client(server, auto_reconnect=False)
        err = self.assertRaises(AuthError, c.connect)
        self.assertEqual(err.code, "auth_failed")
        self.assertIsInstance(err, ConnectionError)
        self.assertFalse(c.is_connected)

    def test_bad_hello_raises_connection_error(self) -> None:
        """Other hello errors (bad_hello) raise HelloRejected, a ConnectionError but not AuthError."""

        def behaviour(conn: ServerConn) -> None:
            conn.read_frame()
            conn.send({"type": "error", "code": "bad_hello", "message": "role", "ref": None})

        server = self.serve(behaviour)
        c = self.client(server, auto_reconnect=False)
        err = self.assertRaises(HelloRejected, c.connect)
        self.assertNotIsInstance(err, AuthError)
        self.assertEqual(err.code, "bad_hello")

    def test_close_before_welcome(self) -> None:
        """A hub that closes without a welcome makes connect() raise ConnectionError."""

        def behaviour(conn: ServerConn) -> None:
            conn.read_frame()
            conn.close()

        server = self.serve(behaviour)
        c = self.client(server, auto_reconnect=False)
        self.assertRaises(ConnectionError, c.connect)

    def test_context_manager(self) -> None:
        """``with BotClient(...)`` connects on entry and closes on exit."""

        def behaviour(conn: ServerConn) -> bytes:
            conn.welcome()
            return conn.sock.recv(10)  # b"" once the client closes

        server = self.serve(behaviour)
        with self.client(server) as c:
            self.assertTrue(c.is_connected)
        self.assertFalse(c.is_connected)
        self.assertEqual(server.result(), b"")


class SendTests(BotClientTestsBase):
    def test_send_with_ack_verifies_sum(self) -> None:
        """send(ack=True) gives the message an id and returns the ack once its sum matches."""

        def behaviour(conn: ServerConn) -> dict[str, Any]:
            conn.welcome()
            payload = conn.read_payload()
            msg = orjson.loads(payload)
            conn.send({"type": "ack", "id": msg["id"], "sum": additive_sum(payload)})
            return msg  # type: ignore[no-any-return]

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        original = {"type": "telemetry", "battery": 85.0}
        ack = c.send(original, ack=True)
        msg = server.result()
        assert ack is not None
        self.assertEqual(ack["id"], msg["id"])
        self.assertEqual(msg["battery"], 85.0)
        self.assertIsInstance(msg["id"], int)
        self.assertNotIn("id", original)

    def test_checksum_mismatch_raises(self) -> None:
        """An ack whose sum differs from the sent payload's additive checksum raises ChecksumError."""

        def behaviour(conn: ServerConn) -> None:
            conn.welcome()
            payload = conn.read_payload()
            conn.send({"type": "ack", "id": orjson.loads(payload)["id"], "sum": additive_sum(payload) + 1})

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        err = self.assertRaises(ChecksumError, c.send, {"type": "telemetry", "cpu": 1}, ack=True)
        self.assertEqual(err.got, err.expected + 1)

    def test_error_frame_with_ref_raises_remote_error(self) -> None:
        """An error frame whose ref is the message's id raises RemoteError with its code."""

        def behaviour(conn: ServerConn) -> None:
            conn.welcome()
            mid = conn.read_frame()["id"]
            conn.send({"type": "error", "code": "rate_limited", "message": "slow down", "ref": mid})

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        err = self.assertRaises(RemoteError, c.send, {"type": "telemetry"}, ack=True)
        self.assertEqual((err.code, err.message), ("rate_limited", "slow down"))

    def test_no_ack_times_out(self) -> None:
        """A message never acked raises TimeoutError after the timeout."""
        done = threading.Event()

        def behaviour(conn: ServerConn) -> None:
            conn.welcome()
            conn.read_frame()
            done.wait(WAIT)

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        self.addCleanup(done.set)
        self.assertRaises(TimeoutError, c.send, {"type": "telemetry"}, ack=True, timeout=0.05)

    def test_fire_and_forget_has_no_id(self) -> None:
        """send() without ack writes the message as is (no id) and returns None."""

        def behaviour(conn: ServerConn) -> dict[str, Any]:
            conn.welcome()
            return conn.read_frame()

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        self.assertIsNone(c.send({"type": "telemetry", "cpu": 3}))
        self.assertEqual(server.result(), {"type": "telemetry", "cpu": 3})

    def test_garbage_from_hub_is_ignored(self) -> None:
        """Non-JSON and non-object frames from the hub are ignored; the client keeps working."""

        def behaviour(conn: ServerConn) -> None:
            conn.welcome()
            conn.sock.sendall(encode_frame(b"\xff\xfe not json") + encode_frame(b"[1,2]"))
            payload = conn.read_payload()
            conn.send({"type": "ack", "id": orjson.loads(payload)["id"], "sum": additive_sum(payload)})

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        self.assertEqual(c.send({"type": "x"}, ack=True)["type"], "ack")  # type: ignore[index]

    def test_concurrent_senders(self) -> None:
        """Several threads sending with acks at once each get their own ack."""
        n = 20

        def behaviour(conn: ServerConn) -> int:
            conn.welcome()
            for _ in range(n):
                payload = conn.read_payload()
                conn.send({"type": "ack", "id": orjson.loads(payload)["id"], "sum": additive_sum(payload)})
            return n

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        acks: queue.Queue[Any] = queue.Queue()

        def worker(i: int) -> None:
            try:
                acks.put(c.send({"type": "telemetry", "i": i}, ack=True))
            except Exception as e:
                acks.put(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        got = [acks.get(timeout=WAIT) for _ in range(n)]
        self.assertEqual(len({a["id"] for a in got}), n)


class RequestCommandTests(BotClientTestsBase):
    def test_request_returns_data(self) -> None:
        """request() sends a request frame and returns the response's data."""

        def behaviour(conn: ServerConn) -> dict[str, Any]:
            conn.welcome()
            req = conn.read_frame()
            conn.send(
                {"type": "response", "id": req["id"], "status": "success", "data": {"echo": req["data"]}}
            )
            return req

        server = self.serve(behaviour)
        c = self.client(server, role="client")
        c.connect()
        self.assertEqual(c.request("echo", [1, "a"]), {"echo": [1, "a"]})
        req = server.result()
        self.assertEqual((req["type"], req["endpoint"]), ("request", "echo"))

    def test_request_error_raises(self) -> None:
        """An error response raises RemoteError(code, message)."""

        def behaviour(conn: ServerConn) -> None:
            conn.welcome()
            req = conn.read_frame()
            conn.send(
                {
                    "type": "response",
                    "id": req["id"],
                    "status": "error",
                    "code": "unknown_endpoint",
                    "message": "no such endpoint: nope",
                }
            )

        server = self.serve(behaviour)
        c = self.client(server, role="client")
        c.connect()
        err = self.assertRaises(RemoteError, c.request, "nope")
        self.assertEqual(err.code, "unknown_endpoint")

    def test_command_targets_device(self) -> None:
        """command() sends type, device_id and fields with an id and returns the ack."""

        def behaviour(conn: ServerConn) -> dict[str, Any]:
            conn.welcome()
            payload = conn.read_payload()
            cmd = orjson.loads(payload)
            conn.send({"type": "ack", "id": cmd["id"], "sum": additive_sum(payload)})
            return cmd  # type: ignore[no-any-return]

        server = self.serve(behaviour)
        c = self.client(server, role="client")
        c.connect()
        c.command("robot_move", "robot_01", x=0.5, y=-0.3)
        cmd = server.result()
        self.assertEqual(
            {k: cmd[k] for k in ("type", "device_id", "x", "y")},
            {"type": "robot_move", "device_id": "robot_01", "x": 0.5, "y": -0.3},
        )

    def test_command_device_offline(self) -> None:
        """A device_offline error for a command raises RemoteError."""

        def behaviour(conn: ServerConn) -> None:
            conn.welcome()
            cmd = conn.read_frame()
            conn.send(
                {"type": "error", "code": "device_offline", "message": "robot_09 offline", "ref": cmd["id"]}
            )

        server = self.serve(behaviour)
        c = self.client(server, role="client")
        c.connect()
        self.assertEqual(
            self.assertRaises(RemoteError, c.command, "set_speed", "robot_09", value=3).code, "device_offline"
        )


class IncomingTests(BotClientTestsBase):
    def test_on_command_then_auto_ack(self) -> None:
        """A command from the hub runs on_command, then the client acks its id with the sum."""
        seen: queue.Queue[dict[str, Any]] = queue.Queue()

        def behaviour(conn: ServerConn) -> tuple[dict[str, Any], int]:
            conn.welcome()
            payload = conn.send({"type": "robot_move", "id": 7, "x": 0.5, "y": 0.0})
            return conn.read_until_type("ack"), additive_sum(payload)

        server = self.serve(behaviour)
        c = self.client(server)
        c.on_command(seen.put)
        c.connect()
        ack, expected = server.result()
        self.assertEqual(seen.get(timeout=WAIT)["x"], 0.5)
        self.assertEqual(ack, {"type": "ack", "id": 7, "sum": expected})

    def test_failing_command_callback_sends_error(self) -> None:
        """If on_command raises, the hub gets an internal error for that id instead of an ack."""

        def behaviour(conn: ServerConn) -> dict[str, Any]:
            conn.welcome()
            conn.send({"type": "set_speed", "id": 3, "value": 500})
            while True:
                f = conn.read_frame()
                if f["type"] in ("ack", "error"):
                    return f

        def bad(msg: dict[str, Any]) -> None:
            raise ValueError("speed out of range")

        server = self.serve(behaviour)
        c = self.client(server)
        c.on_command(bad)
        c.connect()
        reply = server.result()
        self.assertEqual((reply["type"], reply["code"], reply["ref"]), ("error", "internal", 3))
        self.flushLoggedErrors()

    def test_callback_may_send_with_ack(self) -> None:
        """A command callback can itself send(ack=True) (callbacks do not run on the reader)."""
        results: queue.Queue[Any] = queue.Queue()

        def behaviour(conn: ServerConn) -> str:
            conn.welcome()
            conn.send({"type": "robot_move", "id": 1, "x": 1, "y": 0})
            payload = conn.read_payload()
            status = orjson.loads(payload)
            conn.send({"type": "ack", "id": status["id"], "sum": additive_sum(payload)})
            return str(conn.read_until_type("ack")["id"])

        server = self.serve(behaviour)
        c = self.client(server)

        def on_cmd(msg: dict[str, Any]) -> None:
            results.put(c.send({"type": "status", "status": "moving"}, ack=True))

        c.on_command(on_cmd)
        c.connect()
        self.assertEqual(server.result(), "1")
        self.assertEqual(results.get(timeout=WAIT)["type"], "ack")

    def test_other_frames_go_to_on_message(self) -> None:
        """Frames that are not commands or replies go to on_message."""
        seen: queue.Queue[dict[str, Any]] = queue.Queue()

        def behaviour(conn: ServerConn) -> None:
            conn.welcome()
            conn.send({"type": "telemetry_update", "device_id": "robot_02", "battery": 50})

        server = self.serve(behaviour)
        c = self.client(server, role="client")
        c.on_message(seen.put)
        c.connect()
        self.assertEqual(seen.get(timeout=WAIT)["device_id"], "robot_02")

    def test_ping_is_acked(self) -> None:
        """The hub's {"type":"ping","id":N} is answered with an ack carrying the payload's sum."""

        def behaviour(conn: ServerConn) -> tuple[dict[str, Any], int]:
            conn.welcome()
            payload = conn.send({"type": "ping", "id": 42})
            return conn.read_until_type("ack"), additive_sum(payload)

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        ack, expected = server.result()
        self.assertEqual(ack, {"type": "ack", "id": 42, "sum": expected})


class ReconnectTests(BotClientTestsBase):
    def test_reconnects_with_same_device_id(self) -> None:
        """After the hub drops the link, the client says hello again with its (assigned) id."""

        def first(conn: ServerConn) -> dict[str, Any]:
            hello = conn.welcome()
            conn.close()
            return hello

        def second(conn: ServerConn) -> str:
            server.results.put(conn.welcome())
            payload = conn.read_payload()
            conn.send({"type": "ack", "id": orjson.loads(payload)["id"], "sum": additive_sum(payload)})
            return "acked"

        server = self.serve(first, second)
        c = self.client(server, role="robot")
        c.connect()
        self.assertNotIn("device_id", server.result())
        hello2 = server.result()
        self.assertEqual(hello2["device_id"], "robot-assigned")
        ack = c.send({"type": "telemetry"}, ack=True)
        self.assertEqual(ack["type"], "ack")  # type: ignore[index]
        self.assertEqual(server.result(), "acked")
        self.assertEqual(server.accepted, 2)

    def test_oversized_frame_drops_and_reconnects(self) -> None:
        """A frame over max_frame from the hub drops that connection; the client reconnects."""

        def first(conn: ServerConn) -> None:
            conn.welcome()
            conn.read_frame()  # after the welcome was read, so it is not in the same read
            conn.sock.sendall(struct.pack(">I", 2**31))

        def second(conn: ServerConn) -> str:
            return str(conn.welcome()["device_id"])

        server = self.serve(first, second)
        c = self.client(server, device_id="r1")
        c.connect()
        c.send({"type": "telemetry"})
        server.result()
        self.assertEqual(server.result(), "r1")

    def test_no_auto_reconnect_raises(self) -> None:
        """Without auto_reconnect, sending after the link dropped raises ConnectionError."""

        def first(conn: ServerConn) -> None:
            conn.welcome()
            conn.close()

        server = self.serve(first)
        c = self.client(server, auto_reconnect=False)
        c.on_message(lambda m: None)
        c.connect()
        server.result()
        # The reader notices EOF and clears the connection; wait for it without sleeping.
        for t in list(c._readers):
            t.join(WAIT)
        self.assertRaises(ConnectionError, c.send, {"type": "telemetry"})

    def test_gives_up_after_max_attempts(self) -> None:
        """When the hub stays away, reconnecting stops after max_reconnect_attempts."""

        def first(conn: ServerConn) -> None:
            conn.welcome()

        server = self.serve(first)
        c = self.client(server, max_reconnect_attempts=2)
        c.connect()
        server.result()
        server.stop()  # listener closed: every reconnect is refused
        for t in list(c._readers):
            t.join(WAIT)
        self.assertFalse(c.is_connected)
        self.assertRaises(ConnectionError, c.send, {"type": "telemetry"})


class LegacyTests(BotClientTestsBase):
    def test_legacy_send_checks_8_byte_ack(self) -> None:
        """Legacy send: one connection per message, raw frame, 8-byte additive-sum ACK checked."""

        def behaviour(conn: ServerConn) -> bytes:
            payload = conn.read_payload()
            conn.sock.sendall(legacy_ack(payload))
            return payload

        server = self.serve(behaviour, behaviour)
        c = self.client(server, legacy=True)
        self.assertIsNone(c.connect())
        c.send({"type": "system_status", "message": "hi"})
        c.send({"type": "movement_complete"})
        self.assertEqual(orjson.loads(server.result()), {"type": "system_status", "message": "hi"})
        self.assertEqual(orjson.loads(server.result())["type"], "movement_complete")
        self.assertEqual(server.accepted, 2)

    def test_spec_example_ack(self) -> None:
        """The spec's example: payload of 42 bytes acked by 00 00 0E 28 'ACK' 00."""
        payload = b'{"type": "system_status", "message": "hi"}'
        self.assertEqual(len(payload), 42)
        self.assertEqual(legacy_ack(payload), bytes.fromhex("00000e28") + b"ACK\x00")

    def test_legacy_bad_ack_raises(self) -> None:
        """A legacy ACK with the wrong sum raises ChecksumError."""

        def behaviour(conn: ServerConn) -> None:
            payload = conn.read_payload()
            conn.sock.sendall(struct.pack(">I", additive_sum(payload) ^ 1) + b"ACK\x00")

        server = self.serve(behaviour)
        c = self.client(server, legacy=True, auto_reconnect=False)
        self.assertRaises(ChecksumError, c.send, {"type": "sensor_data"})

    def test_legacy_short_ack_raises(self) -> None:
        """A hub closing after fewer than 8 ACK bytes raises ConnectionError."""

        def behaviour(conn: ServerConn) -> None:
            conn.read_payload()
            conn.sock.sendall(b"\x00\x00")
            conn.close()

        server = self.serve(behaviour)
        c = self.client(server, legacy=True, auto_reconnect=False)
        self.assertRaises(ConnectionError, c.send, {"type": "sensor_data"})

    def test_poll_instruction(self) -> None:
        """poll_instruction sends raw REQUEST_INSTRUCTION and returns the one frame it gets."""

        def behaviour(conn: ServerConn) -> bytes:
            raw = conn.read_exact(len(LEGACY_POLL))
            conn.send({"type": "movement_instruction", "distance_cm": 30, "angle_degrees": 90})
            return raw

        server = self.serve(behaviour)
        c = self.client(server, legacy=True)
        self.assertEqual(
            c.poll_instruction(wait=WAIT),
            {"type": "movement_instruction", "distance_cm": 30, "angle_degrees": 90},
        )
        self.assertEqual(server.result(), b"REQUEST_INSTRUCTION")

    def test_poll_instruction_none_on_close(self) -> None:
        """poll_instruction returns None when the hub closes without an instruction."""

        def behaviour(conn: ServerConn) -> None:
            conn.read_exact(len(LEGACY_POLL))
            conn.close()

        server = self.serve(behaviour)
        c = self.client(server, legacy=True)
        self.assertIsNone(c.poll_instruction(wait=WAIT))

    def test_native_only_calls_refused(self) -> None:
        """request() and command() are refused in legacy mode."""
        c = BotClient("127.0.0.1", 9, legacy=True)
        self.assertRaises(RuntimeError, c.request, "status")
        self.assertRaises(RuntimeError, c.command, "robot_move")


class HeartbeatTests(BotClientTestsBase):
    def test_idle_client_pings(self) -> None:
        """An idle client sends {"type":"ping","id":N} so the hub's idle timeout does not close it."""

        def behaviour(conn: ServerConn) -> dict[str, Any]:
            conn.welcome(heartbeat_s=0.02)
            return conn.read_frame()

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        ping = server.result()
        self.assertEqual(ping["type"], "ping")
        self.assertIsInstance(ping["id"], int)

    def test_close_stops_threads(self) -> None:
        """close() ends the reader and dispatcher threads."""
        server = self.serve(lambda conn: conn.welcome())
        c = self.client(server)
        c.connect()
        threads = [*c._readers, c._dispatcher]
        c.close()
        self.assertEqual([t for t in threads if t is not None and t.is_alive()], [])


class ReplacedTests(BotClientTestsBase):
    def test_replaced_is_not_reconnected(self) -> None:
        """A link closed with error "replaced" is not re-opened (that would fight the other one)."""

        def first(conn: ServerConn) -> None:
            conn.welcome()
            conn.send({"type": "error", "code": "replaced", "message": "connected elsewhere", "ref": None})
            conn.close()

        server = self.serve(first, lambda conn: conn.welcome())
        c = self.client(server, device_id="robot_01")
        c.connect()
        server.result()
        for t in list(c._readers):
            t.join(WAIT)
        self.assertFalse(c.is_connected)
        self.assertEqual(server.accepted, 1)
        self.assertRaises(ConnectionError, c.send, {"type": "telemetry"})
        c.connect()  # an explicit connect() takes the id back
        self.assertTrue(c.is_connected)


class WriteFailureTests(BotClientTestsBase):
    def test_ack_send_retried_on_new_connection(self) -> None:
        """If writing a message fails, the client reconnects, sends it there and returns its ack."""

        def first(conn: ServerConn) -> bytes:
            conn.welcome()
            return conn.sock.recv(10)  # EOF once the client shuts its side

        def second(conn: ServerConn) -> dict[str, Any]:
            conn.welcome()
            payload = conn.read_payload()
            conn.send({"type": "ack", "id": orjson.loads(payload)["id"], "sum": additive_sum(payload)})
            return orjson.loads(payload)  # type: ignore[no-any-return]

        server = self.serve(first, second)
        c = self.client(server, device_id="r9")
        c.connect()
        assert c._sock is not None
        c._sock.shutdown(socket.SHUT_WR)  # the next write fails with EPIPE
        self.assertEqual(server.result(), b"")
        ack = c.send({"type": "movement_complete"}, ack=True)
        msg = server.result()
        self.assertEqual((ack["id"], msg["type"]), (msg["id"], "movement_complete"))  # type: ignore[index]
