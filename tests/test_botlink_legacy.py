"""Unit tests for the bot link's legacy Cartobot dialect (spec/botlink.md, "Legacy dialect").

A Cartobot bot opens one connection per message, reads exactly an 8-byte ACK, and pulls
instructions with the raw 19 bytes ``REQUEST_INSTRUCTION``. Fresh protocols from the real factory
over a real Hub, StringTransport and task.Clock (helpers from tests.test_botlink).
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from robonet.protocols.botlink import encode_frame, legacy_ack
from tests.test_botlink import CLIENT_IP, ROBOT_IP, FakeStore, Wire, checksum, make_hub

SPEC_PAYLOAD = b'{"type": "system_status", "message": "hi"}'
BOT = f"bot-{ROBOT_IP}"
SCAN = {
    "type": "sensor_data",
    "timestamp": 123456,
    "sensor_type": "ultrasonic_scanner",
    "data_points": [{"angle": a, "distance_cm": 45.2 if a else -1} for a in range(0, 190, 10)],
    "data_count": 19,
}


class LegacyFrameTests(SynchronousTestCase):
    """Legacy frames: the 8-byte ACK, naming, presence."""

    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self)

    def bot_sends(self, payload: bytes, ip: str = ROBOT_IP) -> Wire:
        w = Wire(self.factory, ip=ip)
        w.raw(encode_frame(payload))
        return w

    def test_spec_example_bytes(self) -> None:
        """The spec's example: the 42-byte system_status payload is acked with 00 00 0E 28 41 43 4B 00."""
        self.assertEqual(len(SPEC_PAYLOAD), 42)
        self.assertEqual(encode_frame(SPEC_PAYLOAD)[:4], bytes.fromhex("0000002A"))
        w = self.bot_sends(SPEC_PAYLOAD)
        self.assertEqual(w.written(), bytes.fromhex("00000E2841434B00"))
        self.assertEqual(legacy_ack(SPEC_PAYLOAD), bytes.fromhex("00000E2841434B00"))

    def test_ack_is_checksum(self) -> None:
        """Every legacy frame's ACK is [u32 BE sum of the payload][ACK][0x00] and nothing else."""
        payload = orjson.dumps(SCAN)
        w = self.bot_sends(payload)
        self.assertEqual(w.written(), checksum(payload).to_bytes(4, "big") + b"ACK\x00")
        self.assertFalse(w.closed)

    def test_device_named_by_ip(self) -> None:
        """The device is bot-<peer IP>, a robot on the bot link, cartobot dialect, with latest values."""
        self.bot_sends(orjson.dumps(SCAN))
        dev = self.hub.registry.get(BOT)
        assert dev is not None
        self.assertEqual(
            (dev.status, dev.role, dev.face, dev.dialect, dev.address),
            ("online", "robot", "botlink", "cartobot", ROBOT_IP),
        )
        self.assertEqual(dev.latest["sensor_data"]["data_points"][0], {"angle": 0, "distance_cm": -1})
        self.assertEqual(dev.latest["sensor_data"]["timestamp"], 123456)

    def test_legacy_names(self) -> None:
        """botlink.legacy_names maps an IP to a device name."""
        _hub, factory, _clock = make_hub(self, botlink={"legacy_names": {ROBOT_IP: "cartobot-7"}})
        w = Wire(factory)
        w.raw(encode_frame(SPEC_PAYLOAD))
        self.assertEqual(w.written(), bytes.fromhex("00000E2841434B00"))
        self.assertIsNotNone(_hub.registry.get("cartobot-7"))
        self.assertIsNone(_hub.registry.get(BOT))

    def test_many_connections_one_device(self) -> None:
        """One bot's many short connections are one device; other IPs are other devices."""
        for _ in range(3):
            w = self.bot_sends(SPEC_PAYLOAD)
            w.lose()
        self.bot_sends(SPEC_PAYLOAD, ip="192.0.2.77").lose()
        ids = sorted(d.device_id for d in self.hub.registry.devices())
        self.assertEqual(ids, [BOT, "bot-192.0.2.77"])
        self.assertEqual(self.hub.registry.get(BOT).msgs_in, 3)  # type: ignore[union-attr]

    def test_presence_expiry(self) -> None:
        """The bot stays online while frames arrive within idle_timeout and goes offline after."""
        self.bot_sends(SPEC_PAYLOAD).lose()
        self.clock.advance(20)
        self.bot_sends(SPEC_PAYLOAD).lose()
        self.clock.advance(20)
        self.assertEqual(self.hub.registry.get(BOT).status, "online")  # type: ignore[union-attr]
        self.clock.advance(10)
        self.assertEqual(self.hub.registry.get(BOT).status, "offline")  # type: ignore[union-attr]
        self.bot_sends(SPEC_PAYLOAD).lose()
        self.assertEqual(self.hub.registry.get(BOT).status, "online")  # type: ignore[union-attr]

    def test_several_frames_one_connection(self) -> None:
        """Frames after the first on one legacy connection are acked too (one ACK each)."""
        w = Wire(self.factory)
        w.raw(encode_frame(SPEC_PAYLOAD) + encode_frame(SPEC_PAYLOAD))
        self.assertEqual(w.written(), bytes.fromhex("00000E2841434B00") * 2)

    def test_missing_type_not_legacy(self) -> None:
        """A first frame without a string type is an error, never an ACK."""
        w = Wire(self.factory)
        w.raw(encode_frame(b'{"message":"hi"}'))
        err = w.one()
        self.assertEqual((err["type"], err["code"]), ("error", "missing_type"))
        self.assertEqual(self.hub.registry.devices(), [])

    def test_bad_json_first_frame(self) -> None:
        """Invalid JSON as a first frame gets bad_json and no ACK."""
        w = Wire(self.factory)
        w.raw(encode_frame(b"\xff\xfe"))
        self.assertEqual(w.one()["code"], "bad_json")

    def test_legacy_with_auth_named_ip(self) -> None:
        """With auth on, legacy frames are accepted only from IPs named in legacy_names."""
        hub, factory, _clock = make_hub(
            self,
            botlink={"legacy_names": {ROBOT_IP: "carto"}},
            auth={"mode": "token", "tokens": {"t": "any"}},
        )
        w = Wire(factory)
        w.raw(encode_frame(SPEC_PAYLOAD))
        self.assertEqual(w.written(), bytes.fromhex("00000E2841434B00"))
        other = Wire(factory, ip="192.0.2.99")
        other.raw(encode_frame(SPEC_PAYLOAD))
        self.assertEqual(other.one()["code"], "unauthorized")
        self.assertIsNone(hub.registry.get("bot-192.0.2.99"))

    def test_store_ack_after_commit(self) -> None:
        """With the store on, the 8-byte ACK is written only once the row is committed."""
        store = FakeStore()
        _hub, factory, _clock = make_hub(self, store=store)
        w = Wire(factory)
        w.raw(encode_frame(SPEC_PAYLOAD))
        self.assertEqual(w.written(), b"")
        self.assertEqual(store.rows[0][4], SPEC_PAYLOAD)
        store.batch.commit()
        self.assertEqual(w.written(), bytes.fromhex("00000E2841434B00"))

    def test_store_failure_no_ack(self) -> None:
        """A failed commit closes the legacy connection without an ACK (the bot resends)."""
        store = FakeStore()
        hub, factory, _clock = make_hub(self, store=store)
        w = Wire(factory)
        w.raw(encode_frame(SPEC_PAYLOAD))
        store.batch.fail(Failure(RuntimeError("disk")))
        self.assertEqual(w.written(), b"")
        self.assertTrue(w.closed)
        self.assertEqual(hub.stats.errors["internal"], 1)


class InstructionTests(SynchronousTestCase):
    """REQUEST_INSTRUCTION polls and the per-bot instruction queue."""

    def setUp(self) -> None:
        self.hub, self.factory, self.clock = make_hub(self, botlink={"legacy_queue": 3})
        boot = Wire(self.factory)
        boot.raw(encode_frame(SPEC_PAYLOAD))
        boot.lose()
        self.client = Wire(self.factory, ip=CLIENT_IP)
        self.client.hello(role="client", device_id="dash")

    def command(self, body: dict[str, Any], cid: int = 1) -> dict[str, Any]:
        self.client.send({"id": cid, "device_id": BOT, **body})
        return self.client.one()

    def poll(self, *chunks: bytes) -> Wire:
        w = Wire(self.factory)
        for chunk in chunks or (b"REQUEST_INSTRUCTION",):
            w.raw(chunk)
        return w

    def test_queued_then_pulled(self) -> None:
        """A command to a bot is acked when queued; the next poll gets exactly that instruction, closed."""
        move = {"type": "movement_instruction", "distance_cm": 30, "angle_degrees": -90}
        payload = orjson.dumps({"id": 1, "device_id": BOT, **move})
        self.client.raw(encode_frame(payload))
        self.assertEqual(self.client.one(), {"type": "ack", "id": 1, "sum": checksum(payload)})
        w = self.poll()
        self.assertEqual(w.one(), move)
        self.assertTrue(w.closed)
        w.lose()
        w2 = self.poll()
        self.assertEqual(w2.written(), b"")
        self.assertFalse(w2.closed)

    def test_poll_one_read_and_split(self) -> None:
        """REQUEST_INSTRUCTION is recognised in one read, split in two, and byte by byte."""
        for chunks in (
            (b"REQUEST_INSTRUCTION",),
            (b"REQUEST_", b"INSTRUCTION"),
            tuple(bytes([b]) for b in b"REQUEST_INSTRUCTION"),
        ):
            self.command({"type": "trial_response", "message": "START"})
            w = self.poll(*chunks)
            self.assertEqual(w.one(), {"type": "trial_response", "message": "START"}, chunks)
            w.lose()

    def test_data_after_poll_ignored(self) -> None:
        """Bytes after REQUEST_INSTRUCTION on a poll connection are ignored: it cannot turn into a session."""
        w = self.poll(b"REQUEST_INSTRUCTIONjunk")
        w.raw(encode_frame(orjson.dumps({"type": "hello", "proto": 1, "role": "robot", "device_id": "x"})))
        w.raw(encode_frame(orjson.dumps({"type": "telemetry", "id": 1})))
        self.assertEqual(w.written(), b"")
        self.assertIsNone(self.hub.registry.get("x"))
        self.assertEqual(self.command({"type": "trial_response", "message": "START"})["type"], "ack")
        self.assertEqual(w.one(), {"type": "trial_response", "message": "START"})

    def test_poll_waits(self) -> None:
        """A poll with nothing queued waits; a command within legacy_poll_wait is handed over at once."""
        w = self.poll()
        self.clock.advance(9)
        self.assertEqual(w.written(), b"")
        self.assertFalse(w.closed)
        ack = self.command({"type": "trial_response", "message": "START"})
        self.assertEqual(ack["type"], "ack")
        self.assertEqual(w.one(), {"type": "trial_response", "message": "START"})
        self.assertTrue(w.closed)

    def test_poll_times_out_silently(self) -> None:
        """With nothing queued, the poll is closed after legacy_poll_wait without a reply."""
        w = self.poll()
        self.clock.advance(9.9)
        self.assertFalse(w.closed)
        self.clock.advance(0.1)
        self.assertTrue(w.closed)
        self.assertEqual(w.written(), b"")

    def test_poll_keeps_bot_online(self) -> None:
        """A poll counts as activity: the bot stays online while it keeps polling."""
        for _ in range(5):
            w = self.poll()
            self.clock.advance(10)
            w.lose()
        self.assertEqual(self.hub.registry.get(BOT).status, "online")  # type: ignore[union-attr]

    def test_poll_gone(self) -> None:
        """A poll connection that closes early is forgotten: the next command is queued for the next poll."""
        w = self.poll()
        w.lose()
        self.command({"type": "trial_response", "message": "START"})
        self.assertEqual(w.written(), b"")
        w2 = self.poll()
        self.assertEqual(w2.one()["type"], "trial_response")

    def test_queue_bound(self) -> None:
        """The queue holds legacy_queue instructions; the oldest are dropped (and counted)."""
        for i in range(5):
            self.assertEqual(
                self.command({"type": "movement_instruction", "distance_cm": i, "angle_degrees": 0}, i)[
                    "type"
                ],
                "ack",
            )
        got = []
        for _ in range(4):
            w = self.poll()
            got.extend(w.frames())
            w.lose()
        self.assertEqual([f["distance_cm"] for f in got], [2, 3, 4])
        self.assertEqual(self.hub.stats.drops["legacy_queue_full"], 2)

    def test_movement_range(self) -> None:
        """movement_instruction needs -1000<=distance_cm<=1000 and -360<=angle_degrees<=360 (numbers)."""
        bad = [
            (1001, 0),
            (-1000.5, 0),
            (0, 361),
            (0, -360.01),
            ("10", 0),
            (True, 0),
            (None, 0),
            (10, [1]),
        ]
        for i, (d, a) in enumerate(bad):
            body: dict[str, Any] = {"type": "movement_instruction", "distance_cm": d, "angle_degrees": a}
            err = self.command(body, i)
            self.assertEqual((err["type"], err["code"], err["ref"]), ("error", "bad_frame", i), (d, a))
        for i, (d, a) in enumerate([(1000, 360), (-1000, -360), (0.5, 12.25)], start=100):
            ok = self.command({"type": "movement_instruction", "distance_cm": d, "angle_degrees": a}, i)
            self.assertEqual(ok["type"], "ack")

    def test_missing_fields(self) -> None:
        """A movement_instruction without distance or angle is refused."""
        err = self.command({"type": "movement_instruction", "distance_cm": 10})
        self.assertEqual(err["code"], "bad_frame")

    def test_non_cartobot_command(self) -> None:
        """A command a Cartobot bot does not understand gets unknown_command and is not queued."""
        err = self.command({"type": "robot_move", "x": 1})
        self.assertEqual((err["code"], err["ref"]), ("unknown_command", 1))
        w = self.poll()
        self.clock.advance(10)
        self.assertEqual(w.written(), b"")

    def test_broadcast_reaches_bot(self) -> None:
        """A broadcast trial_response is queued for the bot too."""
        self.client.send({"type": "trial_response", "id": 1, "message": "START"})
        self.assertEqual(self.client.one()["type"], "ack")
        self.assertEqual(self.poll().one(), {"type": "trial_response", "message": "START"})
