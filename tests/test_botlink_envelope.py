"""Regression tests (issue 11) for the bot link's use of the shared robonet/1 envelope.

Each test failed on main before the envelope: a non-string device_id broadcast a command, command
acks' sums were not checked, device ids were judged by a face-specific rule, the Cartobot
per-IP table grew forever and polls did not refresh last_seen.
"""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from robonet.protocols.botlink import encode_frame
from robonet.protocols.botlink_framing import LEGACY_POLL
from tests.test_botlink import CLIENT_IP, Wire, make_hub

SPEC_PAYLOAD = b'{"type": "system_status", "message": "hi"}'


class CommandTargetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)
        self.robots = []
        for rid in ("r1", "r2"):
            w = Wire(self.factory)
            w.hello(role="robot", device_id=rid)
            self.robots.append(w)
        self.client = Wire(self.factory, ip=CLIENT_IP)
        self.client.hello(role="client", device_id="script")

    def test_non_string_device_id_is_error_not_broadcast(self) -> None:
        """A command with device_id 5 reaches no robot; the sender gets bad_frame with its ref."""
        for bad in (5, True, ["r1"], {"id": "r1"}, "", "r 1"):
            self.client.send({"type": "stop", "id": 9, "device_id": bad})
            err = self.client.one()
            self.assertEqual((err["type"], err["code"], err["ref"]), ("error", "bad_frame", 9), bad)
            for robot in self.robots:
                self.assertEqual(robot.written(), b"", bad)
        self.assertEqual(self.hub.stats.errors["bad_frame"], 6)

    def test_no_device_id_still_broadcasts(self) -> None:
        """Without device_id (or with null) the command goes to every robot, as before."""
        self.client.send({"type": "stop", "device_id": None})
        for robot in self.robots:
            self.assertEqual(robot.one()["type"], "stop")


class AckChecksumTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)
        self.robot = Wire(self.factory)
        self.robot.hello(role="robot", device_id="r1")
        self.client = Wire(self.factory, ip=CLIENT_IP)
        self.client.hello(role="client", device_id="script")

    def sent_command(self) -> tuple[dict[str, object], int]:
        self.client.send({"type": "stop", "id": 4, "device_id": "r1"})
        raw = self.robot.written()
        payload = raw[4:]
        return orjson.loads(payload), sum(payload) & 0xFFFFFFFF

    def test_matching_sum(self) -> None:
        """An ack with the right sum resolves the command; nothing counted."""
        cmd, s = self.sent_command()
        self.robot.send({"type": "ack", "id": cmd["id"], "sum": s})
        self.assertEqual(self.client.one()["type"], "ack")
        self.assertNotIn("bad_checksum", self.hub.stats.errors)

    def test_wrong_sum_counted(self) -> None:
        """An ack with another sum is counted as bad_checksum (as on the line link), still resolves."""
        cmd, s = self.sent_command()
        self.robot.send({"type": "ack", "id": cmd["id"], "sum": s + 1})
        self.assertEqual(self.client.one()["type"], "ack")
        self.assertEqual(self.hub.stats.errors["bad_checksum"], 1)


class DeviceIdRuleTests(SynchronousTestCase):
    def test_hello_device_id_rule(self) -> None:
        """The bot link applies the one device-id rule: spaces and control characters are refused."""
        hub, factory, _ = make_hub(self)
        for bad in ("a b", "a\x00", "x" * 129):
            w = Wire(factory)
            w.send({"type": "hello", "proto": 1, "role": "robot", "device_id": bad})
            self.assertEqual(w.one()["code"], "bad_hello", bad)
            self.assertTrue(w.closed)
        self.assertEqual(hub.registry.devices(), [])


class LegacyBoundedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)

    def test_entries_removed_after_expiry(self) -> None:
        """One Cartobot entry per IP only while the bot is online; none once all expired."""
        for i in range(50):
            w = Wire(self.factory, ip=f"198.51.100.{i}")
            w.raw(encode_frame(SPEC_PAYLOAD))
            w.lose()
        self.assertEqual(len(self.factory.legacy), 50)
        self.clock.advance(self.factory.config.idle_timeout + 1)
        self.assertEqual(len(self.factory.legacy), 0)
        self.assertEqual(len(self.factory.limiter), 0)
        w = Wire(self.factory, ip="198.51.100.1")
        w.raw(encode_frame(SPEC_PAYLOAD))
        self.assertEqual(w.written(), bytes.fromhex("00000E2841434B00"))
        self.assertEqual(self.hub.registry.get("bot-198.51.100.1").status, "online")  # type: ignore[union-attr]

    def test_poll_refreshes_last_seen(self) -> None:
        """A REQUEST_INSTRUCTION poll moves the bot's last_seen to the poll's time."""
        w = Wire(self.factory)
        w.raw(encode_frame(SPEC_PAYLOAD))
        w.lose()
        dev = self.hub.registry.get(f"bot-{w.addr.host}")
        assert dev is not None
        first = dev.as_dict()["last_seen"]
        self.clock.advance(5)
        p = Wire(self.factory)
        p.raw(LEGACY_POLL)
        self.assertEqual(dev.as_dict()["last_seen"], first + 5)
