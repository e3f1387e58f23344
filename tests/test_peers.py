"""Peer links without sockets: the challenge-response handshake (pure and over iosim between a real
bot link server and the peer dialler), registry federation, command and telemetry forwarding,
peer messages, heartbeat, duplicate links, bad frames and the peer_list data."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import attrs
import orjson
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial import unittest

from robonet.config import Config, load_config
from robonet.hub import Hub
from robonet.model import Command, HubError, Message
from robonet.node import NodeIdentity
from robonet.protocols.botlink import BotLinkFactory, FrameDecoder, encode_obj
from robonet.protocols.peering import (
    HEARTBEAT_S,
    DiallerHandshake,
    HandshakeError,
    PeerInfo,
    ResponderHandshake,
    hmac_proof,
)
from robonet.registry import Device
from robonet.services.peerconn import Dialler, PeerClientProtocol
from robonet.services.peers import PeerService, StaticPeer, parse_static

SECRET = "correct horse battery staple"
NODE_A = NodeIdentity("aaaaaaaa-0000-4000-8000-000000000001", "hub-a", "lab", "0123456789abcdef", "0.1.0")
NODE_B = NodeIdentity("bbbbbbbb-0000-4000-8000-000000000002", "hub-b", "lab", "0123456789abcdef", "0.1.0")
NODE_C = NodeIdentity("cccccccc-0000-4000-8000-000000000003", "hub-c", "lab", "0123456789abcdef", "0.1.0")


def make_config(secret: str = SECRET, **peers_cfg: Any) -> Config:
    return load_config(
        environ={},
        overrides={
            "hub": {"project_id": "lab"},
            "peers": {"secret": secret, **peers_cfg},
            "discovery": {"mdns": False},
            "store": {"enabled": False},
        },
    )


class FakeRobotLink:
    """A robot's Link on the hub it is connected to: records commands, acks when told."""

    face = "botlink"

    def __init__(self) -> None:
        self.commands: list[tuple[Command, defer.Deferred[Any]]] = []
        self.closed: list[str] = []

    def deliver(self, command: Command) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.commands.append((command, d))
        return d

    def close_link(self, code: str, message: str) -> None:
        self.closed.append(code)


@attrs.define
class Side:
    """One hub with its peer service on a shared fake clock."""

    node: NodeIdentity
    config: Config
    hub: Hub
    svc: PeerService
    botlink: BotLinkFactory
    events: list[tuple[str, str]]

    def robot(self, device_id: str = "robot_01") -> tuple[FakeRobotLink, Device]:
        link = FakeRobotLink()
        dev = self.hub.connect(link, device_id, face="botlink", role="robot", address="10.0.0.9:4000")
        return link, dev

    def remote(self, device_id: str = "robot_01") -> Device | None:
        return self.hub.registry.get(device_id)


class NeverEndpoint:
    """A client endpoint whose connection attempts never complete (no sockets in unit tests)."""

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.Deferred()


class RecordingTransport(FakeTransport):
    """FakeTransport that keeps a copy of every byte written."""

    def __init__(self, *a: Any, record: list[bytes], **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.record = record

    def write(self, data: bytes) -> None:
        self.record.append(data)
        super().write(data)


class PeerTestCase(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()

    def side(self, node: NodeIdentity, config: Config | None = None) -> Side:
        config = config or make_config()
        hub = Hub(config, self.clock, node=node)
        svc = PeerService(config, hub, node, self.clock, endpoint_factory=lambda d: NeverEndpoint())
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        events: list[tuple[str, str]] = []
        svc.observe(lambda ev, subject: events.append((ev, getattr(subject, "node_id", None) or "")))
        return Side(
            node, config, hub, svc, BotLinkFactory(hub, config.botlink, self.clock, config.auth), events
        )

    def link(
        self,
        dialler: Side,
        responder: Side,
        *,
        client_ip: str = "127.0.0.1",
        record: list[bytes] | None = None,
    ) -> tuple[PeerClientProtocol, Any, IOPump]:
        """Connect ``dialler`` to ``responder``'s real bot link protocol in memory and pump."""
        record = [] if record is None else record
        target = Dialler("static:test", "127.0.0.1", 5100, static=parse_static("127.0.0.1:5100"))
        dialler.svc.diallers[target.key] = target
        client_addr = IPv4Address("TCP", client_ip, 40000)
        server_addr = IPv4Address("TCP", "127.0.0.1", 5100)
        client, server, pump = connectedServerAndClient(
            lambda: responder.botlink.buildProtocol(client_addr),
            lambda: PeerClientProtocol(dialler.svc, target),
            clientTransportFactory=lambda p: RecordingTransport(
                p, False, hostAddress=client_addr, peerAddress=server_addr, record=record
            ),
            serverTransportFactory=lambda p: RecordingTransport(
                p, True, hostAddress=server_addr, peerAddress=client_addr, record=record
            ),
            clock=self.clock,
        )
        pump.flush()
        return client, server, pump


# --- the pure handshake ----------------------------------------------------------------------


class HandshakeTests(unittest.SynchronousTestCase):
    def test_proof_is_hmac_sha256(self) -> None:
        """The proof is HMAC-SHA256(secret, nonce + node_id), hex."""
        expected = hmac.new(b"s", b"00ff" + b"node", hashlib.sha256).hexdigest()
        self.assertEqual(hmac_proof("s", "00ff", "node"), expected)
        self.assertNotEqual(hmac_proof("t", "00ff", "node"), expected)

    def run_handshake(self, dialler: DiallerHandshake, responder: ResponderHandshake) -> PeerInfo:
        challenge = responder.on_hello(dialler.hello())
        proof = dialler.on_challenge(challenge)
        welcome = responder.on_proof(proof)
        return dialler.on_welcome(welcome)

    def test_happy_path(self) -> None:
        """Both sides with the same secret complete the handshake and learn each other."""
        d = DiallerHandshake(NODE_A, SECRET)
        r = ResponderHandshake(NODE_B, SECRET)
        info = self.run_handshake(d, r)
        self.assertEqual((info.node_id, info.name), (NODE_B.node_id, "hub-b"))
        assert r.dialler is not None
        self.assertEqual((r.dialler.node_id, r.dialler.name), (NODE_A.node_id, "hub-a"))
        self.assertEqual(len(d.nonce), 32)
        self.assertNotEqual(d.nonce, r.nonce)

    def test_hello_shape(self) -> None:
        """The hello carries the spec's fields and never the secret."""
        hello = DiallerHandshake(NODE_A, SECRET).hello()
        self.assertEqual(
            set(hello), {"type", "proto", "role", "node_id", "name", "project_id", "hash", "version", "nonce"}
        )
        self.assertNotIn(SECRET.encode(), orjson.dumps(hello))

    def test_forged_dialler_proof_rejected(self) -> None:
        """A dialler that does not know the secret cannot produce the proof: auth_failed."""
        d = DiallerHandshake(NODE_A, "guess")
        r = ResponderHandshake(NODE_B, SECRET)
        challenge = r.on_hello(d.hello())
        # the dialler notices the responder's proof does not match its (wrong) secret...
        with self.assertRaises(HandshakeError) as cm:
            d.on_challenge(challenge)
        self.assertEqual(cm.exception.code, "auth_failed")
        # ...and any proof it forges is refused by the responder.
        for forged in ("0" * 64, hmac_proof("guess", r.nonce, NODE_A.node_id), "", 5, None):
            with self.assertRaises(HandshakeError) as cm:
                r.on_proof({"type": "proof", "proof": forged})
            self.assertEqual(cm.exception.code, "auth_failed")

    def test_forged_responder_cannot_collect_a_proof(self) -> None:
        """A responder without the secret (e.g. one that forged a discovery announcement) gets no
        proof from the dialler: it must prove itself first."""
        d = DiallerHandshake(NODE_A, SECRET)
        r = ResponderHandshake(NODE_B, "forger")
        with self.assertRaises(HandshakeError) as cm:
            d.on_challenge(r.on_hello(d.hello()))
        self.assertEqual(cm.exception.code, "auth_failed")

    def test_replayed_proof_rejected(self) -> None:
        """A proof captured from one handshake does not pass another (fresh responder nonce)."""
        d = DiallerHandshake(NODE_A, SECRET)
        r1 = ResponderHandshake(NODE_B, SECRET)
        proof = d.on_challenge(r1.on_hello(d.hello()))
        r2 = ResponderHandshake(NODE_B, SECRET)
        r2.on_hello(DiallerHandshake(NODE_A, SECRET).hello())
        with self.assertRaises(HandshakeError):
            r2.on_proof(proof)

    def test_hello_rejections(self) -> None:
        """Hello checks: project, protocol, hash when required, malformed fields, own node id."""
        good = DiallerHandshake(NODE_A, SECRET).hello()
        cases = [
            ({"project_id": "other"}, "wrong_project"),
            ({"proto": 2}, "incompatible"),
            ({"nonce": "xyz"}, "bad_hello"),
            ({"nonce": 5}, "bad_hello"),
            ({"node_id": "bad id"}, "bad_hello"),
            ({"node_id": NODE_B.node_id}, "bad_hello"),
            ({"role": "robot"}, "bad_hello"),
            ({"name": 7}, "bad_hello"),
        ]
        for change, code in cases:
            with self.assertRaises(HandshakeError) as cm:
                ResponderHandshake(NODE_B, SECRET).on_hello({**good, **change})
            self.assertEqual(cm.exception.code, code, change)
        strict = ResponderHandshake(NODE_B, SECRET, require_same_hash=True)
        with self.assertRaises(HandshakeError) as cm:
            strict.on_hello({**good, "hash": "ffffffffffffffff"})
        self.assertEqual(cm.exception.code, "incompatible")
        ResponderHandshake(NODE_B, SECRET).on_hello({**good, "hash": "ffffffffffffffff"})  # warning only

    def test_challenge_rejections(self) -> None:
        """The dialler refuses a challenge from itself or from a node other than the one it dialled."""
        d = DiallerHandshake(NODE_A, SECRET, expected_node_id=NODE_C.node_id)
        challenge = ResponderHandshake(NODE_B, SECRET).on_hello(d.hello())
        with self.assertRaises(HandshakeError):
            d.on_challenge(challenge)
        d = DiallerHandshake(NODE_A, SECRET)
        challenge = ResponderHandshake(NODE_A, SECRET).on_hello({**d.hello(), "node_id": NODE_C.node_id})
        with self.assertRaises(HandshakeError):
            d.on_challenge(challenge)
        with self.assertRaises(HandshakeError):
            d.on_challenge({"type": "welcome"})

    def test_parse_static(self) -> None:
        """peers.static entries: host:port, tcp:, ssl: with options, keyword and IPv6 forms."""
        self.assertEqual(parse_static("10.0.0.2:5100"), StaticPeer("10.0.0.2:5100", "10.0.0.2", 5100))
        p = parse_static("ssl:hub.lan:5101:ca=/etc/ca.pem:hostname=hub.example")
        self.assertEqual(
            (p.host, p.port, p.tls, p.ca, p.hostname), ("hub.lan", 5101, True, "/etc/ca.pem", "hub.example")
        )
        p = parse_static("tcp:host=h:port=7")
        self.assertEqual((p.host, p.port, p.tls), ("h", 7, False))
        p = parse_static("[::1]:5100")
        self.assertEqual((p.host, p.port), ("::1", 5100))
        for bad in ("", "host", "host:0", "host:99999", "host:x", "ssl:h:1:bogus=2", "a:1:2"):
            with self.assertRaises(ValueError):
                parse_static(bad)


# --- over iosim, through the real bot link server ---------------------------------------------


class LinkTests(PeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.a = self.side(NODE_A)
        self.b = self.side(NODE_B)

    def test_link_up_no_secret_sent(self) -> None:
        """A dials B: both register the link (authenticated) and each other's device record with
        role peer; the shared secret never appears in any byte on the wire."""
        record: list[bytes] = []
        client, server, pump = self.link(self.a, self.b, record=record)
        self.assertIn(NODE_B.node_id, self.a.svc.links)
        self.assertIn(NODE_A.node_id, self.b.svc.links)
        link_a = self.a.svc.links[NODE_B.node_id]
        self.assertTrue(link_a.authenticated)
        self.assertTrue(link_a.dialled)
        self.assertFalse(self.b.svc.links[NODE_A.node_id].dialled)
        peer_dev = self.b.hub.registry.get(NODE_A.node_id)
        assert peer_dev is not None
        self.assertEqual(
            (peer_dev.role, peer_dev.face, peer_dev.name, peer_dev.status),
            ("peer", "peer", "hub-a", "online"),
        )
        wire = b"".join(record)
        self.assertIn(b'"type":"challenge"', wire)
        self.assertIn(b'"type":"welcome"', wire)
        self.assertNotIn(SECRET.encode(), wire)
        self.assertNotIn(SECRET.encode().hex().encode(), wire)
        self.assertEqual([e for e, _ in self.a.events], ["link_up"])

    def test_wrong_secret_no_link(self) -> None:
        """With different secrets the dialler refuses the challenge: no link on either side, no
        proof sent, nothing registered."""
        b = self.side(NODE_C, make_config(secret="other secret"))
        record: list[bytes] = []
        client, server, pump = self.link(self.a, b, record=record)
        self.assertEqual(self.a.svc.links, {})
        self.assertEqual(b.svc.links, {})
        self.assertNotIn(b'"type":"proof"', b"".join(record))
        self.assertTrue(client.closing)
        self.assertEqual(self.a.hub.stats.errors.get("auth_failed"), 1)
        self.assertIsNone(b.hub.registry.get(NODE_A.node_id))

    def test_forged_proof_over_the_wire(self) -> None:
        """A client that does not know the secret sends a forged proof: auth_failed and close."""
        server = self.b.botlink.buildProtocol(IPv4Address("TCP", "10.9.9.9", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.9.9.9", 1234))
        server.makeConnection(transport)
        hello = DiallerHandshake(NODE_C, "guess").hello()
        server.dataReceived(encode_obj(hello))
        [challenge] = [orjson.loads(p) for p in FrameDecoder(1 << 20).feed(transport.value())]
        self.assertEqual(challenge["type"], "challenge")
        transport.clear()
        server.dataReceived(encode_obj({"type": "proof", "proof": "ab" * 32}))
        [err] = [orjson.loads(p) for p in FrameDecoder(1 << 20).feed(transport.value())]
        self.assertEqual(err["code"], "auth_failed")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.b.svc.links, {})
        self.assertIsNone(self.b.hub.registry.get(NODE_C.node_id))

    def test_frames_before_proof_refused(self) -> None:
        """Anything but the proof after the challenge closes the connection with auth_failed."""
        server = self.b.botlink.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        server.makeConnection(transport)
        server.dataReceived(encode_obj(DiallerHandshake(NODE_C, SECRET).hello()))
        transport.clear()
        server.dataReceived(encode_obj({"type": "peer_devices", "devices": [{"device_id": "evil"}]}))
        [err] = [orjson.loads(p) for p in FrameDecoder(1 << 20).feed(transport.value())]
        self.assertEqual(err["code"], "auth_failed")
        self.assertIsNone(self.b.hub.registry.get("evil"))

    def test_handshake_deadline(self) -> None:
        """A dialler that never sends its proof is cut off after botlink.hello_timeout."""
        server = self.b.botlink.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        server.makeConnection(transport)
        server.dataReceived(encode_obj(DiallerHandshake(NODE_C, SECRET).hello()))
        self.clock.advance(self.b.config.botlink.hello_timeout + 0.1)
        self.assertTrue(transport.disconnecting)

    def test_wrong_project_refused(self) -> None:
        """A hub of another project is refused with wrong_project."""
        other = attrs.evolve(NODE_C, project_id="elsewhere")
        c = self.side(other)
        client, server, pump = self.link(c, self.b)
        self.assertEqual(self.b.svc.links, {})
        self.assertIn("wrong_project", client.dialler.last_error)

    def test_no_secret_loopback_only(self) -> None:
        """Without a secret, links form over loopback (unauthenticated) but a non-loopback,
        non-static address is refused."""
        a = self.side(NODE_A, make_config(secret=""))
        b = self.side(NODE_B, make_config(secret=""))
        self.link(a, b)
        link = a.svc.links[NODE_B.node_id]
        self.assertFalse(link.authenticated)
        self.assertEqual(a.svc.peer_list()["peers"][0]["authenticated"], False)
        c = self.side(NODE_C, make_config(secret=""))
        client, server, pump = self.link(c, b, client_ip="192.168.7.7")
        self.assertNotIn(NODE_C.node_id, b.svc.links)
        self.assertIn("auth_failed", client.dialler.last_error)

    def test_no_secret_static_peer_allowed(self) -> None:
        """Without a secret, an address listed in peers.static may link."""
        b = self.side(NODE_B, make_config(secret="", static=["192.168.7.7:5100"], auto=False))
        c = self.side(NODE_C, make_config(secret=""))
        self.link(c, b, client_ip="192.168.7.7")
        self.assertIn(NODE_C.node_id, b.svc.links)

    def test_registry_federation(self) -> None:
        """Devices present at link time arrive in the snapshot; later ups, downs, telemetry and
        updates follow; remote devices carry hub = the owner's node id."""
        robot1, _ = self.b.robot("robot_01")
        dev_b = self.b.hub.registry.get("robot_01")
        assert dev_b is not None
        self.b.hub.ingest(
            dev_b, Message("telemetry", {"type": "telemetry", "battery": 80.0}, "robot_01", 1.0)
        )
        client, server, pump = self.link(self.a, self.b)
        remote = self.a.remote("robot_01")
        assert remote is not None
        self.assertEqual((remote.hub, remote.status, remote.role), (NODE_B.node_id, "online", "robot"))
        self.assertEqual(remote.latest["telemetry"]["battery"], 80.0)
        # a device that connects later
        self.b.robot("robot_02")
        pump.flush()
        r2 = self.a.remote("robot_02")
        assert r2 is not None and r2.online
        # telemetry is forwarded and ingested (callbacks run on A)
        seen: list[tuple[str, Any]] = []
        self.a.hub.register_callback("telemetry", lambda m, d: seen.append((d.device_id, m.body["battery"])))
        self.b.hub.ingest(
            dev_b, Message("telemetry", {"type": "telemetry", "battery": 79.5}, "robot_01", 2.0)
        )
        pump.flush()
        self.assertEqual(seen, [("robot_01", 79.5)])
        self.assertEqual(remote.latest["telemetry"]["battery"], 79.5)
        # down
        self.b.hub.disconnect(robot1, "robot_01")
        pump.flush()
        self.assertEqual(remote.status, "offline")
        # A's own devices went the other way; nothing of B's came back to B
        self.a.robot("robot_09")
        pump.flush()
        r9 = self.b.remote("robot_09")
        assert r9 is not None
        self.assertEqual(r9.hub, NODE_A.node_id)
        self.assertEqual(self.b.remote("robot_02").hub, "")  # type: ignore[union-attr]
        self.assertEqual(self.a.svc.peer_list()["peers"][0]["devices"], 1)

    def test_link_loss_and_recovery(self) -> None:
        """Losing the link marks the peer's devices unreachable; a new link restores them, and
        devices that went away meanwhile become offline."""
        self.b.robot("robot_01")
        link2, _ = self.b.robot("robot_02")
        client, server, pump = self.link(self.a, self.b)
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.a.svc.links, {})
        self.assertEqual(self.a.remote("robot_01").status, "unreachable")  # type: ignore[union-attr]
        self.assertEqual(self.a.remote("robot_02").status, "unreachable")  # type: ignore[union-attr]
        self.assertEqual(self.a.hub.registry.get(NODE_B.node_id).status, "offline")  # type: ignore[union-attr]
        self.b.hub.disconnect(link2, "robot_02")
        self.link(self.a, self.b)
        self.assertEqual(self.a.remote("robot_01").status, "online")  # type: ignore[union-attr]
        self.assertEqual(self.a.remote("robot_02").status, "offline")  # type: ignore[union-attr]
        self.assertEqual([e for e, _ in self.a.events], ["link_up", "link_down", "link_up"])

    def test_command_forwarded_and_acked(self) -> None:
        """A command on A for B's robot reaches the robot on B; its ack returns to A."""
        robot, _ = self.b.robot("robot_01")
        client, server, pump = self.link(self.a, self.b)
        d = self.a.hub.command({"type": "robot_move", "direction": "forward"}, "website-1", "robot_01")
        pump.flush()
        [(cmd, ack)] = robot.commands
        self.assertEqual((cmd.type, cmd.target, cmd.body["direction"]), ("robot_move", "robot_01", "forward"))
        self.assertTrue(cmd.origin.startswith("website-1@"))
        self.assertNoResult(d)
        ack.callback(None)
        pump.flush()
        self.assertEqual(self.successResultOf(d), ["robot_01"])

    def test_command_error_returns(self) -> None:
        """The remote hub's error (e.g. delivery_timeout, unknown_command) comes back to the sender."""
        robot, _ = self.b.robot("robot_01")
        client, server, pump = self.link(self.a, self.b)
        d = self.a.hub.command({"type": "robot_move"}, "website-1", "robot_01")
        pump.flush()
        robot.commands[0][1].errback(HubError("delivery_timeout", "robot did not ack"))
        pump.flush()
        self.assertEqual(self.failureResultOf(d, HubError).value.code, "delivery_timeout")

    def test_command_link_lost(self) -> None:
        """A command pending when the link drops fails with device_offline; later ones at once."""
        self.b.robot("robot_01")
        client, server, pump = self.link(self.a, self.b)
        d = self.a.hub.command({"type": "robot_move"}, "website-1", "robot_01")
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.failureResultOf(d, HubError).value.code, "device_offline")
        d2 = self.a.hub.command({"type": "robot_move"}, "website-1", "robot_01")
        self.assertEqual(self.failureResultOf(d2, HubError).value.code, "device_offline")

    def test_command_timeout(self) -> None:
        """With no answer from the peer the command fails with delivery_timeout."""
        self.b.robot("robot_01")
        client, server, pump = self.link(self.a, self.b)
        d = self.a.hub.command({"type": "robot_move"}, "website-1", "robot_01")
        self.clock.advance(2 * self.a.config.botlink.ack_timeout + 0.1)
        self.assertEqual(self.failureResultOf(d, HubError).value.code, "delivery_timeout")

    def test_peer_command_only_for_own_devices(self) -> None:
        """A peer may command only devices this hub owns: not remote ones, not peers (no loops)."""
        client, server, pump = self.link(self.a, self.b)
        c_link = FakeRobotLink()
        self.b.hub.connect(
            c_link, "robot_c", face="botlink", role="robot", address="x", hub_id=NODE_C.node_id
        )
        link = self.a.svc.links[NODE_B.node_id]
        results = []
        for target in ("robot_c", NODE_A.node_id, "nope"):
            cmd = Command("robot_move", {"type": "robot_move"}, "w", target)
            d = link.send_command(cmd)
            d.addErrback(lambda f: results.append(f.value.code))
            pump.flush()
        self.assertEqual(results, ["device_offline"] * 3)
        self.assertEqual(c_link.commands, [])

    def test_broadcast_command_reaches_remote_robots(self) -> None:
        """A command to all robots on A also reaches B's robots, each once."""
        robot_b, _ = self.b.robot("robot_b")
        robot_a, _ = self.a.robot("robot_a")
        client, server, pump = self.link(self.a, self.b)
        d = self.a.hub.command({"type": "stop"}, "website-1", None)
        pump.flush()
        self.assertEqual(len(robot_a.commands), 1)
        self.assertEqual(len(robot_b.commands), 1)
        robot_a.commands[0][1].callback(None)
        robot_b.commands[0][1].callback(None)
        pump.flush()
        self.assertEqual(sorted(self.successResultOf(d)), ["robot_a", "robot_b"])

    def test_peer_messages(self) -> None:
        """broadcast_to_peers / send_to_peer deliver {"type":"peer_message","from","data"} to
        callbacks on peer_message; unknown peers give False."""
        client, server, pump = self.link(self.a, self.b)
        got: list[dict[str, Any]] = []
        self.b.hub.register_callback("peer_message", lambda m, d: got.append(m.body))
        self.assertEqual(self.a.hub.broadcast_to_peers({"hello": [1, 2]}), 1)
        self.assertTrue(self.a.hub.send_to_peer(NODE_B.node_id, "direct"))
        self.assertFalse(self.a.hub.send_to_peer(NODE_C.node_id, "x"))
        pump.flush()
        self.assertEqual(
            got,
            [
                {"type": "peer_message", "from": NODE_A.node_id, "data": {"hello": [1, 2]}},
                {"type": "peer_message", "from": NODE_A.node_id, "data": "direct"},
            ],
        )

    def test_heartbeat_rtt_and_idle(self) -> None:
        """Each side pings every heartbeat; the ack sets rtt_ms and last_seen. A silent peer is
        closed after botlink.idle_timeout."""
        client, server, pump = self.link(self.a, self.b)
        link = self.a.svc.links[NODE_B.node_id]
        self.assertIsNone(link.rtt_ms)
        self.clock.advance(HEARTBEAT_S)
        pump.flush()
        self.assertEqual(link.rtt_ms, 0.0)
        self.assertEqual(link.last_seen, self.clock.seconds())
        entry = self.a.svc.peer_list()["peers"][0]
        self.assertEqual(
            set(entry)
            >= {"node_id", "name", "address", "state", "rtt_ms", "last_seen", "authenticated", "devices"},
            True,
        )
        self.assertEqual((entry["node_id"], entry["state"], entry["name"]), (NODE_B.node_id, "up", "hub-b"))
        # now B goes silent (nothing pumped): A gives up after idle_timeout
        for _ in range(4):
            self.clock.advance(HEARTBEAT_S)
        self.assertTrue(client.transport.disconnecting)

    def test_bad_frames_after_link(self) -> None:
        """Garbage, unknown types and malformed federation frames from a peer are counted; the link
        keeps working."""
        client, server, pump = self.link(self.a, self.b)
        link_b = self.b.svc.links[NODE_A.node_id]
        for obj in (
            {"type": "mystery"},
            {"type": "peer_devices", "devices": "nope"},
            {"type": "peer_device", "op": "explode", "device": {}},
            {"type": "peer_device", "op": "up", "device": {"device_id": ""}},
            {"type": "peer_data", "device_id": "ghost", "msg_type": "telemetry", "data": {}},
            {"type": "peer_data", "device_id": 5},
            {"type": "peer_command", "id": 1},
            {"type": "hello"},
        ):
            client.write_frame(encode_obj(obj))
        client.transport.write(b"\x00\x00\x00\x03xyz")
        pump.flush()
        self.assertIn(NODE_A.node_id, self.b.svc.links)
        self.assertGreaterEqual(self.b.hub.stats.errors.get("bad_frame", 0), 5)
        self.assertEqual(self.b.hub.stats.drops.get("peer_data_unknown_device"), 1)
        self.assertEqual(link_b.state, "up")
        got: list[Any] = []
        self.b.hub.register_callback("peer_message", lambda m, d: got.append(m.body["data"]))
        self.a.hub.broadcast_to_peers("still here")
        pump.flush()
        self.assertEqual(got, ["still here"])

    def test_oversized_forward_dropped(self) -> None:
        """A forwarded message larger than the peer's max_frame is dropped and counted, not sent."""
        client, server, pump = self.link(self.a, self.b)
        robot, dev = self.a.robot("robot_big")
        pump.flush()
        big = {"type": "blob", "data": "x" * (self.a.config.botlink.max_frame + 10)}
        self.a.hub.ingest(dev, Message("blob", big, "robot_big", 1.0))
        pump.flush()
        self.assertEqual(self.a.hub.stats.drops.get("peer_frame_too_large"), 1)
        self.assertIn(NODE_A.node_id, self.b.svc.links)

    def test_forward_filter(self) -> None:
        """peers.forward = ["telemetry"] forwards telemetry only; "none" forwards no data."""
        a = self.side(NODE_A, make_config(forward=["telemetry"]))
        client, server, pump = self.link(a, self.b)
        _, dev = a.robot("robot_01")
        pump.flush()
        got: list[str] = []
        self.b.hub.register_callback("telemetry", lambda m, d: got.append(m.type))
        self.b.hub.register_callback("sensor_data", lambda m, d: got.append(m.type))
        a.hub.ingest(dev, Message("sensor_data", {"type": "sensor_data"}, "robot_01", 1.0))
        a.hub.ingest(dev, Message("telemetry", {"type": "telemetry"}, "robot_01", 1.0))
        pump.flush()
        self.assertEqual(got, ["telemetry"])

    def test_remote_cannot_shadow_local_device(self) -> None:
        """A peer exporting a device id that is connected here does not replace the local one."""
        local, _ = self.a.robot("robot_01")
        self.b.robot("robot_01")
        self.link(self.a, self.b)
        dev = self.a.hub.registry.get("robot_01")
        assert dev is not None
        self.assertEqual((dev.hub, dev.link), ("", local))
        self.assertEqual(local.closed, [])
        self.assertEqual(self.a.hub.stats.drops.get("peer_device_shadowed"), 1)

    def test_one_link_per_pair(self) -> None:
        """When both hubs dial each other, exactly one link survives on both sides: the one dialled
        by the smaller node id."""
        c1, s1, p1 = self.link(self.a, self.b)  # dialled by A (smaller)
        c2, s2, p2 = self.link(self.b, self.a)  # dialled by B
        p1.flush()
        p2.flush()
        self.assertEqual(list(self.a.svc.links), [NODE_B.node_id])
        self.assertEqual(list(self.b.svc.links), [NODE_A.node_id])
        self.assertTrue(self.a.svc.links[NODE_B.node_id].dialled)
        self.assertFalse(self.b.svc.links[NODE_A.node_id].dialled)
        self.assertIsNone(c2.link)
        self.assertIn("duplicate_link", c2.error)
        # and the other order: B's link first, then A's preferred one replaces it everywhere
        a = self.side(NODE_A)
        c = self.side(NODE_C)
        c3, s3, p3 = self.link(c, a)  # dialled by C (larger)
        c4, s4, p4 = self.link(a, c)  # dialled by A (smaller): wins
        p3.flush()
        p4.flush()
        self.assertTrue(a.svc.links[NODE_C.node_id].dialled)
        self.assertFalse(c.svc.links[NODE_A.node_id].dialled)
        self.assertIs(c4.link, a.svc.links[NODE_C.node_id])

    def test_reconnect_from_same_dialler_replaces_stale_link(self) -> None:
        """A hub that restarted dials again while its old connection still looks up here
        (half-open): the new link wins and the old one is closed."""
        c1, s1, p1 = self.link(self.a, self.b)
        old = self.b.svc.links[NODE_A.node_id]
        restarted = self.side(NODE_A)
        c2, s2, p2 = self.link(restarted, self.b)
        p1.flush()
        new = self.b.svc.links[NODE_A.node_id]
        self.assertIsNot(new, old)
        self.assertEqual(old.state, "down")
        self.assertIs(c2.link, restarted.svc.links[NODE_B.node_id])
        peer_dev = self.b.hub.registry.get(NODE_A.node_id)
        assert peer_dev is not None
        self.assertEqual((peer_dev.status, peer_dev.link), ("online", new))

    def test_dialling_ourselves_stops(self) -> None:
        """A static entry that points at this hub is recognised (our own hello arrives) and that
        dialler stops for good."""
        record: list[bytes] = []
        client, server, pump = self.link(self.a, self.a, record=record)
        dialler = client.dialler
        self.assertEqual(dialler.state, "stopped")
        self.assertEqual(dialler.last_error, "bad_hello: that is our own node id")
        self.assertEqual(self.a.svc.links, {})

    def test_stop_closes_links(self) -> None:
        """Stopping the service closes its links and removes the hub hooks."""
        client, server, pump = self.link(self.a, self.b)
        self.a.svc.stopService()
        pump.flush()
        self.assertEqual(self.b.svc.links, {})
        self.assertIsNone(self.a.hub.peers)
        self.assertIsNone(self.a.hub.peer_acceptor)


class DiscoveryFollowTests(PeerTestCase):
    """Which discovered nodes a hub dials (no sockets: the ClientService is replaced)."""

    def setUp(self) -> None:
        super().setUp()
        self.dialled: list[tuple[str, str, int]] = []

    def service(self, node: NodeIdentity, config: Config) -> PeerService:
        hub = Hub(config, self.clock, node=node)
        svc = PeerService(config, hub, node, self.clock)
        svc._add_dialler = lambda d: (  # type: ignore[method-assign]
            self.dialled.append((d.key, d.host, d.port)),
            svc.diallers.__setitem__(d.key, d),
        )
        svc.startService()
        return svc

    def known(self, node: NodeIdentity, address: str = "192.168.1.20", port: int = 5100) -> Any:
        from robonet.services.discovery import KnownNode

        return KnownNode(
            node.node_id, node.name, "lab", "0.1.0", node.hash, address, address, port, {}, 0.0, 0.0
        )

    def test_smaller_node_dials(self) -> None:
        """With a secret, the node with the smaller id dials discovered nodes; the larger waits."""
        a = self.service(NODE_B, make_config())
        a._on_node("node_found", self.known(NODE_C))
        a._on_node("node_found", self.known(NODE_A))
        self.assertEqual(self.dialled, [(f"node:{NODE_C.node_id}", "192.168.1.20", 5100)])

    def test_no_secret_only_loopback(self) -> None:
        """Without a secret, discovered nodes are dialled only on loopback addresses."""
        a = self.service(NODE_A, make_config(secret=""))
        a._on_node("node_found", self.known(NODE_B))
        self.assertEqual(self.dialled, [])
        a._on_node("node_found", self.known(NODE_C, address="127.0.0.1"))
        self.assertEqual(self.dialled, [(f"node:{NODE_C.node_id}", "127.0.0.1", 5100)])

    def test_auto_off(self) -> None:
        """peers.auto = false dials no discovered node."""
        a = self.service(NODE_A, make_config(auto=False))
        a._on_node("node_found", self.known(NODE_B))
        self.assertEqual(self.dialled, [])

    def test_moved_node_redialled_and_lost_node_dropped(self) -> None:
        """A node that changes address gets a new dialler; a lost node without a link is dropped."""
        a = self.service(NODE_A, make_config())
        a._on_node("node_found", self.known(NODE_B))
        a._on_node("node_updated", self.known(NODE_B, port=5200))
        self.assertEqual([p for _, _, p in self.dialled], [5100, 5200])
        a._on_node("node_lost", self.known(NODE_B, port=5200))
        self.assertEqual(a.diallers, {})
        entry = a.peer_list()
        self.assertEqual(entry, {"peers": []})


class FakeChannel:
    """A PeerChannel that records the frames a PeerLink writes (no transport: no producer)."""

    transport = None

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed: list[tuple[str, str]] = []

    def write_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close_with_error(self, code: str, message: str) -> None:
        self.closed.append((code, message))


class AckChecksumTests(PeerTestCase):
    """The ack of a forwarded peer_command carries the additive sum of the payload we sent."""

    def setUp(self) -> None:
        super().setUp()
        self.a = self.side(NODE_A)
        self.channel = FakeChannel()
        from robonet.services.peerlink import PeerLink

        self.link = PeerLink(
            self.a.svc,
            self.channel,
            PeerInfo(NODE_B.node_id, "hub-b", "0.1.0"),
            address="127.0.0.1:5100",
            authenticated=True,
            dialled=True,
        )

    def send(self) -> tuple[defer.Deferred[Any], int, int]:
        """Forward one command; returns its Deferred, the frame's id and its payload's sum."""
        d = self.link.send_command(Command("robot_move", {"type": "robot_move", "x": 1}, "w", "robot_01"))
        frame = self.channel.frames[-1]
        payload = frame[4:]
        obj = orjson.loads(payload)
        self.assertEqual(obj["type"], "peer_command")
        return d, obj["id"], sum(payload) & 0xFFFFFFFF

    def ack(self, obj: dict[str, Any]) -> None:
        self.link.frame_received(obj, orjson.dumps(obj))

    def test_right_sum_acks(self) -> None:
        """An ack whose sum matches completes the delivery."""
        d, mid, checksum = self.send()
        self.ack({"type": "ack", "id": mid, "sum": checksum})
        self.assertIsNone(self.successResultOf(d))
        self.assertNotIn("bad_checksum", self.a.hub.stats.errors)

    def test_wrong_sum_fails_and_is_counted(self) -> None:
        """An ack with another sum (the peer got other bytes) fails the delivery with bad_checksum."""
        d, mid, checksum = self.send()
        self.ack({"type": "ack", "id": mid, "sum": (checksum + 1) & 0xFFFFFFFF})
        self.assertEqual(self.failureResultOf(d, HubError).value.code, "bad_checksum")
        self.assertEqual(self.a.hub.stats.errors["bad_checksum"], 1)

    def test_non_integer_sum_fails(self) -> None:
        """A sum that is not an integer is a mismatch too."""
        d, mid, checksum = self.send()
        self.ack({"type": "ack", "id": mid, "sum": str(checksum)})
        self.assertEqual(self.failureResultOf(d, HubError).value.code, "bad_checksum")

    def test_peer_command_device_id_rule(self) -> None:
        """A peer_command whose device_id breaks the envelope's id rule is bad_frame, never routed."""
        for bad in (5, "", "a b", "x" * 129, None):
            self.channel.frames.clear()
            self.link.frame_received(
                {"type": "peer_command", "id": 4, "device_id": bad, "command": {"type": "stop"}}, b"{}"
            )
            [frame] = self.channel.frames
            err = orjson.loads(frame[4:])
            self.assertEqual((err["type"], err["code"], err["ref"]), ("error", "bad_frame", 4), bad)

    def test_sum_is_optional(self) -> None:
        """An ack without sum is accepted (the sum is optional for senders)."""
        d, mid, _ = self.send()
        self.ack({"type": "ack", "id": mid})
        self.assertIsNone(self.successResultOf(d))


class WiringTests(unittest.SynchronousTestCase):
    """tap.build_service builds the PeerService whenever the bot link listens; peers.accept and
    peers.auto decide what it does (no sockets: nothing but the PeerService is started)."""

    def build(self, discovery: bool = False, **peers_cfg: Any) -> tuple[Hub, PeerService | None, Any]:
        from robonet.tap import build_service

        config = load_config(
            environ={},
            overrides={
                "hub": {"project_id": "lab", "state_dir": self.mktemp()},
                "peers": {"secret": SECRET, **peers_cfg},
                "discovery": {"enabled": discovery, "mdns": False},
                "store": {"enabled": False},
                "camera": {"enabled": False},
                "web": {"listen": []},
                "line": {"listen": []},
            },
        )
        clock = task.Clock()
        top = build_service(config, clock)
        hub = top.getServiceNamed("hub")
        peers = top.namedServices.get("peers")
        if peers is not None:
            peers.startService()
            self.addCleanup(peers.stopService)
        return hub, peers, clock

    def hello(self, hub: Hub, clock: task.Clock, host: str = "10.1.2.3") -> dict[str, Any]:
        """Send a peer hello to this hub's bot link; return its first answer."""
        factory = BotLinkFactory(hub, hub.config.botlink, clock, hub.config.auth)
        addr = IPv4Address("TCP", host, 40000)
        proto = factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        proto.dataReceived(encode_obj(DiallerHandshake(NODE_C, SECRET).hello()))
        frames = [orjson.loads(p) for p in FrameDecoder(1 << 20).feed(transport.value())]
        self.addCleanup(transport.loseConnection)
        return frames[0]  # type: ignore[no-any-return]

    def test_accepts_without_static_or_discovery(self) -> None:
        """No peers.static, no discovery: an authenticated peer hello still gets a challenge
        (before: ``bad_hello: this hub does not accept peer links``)."""
        hub, peers, clock = self.build()
        self.assertIsNotNone(peers)
        self.assertIs(hub.peer_acceptor, peers)
        self.assertEqual(self.hello(hub, clock)["type"], "challenge")

    def test_accept_false_refuses(self) -> None:
        """peers.accept = false: the service runs (peer_list) but peer hellos are refused."""
        hub, peers, clock = self.build(accept=False)
        self.assertIs(hub.peers, peers)
        self.assertIsNone(hub.peer_acceptor)
        answer = self.hello(hub, clock)
        self.assertEqual((answer["type"], answer["code"]), ("error", "bad_hello"))
        self.assertEqual(hub.stats.errors["bad_hello"], 1)

    def test_no_bot_link_no_peer_service(self) -> None:
        """Without a bot link listener there is nothing to link over: no PeerService."""
        from robonet.tap import build_service

        config = load_config(
            environ={},
            overrides={
                "hub": {"state_dir": self.mktemp()},
                "botlink": {"listen": []},
                "discovery": {"enabled": False},
                "store": {"enabled": False},
                "camera": {"enabled": False},
                "web": {"listen": []},
                "line": {"listen": []},
            },
        )
        top = build_service(config, task.Clock())
        self.assertNotIn("peers", top.namedServices)

    def test_peer_list_shows_discovered_with_auto_off(self) -> None:
        """peers.auto = false and no static entry: discovered hubs are still listed (discovered)."""
        from robonet.services.discovery import KnownNode

        hub, peers, clock = self.build(auto=False, discovery=True)
        assert peers is not None
        discovery = peers.discovery
        self.assertIsNotNone(discovery)
        node = KnownNode(
            NODE_B.node_id,
            "hub-b",
            "lab",
            "0.1.0",
            NODE_B.hash,
            "192.168.1.20",
            "192.168.1.20",
            5100,
            {},
            0.0,
            0.0,
        )
        discovery.nodes[node.node_id] = node
        result = self.successResultOf(hub.request("peer_list", None, "test"))
        [entry] = result["peers"]
        self.assertEqual((entry["node_id"], entry["state"]), (NODE_B.node_id, "discovered"))
        self.assertEqual(peers.diallers, {})
