"""Blocking bot-link client for robot programs and scripts (spec/botlink.md).

:class:`BotClient` speaks the native robonet/1 dialect over one persistent connection (hello,
acks with the additive checksum, requests, commands, pings) or, with ``legacy=True``, behaves
like a Cartobot bot (one connection per message, 8-byte ACK, ``REQUEST_INSTRUCTION`` polls).

Threads: a background reader thread per connection parses frames and wakes the callers waiting
for acks; a dispatcher thread runs user callbacks (:meth:`BotClient.on_command`,
:meth:`BotClient.on_message`) one at a time, so a callback may itself call :meth:`BotClient.send`
with ``ack=True`` without dead-locking the reader. Every public method is thread-safe.

Logging goes to the stdlib logger ``robonet.client`` (a robot script does not run a Twisted
logging observer; Twisted's would buffer events in memory until one starts).
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import attrs
import orjson

from robonet import PROTO_VERSION
from robonet.config import DEFAULT_COMMANDS
from robonet.protocols.botlink import (
    LEGACY_POLL,
    FrameDecoder,
    FrameError,
    ack_frame,
    additive_sum,
    encode_frame,
    legacy_ack,
)

log = logging.getLogger("robonet.client")

DEFAULT_MAX_FRAME = 1048576
# Message types the hub delivers to robots as commands (config ``hub.commands``); a frame from the
# hub of one of these types, or any frame carrying an ``id`` that is not a reply, goes to on_command.
COMMAND_TYPES = frozenset(DEFAULT_COMMANDS)
REPLY_TYPES = frozenset(("ack", "response"))
AUTH_CODES = frozenset(("auth_failed", "unauthorized"))

MessageCallback = Callable[[dict[str, Any]], object]


class RemoteError(Exception):
    """The hub answered with an error (spec/botlink.md section 7).

    ``code`` is the spec's error code (``unknown_endpoint``, ``device_offline``, ...), ``message``
    its human text, ``ref`` the id of the frame it refers to (or None).
    """

    def __init__(self, code: str, message: str = "", ref: int | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message or code.replace("_", " ")
        self.ref = ref

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class HelloRejected(RemoteError, ConnectionError):
    """The hub refused the hello (``bad_hello``, ``proto_unsupported``, ...) and closed."""


class AuthError(HelloRejected):
    """The hub refused the hello's token (``auth_failed``) or demanded one (``unauthorized``)."""


class ChecksumError(Exception):
    """An ack's ``sum`` (or a legacy ACK) does not match the additive checksum of what was sent."""

    def __init__(self, expected: int, got: Any) -> None:
        super().__init__(f"checksum mismatch: sent payload sums to {expected}, ack says {got!r}")
        self.expected = expected
        self.got = got


def classify(msg: dict[str, Any]) -> str:
    """Which handler a decoded frame from the hub goes to.

    Returns ``"reply"`` (ack/response), ``"error"``, ``"ping"``, ``"command"`` (a command type or
    any other frame with an ``id``: the hub wants it acked) or ``"message"`` (everything else).
    """
    t = msg.get("type")
    if t in REPLY_TYPES:
        return "reply"
    if t == "error":
        return "error"
    if t == "ping":
        return "ping"
    if t in COMMAND_TYPES or isinstance(msg.get("id"), int):
        return "command"
    return "message"


def hello_message(role: str, device_id: str | None, name: str | None, token: str | None) -> dict[str, Any]:
    """The native hello object (spec/botlink.md "Native dialect" step 1); unset fields left out."""
    hello: dict[str, Any] = {"type": "hello", "proto": PROTO_VERSION, "role": role}
    if device_id:
        hello["device_id"] = device_id
    if name:
        hello["name"] = name
    if token:
        hello["token"] = token
    return hello


def hello_error(msg: dict[str, Any]) -> HelloRejected:
    """Map an error frame answering a hello to :class:`AuthError` or :class:`HelloRejected`."""
    code = str(msg.get("code") or "bad_hello")
    cls = AuthError if code in AUTH_CODES else HelloRejected
    return cls(code, str(msg.get("message") or ""), None)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes; ConnectionError if the peer closes first."""
    chunks = []
    remaining = n
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ConnectionError(f"connection closed after {n - remaining} of {n} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


@attrs.define(slots=True, eq=False)
class _Waiter:
    """One caller blocked on the reply to frame ``id``."""

    expected_sum: int | None
    event: threading.Event = attrs.Factory(threading.Event)
    reply: dict[str, Any] | None = None
    error: BaseException | None = None

    def resolve(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()


class BotClient:
    """A blocking, thread-safe bot-link client.

    ``role`` is ``"robot"`` (sends data, receives commands) or ``"client"`` (sends commands and
    requests). ``timeout`` (seconds) bounds connecting and each wait for an ack/response.
    With ``auto_reconnect`` a dropped connection is re-opened in the background (hello re-sent,
    the hub-assigned ``device_id`` kept) with up to ``max_reconnect_attempts`` attempts,
    ``reconnect_delay`` seconds apart; after that, the next :meth:`send` tries another round.
    Frames awaiting an ack when a connection drops fail with ConnectionError (they are not
    re-sent: the hub may have processed them). A connection the hub closes with ``replaced``
    (the same device id connected elsewhere) is not re-opened until :meth:`connect` is called.
    With ``legacy=True`` the client is a Cartobot bot:
    see :meth:`send` and :meth:`poll_instruction`.

    Use as a context manager (``with BotClient(...) as bot:`` connects and closes).
    ``fingerprint`` (SHA-256, ``AB:CD:...``, as the hub logs it) connects with TLS to an ``ssl:``
    bot link and accepts only that certificate (robonet.tls.PinMismatch otherwise).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        device_id: str | None = None,
        role: str = "robot",
        name: str | None = None,
        token: str | None = None,
        timeout: float = 5.0,
        auto_reconnect: bool = True,
        max_reconnect_attempts: int = 3,
        reconnect_delay: float = 1.0,
        legacy: bool = False,
        max_frame: int = DEFAULT_MAX_FRAME,
        source_address: tuple[str, int] | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if role not in ("robot", "client"):
            raise ValueError(f"role must be 'robot' or 'client', not {role!r}")
        self.host = host
        self.port = port
        self.device_id = device_id
        self.role = role
        self.name = name
        self.token = token
        self.timeout = timeout
        self.auto_reconnect = auto_reconnect
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.legacy = legacy
        self.max_frame = max_frame
        self.source_address = source_address
        # TLS to an ssl: bot link, accepting only the certificate with this SHA-256 (robonet/tls.py)
        self.fingerprint = fingerprint
        self.welcome: dict[str, Any] | None = None
        self._lock = threading.Lock()  # _sock, _pending, _ids
        self._write_lock = threading.Lock()  # one frame at a time on the wire
        self._connect_lock = threading.Lock()  # one (re)connect at a time
        self._closed = threading.Event()
        self._sock: socket.socket | None = None
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._heartbeat = 10.0
        self._last_write = 0.0
        self._command_cbs: list[MessageCallback] = []
        self._message_cbs: list[MessageCallback] = []
        self._dispatch: queue.SimpleQueue[tuple[str, dict[str, Any], bytes, socket.socket] | None] = (
            queue.SimpleQueue()
        )
        self._dispatcher: threading.Thread | None = None
        self._readers: list[threading.Thread] = []
        self._replaced = False  # the hub closed us with "replaced"

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """True while a welcomed native connection is open (always False in legacy mode)."""
        return self._sock is not None

    def connect(self) -> dict[str, Any] | None:
        """Open the connection and say hello (one attempt).

        Returns the welcome object (``session``, ``server``, ``heartbeat_s``, ``max_frame``,
        ``device_id`` when the hub assigned one). Raises :class:`AuthError` / :class:`HelloRejected`
        (both ConnectionError) on an error frame, ConnectionError / TimeoutError / OSError on
        network failure. In legacy mode there is no session: returns None.
        """
        self._closed.clear()
        self._replaced = False
        if self.legacy:
            return None
        with self._connect_lock:
            if self._sock is not None:
                return self.welcome
            return self._open()

    def close(self) -> None:
        """Close the connection and stop the threads; waiting callers get ConnectionError."""
        self._closed.set()
        with self._lock:
            sock, self._sock = self._sock, None
        self._fail_pending(ConnectionError("client closed"))
        if sock is not None:
            _shutdown(sock)
        if self._dispatcher is not None:
            self._dispatch.put(None)
        me = threading.current_thread()
        for t in [*self._readers, self._dispatcher]:
            if t is not None and t is not me:
                t.join(timeout=self.timeout)
        self._readers = [t for t in self._readers if t.is_alive()]
        self._dispatcher = None

    def __enter__(self) -> BotClient:
        if not self.legacy and not self.is_connected:
            self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- callbacks -------------------------------------------------------------------------

    def on_command(self, callback: MessageCallback) -> MessageCallback:
        """Call ``callback(msg_dict)`` for each command from the hub (usable as a decorator).

        The command's ``id`` is acked once every command callback has returned; if one raises,
        the hub gets ``{"type":"error","code":"internal","ref":id}`` instead. Callbacks run on
        the client's dispatcher thread, one at a time, in arrival order.
        """
        self._command_cbs.append(callback)
        return callback

    def on_message(self, callback: MessageCallback) -> MessageCallback:
        """Call ``callback(msg_dict)`` for every other frame (events, errors without a waiter);
        commands too while no :meth:`on_command` callback is registered (they are still acked)."""
        self._message_cbs.append(callback)
        return callback

    # --- sending ---------------------------------------------------------------------------

    def send(
        self, msg: dict[str, Any], ack: bool = False, timeout: float | None = None
    ) -> dict[str, Any] | None:
        """Send one message (a dict with ``type``).

        ``ack=False``: fire-and-forget, returns None. ``ack=True``: the client gives the message
        its own ``id`` (replacing any), waits up to ``timeout`` (default ``self.timeout``) seconds
        for ``{"type":"ack","id":..,"sum":..}`` and returns it after checking ``sum`` against the
        additive checksum of the bytes sent. Raises ChecksumError on mismatch, TimeoutError,
        RemoteError (error frame with that ``ref``), ConnectionError.

        Legacy mode: opens a connection, sends the frame, reads exactly the 8-byte ACK and checks
        it (ChecksumError on mismatch), closes; always acked, returns None.
        """
        if self.legacy:
            self._legacy_send(msg, timeout)
            return None
        if not ack:
            self._write(encode_frame(orjson.dumps(msg)))
            return None
        return self._call(dict(msg), timeout)

    def request(self, endpoint: str, data: Any = None, timeout: float | None = None) -> Any:
        """Call a hub endpoint (spec section 5); returns the response's ``data``.

        Raises RemoteError(code, message) for an error response, TimeoutError, ConnectionError.
        """
        self._native_only("request")
        reply = self._call({"type": "request", "endpoint": endpoint, "data": data}, timeout)
        if reply.get("type") == "response" and reply.get("status") != "success":
            raise RemoteError(
                str(reply.get("code") or "error"), str(reply.get("message") or ""), reply.get("id")
            )
        return reply.get("data")

    def command(
        self, type: str, target: str | None = None, *, timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send a command (e.g. ``command("robot_move", "robot_01", x=0.5, y=0)``) and wait.

        ``target`` None addresses every robot. Returns the hub's ack once the robot(s) acked it;
        raises RemoteError (``device_offline``, ``unknown_command``, ``delivery_timeout``, ...).
        ``timeout`` defaults to ``self.timeout`` + 5 s so the hub's own delivery_timeout (5 s)
        arrives first.
        """
        self._native_only("command")
        msg: dict[str, Any] = {"type": type, **fields}
        if target is not None:
            msg["device_id"] = target
        return self._call(msg, self.timeout + 5.0 if timeout is None else timeout)

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Send ``{"type":"ping","id":N}`` and wait for its ack (returns it)."""
        self._native_only("ping")
        return self._call({"type": "ping"}, timeout)

    def poll_instruction(self, wait: float = 15.0) -> dict[str, Any] | None:
        """Legacy instruction pull (spec/botlink.md legacy section).

        Opens a new connection, sends the raw 19 bytes ``REQUEST_INSTRUCTION`` and waits up to
        ``wait`` seconds for one frame. Returns the instruction dict, or None when the hub closes
        without one or the wait runs out (the bot polls again).
        """
        sock = self._dial()
        try:
            sock.sendall(LEGACY_POLL)
            sock.settimeout(wait)
            decoder = FrameDecoder(self.max_frame)
            while True:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    return None
                if not data:
                    return None
                try:
                    frames = decoder.feed(data)
                    obj = orjson.loads(frames[0]) if frames else None
                except (FrameError, orjson.JSONDecodeError) as e:
                    log.info("ignoring a bad instruction frame: %s", e)
                    return None
                if frames:
                    return obj if isinstance(obj, dict) else None
        finally:
            sock.close()

    # --- internals: native -----------------------------------------------------------------

    def _native_only(self, what: str) -> None:
        if self.legacy:
            raise RuntimeError(f"{what}() is not available in legacy mode (Cartobot bots only send)")

    def _dial(self) -> socket.socket:
        sock = socket.create_connection(
            (self.host, self.port), timeout=self.timeout, source_address=self.source_address
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.fingerprint:
            from robonet.tls import wrap_pinned

            return wrap_pinned(sock, self.fingerprint)  # raises PinMismatch for another certificate
        return sock

    def _open(self) -> dict[str, Any]:
        """Connect, hello, read the welcome; start the reader. Caller holds _connect_lock."""
        sock = self._dial()
        decoder = FrameDecoder(self.max_frame)
        try:
            hello = hello_message(self.role, self.device_id, self.name, self.token)
            sock.sendall(encode_frame(orjson.dumps(hello)))
            frames: list[bytes] = []
            while not frames:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed before welcome")
                try:
                    frames = decoder.feed(data)
                except FrameError as e:
                    raise ConnectionError(f"bad frame from hub before welcome: {e.message}") from e
            try:
                first = orjson.loads(frames[0])
            except orjson.JSONDecodeError as e:
                raise ConnectionError("the hub's first frame is not JSON") from e
            if not isinstance(first, dict):
                raise ConnectionError(f"expected a welcome, got {first!r}")
            if first.get("type") == "error":
                raise hello_error(first)
            if first.get("type") != "welcome":
                raise ConnectionError(f"expected a welcome, got {first.get('type')!r}")
        except BaseException:
            sock.close()
            raise
        self.welcome = first
        if isinstance(first.get("device_id"), str):
            self.device_id = first["device_id"]
        hb = first.get("heartbeat_s")
        self._heartbeat = float(hb) if isinstance(hb, (int, float)) and hb > 0 else 10.0
        # The reader wakes every half heartbeat to send a ping if nothing else was written.
        sock.settimeout(self._heartbeat / 2)
        self._last_write = time.monotonic()
        with self._lock:
            self._sock = sock
        log.info("connected to %s:%s as %s (%s)", self.host, self.port, self.device_id, self.role)
        reader = threading.Thread(
            target=self._reader,
            args=(sock, decoder, frames[1:]),
            name=f"botclient-reader-{self.device_id}",
            daemon=True,
        )
        self._readers = [t for t in self._readers if t.is_alive()]
        self._readers.append(reader)
        if self._dispatcher is None or not self._dispatcher.is_alive():
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, name=f"botclient-dispatch-{self.device_id}", daemon=True
            )
            self._dispatcher.start()
        reader.start()
        return first

    def _ensure_connected(self) -> socket.socket:
        sock = self._sock
        if sock is not None:
            return sock
        if self._closed.is_set():
            raise ConnectionError("client is closed")
        if not self.auto_reconnect:
            raise ConnectionError("not connected")
        if self._replaced:
            raise ConnectionError(f"device {self.device_id} connected elsewhere (replaced); call connect()")
        with self._connect_lock:
            if self._sock is not None:
                return self._sock
            self._reconnect(initial_delay=False)
            assert self._sock is not None
            return self._sock

    def _reconnect(self, initial_delay: bool) -> None:
        """Up to max_reconnect_attempts connects, reconnect_delay apart. Caller holds _connect_lock."""
        last: BaseException | None = None
        for attempt in range(1, self.max_reconnect_attempts + 1):
            if (initial_delay or attempt > 1) and self._closed.wait(self.reconnect_delay):
                raise ConnectionError("client closed")
            if self._closed.is_set():
                raise ConnectionError("client closed")
            try:
                self._open()
                return
            except AuthError:
                raise
            except (OSError, RemoteError, ValueError) as e:
                last = e
                log.info(
                    "reconnect attempt %d/%d to %s:%s failed: %s",
                    attempt,
                    self.max_reconnect_attempts,
                    self.host,
                    self.port,
                    e,
                )
        raise ConnectionError(f"could not reconnect after {self.max_reconnect_attempts} attempts: {last}")

    def _write(self, frame: bytes, sock: socket.socket | None = None, retry: bool = True) -> None:
        """Write one frame on ``sock`` (default: the current connection, (re)connecting if allowed;
        with ``retry`` a failed write is tried once more on a new connection)."""
        for attempt in (1, 2):
            target = sock if sock is not None else self._ensure_connected()
            try:
                with self._write_lock:
                    target.sendall(frame)
                    self._last_write = time.monotonic()
                return
            except OSError as e:
                self._lost(target, f"write failed: {e}")
                if sock is not None or not retry or not self.auto_reconnect or attempt == 2:
                    raise ConnectionError(f"send failed: {e}") from e

    def _call(self, msg: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send ``msg`` with a fresh id and wait for its ack/response; check an ack's sum."""
        wait = self.timeout if timeout is None else timeout
        with self._lock:
            msg_id = next(self._ids)
        msg["id"] = msg_id
        payload = orjson.dumps(msg)
        frame = encode_frame(payload)
        try:
            for attempt in (1, 2):
                # A fresh waiter per attempt: a failed write fails every waiter of that connection.
                waiter = _Waiter(expected_sum=additive_sum(payload))
                with self._lock:
                    self._pending[msg_id] = waiter
                try:
                    self._write(frame, retry=False)
                    break
                except ConnectionError:
                    if not self.auto_reconnect or attempt == 2:
                        raise
            if not waiter.event.wait(wait):
                raise TimeoutError(f"no reply to {msg.get('type')} id {msg_id} within {wait:g} s")
        finally:
            with self._lock:
                self._pending.pop(msg_id, None)
        if waiter.error is not None:
            raise waiter.error
        reply = waiter.reply
        assert reply is not None
        if reply.get("type") == "ack" and reply.get("sum") != waiter.expected_sum:
            raise ChecksumError(waiter.expected_sum or 0, reply.get("sum"))
        return reply

    def _fail_pending(self, error: BaseException) -> None:
        with self._lock:
            waiters, self._pending = self._pending, {}
        for w in waiters.values():
            w.fail(error)

    def _lost(self, sock: socket.socket, why: str) -> bool:
        """Forget ``sock`` if it is current; fail its waiters. True if it was current."""
        with self._lock:
            current = self._sock is sock
            if current:
                self._sock = None
        _shutdown(sock)
        if current:
            log.info("connection to %s:%s lost (%s)", self.host, self.port, why)
            self._fail_pending(ConnectionError(f"connection lost: {why}"))
        return current

    def _reader(self, sock: socket.socket, decoder: FrameDecoder, initial: list[bytes]) -> None:
        why = "closed by peer"
        try:
            for payload in initial:
                self._handle(payload, sock)
            while True:
                try:
                    data = sock.recv(262144)
                except TimeoutError:
                    self._maybe_ping(sock)
                    continue
                except OSError as e:
                    why = str(e)
                    break
                if not data:
                    break
                try:
                    frames = decoder.feed(data)
                except FrameError as e:
                    why = f"{e.code}: {e.message}"
                    break
                for payload in frames:
                    self._handle(payload, sock)
        finally:
            self._lost(sock, why)
        # Whoever noticed the loss (this reader or a failed write), the reader of the dead
        # connection re-opens it so a robot that only listens for commands comes back too.
        if self.auto_reconnect and not self._closed.is_set() and self._sock is None and not self._replaced:
            try:
                with self._connect_lock:
                    if self._sock is None and not self._closed.is_set():
                        self._reconnect(initial_delay=True)
            except (OSError, RemoteError) as e:
                log.warning("giving up reconnecting to %s:%s: %s", self.host, self.port, e)

    def _maybe_ping(self, sock: socket.socket) -> None:
        if time.monotonic() - self._last_write >= self._heartbeat * 0.5:
            with self._lock:
                msg_id = next(self._ids)
            try:
                self._write(encode_frame(b'{"type":"ping","id":%d}' % msg_id), sock=sock)
            except ConnectionError:
                pass

    def _handle(self, payload: bytes, sock: socket.socket) -> None:
        """Route one frame from the hub (reader thread: never runs user code)."""
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.debug("ignoring a frame that is not JSON (%d bytes)", len(payload))
            return
        if not isinstance(msg, dict):
            log.debug("ignoring a frame that is not an object")
            return
        kind = classify(msg)
        if kind == "reply":
            with self._lock:
                waiter = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
            if waiter is not None:
                waiter.resolve(msg)
            return
        if kind == "error":
            ref = msg.get("ref")
            with self._lock:
                waiter = self._pending.get(ref) if isinstance(ref, int) else None
            if waiter is not None:
                waiter.fail(RemoteError(str(msg.get("code") or "error"), str(msg.get("message") or ""), ref))
                return
            if msg.get("code") == "replaced":
                # Another connection took this device id: reconnecting would fight it for the id.
                self._replaced = True
                log.warning("hub: device %s connected elsewhere; not reconnecting", self.device_id)
            else:
                log.info("hub error: %s %s", msg.get("code"), msg.get("message") or "")
        elif kind == "ping":
            if isinstance(msg.get("id"), int):
                try:
                    self._write(ack_frame(msg["id"], additive_sum(payload)), sock=sock)
                except ConnectionError:
                    pass
            return
        self._dispatch.put((kind, msg, payload, sock))

    def _dispatch_loop(self) -> None:
        while True:
            item = self._dispatch.get()
            if item is None:
                return
            kind, msg, payload, sock = item
            if kind == "command":
                self._run_command(msg, payload, sock)
            else:
                for cb in list(self._message_cbs):
                    try:
                        cb(msg)
                    except Exception:
                        log.exception("on_message callback failed")

    def _run_command(self, msg: dict[str, Any], payload: bytes, sock: socket.socket) -> None:
        failed: Exception | None = None
        for cb in list(self._command_cbs) or list(self._message_cbs):
            try:
                cb(msg)
            except Exception as e:
                log.exception("on_command callback failed for %s", msg.get("type"))
                failed = e
        msg_id = msg.get("id")
        if not isinstance(msg_id, int):
            return
        if failed is None:
            frame = ack_frame(msg_id, additive_sum(payload))
        else:
            err = {"type": "error", "code": "internal", "message": f"command failed: {failed}", "ref": msg_id}
            frame = encode_frame(orjson.dumps(err))
        try:
            self._write(frame, sock=sock)
        except ConnectionError:
            log.info("could not ack command %s: connection gone", msg_id)

    # --- internals: legacy -----------------------------------------------------------------

    def _legacy_send(self, msg: dict[str, Any], timeout: float | None) -> None:
        payload = orjson.dumps(msg)
        expected = legacy_ack(payload)
        attempts = 1 + (self.max_reconnect_attempts if self.auto_reconnect else 0)
        for attempt in range(1, attempts + 1):
            try:
                sock = self._dial()
                try:
                    if timeout is not None:
                        sock.settimeout(timeout)
                    sock.sendall(encode_frame(payload))
                    got = recv_exact(sock, 8)
                finally:
                    sock.close()
            except (TimeoutError, ChecksumError):
                raise
            except OSError as e:
                if attempt == attempts:
                    raise ConnectionError(f"legacy send failed after {attempts} attempts: {e}") from e
                log.info("legacy send attempt %d failed (%s); retrying", attempt, e)
                if self._closed.wait(self.reconnect_delay):
                    raise ConnectionError("client closed") from e
                continue
            if got != expected:
                raise ChecksumError(int.from_bytes(expected[:4], "big"), got)
            return


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
