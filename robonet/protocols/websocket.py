"""The WebSocket relay for robots and dashboards (spec/websocket.md), on Autobahn.

Two parts, as everywhere in robonet:

- pure helpers at the top: the exact JSON shapes of the original staircase-robot server (greetings,
  notices, acks with Python-printed values, errors) and the server-to-client text frame encoder;
- thin Autobahn classes below: :class:`RelayFactory` (options, limits, the website group, the
  deadman) and :class:`RelayProtocol` (one connection, robot or website).

A connection whose query string has ``device_id`` is a **robot**: a :class:`~robonet.model.Link` the
hub delivers commands through. Any other is a **website** (``website-<n>``): the factory's
:class:`WebsiteGroup` is one hub subscriber on behalf of all of them, so each fan-out event is
encoded and framed once for every website. Every connection writes through its own bounded
:class:`~robonet.fanout.OutboundQueue` driven by the transport's producer callbacks; what a
connection is owed within one reactor iteration goes out in one ``transport.write``.
"""

from __future__ import annotations

import fnmatch
import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import robonet
from robonet.fanout import OutboundQueue
from robonet.model import Command, Event, HubError, Message, Priority

if TYPE_CHECKING:
    from robonet.config import Config
    from robonet.hub import Hub
    from robonet.registry import Device

FACE = "web"
ROBOT = "robot"
WEBSITE = "website"

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
# Seconds a connection closed for being slow gets to read what it is owed plus our close frame
# before the TCP connection is aborted (it may simply be a frozen tab that wakes up).
SLOW_CLOSE_GRACE = 30.0
# Autobahn's WebSocket-level keepalive: ping an idle peer, drop it when no pong comes back.
AUTO_PING_INTERVAL = 25.0
AUTO_PING_TIMEOUT = 20.0
CLOSE_HANDSHAKE_TIMEOUT = 3.0
MAX_DEVICE_ID = 128
MOTION_COMMANDS = ("robot_move", "camera_move")


# --- pure part: the original server's exact shapes ---------------------------------------------


def py_str(value: Any) -> str:
    """``value`` as the original Python server printed it in its messages (``str()``).

    The value is what the JSON decoder produced: ``0.5`` -> ``"0.5"``, ``60`` -> ``"60"``,
    ``None`` -> ``"None"``, ``True`` -> ``"True"``, strings unchanged.
    """
    return value if isinstance(value, str) else str(value)


def ack_message(cmd_type: str, body: dict[str, Any]) -> str:
    """The ``message`` of the ack a website gets for command ``cmd_type`` (spec "Ack messages").

    ``set`` {name: speed|brightness} reads as set_speed/set_brightness; commands the original did
    not know read ``Command received: <type>``.
    """
    if cmd_type == "set":
        name = body.get("name")
        if name == "speed":
            cmd_type = "set_speed"
        elif name == "brightness":
            cmd_type = "set_brightness"
    if cmd_type == "robot_move":
        return f"Command received: Robot move x={py_str(body.get('x'))}, y={py_str(body.get('y'))}"
    if cmd_type == "camera_move":
        return f"Command received: Camera move x={py_str(body.get('x'))}, y={py_str(body.get('y'))}"
    if cmd_type == "set_speed":
        return f"Command received: Speed set to {py_str(body.get('value'))}%"
    if cmd_type == "set_brightness":
        return f"Command received: Brightness set to {py_str(body.get('value'))}%"
    return f"Command received: {cmd_type}"


def ack_json(original_type: str, message: str) -> bytes:
    """``{"type":"ack","original_type":T,"status":"received","message":M}``."""
    return orjson.dumps(
        {"type": "ack", "original_type": original_type, "status": "received", "message": message}
    )


def error_json(code: str, original_type: Any = None, message: str | None = None) -> bytes:
    """``{"type":"error","code":C,"original_type":T[,"message":M]}`` (robonet's error shape)."""
    obj: dict[str, Any] = {"type": "error", "code": code, "original_type": original_type}
    if message is not None:
        obj["message"] = message
    return orjson.dumps(obj)


def robot_welcome_json(device_id: str) -> bytes:
    """What a robot gets when it connects."""
    return orjson.dumps(
        {
            "status": "connected",
            "device_type": "robot",
            "device_id": device_id,
            "message": f"Robot {device_id} connected to server",
        }
    )


def website_welcome_json(website_id: str) -> bytes:
    """What a website gets when it connects (``website_id`` is robonet's additive field)."""
    return orjson.dumps(
        {
            "status": "connected",
            "device_type": "website",
            "message": "Dashboard connected to server",
            "website_id": website_id,
        }
    )


_NOTICE_TEXT = {
    "connected": ("connected", "Robot {} has connected"),
    "disconnected": ("disconnected", "Robot {} has disconnected"),
    "currently": ("connected", "Robot {} is currently connected"),
}


def robot_notice_json(device_id: str, kind: str) -> bytes:
    """The original ``robot_status`` notice for websites; ``kind`` connected|disconnected|currently."""
    status, text = _NOTICE_TEXT[kind]
    return orjson.dumps(
        {
            "type": "robot_status",
            "status": status,
            "device_type": "robot",
            "device_id": device_id,
            "message": text.format(device_id),
        }
    )


INVALID_JSON = b'{"error":"Invalid JSON format"}'
TELEMETRY_ACK = ack_json("telemetry", "Telemetry data received and saved")
VIDEO_ACK = ack_json("video_frame", "Video frame received")
BINARY_ERROR = orjson.dumps(
    {"type": "error", "code": "bad_frame", "message": "binary messages are not supported; send JSON text"}
)
# Robot data types that get no ack (the original only forwarded them).
NO_ACK_TYPES = frozenset(("status",))

_HDR16 = struct.Struct("!BBH").pack
_HDR64 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented server-to-client text frame (RFC 6455 section 5.2) for ``payload``.

    Used instead of Autobahn's per-connection ``sendMessage`` so a fan-out message is framed once
    for every website and several frames can go out in one ``transport.write``. Such frames are
    valid on permessage-deflate connections too (RSV1 clear = not compressed).
    """
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _HDR16(0x81, 126, n) + payload
    return _HDR64(0x81, 127, n) + payload


def origin_allowed(origin: str, host: str, allowed: Iterable[str]) -> bool:
    """Whether a browser's ``Origin`` header may open a dashboard connection.

    ``allowed`` is ``web.allowed_origins``: entries are origins such as ``http://hub.local:8000``,
    shell-style patterns (``https://*.example.org``) or ``*``; ``null`` must be listed to allow the
    ``null`` origin. Empty means the page's own host: the origin's host and port must equal the
    request's ``Host`` header (default ports 80/443 implied by the scheme).
    """
    origin = origin.strip().lower()
    patterns = [a.strip().lower().rstrip("/") for a in allowed]
    if patterns:
        return any(p == "*" or p == origin or fnmatch.fnmatchcase(origin, p) for p in patterns)
    if origin == "null":
        return False
    try:
        parts = urlsplit(origin)
        o_host, o_port = parts.hostname, parts.port
        scheme = parts.scheme
    except ValueError:
        return False
    if scheme not in ("http", "https") or not o_host:
        return False
    default = 443 if scheme == "https" else 80
    try:
        h = urlsplit("//" + host.strip().lower())
        h_host, h_port = h.hostname, h.port
    except ValueError:
        return False
    return o_host == h_host and (o_port or default) == (h_port or default)


def valid_device_id(device_id: str) -> bool:
    """A robot id from the query string: 1..128 printable characters, no spaces."""
    return 0 < len(device_id) <= MAX_DEVICE_ID and device_id.isprintable() and " " not in device_id


def is_stop(body: dict[str, Any]) -> bool:
    """A motion command that stops (x and y both zero)."""
    x, y = body.get("x"), body.get("y")
    return x == 0 and y == 0 and not isinstance(x, bool) and not isinstance(y, bool)


# --- deadman -------------------------------------------------------------------------------------


class Deadman:
    """Stops robots whose driver went away (spec "Robonet guarantees beyond the original").

    Remembers, per robot and motion command type (robot_move, camera_move), which website sent the
    last one. :meth:`website_gone` sends ``{x:0, y:0}`` of each type that website was the last to
    send. With ``deadman_ms`` > 0, a moving robot (last command not a stop) that gets no motion
    command of that type for ``deadman_ms`` is stopped too. Stops go through ``hub.command`` with
    origin ``deadman``; failures (robot already gone) are ignored.
    """

    _log = Logger()

    def __init__(self, hub: Hub, clock: IReactorTime, deadman_ms: int) -> None:
        self.hub = hub
        self.clock = clock
        self.timeout = deadman_ms / 1000.0
        self._drivers: dict[tuple[str, str], str] = {}
        self._timers: dict[tuple[str, str], IDelayedCall] = {}

    def moved(self, website_id: str, cmd_type: str, body: dict[str, Any], robots: Iterable[str]) -> None:
        """``website_id`` sent motion command ``cmd_type`` (``body``) to ``robots``."""
        stop = is_stop(body)
        for robot in robots:
            key = (robot, cmd_type)
            self._drivers[key] = website_id
            if self.timeout > 0:
                old = self._timers.pop(key, None)
                if old is not None and old.active():
                    old.cancel()
                if not stop:
                    self._timers[key] = self.clock.callLater(self.timeout, self._expired, key)

    def website_gone(self, website_id: str) -> list[tuple[str, str]]:
        """Stop everything ``website_id`` was the last to move; returns the (robot, type) stopped."""
        stopped = [key for key, driver in self._drivers.items() if driver == website_id]
        for key in stopped:
            del self._drivers[key]
            timer = self._timers.pop(key, None)
            if timer is not None and timer.active():
                timer.cancel()
            self._stop(key, f"website {website_id} disconnected")
        return stopped

    def _expired(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        self._stop(key, f"no {key[1]} for {self.timeout * 1000:g} ms")

    def _stop(self, key: tuple[str, str], why: str) -> None:
        robot, cmd_type = key
        self._log.info(
            "deadman: stopping {robot} ({cmd_type}): {why}",
            robot=robot,
            cmd_type=cmd_type,
            why=why,
        )
        d = self.hub.command({"type": cmd_type, "x": 0, "y": 0}, origin="deadman", target=robot)
        d.addErrback(lambda f: None)

    def stop(self) -> None:
        """Cancel every timer (the service is stopping)."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()


# --- the website group: one hub subscriber for all websites ----------------------------------------


class WebsiteGroup:
    """Every open website connection, subscribed to the hub as one :class:`~robonet.model.Subscriber`.

    :meth:`offer` frames an event once and puts the same bytes in every website's queue (CONTROL,
    LATEST conflated by ``event.key``, BULK). A robot's device_up/device_down also produces the
    original ``robot_status`` connected/disconnected notice, whatever face the robot is on.
    """

    def __init__(self, hub: Hub) -> None:
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
                continue
            # Hot path, same as q.put() -> member._owe() for a queue that is not paused.
            pending = member._pending
            if pending is None:
                member._pending = [frame]
                member.factory.mark_dirty(member)
            else:
                pending.append(frame)

    def broadcast(self, payload: bytes, priority: Priority = Priority.CONTROL) -> None:
        """Send ``payload`` (one JSON document) to every website."""
        frame = text_frame(payload)
        for member in self.members.values():
            q = member.queue
            if q is not None:
                q.put(frame, priority)


# --- factory ---------------------------------------------------------------------------------------


def _deflate_accept(max_message: int) -> Callable[[list[Any]], PerMessageDeflateOfferAccept | None]:
    """Accept a client's permessage-deflate offer only with an inflation cap of ``max_message``."""

    def accept(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(offer, max_message_size=max_message)
        return None

    return accept


def _use_clock(factory: WebSocketServerFactory, clock: IReactorTime) -> None:
    """Run Autobahn's handshake/ping/close timers on the injected clock instead of the global reactor."""
    try:
        from txaio._common import _BatchedTimer
    except ImportError:  # pragma: no cover - txaio internals moved; keep Autobahn's own timer
        return
    factory._batched_timer = _BatchedTimer(
        200.0, 1000, seconds_provider=clock.seconds, delayed_call_creator=clock.callLater
    )


def configure_factory(factory: WebSocketServerFactory, config: Config, clock: IReactorTime) -> None:
    """Apply robonet's WebSocket limits to ``factory`` (HARDENING.md, web rows).

    Frame and message payloads are capped at ``web.max_message`` (bigger -> close 1009, decided
    from the frame header or while inflating); permessage-deflate is accepted only with that same
    cap on the inflated size; UTF-8 is validated (invalid -> close 1007); failing connections get
    a close frame rather than a bare TCP drop; the opening handshake must finish within
    ``web.header_timeout``; idle peers are pinged. The echo resource uses the same options.
    """
    web = config.web
    factory.setProtocolOptions(
        maxFramePayloadSize=web.max_message,
        maxMessagePayloadSize=web.max_message,
        perMessageCompressionAccept=_deflate_accept(web.max_message),
        utf8validateIncoming=True,
        failByDrop=False,
        openHandshakeTimeout=web.header_timeout,
        closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
        autoPingInterval=AUTO_PING_INTERVAL,
        autoPingTimeout=AUTO_PING_TIMEOUT,
        autoFragmentSize=0,
        webStatus=False,
    )
    _use_clock(factory, clock)


class RelayFactory(WebSocketServerFactory):
    """Builds :class:`RelayProtocol` connections for ``/ws/telemetry/`` (mount with WebSocketResource).

    ``hub`` is the shared :class:`~robonet.hub.Hub` (its ``config`` gives the ``web``, ``auth``,
    ``teleop`` and ``hub.commands`` settings); ``reactor`` provides time (IReactorTime) for queues,
    batching and the deadman. Subscribes its :class:`WebsiteGroup` to the hub at once.
    """

    _log = Logger()

    def __init__(self, hub: Hub, reactor: IReactorTime) -> None:
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
            self._owe,
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
            token = (params.get("token") or [""])[0]
            granted = auth.tokens.get(token) if token else None
            if granted is None:
                f.hub.stats.error("unauthorized")
                self._log.info("refused WebSocket from {peer}: bad or missing token", peer=request.peer)
                raise ConnectionDeny(401, "Unauthorized")
            if granted == ROBOT and not device_id:
                f.hub.stats.error("unauthorized")
                raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "a robot token needs device_id")
            if granted != ROBOT and device_id:
                f.hub.stats.error("unauthorized")
                raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "token does not allow a robot connection")
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
        hub.stats.bytes_in += len(payload)
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
        target = obj.get("device_id")
        if target is not None and not isinstance(target, str):
            hub.stats.error("bad_request")
            self.send_json(error_json("bad_request", mtype, "device_id must be a string"))
            return
        # The original acked at once: the ack means "received"; later failures follow as errors.
        self.send_json(ack_json(mtype, ack_message(mtype, obj)))
        if mtype in MOTION_COMMANDS:
            robots = [target] if target else self._online_robots()
            f.deadman.moved(self.device_id, mtype, obj, robots)
        d = hub.command(obj, origin=self.device_id, target=target or None)
        d.addErrback(self._command_failed, mtype)

    def _online_robots(self) -> list[str]:
        return [d.device_id for d in self.factory.hub.registry.devices() if d.online and d.role == ROBOT]

    def _command_failed(self, failure: Failure, mtype: str) -> None:
        err = failure.value
        if isinstance(err, HubError):
            self.send_json(error_json(err.code, mtype, err.message))
        else:
            self._log.failure("command {mtype} failed", failure, mtype=mtype)
            self.send_json(error_json("internal", mtype, "command failed"))

    def _request(self, obj: dict[str, Any]) -> None:
        """``{"type":"request","id":N,"endpoint":E,"data":D}`` -> ``{"type":"response",...}`` (bot link's)."""
        req_id = obj.get("id")
        endpoint = obj.get("endpoint")
        if not isinstance(endpoint, str):
            self.send_json(
                orjson.dumps(
                    {
                        "type": "response",
                        "id": req_id,
                        "status": "error",
                        "code": "bad_request",
                        "message": "request needs an endpoint",
                    }
                )
            )
            return

        def ok(result: Any) -> None:
            self.send_json(
                orjson.dumps({"type": "response", "id": req_id, "status": "success", "data": result})
            )

        def failed(failure: Failure) -> None:
            err = failure.value
            code = err.code if isinstance(err, HubError) else "internal"
            message = err.message if isinstance(err, HubError) else "request failed"
            self.send_json(
                orjson.dumps(
                    {"type": "response", "id": req_id, "status": "error", "code": code, "message": message}
                )
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

    def _owe(self, frame: bytes) -> None:
        """The queue's write: collect frames until the factory's flush at the next iteration."""
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
        self.factory.hub.stats.bytes_out += len(data)
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


class EchoProtocol(WebSocketServerProtocol):
    """``/ws/echo``: echoes every message, for running the Autobahn|Testsuite against real options."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Send the message back unchanged."""
        self.sendMessage(payload, isBinary)


class EchoFactory(WebSocketServerFactory):
    """The echo endpoint's factory, configured by :func:`configure_factory` exactly like the relay."""

    protocol = EchoProtocol

    def __init__(self, config: Config, reactor: IReactorTime) -> None:
        super().__init__(reactor=reactor, server=f"robonet/{robonet.__version__}")
        configure_factory(self, config, reactor)


RelayFactory.protocol = RelayProtocol
