"""Tests for robonet.client's LabAuto-compatible Connection over loopback sockets."""

from __future__ import annotations

import json
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from robonet.client import Connection, ReconnectConnection, create_server

WAIT = 5.0


class LabAutoTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = create_server("127.0.0.1", 0)
        self.server.settimeout(WAIT)
        self.addCleanup(self.server.close)
        self.port = self.server.getsockname()[1]
        self.results: queue.Queue[Any] = queue.Queue()
        self.threads: list[threading.Thread] = []

    def peer(self, behaviour: Callable[[socket.socket], Any], connections: int = 1) -> None:
        """Run ``behaviour(sock)`` for each of the next ``connections`` accepted sockets."""

        def run() -> None:
            for _ in range(connections):
                try:
                    sock, _ = self.server.accept()
                except OSError as e:
                    self.results.put(e)
                    return
                sock.settimeout(WAIT)
                try:
                    self.results.put(behaviour(sock))
                except BaseException as e:
                    self.results.put(e)
                finally:
                    sock.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.addCleanup(t.join, WAIT)

    def result(self) -> Any:
        r = self.results.get(timeout=WAIT)
        if isinstance(r, BaseException):
            raise r
        return r

    def connect(self) -> Connection:
        conn = Connection.connect("127.0.0.1", self.port)
        conn.sock.settimeout(WAIT)
        self.addCleanup(conn.close)
        return conn

    def test_blank_lines_skipped_and_stripped(self) -> None:
        """receive() returns stripped lines, skipping blank ones; several lines in one read all arrive."""
        self.peer(lambda s: s.sendall(b"\n  \r\n  ready \r\nsecond\n"))
        conn = self.connect()
        self.assertEqual(conn.receive(), "ready")
        self.assertEqual(conn.receive(), "second")

    def test_eof_raises_connection_error(self) -> None:
        """receive() at EOF raises ConnectionError("Connection closed by peer")."""
        self.peer(lambda s: s.sendall(b"partial without newline"))
        conn = self.connect()
        self.result()
        err = self.assertRaises(ConnectionError, conn.receive)
        self.assertEqual(str(err), "Connection closed by peer")

    def test_send_appends_newline(self) -> None:
        """send() writes the message plus one newline."""

        def behaviour(s: socket.socket) -> bytes:
            data = b""
            while data.count(b"\n") < 2:
                data += s.recv(100)
            return data

        self.peer(behaviour)
        conn = self.connect()
        conn.send("hello")
        conn.send("héllo")
        self.assertEqual(self.result(), "hello\nhéllo\n".encode())

    def test_utf8_split_across_reads(self) -> None:
        """A multi-byte character split across two TCP reads decodes correctly."""
        gate = threading.Event()

        def behaviour(s: socket.socket) -> None:
            s.sendall("é".encode()[:1])
            gate.wait(WAIT)
            s.sendall("é".encode()[1:] + b"t\xc3\xa9\n")

        self.peer(behaviour)
        conn = self.connect()
        # Read the first byte on its own, then let the rest come.
        conn.buffer += conn._decoder.decode(conn.sock.recv(1))
        gate.set()
        self.assertEqual(conn.receive(), "été")

    def test_wait_for(self) -> None:
        """wait_for() discards other lines until the exact target line."""
        self.peer(lambda s: s.sendall(b"busy\nready later\nready\nafter\n"))
        conn = self.connect()
        self.assertEqual(conn.wait_for("ready"), "ready")
        self.assertEqual(conn.receive(), "after")

    def test_json_round_trip(self) -> None:
        """send_json writes json.dumps(obj) as a line; receive_json parses one line."""

        def behaviour(s: socket.socket) -> bytes:
            data = b""
            while b"\n" not in data:
                data += s.recv(100)
            s.sendall(b'{"status": "ok", "steps": 100}\n')
            return data

        self.peer(behaviour)
        conn = self.connect()
        conn.send_json({"cmd": "move", "steps": 100})
        self.assertEqual(conn.receive_json(), {"status": "ok", "steps": 100})
        self.assertEqual(self.result(), b'{"cmd": "move", "steps": 100}\n')

    def test_bad_json_raises(self) -> None:
        """receive_json on a non-JSON line raises ValueError; the next line is still readable."""
        self.peer(lambda s: s.sendall(b"not json\n[1]\n"))
        conn = self.connect()
        self.assertRaises(ValueError, conn.receive_json)
        self.assertEqual(conn.receive_json(), [1])

    def test_accept(self) -> None:
        """Connection.accept wraps an accepted client; the LabAuto server example works."""
        client = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(client.close)
        conn, addr = Connection.accept(self.server)
        self.addCleanup(conn.close)
        self.assertEqual(addr, client.getsockname())
        client.sendall(b"hello\n")
        self.assertEqual(conn.receive(), "hello")
        conn.send("ok")
        self.assertEqual(client.recv(10), b"ok\n")

    def test_no_prints_by_default(self) -> None:
        """Nothing is printed unless verbose=True (LabAuto printed [SEND]/[RECV])."""
        import contextlib
        import io

        self.peer(lambda s: s.sendall(b"x\n"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            conn = self.connect()
            conn.receive()
        self.assertEqual(out.getvalue(), "")
        self.peer(lambda s: s.sendall(b"y\n"))
        with contextlib.redirect_stdout(out):
            loud = Connection.connect("127.0.0.1", self.port, verbose=True)
            self.addCleanup(loud.close)
            loud.receive()
        self.assertIn("[RECV] y", out.getvalue())

    def test_reconnect_on_eof(self) -> None:
        """ReconnectConnection re-dials when the peer closes and keeps waiting for a line."""

        def behaviour(s: socket.socket) -> str:
            if not hasattr(self, "_first_done"):
                self._first_done = True
                return "closed first"
            s.sendall(b"ready\n")
            return "sent"

        self.peer(behaviour, connections=2)
        conn = ReconnectConnection("127.0.0.1", self.port, attempts=2, delay=0.0, timeout=WAIT)
        self.addCleanup(conn.close)
        self.assertEqual(conn.receive(), "ready")

    def test_reconnect_gives_up(self) -> None:
        """ReconnectConnection raises ConnectionError once its attempts are used up."""
        self.peer(lambda s: None)
        conn = ReconnectConnection("127.0.0.1", self.port, attempts=1, delay=0.0, timeout=WAIT)
        self.addCleanup(conn.close)
        self.result()
        self.server.close()
        self.assertRaises(ConnectionError, conn.receive)

    def test_send_json_uses_stdlib_format(self) -> None:
        """Lines are exactly what LabAuto's json.dumps writes (spaces after separators)."""
        self.assertEqual(json.dumps({"cmd": "move", "steps": 100}), '{"cmd": "move", "steps": 100}')
