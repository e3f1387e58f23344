"""The camera face's three ports (spec/camera.md, HARDENING.md camera rows) and its web API.

Protocols are driven with StringTransport and task.Clock; one loopback test runs a client that
behaves like the original desktop client (single recv of exactly 6, then exactly LEN+1 bytes).
"""

from __future__ import annotations

import io
import os
import random
import socket
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import psutil
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from robonet.config import ConfigError, load_config
from robonet.protocols import camera as c
from robonet.protocols.camera import Packet, PacketDecoder
from robonet.services.camera import CameraService, make_camera_service
from robonet.services.camera_web import camera_resources

PASSWORD = "letmein"


# --- fakes ----------------------------------------------------------------------------------------


class FakeStats:
    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.msgs_in: Counter[str] = Counter()
        self.msgs_out: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] += count

    def count_in(self, mtype: str, nbytes: int = 0) -> None:
        self.msgs_in[mtype] += 1

    def count_out(self, mtype: str, nbytes: int = 0) -> None:
        self.msgs_out[mtype] += 1

    def connection(self, face: str, delta: int) -> None:
        self.connections[face] += delta


class FakeRegistry:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def field(self, path: str) -> Any:
        return self.values.get(path)


class FakeHub:
    """The part of robonet.hub.Hub the camera service uses."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.registry = FakeRegistry()
        self.stats = FakeStats()
        self.published: list[tuple[str, str, dict[str, Any], str, str]] = []

    def publish_local(self, device_id: str, type: str, body: dict[str, Any], *, face: str, role: str) -> None:
        self.published.append((device_id, type, body, face, role))


class RecordingTransport(StringTransport):
    """A StringTransport that also keeps every write separately (one write must be one packet)."""

    def __init__(self, ip: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", ip, 40000))
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def one_packet_per_write(test: SynchronousTestCase, writes: list[bytes]) -> list[Packet]:
    """Assert every write is exactly one whole, valid packet; return them."""
    out = []
    for w in writes:
        items = PacketDecoder(65535).feed(w)
        test.assertEqual(len(items), 1, w.hex())
        assert isinstance(items[0], Packet)
        test.assertEqual(c.encode_packet(items[0].id, items[0].type, items[0].payload), w)
        out.append(items[0])
    return out


def make_config(state_dir: str, **camera: Any) -> Any:
    base: dict[str, Any] = {
        "data_listen": "none",
        "settings_listen": "none",
        "auth_listen": "none",
        "password": PASSWORD,
    }
    base.update(camera)
    return load_config(environ={}, overrides={"hub": {"state_dir": state_dir}, "camera": base})


def connect(factory: Any, ip: str = "10.1.1.1") -> tuple[Any, RecordingTransport]:
    proto = factory.buildProtocol(IPv4Address("TCP", ip, 40000))
    transport = RecordingTransport(ip)
    proto.makeConnection(transport)
    return proto, transport


def close(proto: Any) -> None:
    proto.connectionLost(Failure(ConnectionDone()))


class CameraCase(SynchronousTestCase):
    """A started CameraService (pipeline off, no listeners) on a task.Clock in a temporary state dir."""

    require_auth = True

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, ignore_errors=True))
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.camera = self.make(require_auth=self.require_auth)

    def make(self, **camera: Any) -> CameraService:
        config = make_config(self.dir, **camera)
        self.hub = FakeHub(config)
        svc = make_camera_service(config, self.hub, self.clock)
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    def authenticate(self, ip: str = "10.1.1.1") -> None:
        self.assertIs(
            self.camera.gate.attempt(ip, PASSWORD.encode(), self.clock.seconds()), c.AuthResult.SUCCESS
        )


# --- data port ------------------------------------------------------------------------------------


class DataPortTests(CameraCase):
    require_auth = False

    def test_rate_and_format(self) -> None:
        """From accept, one 16-byte sample every 1/24 s, one write each, value 0..10, timestamp in ms."""
        proto, t = connect(self.camera.data_factory)
        for _ in range(48):
            self.clock.advance(1 / 24)
        packets = one_packet_per_write(self, t.writes)
        self.assertEqual(len(packets), 49)
        for p in packets:
            self.assertEqual((p.id, p.type, len(p.payload)), (1, 0, 9))
            self.assertLessEqual(p.payload[0], 10)
        self.assertEqual(int.from_bytes(packets[0].payload[1:], "big"), 1_700_000_000_000)
        close(proto)

    def test_no_drift(self) -> None:
        """Late ticks do not shift the schedule: the next sample is always due at start + k/24 s."""
        start = self.clock.seconds()
        proto, t = connect(self.camera.data_factory)
        for step in [0.01, 0.05, 0.003, 0.03, 0.02] * 40:
            self.clock.advance(step)
            (due,) = [d.getTime() for d in self.clock.getDelayedCalls()]
            k = (due - start) * 24
            self.assertLess(abs(k - round(k)), 1e-3)
        self.assertGreater(len(t.writes), 100)
        close(proto)

    def test_paused_client_loses_samples_then_closed(self) -> None:
        """While the transport is paused samples are skipped (counted), never queued; after
        slow_timeout (30 s) the client is closed; other clients are unaffected."""
        slow, st = connect(self.camera.data_factory, "10.0.0.1")
        fast, ft = connect(self.camera.data_factory, "10.0.0.2")
        slow.pauseProducing()
        for _ in range(24 * 10):
            self.clock.advance(1 / 24)
        self.assertEqual(len(st.writes), 1)
        self.assertGreaterEqual(self.hub.stats.drops["camera_slow_reader"], 239)
        slow.resumeProducing()
        self.clock.advance(1 / 24)
        self.assertEqual(len(st.writes), 2)
        slow.pauseProducing()
        for _ in range(24 * 31):
            self.clock.advance(1 / 24)
        self.assertTrue(st.disconnected)
        self.assertEqual(self.hub.stats.errors["camera_slow_reader"], 1)
        self.assertFalse(ft.disconnecting)
        self.assertGreater(len(ft.writes), 24 * 40)
        close(slow)
        close(fast)

    def test_registry_source(self) -> None:
        """data_source "robot_01.battery" reads the registry: clamped to 0..255, None/garbage -> 0."""
        camera = self.make(data_source="robot_01.battery", require_auth=False)
        proto, t = connect(camera.data_factory)
        values = [87.9, None, 300, -5, "12", "abc", float("nan"), True]
        expected = [87, 0, 255, 0, 12, 0, 0, 1]
        for v in values:
            self.hub.registry.values["robot_01.battery"] = v
            self.clock.advance(1 / 24)
        got = [p.payload[0] for p in one_packet_per_write(self, t.writes)[1:]]
        self.assertEqual(got, expected)
        close(proto)

    def test_client_bytes_ignored(self) -> None:
        """Bytes sent to the data port are discarded; the stream continues."""
        proto, t = connect(self.camera.data_factory)
        proto.dataReceived(os.urandom(10000))
        self.clock.advance(1 / 24)
        self.assertEqual(len(t.writes), 2)
        close(proto)

    def test_per_ip_cap(self) -> None:
        """More than max_per_ip connections from one IP are closed at once; others are fine."""
        camera = self.make(max_per_ip=3, require_auth=False)
        conns = [connect(camera.data_factory, "10.9.9.9") for _ in range(4)]
        self.assertTrue(conns[3][1].disconnecting)
        self.assertEqual(conns[3][1].writes, [])
        self.assertFalse(any(t.disconnecting for _, t in conns[:3]))
        close(conns[0][0])
        p, t = connect(camera.data_factory, "10.9.9.9")
        self.assertFalse(t.disconnecting)
        self.assertEqual(self.hub.stats.errors["camera_too_many_connections"], 1)
        self.assertEqual(camera.data_factory.limiter.count("10.9.9.9"), 3)
        for proto, _ in [*conns[1:3], (p, t)]:
            close(proto)
        self.assertEqual(len(camera.data_factory.limiter), 0, "entries are deleted at zero")


class RequireAuthTests(CameraCase):
    def test_data_refused_without_auth(self) -> None:
        """With require_auth, a data connection from an IP that has not authenticated is closed at
        once and gets no packet; after auth it streams; after auth_ttl it is refused again."""
        proto, t = connect(self.camera.data_factory, "10.2.2.2")
        self.assertTrue(t.disconnecting)
        self.clock.advance(1)
        self.assertEqual(t.value(), b"")
        close(proto)
        self.assertEqual(self.hub.stats.errors["camera_unauthorised"], 1)
        self.assertEqual(len(self.camera.data_factory.limiter), 0, "a refused connection holds no slot")
        self.authenticate("10.2.2.2")
        proto, t = connect(self.camera.data_factory, "10.2.2.2")
        self.assertFalse(t.disconnecting)
        self.assertEqual(len(t.writes), 1)
        close(proto)
        self.clock.advance(43200)
        proto, t = connect(self.camera.data_factory, "10.2.2.2")
        self.assertTrue(t.disconnecting)
        close(proto)

    def test_settings_refused_without_auth(self) -> None:
        """An unauthenticated settings connection is closed; its update is never applied."""
        proto, t = connect(self.camera.settings_factory, "10.3.3.3")
        self.assertTrue(t.disconnecting)
        proto.dataReceived(c.encode_settings_update(bytes([50, 2, 20, 20, 20, 200])))
        proto.dataReceived(c.SETTINGS_REQUEST)
        self.assertEqual(t.value(), b"")
        self.assertEqual(self.camera.settings, c.CameraSettings())
        close(proto)


# --- settings port --------------------------------------------------------------------------------


class SettingsPortTests(CameraCase):
    require_auth = False

    def settings_file(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(Path(self.dir, "camera_settings.json").read_bytes())
        return data

    def test_request_response(self) -> None:
        """LEN 0 request -> the settings response, byte for byte, in one write."""
        proto, t = connect(self.camera.settings_factory)
        proto.dataReceived(c.SETTINGS_REQUEST)
        self.assertEqual(t.writes, [bytes.fromhex("00FF0200000964010A0A0A7F000000E4")])
        self.assertFalse(t.disconnecting)

    def test_valid_update(self) -> None:
        """A valid update: no reply, applied, persisted (six keys, original units), published."""
        proto, t = connect(self.camera.settings_factory)
        raw = bytes([50, 4, 23, 15, 12, 191])
        proto.dataReceived(c.encode_settings_update(raw))
        self.assertEqual(t.writes, [])
        expected = c.CameraSettings(5000, 4, 2.3, 1.5, 1.2, 191 / 127.5 - 1.0)
        self.assertEqual(self.camera.settings, expected)
        self.assertEqual(self.settings_file(), expected.as_dict())
        self.assertIn(
            ("camera", "camera_settings", expected.as_dict(), "camera", "camera"), self.hub.published
        )
        proto.dataReceived(c.SETTINGS_REQUEST)
        self.assertEqual(t.writes, [c.encode_settings_response(raw)])

    def test_out_of_range_update(self) -> None:
        """Any out-of-range byte -> settings rejected; nothing changes (memory, file, dashboards)."""
        proto, t = connect(self.camera.settings_factory)
        before = self.settings_file()
        for index, bad in ((0, 0), (0, 101), (1, 0), (1, 17), (2, 51), (3, 0), (4, 21)):
            raw = bytearray(bytes([50, 4, 23, 15, 12, 191]))
            raw[index] = bad
            proto.dataReceived(c.encode_settings_update(bytes(raw)))
        self.assertEqual(t.writes, [c.SETTINGS_REJECTED] * 7)
        self.assertEqual(self.camera.settings, c.CameraSettings())
        self.assertEqual(self.settings_file(), before)
        self.assertFalse([p for p in self.hub.published if p[1] == "camera_settings"])
        self.assertEqual(self.hub.stats.errors["camera_settings_rejected"], 7)

    def test_bad_checksum(self) -> None:
        """An update with a wrong XOR is dropped without reply, counted; the connection still works."""
        proto, t = connect(self.camera.settings_factory)
        bad = bytearray(c.encode_settings_update(bytes([50, 4, 23, 15, 12, 191])))
        bad[-1] ^= 1
        proto.dataReceived(bytes(bad))
        self.assertEqual(t.writes, [])
        self.assertEqual(self.camera.settings, c.CameraSettings())
        self.assertEqual(self.hub.stats.errors["camera_bad_checksum"], 1)
        proto.dataReceived(c.SETTINGS_REQUEST)
        self.assertEqual(len(t.writes), 1)

    def test_bad_magic_resync(self) -> None:
        """Garbage before a request is skipped (counted) and the request answered."""
        proto, t = connect(self.camera.settings_factory)
        proto.dataReceived(b"\x01\x02\xff\x00\x03" + c.SETTINGS_REQUEST)
        self.assertEqual(len(t.writes), 1)
        self.assertEqual(self.hub.stats.errors["camera_bad_magic"], 1)

    def test_len_65535(self) -> None:
        """LEN 65535 closes the connection at the header; nothing is buffered or applied."""
        proto, t = connect(self.camera.settings_factory)
        proto.dataReceived(bytes.fromhex("00FF0201FFFF") + b"\x01" * 1000)
        self.assertTrue(t.disconnected)
        self.assertEqual(proto.decoder.pending, 0)
        self.assertEqual(self.hub.stats.errors["camera_too_long"], 1)

    def test_len_larger_than_payload(self) -> None:
        """A packet whose LEN exceeds what arrives is closed by the per-packet deadline (5 s)."""
        proto, t = connect(self.camera.settings_factory)
        proto.dataReceived(bytes.fromhex("00FF02010006") + b"\x32\x04\x17")
        self.clock.advance(4.9)
        self.assertFalse(t.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(t.disconnected)
        self.assertEqual(self.hub.stats.errors["camera_packet_timeout"], 1)
        self.assertEqual(self.camera.settings, c.CameraSettings())

    def test_dribble(self) -> None:
        """A byte every 2 s does not extend the deadline of the packet it belongs to."""
        proto, t = connect(self.camera.settings_factory)
        for b in c.SETTINGS_REQUEST[:3]:
            proto.dataReceived(bytes([b]))
            self.clock.advance(2)
        self.assertTrue(t.disconnected)
        self.assertEqual(t.writes, [])

    def test_deadline_per_packet(self) -> None:
        """The deadline is per packet: many packets over a long connection are fine."""
        proto, t = connect(self.camera.settings_factory)
        for _ in range(10):
            proto.dataReceived(c.SETTINGS_REQUEST[:4])
            self.clock.advance(3)
            proto.dataReceived(c.SETTINGS_REQUEST[4:])
            self.clock.advance(3)
        self.assertFalse(t.disconnecting)
        self.assertEqual(len(t.writes), 10)

    def test_truncated_then_close(self) -> None:
        """A truncated update followed by close is discarded and counted."""
        proto, t = connect(self.camera.settings_factory)
        proto.dataReceived(c.encode_settings_update(bytes([50, 4, 23, 15, 12, 191]))[:-2])
        close(proto)
        self.assertEqual(self.camera.settings, c.CameraSettings())
        self.assertEqual(self.hub.stats.errors["camera_truncated"], 1)
        self.clock.advance(10)  # the deadline was cancelled: nothing fires on a closed connection

    def test_unknown_packets_dropped(self) -> None:
        """Other IDs, TYPEs and LENs are dropped and counted, no reply, connection kept."""
        proto, t = connect(self.camera.settings_factory)
        for p in (
            c.encode_packet(2, 0),
            c.encode_packet(2, 2),
            c.encode_packet(1, 1),
            c.encode_packet(0, 1, b"1111"),
            c.encode_packet(2, 1, b"\x01\x02\x03"),
            c.encode_packet(2, 1, b"\x64\x01\x0a\x0a\x0a\x7f\x00\x00\x00"),
            c.encode_packet(9, 9, b"x" * 64),
        ):
            proto.dataReceived(p)
        self.assertEqual(t.writes, [])
        self.assertFalse(t.disconnecting)
        self.assertEqual(self.hub.stats.errors["camera_bad_packet"], 7)
        self.assertEqual(self.camera.settings, c.CameraSettings())

    def test_random_megabyte(self) -> None:
        """1 MB of random bytes is never acted on; a good client is served afterwards."""
        proto, t = connect(self.camera.settings_factory)
        blob = random.Random(99).randbytes(1 << 20)
        for i in range(0, len(blob), 65536):
            proto.dataReceived(blob[i : i + 65536])
        self.assertEqual(self.camera.settings, c.CameraSettings())
        self.assertFalse(
            any(
                p.id == 2 and p.type == 0
                for p in PacketDecoder(65535).feed(t.value())
                if isinstance(p, Packet)
            )
        )
        self.clock.advance(10)
        self.assertTrue(t.disconnecting)
        close(proto)
        good, gt = connect(self.camera.settings_factory)
        good.dataReceived(c.SETTINGS_REQUEST)
        self.assertEqual(len(gt.writes), 1)

    def test_same_settings_no_restart(self) -> None:
        """Re-sending the current settings changes nothing and publishes nothing."""
        proto, t = connect(self.camera.settings_factory)
        proto.dataReceived(c.encode_settings_update(c.settings_to_bytes(c.CameraSettings())))
        self.assertEqual(self.camera.settings.brightness, 0.0)
        self.assertFalse([p for p in self.hub.published if p[1] == "camera_settings"])


# --- auth port ------------------------------------------------------------------------------------


class AuthPortTests(CameraCase):
    def attempt(self, data: bytes, ip: str = "10.5.5.5") -> RecordingTransport:
        proto, t = connect(self.camera.auth_factory, ip)
        proto.dataReceived(data)
        close(proto)
        return t

    def test_success(self) -> None:
        """The right password -> "ready" in one write, then close; the IP is now authorised."""
        t = self.attempt(c.encode_auth_request(PASSWORD.encode()))
        self.assertEqual(t.writes, [c.AUTH_SUCCESS])
        self.assertTrue(t.disconnecting)
        self.assertTrue(self.camera.gate.allowed("10.5.5.5", self.clock.seconds()))

    def test_failure(self) -> None:
        """A wrong password -> auth failure, then close; not authorised."""
        t = self.attempt(c.encode_auth_request(b"1111"))
        self.assertEqual(t.writes, [c.AUTH_FAILURE])
        self.assertTrue(t.disconnecting)
        self.assertFalse(self.camera.gate.allowed("10.5.5.5", self.clock.seconds()))

    def test_split_request(self) -> None:
        """A request split into single bytes is still one request."""
        proto, t = connect(self.camera.auth_factory)
        for b in c.encode_auth_request(PASSWORD.encode()):
            proto.dataReceived(bytes([b]))
        self.assertEqual(t.writes, [c.AUTH_SUCCESS])

    def test_bad_input_closes_without_reply(self) -> None:
        """Bad checksum, bad magic, wrong id/type, empty password, LEN > 256: closed, no reply."""
        bad_chk = bytearray(c.encode_auth_request(PASSWORD.encode()))
        bad_chk[-1] ^= 0xFF
        for data in (
            bytes(bad_chk),
            b"GET / HTTP/1.0\r\n\r\n",
            c.encode_packet(2, 1, PASSWORD.encode()),
            c.encode_packet(0, 0, PASSWORD.encode()),
            c.encode_packet(0, 1),
            bytes.fromhex("00FF0001FFFF"),
        ):
            t = self.attempt(data)
            self.assertEqual(t.writes, [], data)
            self.assertTrue(t.disconnecting, data)
        self.assertFalse(self.camera.gate.allowed("10.5.5.5", self.clock.seconds()))
        self.assertEqual(self.hub.stats.errors["camera_bad_checksum"], 1)

    def test_request_deadline(self) -> None:
        """No complete request within 5 s of connecting -> closed without reply (also when dribbled)."""
        proto, t = connect(self.camera.auth_factory)
        self.clock.advance(4.9)
        self.assertFalse(t.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(t.disconnected)
        close(proto)
        proto, t = connect(self.camera.auth_factory)
        for b in c.encode_auth_request(PASSWORD.encode())[:-1]:
            proto.dataReceived(bytes([b]))
            self.clock.advance(0.5)
        self.assertTrue(t.disconnected)
        self.assertEqual(t.writes, [])
        self.assertEqual(self.hub.stats.errors["camera_auth_timeout"], 2)

    def test_thousand_wrong_passwords(self) -> None:
        """1,000 wrong passwords from one IP: 5 checked, then at most 10 failure answers a minute
        (unchecked: the right password fails too), the rest closed without reply; other IPs fine;
        a minute after the failures the right password works again."""
        replies: Counter[bytes] = Counter()
        for i in range(1000):
            t = self.attempt(c.encode_auth_request(b"guess%d" % i), "6.6.6.6")
            replies[b"".join(t.writes)] += 1
        self.assertEqual(replies[c.AUTH_FAILURE], 15)
        self.assertEqual(replies[b""], 985)
        self.assertEqual(self.attempt(c.encode_auth_request(PASSWORD.encode()), "6.6.6.6").writes, [])
        self.assertFalse(self.camera.gate.allowed("6.6.6.6", self.clock.seconds()))
        self.assertEqual(
            self.attempt(c.encode_auth_request(PASSWORD.encode()), "7.7.7.7").writes, [c.AUTH_SUCCESS]
        )
        self.clock.advance(61)
        self.assertEqual(
            self.attempt(c.encode_auth_request(PASSWORD.encode()), "6.6.6.6").writes, [c.AUTH_SUCCESS]
        )


class PasswordTests(CameraCase):
    def test_generated_password(self) -> None:
        """Without camera.password a random password is generated into <state_dir>/camera_password
        (mode 0600), reused on the next start, and never logged."""
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            camera = self.make(password="")
        path = Path(self.dir, "camera_password")
        password = path.read_text().strip()
        self.assertGreaterEqual(len(password), 16)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        texts = " ".join(str(e) for e in events)
        self.assertIn(str(path), texts)
        self.assertNotIn(password, texts)
        self.assertIs(camera.gate.attempt("1.2.3.4", password.encode(), 0), c.AuthResult.SUCCESS)
        again = self.make(password="")
        self.assertIs(again.gate.attempt("1.2.3.5", password.encode(), 0), c.AuthResult.SUCCESS)
        self.assertIs(again.gate.attempt("1.2.3.6", b"", 0), c.AuthResult.FAILURE)


# --- the original client, scripted -----------------------------------------------------------------


class OriginalClientScriptTests(CameraCase):
    def test_session(self) -> None:
        """The desktop client's session on fake transports: probes, auth, data, settings request and
        update; every server write is exactly one packet."""
        writes: list[bytes] = []
        for factory in (self.camera.data_factory, self.camera.settings_factory, self.camera.auth_factory):
            proto, t = connect(factory, "10.7.7.7")
            close(proto)
            writes += t.writes
        self.assertEqual(writes, [])
        auth, at = connect(self.camera.auth_factory, "10.7.7.7")
        auth.dataReceived(c.encode_auth_request(PASSWORD.encode()))
        close(auth)
        data, dt = connect(self.camera.data_factory, "10.7.7.7")
        settings, st = connect(self.camera.settings_factory, "10.7.7.7")
        settings.dataReceived(c.SETTINGS_REQUEST)
        for _ in range(24):
            self.clock.advance(1 / 24)
        settings.dataReceived(c.encode_settings_update(bytes([80, 2, 12, 14, 10, 127])))
        settings.dataReceived(c.SETTINGS_REQUEST)
        self.assertEqual(one_packet_per_write(self, at.writes), [Packet(0, 0, b"ready")])
        self.assertEqual(len(one_packet_per_write(self, dt.writes)), 25)
        sp = one_packet_per_write(self, st.writes)
        self.assertEqual(
            [p.payload for p in sp],
            [bytes.fromhex("64010A0A0A7F000000"), bytes([80, 2, 12, 14, 10, 127, 0, 0, 0])],
        )
        close(data)
        close(settings)
        self.assertEqual(self.hub.stats.connections["camera"], 0)
        self.assertEqual(self.hub.stats.msgs_out["camera_data"], 25)
        self.assertEqual(self.hub.stats.msgs_in["camera_settings"], 3)


class LoopbackTests(TestCase):
    """Real sockets on 127.0.0.1 with a blocking client exactly like the original (single recv)."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, ignore_errors=True))

    def start(self, **camera: Any) -> tuple[CameraService, dict[str, int]]:
        config = make_config(self.dir, **camera)
        self.hub = FakeHub(config)
        svc = make_camera_service(config, self.hub, global_reactor)
        svc.startService()
        self.addCleanup(svc.stopService)
        ports = {}
        factory: Any
        for name, factory in (
            ("data", svc.data_factory),
            ("settings", svc.settings_factory),
            ("auth", svc.auth_factory),
        ):
            port = global_reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port  # type: ignore[attr-defined]
        return svc, ports

    @staticmethod
    def original_client(ports: dict[str, int], password: bytes) -> dict[str, Any]:
        """Runs in a thread: the original desktop client's socket calls, one recv per read."""

        def recv_packet(s: socket.socket) -> bytes:
            head = s.recv(6)
            assert len(head) == 6 and head[:2] == b"\x00\xff", head
            n = (head[4] << 8) | head[5]
            rest = s.recv(n + 1)
            assert len(rest) == n + 1, (head, rest)
            packet = head + rest
            assert c.checksum(packet[:-1]) == packet[-1]
            return packet

        out: dict[str, Any] = {}
        for p in ports.values():  # port probes: connect and close
            socket.create_connection(("127.0.0.1", p), timeout=5).close()
        with socket.create_connection(("127.0.0.1", ports["auth"]), timeout=5) as s:
            s.sendall(c.encode_auth_request(password))
            out["auth"] = recv_packet(s)
            out["auth_eof"] = s.recv(1)
        with (
            socket.create_connection(("127.0.0.1", ports["data"]), timeout=5) as d,
            socket.create_connection(("127.0.0.1", ports["settings"]), timeout=5) as st,
        ):
            out["data"] = [recv_packet(d) for _ in range(48)]
            st.sendall(c.SETTINGS_REQUEST)
            out["settings"] = recv_packet(st)
            st.sendall(c.encode_settings_update(bytes([20, 3, 11, 12, 13, 100])))
            st.sendall(c.SETTINGS_REQUEST)
            out["settings2"] = recv_packet(st)
        return out

    @inlineCallbacks
    def test_original_client(self) -> Any:
        """Probes, auth, 2 s of data at 24 Hz, settings request/update/request over real sockets,
        with the original's exact-size single reads never seeing a split packet."""
        svc, ports = self.start(rate_hz=24.0)
        out = yield deferToThread(self.original_client, ports, PASSWORD.encode())
        self.assertEqual(out["auth"], c.AUTH_SUCCESS)
        self.assertEqual(out["auth_eof"], b"")
        self.assertEqual(len(out["data"]), 48)
        stamps = [int.from_bytes(p[7:15], "big") for p in out["data"]]
        self.assertEqual(stamps, sorted(stamps))
        self.assertEqual(out["settings"], bytes.fromhex("00FF0200000964010A0A0A7F000000E4"))
        self.assertEqual(out["settings2"], c.encode_settings_response(bytes([20, 3, 11, 12, 13, 100])))
        self.assertEqual(svc.settings.shutter, 2000)

    @inlineCallbacks
    def test_non_readers_bounded(self) -> Any:
        """20 clients that never read: samples are dropped (not queued), RSS stays flat, they are
        closed after slow_timeout; a reading client keeps being served meanwhile."""
        svc, ports = self.start(rate_hz=500.0, slow_timeout=1.0, require_auth=False, max_per_ip=64)
        rss0 = psutil.Process().memory_info().rss
        socks = []
        for _ in range(20):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", ports["data"]))
            socks.append(s)

        def close_all() -> None:
            for s in socks:
                s.close()

        self.addCleanup(close_all)
        closed: Deferred[None] = Deferred()
        reader_bytes = []

        class Reader(Protocol):
            def dataReceived(self, data: bytes) -> None:
                reader_bytes.append(len(data))

        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        reader = yield connectProtocol(
            TCP4ClientEndpoint(global_reactor, "127.0.0.1", ports["data"]), Reader()
        )
        self.addCleanup(reader.transport.loseConnection)

        def check() -> None:
            slow = svc.hub.stats.errors["camera_slow_reader"] >= 20
            if slow and len(svc.data_factory.connections) == 1 and not closed.called:
                closed.callback(None)
            elif not closed.called:
                global_reactor.callLater(0.1, check)

        check()
        yield closed
        self.assertGreater(svc.hub.stats.drops["camera_slow_reader"], 20)
        self.assertLess(psutil.Process().memory_info().rss - rss0, 20 * 1024 * 1024)
        self.assertEqual(len(svc.data_factory.connections), 1)
        self.assertGreater(sum(reader_bytes), 16 * 100)

    @inlineCallbacks
    def test_idle_flood_shed(self) -> Any:
        """300 sockets that connect to the auth port and never send are closed by the request
        deadline; a real client is served meanwhile; once the flood stops, socket descriptors
        return to the baseline."""
        svc, ports = self.start(packet_timeout=0.5, max_per_ip=1000)
        sockets0 = _sockets()
        socks = []
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", ports["auth"]))
            socks.append(s)

        def close_all() -> None:
            for s in socks:
                s.close()

        self.addCleanup(close_all)
        out = yield deferToThread(self.original_client, ports, PASSWORD.encode())
        self.assertEqual(out["auth"], c.AUTH_SUCCESS)
        self.assertEqual(len(out["data"]), 48)
        # connects beyond the listen backlog are still in SYN retry; the accepted ones time out
        yield poll(lambda: svc.hub.stats.errors["camera_auth_timeout"] >= 50)
        close_all()
        yield poll(lambda: not svc.auth_factory.connections and _sockets() <= sockets0)
        self.assertEqual(len(svc.auth_factory.limiter), 0)


def _sockets() -> int:
    """Open socket file descriptors of this process (the test's and the server's)."""
    n = 0
    for f in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{f}").startswith("socket:")
        except OSError:
            pass
    return n


def poll(predicate: Any) -> Deferred[None]:
    """Fires once ``predicate()`` holds, checking every 50 ms (bounded by the test's timeout)."""
    d: Deferred[None] = Deferred()

    def check() -> None:
        if predicate():
            d.callback(None)
        else:
            global_reactor.callLater(0.05, check)

    check()
    return d


# --- configuration --------------------------------------------------------------------------------


class ConfigTests(SynchronousTestCase):
    def test_environment_overrides(self) -> None:
        """SERVER_HOST/DATA_PORT/SETTINGS_PORT/AUTH_PORT/AUTH_PASSWORD/LOG_LEVEL set the camera's
        listen addresses, password and the log level; the services listen there."""
        env = {
            "SERVER_HOST": "127.0.0.1",
            "DATA_PORT": "6000",
            "SETTINGS_PORT": "6001",
            "AUTH_PORT": "6002",
            "AUTH_PASSWORD": "pw",
            "LOG_LEVEL": "DEBUG",
        }
        with tempfile.TemporaryDirectory() as d:
            config = load_config(environ=env, overrides={"hub": {"state_dir": d}})
            self.assertEqual(config.camera.data_listen, "tcp:6000:interface=127.0.0.1")
            self.assertEqual(config.camera.settings_listen, "tcp:6001:interface=127.0.0.1")
            self.assertEqual(config.camera.auth_listen, "tcp:6002:interface=127.0.0.1")
            self.assertEqual(config.camera.password, "pw")
            self.assertEqual(config.log.level, "debug")
            svc = make_camera_service(config, FakeHub(config), Clock())
            endpoints = sorted(
                (s.endpoint._port, s.endpoint._interface) for s in svc if hasattr(s, "endpoint")
            )
            self.assertEqual(endpoints, [(6000, "127.0.0.1"), (6001, "127.0.0.1"), (6002, "127.0.0.1")])
            host_only = load_config(environ={"SERVER_HOST": "0.0.0.0"}, overrides={"hub": {"state_dir": d}})
            self.assertEqual(host_only.camera.auth_listen, "tcp:5002:interface=0.0.0.0")

    def test_disabled(self) -> None:
        """camera.enabled = false -> an empty MultiService; nothing read or written."""
        with tempfile.TemporaryDirectory() as d:
            config = load_config(
                environ={}, overrides={"hub": {"state_dir": d}, "camera": {"enabled": False}}
            )
            svc = make_camera_service(config, FakeHub(config), Clock())
            self.assertEqual(list(svc), [])
            svc.startService()
            svc.stopService()
            self.assertEqual(os.listdir(d), [])

    def test_bad_templates(self) -> None:
        """Unknown placeholders and a malformed data_source stop startup with the key named."""
        with tempfile.TemporaryDirectory() as d:
            for camera, key in (
                ({"test_argv": ["ffmpeg", "{nope}"]}, "camera.test_argv"),
                ({"encoder_argv": []}, "camera.encoder_argv"),
                ({"data_source": "battery"}, "camera.data_source"),
            ):
                config = load_config(environ={}, overrides={"hub": {"state_dir": d}, "camera": camera})
                with self.assertRaises(ConfigError) as cm:
                    make_camera_service(config, FakeHub(config), Clock())
                self.assertEqual(cm.exception.key, key)


# --- web API --------------------------------------------------------------------------------------


class WebApiTests(CameraCase):
    require_auth = False

    def request(
        self, path: str, method: bytes = b"GET", body: bytes = b"", ctype: bytes = b"application/json"
    ) -> DummyRequest:
        res = camera_resources(self.camera)[path]
        req = DummyRequest([])
        req.method = method
        req.content = io.BytesIO(body)  # type: ignore[attr-defined]
        req.requestHeaders.setRawHeaders(b"content-type", [ctype])
        req.requestHeaders.setRawHeaders(b"host", [b"hub.local:8000"])
        req.render(res)
        return req

    def test_status(self) -> None:
        """GET api/camera -> pipeline, state, restarts, fps, last_error, pid, settings, rtsp_url, ranges."""
        req = self.request("api/camera")
        body = orjson.loads(b"".join(req.written))
        for key in (
            "pipeline",
            "state",
            "restarts",
            "fps",
            "last_error",
            "pid",
            "settings",
            "rtsp_url",
            "ranges",
        ):
            self.assertIn(key, body)
        self.assertEqual(body["pipeline"], "off")
        self.assertEqual(body["settings"], c.CameraSettings().as_dict())
        self.assertEqual(body["ranges"]["brightness"], [-1.0, 1.0])

    def test_post_settings(self) -> None:
        """POST a subset in original units -> 200 with the applied settings, the same path as 5001
        (persisted, published, visible on the settings port)."""
        req = self.request("api/camera/settings", b"POST", b'{"gain": 4, "awb_red": 2.3}')
        self.assertEqual(req.responseCode, 200)
        body = orjson.loads(b"".join(req.written))
        self.assertEqual(body["settings"]["gain"], 4)
        self.assertEqual(body["settings"]["awb_red"], 2.3)
        self.assertEqual(body["settings"]["brightness"], 0.0)
        proto, t = connect(self.camera.settings_factory)
        proto.dataReceived(c.SETTINGS_REQUEST)
        self.assertEqual(t.writes, [c.encode_settings_response(bytes([100, 4, 23, 10, 10, 127]))])
        self.assertTrue([p for p in self.hub.published if p[1] == "camera_settings"])

    def test_post_errors(self) -> None:
        """Out of range, unknown key, wrong type, non-object, invalid JSON -> 400 naming the field;
        nothing changes."""
        for body, field in (
            (b'{"gain": 99}', "gain"),
            (b'{"iso": 1}', "iso"),
            (b'{"shutter": "fast"}', "shutter"),
            (b"[1]", ""),
            (b"{nope", ""),
            (b'{"brightness": 2}', "brightness"),
        ):
            req = self.request("api/camera/settings", b"POST", body)
            self.assertEqual(req.responseCode, 400, body)
            self.assertEqual(orjson.loads(b"".join(req.written))["field"], field)
        self.assertEqual(self.camera.settings, c.CameraSettings())

    def test_post_needs_json_and_same_origin(self) -> None:
        """A form post (not application/json) is 415; a foreign Origin is 403."""
        req = self.request("api/camera/settings", b"POST", b'{"gain": 2}', ctype=b"text/plain")
        self.assertEqual(req.responseCode, 415)
        res = camera_resources(self.camera)["api/camera/settings"]
        req = DummyRequest([])
        req.method = b"POST"
        req.content = io.BytesIO(b'{"gain": 2}')  # type: ignore[attr-defined]
        req.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        req.requestHeaders.setRawHeaders(b"host", [b"hub.local:8000"])
        req.requestHeaders.setRawHeaders(b"origin", [b"http://evil.example"])
        req.render(res)
        self.assertEqual(req.responseCode, 403)
        self.assertEqual(self.camera.settings, c.CameraSettings())

    def test_preview_off(self) -> None:
        """camera/preview.mjpg with the pipeline off -> 503 with a JSON error."""
        req = self.request("camera/preview.mjpg")
        self.assertEqual(req.responseCode, 503)
        self.assertIn("off", orjson.loads(b"".join(req.written))["error"])

    def test_settings_child(self) -> None:
        """api/camera has settings as a child, so the web face may mount only api/camera."""
        res = camera_resources(self.camera)["api/camera"]
        self.assertIsInstance(
            res.getChildWithDefault(b"settings", DummyRequest([])),
            type(camera_resources(self.camera)["api/camera/settings"]),
        )
