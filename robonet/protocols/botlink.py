"""Bot link (spec/botlink.md): a pure frame codec, then the thin Protocol and Factory.

The codec half (``FrameDecoder``, ``encode_*``, ``additive_sum``, ``legacy_ack``) does no I/O.

A frame is a 4-byte big-endian unsigned length N then N bytes of UTF-8 JSON, 1 <= N <= max_frame.
The additive checksum is the sum of the payload bytes modulo 2**32 (native acks' ``sum`` and the
legacy Cartobot 8-byte ACK share it).
"""

from __future__ import annotations

import heapq
import itertools
import struct
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet import defer, tcp
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

import robonet
from robonet.config import AuthConfig, BotlinkConfig
from robonet.model import Command, HubError, Message

_LEN = struct.Struct(">I")
_unpack_len = _LEN.unpack_from
_pack_len = _LEN.pack

LEGACY_POLL = b"REQUEST_INSTRUCTION"
LEGACY_ACK_TAG = b"ACK\x00"


class FrameError(Exception):
    """An unrecoverable framing error: the stream cannot be resynchronised (spec section 7).

    ``code`` is ``frame_too_large`` (length over the cap) or ``bad_frame`` (length 0). ``frames``
    holds the payloads completed before the bad prefix in the same feed (process them first, so
    the outcome does not depend on how reads were split); ``rest`` the bytes from the bad prefix on.
    """

    def __init__(self, code: str, message: str, frames: list[bytes] | None = None, rest: bytes = b"") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frames = frames or []
        self.rest = rest


def additive_sum(payload: bytes | memoryview) -> int:
    """Sum of all bytes of ``payload`` modulo 2**32 (spec: native ``sum`` and legacy ACK)."""
    return sum(payload) & 0xFFFFFFFF


def encode_frame(payload: bytes) -> bytes:
    """Prefix ``payload`` (UTF-8 JSON bytes) with its 4-byte big-endian length."""
    return _pack_len(len(payload)) + payload


def encode_obj(obj: Any) -> bytes:
    """Encode a JSON-able object as one complete frame."""
    payload = orjson.dumps(obj)
    return _pack_len(len(payload)) + payload


def legacy_ack(payload: bytes) -> bytes:
    """The Cartobot 8-byte ACK: ``[u32 BE additive sum][b"ACK"][0x00]``."""
    return _pack_len(sum(payload) & 0xFFFFFFFF) + LEGACY_ACK_TAG


def ack_frame(msg_id: int, checksum: int) -> bytes:
    """``{"type":"ack","id":N,"sum":S}`` as a complete frame, from a template (hot path)."""
    payload = b'{"type":"ack","id":%d,"sum":%d}' % (msg_id, checksum)
    return _pack_len(len(payload)) + payload


def error_obj(code: str, message: str, ref: int | None = None) -> dict[str, Any]:
    """The spec's error object ``{"type":"error","code","message","ref"}``."""
    return {"type": "error", "code": code, "message": message, "ref": ref}


class FrameDecoder:
    """Incremental frame splitter: feed it reads of any size, get whole payloads back.

    One pass over the joined buffer per ``feed`` (no per-frame buffer re-copy, unlike
    Int32StringReceiver). ``max_frame`` may be changed between feeds (64 KiB before hello).
    A bad length prefix raises :class:`FrameError` at once, before anything of it is buffered.
    """

    __slots__ = ("max_frame", "_buf")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the payloads of every frame now complete, in order."""
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        frames: list[bytes] = []
        while n - pos >= 4:
            length = _unpack_len(buf, pos)[0]
            if length == 0 or length > self.max_frame:
                self._buf = b""
                if length == 0:
                    raise FrameError("bad_frame", "frame length 0", frames, buf[pos:])
                raise FrameError(
                    "frame_too_large", f"frame length {length} exceeds {self.max_frame}", frames, buf[pos:]
                )
            end = pos + 4 + length
            if end > n:
                break
            frames.append(buf[pos + 4 : end])
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        return frames


# ---------------------------------------------------------------------------------------------
# Protocol and factory (thin: feed the decoder, dispatch to the hub)
# ---------------------------------------------------------------------------------------------

_loads = orjson.loads
_JSONError = orjson.JSONDecodeError
MAX_ID = 2**53
_EPSILON = 1e-6  # s: float slack when comparing a deadline with the clock
HEARTBEAT_S = 10
ROLES = ("robot", "client", "peer")
LEGACY_COMMANDS = ("movement_instruction", "trial_response")
_ANY_ROLE = ("any", "admin")


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
        "_next_id",
        "_pending",
        "_wait_batch",
        "_wait_acks",
        "_peer",
        "_legacy",
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
        self._next_id = 0
        self._pending: dict[int, tuple[defer.Deferred[Any], IDelayedCall]] | None = None
        self._wait_batch: Any = None
        self._wait_acks: list[tuple[int, int]] | None = None
        self._peer: Any = None
        self._legacy: LegacyDevice | None = None

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
        if not self.factory.per_ip:
            self.factory.idle.clear()
        pending, self._pending = self._pending or {}, None
        for d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(HubError("device_offline", f"{self.device_id} disconnected"))
        if self._legacy is not None:
            self._legacy.poll_gone(self)
        if self._peer is not None:
            self._peer.connection_lost(reason)
        if self.device is not None and self.mode == "native":
            self.hub.disconnect(self, self.device_id)

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
            _first_write(self.transport, data)

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
        self._enter_legacy()
        self._legacy_frame(payload, obj)

    # -- native dialect --

    def _hello(self, obj: dict[str, Any]) -> None:
        proto = obj.get("proto", 1)
        role = obj.get("role", "client")
        if role == "peer":  # the peer service checks proto itself (error: incompatible)
            acceptor = self.hub.peer_acceptor
            if acceptor is None:
                self.hub.stats.error("bad_hello")
                self.close_with_error("bad_hello", "this hub does not accept peer links")
                return
            self.mode = "peer"
            self._decoder.max_frame = self.cfg.max_frame
            self._peer = acceptor.accept(self, obj)
            return
        if proto.__class__ is not int or proto != robonet.PROTO_VERSION:
            self.hub.stats.error("proto_unsupported")
            self.close_with_error("proto_unsupported", f"proto {proto!r} is not supported; use 1")
            return
        if role not in ROLES:
            self.hub.stats.error("bad_hello")
            self.close_with_error("bad_hello", "role must be robot, client or peer")
            return
        device_id = obj.get("device_id")
        name = obj.get("name", "")
        if device_id is not None and (not isinstance(device_id, str) or not 0 < len(device_id) <= 128):
            self.hub.stats.error("bad_hello")
            self.close_with_error("bad_hello", "device_id must be a string of 1..128 characters")
            return
        if not isinstance(name, str):
            name = str(name)
        auth = self.factory.auth
        if auth.mode == "token":
            granted = auth.tokens.get(obj.get("token")) if isinstance(obj.get("token"), str) else None
            if granted is None or (granted not in _ANY_ROLE and granted != role):
                self.hub.stats.error("auth_failed")
                self.log.info("bot link {address}: hello refused (bad token)", address=self.address)
                self.close_with_error("auth_failed", "invalid token for this role")
                return
        if device_id is None:
            device_id = f"{role}-{uuid.uuid4().hex[:8]}"
        self.mode = "native"
        self.device_id = device_id
        self._decoder.max_frame = self.cfg.max_frame
        self._send(
            encode_obj(
                {
                    "type": "welcome",
                    "proto": robonet.PROTO_VERSION,
                    "session": str(uuid.uuid4()),
                    "server": {
                        "id": self.hub.node.node_id,
                        "name": self.hub.node.name,
                        "version": robonet.__version__,
                    },
                    "heartbeat_s": HEARTBEAT_S,
                    "max_frame": self.cfg.max_frame,
                    "device_id": device_id,
                }
            )
        )
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
            batch = self.hub.ingest(self.device, Message(mtype, obj, self.device_id, self._now, mid, payload))
            if mid is not None:
                self.acks_out += 1
                if batch is None:
                    self._send(ack_frame(mid, sum(payload) & 0xFFFFFFFF))
                else:
                    self._ack_after(batch, mid, sum(payload) & 0xFFFFFFFF)

    def _ack_after(self, batch: Any, mid: int, checksum: int) -> None:
        if batch is self._wait_batch and self._wait_acks is not None:
            self._wait_acks.append((mid, checksum))
            return
        self._wait_batch = batch
        self._wait_acks = acks = [(mid, checksum)]
        batch.when_committed(self._acks_committed, self._acks_failed, acks, self._now)

    def _release_batch(self, acks: list[tuple[int, int]]) -> None:
        if self._wait_acks is acks:
            self._wait_batch = self._wait_acks = None

    def _acks_committed(self, acks: list[tuple[int, int]], received_at: float) -> None:
        self._release_batch(acks)
        if self.closing:
            return
        self.hub.stats.ack_delay.add(self.clock.seconds() - received_at)
        self._send(b"".join([ack_frame(mid, s) for mid, s in acks]))

    def _acks_failed(self, failure: Failure, acks: list[tuple[int, int]], received_at: float) -> None:
        self._release_batch(acks)
        if self.closing:
            return
        # The store's own code when it gives one (store_unavailable: over store.max_pending_rows).
        err = failure.value
        code, text = ("internal", "message could not be stored")
        if isinstance(err, HubError):
            code, text = err.code, err.message
        for mid, _ in acks:
            self._error(code, text, mid)

    def _take_pending(self, ref: Any) -> defer.Deferred[Any] | None:
        """The Deferred of our command ``ref`` (its ack timer stopped), or None if unknown."""
        entry = self._pending.pop(ref, None) if isinstance(ref, int) and self._pending else None
        if entry is None:
            return None
        d, timer = entry
        if timer.active():
            timer.cancel()
        return d

    def _on_ack(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        self.hub.stats.count_in("ack")
        d = self._take_pending(obj.get("id"))
        if d is not None:
            d.callback(obj)

    def _on_remote_error(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        self.hub.stats.count_in("error")
        d = self._take_pending(obj.get("ref"))
        if d is not None:
            code = obj.get("code")
            code = code if isinstance(code, str) else "internal"
            d.errback(HubError(code, str(obj.get("message") or code)))

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
        d = self.hub.request(endpoint, obj.get("data"), self.device_id)
        d.addCallbacks(self._respond, self._respond_failure, callbackArgs=(mid,), errbackArgs=(mid,))

    def _respond(self, result: Any, mid: int | None) -> None:
        if self.closing:
            return
        try:
            frame = encode_obj({"type": "response", "id": mid, "status": "success", "data": result})
        except TypeError:
            self._respond_error(mid, "internal", "endpoint result is not JSON-serialisable")
            return
        self.hub.stats.count_out("response")
        self._send(frame)

    def _respond_failure(self, f: Failure, mid: int | None) -> None:
        err = f.value
        code = err.code if isinstance(err, HubError) else "internal"
        message = err.message if isinstance(err, HubError) else "internal error"
        self._respond_error(mid, code, message)

    def _respond_error(self, mid: int | None, code: str, message: str) -> None:
        if self.closing:
            return
        self._send(
            encode_obj({"type": "response", "id": mid, "status": "error", "code": code, "message": message})
        )

    def _command(self, obj: dict[str, Any], mid: int | None, payload: bytes) -> None:
        target = obj.get("device_id")
        d = self.hub.command(obj, self.device_id, target if isinstance(target, str) else None)
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
        self._next_id += 1
        cid = self._next_id
        body = dict(command.body)
        body["id"] = cid
        self._send(encode_obj(body))
        d: defer.Deferred[Any] = defer.Deferred()
        timer = self.clock.callLater(self.cfg.ack_timeout, self._ack_timeout, cid)
        if self._pending is None:
            self._pending = {}
        self._pending[cid] = (d, timer)
        return d

    def _ack_timeout(self, cid: int) -> None:
        entry = self._pending.pop(cid, None) if self._pending else None
        if entry is not None:
            entry[0].errback(
                HubError(
                    "delivery_timeout", f"{self.device_id} did not ack within {self.cfg.ack_timeout:g} s"
                )
            )

    # -- legacy dialect (Cartobot) --

    def _enter_legacy(self) -> None:
        self.mode = "legacy"
        self._decoder.max_frame = self.cfg.max_frame
        self._legacy = self.factory.legacy_device(self.ip)

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
        self._enter_legacy()
        self.mode = "poll"
        self._last_rx = self.clock.seconds()
        assert self._legacy is not None
        self.hub.stats.count_in("REQUEST_INSTRUCTION")
        self._legacy.touch(self._last_rx)
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


def _first_write(transport: Any, data: bytes) -> None:
    """Write a connection's first bytes (usually the welcome) straight to a plain TCP socket.

    Twisted's buffered write path adds ~0.8 KB of state to a transport the first time it runs
    (measured: 1.92 vs 1.1 KB per idle connection), which most robot connections would otherwise
    carry for life. The kernel takes a first small write whole; anything it does not take, TLS
    transports and test transports go through ``transport.write`` as usual.
    """
    sock = getattr(transport, "socket", None)
    if sock is None or not isinstance(transport, tcp.Connection) or ISSLTransport.providedBy(transport):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:  # let Twisted see and report the broken connection its usual way
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


def _id(obj: dict[str, Any]) -> int | None:
    mid = obj.get("id")
    return mid if mid.__class__ is int else None


class LegacyDevice:
    """One Cartobot bot (``bot-<ip>``): presence across its short connections and its pull queue.

    It is the device's :class:`~robonet.model.Link`: commands are queued (bounded, oldest dropped)
    and handed to the next ``REQUEST_INSTRUCTION`` poll; the sender is acked when queued.
    """

    face = "botlink"
    log = Logger()

    def __init__(self, factory: BotLinkFactory, ip: str, device_id: str) -> None:
        self.factory = factory
        self.hub = factory.hub
        self.ip = ip
        self.device_id = device_id
        self.queue: deque[dict[str, Any]] = deque()
        self.device: Any = None
        self._pollers: list[tuple[BotLinkProtocol, IDelayedCall]] = []
        self._expiry: IDelayedCall | None = None
        self._last = 0.0

    def touch(self, now: float) -> Any:
        """A frame or poll arrived: (re)connect the device and push its expiry out."""
        self._last = now
        if self.device is None or not self.device.online or self.device.link is not self:
            self.device = self.hub.connect(
                self, self.device_id, face="botlink", role="robot", address=self.ip, dialect="cartobot"
            )
        if self._expiry is None:
            self._expiry = self.factory.clock.callLater(self.factory.config.idle_timeout, self._expire)
        return self.device

    def _expire(self) -> None:
        self._expiry = None
        left = self._last + self.factory.config.idle_timeout - self.factory.clock.seconds()
        if left > 0 or self._pollers:
            self._expiry = self.factory.clock.callLater(max(left, 1.0), self._expire)
            return
        self.hub.disconnect(self, self.device_id)

    def deliver(self, command: Command) -> None:
        """Queue ``command`` for the bot's next poll (ack now); only Cartobot instructions."""
        if command.type not in LEGACY_COMMANDS:
            raise HubError(
                "unknown_command",
                f"{self.device_id} is a Cartobot bot: it takes movement_instruction and trial_response only",
            )
        body = {k: v for k, v in command.body.items() if k not in ("device_id", "timestamp")}
        if command.type == "movement_instruction":
            d, a = body.get("distance_cm"), body.get("angle_degrees")
            if not _num_in(d, 1000) or not _num_in(a, 360):
                raise HubError(
                    "bad_frame",
                    "movement_instruction needs -1000<=distance_cm<=1000, -360<=angle_degrees<=360",
                )
        if self._pollers:
            proto, timer = self._pollers.pop(0)
            if timer.active():
                timer.cancel()
            proto.give_instruction(body)
            return None
        if len(self.queue) >= self.factory.config.legacy_queue:
            self.queue.popleft()
            self.hub.stats.drop("legacy_queue_full")
        self.queue.append(body)
        return None

    def poll(self, proto: BotLinkProtocol) -> None:
        """A bot asked for an instruction: answer now, or wait up to ``legacy_poll_wait``."""
        if self.queue:
            proto.give_instruction(self.queue.popleft())
            return
        timer = self.factory.clock.callLater(self.factory.config.legacy_poll_wait, self._poll_expired, proto)
        self._pollers.append((proto, timer))

    def _poll_expired(self, proto: BotLinkProtocol) -> None:
        self._pollers = [(p, t) for p, t in self._pollers if p is not proto]
        proto.give_instruction(None)

    def poll_gone(self, proto: BotLinkProtocol) -> None:
        """The polling connection closed before an instruction came."""
        keep = []
        for p, t in self._pollers:
            if p is proto:
                if t.active():
                    t.cancel()
            else:
                keep.append((p, t))
        self._pollers = keep

    def close_link(self, code: str, message: str) -> None:
        """model.Link: a native connection took this id over; stop answering polls for it."""
        for proto, timer in self._pollers:
            if timer.active():
                timer.cancel()
            proto.give_instruction(None)
        self._pollers = []
        self.device = None


def _num_in(v: Any, limit: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and -limit <= v <= limit


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
        self.per_ip: dict[str, int] = {}
        self.legacy: dict[str, LegacyDevice] = {}
        self.idle = IdleWatch(clock)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        ip = getattr(addr, "host", "?")
        n = self.per_ip.get(ip, 0)
        if n >= self.config.max_per_ip:
            self.hub.stats.error("rate_limited")
            refuse = _Refuse(f"too many connections from {ip} (max {self.config.max_per_ip})")
            refuse.factory = self
            return refuse
        self.per_ip[ip] = n + 1
        return BotLinkProtocol(self, addr)

    def stopFactory(self) -> None:
        """The last listening port closed: drop the idle timer."""
        self.idle.clear()

    def released(self, ip: str) -> None:
        """A connection from ``ip`` closed."""
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def legacy_device(self, ip: str) -> LegacyDevice:
        """The Cartobot device for ``ip`` (named by ``legacy_names`` or ``bot-<ip>``)."""
        dev = self.legacy.get(ip)
        if dev is None:
            dev = LegacyDevice(self, ip, self.config.legacy_names.get(ip) or f"bot-{ip}")
            self.legacy[ip] = dev
        return dev
