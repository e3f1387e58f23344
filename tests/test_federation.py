"""Federation end to end on 127.0.0.1: three hubs in-process, each with its real bot link listener,
UDP discovery and peer service, plus a real robot connection; and TLS peer links that check the
responder's certificate host name."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from robonet.config import Config, load_config
from robonet.hub import Hub
from robonet.node import NodeIdentity
from robonet.protocols.botlink import BotLinkFactory, FrameDecoder, additive_sum, encode_obj
from robonet.services.discovery import DiscoveryService, Interface
from robonet.services.peers import PeerService
from tests.daemon import free_udp_port

SECRET = "fleet-secret-for-tests"
NODES = [
    NodeIdentity("aaaaaaaa-0000-4000-8000-00000000000a", "hub-a", "lab", "0123456789abcdef", "0.1.0"),
    NodeIdentity("bbbbbbbb-0000-4000-8000-00000000000b", "hub-b", "lab", "0123456789abcdef", "0.1.0"),
    NodeIdentity("cccccccc-0000-4000-8000-00000000000c", "hub-c", "lab", "0123456789abcdef", "0.1.0"),
]


class Conditions:
    """Deferreds that fire once a predicate holds, re-checked (next reactor turn) on every poke."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []
        self._scheduled = False

    def until(self, predicate: Callable[[], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((predicate, d))
        self.poke()
        return d

    def poke(self, *_: Any) -> None:
        if not self._scheduled:
            self._scheduled = True
            reactor.callLater(0, self._check)

    def _check(self) -> None:
        self._scheduled = False
        still = []
        for predicate, d in self.waiting:
            if predicate():
                d.callback(None)
            else:
                still.append((predicate, d))
        self.waiting = still


class Robot(Protocol):
    """A native bot link robot: hello, acks every command, can send telemetry."""

    def __init__(self, device_id: str, poke: Callable[[], None]) -> None:
        self.device_id = device_id
        self.poke = poke
        self.decoder = FrameDecoder(1 << 20)
        self.welcomed: defer.Deferred[None] = defer.Deferred()
        self.commands: list[dict[str, Any]] = []
        self.next_id = 0

    def connectionMade(self) -> None:
        self.send(
            {"type": "hello", "proto": 1, "role": "robot", "device_id": self.device_id, "name": "Robot 1"}
        )

    def send(self, obj: dict[str, Any]) -> None:
        self.transport.write(encode_obj(obj))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        for payload in self.decoder.feed(data):
            obj = orjson.loads(payload)
            if obj["type"] == "welcome":
                self.welcomed.callback(None)
            elif obj["type"] not in ("ack", "ping", "error") and "id" in obj:
                self.commands.append(obj)
                self.send({"type": "ack", "id": obj["id"], "sum": additive_sum(payload)})
        self.poke()


@attrs.define
class HubUnderTest:
    node: NodeIdentity
    config: Config
    hub: Hub
    peers: PeerService
    discovery: DiscoveryService | None
    botlink_port: Any


class FleetCase(unittest.TestCase):
    """Helpers: hubs with real listeners on 127.0.0.1, waiting on conditions (no sleeps)."""

    timeout = 60

    def setUp(self) -> None:
        self.cond = Conditions()

    @defer.inlineCallbacks
    def start_hub(
        self,
        node: NodeIdentity,
        *,
        udp_port: int = 0,
        udp_targets: tuple[str, ...] = (),
        static: tuple[str, ...] = (),
        botlink_listen: str = "tcp:0:interface=127.0.0.1",
        discovery: bool = True,
    ) -> Any:
        config = load_config(
            environ={},
            overrides={
                "hub": {"project_id": "lab", "name": node.name},
                "peers": {"secret": SECRET, "static": list(static)},
                "discovery": {
                    "port": udp_port,
                    "mdns": False,
                    "interval": 0.5,
                    "broadcast_addresses": list(udp_targets),
                },
                "store": {"enabled": False},
            },
        )
        hub = Hub(config, reactor, node=node)
        hub.startService()
        self.addCleanup(hub.stopService)
        factory = BotLinkFactory(hub, config.botlink, reactor, config.auth)
        port = yield endpoints.serverFromString(reactor, botlink_listen).listen(factory)
        self.addCleanup(port.stopListening)
        disc = None
        if discovery:
            disc = DiscoveryService(
                config,
                hub,
                node,
                reactor,
                interfaces=lambda: [Interface("lo", "127.0.0.1", 8)],
                ports=lambda: {"botlink": port.getHost().port},
            )
        peers = PeerService(config, hub, node, reactor, discovery=disc, retry_policy=lambda attempt: 0.2)
        peers.observe(self.cond.poke)
        hub.registry.observe(self.cond.poke)
        peers.startService()
        self.addCleanup(peers.stopService)
        if disc is not None:
            disc.startService()
            self.addCleanup(disc.stopService)
        return HubUnderTest(node, config, hub, peers, disc, port)

    @defer.inlineCallbacks
    def start_fleet(self) -> Any:
        udp = [free_udp_port() for _ in NODES]
        hubs = []
        for i, node in enumerate(NODES):
            targets = tuple(f"127.0.0.1:{p}" for j, p in enumerate(udp) if j != i)
            hubs.append((yield self.start_hub(node, udp_port=udp[i], udp_targets=targets)))
        return hubs

    @defer.inlineCallbacks
    def connect_robot(self, h: HubUnderTest, device_id: str) -> Any:
        robot = Robot(device_id, self.cond.poke)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", h.botlink_port.getHost().port)
        yield endpoints.connectProtocol(endpoint, robot)
        self.addCleanup(lambda: robot.transport.abortConnection())  # type: ignore[union-attr]
        yield robot.welcomed
        return robot

    @staticmethod
    def status(h: HubUnderTest, device_id: str) -> tuple[str, str] | None:
        dev = h.hub.registry.get(device_id)
        return None if dev is None else (dev.status, dev.hub)


class FederationTests(FleetCase):
    @defer.inlineCallbacks
    def test_three_hubs(self) -> Any:
        """Three hubs find each other by UDP and link pairwise (the smaller node id dials, one
        link per pair, all authenticated); a robot on A appears on B and C with hub = A; a command
        from C reaches the robot on A and the ack returns to C; telemetry reaches every hub exactly
        once (no loops); killing A's link to C marks the robot unreachable on C, and the redial
        restores it."""
        a, b, c = yield self.start_fleet()
        yield self.cond.until(lambda: all(len(h.peers.links) == 2 for h in (a, b, c)))
        self.assertTrue(all(link.dialled for link in a.peers.links.values()))
        self.assertEqual([link.dialled for link in c.peers.links.values()], [False, False])
        self.assertTrue(all(link.authenticated for h in (a, b, c) for link in h.peers.links.values()))

        robot = yield self.connect_robot(a, "robot_01")
        yield self.cond.until(
            lambda: (
                self.status(b, "robot_01") == ("online", a.node.node_id)
                and self.status(c, "robot_01") == ("online", a.node.node_id)
            )
        )

        # a command from a dashboard on C reaches the robot on A; the ack returns
        reached = yield c.hub.command({"type": "robot_move", "direction": "left"}, "website-1", "robot_01")
        self.assertEqual(reached, ["robot_01"])
        [cmd] = robot.commands
        self.assertEqual((cmd["type"], cmd["direction"]), ("robot_move", "left"))

        # telemetry: each message ingested exactly once on B and on C
        counts = {"b": 0, "c": 0}
        b.hub.register_callback("telemetry", lambda m, d: counts.__setitem__("b", counts["b"] + 1))
        c.hub.register_callback("telemetry", lambda m, d: counts.__setitem__("c", counts["c"] + 1))
        b.hub.register_callback("telemetry", self.cond.poke)
        c.hub.register_callback("telemetry", self.cond.poke)
        for i in range(20):
            robot.send(
                {"type": "telemetry", "battery": 50.0 + i, "cpu": 1.0, "temperature": 30.0, "signal": 90.0}
            )
        yield self.cond.until(lambda: counts == {"b": 20, "c": 20})
        # barrier: a peer_message from B and from A to C travels behind anything they forwarded
        barrier: list[str] = []
        c.hub.register_callback(
            "peer_message", lambda m, d: (barrier.append(m.body["from"]), self.cond.poke())
        )
        self.assertTrue(b.hub.send_to_peer(c.node.node_id, "barrier"))
        self.assertTrue(a.hub.send_to_peer(c.node.node_id, "barrier"))
        yield self.cond.until(lambda: len(barrier) == 2)
        self.assertEqual(counts, {"b": 20, "c": 20})
        self.assertEqual(c.hub.registry.field("robot_01.battery"), 69.0)
        self.assertEqual(c.hub.stats.msgs_in.get("peer_data"), 20)
        self.assertNotIn("peer_data", a.hub.stats.msgs_in)  # nothing came back to the owner
        self.assertEqual(b.hub.stats.drops.get("peer_data_unknown_device", 0), 0)
        self.assertEqual(c.hub.stats.drops.get("peer_data_unknown_device", 0), 0)
        self.assertEqual(self.status(b, "robot_01"), ("online", a.node.node_id))

        # the dashboard's view of the peers
        entries = {p["node_id"]: p for p in c.hub.peers.peer_list()["peers"]}
        self.assertEqual(set(entries), {a.node.node_id, b.node.node_id})
        self.assertEqual(entries[a.node.node_id]["devices"], 1)
        self.assertEqual(entries[a.node.node_id]["state"], "up")
        listed = yield c.hub.request("peer_list", None, "test")
        self.assertEqual(len(listed["peers"]), 2)

        # kill A's link on C: unreachable, then restored by A's redial
        link = c.peers.links[a.node.node_id]
        link.channel.transport.abortConnection()
        yield self.cond.until(lambda: self.status(c, "robot_01") == ("unreachable", a.node.node_id))
        yield self.cond.until(lambda: self.status(c, "robot_01") == ("online", a.node.node_id))
        self.assertIsNot(c.peers.links[a.node.node_id], link)
        reached = yield c.hub.command({"type": "stop"}, "website-1", "robot_01")
        self.assertEqual(reached, ["robot_01"])

        # the robot leaves: offline everywhere
        robot.transport.loseConnection()
        yield self.cond.until(
            lambda: (
                self.status(b, "robot_01") == ("offline", a.node.node_id)
                and self.status(c, "robot_01") == ("offline", a.node.node_id)
            )
        )


def make_certificates(directory: Path, hostname: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``hostname`` signed by it; returns (ca, cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "robonet test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


class TLSPeerTests(FleetCase):
    """Static ``ssl:`` peers: the dialler verifies the responder's certificate and host name."""

    timeout = 30

    @defer.inlineCallbacks
    def tls_pair(self, hostname: str) -> Any:
        ca, cert, key = make_certificates(Path(self.mktemp()), "hub-b.example")
        b = yield self.start_hub(
            NODES[1],
            botlink_listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            discovery=False,
        )
        port = b.botlink_port.getHost().port
        a = yield self.start_hub(
            NODES[0], static=(f"ssl:127.0.0.1:{port}:ca={ca}:hostname={hostname}",), discovery=False
        )
        return a, b

    @defer.inlineCallbacks
    def test_tls_link_with_right_hostname(self) -> Any:
        """With the CA and the certificate's host name the TLS peer link comes up, authenticated."""
        a, b = yield self.tls_pair("hub-b.example")
        yield self.cond.until(lambda: NODES[1].node_id in a.peers.links and NODES[0].node_id in b.peers.links)
        self.assertTrue(a.peers.links[NODES[1].node_id].authenticated)

    @defer.inlineCallbacks
    def test_tls_wrong_hostname_rejected(self) -> Any:
        """A certificate for another host name is rejected: no link, the dial fails (and retries)."""
        a, b = yield self.tls_pair("wrong.example")
        failures: list[str] = []
        a.peers.observe(lambda ev, s: ev == "dial_failed" and failures.append(s.last_error))
        yield self.cond.until(lambda: len(failures) >= 2)
        self.assertEqual(a.peers.links, {})
        self.assertEqual(b.peers.links, {})
        self.assertIn("wrong.example", " ".join(failures))
        dialler = next(iter(a.peers.diallers.values()))
        self.assertIsNone(dialler.node_id)  # never got as far as the challenge


class DaemonFederationTests(unittest.SynchronousTestCase):
    """Two real ``twistd -n robonet`` daemons find each other over UDP on loopback and link; a
    robot on one shows up in the other's REST API. Bounded waits (the daemons are subprocesses)."""

    WAIT = 30.0

    def get_json(self, port: int, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return orjson.loads(response.read())

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        import select
        import time

        deadline = time.monotonic() + self.WAIT
        while not check():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            select.select([], [], [], 0.1)

    def test_two_daemons(self) -> None:
        """Discovery keys from the environment, the peer secret and the tap wiring all work."""
        import socket
        import struct

        from tests.daemon import start_daemon

        udp = [free_udp_port(), free_udp_port()]
        daemons = []
        for i, name in enumerate(("hub-one", "hub-two")):
            env = {
                "ROBONET_HUB_PROJECT_ID": "lab",
                "ROBONET_DISCOVERY_PORT": str(udp[i]),
                "ROBONET_DISCOVERY_INTERVAL": "0.5",
                "ROBONET_DISCOVERY_BROADCAST_ADDRESSES": f"127.0.0.1:{udp[1 - i]}",
                "ROBONET_PEERS_SECRET": SECRET,
            }
            daemons.append(start_daemon(self, "--name", name, discovery=True, store=False, env=env))
        one, two = daemons

        def linked(d: Any) -> bool:
            peers = self.get_json(d.ports["web"], "/api/peers")["peers"]
            return [(p["state"], p["authenticated"]) for p in peers] == [("up", True)]

        self.wait_for("the peer link", lambda: linked(one) and linked(two))
        node_one = self.get_json(two.ports["web"], "/api/peers")["peers"][0]["node_id"]

        with socket.create_connection(("127.0.0.1", one.ports["botlink"]), timeout=5) as robot:
            hello = orjson.dumps({"type": "hello", "proto": 1, "role": "robot", "device_id": "robot_77"})
            robot.sendall(struct.pack(">I", len(hello)) + hello)
            (n,) = struct.unpack(">I", robot.recv(4, socket.MSG_WAITALL))
            self.assertEqual(orjson.loads(robot.recv(n, socket.MSG_WAITALL))["type"], "welcome")

            def remote_robot() -> bool:
                devices = self.get_json(two.ports["web"], "/api/devices")["devices"]
                return any(d["device_id"] == "robot_77" and d["hub"] == node_one for d in devices)

            self.wait_for("the robot on the other hub", remote_robot)
