"""The WebSocket relay for robots and dashboards (spec/websocket.md), on Autobahn.

The staircase dialect's exact shapes and rules are pure functions in
:mod:`robonet.protocols.staircase`; the deadman is :class:`robonet.teleop.Deadman`. This module is
the thin Autobahn side: :func:`configure_factory` (limits, and Autobahn's timers on the injected
clock), :class:`RelayFactory` (options, the website group, the deadman, write batching) and
:class:`RelayProtocol` (one connection, robot or website).

A connection whose query string has ``device_id`` is a **robot**: a :class:`~robonet.model.Link` the
hub delivers commands through. Any other is a **website** (``website-<n>``): the factory's
:class:`WebsiteGroup` is one hub subscriber on behalf of all of them, so each fan-out event is
encoded and framed once for every website. Every connection writes through its own bounded
:class:`~robonet.fanout.OutboundQueue` driven by the transport's producer callbacks; what a
connection is owed within one reactor iteration goes out in one ``transport.write``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import robonet
from robonet.fanout import OutboundQueue
from robonet.model import Command, Event, HubError, Message, Priority
from robonet.protocols.envelope import (
    MAX_DEVICE_ID,
    command_target,
    encode_response,
    failure_code,
    response_error_obj,
    valid_device_id,
)
from robonet.protocols.staircase import (  # re-exported: the relay's public helpers
    BINARY_ERROR,
    INVALID_JSON,
    MOTION_COMMANDS,
    NO_ACK_TYPES,
    ROBOT,
    TELEMETRY_ACK,
    VIDEO_ACK,
    WEBSITE,
    ack_json,
    ack_message,
    error_json,
    origin_allowed,
    py_str,
    robot_name,
    robot_notice_json,
    robot_welcome_json,
    text_frame,
    token_role,
    website_welcome_json,
)
from robonet.protocols.wsoptions import (  # re-exported for web.py and the other WebSocket faces
    AUTO_PING_INTERVAL,
    AUTO_PING_TIMEOUT,
    CLOSE_HANDSHAKE_TIMEOUT,
    ClockTimer,
    EchoFactory,
    EchoProtocol,
    configure_factory,
    deflate_accept,
    use_clock,
)
from robonet.teleop import Deadman

# Names other faces imported before the split (kept so their branches merge unchanged).
_deflate_accept = deflate_accept
_use_clock = use_clock

if TYPE_CHECKING:
    from robonet.interfaces import FaceHub
    from robonet.registry import Device

__all__ = [
    "AUTO_PING_INTERVAL",
    "AUTO_PING_TIMEOUT",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "Deadman",
    "EchoFactory",
    "EchoProtocol",
    "MOTION_COMMANDS",
    "RelayFactory",
    "RelayProtocol",
    "WebsiteGroup",
    "ClockTimer",
    "configure_factory",
    "deflate_accept",
    "use_clock",
    "origin_allowed",
    "text_frame",
]

FACE = "web"

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
# Seconds a connection closed for being slow gets to read what it is owed plus our close frame
# before the TCP connection is aborted (it may simply be a frozen tab that wakes up).
SLOW_CLOSE_GRACE = 30.0
# The refusals of staircase.token_role, as HTTP status and reason.
_TOKEN_REFUSALS = {
    "unknown": (401, "Unauthorized"),
    "needs_device_id": (ConnectionDeny.BAD_REQUEST, "a robot token needs device_id"),
    "not_robot": (ConnectionDeny.FORBIDDEN, "token does not allow a robot connection"),
}


# --- the website group: one hub subscriber for all websites ----------------------------------------


class WebsiteGroup:
    """Every open website connection, subscribed to the hub as one :class:`~robonet.model.Subscriber`.

    :meth:`offer` frames an event once and puts the same bytes in every website's queue (CONTROL,
    LATEST conflated by ``event.key``, BULK). A robot's device_up/device_down also produces the
    original ``robot_status`` connected/disconnected notice, whatever face the robot is on.
    """

    def __init__(self, hub: FaceHub) -> None:
        self.hub = hub
        self.members: dict[str, RelayProtocol] = {}

    def __len__(self) -> int:
        return len(self.members)

    def offer(self, event: Event) -> None:
        """Take one fan-out event (never blocks; queues are bounded)."""
        members = self.members
        if not members:
            return
        if event.kind == "status" and event.body.get("role") == ROBOT:
            if event.type == "device_up":
                self.broadcast(robot_notice_json(event.device_id, "connected"))
            elif event.type == "device_down":
                self.broadcast(robot_notice_json(event.device_id, "disconnected"))
        frame = text_frame(event.dashboard_json())
        priority = event.priority
        key = event.key if priority is Priority.LATEST else None
        for member in members.values():
            q = member.queue
            if q is None:
                continue
            if q.paused or q.closed:
                q.put(frame, priority, key)  # held, conflated or dropped by the queue
            else:
                member.owe(frame)  # hot path: what q.put() does for a queue that is not paused

    def broadcast(self, payload: bytes, priority: Priority = Priority.CONTROL) -> None:
        """Send ``payload`` (one JSON document) to every website."""
        frame = text_frame(payload)
        for member in self.members.values():
            q = member.queue
            if q is not None:
                q.put(frame, priority)


# --- factory ---------------------------------------------------------------------------------------


class RelayFactory(WebSocketServerFactory):
    """Builds :class:`RelayProtocol` connections for ``/ws/telemetry/`` (mount with WebSocketResource).

    ``hub`` is the shared :class:`~robonet.hub.Hub` (its ``config`` gives the ``web``, ``auth``,
    ``teleop`` and ``hub.commands`` settings); ``reactor`` provides time (IReactorTime) for queues,
    batching and the deadman. Subscribes its :class:`WebsiteGroup` to the hub at once.
    """

    _log = Logger()

    def __init__(self, hub: FaceHub, reactor: IReactorTime) -> None:
        super().__init__(reactor=reactor, server=f"robonet/{robonet.__version__}")
        self.hub = hub
        self.clock = reactor
        self.config = hub.config
        self.commands = frozenset(self.config.hub.commands)
        self.websites = WebsiteGroup(hub)
        self.deadman = Deadman(hub, reactor, self.config.teleop.deadman_ms)
        self._website_seq = 0
        self._dirty: list[RelayProtocol] = []
        self._flush_call: IDelayedCall | None = None
        configure_factory(self, self.config, reactor)
        hub.subscribe(self.websites)

    def next_website_id(self) -> str:
        """A fresh ``website-<n>`` id (n from 1)."""
        self._website_seq += 1
        return f"website-{self._website_seq}"

    def mark_dirty(self, proto: RelayProtocol) -> None:
        """``proto`` has frames pending: write them at the start of the next reactor iteration."""
        self._dirty.append(proto)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write every connection's pending frames, one ``transport.write`` each."""
        self._flush_call = None
        dirty, self._dirty = self._dirty, []
        for proto in dirty:
            proto.write_pending()

    def shutdown(self) -> None:
        """Unsubscribe from the hub and cancel timers (the web service is stopping)."""
        self.hub.unsubscribe(self.websites)
        self.deadman.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None


# --- protocol ----------------------------------------------------------------------------------------


@implementer(IPushProducer)
class RelayProtocol(WebSocketServerProtocol):
    """One WebSocket connection: a robot (a hub Link) or a website (a member of the WebsiteGroup).

    It is also the transport's streaming producer (registered in place of twisted.web's HTTP
    channel): pausing pauses its :class:`~robonet.fanout.OutboundQueue` and stops reading from the
    peer, so a peer that does not read cannot make the server buffer without bound.
    """

    _log = Logger()
    factory: RelayFactory
    face = FACE

    role = ""
    device_id = ""
    name = ""
    queue: OutboundQueue | None = None
    device: Device | None = None
    _pending: list[bytes] | None = None
    _gone = False
    _counted = False

    # -- connection setup --

    def connectionMade(self) -> None:
        """Take over as the transport's producer (twisted.web left its HTTP channel registered)."""
        super().connectionMade()
        f = self.factory
        self.queue = OutboundQueue(
            self.owe,
            clock=f.clock,
            max_bytes=f.config.web.max_queue_bytes,
            slow_timeout=f.config.web.slow_timeout,
            on_slow=self._on_slow,
            stats=f.hub.stats,
        )
        transport: Any = self.transport
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(self, True)

    def onConnect(self, request: ConnectionRequest) -> None:
        """Decide the role; refuse a foreign Origin (403) or a missing/unknown token (401)."""
        f = self.factory
        headers = request.headers
        origin = headers.get("origin")
        allowed = f.config.web.allowed_origins
        if origin is not None and not origin_allowed(origin, headers.get("host", ""), allowed):
            f.hub.stats.error("forbidden_origin")
            self._log.info("refused WebSocket from {peer}: origin {origin}", peer=request.peer, origin=origin)
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "Origin not allowed")
        params = request.params
        device_id = (params.get("device_id") or [""])[0]
        role = ROBOT if device_id else WEBSITE
        auth = f.config.auth
        if auth.mode == "token":
            refusal = token_role(auth.tokens, (params.get("token") or [""])[0], device_id)
            if refusal:
                f.hub.stats.error("unauthorized")
                self._log.info(
                    "refused WebSocket from {peer}: token: {refusal}", peer=request.peer, refusal=refusal
                )
                raise ConnectionDeny(*_TOKEN_REFUSALS[refusal])
        if role == ROBOT and not valid_device_id(device_id):
            f.hub.stats.error("bad_hello")
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "invalid device_id")
        self.role = role
        self.device_id = device_id
        self.name = (params.get("name") or [""])[0][:MAX_DEVICE_ID]
        return None

    def onOpen(self) -> None:
        """Greet; robots join the registry, websites the group (with the current robots and a snapshot)."""
        f = self.factory
        hub = f.hub
        hub.stats.connection(FACE, 1)
        self._counted = True
        if self.role == ROBOT:
            self.send_json(robot_welcome_json(self.device_id))
            self.device = hub.connect(
                self, self.device_id, face=FACE, role=ROBOT, address=self._address(), name=self.name
            )
            return
        self.device_id = f.next_website_id()
        self.send_json(website_welcome_json(self.device_id))
        devices = hub.registry.devices()
        for dev in devices:
            if dev.online and dev.role == ROBOT:
                self.send_json(robot_notice_json(dev.device_id, "currently"))
        self.send_json(orjson.dumps({"type": "snapshot", "devices": [d.as_dict() for d in devices]}))
        f.websites.members[self.device_id] = self
        self._log.info(
            "website {website_id} connected from {peer}", website_id=self.device_id, peer=self.peer
        )

    def _address(self) -> str:
        transport: Any = self.transport
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        return f"{host}:{port}" if host is not None else str(peer)

    # -- incoming --

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Dispatch one complete message by role; bad input gets an error on this connection only."""
        if self._gone or not self.role:
            return
        hub = self.factory.hub
        hub.stats.bytes_received(len(payload))
        if isBinary:
            hub.stats.error("bad_frame")
            self.send_json(BINARY_ERROR)
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            hub.stats.error("bad_json")
            self.send_json(INVALID_JSON)
            return
        if not isinstance(obj, dict):
            hub.stats.error("not_object")
            self.send_json(INVALID_JSON)
            return
        mtype = obj.get("type")
        if mtype == "request":
            self._request(obj)
        elif self.role == ROBOT:
            self._robot_message(obj, mtype, payload)
        else:
            self._website_command(obj, mtype)

    def _robot_message(self, obj: dict[str, Any], mtype: Any, payload: bytes) -> None:
        hub = self.factory.hub
        device = self.device
        if device is None or device.link is not self:
            return  # replaced: the newer connection speaks for this id
        if not isinstance(mtype, str) or not mtype:
            hub.stats.error("missing_type")
            self.send_json(error_json("missing_type", mtype, "message has no type"))
            return
        name = robot_name(obj)
        if name is not None and name != device.name:
            hub.rename(device, name)  # relayed as telemetry_update's device_name (staircase server)
        try:
            batch = hub.ingest(device, Message(mtype, obj, self.device_id, hub.now(), None, payload))
        except HubError as e:
            self.send_json(error_json(e.code, mtype, e.message))
            return
        if mtype in NO_ACK_TYPES:
            return
        if mtype == "telemetry":
            ack = TELEMETRY_ACK
        elif mtype == "video_frame":
            ack = VIDEO_ACK
        else:
            ack = ack_json(mtype, f"{mtype} received")
        if batch is None:
            self.send_json(ack)
        else:
            # Ack only once the row is committed: a kill -9 never loses an acknowledged row.
            batch.when_committed(self._committed, self._store_failed, ack, mtype)

    def _committed(self, ack: bytes, mtype: str) -> None:
        self.send_json(ack)

    def _store_failed(self, failure: Failure, ack: bytes, mtype: str) -> None:
        self.factory.hub.stats.error("internal")
        self._log.failure("store commit failed for {device_id}", failure, device_id=self.device_id)
        self.send_json(error_json("internal", mtype, "could not save the message"))

    def _website_command(self, obj: dict[str, Any], mtype: Any) -> None:
        f = self.factory
        hub = f.hub
        if not isinstance(mtype, str) or mtype not in f.commands:
            hub.stats.error("unknown_command")
            self.send_json(error_json("unknown_command", mtype))
            return
        if mtype == "set" and obj.get("name") not in ("speed", "brightness"):
            hub.stats.error("unknown_command")
            self.send_json(error_json("unknown_command", mtype, f"unknown setting {py_str(obj.get('name'))}"))
            return
        raw_target = obj.get("device_id")
        try:
            # The envelope's rule; "" means "every robot" here, as the original dashboard sends it.
            target = None if raw_target == "" else command_target(obj)
        except HubError as e:
            hub.stats.error("bad_request")  # this face's code for a malformed dashboard message
            text = e.message if isinstance(raw_target, str) else "device_id must be a string"
            self.send_json(error_json("bad_request", mtype, text))
            return
        # The original acked at once: the ack means "received"; later failures follow as errors.
        self.send_json(ack_json(mtype, ack_message(mtype, obj)))
        if mtype in MOTION_COMMANDS:
            robots = [target] if target else self._online_robots()
            f.deadman.moved(self.device_id, mtype, obj, robots)
        d = hub.command(obj, origin=self.device_id, target=target)
        d.addErrback(self._command_failed, mtype)

    def _online_robots(self) -> list[str]:
        return [d.device_id for d in self.factory.hub.registry.devices() if d.online and d.role == ROBOT]

    def _command_failed(self, failure: Failure, mtype: str) -> None:
        if not isinstance(failure.value, HubError):
            self._log.failure("command {mtype} failed", failure, mtype=mtype)
        code, message = failure_code(failure.value or Exception())
        self.send_json(error_json(code, mtype, message))

    def _request(self, obj: dict[str, Any]) -> None:
        """``{"type":"request","id":N,"endpoint":E,"data":D}`` -> ``{"type":"response",...}`` (bot link's)."""
        req_id = obj.get("id")
        endpoint = obj.get("endpoint")
        if not isinstance(endpoint, str):
            self.send_json(
                orjson.dumps(response_error_obj(req_id, "bad_request", "request needs an endpoint"))
            )
            return

        def ok(result: Any) -> None:
            frame, encodable = encode_response(req_id, result, orjson.dumps)
            if not encodable:
                # As the bot and line links: an endpoint result JSON cannot carry is an error answer.
                self.factory.hub.stats.error("internal")
                self._log.error("endpoint {endpoint} returned a value that is not JSON", endpoint=endpoint)
            self.send_json(frame)

        def failed(failure: Failure) -> None:
            self.send_json(
                orjson.dumps(response_error_obj(req_id, *failure_code(failure.value or Exception())))
            )

        self.factory.hub.request(endpoint, obj.get("data"), self.device_id).addCallbacks(ok, failed)

    # -- Link (robots) --

    def deliver(self, command: Command) -> None:
        """Send a command to this robot: ``{"type":T, ...fields, "timestamp":ISO}`` (no device ack)."""
        body = command.body
        if self._gone:
            raise HubError("device_offline", f"device {self.device_id} is not connected")
        if next(iter(body), None) != "type":
            body = {"type": command.type, **body}
        self.send_json(orjson.dumps(body))
        return None

    def close_link(self, code: str, message: str) -> None:
        """Close this robot connection telling it why (e.g. ``replaced`` by a newer connection)."""
        self.send_json(orjson.dumps({"type": "error", "code": code, "message": message}))
        self.write_pending()
        self.close(CLOSE_NORMAL, f"{code}: {message}")

    # -- outgoing --

    def send_json(self, payload: bytes, priority: Priority = Priority.CONTROL) -> None:
        """Queue one JSON document (already encoded) for this connection."""
        q = self.queue
        if q is not None:
            q.put(text_frame(payload), priority)

    def owe(self, frame: bytes) -> None:
        """The queue's write (and the website group's): collect frames until the factory's flush
        at the next iteration."""
        if self._gone:
            return
        pending = self._pending
        if pending is None:
            self._pending = [frame]
            self.factory.mark_dirty(self)
        else:
            pending.append(frame)

    def write_pending(self) -> None:
        """Write everything owed in one ``transport.write``."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        if self._gone or self.state != self.STATE_OPEN:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self.factory.hub.stats.bytes_sent(len(data))
        transport: Any = self.transport
        transport.write(data)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with any RFC 6455 code (Autobahn's sendClose refuses 1008)."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def _on_slow(self) -> None:
        """The queue gave up: this peer stayed over its budget for ``web.slow_timeout``; close 1008."""
        self._pending = None
        self._log.info(
            "closing slow {role} {device_id} ({peer})",
            role=self.role,
            device_id=self.device_id,
            peer=self.peer,
        )
        self.closeHandshakeTimeout = SLOW_CLOSE_GRACE
        self.close(CLOSE_POLICY, "too slow: send queue over limit")

    # -- producer (the transport calls these) --

    def pauseProducing(self) -> None:
        """The peer is not reading: hold/conflate output and stop reading its input."""
        if self.queue is not None:
            self.queue.pauseProducing()
        transport: Any = self.transport
        transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The transport drained: read again and write what is held."""
        transport: Any = self.transport
        transport.resumeProducing()
        if self.queue is not None:
            self.queue.resumeProducing()

    def stopProducing(self) -> None:
        """The connection is going away."""
        if self.queue is not None:
            self.queue.stopProducing()

    # -- teardown --

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Leave the registry or the group; the deadman stops what this website was driving."""
        if self._gone:
            return
        self._gone = True
        self._pending = None
        if self.queue is not None:
            self.queue.close()
        if not self._counted:
            return  # refused or never opened
        f = self.factory
        f.hub.stats.connection(FACE, -1)
        if self.role == ROBOT:
            if self.device is not None:
                f.hub.disconnect(self, self.device_id)
            return
        if f.websites.members.get(self.device_id) is self:
            del f.websites.members[self.device_id]
            self._log.info("website {website_id} disconnected", website_id=self.device_id)
            f.deadman.website_gone(self.device_id)


RelayFactory.protocol = RelayProtocol
