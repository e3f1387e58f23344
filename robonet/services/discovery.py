"""UDP broadcast discovery and mDNS/DNS-SD registration (spec/discovery-peers.md).

Three parts:

- a pure codec, :func:`encode_announcement` / :func:`decode_announcement`, for the
  ``node_discovery`` datagram ("UDP broadcast discovery (port 8890)");
- :class:`DiscoveryProtocol`, a thin DatagramProtocol that feeds datagrams to the service;
- :class:`DiscoveryService`, which owns the UDP port, the announcer, the interface watcher, the
  table of known nodes (:class:`KnownNode`) and the mDNS registration.

The listener never replies to a datagram (so a reply can never be larger than what caused it:
HARDENING.md, udp rows); it only announces on its own schedule.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import orjson
from twisted.application.service import Service
from twisted.internet import defer, error, threads
from twisted.internet.abstract import isIPAddress
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet import PROTO_VERSION
from robonet.config import Config
from robonet.model import iso_utc
from robonet.node import NodeIdentity

MAX_DATAGRAM = 8192
# The UDP socket reads up to this many bytes so that an oversized datagram is seen (and counted)
# as oversized instead of arriving silently truncated to MAX_DATAGRAM.
READ_SIZE = 65536
INTERFACE_POLL_S = 3.0
DROP_LOG_S = 10.0
EXPIRY_INTERVALS = 3
SERVICE_TYPE = "_robonet._tcp.local."

# Drop reasons; the service counts each as hub.stats.drop("udp_" + reason).
GARBAGE = "garbage"
OVERSIZE = "oversize"
NOT_OBJECT = "not_object"
WRONG_TYPE = "wrong_type"
BAD_FIELD = "bad_field"
OWN_NODE = "own_node"
OTHER_PROJECT = "other_project"
INCOMPATIBLE = "incompatible"
HASH_MISMATCH = "hash_mismatch"

_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,64}\Z")
_PROTO_RE = re.compile(r"robonet/(\d{1,6})(?:\.\d{1,6})*\Z")


class DiscoveryError(Exception):
    """A datagram that is not a usable announcement. ``reason`` is one of the drop reasons above."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@attrs.frozen
class Announcement:
    """A decoded, validated ``node_discovery`` datagram (spec/discovery-peers.md).

    ``port`` is the sender's bot link port (0 = none); ``ports`` maps face names to a port or a list
    of ports; ``hash_warning`` is True when the sender's source hash differs from ours and the
    configuration does not require equal hashes (shown as a warning, not rejected).
    """

    node_id: str
    hash: str
    ip: str
    port: int
    name: str
    protocols: tuple[str, ...]
    project_id: str
    version: str
    ports: dict[str, Any]
    timestamp: str
    hash_warning: bool = False


def encode_announcement(
    node: NodeIdentity, *, ip: str, port: int, ports: dict[str, Any], now: float
) -> bytes:
    """Encode this hub's announcement as sent from ``ip`` (the sender's address on that interface).

    ``port`` is the bot link port, ``ports`` the listening ports by face
    (``{"botlink":5100,"line":5555,"http":8000,"camera":[5000,5001,5002]}``), ``now`` Unix seconds.
    Returns the UTF-8 JSON datagram (well under :data:`MAX_DATAGRAM` for sane names).
    """
    return orjson.dumps(
        {
            "type": "node_discovery",
            "node_id": node.node_id,
            "hash": node.hash,
            "ip": ip,
            "port": port,
            "name": node.name,
            "protocols": [f"robonet/{PROTO_VERSION}", f"PROJECT:{node.project_id}"],
            "project_id": node.project_id,
            "version": node.version,
            "ports": ports,
            "timestamp": iso_utc(now),
        }
    )


def _text(obj: dict[str, Any], key: str, limit: int, *, required: bool = True, empty: bool = False) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DiscoveryError(BAD_FIELD, f"{key}: expected a string")
    if len(value) > limit or (not value and not empty) or not value.isprintable():
        raise DiscoveryError(BAD_FIELD, f"{key}: invalid")
    return value


def _port_value(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535


def _ports(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise DiscoveryError(BAD_FIELD, "ports: expected an object of ports")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if len(key) > 32:
            raise DiscoveryError(BAD_FIELD, "ports: name too long")
        if _port_value(item):
            out[key] = item
        elif isinstance(item, list) and len(item) <= 8 and all(_port_value(p) for p in item):
            out[key] = list(item)
        else:
            raise DiscoveryError(BAD_FIELD, f"ports.{key}: expected a port or a list of ports")
    return out


def _protocol_major(protocols: Iterable[str]) -> set[int]:
    majors = set()
    for proto in protocols:
        match = _PROTO_RE.match(proto)
        if match:
            majors.add(int(match.group(1)))
    return majors


def decode_announcement(
    data: bytes,
    *,
    own_node_id: str,
    project_id: str,
    require_same_hash: bool,
    own_hash: str,
) -> Announcement:
    """Decode and check one datagram (spec/discovery-peers.md, listener rules).

    Raises :class:`DiscoveryError` with ``reason``: ``oversize`` (> 8 KiB), ``garbage`` (empty, not
    UTF-8 JSON, nested deeper than orjson's limit), ``not_object``, ``wrong_type`` (``type`` is not
    ``node_discovery``), ``bad_field`` (a required field missing or invalid), ``own_node``,
    ``other_project``, ``incompatible`` (no ``robonet/<major>`` protocol equal to ours) or
    ``hash_mismatch`` (hashes differ and ``require_same_hash``). A hash mismatch otherwise gives an
    Announcement with ``hash_warning=True``.
    """
    if len(data) > MAX_DATAGRAM:
        raise DiscoveryError(OVERSIZE, f"{len(data)} bytes")
    if not data:
        raise DiscoveryError(GARBAGE, "empty datagram")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise DiscoveryError(GARBAGE, f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DiscoveryError(NOT_OBJECT, "top level is not an object")
    if obj.get("type") != "node_discovery":
        raise DiscoveryError(WRONG_TYPE, "type is not node_discovery")
    node_id = _text(obj, "node_id", 64)
    if not _NODE_ID_RE.match(node_id):
        raise DiscoveryError(BAD_FIELD, "node_id: invalid")
    node_hash = _text(obj, "hash", 64)
    if not _HEX_RE.match(node_hash):
        raise DiscoveryError(BAD_FIELD, "hash: expected hex")
    ip = _text(obj, "ip", 64)
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise DiscoveryError(BAD_FIELD, "ip: not an IP address") from None
    port = obj.get("port")
    if not isinstance(port, int) or not _port_value(port):
        raise DiscoveryError(BAD_FIELD, "port: expected an integer 0..65535")
    name = _text(obj, "name", 128, empty=True)
    protocols = obj.get("protocols")
    if (
        not isinstance(protocols, list)
        or len(protocols) > 32
        or not all(isinstance(p, str) and len(p) <= 128 for p in protocols)
    ):
        raise DiscoveryError(BAD_FIELD, "protocols: expected a list of strings")
    other_project = _text(obj, "project_id", 128)
    version = _text(obj, "version", 32)
    ports = _ports(obj.get("ports"))
    timestamp = _text(obj, "timestamp", 64, required=False, empty=True)
    if node_id == own_node_id:
        raise DiscoveryError(OWN_NODE, "own announcement")
    if other_project != project_id:
        raise DiscoveryError(OTHER_PROJECT, f"project {other_project!r}")
    if PROTO_VERSION not in _protocol_major(protocols):
        raise DiscoveryError(INCOMPATIBLE, f"protocols {protocols!r}")
    warning = node_hash.lower() != own_hash.lower()
    if warning and require_same_hash:
        raise DiscoveryError(HASH_MISMATCH, f"hash {node_hash} != {own_hash}")
    return Announcement(
        node_id=node_id,
        hash=node_hash,
        ip=ip,
        port=port,
        name=name,
        protocols=tuple(protocols),
        project_id=other_project,
        version=version,
        ports=ports,
        timestamp=timestamp,
        hash_warning=warning,
    )


# --- network interfaces ----------------------------------------------------------------------


@attrs.frozen
class Interface:
    """One IPv4 address of a network interface: ``ip`` with ``prefix`` bits of network."""

    name: str
    ip: str
    prefix: int

    @property
    def is_loopback(self) -> bool:
        return ipaddress.IPv4Address(self.ip).is_loopback

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.ip}/{self.prefix}").network

    @property
    def broadcast(self) -> str | None:
        """The directed broadcast address, or None for loopback and /31, /32 networks."""
        if self.is_loopback or self.prefix >= 31:
            return None
        return str(self.network.broadcast_address)


def system_interfaces() -> list[Interface]:
    """The host's IPv4 interface addresses (ifaddr), in the order the system lists them."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and 0 <= ip.network_prefix <= 32:
                out.append(Interface(name=str(adapter.name), ip=ip.ip, prefix=int(ip.network_prefix)))
    return out


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` -> (host, port). Raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host, port = text, default_port
    if not host or not 0 < port < 65536:
        raise ValueError(text)
    return host, port


def static_peer_host(entry: str) -> str | None:
    """The host of a ``peers.static`` entry (``host:port``, ``tcp:host:port``, ``ssl:host:port[:opts]``)."""
    parts = entry.strip().split(":")
    if parts and parts[0] in ("tcp", "ssl"):
        parts = parts[1:]
    if not parts or not parts[0]:
        return None
    host = parts[0]
    return host.removeprefix("host=")


def endpoint_port(descs: Iterable[str]) -> int | None:
    """The port of the first ``tcp:``/``ssl:`` endpoint string in ``descs`` (None if there is none)."""
    for desc in descs:
        parts = desc.split(":")
        if parts[0] not in ("tcp", "ssl", "tcp6") or len(parts) < 2:
            continue
        for part in parts[1:]:
            value = part.removeprefix("port=")
            if value.isdigit():
                return int(value)
    return None


def configured_ports(config: Config) -> dict[str, Any]:
    """Face ports for the announcement, read from the listen endpoints in ``config``."""
    ports: dict[str, Any] = {}
    for key, descs in (
        ("botlink", config.botlink.listen),
        ("line", config.line.listen),
        ("http", config.web.listen),
    ):
        port = endpoint_port(descs)
        if port is not None:
            ports[key] = port
    if config.camera.enabled:
        camera = [
            endpoint_port([d])
            for d in (config.camera.data_listen, config.camera.settings_listen, config.camera.auth_listen)
        ]
        if all(p is not None for p in camera):
            ports["camera"] = camera
    return ports


# --- the peer table ----------------------------------------------------------------------------


@attrs.define(slots=True)
class KnownNode:
    """A hub heard on the network.

    ``address`` is the source address of its latest datagram (what peers dial), ``ip`` the address
    it announced; ``port`` its bot link port; times are hub time (Unix seconds).
    """

    node_id: str
    name: str
    project_id: str
    version: str
    hash: str
    ip: str
    address: str
    port: int
    ports: dict[str, Any]
    first_seen: float
    last_seen: float
    hash_warning: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-able record for the API and dashboard."""
        return {
            "node_id": self.node_id,
            "name": self.name,
            "project_id": self.project_id,
            "version": self.version,
            "hash": self.hash,
            "ip": self.ip,
            "address": self.address,
            "port": self.port,
            "ports": self.ports,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "hash_warning": self.hash_warning,
        }


NodeObserver = Callable[[str, KnownNode], object]


class DiscoveryProtocol(DatagramProtocol):
    """Thin datagram protocol: hands every datagram to the service."""

    def __init__(self, service: DiscoveryService) -> None:
        self.service = service

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.service.datagram_received(datagram, addr)


def _default_defer_to_thread(reactor: Any) -> Callable[[Callable[[], Any]], defer.Deferred[Any]]:
    def run(fn: Callable[[], Any]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn)

    return run


class DiscoveryService(Service):
    """UDP discovery (announcer, listener, known-node table) plus mDNS registration.

    ``config``: the whole Config (``discovery``, ``peers``, listen addresses); ``hub``: the Hub
    (``hub.stats.drop`` counts dropped datagrams as ``udp_<reason>``); ``node``: this hub's
    identity; ``reactor``: provides IReactorTime and ``listenMulticast`` (UDP with SO_REUSEADDR).
    Optional seams: ``interfaces()`` lists IPv4 interfaces (default ifaddr), ``ports()`` returns
    the face ports to announce (default: from the config's listen strings; the tap passes the
    bound ports), ``zeroconf_factory()`` builds a zeroconf.Zeroconf, ``defer_to_thread(fn)`` runs
    blocking zeroconf calls off the reactor thread.

    Observers (:meth:`observe`) get ``("node_found" | "node_updated" | "node_lost", KnownNode)``.
    """

    log = Logger()
    name = "discovery"

    def __init__(
        self,
        config: Config,
        hub: Any,
        node: NodeIdentity,
        reactor: Any,
        *,
        interfaces: Callable[[], list[Interface]] = system_interfaces,
        ports: Callable[[], dict[str, Any]] | None = None,
        zeroconf_factory: Callable[[], Any] | None = None,
        defer_to_thread: Callable[[Callable[[], Any]], defer.Deferred[Any]] | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        self.node = node
        self.reactor = reactor
        self._interfaces_fn = interfaces
        self._ports_fn = ports or (lambda: configured_ports(config))
        self._zeroconf_factory = zeroconf_factory
        self._defer_to_thread = defer_to_thread or _default_defer_to_thread(reactor)
        self.nodes: dict[str, KnownNode] = {}
        self.port: Any = None  # twisted.internet.udp.MulticastPort
        self._observers: list[NodeObserver] = []
        self._interfaces: list[Interface] = []
        self._announce_loop: LoopingCall | None = None
        self._watch_loop: LoopingCall | None = None
        self._mdns: defer.Deferred[Any] | None = None
        self._zeroconf: Any = None
        self._service_info: Any = None
        self.sent = 0
        self.received = 0
        self._drop_log: dict[str, tuple[float | None, int]] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> None:
        """Bind UDP ``discovery.port`` (SO_REUSEADDR, broadcast allowed), start announcing and mDNS.

        A port that cannot be bound raises (startup fails loudly, like a taken TCP port).
        """
        super().startService()  # type: ignore[no-untyped-call]
        cfg = self.config.discovery
        self.port = self.reactor.listenMulticast(
            cfg.port, DiscoveryProtocol(self), maxPacketSize=READ_SIZE, listenMultiple=True
        )
        self.port.setBroadcastAllowed(True)
        self._interfaces = self._read_interfaces()
        self._announce_loop = LoopingCall(self.tick)
        self._announce_loop.clock = self.reactor
        self._announce_loop.start(cfg.interval, now=True).addErrback(self._loop_failed, "announce")
        self._watch_loop = LoopingCall(self.check_interfaces)
        self._watch_loop.clock = self.reactor
        self._watch_loop.start(INTERFACE_POLL_S, now=False).addErrback(self._loop_failed, "interfaces")
        if cfg.mdns:
            self._mdns = self._defer_to_thread(self._mdns_register)
            self._mdns.addErrback(self._mdns_failed)

    def stopService(self) -> defer.Deferred[None]:
        """Stop announcing, close the UDP port and withdraw the mDNS service (goodbye packets)."""
        super().stopService()  # type: ignore[no-untyped-call]
        for loop in (self._announce_loop, self._watch_loop):
            if loop is not None and loop.running:
                loop.stop()
        waits: list[defer.Deferred[Any]] = []
        if self.port is not None:
            result = self.port.stopListening()
            if isinstance(result, defer.Deferred):
                waits.append(result)
            self.port = None
        if self._mdns is not None:
            mdns, self._mdns = self._mdns, None
            mdns.addCallback(lambda _: self._defer_to_thread(self._mdns_unregister))
            mdns.addErrback(self._mdns_failed)
            waits.append(mdns)
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def _loop_failed(self, failure: Failure, which: str) -> None:
        self.log.failure("discovery {which} loop stopped", failure, which=which)

    # --- observers and table -----------------------------------------------------------------

    def observe(self, fn: NodeObserver) -> None:
        """Call ``fn(event, node)`` on node_found, node_updated and node_lost."""
        self._observers.append(fn)

    def _emit(self, event: str, node: KnownNode) -> None:
        for fn in list(self._observers):
            try:
                fn(event, node)
            except Exception:  # one faulty observer must not stop the others
                self.log.failure("discovery observer failed on {event}", event=event)

    def known_nodes(self) -> list[KnownNode]:
        """Currently known (unexpired) nodes, oldest first."""
        return list(self.nodes.values())

    def expire(self, now: float) -> None:
        """Forget nodes not heard for more than 3 announcement intervals; emit node_lost."""
        limit = EXPIRY_INTERVALS * self.config.discovery.interval
        for node_id, node in list(self.nodes.items()):
            if now - node.last_seen > limit:
                del self.nodes[node_id]
                self.log.info("node {node_id} ({name}) lost", node_id=node_id, name=node.name)
                self._emit("node_lost", node)

    # --- receiving ---------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Decode one datagram; count and drop bad ones, update the table with good ones."""
        self.received += 1
        try:
            ann = decode_announcement(
                data,
                own_node_id=self.node.node_id,
                project_id=self.node.project_id,
                require_same_hash=self.config.peers.require_same_hash,
                own_hash=self.node.hash,
            )
        except DiscoveryError as e:
            if e.reason != OWN_NODE:
                self.hub.stats.drop("udp_" + e.reason)
                self._log_drop(e, addr)
            return
        self.hub.stats.count_in("node_discovery", len(data))
        self.accept(ann, str(addr[0]), self.reactor.seconds())

    def _log_drop(self, e: DiscoveryError, addr: Any) -> None:
        """Log a dropped datagram at debug level, at most once per reason every DROP_LOG_S (a flood
        must not turn into a flood of log events); the counters have the totals."""
        now = self.reactor.seconds()
        last, suppressed = self._drop_log.get(e.reason, (None, 0))
        if last is not None and now - last < DROP_LOG_S:
            self._drop_log[e.reason] = (last, suppressed + 1)
            return
        self._drop_log[e.reason] = (now, 0)
        self.log.debug(
            "dropped datagram from {addr}: {error} ({suppressed} more like it not logged)",
            addr=addr,
            error=e.message,
            suppressed=suppressed,
        )

    def accept(self, ann: Announcement, address: str, now: float) -> KnownNode:
        """Record a valid announcement received from ``address`` at ``now``; emit events."""
        known = self.nodes.get(ann.node_id)
        if known is None:
            known = KnownNode(
                node_id=ann.node_id,
                name=ann.name,
                project_id=ann.project_id,
                version=ann.version,
                hash=ann.hash,
                ip=ann.ip,
                address=address,
                port=ann.port,
                ports=ann.ports,
                first_seen=now,
                last_seen=now,
                hash_warning=ann.hash_warning,
            )
            self.nodes[ann.node_id] = known
            if ann.hash_warning:
                self.log.warn(
                    "node {node_id} ({name}) runs different robonet sources (hash {hash}, ours {own})",
                    node_id=ann.node_id,
                    name=ann.name,
                    hash=ann.hash,
                    own=self.node.hash,
                )
            self.log.info(
                "node {node_id} ({name}) found at {address}:{port}",
                node_id=ann.node_id,
                name=ann.name,
                address=address,
                port=ann.port,
            )
            self._emit("node_found", known)
            return known
        changed = (known.address, known.port, known.hash, known.name, known.version, known.ip) != (
            address,
            ann.port,
            ann.hash,
            ann.name,
            ann.version,
            ann.ip,
        )
        known.last_seen = now
        if changed:
            known.address, known.port, known.hash = address, ann.port, ann.hash
            known.name, known.version, known.ip = ann.name, ann.version, ann.ip
            known.ports, known.hash_warning = ann.ports, ann.hash_warning
            self._emit("node_updated", known)
        return known

    # --- announcing --------------------------------------------------------------------------

    def tick(self) -> None:
        """One announcement round plus expiry (runs every ``discovery.interval``)."""
        self.expire(self.reactor.seconds())
        self.announce()

    def _read_interfaces(self) -> list[Interface]:
        try:
            return list(self._interfaces_fn())
        except Exception:  # keep the last known interfaces
            self.log.failure("cannot list network interfaces")
            return list(self._interfaces)

    def check_interfaces(self) -> bool:
        """Poll the interfaces; on any change announce at once (and refresh mDNS). Returns changed."""
        current = self._read_interfaces()
        if set(current) == set(self._interfaces):
            return False
        self.log.info(
            "network interfaces changed: {addresses}",
            addresses=[f"{i.name}:{i.ip}/{i.prefix}" for i in current],
        )
        self._interfaces = current
        self.announce()
        if self._zeroconf is not None and self._mdns is not None:
            self._mdns.addCallback(lambda _: self._defer_to_thread(self._mdns_update))
            self._mdns.addErrback(self._mdns_failed)
        return True

    def _primary_ip(self) -> str:
        for iface in self._interfaces:
            if not iface.is_loopback:
                return iface.ip
        return "127.0.0.1"

    def _source_ip_for(self, host: str) -> str:
        """Our address on the interface that reaches ``host`` (best guess from the netmasks)."""
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            return self._primary_ip()
        if addr.is_loopback:
            return "127.0.0.1"
        for iface in self._interfaces:
            if addr in iface.network:
                return iface.ip
        return self._primary_ip()

    def targets(self) -> list[tuple[str, int, str]]:
        """Where this round goes: ``(host, port, announced_ip)``, hosts possibly names, no duplicates.

        255.255.255.255 and every interface's broadcast address (unless ``broadcast_addresses`` is
        set, which replaces them), each ``broadcast_addresses`` entry (``host`` or ``host:port``)
        and each static peer's host, on ``discovery.port`` unless given.
        """
        cfg = self.config.discovery
        out: list[tuple[str, int, str]] = []
        if not cfg.broadcast_addresses:
            out.append(("255.255.255.255", cfg.port, self._primary_ip()))
            for iface in self._interfaces:
                if iface.broadcast:
                    out.append((iface.broadcast, cfg.port, iface.ip))
        for entry in cfg.broadcast_addresses:
            try:
                host, port = _split_host_port(entry, cfg.port)
            except ValueError:
                self.log.warn("discovery.broadcast_addresses: cannot use {entry!r}", entry=entry)
                continue
            out.append((host, port, self._source_ip_for(host)))
        for entry in self.config.peers.static:
            peer_host = static_peer_host(entry)
            if peer_host:
                out.append((peer_host, cfg.port, self._source_ip_for(peer_host)))
        seen = set()
        unique = []
        for item in out:
            if item[:2] not in seen:
                seen.add(item[:2])
                unique.append(item)
        return unique

    def announce(self) -> None:
        """Send one announcement to every target now. Send errors are logged, never raised."""
        if self.port is None:
            return
        ports = self._ports_fn()
        botlink = ports.get("botlink", 0)
        now = self.reactor.seconds()
        encoded: dict[str, bytes] = {}
        for host, port, ip in self.targets():
            data = encoded.get(ip)
            if data is None:
                data = encoded[ip] = encode_announcement(self.node, ip=ip, port=botlink, ports=ports, now=now)
            if isIPAddress(host):
                self._send(data, host, port)
            else:
                d = self.reactor.resolve(host)
                d.addCallbacks(
                    lambda addr, data=data, port=port: self._send(data, addr, port),
                    lambda f, host=host: self.log.debug(
                        "cannot resolve {host}: {error}", host=host, error=f.getErrorMessage()
                    ),
                )

    def _send(self, data: bytes, host: str, port: int) -> None:
        if self.port is None:
            return
        try:
            self.port.write(data, (host, port))
        except (OSError, error.MessageLengthError, error.InvalidAddressError) as e:
            self.log.debug("cannot announce to {host}:{port}: {error}", host=host, port=port, error=e)
            return
        self.sent += 1
        self.hub.stats.count_out("node_discovery", len(data))

    # --- mDNS / DNS-SD (runs in a thread: zeroconf's calls block) ------------------------------

    def _service_info_now(self) -> Any:
        from zeroconf import ServiceInfo

        ports = self._ports_fn()
        label = re.sub(r"[^A-Za-z0-9 _-]", "-", self.node.name)[:40] or "robonet"
        instance = f"{label}-{self.node.node_id[:8]}"
        addresses = [i.ip for i in self._interfaces if not i.is_loopback] or ["127.0.0.1"]
        return ServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            port=ports.get("botlink", 0),
            properties={
                "node_id": self.node.node_id,
                "project": self.node.project_id,
                "version": self.node.version,
                "http": str(ports.get("http", "")),
            },
            server=f"robonet-{self.node.node_id[:8]}.local.",
            parsed_addresses=addresses,
        )

    def _mdns_register(self) -> None:
        factory = self._zeroconf_factory
        if factory is None:
            from zeroconf import IPVersion, Zeroconf

            def factory() -> Any:
                return Zeroconf(ip_version=IPVersion.V4Only)

        zc = factory()
        info = self._service_info_now()
        try:
            zc.register_service(info, allow_name_change=True)
        except BaseException:
            zc.close()
            raise
        self._zeroconf, self._service_info = zc, info
        self.log.info("mDNS: registered {name}", name=info.name)

    def _mdns_update(self) -> None:
        zc = self._zeroconf
        if zc is None:
            return
        info = self._service_info_now()
        info.name = self._service_info.name  # keep the (possibly renamed) instance name
        zc.update_service(info)
        self._service_info = info

    def _mdns_unregister(self) -> None:
        zc, info = self._zeroconf, self._service_info
        self._zeroconf = self._service_info = None
        if zc is None:
            return
        try:
            zc.unregister_service(info)
        finally:
            zc.close()

    def _mdns_failed(self, failure: Failure) -> None:
        self.log.warn(
            "mDNS registration failed (discovery continues over UDP): {error}",
            error=failure.getErrorMessage(),
        )
