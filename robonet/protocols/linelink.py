"""Line link face: newline-delimited JSON or text on one TCP port (spec/linelink.md).

Three dialects share the port, decided per line (docs/linelink.rst records every decision the spec
leaves open):

1. **robonet envelope**: a JSON object with ``type``; the bot-link messages of spec/botlink.md, one per
   line. ``hello`` is optional; without it the connection is an anonymous ``client`` named
   ``line-<ip>:<port>``. A ``robot`` receives commands as JSON lines and acks them.
2. **witch-core requests** (seed 002): ``{"endpoint"|"protocol_name": N, "data": D}`` and
   ``{"request": "ping"|"echo"|"status"|"info"}``, answered with ``{"status": ..., "timestamp": T}``.
3. **LabAuto** (seed 001): any other line. Plain text becomes ``{"type":"text","text":...}``, a JSON
   object without ``type``/``endpoint``/``protocol_name``/``request`` a message of type ``json``; both
   go to the hub's callbacks, and the ``text`` / ``json`` endpoints (or, for text, the built-in
   replies) may answer with exactly one line.

:class:`LineSplitter` and the ``encode_*`` / :func:`decode_line` helpers are pure (no I/O);
:class:`LineLinkProtocol` only feeds them and dispatches to the hub.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from robonet.config import Config
from robonet.fanout import OutboundQueue
from robonet.model import Command, Event, HubError, Message, iso_utc
from robonet.protocols.botlink import additive_sum

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

    from robonet.hub import Hub
    from robonet.registry import Device

FACE = "line"
PROTO = 1
MAX_ID = 2**53
MAX_DEVICE_ID = 128
# A closing connection whose peer does not read gets this long to drain, then is aborted.
ABORT_AFTER = 10.0
# Built-in answers to LabAuto text lines when no ``text`` endpoint is registered (docs/linelink.rst).
DEFAULT_TEXT_REPLIES: Mapping[str, str] = {"hello": "ok", "ping": "pong"}
PROTOCOLS = ("robonet/1", "witch-core", "labauto")
# Token roles that allow any hello role (as on the bot link).
ANY_ROLE = ("any", "admin")
SERVER_FULL = b'{"status":"error","message":"server full"}\n'

_OPT = orjson.OPT_NON_STR_KEYS
_dumps = orjson.dumps
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError
_ACK = b'{"type":"ack","id":%d,"sum":%d}\n'

# decode_line kinds
TEXT = 0
OBJECT = 1
BAD_JSON = 2
BAD_UTF8 = 3


# --- pure codec ----------------------------------------------------------------------------------


class LineSplitter:
    """Incremental line splitter: feed it reads of any size, get whole stripped lines back.

    Lines end with ``\\n``; each returned line has surrounding ASCII whitespace (and so a trailing
    ``\\r``) stripped; blank lines are dropped. A line whose raw length (without its ``\\n``) exceeds
    ``max_line`` bytes is an overflow: :meth:`feed` reports it at once (even before its newline
    arrives) and the splitter holds nothing more. One ``bytes.split`` per read with a newline; a
    partial line is kept as a list of chunks, so a line dribbled in byte by byte costs O(n), not
    O(n^2) as re-joining on every read would.
    """

    __slots__ = ("max_line", "_parts", "_held")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._parts: list[bytes] = []
        self._held = 0

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete line."""
        return self._held

    def reset(self) -> None:
        """Forget any partial line."""
        self._parts = []
        self._held = 0

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """Append ``data``; return ``(complete non-blank lines in order, overflow)``.

        When ``overflow`` is true the lines before the over-long one are still returned; the
        caller is expected to reject the connection (the stream cannot be trusted past it).
        """
        limit = self.max_line
        if data.find(b"\n") < 0:
            held = self._held + len(data)
            if held > limit:
                self.reset()
                return [], True
            if data:
                self._parts.append(data)
                self._held = held
            return [], False
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts = []
        raw_lines = data.split(b"\n")
        tail = raw_lines.pop()
        out: list[bytes] = []
        append = out.append
        for raw in raw_lines:
            if len(raw) > limit:
                self.reset()
                return out, True
            line = raw.strip()
            if line:
                append(line)
        if len(tail) > limit:
            self.reset()
            return out, True
        if tail:
            self._parts = [tail]
            self._held = len(tail)
        else:
            self._held = 0
        return out, False


def decode_line(line: bytes) -> tuple[int, Any]:
    """Classify one stripped, non-empty line.

    Returns ``(OBJECT, dict)`` for a line starting with ``{`` that parses as JSON (it is then an
    object), ``(TEXT, str)`` for any other valid UTF-8 line (``[1]``, ``42`` and ``"x"`` are text),
    ``(BAD_JSON, reason)`` for a ``{`` line that does not parse (depth over 1024 included), and
    ``(BAD_UTF8, reason)`` for invalid UTF-8.
    """
    if line[0] == 0x7B:  # "{"
        try:
            return OBJECT, _loads(line)
        except _JSONDecodeError as e:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return BAD_UTF8, "line is not valid UTF-8"
            return BAD_JSON, f"invalid JSON: {str(e)[:120]}"
    try:
        return TEXT, line.decode("utf-8")
    except UnicodeDecodeError:
        return BAD_UTF8, "line is not valid UTF-8"


def encode_line(obj: Any) -> bytes:
    """One JSON line (``orjson``; non-string dict keys allowed). Raises TypeError if not JSON-able."""
    return _dumps(obj, option=_OPT) + b"\n"


def encode_ack(msg_id: int, checksum: int) -> bytes:
    """``{"type":"ack","id":N,"sum":S}`` line from a template (hot path)."""
    return _ACK % (msg_id, checksum)


def encode_error(code: str, message: str, ref: int | None = None) -> bytes:
    """Bot-link error line ``{"type":"error","code","message","ref"}`` (spec/botlink.md section 7)."""
    return encode_line({"type": "error", "code": code, "message": message, "ref": ref})


def encode_status_error(message: str, timestamp: str, code: str | None = None) -> bytes:
    """witch-core error line ``{"status":"error",["code",]"message","timestamp"}``."""
    obj: dict[str, Any] = {"status": "error"}
    if code is not None:
        obj["code"] = code
    obj["message"] = message
    obj["timestamp"] = timestamp
    return encode_line(obj)


def encode_answer(result: Any) -> bytes | None:
    """A callback/endpoint answer to a LabAuto line as exactly one line, or None for no answer.

    None and ``""`` -> no line; ``str`` (``bytes`` decoded as UTF-8) -> the text itself with line
    breaks replaced by spaces; anything else -> its JSON. Raises TypeError if not JSON-able.
    """
    if result is None:
        return None
    if isinstance(result, (bytes, bytearray)):
        result = bytes(result).decode("utf-8", "replace")
    if isinstance(result, str):
        if "\n" in result or "\r" in result:
            result = result.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        result = result.strip()
        return (result + "\n").encode("utf-8") if result else None
    return encode_line(result)


def encode_event(ev: Event) -> bytes:
    """A fan-out event as one robonet-envelope line for a subscribed line-link connection.

    data: ``{...body without id/ref/ts, "type": T, "device_id": D, "ts": at[, "hub": H]}``;
    status: ``{"type":"device_update","event":"device_up"|...,"device":{record},"ts":at}``.
    """
    if ev.kind == "status":
        return encode_line({"type": "device_update", "event": ev.type, "device": ev.body, "ts": ev.at})
    out = {k: v for k, v in ev.body.items() if k not in ("id", "ref", "ts")}
    out["type"] = ev.type
    out["device_id"] = ev.device_id
    out["ts"] = ev.at
    if ev.hub:
        out["hub"] = ev.hub
    return encode_line(out)


def _failure_code(f: Failure) -> tuple[str, str]:
    v = f.value
    if isinstance(v, HubError):
        return v.code, v.message
    return "internal", f"{type(v).__name__}: {v}"


# --- protocol ------------------------------------------------------------------------------------


class _Slot:
    """One reply owed to a witch-core/LabAuto line, in request order. ``data`` None = no line."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.done = False


class _Delivery:
    """A command written to a robot, waiting for its ack."""

    __slots__ = ("deferred", "timer", "checksum")

    def __init__(self, deferred: defer.Deferred[Any], timer: IDelayedCall, checksum: int) -> None:
        self.deferred = deferred
        self.timer = timer
        self.checksum = checksum


@implementer(IPushProducer)
class _Flow:
    """The connection's streaming producer: a full write buffer stops reading from the peer.

    A client that pipelines requests but never reads its replies thus stalls itself instead of
    growing our buffers; a fan-out queue, when the connection subscribed, is paused too.
    """

    __slots__ = ("proto", "paused")

    def __init__(self, proto: LineLinkProtocol) -> None:
        self.proto = proto
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        t = self.proto.transport
        if t is not None:
            t.pauseProducing()  # type: ignore[attr-defined]
        q = self.proto.queue
        if q is not None:
            q.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        t = self.proto.transport
        if t is not None and not self.proto.closing:
            t.resumeProducing()  # type: ignore[attr-defined]
        q = self.proto.queue
        if q is not None:
            q.resumeProducing()

    def stopProducing(self) -> None:
        q = self.proto.queue
        if q is not None:
            q.stopProducing()


class _LineSubscriber:
    """Adapts a subscribed connection to the hub's Subscriber protocol (model.Subscriber)."""

    __slots__ = ("queue",)

    def __init__(self, queue: OutboundQueue) -> None:
        self.queue = queue

    def offer(self, event: Event) -> None:
        self.queue.put(encode_event(event), event.priority, event.key)


class LineLinkProtocol(Protocol):
    """One line-link connection; implements :class:`robonet.model.Link` for robots said hello here.

    Per read: split lines, dispatch each by dialect, write everything owed in one ``transport.write``.
    witch-core and LabAuto replies go out in request order (a reply waiting on a Deferred holds back
    the ones after it); robonet-envelope replies carry ids and go out when ready.
    """

    log = Logger()
    face = FACE

    def __init__(self, factory: LineLinkFactory) -> None:
        self.factory = factory
        self.hub = factory.hub
        self.clock = factory.clock
        self.splitter = LineSplitter(factory.max_line)
        self.device_id = ""
        self.address = ""
        self.ip = ""
        self.role = "client"
        self.name = ""
        self.device: Device | None = None
        self.dialect = ""
        self.helloed = False
        self.admitted = False
        self.closing = False
        self.queue: OutboundQueue | None = None
        self._subscriber: _LineSubscriber | None = None
        self._flow: _Flow | None = None
        self._out: list[bytes] | None = None
        self._slots: deque[_Slot] = deque()
        self._inflight = 0
        self._deliveries: dict[int, _Delivery] = {}
        self._next_id = 0
        self._timer: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._got_line = False
        self._last_rx = 0.0
        self._now = 0.0
        self._gated = factory.tokens is not None
        self._commands = factory.hub.commands
        self._wait_batch: Any = None
        self._wait_acks: list[tuple[int, bytes]] | None = None

    # -- connection lifecycle --

    @property
    def _t(self) -> ITransport:
        assert self.transport is not None
        return self.transport

    def connectionMade(self) -> None:
        """Admit (max_clients, per-IP cap) or refuse with one error line; start the first-line deadline."""
        peer: IAddress = self._t.getPeer()
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        self.ip = str(host) if host is not None else "local"
        self.address = f"{self.ip}:{port}" if port is not None else self.ip
        self.device_id = f"line-{self.address}"
        refusal = self.factory.admit(self)
        if refusal is not None:
            self.closing = True
            self._t.write(refusal)
            self._t.loseConnection()
            self._abort_call = self.clock.callLater(ABORT_AFTER, self._abort)
            return
        self.admitted = True
        self.hub.stats.connection(FACE, 1)
        keepalive = getattr(self.transport, "setTcpKeepAlive", None)
        if keepalive is not None:
            keepalive(1)
        self._flow = _Flow(self)
        self._t.registerProducer(self._flow, True)  # type: ignore[attr-defined]
        self._last_rx = self.clock.seconds()
        self._timer = self.clock.callLater(self.factory.first_line_timeout, self._check_idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Release the slot, fail pending deliveries (device_offline), mark the device offline."""
        self.closing = True
        for call in (self._timer, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._abort_call = None
        self._slots.clear()
        if not self.admitted:
            return
        self.admitted = False
        self.factory.release(self)
        self.hub.stats.connection(FACE, -1)
        if self._subscriber is not None:
            self.hub.unsubscribe(self._subscriber)
            self._subscriber = None
        if self.queue is not None:
            self.queue.close()
        deliveries, self._deliveries = self._deliveries, {}
        for entry in deliveries.values():
            if entry.timer.active():
                entry.timer.cancel()
            entry.deferred.errback(HubError("device_offline", f"device {self.device_id} disconnected"))
        if self.device is not None:
            self.hub.disconnect(self, self.device_id)
            self.device = None

    def _close(self) -> None:
        """Flush what is owed, close; abort if the peer does not drain within ABORT_AFTER."""
        if self.closing:
            return
        self._flush_out()
        self.closing = True
        t = self._t
        if self._flow is not None:
            t.unregisterProducer()  # type: ignore[attr-defined]
        t.loseConnection()
        self._abort_call = self.clock.callLater(ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def _check_idle(self) -> None:
        """First-line deadline, then idle_timeout since the last line (paused while we owe replies)."""
        self._timer = None
        if self.closing:
            return
        now = self.clock.seconds()
        if not self._got_line:
            t = self.factory.first_line_timeout
            self._fatal("idle_timeout", f"no complete line within {t:g} s")
            return
        if self._slots or self._inflight:
            self._last_rx = now
        timeout = self.factory.idle_timeout
        left = self._last_rx + timeout - now
        if left > 0:
            self._timer = self.clock.callLater(left, self._check_idle)
            return
        if self._flow is not None and self._flow.paused:
            # We stopped reading because the peer does not read its replies.
            self._fatal("idle_timeout", f"replies not read for {timeout:g} s")
        else:
            self._fatal("idle_timeout", f"no line received for {timeout:g} s")

    # -- output --

    def _ts(self) -> str:
        """Reply timestamp (ISO-8601 UTC): the read's time while handling a read, else now."""
        factory: LineLinkFactory = self.factory
        return factory.iso(self._now if self._out is not None else self.hub.now())

    def _send(self, data: bytes) -> None:
        """Write now, or append to this read's single write."""
        out = self._out
        if out is not None:
            out.append(data)
        elif not self.closing:
            self.hub.stats.bytes_out += len(data)
            self._t.write(data)

    def _flush_out(self) -> None:
        out = self._out
        if out:
            data = b"".join(out) if len(out) > 1 else out[0]
            out.clear()
            if not self.closing:
                self.hub.stats.bytes_out += len(data)
                self._t.write(data)

    def _reply(self, data: bytes | None) -> None:
        """An in-order reply that is ready now."""
        if not self._slots:
            if data is not None:
                self._send(data)
            return
        slot = _Slot()
        slot.data, slot.done = data, True
        self._slots.append(slot)

    def _reply_later(self) -> _Slot:
        slot = _Slot()
        self._slots.append(slot)
        return slot

    def _settled(self) -> None:
        """An envelope request/command/ack we owed is done: idle time counts from now."""
        self._inflight -= 1
        self._last_rx = self.clock.seconds()

    def _fill(self, slot: _Slot, data: bytes | None) -> None:
        slot.data, slot.done = data, True
        self._last_rx = self.clock.seconds()
        slots = self._slots
        while slots and slots[0].done:
            ready = slots.popleft().data
            if ready is not None:
                self._send(ready)

    def _error(self, code: str, message: str, ref: int | None = None, ordered: bool = True) -> None:
        """A dialect-less error in the connection's shape (bot-link once it spoke the envelope).

        witch-core/LabAuto-shaped errors take their place among in-order replies unless ``ordered``
        is false (the connection is closing: nothing after it will be written).
        """
        self.hub.stats.error(code)
        self.log.debug("line {address}: {code}: {message}", address=self.address, code=code, message=message)
        if self.dialect == "robonet":
            self._send(encode_error(code, message, ref))
        elif ordered:
            self._reply(encode_status_error(message, self._ts(), code))
        else:
            self._send(encode_status_error(message, self._ts(), code))

    def _fatal(self, code: str, message: str, ref: int | None = None) -> None:
        """Error line, then close; replies still owed (waiting on Deferreds) are abandoned."""
        self._slots.clear()
        self._error(code, message, ref, ordered=False)
        self._close()

    # -- input --

    def dataReceived(self, data: bytes) -> None:
        """Split, dispatch every complete line, then write everything owed in one write."""
        if self.closing:
            return
        self.hub.stats.bytes_in += len(data)
        lines, overflow = self.splitter.feed(data)
        if lines:
            self._got_line = True
            self._now = self._last_rx = self.clock.seconds()
            self._out = []
            line_fn = self._line
            try:
                for line in lines:
                    line_fn(line)
                    if self.closing:
                        break
            finally:
                self._flush_out()
                self._out = None
        if overflow and not self.closing:
            self._fatal("frame_too_large", f"line longer than {self.splitter.max_line} bytes")

    def _line(self, line: bytes) -> None:
        if line[0] == 0x7B:  # "{": a JSON object (decode_line's rule, inlined on the hot path)
            try:
                obj: dict[str, Any] = _loads(line)
            except _JSONDecodeError:
                kind, reason = decode_line(line)
                self._error("bad_json" if kind == BAD_JSON else "bad_frame", reason)
                return
            mtype = obj.get("type")
            if self._gated and mtype != "hello":
                if mtype is not None:
                    self.dialect = "robonet"
                self._fatal("unauthorized", "say hello with a token first")
            elif mtype is not None or "type" in obj:
                self._envelope(obj, mtype, line)
            elif "endpoint" in obj:
                self._witch_endpoint(obj["endpoint"], obj.get("data"))
            elif "protocol_name" in obj:
                self._witch_endpoint(obj["protocol_name"], obj.get("data"))
            elif "request" in obj:
                self._witch_request(obj)
            else:
                self._labauto("json", obj, line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error("bad_frame", "line is not valid UTF-8")
            return
        if self._gated:
            self._fatal("unauthorized", "say hello with a token first")
        else:
            self._labauto("text", text, line)

    # -- dialect 1: robonet envelope --

    def _envelope(self, obj: dict[str, Any], mtype: Any, line: bytes) -> None:
        self.dialect = "robonet"
        mid = obj.get("id")
        if mid is not None and (mid.__class__ is not int or not 0 <= mid <= MAX_ID):
            self._error("bad_frame", "id must be an integer 0..2^53")
            return
        if mtype.__class__ is not str or not mtype:
            self._error("missing_type", "type must be a non-empty string", mid)
            return
        special = _SPECIAL.get(mtype)
        if special is not None:
            special(self, obj, mid, line)
        elif mtype in self._commands:
            self._command(obj, mid, line)
        else:
            # Data (telemetry, sensor_data, ...): the hot path, kept inline.
            dev = self.device
            if dev is None:
                dev = self._ensure_device("robonet/1")
            batch = self.hub.ingest(dev, Message(mtype, obj, self.device_id, self._now, mid, line))
            if mid is not None:
                ack = _ACK % (mid, sum(line) & 0xFFFFFFFF)
                if batch is None:
                    self._send(ack)
                else:
                    self._ack_after(batch, mid, ack)

    def _on_ping(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        self.hub.stats.count_in("ping", len(line))
        if mid is not None:
            self._send(encode_ack(mid, additive_sum(line)))

    def _on_reply(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        """welcome/response sent to us: nothing to do but count."""
        self.hub.stats.count_in(obj["type"], len(line))

    def _hello(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        self.hub.stats.count_in("hello", len(line))
        if self.helloed:
            self._error("bad_hello", "hello already received", mid)
            return
        proto = obj.get("proto", PROTO)
        if proto != PROTO:
            self._fatal("proto_unsupported", f"proto {proto!r} not supported (this hub speaks {PROTO})", mid)
            return
        role = obj.get("role", "client")
        if role not in ("robot", "client"):
            self._fatal("bad_hello", "role must be robot or client (peers use the bot link)", mid)
            return
        device_id = obj.get("device_id")
        if device_id is None:
            device_id = self.device_id
        elif (
            not isinstance(device_id, str)
            or not 0 < len(device_id) <= MAX_DEVICE_ID
            or not device_id.isprintable()
            or device_id != device_id.strip()
        ):
            self._fatal("bad_hello", f"device_id must be 1..{MAX_DEVICE_ID} printable characters", mid)
            return
        name = obj.get("name", "")
        if not isinstance(name, str):
            name = ""
        tokens = self.factory.tokens
        if tokens is not None:
            token = obj.get("token")
            granted = tokens.get(token) if isinstance(token, str) else None
            if granted is None or (granted not in ANY_ROLE and granted != role):
                self.log.info("line {address}: hello refused (bad token)", address=self.address)
                self._fatal("auth_failed", "invalid token for this role", mid)
                return
        if self.device is not None and device_id != self.device_id:
            self.hub.disconnect(self, self.device_id)
        self.device_id = device_id
        self.role = role
        self.name = name[:MAX_DEVICE_ID]
        self.helloed = True
        self._gated = False
        self.device = self.hub.connect(
            self, device_id, face=FACE, role=role, address=self.address, name=self.name, dialect="robonet/1"
        )
        node = self.hub.node
        welcome: dict[str, Any] = {
            "type": "welcome",
            "proto": PROTO,
            "session": str(uuid.uuid4()),
            "server": {"id": node.node_id, "name": node.name, "version": node.version},
            "heartbeat_s": self.factory.heartbeat_s,
            "max_frame": self.factory.max_line,
            "device_id": device_id,
        }
        self._send(encode_line(welcome))

    def _ensure_device(self, dialect: str) -> Device:
        dev = self.device
        if dev is None:
            dev = self.device = self.hub.connect(
                self, self.device_id, face=FACE, role=self.role, address=self.address, dialect=dialect
            )
        return dev

    def _ack_after(self, batch: Any, mid: int, ack: bytes) -> None:
        """Ack only once the store committed ``batch``; one waiter per batch, acks written together."""
        if batch is self._wait_batch and self._wait_acks is not None:
            self._wait_acks.append((mid, ack))
            return
        self._wait_batch = batch
        self._wait_acks = acks = [(mid, ack)]
        self._inflight += 1
        batch.when_committed(self._acks_committed, self._acks_failed, acks, self._now)

    def _release_batch(self, acks: list[tuple[int, bytes]]) -> None:
        self._settled()
        if self._wait_acks is acks:
            self._wait_batch = self._wait_acks = None

    def _acks_committed(self, acks: list[tuple[int, bytes]], received: float) -> None:
        self._release_batch(acks)
        if not self.closing:
            self.hub.stats.ack_delay.add(self.hub.now() - received)
            self._send(b"".join([ack for _, ack in acks]))

    def _acks_failed(self, failure: Failure, acks: list[tuple[int, bytes]], received: float) -> None:
        self._release_batch(acks)
        self.log.warn(
            "store commit failed; {n} messages from {device_id} not acked",
            n=len(acks),
            device_id=self.device_id,
        )
        if not self.closing:
            for mid, _ in acks:
                self._error("internal", "message could not be stored", mid)

    def _request(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        endpoint = obj.get("endpoint")
        if not isinstance(endpoint, str):
            self._send(
                encode_line(
                    {
                        "type": "response",
                        "id": mid,
                        "status": "error",
                        "code": "unknown_endpoint",
                        "message": f"Unknown endpoint: {endpoint}",
                    }
                )
            )
            self.hub.stats.error("unknown_endpoint")
            return
        self._inflight += 1

        def ok(result: Any) -> None:
            self._settled()
            try:
                data = encode_line({"type": "response", "id": mid, "status": "success", "data": result})
            except TypeError:
                self.hub.stats.error("internal")
                data = encode_line(
                    {
                        "type": "response",
                        "id": mid,
                        "status": "error",
                        "code": "internal",
                        "message": f"endpoint {endpoint} returned a value that is not JSON",
                    }
                )
            self._send(data)

        def failed(f: Failure) -> None:
            self._settled()
            code, message = _failure_code(f)
            reply = {"type": "response", "id": mid, "status": "error", "code": code, "message": message}
            self._send(encode_line(reply))

        self.hub.request(endpoint, obj.get("data"), self.device_id).addCallbacks(ok, failed)

    def _command(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        target = obj.get("device_id")
        if target is not None and not isinstance(target, str):
            self._error("bad_frame", "device_id must be a string", mid)
            return
        self._inflight += 1
        checksum = additive_sum(line) if mid is not None else 0

        def ok(_: Any) -> None:
            self._settled()
            if mid is not None:
                self._send(encode_ack(mid, checksum))

        def failed(f: Failure) -> None:
            self._settled()
            code, message = _failure_code(f)
            self.log.debug("line {address}: command failed: {code}", address=self.address, code=code)
            self._send(encode_error(code, message, mid))

        self.hub.command(obj, self.device_id, target).addCallbacks(ok, failed)

    def _on_ack(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        self.hub.stats.count_in("ack")
        entry = self._deliveries.pop(mid, None) if mid is not None else None
        if entry is None:
            self.log.debug("line {address}: ack for unknown id {id}", address=self.address, id=mid)
            return
        if entry.timer.active():
            entry.timer.cancel()
        checksum = obj.get("sum")
        if checksum is not None and checksum != entry.checksum:
            # As on the bot link: the robot did get a line with this id; count and log the mismatch.
            self.hub.stats.error("bad_checksum")
            self.log.info(
                "line {device_id}: ack {id} sum {got!r} != {want}",
                device_id=self.device_id,
                id=mid,
                got=checksum,
                want=entry.checksum,
            )
        entry.deferred.callback(obj)

    def _on_error(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        """A device's error: with ``ref`` naming a command we sent, that delivery fails with it."""
        self.hub.stats.count_in("error")
        ref = obj.get("ref")
        entry = self._deliveries.pop(ref, None) if isinstance(ref, int) else None
        code = obj.get("code")
        code = code if isinstance(code, str) and code else "internal"
        message = obj.get("message")
        message = message if isinstance(message, str) else ""
        # info only when it refuses one of our commands: unsolicited error lines could flood the log
        emit = self.log.info if entry is not None else self.log.debug
        emit("line {address}: device error {code}: {msg}", address=self.address, code=code, msg=message)
        if entry is not None:
            if entry.timer.active():
                entry.timer.cancel()
            entry.deferred.errback(HubError(code, message))

    def _subscribe(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        """Make this connection a fan-out subscriber (bounded queue, as dashboards)."""
        if self.queue is None:
            web = self.factory.config.web
            self.queue = OutboundQueue(
                self._send,
                clock=self.clock,
                max_bytes=web.max_queue_bytes,
                slow_timeout=web.slow_timeout,
                on_slow=self._too_slow,
                stats=self.hub.stats,
            )
            if self._flow is not None and self._flow.paused:
                self.queue.pauseProducing()
            self._subscriber = _LineSubscriber(self.queue)
            self.hub.subscribe(self._subscriber)
        if mid is not None:
            self._send(encode_ack(mid, additive_sum(line)))

    def _unsubscribe(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        if self._subscriber is not None:
            self.hub.unsubscribe(self._subscriber)
            self._subscriber = None
        if self.queue is not None:
            self.queue.close()
            self.queue = None
        if mid is not None:
            self._send(encode_ack(mid, additive_sum(line)))

    def _too_slow(self) -> None:
        if self._subscriber is not None:
            self.hub.unsubscribe(self._subscriber)
            self._subscriber = None
        self._fatal("rate_limited", "subscriber too slow: fan-out queue over its limit")

    # -- model.Link --

    def deliver(self, command: Command) -> defer.Deferred[Any]:
        """Write ``command`` as a JSON line with a fresh id; fires with the robot's ack object.

        Fails with HubError ``delivery_timeout`` after ``botlink.ack_timeout`` s without an ack,
        ``bad_frame`` on an ack whose ``sum`` does not match, the robot's own error code when it
        answers ``{"type":"error","ref":id}``, ``device_offline`` if the connection is gone.
        """
        if self.closing:
            return defer.fail(HubError("device_offline", f"device {self.device_id} disconnected"))
        self._next_id += 1
        cid = self._next_id
        body = dict(command.body)
        body["id"] = cid
        payload = _dumps(body, option=_OPT)

        def cancel(_: defer.Deferred[Any]) -> None:
            entry = self._deliveries.pop(cid, None)
            if entry is not None and entry.timer.active():
                entry.timer.cancel()

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        timer = self.clock.callLater(self.factory.ack_timeout, self._delivery_timeout, cid)
        self._deliveries[cid] = _Delivery(d, timer, additive_sum(payload))
        self.hub.stats.count_out(command.type, len(payload) + 1)
        self._send(payload + b"\n")
        return d

    def _delivery_timeout(self, cid: int) -> None:
        entry = self._deliveries.pop(cid, None)
        if entry is not None:
            t = self.factory.ack_timeout
            err = HubError("delivery_timeout", f"no ack from {self.device_id} within {t:g} s")
            entry.deferred.errback(err)

    def close_link(self, code: str, message: str) -> None:
        """Tell the device why (error line) and close (e.g. code ``replaced``)."""
        if not self.closing:
            self._fatal(code, message)

    # -- dialect 2: witch-core --

    def _witch_endpoint(self, name: Any, data: Any) -> None:
        if not self.helloed:
            self.dialect = "witch"
        if not isinstance(name, str):
            self.hub.stats.error("unknown_endpoint")
            self._reply(encode_status_error(f"Unknown endpoint: {name}", self._ts()))
            return
        slot = self._reply_later()

        def ok(result: Any) -> None:
            ts = self._ts()
            try:
                line = encode_line({"status": "success", "data": result, "timestamp": ts})
            except TypeError:
                self.hub.stats.error("internal")
                line = encode_status_error("Error processing endpoint: result is not JSON-serialisable", ts)
            self._fill(slot, line)

        def failed(f: Failure) -> None:
            code, message = _failure_code(f)
            ts = self._ts()
            if code == "unknown_endpoint":
                text = f"Unknown endpoint: {name}"
            else:
                text = f"Error processing endpoint: {message}"
            self._fill(slot, encode_status_error(text, ts))

        self.hub.request(name, data, self.device_id).addCallbacks(ok, failed)

    def _witch_request(self, obj: dict[str, Any]) -> None:
        if not self.helloed:
            self.dialect = "witch"
        self.hub.stats.count_in("request")
        req = obj.get("request")
        ts = self._ts()
        if req == "ping":
            reply: dict[str, Any] = {"status": "success", "pong": True, "server_time": ts, "timestamp": ts}
        elif req == "echo":
            reply = {"status": "success", "echo": obj.get("data", {}), "timestamp": ts}
        elif req in ("status", "info"):
            reply = {"status": "success", "data": self.factory.server_info(self), "timestamp": ts}
        else:
            self.hub.stats.error("unknown_request")
            reply = {"status": "error", "message": f"Unknown request type: {req}", "timestamp": ts}
        self._reply(encode_line(reply))

    # -- dialect 3: LabAuto --

    def _labauto(self, mtype: str, value: Any, line: bytes) -> None:
        """Text or a plain JSON object: ingest (callbacks), then the ``text``/``json`` endpoint answers."""
        if not self.dialect:
            self.dialect = "labauto"
        dev = self._ensure_device("labauto")
        if mtype == "text":
            body: dict[str, Any] = {"type": "text", "text": value}
            msg = Message("text", body, self.device_id, self._now)
        else:
            msg = Message("json", value, self.device_id, self._now, None, line)
        self.hub.ingest(dev, msg)
        if not self.factory.has_endpoint(mtype):
            if mtype == "text":
                builtin = self.factory.text_replies.get(value)
                if builtin is not None:
                    self._reply(encode_answer(builtin))
            return
        slot = self._reply_later()

        def ok(result: Any) -> None:
            try:
                line = encode_answer(result)
            except TypeError:
                self.hub.stats.error("internal")
                line = encode_status_error(
                    "Error processing endpoint: result is not JSON-serialisable", self._ts()
                )
            self._fill(slot, line)

        def failed(f: Failure) -> None:
            _code, message = _failure_code(f)
            ts = self._ts()
            self._fill(slot, encode_status_error(f"Error processing endpoint: {message}", ts))

        self.hub.request(mtype, value, self.device_id).addCallbacks(ok, failed)


_SPECIAL: dict[str, Callable[[LineLinkProtocol, dict[str, Any], int | None, bytes], None]] = {
    "hello": LineLinkProtocol._hello,
    "ack": LineLinkProtocol._on_ack,
    "ping": LineLinkProtocol._on_ping,
    "request": LineLinkProtocol._request,
    "error": LineLinkProtocol._on_error,
    "set": LineLinkProtocol._command,
    "subscribe": LineLinkProtocol._subscribe,
    "unsubscribe": LineLinkProtocol._unsubscribe,
    "welcome": LineLinkProtocol._on_reply,
    "response": LineLinkProtocol._on_reply,
}


class LineLinkFactory(ServerFactory):
    """Serves the line link (spec/linelink.md); the daemon listens with it on every ``line.listen``.

    ``hub`` is the shared :class:`~robonet.hub.Hub`, ``config`` the :class:`~robonet.config.Config`
    (``line.max_line``, ``max_clients``, ``idle_timeout``, ``text_replies``; ``botlink.hello_timeout``
    (first-line deadline), ``ack_timeout``, ``max_per_ip``; ``auth``), ``clock`` an IReactorTime.
    ``text_replies`` maps exact LabAuto text lines to built-in one-line answers used while no ``text``
    endpoint is registered (default ``line.text_replies``).
    """

    protocol = LineLinkProtocol
    noisy = False
    log = Logger()

    def __init__(
        self,
        hub: Hub,
        config: Config,
        clock: IReactorTime,
        text_replies: Mapping[str, str] | None = None,
    ) -> None:
        self.hub = hub
        self.config = config
        self.clock = clock
        line = config.line
        bot = config.botlink
        self.max_line = line.max_line
        self.max_clients = line.max_clients
        self.max_per_ip = bot.max_per_ip
        self.idle_timeout = line.idle_timeout
        self.first_line_timeout = bot.hello_timeout
        self.ack_timeout = bot.ack_timeout
        self.heartbeat_s = max(1, int(line.idle_timeout // 3))
        self.tokens: dict[str, str] | None = dict(config.auth.tokens) if config.auth.mode == "token" else None
        replies = line.text_replies if text_replies is None else text_replies
        self.text_replies: dict[str, str] = dict(replies)
        self.connections: set[LineLinkProtocol] = set()
        self._iso_at = -1.0
        self._iso = ""
        self._per_ip: dict[str, int] = {}

    def iso(self, t: float) -> str:
        """:func:`robonet.model.iso_utc`, memoised for the last time asked (replies of one read)."""
        if t != self._iso_at:
            self._iso_at = t
            self._iso = iso_utc(t)
        return self._iso

    def buildProtocol(self, addr: IAddress | None) -> LineLinkProtocol:
        """A fresh :class:`LineLinkProtocol` for each connection."""
        return LineLinkProtocol(self)

    @property
    def client_count(self) -> int:
        """Open, admitted line-link connections."""
        return len(self.connections)

    def admit(self, proto: LineLinkProtocol) -> bytes | None:
        """Count ``proto`` in, or return the one line to refuse it with (server full / per-IP cap)."""
        if len(self.connections) >= self.max_clients:
            self.hub.stats.error("server_full")
            self.log.info("line: refused {address}: server full", address=proto.address)
            return SERVER_FULL
        n = self._per_ip.get(proto.ip, 0)
        if n >= self.max_per_ip:
            self.hub.stats.error("rate_limited")
            self.log.info("line: refused {address}: too many connections from it", address=proto.address)
            return encode_status_error(
                "too many connections from this address", iso_utc(self.hub.now()), "rate_limited"
            )
        self._per_ip[proto.ip] = n + 1
        self.connections.add(proto)
        return None

    def release(self, proto: LineLinkProtocol) -> None:
        """Count ``proto`` out (connection lost)."""
        self.connections.discard(proto)
        n = self._per_ip.get(proto.ip, 0) - 1
        if n > 0:
            self._per_ip[proto.ip] = n
        else:
            self._per_ip.pop(proto.ip, None)

    def has_endpoint(self, name: str) -> bool:
        """Whether the hub serves endpoint ``name``."""
        return self.hub.has_endpoint(name)

    def server_info(self, proto: LineLinkProtocol) -> dict[str, Any]:
        """witch-core ``status``/``info`` data (docs/linelink.rst lists the keys)."""
        hub = self.hub
        node = hub.node
        host = proto.transport.getHost() if proto.transport is not None else None
        return {
            "status": "running",
            "server_id": node.node_id,
            "server_name": node.name,
            "name": node.name,
            "version": node.version,
            "project_id": node.project_id,
            "hash": node.hash,
            "uptime": round(hub.now() - hub.stats.started_at, 3),
            "client_count": len(self.connections),
            "max_clients": self.max_clients,
            "max_connections": self.max_clients,
            "host": getattr(host, "host", None),
            "port": getattr(host, "port", None),
            "protocols": list(PROTOCOLS),
            "endpoints": hub.endpoints,
        }
