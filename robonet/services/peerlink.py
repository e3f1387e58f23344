"""Peer link machinery (spec/discovery-peers.md, "Peer links"): the connections between hubs.

- :class:`PeerLink`: one established link (after the welcome), either direction: registry
  federation, telemetry and command forwarding, peer messages, heartbeat/RTT. It is the
  :class:`~robonet.model.Link` of the peer's own device record (role ``peer``);
- :class:`RemoteLink`: the Link of a device owned by a peer; ``deliver`` forwards the command;
- :class:`Channel` / :class:`BotlinkChannel`: what a PeerLink writes to (a dialled connection, or
  an inbound bot link connection);
- :class:`Dialler`, :class:`PeerClientProtocol`, :class:`PeerClientFactory`: the dialling side's
  target record and thin protocol (bot link framing, handshake from
  :mod:`robonet.protocols.peering`);
- :class:`ResponderHandler`: the accepting side, handed inbound ``role: "peer"`` hellos by the
  bot link (``hub.peer_acceptor.accept(proto, hello)``).

Frames after the welcome (docs/federation.rst has the full list): ``peer_devices``,
``peer_device``, ``peer_data``, ``peer_command`` (acked with ``ack``/``error`` like bot link
commands), ``peer_message``, ``ping``/``ack``, ``request``/``response``. Policy (which hubs link,
remote device records, what is exported) is :class:`~robonet.services.peers.PeerService`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import orjson
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet.fanout import OutboundQueue
from robonet.model import Command, HubError, Message, Priority
from robonet.protocols.botlink import FrameDecoder, FrameError, ack_frame, additive_sum, encode_obj, error_obj
from robonet.protocols.peering import (
    AUTH_FAILED,
    BAD_HELLO,
    DUPLICATE,
    HEARTBEAT_S,
    DiallerHandshake,
    HandshakeError,
    PeerInfo,
    ResponderHandshake,
)

if TYPE_CHECKING:
    from robonet.services.peers import PeerService, StaticPeer

CLOSE_GRACE_S = 5.0
PEER_QUEUE_BYTES = 4 * 1024 * 1024
MAX_ID = 2**53


# --- links ---------------------------------------------------------------------------------------


class Channel:
    """What a PeerLink needs of a connection: write a whole frame, close with an error code."""

    transport: Any

    def write_frame(self, frame: bytes) -> None:
        raise NotImplementedError

    def close_with_error(self, code: str, message: str) -> None:
        raise NotImplementedError


class BotlinkChannel(Channel):
    """Adapter over the lead's BotLinkProtocol for inbound peer connections."""

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.transport = proto.transport
        self._write = proto.send_frame

    def write_frame(self, frame: bytes) -> None:
        self._write(frame)

    def close_with_error(self, code: str, message: str) -> None:
        self.proto.close_with_error(code, message)


class RemoteLink:
    """The :class:`~robonet.model.Link` of a device owned by peer ``node_id``.

    ``deliver`` forwards the command over that peer's current link and returns a Deferred for the
    remote ack (HubError ``device_offline`` when the peer is not linked).
    """

    def __init__(self, service: PeerService, node_id: str, device_id: str, face: str) -> None:
        self.service = service
        self.node_id = node_id
        self.device_id = device_id
        self.face = face
        self.replaced = False

    def deliver(self, command: Command) -> defer.Deferred[Any]:
        link = self.service.links.get(self.node_id)
        if link is None:
            raise HubError("device_offline", f"hub {self.node_id} owning {self.device_id} is not linked")
        return link.send_command(command)

    def close_link(self, code: str, message: str) -> None:
        # Another connection took this device id over (the robot moved to another hub, or to us).
        self.replaced = True
        self.service.forget_remote(self.node_id, self.device_id, self)


class PeerLink:
    """One established peer link (either direction), after the welcome.

    ``node_id``/``name``/``version``: the peer; ``address``: ``host:port`` of the other end;
    ``authenticated``: a shared secret was used; ``dialled``: we dialled it. It is the Link of
    the peer's device record (role ``peer``), which takes no commands.
    """

    face = "peer"
    log = Logger()

    def __init__(
        self,
        service: PeerService,
        channel: Channel,
        info: PeerInfo,
        *,
        address: str,
        authenticated: bool,
        dialled: bool,
    ) -> None:
        self.service = service
        self.hub = service.hub
        self.clock = service.reactor
        self.channel = channel
        self.node_id = info.node_id
        self.name = info.name
        self.version = info.version
        self.address = address
        self.authenticated = authenticated
        self.dialled = dialled
        self.state = "up"
        now = self.clock.seconds()
        self.connected_at = now
        self.last_seen = now
        self.rtt_ms: float | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.device: Any = None
        self._next_id = 0
        self._pending: dict[int, tuple[defer.Deferred[Any], IDelayedCall]] = {}
        self._pings: dict[int, float] = {}
        self._snapshot: set[str] | None = None
        self._heartbeat: LoopingCall | None = None
        self._producer_on: Any = None
        self._abort_call: IDelayedCall | None = None
        self._closed: list[defer.Deferred[None]] = []
        self.queue = OutboundQueue(
            self._write,
            clock=self.clock,
            max_bytes=PEER_QUEUE_BYTES,
            slow_timeout=service.config.botlink.idle_timeout,
            on_slow=self._slow,
            stats=self.hub.stats,
        )

    @property
    def dialler_id(self) -> str:
        """The node id of the side that dialled this link (the duplicate-link rule uses it)."""
        return self.service.node.node_id if self.dialled else self.node_id

    # -- lifecycle --

    def start(self) -> None:
        """Begin: producer, heartbeat, our device snapshot."""
        transport = getattr(self.channel, "transport", None)
        if transport is not None:
            try:
                transport.registerProducer(self.queue, True)
                self._producer_on = transport
            except (RuntimeError, AttributeError):
                pass  # a producer is already registered: the queue writes straight through
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self.clock
        self._heartbeat.start(HEARTBEAT_S, now=False)
        for frame in self.service.snapshot_frames():
            self.put(frame)

    def stop(self) -> None:
        """The connection is gone: stop timers, fail pending commands."""
        if self.state == "down":
            return
        self.state = "down"
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        waiting, self._closed = self._closed, []
        for d in waiting:
            d.callback(None)
        self.queue.close()
        pending, self._pending = self._pending, {}
        for d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(HubError("device_offline", f"link to hub {self.name or self.node_id} lost"))

    def _slow(self) -> None:
        self.log.info("peer {node_id}: not reading, closing", node_id=self.node_id)
        self.close_link("slow_consumer", "peer did not read its link")

    def close_link(self, code: str, message: str) -> None:
        """model.Link: close the connection, telling the peer why."""
        if self.state != "down":
            self.release_producer()
            self.channel.close_with_error(code, message)
            # A TLS close waits for the peer's close_notify; a dead peer never sends one.
            if self._abort_call is None:
                self._abort_call = self.clock.callLater(CLOSE_GRACE_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        self._abort_call = None
        transport = getattr(self.channel, "transport", None)
        if self.state != "down" and transport is not None:
            transport.abortConnection()

    def when_closed(self) -> defer.Deferred[None]:
        """Fires once the link's connection is gone (at once if it already is)."""
        if self.state == "down":
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed.append(d)
        return d

    def release_producer(self) -> None:
        """Unregister the queue from the transport: a TLS transport only shuts down without one."""
        transport, self._producer_on = self._producer_on, None
        if transport is not None:
            try:
                transport.unregisterProducer()
            except (RuntimeError, AttributeError):
                pass

    def deliver(self, command: Command) -> defer.Deferred[Any] | None:
        """model.Link: a peer hub's own record takes no commands."""
        raise HubError("unknown_command", "a peer hub takes no commands; address one of its devices")

    # -- output --

    def _write(self, frame: bytes) -> None:
        self.frames_out += 1
        self.channel.write_frame(frame)

    def put(self, frame: bytes, priority: Priority = Priority.CONTROL, key: Any = None) -> bool:
        """Queue one encoded frame; frames over the peer's max_frame are dropped and counted."""
        if self.state == "down":
            return False
        if len(frame) - 4 > self.service.config.botlink.max_frame:
            self.hub.stats.drop("peer_frame_too_large")
            return False
        self.queue.put(frame, priority, key)
        return True

    def send(self, obj: dict[str, Any], priority: Priority = Priority.CONTROL) -> bool:
        """Encode and queue one frame."""
        self.hub.stats.count_out(str(obj.get("type")))
        return self.put(encode_obj(obj), priority)

    def _beat(self) -> None:
        now = self.clock.seconds()
        if now - self.last_seen > self.service.config.botlink.idle_timeout:
            self.hub.stats.error("idle_timeout")
            self.close_link("idle_timeout", "no frame from peer")
            return
        self._next_id += 1
        self._pings[self._next_id] = now
        if len(self._pings) > 8:  # unanswered pings: keep only the newest
            self._pings.pop(next(iter(self._pings)))
        self.send({"type": "ping", "id": self._next_id})

    def send_command(self, command: Command) -> defer.Deferred[Any]:
        """Forward ``command`` for one of the peer's devices; fires on the remote ack.

        Fails with the remote HubError (e.g. ``delivery_timeout``), ``delivery_timeout`` when no
        answer comes within twice ``botlink.ack_timeout``, or ``device_offline`` if the link drops.
        """
        if self.state == "down":
            raise HubError("device_offline", "peer link is down")
        self._next_id += 1
        cid = self._next_id
        d: defer.Deferred[Any] = defer.Deferred()
        timeout = 2 * self.service.config.botlink.ack_timeout
        timer = self.clock.callLater(timeout, self._command_timeout, cid)
        self._pending[cid] = (d, timer)
        self.send(
            {
                "type": "peer_command",
                "id": cid,
                "device_id": command.target,
                "origin": command.origin,
                "command": command.body,
            }
        )
        return d

    def _command_timeout(self, cid: int) -> None:
        entry = self._pending.pop(cid, None)
        if entry is not None:
            entry[0].errback(HubError("delivery_timeout", f"hub {self.name or self.node_id} did not answer"))

    # -- input --

    def frame_received(self, obj: dict[str, Any], raw: bytes) -> None:
        """One decoded frame from the peer."""
        if self.state == "down":
            return
        self.last_seen = self.clock.seconds()
        self.frames_in += 1
        mtype = obj.get("type")
        handler = _HANDLERS.get(mtype) if isinstance(mtype, str) else None
        if handler is None:
            self.hub.stats.error("bad_frame")
            self.log.debug("peer {node_id}: ignored frame type {mtype!r}", node_id=self.node_id, mtype=mtype)
            return
        self.hub.stats.count_in(str(mtype))
        try:
            handler(self, obj, raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self.hub.stats.error("bad_frame")
            self.log.info(
                "peer {node_id}: bad {mtype} frame: {error}", node_id=self.node_id, mtype=mtype, error=e
            )

    def _id(self, obj: dict[str, Any]) -> int | None:
        mid = obj.get("id")
        return mid if isinstance(mid, int) and not isinstance(mid, bool) and 0 <= mid <= MAX_ID else None

    def _on_ping(self, obj: dict[str, Any], raw: bytes) -> None:
        mid = self._id(obj)
        if mid is not None:
            self.put(ack_frame(mid, additive_sum(raw)))

    def _on_ack(self, obj: dict[str, Any], raw: bytes) -> None:
        mid = self._id(obj)
        if mid is None:
            return
        sent = self._pings.pop(mid, None)
        if sent is not None:
            self.rtt_ms = round((self.clock.seconds() - sent) * 1000.0, 3)
            return
        entry = self._pending.pop(mid, None)
        if entry is not None:
            d, timer = entry
            if timer.active():
                timer.cancel()
            d.callback(None)

    def _on_error(self, obj: dict[str, Any], raw: bytes) -> None:
        ref = obj.get("ref")
        code = obj.get("code")
        code = code[:64] if isinstance(code, str) and code else "internal"
        entry = self._pending.pop(ref, None) if isinstance(ref, int) else None
        if entry is None:
            self.log.info(
                "peer {node_id} reports {code}: {message}",
                node_id=self.node_id,
                code=code,
                message=str(obj.get("message"))[:200],
            )
            return
        d, timer = entry
        if timer.active():
            timer.cancel()
        message = obj.get("message")
        d.errback(HubError(code, message[:500] if isinstance(message, str) else code))

    def _on_peer_command(self, obj: dict[str, Any], raw: bytes) -> None:
        mid = self._id(obj)
        target = obj.get("device_id")
        body = obj.get("command")
        origin = obj.get("origin")
        if not isinstance(target, str) or not isinstance(body, dict):
            self.hub.stats.error("bad_frame")
            self.put(encode_obj(error_obj("bad_frame", "peer_command needs device_id and command", mid)))
            return
        dev = self.hub.registry.get(target)
        # Only devices this hub owns: a command never travels more than one peer hop (no loops).
        if dev is None or dev.hub != "" or dev.role == "peer" or not dev.online:
            self.hub.stats.error("device_offline")
            self.put(encode_obj(error_obj("device_offline", f"device {target} is not connected here", mid)))
            return
        origin_id = f"{origin if isinstance(origin, str) else '?'}@{self.name or self.node_id}"[:200]
        checksum = additive_sum(raw)
        d = self.hub.command(body, origin_id, target)
        d.addCallbacks(
            self._command_done, self._command_failed, callbackArgs=(mid, checksum), errbackArgs=(mid,)
        )

    def _command_done(self, reached: Any, mid: int | None, checksum: int) -> None:
        if mid is not None:
            self.put(ack_frame(mid, checksum))

    def _command_failed(self, f: Failure, mid: int | None) -> None:
        err = f.value
        if isinstance(err, HubError):
            frame = encode_obj(error_obj(err.code, err.message, mid))
        else:
            frame = encode_obj(error_obj("internal", "command failed", mid))
        self.put(frame)

    def _on_request(self, obj: dict[str, Any], raw: bytes) -> None:
        mid = self._id(obj)
        endpoint = obj.get("endpoint")
        if not isinstance(endpoint, str):
            self.put(
                encode_obj(
                    {
                        "type": "response",
                        "id": mid,
                        "status": "error",
                        "code": "unknown_endpoint",
                        "message": "request needs a string 'endpoint'",
                    }
                )
            )
            return
        d = self.hub.request(endpoint, obj.get("data"), self.node_id)

        def ok(result: Any) -> None:
            try:
                frame = encode_obj({"type": "response", "id": mid, "status": "success", "data": result})
            except TypeError:
                frame = encode_obj(
                    {
                        "type": "response",
                        "id": mid,
                        "status": "error",
                        "code": "internal",
                        "message": "endpoint result is not JSON-serialisable",
                    }
                )
            self.put(frame)

        def failed(f: Failure) -> None:
            err = f.value
            code = err.code if isinstance(err, HubError) else "internal"
            message = err.message if isinstance(err, HubError) else "internal error"
            self.put(
                encode_obj(
                    {"type": "response", "id": mid, "status": "error", "code": code, "message": message}
                )
            )

        d.addCallbacks(ok, failed)

    def _on_response(self, obj: dict[str, Any], raw: bytes) -> None:
        pass  # we send no requests; tolerated for symmetry with the bot link

    def _on_peer_message(self, obj: dict[str, Any], raw: bytes) -> None:
        body = {"type": "peer_message", "from": self.node_id, "data": obj.get("data")}
        if self.device is not None:
            self.hub.ingest(
                self.device, Message("peer_message", body, self.node_id, self.last_seen, None, None)
            )

    def _on_peer_devices(self, obj: dict[str, Any], raw: bytes) -> None:
        devices = obj.get("devices")
        if not isinstance(devices, list):
            raise ValueError("devices must be a list")
        if self._snapshot is None:
            self._snapshot = set()
        for record in devices:
            dev_id = self.service.remote_up(self.node_id, record)
            if dev_id is not None:
                self._snapshot.add(dev_id)
        if not obj.get("more"):
            seen, self._snapshot = self._snapshot, None
            self.service.snapshot_done(self.node_id, seen)

    def _on_peer_device(self, obj: dict[str, Any], raw: bytes) -> None:
        op = obj.get("op")
        record = obj.get("device")
        if op == "up":
            self.service.remote_up(self.node_id, record)
        elif op == "down":
            self.service.remote_down(self.node_id, record)
        elif op == "update":
            self.service.remote_update(self.node_id, record)
        else:
            raise ValueError(f"unknown op {op!r}")

    def _on_peer_data(self, obj: dict[str, Any], raw: bytes) -> None:
        dev_id = obj.get("device_id")
        mtype = obj.get("msg_type")
        body = obj.get("data")
        if not isinstance(dev_id, str) or not isinstance(mtype, str) or not isinstance(body, dict):
            raise ValueError("peer_data needs device_id, msg_type and an object data")
        dev = self.hub.registry.get(dev_id)
        if dev is None or dev.hub != self.node_id or not dev.online:
            self.hub.stats.drop("peer_data_unknown_device")
            return
        self.hub.ingest(dev, Message(mtype, body, dev_id, self.last_seen, None, None))

    def _on_handshake_frame(self, obj: dict[str, Any], raw: bytes) -> None:
        self.put(encode_obj(error_obj("bad_hello", "already linked", self._id(obj))))

    def as_dict(self) -> dict[str, Any]:
        """The /api/peers record of this link."""
        return {
            "node_id": self.node_id,
            "name": self.name,
            "address": self.address,
            "state": self.state,
            "rtt_ms": self.rtt_ms,
            "last_seen": self.last_seen,
            "authenticated": self.authenticated,
            "devices": self.service.remote_count(self.node_id),
            "direction": "out" if self.dialled else "in",
            "version": self.version,
            "connected_at": self.connected_at,
        }


_HANDLERS: dict[str, Callable[[PeerLink, dict[str, Any], bytes], None]] = {
    "ping": PeerLink._on_ping,
    "ack": PeerLink._on_ack,
    "error": PeerLink._on_error,
    "peer_command": PeerLink._on_peer_command,
    "request": PeerLink._on_request,
    "response": PeerLink._on_response,
    "peer_message": PeerLink._on_peer_message,
    "peer_devices": PeerLink._on_peer_devices,
    "peer_device": PeerLink._on_peer_device,
    "peer_data": PeerLink._on_peer_data,
    "hello": PeerLink._on_handshake_frame,
    "challenge": PeerLink._on_handshake_frame,
    "proof": PeerLink._on_handshake_frame,
    "welcome": PeerLink._on_handshake_frame,
}


# --- the dialling side --------------------------------------------------------------------------


@attrs.define(eq=False)
class Dialler:
    """One dial target: a discovered node (``expected_node_id`` set) or a static entry.

    ``state``: connecting | handshake | up | paused | stopped; ``node_id`` is learned from the
    challenge; ``last_error`` the last handshake/connection problem.
    """

    key: str
    host: str
    port: int
    static: StaticPeer | None = None
    expected_node_id: str | None = None
    node_id: str | None = None
    name: str = ""
    state: str = "connecting"
    last_error: str = ""
    last_seen: float | None = None
    client: ClientService | None = None
    paused_for: str | None = None
    protocol: Any = None


class PeerClientProtocol(Protocol, Channel):
    """The dialler's connection: handshake, then frames go to the PeerLink."""

    log = Logger()

    def __init__(self, service: PeerService, dialler: Dialler) -> None:
        self.service = service
        self.dialler = dialler
        cfg = service.config.botlink
        self.decoder = FrameDecoder(cfg.max_hello_frame)
        self.handshake = DiallerHandshake(
            service.node, service.config.peers.secret, expected_node_id=dialler.expected_node_id
        )
        self.link: PeerLink | None = None
        self.closing = False
        self._deadline: IDelayedCall | None = None
        self._stage = "challenge"
        self.error = ""

    def connectionMade(self) -> None:
        self.dialler.state = "handshake"
        self.dialler.protocol = self
        self.write_frame(encode_obj(self.handshake.hello()))
        self._deadline = self.service.reactor.callLater(
            self.service.config.botlink.hello_timeout, self._handshake_expired
        )

    def _handshake_expired(self) -> None:
        self._deadline = None
        if self.link is None:
            self.error = "handshake timeout"
            self.close_with_error(BAD_HELLO, "handshake did not complete in time")

    def write_frame(self, frame: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.service.hub.stats.bytes_out += len(frame)
            self.transport.write(frame)

    def close_with_error(self, code: str, message: str) -> None:
        if self.closing:
            return
        self.write_frame(encode_obj(error_obj(code, message)))
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.service.hub.stats.bytes_in += len(data)
        try:
            payloads = self.decoder.feed(data)
        except FrameError as e:
            self.service.hub.stats.error(e.code)
            self.close_with_error(e.code, e.message)
            return
        for raw in payloads:
            if self.closing:
                return
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.service.hub.stats.error("bad_json")
                if self.link is None:
                    self.close_with_error("bad_json", "frame is not valid UTF-8 JSON")
                else:
                    self.write_frame(encode_obj(error_obj("bad_json", "frame is not valid UTF-8 JSON")))
                continue
            if not isinstance(obj, dict):
                self.service.hub.stats.error("not_object")
                if self.link is None:
                    self.close_with_error("not_object", "frame must be a JSON object")
                continue
            if self.link is not None:
                self.link.frame_received(obj, raw)
            else:
                self._handshake_frame(obj)

    def _handshake_frame(self, obj: dict[str, Any]) -> None:
        if obj.get("type") == "error":
            code = str(obj.get("code"))[:64]
            self.error = f"{code}: {str(obj.get('message'))[:200]}"
            self.service.handshake_refused(self.dialler, code)
            self.log.info(
                "peer {host}:{port} refused the link: {error}",
                host=self.dialler.host,
                port=self.dialler.port,
                error=self.error,
            )
            self.closing = True
            if self.transport is not None:
                self.transport.loseConnection()
            return
        try:
            if self._stage == "challenge":
                proof = self.handshake.on_challenge(obj)
                assert self.handshake.responder is not None
                self.dialler.node_id = self.handshake.responder
                if self.handshake.responder == self.service.node.node_id:
                    raise HandshakeError(BAD_HELLO, "connected to ourselves")
                if not self.service.may_add_link(self.handshake.responder, dialled=True):
                    self.error = f"{DUPLICATE}: already linked"
                    self.service.pause_dialler(self.dialler, self.handshake.responder)
                    self.close_with_error(DUPLICATE, "already linked")
                    return
                self._stage = "welcome"
                self.write_frame(encode_obj(proof))
                return
            info = self.handshake.on_welcome(obj)
        except HandshakeError as e:
            self.service.hub.stats.error(e.code)
            self.error = f"{e.code}: {e.message}"
            self.log.info(
                "peer {host}:{port}: handshake failed: {error}",
                host=self.dialler.host,
                port=self.dialler.port,
                error=self.error,
            )
            if e.message == "connected to ourselves":
                self.service.stop_dialler(self.dialler, "that address is this hub")
            self.close_with_error(e.code, e.message)
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.decoder.max_frame = self.service.config.botlink.max_frame
        self.dialler.name = info.name
        self.dialler.last_error = ""
        link = PeerLink(
            self.service,
            self,
            info,
            address=f"{self.dialler.host}:{self.dialler.port}",
            authenticated=bool(self.service.config.peers.secret),
            dialled=True,
        )
        if self.service.link_up(link):
            self.link = link
            self.dialler.state = "up"
        else:
            self.error = f"{DUPLICATE}: already linked"
            self.service.pause_dialler(self.dialler, info.node_id)
            self.close_with_error(DUPLICATE, "already linked")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closing = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.dialler.state in ("up", "handshake"):
            self.dialler.state = "connecting"
        self.dialler.last_seen = self.service.reactor.seconds()
        if self.link is not None:
            link, self.link = self.link, None
            self.service.link_down(link)
        else:
            self.dialler.last_error = self.error or reason.getErrorMessage()
            self.service.dial_failed(self.dialler)


class PeerClientFactory(Factory):
    """Builds the dialler's protocol for one target."""

    def __init__(self, service: PeerService, dialler: Dialler) -> None:
        self.service = service
        self.dialler = dialler

    def buildProtocol(self, addr: Any) -> PeerClientProtocol:
        return PeerClientProtocol(self.service, self.dialler)


# --- the accepting side -------------------------------------------------------------------------


class ResponderHandler:
    """Handles an inbound peer connection after the bot link saw ``role: "peer"`` in the hello.

    The bot link calls ``frame_received(obj, raw)`` for every later frame and
    ``connection_lost(reason)`` at the end.
    """

    log = Logger()

    def __init__(self, service: PeerService, proto: Any) -> None:
        self.service = service
        self.proto = proto
        self.channel = BotlinkChannel(proto)
        peer = proto.transport.getPeer() if proto.transport is not None else None
        self.host = str(getattr(peer, "host", "?"))
        self.address = f"{self.host}:{getattr(peer, 'port', 0)}"
        self.handshake = ResponderHandshake(
            service.node,
            service.config.peers.secret,
            require_same_hash=service.config.peers.require_same_hash,
            max_frame=service.config.botlink.max_frame,
        )
        self.link: PeerLink | None = None
        self.done = False
        self._deadline: IDelayedCall | None = None

    def start(self, hello: dict[str, Any]) -> None:
        """Answer the hello with a challenge, or refuse and close."""
        if hello.get("node_id") == self.service.node.node_id:
            self.service.self_dial(hello.get("nonce"))
        try:
            if not self.service.may_accept_from(self.host):
                raise HandshakeError(AUTH_FAILED, "no peers.secret: only loopback or static peers may link")
            challenge = self.handshake.on_hello(hello)
        except HandshakeError as e:
            self._refuse(e)
            return
        self.proto.send_obj(challenge)
        self._deadline = self.service.reactor.callLater(
            self.service.config.botlink.hello_timeout, self._expired
        )

    def _refuse(self, e: HandshakeError) -> None:
        self.done = True
        self.service.hub.stats.error(e.code)
        self.log.info(
            "peer link from {address} refused: {code}: {message}",
            address=self.address,
            code=e.code,
            message=e.message,
        )
        self.channel.close_with_error(e.code, e.message)

    def _expired(self) -> None:
        self._deadline = None
        if self.link is None and not self.done:
            self._refuse(HandshakeError(AUTH_FAILED, "no proof in time"))

    def frame_received(self, obj: dict[str, Any], raw: bytes) -> None:
        if self.link is not None:
            self.link.frame_received(obj, raw)
            return
        if self.done:
            return
        try:
            welcome = self.handshake.on_proof(obj)
        except HandshakeError as e:
            self._refuse(e)
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        info = self.handshake.dialler
        assert info is not None
        if not self.service.may_add_link(info.node_id, dialled=False):
            self._refuse(HandshakeError(DUPLICATE, "already linked"))
            return
        self.proto.send_obj(welcome)
        link = PeerLink(
            self.service,
            self.channel,
            info,
            address=self.address,
            authenticated=bool(self.service.config.peers.secret),
            dialled=False,
        )
        if self.service.link_up(link):
            self.link = link
        else:
            self._refuse(HandshakeError(DUPLICATE, "already linked"))

    def connection_lost(self, reason: Any = None) -> None:
        self.done = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.link is not None:
            link, self.link = self.link, None
            self.service.link_down(link)
