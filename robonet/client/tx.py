"""Twisted-native bot-link client (spec/botlink.md) for robots and tools running a reactor.

- :class:`BotLinkClientProtocol`: one native robonet/1 connection. Says hello on connect,
  exposes :meth:`~BotLinkClientProtocol.whenWelcomed`, :meth:`~BotLinkClientProtocol.send`,
  :meth:`~BotLinkClientProtocol.request` and :meth:`~BotLinkClientProtocol.command` returning
  Deferreds, acks the hub's commands and pings, and pings the hub when idle (``heartbeat_s``).
- :class:`BotLinkClientFactory` and :func:`connect_bot`: a reconnecting connection built on
  :class:`twisted.application.internet.ClientService` with ``backoffPolicy``.
- :func:`legacy_send` and :func:`legacy_poll`: the Cartobot dialect (one connection per message,
  8-byte ACK; ``REQUEST_INSTRUCTION`` pulls).

Time comes from the injected ``clock``; nothing here imports the global reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet.client.botclient import (
    DEFAULT_MAX_FRAME,
    ChecksumError,
    RemoteError,
    classify,
    hello_error,
)
from robonet.protocols.botlink import (
    LEGACY_POLL,
    FrameDecoder,
    FrameError,
    ack_frame,
    additive_sum,
    encode_frame,
    legacy_ack,
)

Callback = Callable[[dict[str, Any]], object]
# on_welcome(protocol, welcome) / on_lost(protocol, reason)
WelcomeHook = Callable[["BotLinkClientProtocol", dict[str, Any]], object]
LostHook = Callable[["BotLinkClientProtocol", Failure], object]


class _Pending:
    """A frame waiting for its ack/response: the Deferred, the checksum, the timeout call."""

    __slots__ = ("deferred", "expected_sum", "timer")

    def __init__(self, deferred: Deferred[dict[str, Any]], expected_sum: int, timer: IDelayedCall) -> None:
        self.deferred = deferred
        self.expected_sum = expected_sum
        self.timer = timer


class BotLinkClientProtocol(Protocol):
    """One native bot-link connection (spec/botlink.md "Native dialect").

    ``hello`` is the hello object to send on connect (see
    :func:`robonet.client.botclient.hello_message`). ``on_command(msg)`` runs for each command
    from the hub and may return a Deferred; the command is acked (``sum`` = additive checksum of
    the received payload) when it returns/fires, or answered with an ``internal`` error if it
    raises/fails. ``on_message(msg)`` gets every other unsolicited frame (and commands when
    there is no ``on_command``). ``ack_timeout``
    (seconds) bounds waits for acks and responses.
    """

    log = Logger()

    def __init__(
        self,
        hello: dict[str, Any],
        *,
        clock: IReactorTime,
        on_command: Callback | None = None,
        on_message: Callback | None = None,
        ack_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        heartbeat: bool = True,
    ) -> None:
        self.hello = hello
        self.clock = clock
        self.on_command = on_command
        self.on_message = on_message
        self.ack_timeout = ack_timeout
        self.heartbeat = heartbeat
        self.welcome: dict[str, Any] | None = None
        self.connected_ = False
        self.replaced = False  # the hub closed us because the device id connected elsewhere
        self._decoder = FrameDecoder(max_frame)
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._welcome_waiters: list[Deferred[dict[str, Any]]] = []
        self._welcome_error: Failure | None = None
        self._pinger: LoopingCall | None = None
        self._last_write = 0.0
        self._heartbeat_s = 10.0

    # --- Protocol --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ = True
        self._write(encode_frame(orjson.dumps(self.hello)))

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            self.log.warn("bad frame from hub ({code}: {message}); closing", code=e.code, message=e.message)
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for payload in frames:
            if not self.connected_:
                return
            self._frameReceived(payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        err = ConnectionError(f"connection lost: {reason.getErrorMessage()}")
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.timer.active():
                p.timer.cancel()
            p.deferred.errback(err)
        if self.welcome is None:
            self._fail_welcome(Failure(err) if self._welcome_error is None else self._welcome_error)

    # --- public ----------------------------------------------------------------------------

    def whenWelcomed(self) -> Deferred[dict[str, Any]]:
        """A Deferred firing with the welcome dict, or failing with AuthError/HelloRejected/
        ConnectionError if the hub refuses the hello or the connection drops first."""
        if self.welcome is not None:
            return succeed(self.welcome)
        if self._welcome_error is not None:
            return fail(self._welcome_error)
        d: Deferred[dict[str, Any]] = Deferred()
        self._welcome_waiters.append(d)
        return d

    def send(self, msg: dict[str, Any], ack: bool = False, timeout: float | None = None) -> Deferred[Any]:
        """Send ``msg``; with ``ack=True`` give it an ``id`` and return a Deferred firing with the
        ack dict once its ``sum`` is verified (ChecksumError otherwise; RemoteError on an error
        frame with that ``ref``; TimeoutError after ``timeout``/``ack_timeout`` s; ConnectionError
        if the connection drops). Without ack the Deferred fires with None at once."""
        if not ack:
            if not self.connected_:
                return fail(ConnectionError("not connected"))
            self._write(encode_frame(orjson.dumps(msg)))
            return succeed(None)
        return self._call(dict(msg), timeout)

    def request(self, endpoint: str, data: Any = None, timeout: float | None = None) -> Deferred[Any]:
        """Call a hub endpoint; fires with the response's ``data`` or fails with RemoteError."""
        d = self._call({"type": "request", "endpoint": endpoint, "data": data}, timeout)

        def unwrap(reply: dict[str, Any]) -> Any:
            if reply.get("type") == "response" and reply.get("status") != "success":
                raise RemoteError(
                    str(reply.get("code") or "error"), str(reply.get("message") or ""), reply.get("id")
                )
            return reply.get("data")

        return d.addCallback(unwrap)

    def command(
        self, type: str, target: str | None = None, *, timeout: float | None = None, **fields: Any
    ) -> Deferred[Any]:
        """Send a command to ``target`` (None: every robot); fires with the hub's ack."""
        msg: dict[str, Any] = {"type": type, **fields}
        if target is not None:
            msg["device_id"] = target
        return self._call(msg, self.ack_timeout + 5.0 if timeout is None else timeout)

    # --- internals -------------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        self._last_write = self.clock.seconds()
        self.transport.write(frame)  # type: ignore[union-attr]

    def _call(self, msg: dict[str, Any], timeout: float | None) -> Deferred[Any]:
        if not self.connected_:
            return fail(ConnectionError("not connected"))
        msg_id = self._next_id
        self._next_id += 1
        msg["id"] = msg_id
        payload = orjson.dumps(msg)
        wait = self.ack_timeout if timeout is None else timeout
        d: Deferred[dict[str, Any]] = Deferred()
        timer = self.clock.callLater(wait, self._timed_out, msg_id, msg.get("type"), wait)
        self._pending[msg_id] = _Pending(d, additive_sum(payload), timer)
        self._write(encode_frame(payload))
        return d

    def _timed_out(self, msg_id: int, msg_type: Any, wait: float) -> None:
        p = self._pending.pop(msg_id, None)
        if p is not None:
            p.deferred.errback(TimeoutError(f"no reply to {msg_type} id {msg_id} within {wait:g} s"))

    def _fail_welcome(self, failure: Failure) -> None:
        self._welcome_error = failure
        waiters, self._welcome_waiters = self._welcome_waiters, []
        for d in waiters:
            d.errback(failure)

    def _frameReceived(self, payload: bytes) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.log.debug("ignoring a non-JSON frame ({n} bytes)", n=len(payload))
            return
        if not isinstance(msg, dict):
            return
        if self.welcome is None:
            self._greeted(msg)
            return
        kind = classify(msg)
        if kind == "reply":
            msg_id = msg.get("id")
            p = self._pending.pop(msg_id, None) if isinstance(msg_id, int) else None
            if p is None:
                return  # e.g. the ack of our own heartbeat ping
            p.timer.cancel()
            if msg.get("type") == "ack" and msg.get("sum") != p.expected_sum:
                p.deferred.errback(ChecksumError(p.expected_sum, msg.get("sum")))
            else:
                p.deferred.callback(msg)
        elif kind == "error":
            ref = msg.get("ref")
            p = self._pending.pop(ref, None) if isinstance(ref, int) else None
            if p is not None:
                p.timer.cancel()
                p.deferred.errback(
                    RemoteError(str(msg.get("code") or "error"), str(msg.get("message") or ""), ref)
                )
                return
            if msg.get("code") == "replaced":
                self.replaced = True
            self.log.info(
                "hub error {code}: {message}", code=msg.get("code"), message=msg.get("message") or ""
            )
            self._deliver_message(msg)
        elif kind == "ping":
            if isinstance(msg.get("id"), int):
                self._write(ack_frame(msg["id"], additive_sum(payload)))
        elif kind == "command":
            self._run_command(msg, payload)
        else:
            self._deliver_message(msg)

    def _greeted(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "welcome":
            self.welcome = msg
            hb = msg.get("heartbeat_s")
            self._heartbeat_s = float(hb) if isinstance(hb, (int, float)) and hb > 0 else 10.0
            if self.heartbeat:
                self._pinger = LoopingCall(self._maybe_ping)
                self._pinger.clock = self.clock
                self._pinger.start(self._heartbeat_s / 2, now=False)
            waiters, self._welcome_waiters = self._welcome_waiters, []
            for d in waiters:
                d.callback(msg)
            return
        err: Exception = (
            hello_error(msg)
            if msg.get("type") == "error"
            else ConnectionError(f"expected welcome, got {msg!r}")
        )
        self._fail_welcome(Failure(err))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _maybe_ping(self) -> None:
        if self.connected_ and self.clock.seconds() - self._last_write >= self._heartbeat_s / 2:
            msg_id = self._next_id
            self._next_id += 1
            self._write(encode_frame(b'{"type":"ping","id":%d}' % msg_id))

    def _deliver_message(self, msg: dict[str, Any]) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(msg)
        except Exception:
            self.log.failure("on_message callback failed")

    def _run_command(self, msg: dict[str, Any], payload: bytes) -> None:
        handler = self.on_command or self.on_message
        d = maybeDeferred(handler, msg) if handler is not None else succeed(None)
        msg_id = msg.get("id")

        def done(_: object) -> None:
            if isinstance(msg_id, int) and self.connected_:
                self._write(ack_frame(msg_id, additive_sum(payload)))

        def failed(f: Failure) -> None:
            self.log.failure("on_command callback failed for {type}", f, type=msg.get("type"))
            if isinstance(msg_id, int) and self.connected_:
                err = {
                    "type": "error",
                    "code": "internal",
                    "message": f"command failed: {f.getErrorMessage()}",
                    "ref": msg_id,
                }
                self._write(encode_frame(orjson.dumps(err)))

        d.addCallbacks(done, failed)


class BotLinkClientFactory(Factory):
    """Builds :class:`BotLinkClientProtocol` instances sharing one hello and set of callbacks.

    When the hub assigns a ``device_id`` in the welcome, it is written into ``hello`` so a
    reconnect comes back as the same device. ``on_welcome(proto, welcome)`` and
    ``on_lost(proto, reason)`` are told about each connection's start and end.
    """

    noisy = False  # no "Starting factory" line per connection (a fleet has hundreds)

    def __init__(
        self,
        hello: dict[str, Any],
        *,
        clock: IReactorTime,
        on_command: Callback | None = None,
        on_message: Callback | None = None,
        on_welcome: WelcomeHook | None = None,
        on_lost: LostHook | None = None,
        ack_timeout: float = 10.0,
    ) -> None:
        self.hello = hello
        self.clock = clock
        self.on_command = on_command
        self.on_message = on_message
        self.on_welcome = on_welcome
        self.on_lost = on_lost
        self.ack_timeout = ack_timeout
        self.service: ClientService | None = None  # set by connect_bot; stopped when replaced

    def buildProtocol(self, addr: object) -> BotLinkClientProtocol:
        proto = _HookedProtocol(
            self.hello,
            clock=self.clock,
            on_command=self.on_command,
            on_message=self.on_message,
            ack_timeout=self.ack_timeout,
        )
        proto.factory = self
        proto.whenWelcomed().addCallbacks(lambda w: self._welcomed(proto, w), lambda f: None)
        return proto

    def _welcomed(self, proto: BotLinkClientProtocol, welcome: dict[str, Any]) -> None:
        if isinstance(welcome.get("device_id"), str):
            self.hello["device_id"] = welcome["device_id"]
        if self.on_welcome is not None:
            self.on_welcome(proto, welcome)


class _HookedProtocol(BotLinkClientProtocol):
    """Tells the factory's ``on_lost`` hook when a welcomed connection ends."""

    factory: BotLinkClientFactory

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        welcomed = self.welcome is not None
        super().connectionLost(reason)
        if welcomed and self.factory.on_lost is not None:
            self.factory.on_lost(self, reason)
        if self.replaced and self.factory.service is not None:
            # Reconnecting would take the id back and get the other connection replaced in turn.
            self.log.warn(
                "device {device_id} connected elsewhere; not reconnecting",
                device_id=self.hello.get("device_id"),
            )
            self.factory.service.stopService()


def connect_bot(
    reactor: Any,
    endpoint: IStreamClientEndpoint | str,
    hello: dict[str, Any],
    *,
    on_command: Callback | None = None,
    on_message: Callback | None = None,
    on_welcome: WelcomeHook | None = None,
    on_lost: LostHook | None = None,
    clock: IReactorTime | None = None,
    ack_timeout: float = 10.0,
    initial_delay: float = 1.0,
    max_delay: float = 30.0,
) -> ClientService:
    """A (not yet started) ClientService keeping one welcomed bot-link connection open.

    ``endpoint`` is an IStreamClientEndpoint or a client endpoint string (``"tcp:host=h:port=p"``,
    parsed with ``reactor``). Reconnects with ``backoffPolicy(initial_delay, max_delay)``; a
    connection counts as made once the hub's welcome arrives, so ``service.whenConnected()``
    fires with a ready :class:`BotLinkClientProtocol`. Start it with ``startService()`` or add
    it to a MultiService. If the hub closes the link with ``replaced`` (the same device id
    connected elsewhere) the service stops itself instead of fighting for the id.
    """
    ep: IStreamClientEndpoint = clientFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
    clock = reactor if clock is None else clock
    factory = BotLinkClientFactory(
        hello,
        clock=clock,
        on_command=on_command,
        on_message=on_message,
        on_welcome=on_welcome,
        on_lost=on_lost,
        ack_timeout=ack_timeout,
    )
    service = ClientService(
        ep,
        factory,
        retryPolicy=backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay),
        clock=clock,
        prepareConnection=lambda proto: proto.whenWelcomed(),  # type: ignore[attr-defined]
    )
    factory.service = service
    return service


# --- legacy Cartobot dialect ---------------------------------------------------------------


class LegacySendProtocol(Protocol):
    """Send one frame, read exactly the 8-byte ACK, check it, close (spec legacy section)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.expected = legacy_ack(payload)
        self.done: Deferred[None] = Deferred()
        self._buf = b""

    def connectionMade(self) -> None:
        self.transport.write(encode_frame(self.payload))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 8 and not self.done.called:
            got = self._buf[:8]
            self.transport.loseConnection()  # type: ignore[union-attr]
            if got == self.expected:
                self.done.callback(None)
            else:
                self.done.errback(ChecksumError(int.from_bytes(self.expected[:4], "big"), got))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(ConnectionError(f"closed after {len(self._buf)} of 8 ACK bytes"))


class LegacyPollProtocol(Protocol):
    """Send ``REQUEST_INSTRUCTION`` raw and take one frame back (or None when the hub closes)."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.done: Deferred[dict[str, Any] | None] = Deferred()
        self._decoder = FrameDecoder(max_frame)

    def connectionMade(self) -> None:
        self.transport.write(LEGACY_POLL)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError:
            frames = []
            self.transport.loseConnection()  # type: ignore[union-attr]
        if frames:
            self.transport.loseConnection()  # type: ignore[union-attr]
            try:
                obj = orjson.loads(frames[0])
            except orjson.JSONDecodeError:
                obj = None
            self.done.callback(obj if isinstance(obj, dict) else None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


class _OneShotFactory(Factory):
    """Hands out one prepared protocol; quiet (a legacy bot opens a connection per message)."""

    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: object) -> Protocol:
        return self.proto


def _bounded(
    endpoint: IStreamClientEndpoint,
    proto: LegacySendProtocol | LegacyPollProtocol,
    clock: IReactorTime,
    timeout: float,
    on_timeout: Callable[[], None],
) -> None:
    """Connect ``proto``; after ``timeout`` s give up (``on_timeout``), connected or not."""
    connecting = endpoint.connect(_OneShotFactory(proto))

    def expire() -> None:
        if proto.done.called:
            return
        on_timeout()
        if proto.transport is not None:
            proto.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            connecting.cancel()

    timer = clock.callLater(timeout, expire)

    def connect_failed(f: Failure) -> None:
        if not proto.done.called:
            proto.done.errback(f)

    def finished(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    proto.done.addBoth(finished)
    connecting.addErrback(connect_failed)


def legacy_send(
    endpoint: IStreamClientEndpoint, msg: dict[str, Any], *, clock: IReactorTime, timeout: float = 10.0
) -> Deferred[None]:
    """Send ``msg`` the Cartobot way: new connection, one frame, 8-byte ACK checked, close.

    Fires with None when the ACK matches; fails with ChecksumError, ConnectionError (or the
    endpoint's connect error), or TimeoutError after ``timeout`` seconds.
    """
    proto = LegacySendProtocol(orjson.dumps(msg))

    def on_timeout() -> None:
        proto.done.errback(TimeoutError(f"no ACK within {timeout:g} s"))

    _bounded(endpoint, proto, clock, timeout, on_timeout)
    return proto.done


def legacy_poll(
    endpoint: IStreamClientEndpoint, *, clock: IReactorTime, wait: float = 15.0
) -> Deferred[dict[str, Any] | None]:
    """One ``REQUEST_INSTRUCTION`` pull: fires with the instruction dict, or None when the hub
    closes without one or ``wait`` seconds pass. Fails only if the connection cannot be made."""
    proto = LegacyPollProtocol()

    def on_timeout() -> None:
        proto.done.callback(None)

    _bounded(endpoint, proto, clock, wait, on_timeout)
    return proto.done
