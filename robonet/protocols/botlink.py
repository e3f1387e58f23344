"""Bot link (spec/botlink.md): the thin Protocol and Factory for both dialects.

The wire codec is :mod:`robonet.protocols.botlink_framing`, the Cartobot dialect's per-bot state
:mod:`robonet.protocols.botlink_legacy`, the robonet/1 decisions (ids, hello, targets, ack sums,
responses) :mod:`robonet.protocols.envelope` and the per-connection command/ack state
:mod:`robonet.protocols.deliveries`; this module only feeds frames through them. The names below
``__all__`` are re-exported for the modules and tests that import them from here.

Over 600 lines: one Protocol serves both dialects (the dialect is decided by a connection's first
bytes) plus the idle-deadline heap and the factory; its hot path (``_native``) stays inline on purpose
(PERFORMANCE.md), so it is not split into smaller calls.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

import robonet
from robonet.config import AuthConfig, BotlinkConfig
from robonet.limits import PerAddressLimiter
from robonet.model import Command, HubError, Message
from robonet.protocols import envelope as env
from robonet.protocols.botlink_framing import (
    LEGACY_ACK_TAG,
    LEGACY_POLL,
    FrameDecoder,
    FrameError,
    ack_frame,
    additive_sum,
    encode_frame,
    encode_obj,
    error_obj,
    first_write,
    legacy_ack,
)
from robonet.protocols.botlink_legacy import LEGACY_COMMANDS, LegacyDevice, LegacyDevices
from robonet.protocols.deliveries import CommitAcks, PendingCommands

__all__ = [
    "LEGACY_ACK_TAG",
    "LEGACY_COMMANDS",
    "LEGACY_POLL",
    "BotLinkFactory",
    "BotLinkProtocol",
    "FrameDecoder",
    "FrameError",
    "IdleWatch",
    "LegacyDevice",
    "ack_frame",
    "additive_sum",
    "encode_frame",
    "encode_obj",
    "error_obj",
    "legacy_ack",
]

_first_write = first_write  # the name tests and benchmarks use

_loads = orjson.loads
_JSONError = orjson.JSONDecodeError
MAX_ID = env.MAX_ID
_EPSILON = 1e-6  # s: float slack when comparing a deadline with the clock
HEARTBEAT_S = 10
ROLES = env.ROLES
_id = env.ref_of


class BotLinkProtocol(Protocol):
    """One bot-link connection, native (robonet/1) or legacy (Cartobot); spec/botlink.md.

    The dialect is decided by the first bytes: raw ``REQUEST_INSTRUCTION`` is a legacy poll, a
    first frame ``{"type":"hello"}`` is native, any other first JSON object is a legacy frame.
    A native connection is a :class:`~robonet.model.Link` for its device once welcomed.
    """

    face = "botlink"
    log = Logger()
    # Slots keep an idle connection small (PERFORMANCE.md lever 5); Protocol's own attributes too.
    __slots__ = (
        "factory",
        "transport",
        "connected",
        "hub",
        "cfg",
        "clock",
        "ip",
        "address",
        "mode",
        "device",
        "device_id",
        "closing",
        "_decoder",
        "_pre",
        "_out",
        "_last_rx",
        "_now",
        "acks_out",
        "_born",
        "_sent_any",
        "_pending",
        "_acks",
        "_peer",
        "_legacy",
        "identity",
        "_ingest_identity",
        "_session",
    )

    def __init__(self, factory: BotLinkFactory, address: IAddress | None) -> None:
        self.factory = factory
        self.hub = factory.hub
        self.cfg = factory.config
        self.clock = factory.clock
        self.ip = getattr(address, "host", "?")
        self.address = f"{self.ip}:{getattr(address, 'port', 0)}"
        self.mode: str | None = None  # None until decided: native, legacy, poll, peer
        self.device: Any = None
        self.device_id = ""
        self.closing = False
        self._decoder = FrameDecoder(self.cfg.max_hello_frame)
        self._pre = b""
        self._out: list[bytes] | None = None
        self._last_rx = 0.0
        self._now = 0.0
        self.acks_out = 0
        self._born = 0.0
        self._sent_any = False
        # Made on first use: most connections never get a command, many never need an ack.
        self._pending: PendingCommands | None = None
        self._acks: CommitAcks[tuple[int, int]] | None = None
        self._peer: Any = None
        self._legacy: LegacyDevice | None = None
        self.identity: Any = None  # robonet.auth.Identity after login (hub.auth attached)
        self._ingest_identity: Any = None  # the identity to check per data message (None: checked once)
        self._session: Any = None  # robonet.auth.Session of a token login

    # -- connection lifecycle --

    def connectionMade(self) -> None:
        self.hub.stats.connection("botlink", 1)
        now = self.clock.seconds()
        self._last_rx = self._born = now
        self.factory.idle.watch(self, now + min(self.cfg.hello_timeout, self.cfg.idle_timeout))

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:
        self.closing = True
        self.hub.stats.connection("botlink", -1)
        self.factory.released(self.ip)
        if not len(self.factory.limiter):
            self.factory.idle.clear()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.fail_all(HubError("device_offline", f"{self.device_id} disconnected"))
        if self._legacy is not None:
            self._legacy.poll_gone(self)
        if self._peer is not None:
            self._peer.connection_lost(reason)
        if self.device is not None and self.mode == "native":
            self.hub.disconnect(self, self.device_id)
        if self._session is not None:
            self.hub.auth.sessions.remove(self._session)
            self._session = None

    def idle_check(self, now: float) -> None:
        """Called by the factory's IdleWatch at this connection's deadline: close, or watch again.

        Until the dialect is known the hello deadline (``hello_timeout`` after connect) applies;
        always, ``idle_timeout`` after the last complete frame.
        """
        if self.closing:
            return
        deadline = self._last_rx + self.cfg.idle_timeout
        if self.mode is None:
            hello_deadline = self._born + self.cfg.hello_timeout
            if hello_deadline - now <= _EPSILON:
                self.hub.stats.error("bad_hello")
                self.close_with_error("bad_hello", f"no hello within {self.cfg.hello_timeout:g} s")
                return
            deadline = min(deadline, hello_deadline)
        if deadline - now > _EPSILON:
            self.factory.idle.watch(self, deadline)
            return
        self.hub.stats.error("idle_timeout")
        self.close_with_error("idle_timeout", f"no frame for {self.cfg.idle_timeout:g} s")

    # -- output --

    def _send(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif not self.closing:
            self._write(data)

    def send_frame(self, frame: bytes) -> None:
        """Send one pre-encoded frame (4-byte length + payload), in order behind buffered replies."""
        self._send(frame)

    def send_obj(self, obj: Any) -> None:
        """Send one JSON object as a frame (used by the peer service on peer connections)."""
        self._send(encode_obj(obj))
        t = obj.get("type", "?") if isinstance(obj, dict) else "?"
        self.hub.stats.count_out(t)

    def _error(self, code: str, message: str, ref: int | None) -> None:
        self.hub.stats.error(code)
        self._send(encode_obj(error_obj(code, message, ref)))

    def close_with_error(self, code: str, message: str, ref: int | None = None) -> None:
        """Send an error frame and close the connection (framing, auth and timeout errors)."""
        if self.closing:
            return
        self._send(encode_obj(error_obj(code, message, ref)))
        self._flush()
        self.closing = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def close_link(self, code: str, message: str) -> None:
        """model.Link: close this device's connection telling it why (e.g. ``replaced``)."""
        self.close_with_error(code, message)

    def _write(self, data: bytes) -> None:
        """Every write of this protocol: the first one may go straight to the socket (_first_write)."""
        if self._sent_any:
            self.transport.write(data)  # type: ignore[union-attr]
        else:
            self._sent_any = True
            first_write(self.transport, data)

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out and not self.closing:
            data = b"".join(out) if len(out) > 1 else out[0]
            self.hub.stats.bytes_out += len(data)
            self._write(data)

    # -- input --

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.mode == "poll":  # a poll only waits for its one instruction
            return
        self.hub.stats.bytes_in += len(data)
        if self.mode is None and not self._decoder.pending:
            data = self._pre + data
            self._pre = b""
            head = data[:19]
            if LEGACY_POLL.startswith(head):
                if len(data) < 19:
                    self._pre = data
                    return
                self._start_poll()
                return
        cap = self._decoder.max_frame
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            if e.frames:
                self._frames(e.frames)
            if self.closing:
                return
            if e.code == "frame_too_large" and self._decoder.max_frame > cap:
                # a hello earlier in this read raised the cap: judge the rest by the new one
                self.hub.stats.bytes_in -= len(e.rest)
                self.dataReceived(e.rest)
                return
            self.hub.stats.error(e.code)
            self.close_with_error(e.code, e.message)
            return
        if frames:
            self._frames(frames)

    def _frames(self, frames: list[bytes]) -> None:
        self._now = self._last_rx = self.clock.seconds()
        self._out = []
        try:
            for payload in frames:
                if self.closing:
                    break
                if self.mode == "native":
                    self._native(payload)
                else:
                    self._first_or_other(payload)
        finally:
            if self.acks_out:
                o = self.hub.stats.msgs_out
                o["ack"] = o.get("ack", 0) + self.acks_out
                self.acks_out = 0
            self._flush()

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        try:
            obj = _loads(payload)
        except _JSONError:
            self._error("bad_json", "frame is not valid UTF-8 JSON", None)
            return None
        if obj.__class__ is not dict:
            self._error("not_object", "frame must be a JSON object", None)
            return None
        return obj  # type: ignore[no-any-return]

    def _first_or_other(self, payload: bytes) -> None:
        if self.mode == "legacy":
            self._legacy_frame(payload)
            return
        if self.mode == "peer":
            obj = self._decode(payload)
            if obj is not None:
                self._peer.frame_received(obj, payload)
            return
        guarded = self.factory.auth.mode == "token" and self.ip not in self.cfg.legacy_names
        if guarded:  # with auth on, anything but a hello before the welcome is refused
            try:
                obj = _loads(payload)
            except _JSONError:
                obj = None
            if obj.__class__ is not dict or obj.get("type") != "hello":
                self.hub.stats.error("unauthorized")
                ref = _id(obj) if obj.__class__ is dict else None
                self.close_with_error("unauthorized", "send hello with a token first", ref)
                return
        else:
            obj = self._decode(payload)
            if obj is None:
                return
        if obj.get("type") == "hello":
            self._hello(obj)
            return
        if guarded:
            self.hub.stats.error("unauthorized")
            self.close_with_error("unauthorized", "send hello with a token first", _id(obj))
            return
        if not isinstance(obj.get("type"), str):
            self._error("missing_type", "message has no string 'type'", _id(obj))
            return
        if not self._legacy_login():
            return
        self._enter_legacy()
        self._legacy_frame(payload, obj)

    # -- authentication (robonet/auth.py: this face only translates its credentials) --

    def _legacy_login(self) -> bool:
        """The legacy dialect carries no token: log in by address (lan mode), else refuse."""
        auth = getattr(self.hub, "auth", None)
        if auth is None or self.ip in self.cfg.legacy_names:
            return True
        from robonet.auth import Unauthorized

        try:
            self.identity = auth.login_now(None, self.ip, "botlink", legacy=True)
        except Unauthorized as e:
            self.hub.stats.error("unauthorized")
            self.log.info(
                "bot link {address}: legacy bot refused ({reason})", address=self.address, reason=e.reason
            )
            self.close_with_error("unauthorized", e.message)
            return False
        return True

    def _revoked(self, reason: str) -> None:
        self.hub.stats.error("unauthorized")
        self.close_with_error("unauthorized", f"credential {reason}")

    # -- native dialect --

    def _hello(self, obj: dict[str, Any]) -> None:
        if obj.get("role") == "peer":  # the peer service checks proto itself (error: incompatible)
            acceptor = self.hub.peer_acceptor
            if acceptor is None:
                self.hub.stats.error("bad_hello")
                self.close_with_error("bad_hello", "this hub does not accept peer links")
                return
            self.mode = "peer"
            self._decoder.max_frame = self.cfg.max_frame
            self._peer = acceptor.accept(self, obj)
            return
        auth = self.factory.auth
        core = getattr(self.hub, "auth", None)
        identity = None
        try:
            hello = env.parse_hello(
                obj, tokens=auth.tokens if auth.mode == "token" and core is None else None
            )
            if core is not None:
                from robonet.auth import Unauthorized

                token = obj.get("token")
                try:
                    identity = core.login_now(token if isinstance(token, str) else None, self.ip, "botlink")
                except Unauthorized as e:
                    raise HubError("auth_failed" if token else "unauthorized", e.message) from None
        except HubError as e:
            self.hub.stats.error(e.code)
            if e.code == "auth_failed":
                self.log.info("bot link {address}: hello refused (bad token)", address=self.address)
            self.close_with_error(e.code, e.message)
            return
        role, device_id, name = hello.role, hello.device_id, hello.name
        if device_id is None:
            device_id = f"{role}-{uuid.uuid4().hex[:8]}"
        self.mode = "native"
        self.device_id = device_id
        self._decoder.max_frame = self.cfg.max_frame
        welcome = env.welcome_for(
            self.hub.node,
            version=robonet.__version__,
            heartbeat_s=HEARTBEAT_S,
            max_frame=self.cfg.max_frame,
            device_id=device_id,
            session=str(uuid.uuid4()),
        )
        if identity is not None:
            if role == "robot":
                try:  # a robot may only say hello as a device its credential names
                    self.hub.authorize(identity, "publish", device_id, face="botlink")
                except HubError as e:
                    self.close_with_error(e.code, e.message)
                    return
            self.identity = identity
            self._ingest_identity = None if role == "robot" else identity
            if identity.credential:
                self._session = self.hub.auth.sessions.add(identity, "botlink", self.address, self._revoked)
        self._send(encode_obj(welcome))
        self.hub.stats.count_in("hello")
        self.device = self.hub.connect(
            self, device_id, face="botlink", role=role, address=self.address, name=name, dialect="robonet/1"
        )

    def _native(self, payload: bytes) -> None:
        try:
            obj = _loads(payload)
        except _JSONError:
            self._error("bad_json", "frame is not valid UTF-8 JSON", None)
            return
        if obj.__class__ is not dict:
            self._error("not_object", "frame must be a JSON object", None)
            return
        mid = obj.get("id")
        if mid is not None and (mid.__class__ is not int or not 0 <= mid <= MAX_ID):
            self._error("bad_frame", "id must be an integer 0..2^53", None)
            return
        mtype = obj.get("type")
        if mtype.__class__ is not str:
            self._error("missing_type", "message has no string 'type'", mid)
            return
        special = _SPECIAL.get(mtype)
        if special is not None:
            special(self, obj, mid, payload)
        elif mtype in self.hub.commands:
            self._command(obj, mid, payload)
        else:
            msg = Message(mtype, obj, self.device_id, self._now, mid, payload)
            if self._ingest_identity is None:
                batch = self.hub.ingest(self.device, msg)
            else:
                try:
                    batch = self.hub.ingest(self.device, msg, self._ingest_identity)
                except HubError as e:  # forbidden: this credential may not send data
                    self._send(encode_obj(error_obj(e.code, e.message, mid)))
                    return
            if mid is not None:
                self.acks_out += 1
                if batch is None:
                    self._send(ack_frame(mid, sum(payload) & 0xFFFFFFFF))
                else:
                    self._ack_after(batch, mid, sum(payload) & 0xFFFFFFFF)

    def _ack_after(self, batch: Any, mid: int, checksum: int) -> None:
        acks = self._acks
        if acks is None:
            acks = self._acks = CommitAcks(self._acks_committed, self._acks_failed)
        acks.add(batch, (mid, checksum), self._now)

    def _acks_committed(self, acks: list[tuple[int, int]], received_at: float) -> None:
        if self.closing:
            return
        self.hub.stats.ack_delay.add(self.clock.seconds() - received_at)
        self._send(b"".join([ack_frame(mid, s) for mid, s in acks]))

    def _acks_failed(self, failure: Failure, acks: list[tuple[int, int]], received_at: float) -> None:
        if self.closing:
            return
        # The store's own code when it gives one (store_unavailable: over store.max_pending_rows).
        err = failure.value
        code, text = ("internal", "message could not be stored")
        if isinstance(err, HubError):
            code, text = err.code, err.message
        for mid, _ in acks:
            self._error(code, text, mid)

    def _on_ack(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        self.hub.stats.count_in("ack")
        if self._pending is not None:
            self._pending.on_ack(obj)

    def _on_remote_error(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        self.hub.stats.count_in("error")
        if self._pending is not None:
            self._pending.on_error(obj)

    def _on_ping(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        self.hub.stats.count_in("ping")
        if mid is not None:
            self._send(ack_frame(mid, sum(payload) & 0xFFFFFFFF))

    def _on_hello_again(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        self._error("bad_hello", "already said hello", mid)

    def _on_request(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        endpoint = obj.get("endpoint")
        if not isinstance(endpoint, str):
            self.hub.stats.error("unknown_endpoint")
            self._respond_error(mid, "unknown_endpoint", "request needs a string 'endpoint'")
            return
        d = self.hub.request(endpoint, obj.get("data"), self.device_id, self.identity, "botlink")
        d.addCallbacks(self._respond, self._respond_failure, callbackArgs=(mid,), errbackArgs=(mid,))

    def _respond(self, result: Any, mid: int | None) -> None:
        if self.closing:
            return
        payload, ok = env.encode_response(mid, result, orjson.dumps)
        if ok:
            self.hub.stats.count_out("response")
        else:
            self.hub.stats.error("internal")
        self._send(encode_frame(payload))

    def _respond_failure(self, f: Failure, mid: int | None) -> None:
        err = f.value
        code = err.code if isinstance(err, HubError) else "internal"
        message = err.message if isinstance(err, HubError) else "internal error"
        self._respond_error(mid, code, message)

    def _respond_error(self, mid: int | None, code: str, message: str) -> None:
        if self.closing:
            return
        self._send(encode_obj(env.response_error_obj(mid, code, message)))

    def _command(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        target, bad = env.target_or_error(obj)
        if bad is not None:  # a malformed target is an error, never a broadcast
            self._error(bad.code, bad.message, mid)
            return
        d = self.hub.command(obj, self.device_id, target, self.identity, "botlink", self.ip)
        checksum = sum(payload) & 0xFFFFFFFF
        d.addCallbacks(
            self._command_done, self._command_failed, callbackArgs=(mid, checksum), errbackArgs=(mid,)
        )

    def _command_done(self, reached: list[str], mid: int | None, checksum: int) -> None:
        if mid is not None and not self.closing:
            self._send(ack_frame(mid, checksum))

    def _command_failed(self, f: Failure, mid: int | None) -> None:
        err = f.value
        if not self.closing:
            if isinstance(err, HubError):
                self._send(encode_obj(error_obj(err.code, err.message, mid)))
            else:
                self._send(encode_obj(error_obj("internal", "command failed", mid)))

    # -- model.Link: commands to this device --

    def deliver(self, command: Command) -> defer.Deferred[Any]:
        """Send ``command`` as a frame with a fresh id; fires when the robot acks it.

        Fails with HubError ``delivery_timeout`` after ``botlink.ack_timeout`` seconds, with the
        robot's own error code if it answers ``{"type":"error","ref":id}``, or ``device_offline``
        if the connection drops first.
        """
        if self.closing:
            raise HubError("device_offline", f"{self.device_id} is disconnecting")
        pending = self._pending
        if pending is None:
            pending = self._pending = PendingCommands(
                self.clock, self.cfg.ack_timeout, self.hub.stats, self.device_id
            )
        cid = pending.next_id()
        body = dict(command.body)
        body["id"] = cid
        payload = orjson.dumps(body)
        self._send(encode_frame(payload))
        return pending.add(cid, additive_sum(payload))

    # -- legacy dialect (Cartobot) --

    def _enter_legacy(self) -> None:
        self.mode = "legacy"
        self._decoder.max_frame = self.cfg.max_frame
        self._legacy = self.factory.legacy.get(self.ip)

    def _legacy_frame(self, payload: bytes, obj: dict[str, Any] | None = None) -> None:
        if obj is None:
            obj = self._decode(payload)
            if obj is None:
                return
        mtype = obj.get("type")
        if not isinstance(mtype, str):
            self._error("missing_type", "message has no string 'type'", _id(obj))
            return
        legacy = self._legacy
        assert legacy is not None
        device = legacy.touch(self._now)
        batch = self.hub.ingest(device, Message(mtype, obj, legacy.device_id, self._now, None, payload))
        ack = legacy_ack(payload)
        if batch is None:
            self._send(ack)
        else:
            batch.when_committed(self._legacy_committed, self._legacy_failed, ack)

    def _legacy_committed(self, ack: bytes) -> None:
        if not self.closing:
            self._write(ack)

    def _legacy_failed(self, failure: Failure, ack: bytes) -> None:
        self.hub.stats.error("internal")
        if not self.closing:
            self.closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _start_poll(self) -> None:
        if self.factory.auth.mode == "token" and self.ip not in self.cfg.legacy_names:
            self.hub.stats.error("unauthorized")
            self.close_with_error("unauthorized", "unknown legacy bot")
            return
        if not self._legacy_login():
            return
        self._enter_legacy()
        self.mode = "poll"
        self._last_rx = self.clock.seconds()
        assert self._legacy is not None
        self.hub.stats.count_in("REQUEST_INSTRUCTION")
        device = self._legacy.touch(self._last_rx)
        self.hub.touch(device, self._last_rx)  # a poll is activity: last_seen moves
        self._legacy.poll(self)

    def give_instruction(self, body: dict[str, Any] | None) -> None:
        """Answer a legacy poll with one instruction frame (or nothing), then close."""
        if self.closing:
            return
        if body is not None:
            self._write(encode_obj(body))
        self.closing = True
        self.transport.loseConnection()  # type: ignore[union-attr]


_SPECIAL: dict[str, Callable[[BotLinkProtocol, dict[str, Any], int | None, bytes], None]] = {
    "ack": BotLinkProtocol._on_ack,
    "error": BotLinkProtocol._on_remote_error,
    "ping": BotLinkProtocol._on_ping,
    "request": BotLinkProtocol._on_request,
    "hello": BotLinkProtocol._on_hello_again,
}


class _Refuse(Protocol):
    """Sent to a connection over the per-IP cap: one error frame, then close."""

    def __init__(self, message: str) -> None:
        self.message = message

    def connectionMade(self) -> None:
        self.transport.write(encode_obj(error_obj("rate_limited", self.message)))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class IdleWatch:
    """One reactor timer for every connection's idle deadline, instead of a DelayedCall each.

    Connections register ``(deadline, proto)`` once per idle period (not per frame); the timer fires
    at the earliest deadline and calls ``proto.idle_check(now)`` for each one due, which closes the
    connection or watches it again at its new deadline.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, BotLinkProtocol]] = []
        self._seq = itertools.count()
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def watch(self, proto: BotLinkProtocol, deadline: float) -> None:
        """Call ``proto.idle_check(now)`` once ``deadline`` (hub time, s) has come."""
        heapq.heappush(self._heap, (deadline, next(self._seq), proto))
        self._arm()

    def clear(self) -> None:
        """Forget every deadline (no connection is left)."""
        self._heap.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _arm(self) -> None:
        """Keep the one timer set for the earliest deadline in the heap."""
        if not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.clock.seconds())
        call = self._call
        if call is None:
            self._call = self.clock.callLater(delay, self._fire)
        elif self._heap[0][0] < call.getTime():
            call.reset(delay)

    def _fire(self) -> None:
        self._call = None
        heap = self._heap
        now = self.clock.seconds()
        while heap and heap[0][0] - now <= _EPSILON:
            _, _, proto = heapq.heappop(heap)
            proto.idle_check(now)
        self._arm()


class BotLinkFactory(ServerFactory):
    """Serves the bot link (``[botlink] listen``) for one hub; enforces ``max_per_ip``."""

    log = Logger()
    noisy = False

    def __init__(
        self, hub: Any, config: BotlinkConfig, clock: IReactorTime, auth: AuthConfig | None = None
    ) -> None:
        self.hub = hub
        self.config = config
        self.clock = clock
        self.auth = auth or AuthConfig()
        self.limiter = PerAddressLimiter(config.max_per_ip)
        self.legacy = LegacyDevices(hub, config, clock)
        self.idle = IdleWatch(clock)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        ip = getattr(addr, "host", "?")
        if not self.limiter.acquire(ip):
            self.hub.stats.error("rate_limited")
            refuse = _Refuse(f"too many connections from {ip} (max {self.config.max_per_ip})")
            refuse.factory = self
            return refuse
        return BotLinkProtocol(self, addr)

    def stopFactory(self) -> None:
        """The last listening port closed: drop the idle timer."""
        self.idle.clear()

    def released(self, ip: str) -> None:
        """A connection from ``ip`` closed."""
        self.limiter.release(ip)
