"""Peer links between hubs of one project (spec/discovery-peers.md, "Peer links").

Pieces, from the wire up:

- :func:`hmac_proof`, :class:`DiallerHandshake`, :class:`ResponderHandshake`: the pure
  challenge-response handshake (no I/O; the secret never leaves the process);
- :class:`PeerLink`: one established link (after the welcome), either direction: registry
  federation, telemetry and command forwarding, peer messages, heartbeat/RTT. It is the
  :class:`~robonet.model.Link` of the peer's own device record (role ``peer``);
- :class:`RemoteLink`: the Link of a device owned by a peer; ``deliver`` forwards the command;
- :class:`PeerClientProtocol`: the dialling side's thin protocol (bot link framing);
  :class:`ResponderHandler`: the accepting side, handed inbound ``role: "peer"`` hellos by the
  bot link (``hub.peer_acceptor.accept(proto, hello)``);
- :class:`PeerService`: decides which hubs link, runs one ClientService per dial target, keeps
  the links, and serves ``hub.peers`` (peer_list, broadcast_to_peers, send_to_peer).

Frames after the welcome (docs/federation.rst has the full list): ``peer_devices``,
``peer_device``, ``peer_data``, ``peer_command`` (acked with ``ack``/``error`` like bot link
commands), ``peer_message``, ``ping``/``ack``, ``request``/``response``.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import robonet
from robonet.config import Config
from robonet.fanout import OutboundQueue
from robonet.model import BULK_DATA_TYPES, Command, Event, HubError, Message, Priority
from robonet.node import NodeIdentity
from robonet.protocols.botlink import FrameDecoder, FrameError, ack_frame, additive_sum, encode_obj, error_obj
from robonet.registry import Device

HEARTBEAT_S = 10.0
CLOSE_GRACE_S = 5.0
NONCE_RE = re.compile(r"[0-9a-f]{32}\Z")
NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
PROOF_RE = re.compile(r"[0-9a-f]{64}\Z")
PEER_QUEUE_BYTES = 4 * 1024 * 1024
MAX_REMOTE_DEVICES = 4096
SNAPSHOT_CHUNK = 256 * 1024
MAX_LATEST_EXPORT = 64 * 1024
MAX_ID = 2**53
DEVICE_OPS = {"device_up": "up", "device_down": "down", "device_update": "update"}

# Handshake error codes (spec) plus the link-level ones robonet adds.
BAD_HELLO = "bad_hello"
WRONG_PROJECT = "wrong_project"
INCOMPATIBLE = "incompatible"
AUTH_FAILED = "auth_failed"
DUPLICATE = "duplicate_link"


def hmac_proof(secret: str, nonce: str, node_id: str) -> str:
    """HMAC-SHA256(``secret``, ``nonce + node_id``) as 64 lowercase hex chars (UTF-8 throughout).

    With no secret the key is empty: the proof then proves nothing and the link is marked
    unauthenticated (spec: only loopback or static peers link that way).
    """
    return hmac.new(secret.encode(), (nonce + node_id).encode(), sha256).hexdigest()


def new_nonce() -> str:
    """32 random lowercase hex chars (128 bits from ``secrets``)."""
    return secrets.token_hex(16)


class HandshakeError(Exception):
    """The handshake failed: ``code`` is bad_hello, wrong_project, incompatible or auth_failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class PeerInfo:
    """Who is at the other end of a completed handshake."""

    node_id: str
    name: str
    version: str
    hash: str = ""


def _str_field(obj: dict[str, Any], key: str, limit: int, code: str = BAD_HELLO) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise HandshakeError(code, f"{key} must be a string of at most {limit} characters")
    return value


@attrs.define
class DiallerHandshake:
    """The dialling side: hello -> (challenge) -> proof -> (welcome).

    ``expected_node_id`` is the node we meant to reach (from discovery) or None (static peer).
    """

    node: NodeIdentity
    secret: str
    expected_node_id: str | None = None
    nonce: str = attrs.field(factory=new_nonce)
    responder: str | None = None

    def hello(self) -> dict[str, Any]:
        """The first frame."""
        return {
            "type": "hello",
            "proto": robonet.PROTO_VERSION,
            "role": "peer",
            "node_id": self.node.node_id,
            "name": self.node.name,
            "project_id": self.node.project_id,
            "hash": self.node.hash,
            "version": self.node.version,
            "nonce": self.nonce,
        }

    def on_challenge(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Check the responder's proof; return our proof frame. Raises HandshakeError.

        ``auth_failed``: the proof is wrong (the responder does not know the secret);
        ``bad_hello``: malformed, our own node id, or not the node we meant to reach.
        """
        if obj.get("type") != "challenge":
            raise HandshakeError(BAD_HELLO, "expected a challenge")
        node_id = _str_field(obj, "node_id", 64)
        nonce = _str_field(obj, "nonce", 32)
        proof = _str_field(obj, "proof", 64)
        if not NODE_ID_RE.match(node_id) or not NONCE_RE.match(nonce):
            raise HandshakeError(BAD_HELLO, "malformed challenge")
        if node_id == self.node.node_id:
            raise HandshakeError(BAD_HELLO, "connected to ourselves")
        if self.expected_node_id is not None and node_id != self.expected_node_id:
            raise HandshakeError(BAD_HELLO, f"expected node {self.expected_node_id}, reached {node_id}")
        if not hmac.compare_digest(proof, hmac_proof(self.secret, self.nonce, node_id)):
            raise HandshakeError(AUTH_FAILED, "the responder's proof is wrong")
        self.responder = node_id
        return {"type": "proof", "proof": hmac_proof(self.secret, nonce, self.node.node_id)}

    def on_welcome(self, obj: dict[str, Any]) -> PeerInfo:
        """Check the welcome; return the responder's identity. Raises HandshakeError."""
        if obj.get("type") != "welcome" or self.responder is None:
            raise HandshakeError(BAD_HELLO, "expected a welcome")
        server = obj.get("server")
        if not isinstance(server, dict):
            server = {}
        node_id = obj.get("node_id", server.get("id"))
        if node_id != self.responder:
            raise HandshakeError(BAD_HELLO, "welcome from a different node")
        name = server.get("name")
        version = server.get("version")
        return PeerInfo(
            node_id=self.responder,
            name=name[:128] if isinstance(name, str) else "",
            version=version[:32] if isinstance(version, str) else "",
        )


@attrs.define
class ResponderHandshake:
    """The accepting side: (hello) -> challenge -> (proof) -> welcome.

    ``require_same_hash``: peers.require_same_hash; ``max_frame``: announced in the welcome.
    """

    node: NodeIdentity
    secret: str
    require_same_hash: bool = False
    max_frame: int = 1048576
    nonce: str = attrs.field(factory=new_nonce)
    dialler: PeerInfo | None = None
    _dialler_nonce: str = ""

    def on_hello(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Check the dialler's hello; return the challenge frame. Raises HandshakeError.

        ``bad_hello`` (malformed, our own id), ``wrong_project``, ``incompatible`` (protocol
        version, or hash when required).
        """
        if obj.get("type") != "hello" or obj.get("role") != "peer":
            raise HandshakeError(BAD_HELLO, "expected a peer hello")
        node_id = _str_field(obj, "node_id", 64)
        nonce = _str_field(obj, "nonce", 32)
        if not NODE_ID_RE.match(node_id) or not NONCE_RE.match(nonce):
            raise HandshakeError(BAD_HELLO, "malformed node_id or nonce")
        if node_id == self.node.node_id:
            raise HandshakeError(BAD_HELLO, "that is our own node id")
        name = obj.get("name", "")
        version = obj.get("version", "")
        node_hash = obj.get("hash", "")
        project = obj.get("project_id")
        if not isinstance(name, str) or not isinstance(version, str) or not isinstance(node_hash, str):
            raise HandshakeError(BAD_HELLO, "name, version and hash must be strings")
        if project != self.node.project_id:
            raise HandshakeError(WRONG_PROJECT, f"this hub serves project {self.node.project_id!r}")
        if obj.get("proto", robonet.PROTO_VERSION) != robonet.PROTO_VERSION:
            raise HandshakeError(INCOMPATIBLE, f"peer protocol must be {robonet.PROTO_VERSION}")
        if self.require_same_hash and node_hash != self.node.hash:
            raise HandshakeError(INCOMPATIBLE, "different robonet sources (peers.require_same_hash)")
        self.dialler = PeerInfo(node_id, name[:128], version[:32], node_hash[:64])
        self._dialler_nonce = nonce
        return {
            "type": "challenge",
            "node_id": self.node.node_id,
            "nonce": self.nonce,
            "proof": hmac_proof(self.secret, nonce, self.node.node_id),
        }

    def on_proof(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Check the dialler's proof; return the welcome frame. Raises HandshakeError(auth_failed)."""
        if self.dialler is None or obj.get("type") != "proof":
            raise HandshakeError(AUTH_FAILED, "expected a proof")
        proof = obj.get("proof")
        expected = hmac_proof(self.secret, self.nonce, self.dialler.node_id)
        if not isinstance(proof, str) or not hmac.compare_digest(proof.encode(), expected.encode()):
            raise HandshakeError(AUTH_FAILED, "wrong proof")
        return {
            "type": "welcome",
            "proto": robonet.PROTO_VERSION,
            "session": str(uuid.uuid4()),
            "node_id": self.node.node_id,
            "server": {"id": self.node.node_id, "name": self.node.name, "version": self.node.version},
            "heartbeat_s": HEARTBEAT_S,
            "max_frame": self.max_frame,
        }


# --- static peers ------------------------------------------------------------------------------


@attrs.frozen
class StaticPeer:
    """A ``peers.static`` entry: ``host:port``, ``tcp:host:port``, ``ssl:host:port[:ca=FILE][:hostname=N]``.

    ``host=`` and ``port=`` keyword forms are accepted too; IPv6 hosts go in brackets.
    """

    entry: str
    host: str
    port: int
    tls: bool = False
    ca: str = ""
    hostname: str = ""


def parse_static(entry: str) -> StaticPeer:
    """Parse one ``peers.static`` entry. Raises ValueError naming the problem."""
    text = entry.strip()
    tls = False
    for prefix, is_tls in (("tcp:", False), ("ssl:", True), ("tls:", True)):
        if text.startswith(prefix):
            text, tls = text[len(prefix) :], is_tls
            break
    host = ""
    if text.startswith("["):
        host, _, text = text[1:].partition("]")
        text = text.removeprefix(":")
    parts = [p for p in text.split(":") if p] if text else []
    port = 0
    options: dict[str, str] = {}
    positional = []
    for part in parts:
        key, eq, value = part.partition("=")
        if eq:
            options[key] = value
        else:
            positional.append(part)
    if not host:
        host = options.pop("host", "") or (positional.pop(0) if positional else "")
    port_text = options.pop("port", "") or (positional.pop(0) if positional else "")
    if positional:
        raise ValueError(f"peers.static: cannot parse {entry!r}")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"peers.static: expected host:port, got {entry!r}")
    port = int(port_text)
    ca = options.pop("ca", "") or options.pop("trustRoots", "")
    hostname = options.pop("hostname", "")
    if options:
        raise ValueError(f"peers.static: unknown option(s) {sorted(options)} in {entry!r}")
    return StaticPeer(entry, host, port, tls, ca, hostname)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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


# --- the service ----------------------------------------------------------------------------------


class PeerService(Service):
    """Federation: which hubs link, the links, remote devices, forwarding (spec/discovery-peers.md).

    ``config``: the whole Config (``peers``, ``botlink`` limits); ``hub``: the Hub (this service
    sets ``hub.peers`` and ``hub.peer_acceptor`` while running); ``node``: our identity;
    ``reactor``: IReactorTime + IReactorTCP (+ resolve); ``discovery``: a DiscoveryService to
    follow (optional); ``retry_policy``: ClientService's backoff (default 1 s, x1.5, up to 60 s);
    ``endpoint_factory(dialler)``: the client endpoint for a target (default TCP, or TLS for ssl:).
    It is a hub Subscriber: local devices' data and status events go to every linked peer.
    """

    log = Logger()
    name = "peers"

    def __init__(
        self,
        config: Config,
        hub: Any,
        node: NodeIdentity,
        reactor: Any,
        *,
        discovery: Any = None,
        retry_policy: Callable[[int], float] | None = None,
        endpoint_factory: Callable[[Dialler], IStreamClientEndpoint] | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        self.node = node
        self.reactor = reactor
        self.discovery = discovery
        self.retry_policy = retry_policy or backoffPolicy(initialDelay=1.0, factor=1.5, maxDelay=60.0)
        self._endpoint_factory = endpoint_factory or self._endpoint
        self.links: dict[str, PeerLink] = {}
        self.diallers: dict[str, Dialler] = {}
        self.remote: dict[str, dict[str, RemoteLink]] = {}
        self._static_hosts: set[str] = set()
        self._observers: list[Callable[[str, Any], object]] = []
        forward = config.peers.forward
        self._forward_all = forward == "all"
        self._forward_types = frozenset(() if isinstance(forward, str) else forward)

    def observe(self, fn: Callable[[str, Any], object]) -> None:
        """Call ``fn(event, subject)``: ``link_up``/``link_down`` with the PeerLink, ``dial_failed``
        with the Dialler (its ``last_error`` says why) when a connection ends before a link."""
        self._observers.append(fn)

    def _emit(self, event: str, subject: Any) -> None:
        for fn in list(self._observers):
            try:
                fn(event, subject)
            except Exception:  # one faulty observer must not stop the others
                self.log.failure("peer observer failed on {event}", event=event)

    # -- lifecycle --

    def startService(self) -> None:
        """Install the hub hooks, subscribe to fan-out, dial static peers, follow discovery."""
        super().startService()  # type: ignore[no-untyped-call]
        self.hub.peers = self
        self.hub.peer_acceptor = self
        self.hub.subscribe(self)
        for entry in self.config.peers.static:
            try:
                static = parse_static(entry)
            except ValueError as e:
                self.log.error("{error}", error=str(e))
                continue
            self._remember_static_host(static.host)
            self._add_dialler(Dialler(f"static:{entry}", static.host, static.port, static=static))
        if self.discovery is not None:
            self.discovery.observe(self._on_node)
            for node in self.discovery.known_nodes():
                self._on_node("node_found", node)

    def stopService(self) -> defer.Deferred[None]:
        """Stop dialling, close every link; fires when every connection is closed."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.hub.unsubscribe(self)
        if self.hub.peers is self:
            self.hub.peers = None
        if self.hub.peer_acceptor is self:
            self.hub.peer_acceptor = None
        waits = []
        for link in list(self.links.values()):
            link.close_link("shutdown", "hub shutting down")
            waits.append(link.when_closed())  # bounded: aborted after CLOSE_GRACE_S
        for dialler in list(self.diallers.values()):
            d = self._stop_client(dialler)
            if d is not None:
                waits.append(d)
            dialler.state = "stopped"
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def _remember_static_host(self, host: str) -> None:
        if isIPAddress(host) or isIPv6Address(host):
            self._static_hosts.add(host)
            return
        self._static_hosts.add(host)
        resolve = getattr(self.reactor, "resolve", None)
        if resolve is not None:
            resolve(host).addCallbacks(self._static_hosts.add, lambda f: None)

    # -- policy --

    def may_accept_from(self, host: str) -> bool:
        """With no secret, only loopback or static peers' addresses may link (spec)."""
        return bool(self.config.peers.secret) or _is_loopback(host) or host in self._static_hosts

    def may_add_link(self, node_id: str, *, dialled: bool) -> bool:
        """One link per pair: False if an up link to ``node_id`` wins over a new one.

        Of two links to the same node the one dialled by the smaller node id wins (both sides
        compute the same answer); of two dialled by the peer, the newer; of two we dialled
        ourselves, the older one.
        """
        existing = self.links.get(node_id)
        if existing is None or existing.state == "down":
            return True
        new_dialler = self.node.node_id if dialled else node_id
        if new_dialler != existing.dialler_id:
            return new_dialler < existing.dialler_id
        # Same dialler twice. If the peer dialled again, its old connection is dead from its side
        # (it restarted, or a half-open TCP link): the new one wins. If we dialled twice (a static
        # entry and a discovered node naming the same hub), keep the older one.
        return not dialled

    def _wants_dial(self, node: Any) -> bool:
        if not self.config.peers.auto or not node.port:
            return False
        if not self.node.node_id < node.node_id:
            return False  # the smaller node id dials
        return (
            bool(self.config.peers.secret) or _is_loopback(node.address) or node.address in self._static_hosts
        )

    # -- diallers --

    def _on_node(self, event: str, node: Any) -> None:
        key = f"node:{node.node_id}"
        current = self.diallers.get(key)
        if event == "node_lost":
            if current is not None and node.node_id not in self.links:
                self._remove_dialler(current)
            return
        if not self._wants_dial(node):
            if self.config.peers.auto and self.node.node_id < node.node_id and not current:
                self.log.info(
                    "not linking to {node_id} at {address}: set peers.secret to link over the network",
                    node_id=node.node_id,
                    address=node.address,
                )
            return
        if current is not None:
            if (current.host, current.port) == (node.address, node.port):
                return
            self._remove_dialler(current)
        self._add_dialler(
            Dialler(
                key,
                node.address,
                node.port,
                expected_node_id=node.node_id,
                node_id=node.node_id,
                name=node.name,
            )
        )

    def _endpoint(self, dialler: Dialler) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, dialler.host, dialler.port, timeout=10
        )
        static = dialler.static
        if static is not None and static.tls:
            from twisted.internet.ssl import (
                Certificate,
                optionsForClientTLS,
                platformTrust,
                trustRootFromCertificates,
            )

            trust: Any = platformTrust()  # type: ignore[no-untyped-call]
            if static.ca:
                trust = trustRootFromCertificates(  # type: ignore[no-untyped-call]
                    [Certificate.loadPEM(Path(static.ca).read_bytes())]
                )
            options = optionsForClientTLS(static.hostname or static.host, trustRoot=trust)
            endpoint = wrapClientTLS(options, endpoint)
        return endpoint

    def _add_dialler(self, dialler: Dialler) -> None:
        try:
            endpoint = self._endpoint_factory(dialler)
        except (OSError, ValueError) as e:
            self.log.error("peer {key}: cannot set up the connection: {error}", key=dialler.key, error=e)
            return
        self.diallers[dialler.key] = dialler
        dialler.client = ClientService(
            endpoint, PeerClientFactory(self, dialler), retryPolicy=self.retry_policy, clock=self.reactor
        )
        dialler.state = "connecting"
        dialler.client.startService()
        self.log.info(
            "dialling peer {key} at {host}:{port}", key=dialler.key, host=dialler.host, port=dialler.port
        )

    def _stop_client(self, dialler: Dialler) -> defer.Deferred[None] | None:
        client, dialler.client = dialler.client, None
        for link in list(self.links.values()):
            if isinstance(link.channel, PeerClientProtocol) and link.channel.dialler is dialler:
                link.close_link("shutdown", "link closed by this hub")
        if client is not None and client.running:
            result: defer.Deferred[None] = client.stopService()
            return result
        return None

    def _remove_dialler(self, dialler: Dialler) -> None:
        self.diallers.pop(dialler.key, None)
        self._stop_client(dialler)
        dialler.state = "stopped"

    def stop_dialler(self, dialler: Dialler, reason: str) -> None:
        """Give up on a target for good (e.g. it is this hub)."""
        self.log.info("peer {key}: not dialling any more: {reason}", key=dialler.key, reason=reason)
        dialler.last_error = reason
        self._stop_client(dialler)
        dialler.state = "stopped"

    def pause_dialler(self, dialler: Dialler, node_id: str) -> None:
        """Stop redialling while another link to ``node_id`` is up; resumed when it drops.

        Without such a link here the dialler keeps retrying (with backoff) instead: a peer that
        says "duplicate" about a link we do not have holds a stale one that will time out.
        """
        if dialler.state == "paused" or node_id not in self.links:
            return
        dialler.state = "paused"
        dialler.paused_for = node_id
        client, dialler.client = dialler.client, None
        if client is not None and client.running:
            # stopService from inside the connection's own callbacks: let the stack unwind first.
            self.reactor.callLater(0, client.stopService)

    def self_dial(self, nonce: Any) -> None:
        """A hello with our own node id reached our bot link: stop the dialler that sent it."""
        for dialler in self.diallers.values():
            proto = dialler.protocol
            if proto is not None and proto.handshake.nonce == nonce and dialler.state != "stopped":
                self.stop_dialler(dialler, "that address is this hub")

    def dial_failed(self, dialler: Dialler) -> None:
        """A connection to ``dialler``'s target ended before a link was up (ClientService retries)."""
        self._emit("dial_failed", dialler)

    def handshake_refused(self, dialler: Dialler, code: str) -> None:
        """The responder refused our handshake with ``code``."""
        if code == DUPLICATE and dialler.node_id:
            self.pause_dialler(dialler, dialler.node_id)

    def _resume_diallers(self, node_id: str) -> None:
        for dialler in self.diallers.values():
            if dialler.state == "paused" and dialler.paused_for == node_id and self.running:
                dialler.paused_for = None
                try:
                    endpoint = self._endpoint_factory(dialler)
                except (OSError, ValueError):
                    continue
                dialler.client = ClientService(
                    endpoint,
                    PeerClientFactory(self, dialler),
                    retryPolicy=self.retry_policy,
                    clock=self.reactor,
                )
                dialler.state = "connecting"
                dialler.client.startService()

    # -- the acceptor hook (hub.peer_acceptor) --

    def accept(self, proto: Any, hello: dict[str, Any]) -> ResponderHandler:
        """Take over an inbound bot link connection whose hello said ``role: "peer"``."""
        handler = ResponderHandler(self, proto)
        handler.start(hello)
        return handler

    # -- links --

    def link_up(self, link: PeerLink) -> bool:
        """Register a link whose handshake completed; False (caller closes it) if it loses to another."""
        if not self.may_add_link(link.node_id, dialled=link.dialled):
            return False
        old = self.links.get(link.node_id)
        self.links[link.node_id] = link
        if old is not None and old.state != "down":
            old.close_link(DUPLICATE, "replaced by the preferred link")
            self._drop_link(old, replaced=True)
        link.device = self.hub.connect(
            link, link.node_id, face="peer", role="peer", address=link.address, name=link.name
        )
        self.log.info(
            "peer {node_id} ({name}) linked, {direction}, {auth}",
            node_id=link.node_id,
            name=link.name,
            direction="dialled" if link.dialled else "accepted",
            auth="authenticated" if link.authenticated else "UNAUTHENTICATED (no peers.secret)",
        )
        link.start()
        self._emit("link_up", link)
        return True

    def link_down(self, link: PeerLink) -> None:
        """A link's connection closed."""
        self._drop_link(link, replaced=False)

    def _drop_link(self, link: PeerLink, *, replaced: bool) -> None:
        if link.state == "down":
            return
        link.stop()
        if self.links.get(link.node_id) is link:
            del self.links[link.node_id]
        elif replaced or link.node_id in self.links:
            return  # a newer link for that node is up: its devices stay reachable
        self.log.info("peer {node_id} ({name}) link down", node_id=link.node_id, name=link.name)
        self.hub.disconnect(link, link.node_id)
        for dev_id, remote in list(self.remote.get(link.node_id, {}).items()):
            dev = self.hub.registry.get(dev_id)
            if dev is not None and dev.link is remote:
                self.hub.disconnect(remote, dev_id, "unreachable")
        self._resume_diallers(link.node_id)
        self._emit("link_down", link)
        if self.discovery is not None:
            known = {n.node_id for n in self.discovery.known_nodes()}
            dialler = self.diallers.get(f"node:{link.node_id}")
            if dialler is not None and link.node_id not in known:
                self._remove_dialler(dialler)

    # -- remote devices --

    def _check_record(self, record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise ValueError("device record must be an object")
        dev_id = record.get("device_id")
        if not isinstance(dev_id, str) or not 0 < len(dev_id) <= 128:
            raise ValueError("device_id must be a string of 1..128 characters")
        return record

    def remote_up(self, node_id: str, record: Any) -> str | None:
        """A peer says it owns this online device: register it here with hub = ``node_id``.

        Returns the device id, or None when ignored (a local device of that id is online, the
        record is a peer hub or the per-peer cap is reached).
        """
        record = self._check_record(record)
        dev_id: str = record["device_id"]
        role = record.get("role") if isinstance(record.get("role"), str) else "robot"
        if role == "peer" or dev_id == self.node.node_id or dev_id in self.links:
            return None
        existing = self.hub.registry.get(dev_id)
        if existing is not None and existing.online and existing.hub == "":
            self.hub.stats.drop("peer_device_shadowed")
            self.log.info(
                "peer {node_id} exports {device_id}, which is connected here: ignored",
                node_id=node_id,
                device_id=dev_id,
            )
            return None
        owned = self.remote.setdefault(node_id, {})
        remote = owned.get(dev_id)
        if remote is None:
            if len(owned) >= MAX_REMOTE_DEVICES:
                self.hub.stats.drop("peer_device_limit")
                return None
            remote = owned[dev_id] = RemoteLink(self, node_id, dev_id, _short(record.get("face"), "peer"))
        if existing is not None and existing.online and existing.link is remote and existing.hub == node_id:
            return dev_id  # already up via this peer (a repeated snapshot)
        dev = self.hub.connect(
            remote,
            dev_id,
            face=remote.face,
            role=role[:32],
            address=_short(record.get("address"), ""),
            name=_short(record.get("name"), ""),
            hub_id=node_id,
            dialect=_short(record.get("dialect"), ""),
        )
        latest = record.get("latest")
        latest_at = record.get("latest_at")
        if isinstance(latest, dict):
            for mtype, body in latest.items():
                if isinstance(body, dict) and mtype not in dev.latest:
                    dev.latest[mtype] = body
                    at = latest_at.get(mtype) if isinstance(latest_at, dict) else None
                    dev.latest_at[mtype] = (
                        float(at) if isinstance(at, (int, float)) else self.reactor.seconds()
                    )
        return str(dev_id)

    def remote_down(self, node_id: str, record: Any) -> None:
        """A peer's device went offline."""
        record = self._check_record(record)
        dev_id = record["device_id"]
        remote = self.remote.get(node_id, {}).get(dev_id)
        if remote is not None:
            self.hub.disconnect(remote, dev_id)

    def remote_update(self, node_id: str, record: Any) -> None:
        """A peer's device changed (name, address, ...)."""
        record = self._check_record(record)
        dev = self.hub.registry.get(record["device_id"])
        remote = self.remote.get(node_id, {}).get(record["device_id"])
        if dev is None or remote is None or dev.link is not remote:
            return
        if isinstance(record.get("name"), str):
            dev.name = record["name"][:128]
        if isinstance(record.get("address"), str):
            dev.address = record["address"][:128]
        self.hub.registry.update(dev)

    def snapshot_done(self, node_id: str, seen: set[str]) -> None:
        """A full peer_devices snapshot arrived: devices of that peer not in it are offline now."""
        for dev_id, remote in list(self.remote.get(node_id, {}).items()):
            if dev_id in seen:
                continue
            dev = self.hub.registry.get(dev_id)
            if dev is not None and dev.hub == node_id and dev.status != "offline":
                if dev.link is remote and dev.online:
                    self.hub.disconnect(remote, dev_id)
                else:
                    self.hub.registry.set_status(dev, "offline")

    def forget_remote(self, node_id: str, device_id: str, remote: RemoteLink) -> None:
        """A remote device's record was taken over by another connection."""
        owned = self.remote.get(node_id)
        if owned is not None and owned.get(device_id) is remote:
            del owned[device_id]

    def remote_count(self, node_id: str) -> int:
        """How many of that peer's devices are online here."""
        count = 0
        for dev_id, remote in self.remote.get(node_id, {}).items():
            dev = self.hub.registry.get(dev_id)
            if dev is not None and dev.online and dev.link is remote:
                count += 1
        return count

    # -- what we export --

    def _exportable(self, dev: Device) -> bool:
        return bool(dev.online and dev.hub == "" and dev.role != "peer")

    def _export(self, dev: Device) -> dict[str, Any]:
        record = dev.as_dict()
        latest = {k: v for k, v in record["latest"].items() if k not in BULK_DATA_TYPES}
        record["latest"] = latest
        record["latest_at"] = {k: v for k, v in record["latest_at"].items() if k in latest}
        if len(orjson.dumps(latest)) > MAX_LATEST_EXPORT:
            record["latest"], record["latest_at"] = {}, {}
        return record

    def snapshot_frames(self) -> Iterator[bytes]:
        """``peer_devices`` frames with every local online device, chunked (``more`` on all but the last)."""
        chunk: list[dict[str, Any]] = []
        size = 0
        for dev in self.hub.registry.devices():
            if not self._exportable(dev):
                continue
            record = self._export(dev)
            n = len(orjson.dumps(record))
            if chunk and size + n > SNAPSHOT_CHUNK:
                yield encode_obj({"type": "peer_devices", "devices": chunk, "more": True})
                chunk, size = [], 0
            chunk.append(record)
            size += n
        yield encode_obj({"type": "peer_devices", "devices": chunk})

    # -- Subscriber: local fan-out to peers --

    def offer(self, event: Event) -> None:
        """Forward a local device's data (per ``peers.forward``) or status change to every link."""
        if not self.links or event.hub:
            return
        if event.kind == "status":
            if event.body.get("role") == "peer":
                return
            op = DEVICE_OPS.get(event.type)
            if op is None:
                return
            record = dict(event.body)
            record.pop("latest", None)
            record.pop("latest_at", None)
            frame = encode_obj({"type": "peer_device", "op": op, "device": record})
            for link in list(self.links.values()):
                link.put(frame, Priority.CONTROL)
            return
        if event.device_id in self.links:
            return  # a peer hub's own record (peer_message): never forwarded
        if not self._forward_all and event.type not in self._forward_types:
            return
        try:
            frame = encode_obj(
                {
                    "type": "peer_data",
                    "device_id": event.device_id,
                    "msg_type": event.type,
                    "at": event.at,
                    "data": event.body,
                }
            )
        except TypeError:
            self.hub.stats.drop("peer_unencodable")
            return
        for link in list(self.links.values()):
            link.put(frame, event.priority, event.key)

    # -- peer messages (hub.broadcast_to_peers / hub.send_to_peer) --

    def _peer_message(self, body: Any) -> bytes:
        return encode_obj({"type": "peer_message", "from": self.node.node_id, "data": body})

    def broadcast_to_peers(self, body: Any) -> int:
        """Send ``body`` as a peer_message to every linked peer; returns how many links took it."""
        frame = self._peer_message(body)
        sent = 0
        for link in list(self.links.values()):
            if link.put(frame):
                sent += 1
        return sent

    def send_to_peer(self, node_id: str, body: Any) -> bool:
        """Send ``body`` as a peer_message to peer ``node_id``; False if it is not linked."""
        link = self.links.get(node_id)
        return link is not None and link.put(self._peer_message(body))

    # -- reporting --

    def peer_list(self) -> dict[str, Any]:
        """``{"peers": [...]}`` for the peer_list endpoint and /api/peers.

        One record per linked peer (state ``up``), per dial target not linked (``connecting``,
        ``handshake``, ``paused``, ``stopped``) and per discovered node not linked
        (``discovered``). Keys: node_id, name, address, state, rtt_ms, last_seen (Unix s or None),
        authenticated, devices (online devices of that peer seen here), plus direction, version.
        """
        peers = [link.as_dict() for link in self.links.values()]
        seen = set(self.links)
        for dialler in self.diallers.values():
            if dialler.node_id in seen:
                continue
            if dialler.node_id:
                seen.add(dialler.node_id)
            peers.append(
                {
                    "node_id": dialler.node_id or "",
                    "name": dialler.name,
                    "address": f"{dialler.host}:{dialler.port}",
                    "state": dialler.state,
                    "rtt_ms": None,
                    "last_seen": dialler.last_seen,
                    "authenticated": False,
                    "devices": self.remote_count(dialler.node_id) if dialler.node_id else 0,
                    "direction": "out",
                    "error": dialler.last_error,
                }
            )
        if self.discovery is not None:
            for node in self.discovery.known_nodes():
                if node.node_id in seen:
                    continue
                peers.append(
                    {
                        "node_id": node.node_id,
                        "name": node.name,
                        "address": f"{node.address}:{node.port}",
                        "state": "discovered",
                        "rtt_ms": None,
                        "last_seen": node.last_seen,
                        "authenticated": False,
                        "devices": self.remote_count(node.node_id),
                        "direction": "",
                        "version": node.version,
                        "hash_warning": node.hash_warning,
                    }
                )
        return {"peers": peers}


def _short(value: Any, default: str, limit: int = 128) -> str:
    return value[:limit] if isinstance(value, str) else default
