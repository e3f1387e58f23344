"""Federation service (spec/discovery-peers.md, "Peer links"): which hubs of one project link.

:class:`PeerService` decides which hubs link (discovered nodes and ``peers.static`` entries,
:class:`StaticPeer` / :func:`parse_static`), runs one ClientService per dial target, keeps the
links and the devices peers own, exports local devices to peers, and attaches itself to the hub
(``hub.attach_peers``) for peer_list, broadcast_to_peers, send_to_peer and, unless
``peers.accept = false``, as the acceptor of inbound peer links.

The handshake codec and static entries are :mod:`robonet.protocols.peering`; the links (PeerLink,
RemoteLink) are :mod:`robonet.services.peerlink`, the connections (the dialling and accepting
sides) :mod:`robonet.services.peerconn`. Neither imports this module.

Why over 600 lines: it is one class whose parts (link policy, diallers, the remote-device table,
what is exported, peer_list) all work on the same ``links``/``diallers``/``remote`` tables; split
apart, each piece would have to reach into the others' tables.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from robonet.config import Config
from robonet.interfaces import PeerHub
from robonet.model import BULK_DATA_TYPES, Event, Priority
from robonet.node import NodeIdentity
from robonet.protocols.botlink import encode_obj
from robonet.protocols.peering import DUPLICATE, StaticPeer, parse_static
from robonet.registry import Device
from robonet.services.peerconn import Dialler, PeerClientFactory, PeerClientProtocol, ResponderHandler
from robonet.services.peerlink import PeerLink, RemoteLink

__all__ = ["PeerService", "StaticPeer", "parse_static"]

MAX_REMOTE_DEVICES = 4096
SNAPSHOT_CHUNK = 256 * 1024
MAX_LATEST_EXPORT = 64 * 1024
DEVICE_OPS = {"device_up": "up", "device_down": "down", "device_update": "update"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# --- the service ----------------------------------------------------------------------------------


class PeerService(Service):
    """Federation: which hubs link, the links, remote devices, forwarding (spec/discovery-peers.md).

    ``config``: the whole Config (``peers``, ``botlink`` limits); ``hub``: the Hub (this service
    is attached to it with ``hub.attach_peers`` while running); ``node``: our identity;
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
        hub: PeerHub,
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
        self.hub.attach_peers(self)
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
        self.hub.detach_peers(self)
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
        self._static_hosts.add(host)
        if isIPAddress(host) or isIPv6Address(host):
            return
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

    def _start_client(self, dialler: Dialler) -> bool:
        """Start (or restart) dialling ``dialler``'s target; False when no endpoint can be built."""
        try:
            endpoint = self._endpoint_factory(dialler)
        except (OSError, ValueError) as e:
            self.log.error("peer {key}: cannot set up the connection: {error}", key=dialler.key, error=e)
            return False
        dialler.client = ClientService(
            endpoint, PeerClientFactory(self, dialler), retryPolicy=self.retry_policy, clock=self.reactor
        )
        dialler.state = "connecting"
        dialler.client.startService()
        return True

    def _add_dialler(self, dialler: Dialler) -> None:
        self.diallers[dialler.key] = dialler  # before the first connection attempt can report back
        if not self._start_client(dialler):
            del self.diallers[dialler.key]
            return
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
                self._start_client(dialler)

    # -- the acceptor hook (hub.peer_acceptor) --

    @property
    def acceptor(self) -> PeerService | None:
        """This service when it accepts inbound peer links (``peers.accept``), else None."""
        return self if self.config.peers.accept else None

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
