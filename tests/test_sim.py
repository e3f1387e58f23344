"""Tests for robonet.sim: simulated robots' behaviour on a fake clock, and their link glue."""

from __future__ import annotations

import random
from typing import Any

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SynchronousTestCase

from robonet.protocols.botlink import FrameDecoder, additive_sum, encode_frame, legacy_ack
from robonet.sim import (
    SCAN_ANGLES,
    LegacyRobot,
    RobotState,
    SimRobot,
    make_fleet,
    parse_args,
    source_address,
    ultrasonic_scan,
)


class Recorder:
    """A fake link: records messages; ack Deferreds are held in ``pending``."""

    def __init__(self, auto_ack: bool = True) -> None:
        self.sent: list[dict[str, Any]] = []
        self.auto_ack = auto_ack
        self.pending: list[Deferred[Any]] = []

    def __call__(self, msg: dict[str, Any]) -> Deferred[Any]:
        self.sent.append(msg)
        if self.auto_ack:
            return succeed(None)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def of_type(self, t: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == t]


def robot(rate: float = 1.0, legacy: bool = False, auto_ack: bool = True) -> tuple[SimRobot, Recorder, Clock]:
    clock = Clock()
    clock.advance(1000)
    r = SimRobot("robot_01", clock=clock, rate=rate, rng=random.Random(1), scan_interval=5.0, legacy=legacy)
    link = Recorder(auto_ack)
    r.attach(link)
    r.start()
    return r, link, clock


class TelemetryTests(SynchronousTestCase):
    def test_boot_status_then_telemetry_at_rate(self) -> None:
        """A robot reports system_status at boot, then telemetry at ``rate`` Hz with seed 004's fields."""
        r, link, clock = robot(rate=2.0)
        self.assertEqual(link.sent[0]["type"], "system_status")
        for _ in range(40):
            clock.advance(0.25)
        tele = link.of_type("telemetry")
        self.assertTrue(19 <= len(tele) <= 21, len(tele))
        self.assertLessEqual({"battery", "cpu", "temperature", "signal", "speed", "state"}, set(tele[0]))
        r.stop()

    def test_battery_drains_faster_when_moving(self) -> None:
        """Battery drains slowly idle and faster while moving; cpu rises when moving."""
        rng = random.Random(3)
        idle = RobotState(last_step=0.0)
        moving = RobotState(last_step=0.0, moving=True, move_x=0.0, move_y=1.0, speed=100)
        for t in range(1, 61):
            idle.step(float(t), rng)
            moving.step(float(t), rng)
        self.assertLess(idle.battery, 85.0)
        self.assertLess(moving.battery, idle.battery - 5)
        self.assertGreater(moving.cpu, idle.cpu + 10)
        self.assertEqual(moving.telemetry()["state"], "moving")

    def test_low_battery_charges(self) -> None:
        """At 10 % the robot switches to charging and the battery rises again."""
        st = RobotState(last_step=0.0, battery=10.05)
        rng = random.Random(0)
        st.step(10.0, rng)
        self.assertTrue(st.charging)
        low = st.battery
        st.step(20.0, rng)
        self.assertGreater(st.battery, low)
        self.assertEqual(st.state, "charging")

    def test_scan_shape(self) -> None:
        """sensor_data scans have 19 points 0..180 degrees as the Cartobot scanner sends them."""
        scan = ultrasonic_scan(random.Random(0), [100.0] * 19, 1234)
        self.assertEqual(scan["type"], "sensor_data")
        self.assertEqual(scan["sensor_type"], "ultrasonic_scanner")
        self.assertEqual([p["angle"] for p in scan["data_points"]], list(range(0, 181, 10)))
        self.assertEqual(scan["data_count"], 19)
        self.assertEqual(len(SCAN_ANGLES), 19)
        for p in scan["data_points"]:
            self.assertTrue(p["distance_cm"] == -1 or 90 < p["distance_cm"] < 110)

    def test_scans_every_interval(self) -> None:
        """A scan goes out every scan_interval seconds."""
        r, link, clock = robot(rate=0)
        for _ in range(20):
            clock.advance(1.0)
        self.assertIn(len(link.of_type("sensor_data")), (4, 5))
        r.stop()

    def test_skips_when_hub_does_not_ack(self) -> None:
        """With many un-acked messages in flight, telemetry is skipped instead of piling up."""
        r, link, clock = robot(rate=10.0, auto_ack=False)
        for _ in range(100):
            clock.advance(0.1)
        self.assertLessEqual(len(link.sent), 34)
        self.assertGreater(r.skipped, 0)
        for d in link.pending:
            d.callback(None)
        self.assertEqual(r.in_flight, 0)
        r.stop()

    def test_detached_sends_nothing(self) -> None:
        """While disconnected, nothing is sent (and nothing queued)."""
        r, link, clock = robot()
        r.detach()
        n = len(link.sent)
        clock.advance(10)
        self.assertEqual(len(link.sent), n)
        r.stop()


class CommandTests(SynchronousTestCase):
    def test_move_then_stop(self) -> None:
        """robot_move reports moving; x=y=0 stops it and it reports movement_complete with distance."""
        r, link, clock = robot(rate=0)
        r.handle_command({"type": "robot_move", "id": 1, "x": 0.5, "y": -0.3})
        self.assertTrue(r.state.moving)
        self.assertEqual(link.of_type("status")[-1]["status"], "moving")
        clock.advance(1.0)
        r.handle_command({"type": "robot_move", "x": 0.5, "y": -0.3})
        clock.advance(1.0)
        r.handle_command({"type": "robot_move", "x": 0, "y": 0})
        self.assertFalse(r.state.moving)
        done = link.of_type("movement_complete")
        self.assertEqual(len(done), 1)
        self.assertGreater(done[0]["distance_cm"], 0)
        r.stop()

    def test_watchdog_stops(self) -> None:
        """Without further robot_move commands the robot stops after move_timeout."""
        r, link, clock = robot(rate=0)
        r.handle_command({"type": "robot_move", "x": 1, "y": 0})
        clock.advance(1.5)
        self.assertTrue(r.state.moving)
        clock.advance(1.0)
        self.assertFalse(r.state.moving)
        self.assertEqual(link.of_type("movement_complete")[0]["reason"], "timeout")
        r.stop()

    def test_set_speed_changes_telemetry(self) -> None:
        """set_speed (and the generic set) change what telemetry reports."""
        r, link, clock = robot(rate=1.0)
        r.handle_command({"type": "set_speed", "value": 80})
        clock.advance(1.0)
        self.assertEqual(link.of_type("telemetry")[-1]["speed"], 80)
        r.handle_command({"type": "set", "name": "brightness", "value": 20})
        r.handle_command({"type": "set_speed", "value": "fast"})  # ignored
        clock.advance(1.0)
        self.assertEqual(link.of_type("telemetry")[-1]["brightness"], 20)
        self.assertEqual(link.of_type("telemetry")[-1]["speed"], 80)
        r.stop()

    def test_movement_instruction(self) -> None:
        """movement_instruction drives for distance/speed, then movement_complete and a scan."""
        r, link, clock = robot(rate=0, legacy=True)
        r.handle_command({"type": "movement_instruction", "distance_cm": 50, "angle_degrees": 90})
        self.assertTrue(r.state.moving)
        scans = len(link.of_type("sensor_data"))
        clock.advance(2.9)  # 1 s turning + 2 s at 25 cm/s
        self.assertFalse(link.of_type("movement_complete"))
        clock.advance(0.2)
        self.assertEqual(link.of_type("movement_complete")[0]["distance_cm"], 50)
        self.assertEqual(len(link.of_type("sensor_data")), scans + 1)
        r.stop()

    def test_bad_instruction_ignored(self) -> None:
        """An out-of-range movement_instruction is ignored."""
        r, link, clock = robot(rate=0, legacy=True)
        r.handle_command({"type": "movement_instruction", "distance_cm": 5000, "angle_degrees": 0})
        self.assertFalse(r.state.moving)
        r.stop()

    def test_trial_start_scans(self) -> None:
        """trial_response START starts the trial with an immediate scan."""
        r, link, clock = robot(rate=0, legacy=True)
        n = len(link.of_type("sensor_data"))
        r.handle_command({"type": "trial_response", "message": "START"})
        self.assertTrue(r.trial_started)
        self.assertEqual(len(link.of_type("sensor_data")), n + 1)
        r.stop()

    def test_legacy_has_no_telemetry_or_status(self) -> None:
        """Legacy bots send system_status, scans and movement_complete only."""
        r, link, clock = robot(rate=5.0, legacy=True)
        r.handle_command({"type": "robot_move", "x": 1, "y": 1})
        clock.advance(10)
        self.assertEqual(
            {m["type"] for m in link.sent}, {"system_status", "sensor_data", "movement_complete"}
        )
        r.stop()


class FakeHub(Protocol):
    """A bot-link server: welcomes, acks, and records frames (native) or ACKs legacy frames."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.decoder = FrameDecoder(1 << 20)
        self.raw = b""

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"REQUEST_INSTRUCTION"):
            self.log.append(("poll", None))
            self.transport.write(  # type: ignore[union-attr]
                encode_frame(
                    orjson.dumps({"type": "movement_instruction", "distance_cm": 10, "angle_degrees": 0})
                )
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for payload in self.decoder.feed(data):
            msg = orjson.loads(payload)
            self.log.append(("frame", msg))
            if msg["type"] == "hello":
                self.transport.write(  # type: ignore[union-attr]
                    encode_frame(
                        orjson.dumps({"type": "welcome", "device_id": msg["device_id"], "heartbeat_s": 10})
                    )
                )
            elif "id" in msg:
                ack = {"type": "ack", "id": msg["id"], "sum": additive_sum(payload)}
                self.transport.write(encode_frame(orjson.dumps(ack)))  # type: ignore[union-attr]
            elif msg["type"] != "ack":
                self.transport.write(legacy_ack(payload))  # type: ignore[union-attr]


class FleetGlueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.log: list[Any] = []
        self.hubs: list[FakeHub] = []
        factory = ServerFactory()

        def build(addr: Any) -> FakeHub:
            self.hubs.append(FakeHub(self.log))
            return self.hubs[-1]

        factory.buildProtocol = build  # type: ignore[method-assign]
        TCP4ServerEndpoint(self.reactor, 5100).listen(factory)
        self.completer = ConnectionCompleter(self.reactor)

    def test_native_robot_says_hello_and_acks_commands(self) -> None:
        """A native fleet robot says hello as robot_01, reports status, and acks a hub command."""
        fleet = make_fleet(self.reactor, "127.0.0.1", 5100, robots=1, legacy=0, rate=1.0, seed=1)
        fleet.startService()
        self.addCleanup(fleet.stopService)
        pump = self.completer.succeedOnce()
        assert pump is not None
        pump.flush()
        frames = [m for kind, m in self.log if kind == "frame"]
        self.assertEqual(frames[0]["device_id"], "robot_01")
        self.assertEqual(frames[1]["type"], "system_status")
        hub = self.hubs[0]
        payload = orjson.dumps({"type": "robot_move", "id": 77, "x": 1, "y": 0})
        hub.transport.write(encode_frame(payload))  # type: ignore[union-attr]
        pump.flush()
        frames = [m for kind, m in self.log if kind == "frame"]
        self.assertIn({"type": "ack", "id": 77, "sum": additive_sum(payload)}, frames)
        self.assertIn("moving", [f.get("status") for f in frames])
        self.reactor.advance(1.0)
        pump.flush()
        self.assertIn("telemetry", [f["type"] for kind, f in self.log if kind == "frame"])

    def test_legacy_robot_sends_and_polls(self) -> None:
        """A legacy bot sends system_status on its own connection and polls REQUEST_INSTRUCTION."""
        ep = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 5100)
        bot = LegacyRobot(ep, "legacy_01", clock=self.reactor, rng=random.Random(0), scan_interval=0)
        bot.startService()
        self.addCleanup(bot.stopService)
        self.reactor.advance(0)
        for _ in range(2):
            pump = self.completer.succeedOnce()
            assert pump is not None
            pump.flush()
        self.assertIn(
            ("frame", {"type": "system_status", "message": "Bot initialized", "status": "ready"}), self.log
        )
        self.assertIn(("poll", None), self.log)
        self.assertTrue(bot.robot.state.moving)  # executing the movement_instruction
        self.assertEqual(len(self.hubs), 2)


class CommandLineTests(SynchronousTestCase):
    def test_args(self) -> None:
        """The documented options parse."""
        a = parse_args(
            [
                "--host",
                "10.0.0.2",
                "--port",
                "5200",
                "--robots",
                "7",
                "--rate",
                "2",
                "--legacy",
                "--duration",
                "3",
                "--device-prefix",
                "bot_",
            ]
        )
        self.assertEqual(
            (a.host, a.port, a.robots, a.rate, a.legacy, a.duration, a.device_prefix),
            ("10.0.0.2", 5200, 7, 2.0, True, 3.0, "bot_"),
        )

    def test_source_addresses(self) -> None:
        """Legacy bots on a loopback hub get distinct source IPs; few native robots use the default."""
        self.assertIsNone(source_address("127.0.0.1", "native", 5, 10))
        self.assertIsNone(source_address("10.1.1.1", "legacy", 1, 5))
        ips = {source_address("127.0.0.1", "legacy", j, 300) for j in range(300)}
        self.assertEqual(len(ips), 300)
        native = [source_address("127.0.0.1", "native", i, 200) for i in range(200)]
        self.assertEqual(max(sum(1 for n in native if n == ip) for ip in native), 32)
