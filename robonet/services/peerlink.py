"""Peer links (spec/discovery-peers.md, "Peer links"): an established link between two hubs.

- :class:`PeerLink`: one established link (after the welcome), either direction: registry
  federation, telemetry and command forwarding, peer messages, heartbeat/RTT. It is the
  :class:`~robonet.model.Link` of the peer's own device record (role ``peer``);
- :class:`RemoteLink`: the Link of a device owned by a peer; ``deliver`` forwards the command;
- :class:`LinkOwner`: what links and connections need of the service that owns them (the
  :class:`~robonet.services.peers.PeerService` implements it; typed here so that neither module
  imports the other's classes: peers.py imports this module, never the reverse).

The connections that carry a link (the dialling and the accepting side) are
:mod:`robonet.services.peerconn`; the handshake codec is :mod:`robonet.protocols.peering`.

Frames after the welcome (docs/federation.rst has the full list): ``peer_devices``,
``peer_device``, ``peer_data``, ``peer_command`` (acked with ``ack``/``error`` like bot link
commands, the ack's ``sum`` checked), ``peer_message``, ``ping``/``ack``, ``request``/``response``.
Policy (which hubs link, remote device records, what is exported) is the PeerService's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet.fanout import OutboundQueue
from robonet.model import Command, HubError, Message, Priority
from robonet.protocols.botlink import ack_frame, encode_obj
from robonet.protocols.envelope import (
    ack_sum_ok,
    additive_sum,
    encode_response,
    error_obj,
    failure_code,
    ref_of,
    remote_error,
    response_error_obj,
    valid_device_id,
)
from robonet.protocols.peering import HEARTBEAT_S, PeerInfo

if TYPE_CHECKING:
    from robonet.config import Config
    from robonet.interfaces import PeerChannel, PeerHub
    from robonet.node import NodeIdentity

CLOSE_GRACE_S = 5.0
PEER_QUEUE_BYTES = 4 * 1024 * 1024


class LinkOwner(Protocol):
    """The federation service as links and peer connections see it (PeerService implements it)."""

    config: Config
    hub: PeerHub
    node: NodeIdentity
    reactor: Any  # IReactorTime (+ IReactorTCP for the diallers)
    links: dict[str, PeerLink]

    # policy
    def may_accept_from(self, host: str) -> bool: ...
    def may_add_link(self, node_id: str, *, dialled: bool) -> bool: ...

    # link lifecycle
    def link_up(self, link: PeerLink) -> bool: ...
    def link_down(self, link: PeerLink) -> None: ...

    # diallers (``dialler`` is a :class:`robonet.services.peerconn.Dialler`)
    def self_dial(self, nonce: Any) -> None: ...
    def dial_failed(self, dialler: Any) -> None: ...
    def handshake_refused(self, dialler: Any, code: str) -> None: ...
    def pause_dialler(self, dialler: Any, node_id: str) -> None: ...
    def stop_dialler(self, dialler: Any, reason: str) -> None: ...

    # remote devices and what we export
    def snapshot_frames(self) -> Iterator[bytes]: ...
    def remote_up(self, node_id: str, record: Any) -> str | None: ...
    def remote_down(self, node_id: str, record: Any) -> None: ...
    def remote_update(self, node_id: str, record: Any) -> None: ...
    def snapshot_done(self, node_id: str, seen: set[str]) -> None: ...
    def forget_remote(self, node_id: str, device_id: str, remote: RemoteLink) -> None: ...
    def remote_count(self, node_id: str) -> int: ...


class RemoteLink:
    """The :class:`~robonet.model.Link` of a device owned by peer ``node_id``.

    ``deliver`` forwards the command over that peer's current link and returns a Deferred for the
    remote ack (HubError ``device_offline`` when the peer is not linked).
    """

    def __init__(self, service: LinkOwner, node_id: str, device_id: str, face: str) -> None:
        self.service = service
        self.node_id = node_id
        self.device_id = device_id
        self.face = face

    def deliver(self, command: Command) -> defer.Deferred[Any]:
        link = self.service.links.get(self.node_id)
        if link is None:
            raise HubError("device_offline", f"hub {self.node_id} owning {self.device_id} is not linked")
        return link.send_command(command)

    def close_link(self, code: str, message: str) -> None:
        # Another connection took this device id over (the robot moved to another hub, or to us).
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
        service: LinkOwner,
        channel: PeerChannel,
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
        self.device: Any = None
        self._next_id = 0
        # command id -> (its Deferred, its timeout, the additive sum the peer's ack must carry)
        self._pending: dict[int, tuple[defer.Deferred[Any], IDelayedCall, int]] = {}
        self._pings: dict[int, float] = {}
        self._snapshot: set[str] | None = None
        self._heartbeat: LoopingCall | None = None
        self._producer_on: Any = None
        self._abort_call: IDelayedCall | None = None
        self._closed: list[defer.Deferred[None]] = []
        self.queue = OutboundQueue(
            channel.write_frame,
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
        for d, timer, _sum in pending.values():
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
        frame = encode_obj(
            {
                "type": "peer_command",
                "id": cid,
                "device_id": command.target,
                "origin": command.origin,
                "command": command.body,
            }
        )
        timer = self.clock.callLater(timeout, self._command_timeout, cid)
        # The peer acks with the additive sum of the JSON payload it received (after the length).
        self._pending[cid] = (d, timer, additive_sum(memoryview(frame)[4:]))
        self.hub.stats.count_out("peer_command")
        self.put(frame)
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
        return ref_of(obj)  # the envelope's id rule; an invalid id is answered without one

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
            d, timer, expected = entry
            if timer.active():
                timer.cancel()
            if not ack_sum_ok(obj, expected):
                # The peer hub did take a command with this id, but not the bytes we sent.
                self.hub.stats.error("bad_checksum")
                self.log.info(
                    "peer {node_id}: ack {id} sum {got!r} != {want}",
                    node_id=self.node_id,
                    id=mid,
                    got=obj.get("sum"),
                    want=expected,
                )
                d.errback(HubError("bad_checksum", "peer hub acked a command with a wrong checksum"))
                return
            d.callback(None)

    def _on_error(self, obj: dict[str, Any], raw: bytes) -> None:
        ref = obj.get("ref")
        err = remote_error(obj)
        err = HubError(err.code[:64], err.message[:500])  # a peer's text is bounded here
        entry = self._pending.pop(ref, None) if isinstance(ref, int) else None
        if entry is None:
            self.log.info(
                "peer {node_id} reports {code}: {message}",
                node_id=self.node_id,
                code=err.code,
                message=err.message[:200],
            )
            return
        d, timer, _sum = entry
        if timer.active():
            timer.cancel()
        d.errback(err)

    def _on_peer_command(self, obj: dict[str, Any], raw: bytes) -> None:
        mid = self._id(obj)
        target: Any = obj.get("device_id")
        body = obj.get("command")
        origin = obj.get("origin")
        if not valid_device_id(target) or not isinstance(body, dict):
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
        code, message = failure_code(f.value or Exception())
        self.put(encode_obj(error_obj(code, message, mid)))

    def _on_request(self, obj: dict[str, Any], raw: bytes) -> None:
        mid = self._id(obj)
        endpoint = obj.get("endpoint")
        if not isinstance(endpoint, str):
            error = response_error_obj(mid, "unknown_endpoint", "request needs a string 'endpoint'")
            self.put(encode_obj(error))
            return
        d = self.hub.request(endpoint, obj.get("data"), self.node_id)

        def ok(result: Any) -> None:
            frame, encodable = encode_response(mid, result, encode_obj)
            if not encodable:
                self.hub.stats.error("internal")
            self.put(frame)

        def failed(f: Failure) -> None:
            code, message = failure_code(f.value or Exception())
            self.put(encode_obj(response_error_obj(mid, code, message)))

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
