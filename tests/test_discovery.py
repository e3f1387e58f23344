"""UDP discovery: the node_discovery codec, the listener's validation, the announcer, the known-node
table and its expiry, mDNS registration, and one real UDP round trip on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import capturedLogs
from twisted.trial import unittest

import robonet
from robonet.config import Config, load_config
from robonet.hub import Hub
from robonet.node import NodeIdentity, load_node_identity, source_files, source_hash
from robonet.services import discovery
from robonet.services.discovery import (
    DiscoveryError,
    DiscoveryService,
    Interface,
    decode_announcement,
    encode_announcement,
)

OWN = NodeIdentity("11111111-1111-4111-8111-111111111111", "hub-a", "lab", "0123456789abcdef", "0.1.0")
OTHER = NodeIdentity("22222222-2222-4222-8222-222222222222", "hub-b", "lab", "0123456789abcdef", "0.1.0")
PORTS = {"botlink": 5100, "line": 5555, "http": 8000, "camera": [5000, 5001, 5002]}


def announcement(**changes: Any) -> dict[str, Any]:
    """A valid announcement from OTHER as a dict, with ``changes`` applied (None removes a key)."""
    obj = orjson.loads(encode_announcement(OTHER, ip="192.168.1.20", port=5100, ports=PORTS, now=1.7e9))
    for key, value in changes.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def decode(data: bytes, require_same_hash: bool = False, own_hash: str = OWN.hash) -> discovery.Announcement:
    return decode_announcement(
        data,
        own_node_id=OWN.node_id,
        project_id="lab",
        require_same_hash=require_same_hash,
        own_hash=own_hash,
    )


class NodeIdentityTests(unittest.SynchronousTestCase):
    def test_node_id_created_once_and_kept(self) -> None:
        """The first load creates <state_dir>/node_id (a uuid4); later loads return the same id."""
        state = Path(self.mktemp()) / "nested" / "state"
        first = load_node_identity(state, "hub-a", "lab")
        self.assertEqual((state / "node_id").read_text().strip(), first.node_id)
        self.assertEqual(len(first.node_id), 36)
        second = load_node_identity(state, "hub-a", "lab")
        self.assertEqual(second.node_id, first.node_id)
        self.assertEqual(first.version, robonet.__version__)
        self.assertEqual((first.name, first.project_id), ("hub-a", "lab"))
        self.assertEqual([p.name for p in state.iterdir()], ["node_id"])  # no temp file left over

    def test_corrupt_node_id_replaced(self) -> None:
        """A node_id file that is not a uuid is replaced by a fresh id."""
        state = Path(self.mktemp())
        state.mkdir()
        (state / "node_id").write_text("garbage\x00")
        ident = load_node_identity(state, "n", "p")
        self.assertNotEqual(ident.node_id, "garbage")
        self.assertEqual((state / "node_id").read_text().strip(), ident.node_id)

    def test_source_hash_rule(self) -> None:
        """The hash covers *.py contents in sorted relative-path order, skipping __init__ and __pycache__."""
        root = Path(self.mktemp())
        (root / "pkg" / "__pycache__").mkdir(parents=True)
        (root / "b.py").write_bytes(b"B")
        (root / "pkg" / "a.py").write_bytes(b"PA")
        (root / "a.py").write_bytes(b"A")
        (root / "__init__.py").write_bytes(b"INIT")
        (root / "pkg" / "__pycache__" / "c.py").write_bytes(b"C")
        (root / "notes.txt").write_bytes(b"T")
        self.assertEqual(
            [p.relative_to(root).as_posix() for p in source_files(root)], ["a.py", "b.py", "pkg/a.py"]
        )
        import hashlib

        self.assertEqual(source_hash(root), hashlib.sha256(b"ABPA").hexdigest()[:16])
        (root / "b.py").write_bytes(b"b")
        self.assertNotEqual(source_hash(root), hashlib.sha256(b"ABPA").hexdigest()[:16])

    def test_real_source_hash(self) -> None:
        """robonet's own hash is 16 hex chars and includes this module's package files."""
        h = source_hash()
        self.assertEqual(len(h), 16)
        int(h, 16)
        names = [p.name for p in source_files()]
        self.assertIn("node.py", names)
        self.assertNotIn("__init__.py", names)


class CodecTests(unittest.SynchronousTestCase):
    def test_encode_shape(self) -> None:
        """The datagram carries exactly the spec's fields."""
        obj = orjson.loads(encode_announcement(OWN, ip="10.0.0.5", port=5100, ports=PORTS, now=0.0))
        self.assertEqual(
            obj,
            {
                "type": "node_discovery",
                "node_id": OWN.node_id,
                "hash": OWN.hash,
                "ip": "10.0.0.5",
                "port": 5100,
                "name": "hub-a",
                "protocols": ["robonet/1", "PROJECT:lab"],
                "project_id": "lab",
                "version": "0.1.0",
                "ports": PORTS,
                "timestamp": "1970-01-01T00:00:00.000000+00:00",
            },
        )

    def test_round_trip(self) -> None:
        """A valid announcement from another node of the project decodes to its fields."""
        ann = decode(orjson.dumps(announcement()))
        self.assertEqual(ann.node_id, OTHER.node_id)
        self.assertEqual((ann.ip, ann.port, ann.name, ann.project_id), ("192.168.1.20", 5100, "hub-b", "lab"))
        self.assertEqual(ann.ports, PORTS)
        self.assertFalse(ann.hash_warning)

    def assertReason(self, data: bytes, reason: str, **kw: Any) -> None:
        with self.assertRaises(DiscoveryError) as cm:
            decode(data, **kw)
        self.assertEqual(cm.exception.reason, reason, cm.exception.message)

    def test_oversize(self) -> None:
        """Datagrams over 8 KiB are rejected as oversize, even if they are valid JSON."""
        big = announcement(name="x" * 100)
        big["padding"] = "y" * 9000
        self.assertReason(orjson.dumps(big), "oversize")
        self.assertReason(b"\x00" * 65507, "oversize")

    def test_garbage(self) -> None:
        """Empty, random bytes, invalid UTF-8, truncated JSON and too-deep JSON are garbage."""
        valid = orjson.dumps(announcement())
        for data in (
            b"",
            b"\xff\xfe\x00garbage",
            valid[:-5],
            b'{"type":"node_discovery","name":"\xff"}',
            b"[" * 2000 + b"]" * 2000,
            b'{"a":' * 1100 + b"1" + b"}" * 1100,
        ):
            self.assertReason(data, "garbage")

    def test_not_object(self) -> None:
        """JSON that is not an object is rejected as not_object."""
        for data in (b"[]", b"1", b'"x"', b"null", b"true"):
            self.assertReason(data, "not_object")

    def test_wrong_type(self) -> None:
        """Objects without type node_discovery are rejected as wrong_type."""
        for obj in (announcement(type=None), announcement(type="hello"), announcement(type=5), {}):
            self.assertReason(orjson.dumps(obj), "wrong_type")

    def test_missing_fields(self) -> None:
        """Every required field must be present."""
        for key in ("node_id", "hash", "ip", "port", "name", "protocols", "project_id", "version"):
            self.assertReason(orjson.dumps(announcement(**{key: None})), "bad_field")

    def test_invalid_fields(self) -> None:
        """Fields of the wrong type or shape are rejected as bad_field."""
        for change in (
            {"node_id": 7},
            {"node_id": "has space"},
            {"node_id": "x" * 65},
            {"node_id": ""},
            {"hash": "not-hex!"},
            {"hash": 12},
            {"ip": "999.1.1.1"},
            {"ip": "host.example"},
            {"port": -1},
            {"port": 70000},
            {"port": True},
            {"port": "5100"},
            {"port": 5100.5},
            {"protocols": "robonet/1"},
            {"protocols": [1, 2]},
            {"name": "x" * 200},
            {"name": "bad\nname"},
            {"project_id": ["lab"]},
            {"version": {}},
            {"ports": [5100]},
            {"ports": {"botlink": "5100"}},
            {"ports": {"camera": [5000, -1]}},
            {"timestamp": 5},
        ):
            self.assertReason(orjson.dumps(announcement(**change)), "bad_field")

    def test_optional_fields(self) -> None:
        """ports and timestamp may be absent (older announcers)."""
        ann = decode(orjson.dumps(announcement(ports=None, timestamp=None)))
        self.assertEqual((ann.ports, ann.timestamp), ({}, ""))

    def test_own_node(self) -> None:
        """Our own announcements (echoed by broadcast) are rejected as own_node."""
        self.assertReason(orjson.dumps(announcement(node_id=OWN.node_id)), "own_node")

    def test_other_project(self) -> None:
        """Announcements of another project are rejected."""
        self.assertReason(orjson.dumps(announcement(project_id="other")), "other_project")

    def test_incompatible(self) -> None:
        """The robonet protocol major version must match ours."""
        for protocols in (["robonet/2", "PROJECT:lab"], ["v1"], [], ["robonet/12"], ["robonet/x"]):
            self.assertReason(orjson.dumps(announcement(protocols=protocols)), "incompatible")
        ann = decode(orjson.dumps(announcement(protocols=["robonet/1.3", "PROJECT:lab"])))
        self.assertEqual(ann.protocols, ("robonet/1.3", "PROJECT:lab"))

    def test_hash_mismatch(self) -> None:
        """A different hash is rejected when required, otherwise accepted with a warning flag."""
        data = orjson.dumps(announcement(hash="ffffffffffffffff"))
        self.assertReason(data, "hash_mismatch", require_same_hash=True)
        self.assertTrue(decode(data).hash_warning)
        self.assertFalse(decode(orjson.dumps(announcement()), require_same_hash=True).hash_warning)


# --- the service, with a fake UDP reactor ------------------------------------------------------


class FakePort:
    """Stands in for twisted.internet.udp.MulticastPort: records writes."""

    def __init__(self, port: int, proto: Any, **kw: Any) -> None:
        self.port, self.proto, self.kw = port, proto, kw
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.broadcast = False
        self.listening = True
        self.fail_hosts: set[str] = set()

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast = enabled

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] in self.fail_hosts:
            raise OSError(101, "Network is unreachable")
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.listening = False


class FakeUDPReactor(task.Clock):
    """A Clock that can 'listen' on UDP and resolve names from a table."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []
        self.names: dict[str, str] = {}

    def listenMulticast(self, port: int, proto: Any, **kw: Any) -> FakePort:
        p = FakePort(port, proto, **kw)
        proto.makeConnection(p)
        self.ports.append(p)
        return p

    def resolve(self, name: str) -> defer.Deferred[str]:
        if name in self.names:
            return defer.succeed(self.names[name])
        return defer.fail(OSError(f"no such host {name}"))


LAN = [
    Interface("lo", "127.0.0.1", 8),
    Interface("eth0", "192.168.1.10", 24),
    Interface("wlan0", "10.1.0.7", 16),
]


def make_service(
    config: Config | None = None,
    interfaces: list[Interface] | None = None,
    zeroconf_factory: Any = None,
) -> tuple[DiscoveryService, Hub, FakeUDPReactor]:
    config = config or load_config(
        environ={}, overrides={"discovery": {"mdns": False}, "hub": {"project_id": "lab"}}
    )
    clock = FakeUDPReactor()
    hub = Hub(config, clock, node=OWN)
    current = list(LAN if interfaces is None else interfaces)
    svc = DiscoveryService(
        config,
        hub,
        OWN,
        clock,
        interfaces=lambda: current,
        ports=lambda: dict(PORTS),
        zeroconf_factory=zeroconf_factory,
        defer_to_thread=lambda fn: defer.maybeDeferred(fn),
    )
    svc.interfaces_list = current  # type: ignore[attr-defined]  # tests mutate it
    return svc, hub, clock


class ServiceTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.svc, self.hub, self.clock = make_service()
        self.events: list[tuple[str, str]] = []
        self.svc.observe(lambda ev, node: self.events.append((ev, node.node_id)))
        self.svc.startService()
        self.addCleanup(self.svc.stopService)
        self.port = self.clock.ports[0]

    def good(self, **changes: Any) -> bytes:
        return orjson.dumps(announcement(**changes))

    def test_listens_with_reuse_and_broadcast(self) -> None:
        """The UDP port is discovery.port, SO_REUSEADDR (listenMultiple), broadcast enabled, big reads."""
        self.assertEqual(self.port.port, 8890)
        self.assertTrue(self.port.kw["listenMultiple"])
        self.assertGreater(self.port.kw["maxPacketSize"], discovery.MAX_DATAGRAM)
        self.assertTrue(self.port.broadcast)

    def test_announces_at_start_to_every_broadcast_address(self) -> None:
        """At start one datagram goes to 255.255.255.255 and each interface's broadcast address, each
        naming our address on that interface; loopback gets none."""
        sent = {addr: orjson.loads(data) for data, addr in self.port.written}
        self.assertEqual(
            sorted(sent), [("10.1.255.255", 8890), ("192.168.1.255", 8890), ("255.255.255.255", 8890)]
        )
        self.assertEqual(sent[("192.168.1.255", 8890)]["ip"], "192.168.1.10")
        self.assertEqual(sent[("10.1.255.255", 8890)]["ip"], "10.1.0.7")
        self.assertEqual(sent[("255.255.255.255", 8890)]["ip"], "192.168.1.10")
        self.assertEqual(sent[("255.255.255.255", 8890)]["port"], 5100)
        self.assertEqual(sent[("255.255.255.255", 8890)]["ports"], PORTS)
        self.assertEqual(self.hub.stats.msgs_out["node_discovery"], 3)

    def test_announces_every_interval(self) -> None:
        """Announcements repeat every discovery.interval seconds."""
        self.port.written.clear()
        self.clock.advance(4.9)
        self.assertEqual(self.port.written, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.port.written), 3)

    def test_interface_change_announces_at_once(self) -> None:
        """A new interface address is noticed within the poll period and announced at once."""
        self.svc.stopService()
        config = load_config(environ={}, overrides={"discovery": {"mdns": False, "interval": 60}})
        self.svc, self.hub, self.clock = make_service(config)
        self.svc.startService()
        self.port = self.clock.ports[0]
        self.port.written.clear()
        self.svc.interfaces_list.append(Interface("usb0", "172.16.5.1", 24))  # type: ignore[attr-defined]
        self.clock.advance(discovery.INTERFACE_POLL_S)
        hosts = sorted(addr[0] for _, addr in self.port.written)
        self.assertEqual(hosts, ["10.1.255.255", "172.16.5.255", "192.168.1.255", "255.255.255.255"])
        self.port.written.clear()
        self.clock.advance(discovery.INTERFACE_POLL_S)
        self.assertEqual(self.port.written, [])  # no change, no extra announcement

    def test_send_errors_are_not_fatal(self) -> None:
        """An unreachable broadcast address is logged; the other addresses still get the datagram."""
        self.port.written.clear()
        self.port.fail_hosts.add("255.255.255.255")
        self.clock.advance(5)
        self.assertEqual(len(self.port.written), 2)

    def test_node_found_updated_and_expired(self) -> None:
        """A node is found on its first announcement, updated on change, and lost after 3 missed
        intervals (hub clock)."""
        self.svc.datagram_received(self.good(), ("192.168.1.20", 8890))
        self.assertEqual(self.events, [("node_found", OTHER.node_id)])
        node = self.svc.nodes[OTHER.node_id]
        self.assertEqual((node.address, node.port, node.name), ("192.168.1.20", 5100, "hub-b"))
        self.svc.datagram_received(self.good(), ("192.168.1.20", 8890))
        self.assertEqual(len(self.events), 1)  # same data: no event
        self.svc.datagram_received(self.good(port=5200), ("192.168.1.20", 8890))
        self.assertEqual(self.events[-1], ("node_updated", OTHER.node_id))
        self.assertEqual(node.port, 5200)
        self.clock.advance(15)
        self.assertIn(OTHER.node_id, self.svc.nodes)  # exactly 3 intervals: not yet
        self.clock.advance(5)
        self.assertNotIn(OTHER.node_id, self.svc.nodes)
        self.assertEqual(self.events[-1], ("node_lost", OTHER.node_id))

    def test_announcements_keep_node_alive(self) -> None:
        """A node that keeps announcing never expires."""
        for _ in range(10):
            self.svc.datagram_received(self.good(), ("192.168.1.20", 8890))
            self.clock.advance(5)
        self.assertIn(OTHER.node_id, self.svc.nodes)
        self.assertEqual([e for e, _ in self.events], ["node_found"])

    def test_bad_datagrams_counted_and_service_keeps_working(self) -> None:
        """Bad datagrams are dropped and counted by reason; a good one afterwards is accepted."""
        deep = b"[" * 100000 + b"]" * 100000
        for data in (
            b"",
            b"\xff" * 100,
            deep[:8000],
            b"[]",
            b'{"type":"x"}',
            b"A" * 65507,
            self.good(port="x"),
            self.good(project_id="zzz"),
            self.good(protocols=["robonet/9"]),
        ):
            self.svc.datagram_received(data, ("192.168.1.99", 1234))
        self.assertEqual(
            self.hub.stats.drops,
            {
                "udp_garbage": 3,
                "udp_not_object": 1,
                "udp_wrong_type": 1,
                "udp_oversize": 1,
                "udp_bad_field": 1,
                "udp_other_project": 1,
                "udp_incompatible": 1,
            },
        )
        self.assertEqual(self.svc.nodes, {})
        self.svc.datagram_received(self.good(), ("192.168.1.20", 8890))
        self.assertIn(OTHER.node_id, self.svc.nodes)

    def test_own_announcements_ignored_uncounted(self) -> None:
        """Hearing our own broadcast is normal: ignored, not counted as a drop."""
        for data, addr in list(self.port.written):
            self.svc.datagram_received(data, addr)
        self.assertEqual(self.hub.stats.drops, {})
        self.assertEqual(self.svc.nodes, {})

    def test_flood(self) -> None:
        """A flood of 10,000 garbage datagrams is counted (and logged once, not 10,000 times), does
        not stop discovery, and nothing is ever sent in reply."""
        self.port.written.clear()
        with capturedLogs() as logs:
            for i in range(10000):
                self.svc.datagram_received(b"%d garbage" % i, ("192.168.1.66", 4000 + i % 100))
        self.assertEqual(self.hub.stats.drops["udp_garbage"], 10000)
        self.assertEqual(len([e for e in logs if "dropped datagram" in e.get("log_format", "")]), 1)
        self.assertEqual(self.port.written, [])
        self.svc.datagram_received(self.good(), ("192.168.1.20", 8890))
        self.assertIn(OTHER.node_id, self.svc.nodes)

    def test_datagram_through_protocol(self) -> None:
        """The DatagramProtocol feeds the service."""
        self.port.proto.datagramReceived(self.good(), ("192.168.1.20", 8890))
        self.assertIn(OTHER.node_id, self.svc.nodes)

    def test_hash_warning_logged(self) -> None:
        """A node with a different source hash is accepted with a warning."""
        with capturedLogs() as logs:
            self.svc.datagram_received(self.good(hash="ffffffffffffffff"), ("192.168.1.20", 8890))
        self.assertTrue(self.svc.nodes[OTHER.node_id].hash_warning)
        self.assertTrue(any("different robonet sources" in str(e.get("log_format")) for e in logs))

    def test_stop(self) -> None:
        """Stopping closes the port and stops announcing."""
        self.svc.stopService()
        self.assertFalse(self.port.listening)
        self.port.written.clear()
        self.clock.advance(60)
        self.assertEqual(self.port.written, [])


class TargetTests(unittest.SynchronousTestCase):
    def test_configured_addresses_replace_broadcast(self) -> None:
        """broadcast_addresses (host or host:port) replace the interface broadcasts; static peers'
        hosts get the datagram on discovery.port; names are resolved."""
        config = load_config(
            environ={},
            overrides={
                "hub": {"project_id": "lab"},
                "discovery": {
                    "mdns": False,
                    "broadcast_addresses": ["127.0.0.1:9999", "192.168.1.77", "peerhost"],
                },
                "peers": {"static": ["10.1.2.3:5100", "ssl:host=peer.lan:port=5101", "tcp:192.168.1.5:5100"]},
            },
        )
        svc, _hub, clock = make_service(config)
        clock.names.update({"peerhost": "192.168.1.78", "peer.lan": "10.1.9.9"})
        svc.startService()
        sent = {addr: orjson.loads(data)["ip"] for data, addr in clock.ports[0].written}
        self.assertEqual(
            sent,
            {
                ("127.0.0.1", 9999): "127.0.0.1",
                ("192.168.1.77", 8890): "192.168.1.10",
                ("192.168.1.78", 8890): "192.168.1.10",
                ("10.1.2.3", 8890): "10.1.0.7",
                ("10.1.9.9", 8890): "192.168.1.10",
                ("192.168.1.5", 8890): "192.168.1.10",
            },
        )
        svc.stopService()

    def test_bad_configured_address(self) -> None:
        """An unusable broadcast_addresses entry is skipped (logged), the others still work."""
        config = load_config(
            environ={},
            overrides={"discovery": {"mdns": False, "broadcast_addresses": ["1.2.3.4:notaport", "1.2.3.5"]}},
        )
        svc, _hub, clock = make_service(config)
        svc.startService()
        self.assertEqual([addr for _, addr in clock.ports[0].written], [("1.2.3.5", 8890)])
        svc.stopService()

    def test_ports_from_config(self) -> None:
        """Face ports for the announcement are read from the listen endpoint strings."""
        config = load_config(
            environ={},
            overrides={
                "botlink": {"listen": ["unix:/tmp/x", "ssl:port=5101:privateKey=k.pem"]},
                "web": {"listen": ["tcp:8080:interface=127.0.0.1"]},
                "line": {"listen": []},
            },
        )
        self.assertEqual(
            discovery.configured_ports(config),
            {"botlink": 5101, "http": 8080, "camera": [5000, 5001, 5002]},
        )


class FakeZeroconf:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.registered: list[Any] = []
        self.unregistered: list[Any] = []
        self.updated: list[Any] = []
        self.closed = False

    def register_service(self, info: Any, allow_name_change: bool = False) -> None:
        if self.fail:
            raise OSError("no multicast here")
        self.registered.append((info, allow_name_change))

    def update_service(self, info: Any) -> None:
        self.updated.append(info)

    def unregister_service(self, info: Any) -> None:
        self.unregistered.append(info)

    def close(self) -> None:
        self.closed = True


class MdnsTests(unittest.SynchronousTestCase):
    def config(self, mdns: bool = True) -> Config:
        return load_config(environ={}, overrides={"discovery": {"mdns": mdns}, "hub": {"project_id": "lab"}})

    def test_registers_service_with_txt(self) -> None:
        """_robonet._tcp.local. is registered with TXT node_id, project, version, http; unregistered
        and closed on stop; interface changes update the addresses."""
        zc = FakeZeroconf()
        svc, _hub, clock = make_service(self.config(), zeroconf_factory=lambda: zc)
        svc.startService()
        [(info, rename)] = zc.registered
        self.assertTrue(rename)
        self.assertEqual(info.type, "_robonet._tcp.local.")
        self.assertTrue(info.name.endswith("._robonet._tcp.local."))
        self.assertEqual(info.port, 5100)
        self.assertEqual(
            info.properties,
            {b"node_id": OWN.node_id.encode(), b"project": b"lab", b"version": b"0.1.0", b"http": b"8000"},
        )
        self.assertEqual(sorted(info.parsed_addresses()), ["10.1.0.7", "192.168.1.10"])
        svc.interfaces_list.append(Interface("usb0", "172.16.5.1", 24))  # type: ignore[attr-defined]
        clock.advance(discovery.INTERFACE_POLL_S)
        self.assertIn("172.16.5.1", zc.updated[-1].parsed_addresses())
        self.assertEqual(zc.updated[-1].name, info.name)
        svc.stopService()
        self.assertEqual(zc.unregistered, [zc.updated[-1]])
        self.assertTrue(zc.closed)

    def test_failure_not_fatal(self) -> None:
        """A failing mDNS registration is logged; UDP discovery still runs."""
        zc = FakeZeroconf(fail=True)
        with capturedLogs() as logs:
            svc, _hub, clock = make_service(self.config(), zeroconf_factory=lambda: zc)
            svc.startService()
        self.assertTrue(zc.closed)
        self.assertTrue(any("mDNS registration failed" in str(e.get("log_format")) for e in logs))
        self.assertTrue(svc.running)
        self.assertEqual(len(clock.ports[0].written), 3)
        self.successResultOf(svc.stopService())

    def test_disabled(self) -> None:
        """discovery.mdns = false never touches zeroconf."""
        calls: list[int] = []
        svc, _hub, _clock = make_service(self.config(mdns=False), zeroconf_factory=lambda: calls.append(1))
        svc.startService()
        svc.stopService()
        self.assertEqual(calls, [])


class LoopbackUDPTests(unittest.TestCase):
    """Two discovery services on real UDP sockets on 127.0.0.1 (ephemeral ports)."""

    timeout = 10

    def service(self, node: NodeIdentity, targets: list[str]) -> DiscoveryService:
        config = load_config(
            environ={},
            overrides={
                "hub": {"project_id": "lab"},
                "discovery": {"port": 0, "mdns": False, "interval": 0.2, "broadcast_addresses": targets},
            },
        )
        hub = Hub(config, reactor, node=node)
        svc = DiscoveryService(
            config,
            hub,
            node,
            reactor,
            interfaces=lambda: [Interface("lo", "127.0.0.1", 8)],
            ports=lambda: PORTS,
        )
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    @defer.inlineCallbacks
    def test_round_trip(self) -> Any:
        """Each hub hears the other over real UDP on loopback and records its address and port;
        garbage sent to the real socket is counted and does not stop discovery."""
        a = self.service(OWN, [])
        port_a = a.port.getHost().port
        b = self.service(OTHER, [f"127.0.0.1:{port_a}"])
        port_b = b.port.getHost().port
        a.config = attrs.evolve(
            a.config, discovery=attrs.evolve(a.config.discovery, broadcast_addresses=(f"127.0.0.1:{port_b}",))
        )
        found_a: defer.Deferred[Any] = defer.Deferred()
        found_b: defer.Deferred[Any] = defer.Deferred()
        a.observe(lambda ev, node: found_a.called or found_a.callback(node))
        b.observe(lambda ev, node: found_b.called or found_b.callback(node))
        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        node_b, node_a = yield defer.gatherResults([found_a, found_b])
        self.assertEqual((node_b.node_id, node_b.address, node_b.port), (OTHER.node_id, "127.0.0.1", 5100))
        self.assertEqual(node_a.node_id, OWN.node_id)
        # Garbage, then a valid announcement of a third node, from one socket: loopback keeps the
        # order, so once the third node is found every garbage datagram has been handled.
        third = attrs.evolve(OTHER, node_id="33333333-3333-4333-8333-333333333333")
        found_third: defer.Deferred[Any] = defer.Deferred()
        a.observe(
            lambda ev, node: (
                node.node_id == third.node_id and not found_third.called and found_third.callback(node)
            )
        )
        for data in (b"", b"\xff\xfe", b"[]", b"A" * 20000):
            sender.write(data, ("127.0.0.1", port_a))
        sender.write(
            encode_announcement(third, ip="127.0.0.1", port=6000, ports={}, now=0.0), ("127.0.0.1", port_a)
        )
        yield found_third
        self.assertEqual(a.hub.stats.drops, {"udp_garbage": 2, "udp_not_object": 1, "udp_oversize": 1})
