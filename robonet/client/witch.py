"""witch-core style request client for the line link (seed 002, spec/linelink.md).

:class:`Client` sends one JSON object per line (``{"endpoint": "echo", "data": ...}``,
``{"request": "ping"}``, ...) and reads one JSON line back. It is the original witch-core
``Client`` API (``connect() -> bool``, ``disconnect()``, ``is_connected``, ``send_and_receive``,
``send_async``, the same constructor arguments) with two fixes: replies are read from a line
buffer, so several lines arriving in one read are kept for the next call (the original lost
them), and a request that times out drops the connection, so a late reply can never be taken as
the answer to the next request.

``send_async`` runs :meth:`Client.send_and_receive` in the reactor's thread pool
(``twisted.internet.threads.deferToThreadPool``) and returns a Deferred; calls from several
threads are serialised by a lock (one request in flight per connection).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

log = logging.getLogger("robonet.client.witch")

RECV_SIZE = 65536


class _PeerClosed(ConnectionError):
    """EOF while waiting for a reply; ``got_bytes`` says whether any of it had arrived."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__("connection closed by peer")
        self.got_bytes = got_bytes


class _LineTooLong(ValueError):
    """A reply line over ``max_line`` bytes (the connection is dropped)."""


class Client:
    """A blocking line-link request client (witch-core's ``Client``).

    ``timeout`` (seconds) bounds connecting and each wait for a reply. With ``auto_reconnect``,
    a request on a dropped connection reconnects (up to ``max_reconnect_attempts`` tries,
    ``reconnect_delay`` seconds apart) and is sent once more if the old connection had died
    before any reply byte arrived. ``reactor`` (optional) is used by :meth:`send_async`.
    A reply line over ``max_line`` bytes drops the connection (the request returns None).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5555,
        timeout: float = 5.0,
        auto_reconnect: bool = True,
        max_reconnect_attempts: int = 3,
        reconnect_delay: float = 1.0,
        *,
        reactor: Any = None,
        max_line: int = 16 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.auto_reconnect = auto_reconnect
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self._reactor = reactor
        self.max_line = max_line
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._lock = threading.RLock()

    @property
    def is_connected(self) -> bool:
        """True while the TCP connection is open (as far as this client knows)."""
        return self._sock is not None

    def connect(self) -> bool:
        """Open the connection (one attempt). Returns True on success, False on failure."""
        with self._lock:
            if self._sock is not None:
                return True
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as e:
                log.info("connect to %s:%s failed: %s", self.host, self.port, e)
                return False
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._buffer = b""
            log.info("connected to %s:%s", self.host, self.port)
            return True

    def disconnect(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            sock, self._sock = self._sock, None
            self._buffer = b""
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    close = disconnect

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    def _reconnect(self) -> bool:
        for attempt in range(1, self.max_reconnect_attempts + 1):
            if self.connect():
                return True
            log.info("reconnect attempt %d/%d failed", attempt, self.max_reconnect_attempts)
            if attempt < self.max_reconnect_attempts:
                time.sleep(self.reconnect_delay)
        return False

    def send_and_receive(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Send ``request`` as one JSON line and return the next JSON-object line received.

        Returns None when not connected (and reconnecting is off or fails), on timeout, when the
        connection drops, or when the reply is not a JSON object; the reason is logged.
        """
        line = json.dumps(request).encode() + b"\n"
        with self._lock:
            for attempt in (1, 2):
                if self._sock is None and not (self.auto_reconnect and self._reconnect()):
                    log.info("not connected to %s:%s", self.host, self.port)
                    return None
                try:
                    return self._exchange(line)
                except TimeoutError:
                    log.info("no reply from %s:%s within %g s", self.host, self.port, self.timeout)
                    self.disconnect()
                    return None
                except _LineTooLong as e:
                    log.info("dropping the connection to %s:%s: %s", self.host, self.port, e)
                    self.disconnect()
                    return None
                except _PeerClosed as e:
                    self.disconnect()
                    if e.got_bytes or not self.auto_reconnect or attempt == 2:
                        log.info("connection to %s:%s closed while waiting for a reply", self.host, self.port)
                        return None
                except OSError as e:
                    self.disconnect()
                    if not self.auto_reconnect or attempt == 2:
                        log.info("request to %s:%s failed: %s", self.host, self.port, e)
                        return None
            return None

    def _exchange(self, line: bytes) -> dict[str, Any] | None:
        sock = self._sock
        assert sock is not None
        sock.sendall(line)
        got = False
        while True:
            nl = self._buffer.find(b"\n")
            while nl >= 0:
                raw, self._buffer = self._buffer[:nl], self._buffer[nl + 1 :]
                raw = raw.strip()
                if raw:
                    return _parse_reply(raw)
                nl = self._buffer.find(b"\n")
            if len(self._buffer) > self.max_line:
                raise _LineTooLong(f"reply line longer than {self.max_line} bytes")
            chunk = sock.recv(RECV_SIZE)
            if not chunk:
                raise _PeerClosed(got)
            got = True
            self._buffer += chunk

    def send_async(self, request: dict[str, Any]) -> Deferred[dict[str, Any] | None]:
        """Like :meth:`send_and_receive`, in the reactor's thread pool; returns a Deferred.

        The Deferred fires (in the reactor thread) with the reply dict or None. Needs a running
        reactor: the one given to the constructor, else the global one.
        """
        from twisted.internet.threads import deferToThreadPool

        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        return deferToThreadPool(reactor, reactor.getThreadPool(), self.send_and_receive, request)


def _parse_reply(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        log.info("reply is not JSON: %r", raw[:200])
        return None
    if not isinstance(obj, dict):
        log.info("reply is not a JSON object: %r", raw[:200])
        return None
    return obj
