"""The Foxglove WebSocket face (docs/foxglove.rst): ``foxglove.websocket.v1`` served with Autobahn.

- :class:`ChannelManager` is one hub :class:`~robonet.model.Subscriber` for every Foxglove client.
  It opens one channel per (device, message type) as data arrives (topic ``/<device_id>/<type>``,
  JSON encoding, JSON Schema from :mod:`robonet.schemas`), plus ``/<device_id>/sensor_data/points``
  (``foxglove.PointCloud``) for ultrasonic scans, advertises each new channel to every client and
  unadvertises a device's channels when it goes down. A message is JSON-encoded once and framed
  per subscribed client (the subscription id differs per client).
- :class:`FoxgloveProtocol` is one client: serverInfo + advertise on open, subscribe/unsubscribe,
  client advertise/unadvertise and binary clientMessageData (commands through ``hub.command``,
  with the web face's allowlist and deadman). Bad input gets a ``status`` of level error on that
  connection and is counted. Output goes through a bounded
  :class:`~robonet.fanout.OutboundQueue` (latest-value types conflated per channel) driven by
  the transport's producer callbacks; a client stalled for ``foxglove.slow_timeout`` is closed 1008.
- :class:`FoxgloveFactory` applies ``[foxglove]``'s limits to Autobahn, owns the manager, the
  deadman, client ids and write batching; :func:`foxglove_services` wires it into the daemon.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.application import strports
from twisted.application.service import IService, Service
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import robonet
from robonet import schemas
from robonet.config import Config, with_backlog
from robonet.fanout import OutboundQueue
from robonet.hub import Hub
from robonet.model import Event, HubError, Priority
from robonet.protocols import foxglove as fg
from robonet.protocols.websocket import MOTION_COMMANDS, Deadman, _deflate_accept, _use_clock

FACE = "foxglove"
ROBOT = "robot"
POINTS = "sensor_data/points"
CMD_VEL = "cmd_vel"
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
SLOW_CLOSE_GRACE = 30.0
AUTO_PING_INTERVAL = 25.0
AUTO_PING_TIMEOUT = 20.0
CLOSE_HANDSHAKE_TIMEOUT = 3.0


@attrs.define(slots=True, eq=False)
class ServerChannel:
    """One advertised channel: the wire :class:`~robonet.protocols.foxglove.Channel`, the
    (device_id, type) it carries (type ``sensor_data/points`` for the point cloud), and the
    subscribed clients with their subscription ids."""

    channel: fg.Channel
    device_id: str
    mtype: str
    subscribers: dict[FoxgloveProtocol, int] = attrs.Factory(dict)


@attrs.frozen
class ClientRoute:
    """Where a client channel's messages go: command ``cmd_type`` to ``target`` (None = every
    robot); ``twist`` when payloads are geometry_msgs/Twist JSON mapped to robot_move."""

    topic: str
    cmd_type: str
    target: str | None
    twist: bool


class ChannelManager:
    """Server channels and open clients; the hub subscriber of the Foxglove face.

    ``hub`` gives registry and stats; ``max_channels`` bounds the channel table (data for a new
    channel beyond it is dropped and counted as ``foxglove_channels_full``).
    """

    _log = Logger()

    def __init__(self, hub: Hub, max_channels: int) -> None:
        self.hub = hub
        self.max_channels = max_channels
        self.channels: dict[tuple[str, str], ServerChannel] = {}
        self.by_id: dict[int, ServerChannel] = {}
        self.clients: dict[str, FoxgloveProtocol] = {}
        self._next_id = 1

    # -- hub subscriber --

    def offer(self, event: Event) -> None:
        """Take one fan-out event: open/advertise channels, send to subscribers, unadvertise on down."""
        if event.kind == "status":
            if event.type == "device_down":
                self.device_gone(event.device_id)
            return
        ch = self.channels.get(event.key)
        if ch is None:
            ch = self._open_channel(event.device_id, event.type, schemas.schema_for(event.type))
            if ch is None:
                return
        priority = event.priority
        if ch.subscribers:
            payload = orjson.dumps(event.body)
            self._send(ch, payload, fg.to_ns(event.at), priority)
        if event.type == "sensor_data":
            points = fg.scan_points(event.body)
            if points is None:
                return
            pc = self.channels.get((event.device_id, POINTS))
            if pc is None:
                pc = self._open_channel(event.device_id, POINTS, schemas.point_cloud_schema())
                if pc is None:
                    return
            if pc.subscribers:
                ns = fg.to_ns(event.at)
                payload = orjson.dumps(fg.scan_point_cloud(points, event.device_id, ns))
                self._send(pc, payload, ns, priority)

    def _send(self, ch: ServerChannel, payload: bytes, ns: int, priority: Priority) -> None:
        key = ch.channel.id if priority is Priority.LATEST else None
        ws_head = fg.ws_binary_header(13 + len(payload))  # same length for every subscriber
        pack = fg.message_data_header
        for proto, sub_id in ch.subscribers.items():
            q = proto.queue
            if q is None:
                continue
            head = ws_head + pack(sub_id, ns)
            if q.paused or q.closed:
                q.put(head + payload, priority, key)  # held, conflated or dropped by the queue
                continue
            # Hot path, same as q.put() -> proto._owe() for a queue that is not paused; the
            # payload is shared by every subscriber and joined once per write.
            pending = proto._pending
            if pending is None:
                proto._pending = [head, payload]
                proto.factory.mark_dirty(proto)
            else:
                pending.append(head)
                pending.append(payload)

    def _open_channel(self, device_id: str, mtype: str, schema: schemas.Schema) -> ServerChannel | None:
        if len(self.channels) >= self.max_channels:
            self.hub.stats.drop("foxglove_channels_full")
            return None
        topic = (
            schemas.points_topic_for(device_id) if mtype == POINTS else schemas.topic_for(device_id, mtype)
        )
        channel = fg.Channel(
            self._next_id,
            topic,
            schemas.MESSAGE_ENCODING,
            schema.name,
            schema.data.decode("utf-8"),
            schema.encoding,
        )
        self._next_id += 1
        ch = ServerChannel(channel, device_id, mtype)
        self.channels[(device_id, mtype)] = ch
        self.by_id[channel.id] = ch
        if self.clients:
            msg = fg.advertise([channel])
            for proto in self.clients.values():
                proto.send_json(msg)
        return ch

    def device_gone(self, device_id: str) -> list[int]:
        """Close ``device_id``'s channels (its subscriptions end) and unadvertise them; returns the ids.

        Ids are never reused, so a device that comes back gets fresh channel ids.
        """
        gone = [ch for (dev, _), ch in self.channels.items() if dev == device_id]
        if not gone:
            return []
        for ch in gone:
            del self.channels[(ch.device_id, ch.mtype)]
            del self.by_id[ch.channel.id]
            for proto, sub_id in ch.subscribers.items():
                proto.subscriptions.pop(sub_id, None)
            ch.subscribers.clear()
        ids = [ch.channel.id for ch in gone]
        if self.clients:
            msg = fg.unadvertise(ids)
            for proto in self.clients.values():
                proto.send_json(msg)
        return ids

    def latest(self, ch: ServerChannel) -> tuple[bytes, int] | None:
        """The channel's newest message as (payload, receive ns) from the registry, if any."""
        dev = self.hub.registry.get(ch.device_id)
        if dev is None:
            return None
        mtype = "sensor_data" if ch.mtype == POINTS else ch.mtype
        body = dev.latest.get(mtype)
        at = dev.latest_at.get(mtype)
        if body is None or at is None:
            return None
        ns = fg.to_ns(at)
        if ch.mtype != POINTS:
            return orjson.dumps(body), ns
        points = fg.scan_points(body)
        if points is None:
            return None
        return orjson.dumps(fg.scan_point_cloud(points, ch.device_id, ns)), ns

    def remove_client(self, proto: FoxgloveProtocol) -> None:
        """Forget ``proto`` and its subscriptions."""
        for ch in proto.subscriptions.values():
            ch.subscribers.pop(proto, None)
        proto.subscriptions.clear()
        if self.clients.get(proto.client_id) is proto:
            del self.clients[proto.client_id]


# --- protocol ----------------------------------------------------------------------------------------


@implementer(IPushProducer)
class FoxgloveProtocol(WebSocketServerProtocol):
    """One Foxglove client connection (``foxglove-<n>``); also its transport's streaming producer."""

    _log = Logger()
    factory: FoxgloveFactory

    client_id = ""
    queue: OutboundQueue | None = None
    _pending: list[bytes] | None = None
    _refusal: str | None = None
    _admitted = False
    _open = False
    _gone = False

    def __init__(self) -> None:
        super().__init__()
        self.subscriptions: dict[int, ServerChannel] = {}
        self.client_channels: dict[int, ClientRoute] = {}

    # -- connection setup --

    def connectionMade(self) -> None:
        """Create the bounded queue and take over as the transport's producer."""
        super().connectionMade()
        f = self.factory
        fx = f.config.foxglove
        self.queue = OutboundQueue(
            self._owe,
            clock=f.clock,
            max_bytes=fx.max_queue_bytes,
            slow_timeout=fx.slow_timeout,
            on_slow=self._on_slow,
            stats=f.hub.stats,
        )
        transport: Any = self.transport
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(self, True)

    def onConnect(self, request: ConnectionRequest) -> str:
        """Require the subprotocol (400) and a free client slot (503); note a refused token.

        A bad token is not refused at the HTTP level: the client gets a ``status`` error saying
        why (the Foxglove app shows it), then close 1008.
        """
        f = self.factory
        if fg.SUBPROTOCOL not in request.protocols:
            f.hub.stats.error("bad_subprotocol")
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, f"the {fg.SUBPROTOCOL} subprotocol is required")
        if f.admitted >= f.config.foxglove.max_clients:
            f.hub.stats.error("too_many_clients")
            self._log.info("refused Foxglove client {peer}: max_clients reached", peer=request.peer)
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "too many Foxglove clients")
        self._refusal = f.check_token(request.headers, request.params)
        f.admitted += 1
        self._admitted = True
        return fg.SUBPROTOCOL

    def onOpen(self) -> None:
        """Send serverInfo and every channel (one advertise), or the refusal and close."""
        f = self.factory
        hub = f.hub
        if self._refusal is not None:
            hub.stats.error("unauthorized")
            self._log.info("Foxglove client {peer} refused: {why}", peer=self.peer, why=self._refusal)
            self.send_json(fg.status(fg.ERROR, self._refusal))
            self.write_pending()
            self.close(CLOSE_POLICY, "unauthorized")
            return
        self._open = True
        hub.stats.connection(FACE, 1)
        self.client_id = f.next_client_id()
        self.send_json(f.server_info)
        self.send_json(fg.advertise(ch.channel for ch in f.manager.channels.values()))
        f.manager.clients[self.client_id] = self
        self._log.info(
            "Foxglove client {client_id} connected from {peer}", client_id=self.client_id, peer=self.peer
        )

    # -- incoming --

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """One complete message: a JSON op or a binary clientMessageData; errors -> status."""
        if self._gone or not self._open:
            return
        self.factory.hub.stats.bytes_in += len(payload)
        try:
            if isBinary:
                self._client_data(payload)
                return
            op = fg.parse_client_text(payload)
            if isinstance(op, fg.Subscribe):
                self._subscribe(op)
            elif isinstance(op, fg.Unsubscribe):
                self._unsubscribe(op)
            elif isinstance(op, fg.ClientAdvertise):
                self._client_advertise(op)
            else:
                self._client_unadvertise(op)
        except fg.FoxgloveError as e:
            self.error(e.code, e.message)

    def error(self, code: str, message: str) -> None:
        """Count ``code`` and tell this client ``message`` as a status of level error."""
        self.factory.hub.stats.error(code)
        self._log.debug(
            "Foxglove client {client_id}: {code}: {message}",
            client_id=self.client_id,
            code=code,
            message=message,
        )
        self.send_json(fg.status(fg.ERROR, message))

    def _subscribe(self, op: fg.Subscribe) -> None:
        manager = self.factory.manager
        for sub_id, channel_id in op.subscriptions:
            if sub_id in self.subscriptions:
                self.error("subscription_in_use", f"subscription id {sub_id} is already in use")
                continue
            ch = manager.by_id.get(channel_id)
            if ch is None:
                self.error("unknown_channel", f"cannot subscribe to unknown channel {channel_id}")
                continue
            if self in ch.subscribers:
                self.error(
                    "already_subscribed",
                    f"channel {channel_id} ({ch.channel.topic}) is already subscribed"
                    f" as subscription {ch.subscribers[self]}",
                )
                continue
            ch.subscribers[self] = sub_id
            self.subscriptions[sub_id] = ch
            latest = manager.latest(ch)  # like a latched topic: the newest value at once
            if latest is not None:
                self.send_data(sub_id, latest[1], latest[0], Priority.CONTROL, None)

    def _unsubscribe(self, op: fg.Unsubscribe) -> None:
        for sub_id in op.subscription_ids:
            ch = self.subscriptions.pop(sub_id, None)
            if ch is None:
                self.error("unknown_subscription", f"cannot unsubscribe unknown subscription {sub_id}")
                continue
            ch.subscribers.pop(self, None)

    def _client_advertise(self, op: fg.ClientAdvertise) -> None:
        f = self.factory
        for c in op.channels:
            if c.id in self.client_channels:
                self.error("channel_in_use", f"client channel id {c.id} is already advertised")
                continue
            if len(self.client_channels) >= f.config.foxglove.max_client_channels:
                self.error(
                    "too_many_channels", f"at most {f.config.foxglove.max_client_channels} client channels"
                )
                continue
            if c.encoding != schemas.MESSAGE_ENCODING:
                self.error(
                    "unsupported_encoding",
                    f"channel {c.topic}: encoding {c.encoding!r} is not supported (json)",
                )
                continue
            try:
                route = f.route_for(c.topic)
            except fg.FoxgloveError as e:
                self.error(e.code, e.message)
                continue
            self.client_channels[c.id] = route

    def _client_unadvertise(self, op: fg.ClientUnadvertise) -> None:
        for channel_id in op.channel_ids:
            route = self.client_channels.pop(channel_id, None)
            if route is None:
                self.error("unknown_channel", f"cannot unadvertise unknown client channel {channel_id}")
                continue
            if route.cmd_type in MOTION_COMMANDS and not any(
                r.cmd_type in MOTION_COMMANDS for r in self.client_channels.values()
            ):
                self.factory.deadman.website_gone(self.client_id)  # its last motion channel: stop

    def _client_data(self, payload: bytes) -> None:
        f = self.factory
        channel_id, data = fg.parse_client_binary(payload)
        route = self.client_channels.get(channel_id)
        if route is None:
            raise fg.FoxgloveError("unknown_channel", f"client channel {channel_id} was not advertised")
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise fg.FoxgloveError("bad_json", f"{route.topic}: message is not valid JSON") from None
        target = route.target
        if route.twist:
            body = fg.twist_to_robot_move(obj)
        else:
            if not isinstance(obj, dict):
                raise fg.FoxgloveError("not_object", f"{route.topic}: message must be a JSON object")
            if target is None and isinstance(obj.get("device_id"), str) and obj["device_id"]:
                target = obj["device_id"]
            body = {k: v for k, v in obj.items() if k != "device_id"}
            body["type"] = route.cmd_type
        if body["type"] in MOTION_COMMANDS:
            robots = [target] if target else [d.device_id for d in f.hub.registry.online(ROBOT)]
            f.deadman.moved(self.client_id, body["type"], body, robots)
        d = f.hub.command(body, origin=self.client_id, target=target)
        d.addErrback(self._command_failed, route.topic)

    def _command_failed(self, failure: Failure, topic: str) -> None:
        # hub.command already counted the error code
        err = failure.value
        if isinstance(err, HubError):
            message = f"{topic}: {err.code}: {err.message}"
        else:
            self._log.failure("command on {topic} failed", failure, topic=topic)
            message = f"{topic}: internal error"
        self.send_json(fg.status(fg.ERROR, message))

    # -- outgoing --

    def send_json(self, payload: bytes) -> None:
        """Queue one JSON op (CONTROL: never dropped)."""
        q = self.queue
        if q is not None:
            q.put(fg.ws_text_frame(payload), Priority.CONTROL)

    def send_data(self, sub_id: int, ns: int, payload: bytes, priority: Priority, key: int | None) -> None:
        """Queue one binary messageData for subscription ``sub_id`` (LATEST conflated by ``key``)."""
        q = self.queue
        if q is None:
            return
        frame = fg.ws_binary_header(13 + len(payload)) + fg.message_data_header(sub_id, ns) + payload
        q.put(frame, priority, key)

    def _owe(self, frame: bytes) -> None:
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
        """Start the closing handshake with any RFC 6455 code."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def _on_slow(self) -> None:
        self._pending = None
        self._log.info(
            "closing slow Foxglove client {client_id} ({peer})", client_id=self.client_id, peer=self.peer
        )
        self.closeHandshakeTimeout = SLOW_CLOSE_GRACE
        self.close(CLOSE_POLICY, "too slow: send queue over limit")

    # -- producer --

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
        """Leave the manager; the deadman stops what this client was driving."""
        if self._gone:
            return
        self._gone = True
        self._pending = None
        if self.queue is not None:
            self.queue.close()
        f = self.factory
        if self._admitted:
            f.admitted -= 1
        if not self._open:
            return
        f.hub.stats.connection(FACE, -1)
        f.manager.remove_client(self)
        f.deadman.website_gone(self.client_id)
        self._log.info("Foxglove client {client_id} disconnected", client_id=self.client_id)


# --- factory ---------------------------------------------------------------------------------------


class FoxgloveFactory(WebSocketServerFactory):
    """Builds :class:`FoxgloveProtocol` connections; subscribes its :class:`ChannelManager` to ``hub``.

    ``reactor`` provides time (IReactorTime) for Autobahn's timers, queues, batching and the deadman.
    """

    _log = Logger()

    def __init__(self, hub: Hub, reactor: IReactorTime) -> None:
        super().__init__(reactor=reactor, server=f"robonet/{robonet.__version__}")
        self.hub = hub
        self.clock = reactor
        self.config = hub.config
        fx = self.config.foxglove
        self.commands = frozenset(self.config.hub.commands)
        self.manager = ChannelManager(hub, fx.max_channels)
        self.deadman = Deadman(hub, reactor, self.config.teleop.deadman_ms)
        self.admitted = 0
        self._seq = 0
        self._dirty: list[FoxgloveProtocol] = []
        self._flush_call: IDelayedCall | None = None
        self.server_info = fg.server_info(
            hub.node.name or self.config.hub.name,
            [fg.CAP_CLIENT_PUBLISH],
            [schemas.MESSAGE_ENCODING],
            f"{hub.node.node_id}-{int(hub.stats.started_at * 1000)}",
            {
                "robonet_version": robonet.__version__,
                "node_id": hub.node.node_id,
                "project_id": hub.node.project_id,
            },
        )
        self.setProtocolOptions(
            maxFramePayloadSize=fx.max_message,
            maxMessagePayloadSize=fx.max_message,
            perMessageCompressionAccept=_deflate_accept(fx.max_message),
            utf8validateIncoming=True,
            failByDrop=False,
            openHandshakeTimeout=fx.handshake_timeout,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            autoPingInterval=AUTO_PING_INTERVAL,
            autoPingTimeout=AUTO_PING_TIMEOUT,
            autoFragmentSize=0,
            webStatus=False,
        )
        _use_clock(self, reactor)
        hub.subscribe(self.manager)

    def check_token(self, headers: dict[str, str], params: dict[str, list[str]]) -> str | None:
        """The one auth check of this face: None when allowed, else the reason sent to the client.

        As the web face today (config ``[auth]``): open mode allows everyone; token mode needs a
        key of ``auth.tokens`` as ``?token=`` or ``Authorization: Bearer``; a ``robot`` token does
        not open a viewer/teleop connection. (To be switched to robonet/auth.py at merge.)
        """
        auth = self.config.auth
        if auth.mode != "token":
            return None
        token = ""
        header = headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            token = header[7:].strip()
        if not token:
            token = (params.get("token") or [""])[0]
        granted = auth.tokens.get(token) if token else None
        if granted is None:
            return "unauthorized: a valid token is required (?token= in the URL or Authorization: Bearer)"
        if granted == ROBOT:
            return "unauthorized: a robot token cannot open a Foxglove connection"
        return None

    def route_for(self, topic: str) -> ClientRoute:
        """Map a client channel's topic to a command route (docs/foxglove.rst "Publishing").

        ``/cmd_vel`` and ``/<device_id>/cmd_vel``: Twist -> robot_move to every robot / one robot;
        ``/<command>`` and ``/<device_id>/<command>``: that command (``hub.commands``). Raises
        :class:`~robonet.protocols.foxglove.FoxgloveError` ``bad_topic`` otherwise.
        """
        parsed = schemas.parse_topic(topic)
        if parsed is not None:
            device_id, cmd = parsed
        elif topic.startswith("/") and topic.count("/") == 1 and len(topic) > 1:
            device_id, cmd = "", topic[1:]
        else:
            device_id, cmd = "", ""
        target = device_id or None
        if cmd == CMD_VEL:
            return ClientRoute(topic, "robot_move", target, True)
        if cmd in self.commands:
            return ClientRoute(topic, cmd, target, False)
        raise fg.FoxgloveError(
            "bad_topic",
            f"cannot publish on {topic[:128]!r}: use /<device_id>/<command>, /<command>, "
            f"/<device_id>/cmd_vel or /cmd_vel; commands: {', '.join(sorted(self.commands))}",
        )

    def next_client_id(self) -> str:
        """A fresh ``foxglove-<n>`` id (n from 1): the origin of this client's commands."""
        self._seq += 1
        return f"foxglove-{self._seq}"

    def mark_dirty(self, proto: FoxgloveProtocol) -> None:
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
        """Unsubscribe from the hub and cancel timers (the service is stopping)."""
        self.hub.unsubscribe(self.manager)
        self.deadman.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None


FoxgloveFactory.protocol = FoxgloveProtocol


class _Shutdown(Service):
    def __init__(self, factory: FoxgloveFactory) -> None:
        self.factory = factory

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        self.factory.shutdown()


def foxglove_services(config: Config, hub: Hub, reactor: IReactorTime) -> list[IService]:
    """One ``strports.service`` per ``foxglove.listen`` address sharing one factory, plus a service
    that unsubscribes it on stop. Empty when the face is disabled."""
    if not config.foxglove.listen:
        return []
    factory = FoxgloveFactory(hub, reactor)
    services: list[IService] = []
    for desc in config.foxglove.listen:
        svc = strports.service(with_backlog(desc), factory, reactor=reactor)  # type: ignore[arg-type]
        svc.setName(f"foxglove:{desc}")
        services.append(svc)
    shutdown = _Shutdown(factory)
    shutdown.setName("foxglove:shutdown")
    services.append(shutdown)
    hub.faces[FACE] = list(config.foxglove.listen)
    return services
