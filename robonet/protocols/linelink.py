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

The codec (:class:`LineSplitter`, ``encode_*``, :func:`decode_line`) is
:mod:`robonet.protocols.linelink_codec` (re-exported here); the witch-core and LabAuto dialects are
:mod:`robonet.protocols.linelink_dialects`; robonet/1 decisions come from
:mod:`robonet.protocols.envelope` and the command/ack state from :mod:`robonet.protocols.deliveries`.
:class:`LineLinkProtocol` only feeds them and dispatches to the hub.

A ``line`` command (``{"type":"line","device_id":D,"text":T}``, docs/linelink.rst) reaches a
line-link device as the bare text line ``T`` (for LabAuto's ``wait_for``).

Over 600 lines: the Protocol carries output ordering (in-order replies, one write per read), flow
control and the robonet/1 handlers together; splitting them further would scatter one state machine.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from robonet.config import Config
from robonet.fanout import OutboundQueue
from robonet.limits import PerAddressLimiter
from robonet.model import Command, Event, HubError, Message, iso_utc
from robonet.protocols import envelope as env
from robonet.protocols import linelink_dialects as dialects
from robonet.protocols.deliveries import CommitAcks, PendingCommands
from robonet.protocols.envelope import additive_sum
from robonet.protocols.linelink_codec import (
    _ACK,
    _OPT,
    BAD_JSON,
    BAD_UTF8,
    OBJECT,
    TEXT,
    LineSplitter,
    _dumps,
    _JSONDecodeError,
    _loads,
    decode_line,
    encode_ack,
    encode_answer,
    encode_error,
    encode_event,
    encode_line,
    encode_status_error,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

    from robonet.hub import Hub
    from robonet.registry import Device

FACE = "line"
PROTO = env.PROTO
MAX_ID = env.MAX_ID
MAX_DEVICE_ID = env.MAX_DEVICE_ID
# A closing connection whose peer does not read gets this long to drain, then is aborted.
ABORT_AFTER = 10.0
PROTOCOLS = ("robonet/1", "witch-core", "labauto")
ANY_ROLE = env.ANY_ROLE
SERVER_FULL = b'{"status":"error","message":"server full"}\n'

__all__ = [
    "BAD_JSON",
    "BAD_UTF8",
    "OBJECT",
    "TEXT",
    "LineLinkFactory",
    "LineLinkProtocol",
    "LineSplitter",
    "decode_line",
    "encode_ack",
    "encode_answer",
    "encode_error",
    "encode_event",
    "encode_line",
    "encode_status_error",
]


# --- protocol ------------------------------------------------------------------------------------


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
            self.proto.drained()
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
        self._slots: deque[dialects.Slot] = deque()
        self._inflight = 0
        self._deliveries = PendingCommands(factory.clock, factory.ack_timeout, factory.hub.stats)
        self._text_waiting: list[tuple[defer.Deferred[Any], IDelayedCall]] = []
        self._timer: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._got_line = False
        self._last_rx = 0.0
        self._now = 0.0
        self._gated = factory.tokens is not None
        self._commands = factory.hub.commands
        self._acks: CommitAcks[tuple[int, bytes]] = CommitAcks(self._acks_committed, self._acks_failed)

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
        gone = HubError("device_offline", f"device {self.device_id} disconnected")
        self._deliveries.fail_all(gone)
        waiting, self._text_waiting = self._text_waiting, []
        for d, timer in waiting:
            if timer.active():
                timer.cancel()
            d.errback(gone)
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
        slot = dialects.Slot()
        slot.data, slot.done = data, True
        self._slots.append(slot)

    def _reply_later(self) -> dialects.Slot:
        slot = dialects.Slot()
        self._slots.append(slot)
        return slot

    def _settled(self) -> None:
        """An envelope request/command/ack we owed is done: idle time counts from now."""
        self._inflight -= 1
        self._last_rx = self.clock.seconds()

    def _fill(self, slot: dialects.Slot, data: bytes | None) -> None:
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
                dialects.witch_endpoint(self, obj["endpoint"], obj.get("data"))
            elif "protocol_name" in obj:
                dialects.witch_endpoint(self, obj["protocol_name"], obj.get("data"))
            elif "request" in obj:
                dialects.witch_request(self, obj)
            else:
                dialects.labauto(self, "json", obj, line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error("bad_frame", "line is not valid UTF-8")
            return
        if self._gated:
            self._fatal("unauthorized", "say hello with a token first")
        else:
            dialects.labauto(self, "text", text, line)

    # -- dialect 1: robonet envelope --

    def _envelope(self, obj: dict[str, Any], mtype: Any, line: bytes) -> None:
        self.dialect = "robonet"
        mid = obj.get("id")
        if mid is not None and not env.valid_id(mid):
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
        try:
            hello = env.parse_hello(obj, roles=("robot", "client"), tokens=self.factory.tokens)
        except HubError as e:
            if e.code == "auth_failed":
                self.log.info("line {address}: hello refused (bad token)", address=self.address)
            elif e.code == "bad_hello" and obj.get("role") == "peer":
                e = HubError("bad_hello", "role must be robot or client (peers use the bot link)")
            self._fatal(e.code, e.message, mid)
            return
        role, name = hello.role, hello.name
        device_id = hello.device_id if hello.device_id is not None else self.device_id
        if self.device is not None and device_id != self.device_id:
            self.hub.disconnect(self, self.device_id)
        self.device_id = device_id
        self.role = role
        self.name = name
        self._deliveries.device_id = device_id
        self.helloed = True
        self._gated = False
        self.device = self.hub.connect(
            self, device_id, face=FACE, role=role, address=self.address, name=self.name, dialect="robonet/1"
        )
        node = self.hub.node
        welcome = env.welcome_obj(
            session=str(uuid.uuid4()),
            node_id=node.node_id,
            node_name=node.name,
            version=node.version,
            heartbeat_s=self.factory.heartbeat_s,
            max_frame=self.factory.max_line,
            device_id=device_id,
        )
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
        if self._acks.add(batch, (mid, ack), self._now):
            self._inflight += 1

    def _acks_committed(self, acks: list[tuple[int, bytes]], received: float) -> None:
        self._settled()
        if not self.closing:
            self.hub.stats.ack_delay.add(self.hub.now() - received)
            self._send(b"".join([ack for _, ack in acks]))

    def _acks_failed(self, failure: Failure, acks: list[tuple[int, bytes]], received: float) -> None:
        self._settled()
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
            self.hub.stats.error("unknown_endpoint")
            self._send(
                encode_line(env.response_error_obj(mid, "unknown_endpoint", f"Unknown endpoint: {endpoint}"))
            )
            return
        self._inflight += 1

        def ok(result: Any) -> None:
            self._settled()
            data, good = env.encode_response(mid, result, encode_line)
            if not good:
                self.hub.stats.error("internal")
            self._send(data)

        def failed(f: Failure) -> None:
            self._settled()
            code, message = env.failure_code(f.value)
            self._send(encode_line(env.response_error_obj(mid, code, message)))

        self.hub.request(endpoint, obj.get("data"), self.device_id).addCallbacks(ok, failed)

    def _command(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        try:
            target = env.command_target(obj)
        except HubError as e:  # a malformed target is an error, never a broadcast
            self._error(e.code, e.message, mid)
            return
        self._inflight += 1
        checksum = additive_sum(line) if mid is not None else 0

        def ok(_: Any) -> None:
            self._settled()
            if mid is not None:
                self._send(encode_ack(mid, checksum))

        def failed(f: Failure) -> None:
            self._settled()
            code, message = env.failure_code(f.value)
            self.log.debug("line {address}: command failed: {code}", address=self.address, code=code)
            self._send(encode_error(code, message, mid))

        self.hub.command(obj, self.device_id, target).addCallbacks(ok, failed)

    def _on_ack(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        self.hub.stats.count_in("ack")
        if not self._deliveries.on_ack(obj):
            self.log.debug("line {address}: ack for unknown id {id}", address=self.address, id=mid)

    def _on_error(self, obj: dict[str, Any], mid: int | None, line: bytes) -> None:
        """A device's error: with ``ref`` naming a command we sent, that delivery fails with it."""
        self.hub.stats.count_in("error")
        known = self._deliveries.on_error(obj)
        # info only when it refuses one of our commands: unsolicited error lines could flood the log
        emit = self.log.info if known else self.log.debug
        emit(
            "line {address}: device error {code}: {msg}",
            address=self.address,
            code=obj.get("code"),
            msg=obj.get("message"),
        )

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
        if command.type == env.LINE_TEXT_COMMAND:
            return self._deliver_text(command)
        cid = self._deliveries.next_id()
        body = dict(command.body)
        body["id"] = cid
        payload = _dumps(body, option=_OPT)
        d = self._deliveries.add(cid, additive_sum(payload))
        self.hub.stats.count_out(command.type, len(payload) + 1)
        self._send(payload + b"\n")
        return d

    def _deliver_text(self, command: Command) -> defer.Deferred[Any]:
        """A ``line`` command: write its ``text`` as one bare line (LabAuto has no acks).

        Done once written while the peer reads (the write buffer is not full); while it does not
        read, done when it drains again, or ``delivery_timeout`` after ``botlink.ack_timeout`` s.
        """
        text = dialects.line_text(command.body)
        data = (text + "\n").encode("utf-8")
        self.hub.stats.count_out(command.type, len(data))
        self._send(data)
        if self._flow is None or not self._flow.paused:
            return defer.succeed(None)
        d: defer.Deferred[Any] = defer.Deferred()
        timer = self.clock.callLater(self.factory.ack_timeout, self._text_timeout, d)
        self._text_waiting.append((d, timer))
        return d

    def _text_timeout(self, d: defer.Deferred[Any]) -> None:
        self._text_waiting = [(w, t) for w, t in self._text_waiting if w is not d]
        t = self.factory.ack_timeout
        d.errback(HubError("delivery_timeout", f"{self.device_id} did not read within {t:g} s"))

    def drained(self) -> None:
        """The peer reads again (flow resumed): text lines waiting for that are delivered."""
        waiting, self._text_waiting = self._text_waiting, []
        for d, timer in waiting:
            if timer.active():
                timer.cancel()
            d.callback(None)

    def close_link(self, code: str, message: str) -> None:
        """Tell the device why (error line) and close (e.g. code ``replaced``)."""
        if not self.closing:
            self._fatal(code, message)


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
        self.limiter = PerAddressLimiter(bot.max_per_ip)

    def iso(self, t: float) -> str:
        """:func:`robonet.model.iso_utc`, memoised for the last time asked (replies of one read)."""
        if t != self._iso_at:
            self._iso_at = t
            self._iso = iso_utc(t)
        return self._iso

    def buildProtocol(self, addr: IAddress | None) -> LineLinkProtocol:
        """A fresh :class:`LineLinkProtocol` for each connection."""
        return LineLinkProtocol(self)

    def admit(self, proto: LineLinkProtocol) -> bytes | None:
        """Count ``proto`` in, or return the one line to refuse it with (server full / per-IP cap)."""
        if len(self.connections) >= self.max_clients:
            self.hub.stats.error("server_full")
            self.log.info("line: refused {address}: server full", address=proto.address)
            return SERVER_FULL
        if not self.limiter.acquire(proto.ip):
            self.hub.stats.error("rate_limited")
            self.log.info("line: refused {address}: too many connections from it", address=proto.address)
            return encode_status_error(
                "too many connections from this address", iso_utc(self.hub.now()), "rate_limited"
            )
        self.connections.add(proto)
        return None

    def release(self, proto: LineLinkProtocol) -> None:
        """Count ``proto`` out (connection lost)."""
        self.connections.discard(proto)
        self.limiter.release(proto.ip)

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
