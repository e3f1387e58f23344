"""LabAuto-compatible line connections (seed 001, spec/linelink.md "LabAuto" dialect).

A drop-in for ``LabAuto.network``: change ``from LabAuto.network import Connection, create_server``
to ``from robonet.client import Connection, create_server`` and a script keeps working, against
another LabAuto peer or against robonet's line link (``tcp:5555``).

Same API and behaviour as the original: ``send`` appends ``"\\n"``; ``receive`` returns one
stripped, non-blank line and raises ``ConnectionError("Connection closed by peer")`` at EOF;
``wait_for`` reads until an exact line; ``send_json``/``receive_json`` use :mod:`json` (so the
bytes on the wire are exactly what LabAuto sends). Differences, all fixes: no ``[SEND]``/``[RECV]``
prints unless ``verbose=True`` (debug logging on the ``robonet.client.labauto`` logger instead);
UTF-8 characters split across reads decode correctly (the original decoded each 1 KiB chunk
separately). :class:`ReconnectConnection` adds reconnect-and-retry on failures.
"""

from __future__ import annotations

import codecs
import json
import logging
import socket
import time
from typing import Any

log = logging.getLogger("robonet.client.labauto")

RECV_SIZE = 65536


def create_server(host: str, port: int, backlog: int = 1, verbose: bool = False) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR) on ``host:port`` for :meth:`Connection.accept`."""
    server_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server_socket.bind((host, port))
        server_socket.listen(backlog)
    except OSError:
        server_socket.close()
        raise
    _note(verbose, f"Server listening on {host}:{port}...")
    return server_socket


def _note(verbose: bool, text: str) -> None:
    if verbose:
        print(text)
    else:
        log.debug("%s", text)


class Connection:
    """A TCP socket speaking newline-terminated text lines (LabAuto's ``Connection``).

    ``buffer`` holds received text not yet returned by :meth:`receive`.
    """

    def __init__(self, sock: socket.socket, verbose: bool = False) -> None:
        self.sock = sock
        self.buffer = ""
        self.verbose = verbose
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    @classmethod
    def connect(cls, host_ip: str, port: int, verbose: bool = False) -> Connection:
        """Connect to ``host_ip:port`` and return a Connection (OSError if refused)."""
        s = socket.create_connection((host_ip, port))
        _note(verbose, f"Connected to {host_ip}:{port}")
        return cls(s, verbose=verbose)

    @classmethod
    def accept(cls, server_socket: socket.socket, verbose: bool = False) -> tuple[Connection, Any]:
        """Accept one client on ``server_socket``; returns ``(Connection, addr)``."""
        conn, addr = server_socket.accept()
        _note(verbose, f"Connected by {addr}")
        return cls(conn, verbose=verbose), addr

    def send(self, msg: str) -> None:
        """Send ``msg`` plus ``"\\n"`` (UTF-8), all of it."""
        self.sock.sendall((msg + "\n").encode())
        _note(self.verbose, f"[SEND] {msg}")

    def receive(self) -> str:
        """Return the next complete line, stripped, skipping blank lines.

        Raises ConnectionError("Connection closed by peer") at EOF (a final unterminated line
        is not returned, as in LabAuto), UnicodeDecodeError on invalid UTF-8.
        """
        while True:
            while "\n" in self.buffer:
                line, self.buffer = self.buffer.split("\n", 1)
                line = line.strip()
                if line:
                    _note(self.verbose, f"[RECV] {line}")
                    return line
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                raise ConnectionError("Connection closed by peer")
            self.buffer += self._decoder.decode(chunk)

    def wait_for(self, target: str) -> str:
        """Read lines until one equals ``target`` exactly; return it (others are discarded)."""
        while True:
            msg = self.receive()
            if msg == target:
                return msg

    def send_json(self, obj: Any) -> None:
        """Send ``json.dumps(obj)`` as one line."""
        self.send(json.dumps(obj))

    def receive_json(self) -> Any:
        """Receive one line and parse it as JSON (json.JSONDecodeError if it is not)."""
        return json.loads(self.receive())

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReconnectConnection(Connection):
    """A client :class:`Connection` that re-dials ``host:port`` when the link fails.

    A failed :meth:`send` reconnects and sends again; a :meth:`receive` that hits EOF or an error
    reconnects and keeps waiting on the new connection (text buffered from the old one is lost).
    Each call may reconnect up to ``attempts`` times, ``delay`` seconds apart, then raises
    ConnectionError. ``on_reconnect(conn)``, if given, runs after each reconnect (e.g. to send a
    hello line again).
    """

    def __init__(
        self,
        host: str,
        port: int,
        attempts: int = 3,
        delay: float = 1.0,
        verbose: bool = False,
        timeout: float | None = None,
        on_reconnect: Any = None,
    ) -> None:
        self.host = host
        self.port = port
        self.attempts = attempts
        self.delay = delay
        self.timeout = timeout
        self.on_reconnect = on_reconnect
        super().__init__(self._dial(), verbose=verbose)
        _note(verbose, f"Connected to {host}:{port}")

    @classmethod
    def connect(
        cls, host_ip: str, port: int, verbose: bool = False, attempts: int = 3, delay: float = 1.0
    ) -> ReconnectConnection:
        """Connect to ``host_ip:port`` (OSError if that first attempt fails)."""
        return cls(host_ip, port, attempts=attempts, delay=delay, verbose=verbose)

    def _dial(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=self.timeout)

    def reconnect(self) -> None:
        """Close the current socket and dial again, up to ``attempts`` tries ``delay`` s apart."""
        try:
            self.sock.close()
        except OSError:
            pass
        last: OSError | None = None
        for attempt in range(1, self.attempts + 1):
            if attempt > 1 or self.delay:
                time.sleep(self.delay)
            try:
                self.sock = self._dial()
            except OSError as e:
                last = e
                log.info(
                    "reconnect %d/%d to %s:%s failed: %s", attempt, self.attempts, self.host, self.port, e
                )
                continue
            self.buffer = ""
            self._decoder = codecs.getincrementaldecoder("utf-8")()
            _note(self.verbose, f"Reconnected to {self.host}:{self.port}")
            if self.on_reconnect is not None:
                self.on_reconnect(self)
            return
        raise ConnectionError(
            f"could not reconnect to {self.host}:{self.port} after {self.attempts} attempts: {last}"
        )

    def send(self, msg: str) -> None:
        """Send one line; on failure reconnect and send it again (up to ``attempts`` times)."""
        for _ in range(self.attempts + 1):
            try:
                super().send(msg)
                return
            except TimeoutError:
                raise
            except OSError as e:
                log.info("send to %s:%s failed (%s); reconnecting", self.host, self.port, e)
                self.reconnect()
        raise ConnectionError(f"could not send to {self.host}:{self.port}")

    def receive(self) -> str:
        """Receive one line; on EOF/failure reconnect and keep waiting (up to ``attempts`` times)."""
        failures = 0
        while True:
            try:
                return super().receive()
            except TimeoutError:
                raise
            except OSError as e:  # ConnectionError (EOF) is an OSError
                failures += 1
                if failures > self.attempts:
                    raise
                log.info("receive from %s:%s failed (%s); reconnecting", self.host, self.port, e)
                self.reconnect()
