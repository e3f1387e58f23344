"""Tests for robonet.client.Client (witch-core style) against a loopback line server."""

from __future__ import annotations

import json
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from robonet.client import Client

WAIT = 5.0


class LineServer:
    """Serves ``behaviours`` (one per accepted connection) on 127.0.0.1 in a thread."""

    def __init__(self, behaviours: list[Callable[[socket.socket], Any]]) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(WAIT)
        self.port = self.lsock.getsockname()[1]
        self.behaviours = behaviours
        self.results: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for behaviour in self.behaviours:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            sock.settimeout(WAIT)
            try:
                self.results.put(behaviour(sock))
            except BaseException as e:
                self.results.put(e)
            finally:
                sock.close()

    def stop(self) -> None:
        self.lsock.close()
        self.thread.join(WAIT)


def read_lines(sock: socket.socket, n: int) -> list[dict[str, Any]]:
    data = b""
    while data.count(b"\n") < n:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def echo_server(n: int) -> Callable[[socket.socket], int]:
    """Answers ``n`` requests, one JSON line each, echoing the request's data."""

    def behaviour(sock: socket.socket) -> int:
        buf = b""
        for _ in range(n):
            while b"\n" not in buf:
                buf += sock.recv(4096)
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            sock.sendall(
                json.dumps({"status": "success", "data": req.get("data"), "timestamp": "t"}).encode() + b"\n"
            )
        return n

    return behaviour


class FakeThreadPool:
    """Runs 'threaded' work at once (deferToThreadPool's contract, synchronously)."""

    def callInThreadWithCallback(
        self, on_result: Callable[..., None], f: Callable[..., Any], *a: Any
    ) -> None:
        try:
            r = f(*a)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, r)


class FakeReactor:
    def __init__(self) -> None:
        self.pool = FakeThreadPool()

    def getThreadPool(self) -> FakeThreadPool:
        return self.pool

    def callFromThread(self, f: Callable[..., Any], *a: Any) -> None:
        f(*a)


class WitchClientTests(SynchronousTestCase):
    def serve(self, *behaviours: Callable[[socket.socket], Any]) -> LineServer:
        s = LineServer(list(behaviours))
        self.addCleanup(s.stop)
        return s

    def client(self, server: LineServer, **kw: Any) -> Client:
        kw.setdefault("reconnect_delay", 0.0)
        kw.setdefault("timeout", WAIT)
        c = Client("127.0.0.1", server.port, **kw)
        self.addCleanup(c.disconnect)
        return c

    def test_connect_and_request(self) -> None:
        """connect() returns True; send_and_receive sends one JSON line and returns the reply dict."""
        server = self.serve(echo_server(2))
        c = self.client(server)
        self.assertTrue(c.connect())
        self.assertTrue(c.is_connected)
        self.assertEqual(c.send_and_receive({"endpoint": "echo", "data": "Hello"})["data"], "Hello")  # type: ignore
        self.assertEqual(c.send_and_receive({"endpoint": "echo", "data": [1]})["data"], [1])  # type: ignore
        c.disconnect()
        self.assertFalse(c.is_connected)

    def test_connect_refused(self) -> None:
        """connect() returns False when nothing listens."""
        s = socket.create_server(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.assertFalse(Client("127.0.0.1", port, timeout=WAIT).connect())

    def test_pipelined_replies_are_kept(self) -> None:
        """Two reply lines arriving in one read answer two successive requests (witch-core lost the 2nd)."""

        def behaviour(sock: socket.socket) -> None:
            read_lines(sock, 1)
            sock.sendall(b'{"n": 1}\n{"n": 2}\n')
            read_lines(sock, 1)

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        self.assertEqual(c.send_and_receive({"request": "ping"}), {"n": 1})
        self.assertEqual(c.send_and_receive({"request": "ping"}), {"n": 2})

    def test_timeout_returns_none_and_drops(self) -> None:
        """A request without a reply returns None after timeout and drops the connection."""
        done = threading.Event()

        def behaviour(sock: socket.socket) -> None:
            read_lines(sock, 1)
            done.wait(WAIT)

        server = self.serve(behaviour)
        self.addCleanup(done.set)
        c = self.client(server, timeout=0.05, auto_reconnect=False)
        c.connect()
        self.assertIsNone(c.send_and_receive({"request": "ping"}))
        self.assertFalse(c.is_connected)

    def test_reconnects_after_server_restart(self) -> None:
        """A request on a connection the server already closed reconnects and is answered."""
        closed = threading.Event()

        def first(sock: socket.socket) -> None:
            closed.set()

        server = self.serve(first, echo_server(1))
        c = self.client(server)
        c.connect()
        closed.wait(WAIT)
        self.assertEqual(
            c.send_and_receive({"endpoint": "echo", "data": 5}),
            {"status": "success", "data": 5, "timestamp": "t"},
        )

    def test_not_json_reply(self) -> None:
        """A reply that is not a JSON object gives None; the client still works afterwards."""

        def behaviour(sock: socket.socket) -> None:
            read_lines(sock, 1)
            sock.sendall(b"plain text\n")
            echo_server(1)(sock)

        server = self.serve(behaviour)
        c = self.client(server)
        c.connect()
        self.assertIsNone(c.send_and_receive({"request": "ping"}))
        self.assertEqual(c.send_and_receive({"endpoint": "echo", "data": 1})["data"], 1)  # type: ignore[index]

    def test_no_auto_reconnect(self) -> None:
        """Without auto_reconnect a request while disconnected returns None."""
        server = self.serve()
        c = self.client(server, auto_reconnect=False)
        self.assertIsNone(c.send_and_receive({"request": "ping"}))

    def test_send_async(self) -> None:
        """send_async runs the request in the reactor's thread pool and fires with the reply."""
        server = self.serve(echo_server(1))
        c = self.client(server, reactor=FakeReactor())
        c.connect()
        d = c.send_async({"endpoint": "echo", "data": "async"})
        self.assertEqual(self.successResultOf(d)["data"], "async")

    def test_overlong_reply_dropped(self) -> None:
        """A reply line over max_line returns None and drops the connection; the next request works."""

        def behaviour(sock: socket.socket) -> None:
            read_lines(sock, 1)
            try:
                sock.sendall(b"x" * 300_000)
            except OSError:
                pass

        server = self.serve(behaviour, echo_server(1))
        c = self.client(server, max_line=100_000)
        c.connect()
        self.assertIsNone(c.send_and_receive({"request": "ping"}))
        self.assertFalse(c.is_connected)
        self.assertEqual(c.send_and_receive({"endpoint": "echo", "data": 2})["data"], 2)  # type: ignore[index]
