"""robonet-sim: a simulated robot fleet for a robonet hub (or any bot-link server).

Native robots (robonet/1, like seed 004's ``robot_client.py`` but on the bot link) say hello as
``robot_01``, ``robot_02``..., send ``system_status`` at boot, ``telemetry`` (battery slowly
draining, cpu, temperature, signal, plus speed and state) at ``--rate`` Hz and an ultrasonic
``sensor_data`` scan (19 points, 0..180 degrees) every few seconds, all with ids so the hub acks
them. They react to commands and ack each one:

- ``robot_move`` ``{x, y}`` (-1..1): start moving (a ``status`` "moving" message; cpu goes up,
  battery drains faster with speed); ``x = y = 0``, ``stop``, or no ``robot_move`` for 2 s stops
  the robot and it reports ``movement_complete`` with the distance travelled.
- ``set_speed`` / ``set_brightness`` ``{value}``: reported in telemetry from then on.
- ``movement_instruction`` ``{distance_cm, angle_degrees}``: drive, then ``movement_complete``
  and a fresh scan; ``trial_response`` ``{"message": "START"}``: start a trial (scan at once).

With ``--legacy`` every robot is a Cartobot bot (spec/botlink.md, legacy section): one TCP
connection per message, the 8-byte ACK read and checked, ``REQUEST_INSTRUCTION`` polls (waiting up
to 15 s), executing ``movement_instruction`` and ``trial_response`` START. Legacy bots send
``system_status``, ``sensor_data`` scans and ``movement_complete``, no telemetry. The hub names a
legacy bot by its IP, so on a loopback hub each legacy bot connects from its own 127.x address.

Everything runs on one reactor (hundreds of robots are fine); :func:`demo_fleet` builds the fleet
as a MultiService for ``twistd -n robonet --demo``; :func:`main` is the ``robonet-sim`` command.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import random
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet.client.botclient import hello_message
from robonet.client.tx import BotLinkClientProtocol, connect_bot, legacy_poll, legacy_send

# Physics of the pretend robot (units in the names).
IDLE_DRAIN_PCT_S = 0.01
MOVE_DRAIN_PCT_S = 0.15  # extra at full speed and full stick
CHARGE_PCT_S = 0.5
MAX_SPEED_CM_S = 50.0
TURN_DEG_S = 90.0
SCAN_ANGLES = tuple(range(0, 181, 10))  # 19 points, as the Cartobot ultrasonic scanner
MAX_IN_FLIGHT = 32  # un-acked messages per robot before telemetry is skipped (hub too slow)

Send = Callable[[dict[str, Any]], "Deferred[Any] | None"]


def _clamp(v: float, lo: float, hi: float) -> float:
    return lo if v < lo else hi if v > hi else v


def _num(v: Any, default: float = 0.0) -> float:
    return (
        float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else default
    )


@attrs.define(slots=True)
class RobotState:
    """A simulated robot's physical state; :meth:`step` advances it to ``now`` (seconds).

    Starts where seed 004's robot does (battery 85 %, cpu 45.2 %, 34.8 degC, signal 89.5 %).
    Battery drains ``IDLE_DRAIN_PCT_S`` idle plus up to ``MOVE_DRAIN_PCT_S`` moving (scaled by
    speed and stick); at 10 % the robot docks and charges to 95 %.
    """

    last_step: float
    battery: float = 85.0
    cpu: float = 45.2
    temperature: float = 34.8
    signal: float = 89.5
    speed: int = 50
    brightness: int = 50
    moving: bool = False
    move_x: float = 0.0
    move_y: float = 0.0
    charging: bool = False
    travelled_cm: float = 0.0
    move_started: float = 0.0

    @property
    def state(self) -> str:
        """``moving``, ``charging`` or ``idle``."""
        return "moving" if self.moving else "charging" if self.charging else "idle"

    def step(self, now: float, rng: random.Random) -> None:
        """Advance battery, cpu, temperature, signal and odometer to ``now``."""
        dt = max(0.0, now - self.last_step)
        self.last_step = now
        stick = min(1.0, math.hypot(self.move_x, self.move_y)) if self.moving else 0.0
        if self.moving:
            self.travelled_cm += stick * self.speed / 100.0 * MAX_SPEED_CM_S * dt
        if self.charging:
            self.battery = min(100.0, self.battery + CHARGE_PCT_S * dt)
            if self.battery >= 95.0:
                self.charging = False
        else:
            self.battery -= (IDLE_DRAIN_PCT_S + MOVE_DRAIN_PCT_S * stick * self.speed / 100.0) * dt
            if self.battery <= 10.0:
                self.charging = True
        self.battery = _clamp(self.battery, 0.0, 100.0)
        cpu_target = 38.0 + (28.0 if self.moving else 0.0) + self.speed * 0.08
        self.cpu = _clamp(
            self.cpu + (cpu_target - self.cpu) * min(1.0, dt / 2.0) + rng.uniform(-2.5, 2.5), 1, 100
        )
        temp_target = 28.0 + self.cpu * 0.15
        self.temperature += (temp_target - self.temperature) * min(1.0, dt / 30.0) + rng.uniform(-0.1, 0.1)
        self.signal = _clamp(self.signal + rng.uniform(-0.8, 0.8), 55.0, 99.0)

    def telemetry(self) -> dict[str, Any]:
        """The telemetry message body (seed 004 fields plus speed, brightness and state)."""
        return {
            "type": "telemetry",
            "battery": round(self.battery, 1),
            "cpu": round(self.cpu, 1),
            "temperature": round(self.temperature, 1),
            "signal": round(self.signal, 1),
            "speed": self.speed,
            "brightness": self.brightness,
            "state": self.state,
        }


def ultrasonic_scan(rng: random.Random, room: Sequence[float], timestamp: int) -> dict[str, Any]:
    """A Cartobot ``sensor_data`` scan: 19 points 0..180 degrees; ``distance_cm`` -1 = no echo.

    ``room`` gives the true distance (cm) per angle; readings get noise and ~5 % lost echoes.
    ``timestamp`` is the bot's own clock (milliseconds since boot, not Unix time).
    """
    points = []
    for angle, true in zip(SCAN_ANGLES, room, strict=True):
        d = -1 if rng.random() < 0.05 or true > 400 else round(true + rng.gauss(0, 1.5), 1)
        points.append({"angle": angle, "distance_cm": d})
    return {
        "type": "sensor_data",
        "timestamp": timestamp,
        "sensor_type": "ultrasonic_scanner",
        "data_points": points,
        "data_count": len(points),
    }


def random_room(rng: random.Random) -> list[float]:
    """True distances (cm) per scan angle for a box-shaped room around the robot."""
    w, d = rng.uniform(80, 300), rng.uniform(60, 250)
    out = []
    for angle in SCAN_ANGLES:
        a = math.radians(angle)
        c, s = abs(math.cos(a)), math.sin(a)
        out.append(min(w / c if c > 1e-6 else 1e9, d / s if s > 1e-6 else 1e9))
    return out


class SimRobot:
    """One simulated robot's behaviour, independent of the link it talks over.

    ``send(msg)`` delivers a message to the hub (returning a Deferred that fires when acked, or
    None); it is None while disconnected (messages are then skipped, not queued). Native robots
    send telemetry at ``rate`` Hz; legacy ones only scans, status and movement reports.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        *,
        clock: IReactorTime,
        rate: float = 1.0,
        rng: random.Random | None = None,
        scan_interval: float = 5.0,
        legacy: bool = False,
        move_timeout: float = 2.0,
    ) -> None:
        self.name = name
        self.clock = clock
        self.rate = rate
        self.rng = rng or random.Random(name)
        self.scan_interval = scan_interval
        self.legacy = legacy
        self.move_timeout = move_timeout
        self.boot = clock.seconds()
        self.state = RobotState(last_step=self.boot)
        self.room = random_room(self.rng)
        self.send: Send | None = None
        self.booted = False
        self.trial_started = False
        self.in_flight = 0
        self.sent = 0
        self.skipped = 0
        self.failed = 0
        self._last_move_cmd = 0.0
        self._watchdog: IDelayedCall | None = None
        self._drive: IDelayedCall | None = None
        self._loops: list[LoopingCall] = []

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the telemetry (native) and scan loops."""
        if not self.legacy and self.rate > 0:
            self._loop(self.send_telemetry, 1.0 / self.rate)
        if self.scan_interval > 0:
            self._loop(self.send_scan, self.scan_interval)

    def _loop(self, fn: Callable[[], object], interval: float) -> None:
        lc = LoopingCall(fn)
        lc.clock = self.clock
        # Spread robots over the interval so a fleet does not send in lock-step.
        self.clock.callLater(self.rng.uniform(0, interval), self._start_loop, lc, interval)
        self._loops.append(lc)

    def _start_loop(self, lc: LoopingCall, interval: float) -> None:
        if lc in self._loops and not lc.running:
            lc.start(interval, now=True).addErrback(self._loop_failed)

    def _loop_failed(self, f: Failure) -> None:
        self.log.failure("{robot}: loop failed", f, robot=self.name)

    def stop(self) -> None:
        """Stop every loop and pending timer."""
        loops, self._loops = self._loops, []
        for lc in loops:
            if lc.running:
                lc.stop()
        for call in (self._watchdog, self._drive):
            if call is not None and call.active():
                call.cancel()
        self._watchdog = self._drive = None

    def attach(self, send: Send) -> None:
        """The link is up: messages go through ``send``; the first time, report system_status."""
        self.send = send
        if not self.booted:
            self.booted = True
            self.emit(self.system_status())

    def detach(self) -> None:
        """The link is down: skip messages until the next :meth:`attach`."""
        self.send = None
        self.in_flight = 0

    # --- messages --------------------------------------------------------------------------

    def emit(self, msg: dict[str, Any], optional: bool = False) -> None:
        """Send ``msg`` if connected; ``optional`` messages (telemetry) are skipped when the hub
        has not acked MAX_IN_FLIGHT earlier ones."""
        send = self.send
        if send is None or (optional and self.in_flight >= MAX_IN_FLIGHT):
            self.skipped += 1
            return
        d = send(msg)
        self.sent += 1
        if d is None:
            return
        self.in_flight += 1
        d.addCallbacks(self._acked, self._not_acked, errbackArgs=(msg.get("type"),))

    def _acked(self, _: object) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def _not_acked(self, f: Failure, msg_type: Any) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.failed += 1
        self.log.debug(
            "{robot}: {type} not acked: {why}", robot=self.name, type=msg_type, why=f.getErrorMessage()
        )

    def system_status(self) -> dict[str, Any]:
        """The boot report."""
        if self.legacy:
            return {"type": "system_status", "message": "Bot initialized", "status": "ready"}
        return {
            "type": "system_status",
            "status": "ready",
            "message": f"{self.name} booted",
            "firmware": "robonet-sim",
            "battery": round(self.state.battery, 1),
        }

    def send_telemetry(self) -> None:
        """One telemetry message (native robots)."""
        self.state.step(self.clock.seconds(), self.rng)
        msg = self.state.telemetry()
        self.log.debug(
            "{robot}: telemetry battery={b} cpu={c}", robot=self.name, b=msg["battery"], c=msg["cpu"]
        )
        self.emit(msg, optional=True)

    def send_scan(self) -> None:
        """One ultrasonic sensor_data scan."""
        now = self.clock.seconds()
        self.state.step(now, self.rng)
        self.emit(ultrasonic_scan(self.rng, self.room, int((now - self.boot) * 1000)), optional=True)

    def status(self, status: str, message: str) -> None:
        """A ``status`` message (shown on dashboards as robot_status); legacy bots have none."""
        if not self.legacy:
            self.emit({"type": "status", "status": status, "message": message})

    # --- commands --------------------------------------------------------------------------

    def handle_command(self, msg: dict[str, Any]) -> None:
        """React to one command from the hub (the link acks it when this returns)."""
        t = msg.get("type")
        now = self.clock.seconds()
        self.state.step(now, self.rng)
        if t == "robot_move":
            x, y = _clamp(_num(msg.get("x")), -1, 1), _clamp(_num(msg.get("y")), -1, 1)
            if abs(x) < 0.05 and abs(y) < 0.05:
                self.log.info("{robot}: command robot_move x=0 y=0 (stop)", robot=self.name)
                self.stop_moving("stopped")
            else:
                self.move(x, y, now)
        elif t == "stop":
            self.log.info("{robot}: command stop", robot=self.name)
            self.stop_moving("stopped")
        elif t in ("set_speed", "set_brightness") or (
            t == "set" and msg.get("name") in ("speed", "brightness")
        ):
            what = t[4:] if t != "set" else str(msg.get("name"))
            raw = msg.get("value")
            if not isinstance(raw, (int, float)) or isinstance(raw, bool) or not math.isfinite(raw):
                self.log.info("{robot}: ignoring {type} without a numeric value", robot=self.name, type=t)
                return
            value = int(_clamp(raw, 0, 100))
            if what == "speed":
                self.state.speed = value
            else:
                self.state.brightness = value
            self.log.info("{robot}: command set {what} to {value}%", robot=self.name, what=what, value=value)
            self.status("ok", f"{what.capitalize()} set to {value}%")
        elif t == "camera_move":
            self.log.info(
                "{robot}: command camera_move x={x} y={y}", robot=self.name, x=msg.get("x"), y=msg.get("y")
            )
        elif t == "movement_instruction":
            self.instruction(msg, now)
        elif t == "trial_response":
            self.log.info("{robot}: trial_response {message}", robot=self.name, message=msg.get("message"))
            if msg.get("message") == "START":
                self.trial_started = True
                self.send_scan()
        else:
            self.log.info("{robot}: ignoring unknown command {type}", robot=self.name, type=t)

    def move(self, x: float, y: float, now: float) -> None:
        """Joystick move: start (or keep) moving; a watchdog stops after move_timeout of silence."""
        st = self.state
        st.move_x, st.move_y = x, y
        self._last_move_cmd = now
        if not st.moving:
            st.moving = True
            st.travelled_cm = 0.0
            st.move_started = now
            self.log.info("{robot}: command robot_move x={x} y={y}: moving", robot=self.name, x=x, y=y)
            self.status("moving", f"Moving x={x:g} y={y:g}")
        if self._watchdog is None or not self._watchdog.active():
            self._watchdog = self.clock.callLater(self.move_timeout, self._check_watchdog)

    def _check_watchdog(self) -> None:
        self._watchdog = None
        if not self.state.moving:
            return
        left = self._last_move_cmd + self.move_timeout - self.clock.seconds()
        if left > 0:
            self._watchdog = self.clock.callLater(left, self._check_watchdog)
        else:
            self.log.info(
                "{robot}: no move command for {s:g} s, stopping", robot=self.name, s=self.move_timeout
            )
            self.stop_moving("timeout")

    def stop_moving(self, why: str) -> None:
        """Stop; report idle status and movement_complete (once per movement)."""
        st = self.state
        st.step(self.clock.seconds(), self.rng)
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        if not st.moving:
            return
        st.moving = False
        st.move_x = st.move_y = 0.0
        duration = self.clock.seconds() - st.move_started
        self.status("idle", f"Stopped ({why})")
        self.emit(
            {
                "type": "movement_complete",
                "status": "completed",
                "reason": why,
                "distance_cm": round(st.travelled_cm, 1),
                "duration_s": round(duration, 2),
            }
        )

    def instruction(self, msg: dict[str, Any], now: float) -> None:
        """Cartobot movement_instruction: turn then drive, then movement_complete and a scan."""
        d, a = msg.get("distance_cm"), msg.get("angle_degrees")
        if not (
            isinstance(d, (int, float)) and isinstance(a, (int, float)) and abs(d) <= 1000 and abs(a) <= 360
        ):
            self.log.info("{robot}: ignoring bad movement_instruction {msg}", robot=self.name, msg=msg)
            return
        speed = max(self.state.speed, 1) / 100.0 * MAX_SPEED_CM_S
        duration = abs(a) / TURN_DEG_S + abs(d) / speed
        self.log.info(
            "{robot}: movement_instruction {d} cm at {a} deg ({t:.1f} s)",
            robot=self.name,
            d=d,
            a=a,
            t=duration,
        )
        st = self.state
        st.moving, st.move_x, st.move_y = True, 0.0, 1.0
        st.move_started = now
        if self._drive is not None and self._drive.active():
            self._drive.cancel()
        self._drive = self.clock.callLater(duration, self._arrived, d, a)

    def _arrived(self, d: float, a: float) -> None:
        self._drive = None
        st = self.state
        st.step(self.clock.seconds(), self.rng)
        st.moving, st.move_x, st.move_y = False, 0.0, 0.0
        self.log.info("{robot}: movement complete", robot=self.name)
        self.emit({"type": "movement_complete", "distance_cm": d, "angle_degrees": a, "status": "completed"})
        self.send_scan()


# --- links ---------------------------------------------------------------------------------


class NativeRobot(MultiService):
    """A :class:`SimRobot` on a reconnecting native bot-link connection (robonet.client.tx)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        device_id: str,
        *,
        clock: IReactorTime,
        rate: float,
        rng: random.Random,
        scan_interval: float = 5.0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.device_id = device_id
        self.robot = SimRobot(device_id, clock=clock, rate=rate, rng=rng, scan_interval=scan_interval)
        hello = hello_message("robot", device_id, name or device_id.replace("_", " ").title(), None)
        self.client = connect_bot(
            reactor,
            endpoint,
            hello,
            on_command=self.robot.handle_command,
            on_welcome=self._up,
            on_lost=self._down,
            clock=clock,
        )
        self.client.setServiceParent(self)
        self._stopping = False

    def startService(self) -> None:
        self._stopping = False
        super().startService()
        self.robot.start()

    def stopService(self) -> Deferred[None] | None:
        self._stopping = True
        self.robot.stop()
        self.robot.detach()
        return super().stopService()  # type: ignore[no-any-return]

    def _up(self, proto: BotLinkClientProtocol, welcome: dict[str, Any]) -> None:
        server = welcome.get("server") or {}
        self.log.info(
            "{robot} connected to hub {hub}",
            robot=self.device_id,
            hub=server.get("name") or server.get("id") or "?",
        )
        self.robot.attach(lambda msg: proto.send(msg, ack=True))

    def _down(self, proto: BotLinkClientProtocol, reason: Failure) -> None:
        self.robot.detach()
        if self._stopping:
            self.log.debug("{robot} disconnected (stopping)", robot=self.device_id)
            return
        self.log.info(
            "{robot} disconnected ({why}); reconnecting", robot=self.device_id, why=reason.getErrorMessage()
        )


class LegacyRobot(Service):
    """A :class:`SimRobot` behaving as a Cartobot bot: a connection per message, 8-byte ACKs,
    ``REQUEST_INSTRUCTION`` polls in a loop."""

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        label: str,
        *,
        clock: IReactorTime,
        rng: random.Random,
        scan_interval: float = 5.0,
        poll_wait: float = 15.0,
        send_timeout: float = 10.0,
        source: str = "its default address",
    ) -> None:
        self.endpoint = endpoint
        self.label = label
        self.source = source
        self.clock = clock
        self.poll_wait = poll_wait
        self.send_timeout = send_timeout
        self.robot = SimRobot(label, clock=clock, rng=rng, scan_interval=scan_interval, legacy=True)
        self._next_poll: IDelayedCall | None = None
        self._poll_started = 0.0
        self._backoff = 0.0
        self._reachable: bool | None = None

    def _send(self, msg: dict[str, Any]) -> Deferred[None]:
        d = legacy_send(self.endpoint, msg, clock=self.clock, timeout=self.send_timeout)
        d.addCallback(self._sent_ok)
        return d

    def _sent_ok(self, _: object) -> None:
        self._set_reachable(True, "")

    def _set_reachable(self, ok: bool, why: str) -> None:
        if ok and self._reachable is not True:
            self.log.info(
                "{robot} (Cartobot) reached the hub from {source} (the hub names it bot-<that IP>)",
                robot=self.label,
                source=self.source,
            )
        elif not ok and self._reachable is not False:
            self.log.info("{robot} (Cartobot) cannot reach the hub: {why}", robot=self.label, why=why)
        self._reachable = ok

    def startService(self) -> None:
        super().startService()
        self.robot.attach(self._send)
        self.robot.start()
        self._schedule_poll(0.0)

    def stopService(self) -> None:
        super().stopService()
        self.robot.stop()
        self.robot.detach()
        if self._next_poll is not None and self._next_poll.active():
            self._next_poll.cancel()
        self._next_poll = None

    def _schedule_poll(self, delay: float) -> None:
        if self.running:
            self._next_poll = self.clock.callLater(delay, self._poll)

    def _poll(self) -> None:
        self._next_poll = None
        self._poll_started = self.clock.seconds()
        d = legacy_poll(self.endpoint, clock=self.clock, wait=self.poll_wait)
        d.addCallbacks(self._polled, self._poll_failed)

    def _polled(self, instruction: dict[str, Any] | None) -> None:
        self._backoff = 0.0
        self._set_reachable(True, "")
        if instruction is not None:
            self.log.info(
                "{robot} (Cartobot) instruction received: {type}",
                robot=self.label,
                type=instruction.get("type"),
            )
            self.robot.handle_command(instruction)
        # Poll again at once, but never more than twice a second (a hub that closes at once).
        elapsed = self.clock.seconds() - self._poll_started
        self._schedule_poll(0.0 if instruction is not None else max(0.0, 0.5 - elapsed))

    def _poll_failed(self, f: Failure) -> None:
        self._set_reachable(False, f.getErrorMessage())
        self._backoff = min(30.0, max(1.0, self._backoff * 2))
        self._schedule_poll(self._backoff)


# --- fleets --------------------------------------------------------------------------------


def _is_loopback_v4(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return addr.version == 4 and addr.is_loopback


def source_address(host: str, kind: str, index: int, count: int) -> tuple[str, int] | None:
    """Where robot ``index`` of ``count`` connects from, on a loopback hub; None = default.

    Legacy bots (``kind="legacy"``) are told apart by IP, so with more than one each gets its own
    127.2.x.y; native robots stay on the default address unless there are more than 60 of them,
    then 32 share each 127.1.x.y (the hub caps connections per IP, ``botlink.max_per_ip``).
    """
    if not _is_loopback_v4(host):
        return None
    if kind == "legacy":
        if count <= 1:
            return None
        return (f"127.2.{index // 250}.{index % 250 + 1}", 0)
    if count <= 60:
        return None
    group = index // 32
    return (f"127.1.{group // 250}.{group % 250 + 1}", 0)


def make_fleet(
    reactor: Any,
    host: str,
    port: int,
    *,
    robots: int = 3,
    legacy: int = 0,
    rate: float = 1.0,
    prefix: str = "robot_",
    legacy_prefix: str = "legacy_",
    clock: IReactorTime | None = None,
    seed: int | None = None,
    scan_interval: float = 5.0,
) -> MultiService:
    """A MultiService of ``robots`` native robots (``<prefix>01``...) and ``legacy`` Cartobot
    bots connecting to ``host:port`` (not started)."""
    clock = reactor if clock is None else clock
    fleet = MultiService()
    fleet.setName("robonet-sim")
    width = max(2, len(str(max(robots, legacy))))
    master = random.Random(seed)
    host_for_tcp = "127.0.0.1" if host == "localhost" else host
    for i in range(robots):
        device_id = f"{prefix}{i + 1:0{width}d}"
        ep = TCP4ClientEndpoint(
            reactor, host_for_tcp, port, timeout=10, bindAddress=source_address(host, "native", i, robots)
        )
        NativeRobot(
            reactor,
            ep,
            device_id,
            clock=clock,
            rate=rate,
            rng=random.Random(master.random()),
            scan_interval=scan_interval,
        ).setServiceParent(fleet)
    for j in range(legacy):
        label = f"{legacy_prefix}{j + 1:0{width}d}"
        src = source_address(host, "legacy", j, legacy)
        ep = TCP4ClientEndpoint(reactor, host_for_tcp, port, timeout=10, bindAddress=src)
        LegacyRobot(
            ep,
            label,
            clock=clock,
            rng=random.Random(master.random()),
            scan_interval=scan_interval,
            source=src[0] if src else "its default address",
        ).setServiceParent(fleet)
    return fleet


def demo_fleet(
    reactor: Any, host: str, port: int, *, robots: int = 3, legacy: int = 1, rate: float = 1.0
) -> MultiService:
    """The fleet ``twistd -n robonet --demo`` starts in-process over loopback: ``robots`` native
    robots (robot_01...) plus ``legacy`` Cartobot bots, telemetry at ``rate`` Hz."""
    return make_fleet(reactor, host, port, robots=robots, legacy=legacy, rate=rate)


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The ``robonet-sim`` options."""
    p = argparse.ArgumentParser(
        prog="robonet-sim",
        description="Simulate a robot fleet talking to a robonet hub's bot link.",
    )
    p.add_argument("--host", default="127.0.0.1", help="hub address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5100, help="hub bot-link port (default 5100)")
    p.add_argument("--robots", type=int, default=3, help="number of robots (default 3)")
    p.add_argument(
        "--rate", type=float, default=1.0, help="telemetry messages per second per robot (default 1)"
    )
    p.add_argument("--legacy", action="store_true", help="Cartobot bots: a connection per message, polls")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run)")
    p.add_argument("--device-prefix", default="robot_", help="device id prefix (default robot_)")
    p.add_argument("--scan-interval", type=float, default=5.0, help="seconds between ultrasonic scans")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")
    p.add_argument("-v", "--verbose", action="store_true", help="log every message, not just events")
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE.mcap",
        default=None,
        help="replay the robots of an MCAP recording instead (as robonet-replay; see --speed, --loop)",
    )
    from robonet.replay import add_replay_options

    add_replay_options(p, host_port=False)
    args = p.parse_args(argv)
    if args.robots < 0 or args.rate < 0 or (args.duration is not None and args.duration <= 0):
        p.error("--robots and --rate must be >= 0, --duration > 0")
    return args


def _start_logging(verbose: bool) -> None:
    from datetime import datetime

    from twisted.logger import (
        FilteringLogObserver,
        ILogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    predicate.setLogLevelForNamespace("robonet", LogLevel.debug if verbose else LogLevel.info)

    def write(event: dict[str, Any]) -> None:
        when = datetime.fromtimestamp(event.get("log_time", 0)).strftime("%H:%M:%S")
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
        sys.stdout.write(f"{when} {text}\n")
        sys.stdout.flush()

    observer = FilteringLogObserver(cast(ILogObserver, write), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``robonet-sim``: run the fleet until ``--duration`` expires or Ctrl-C; returns 0."""
    args = parse_args(argv)
    if args.from_file is not None:
        from robonet.replay import replay_main

        args.file = args.from_file
        return replay_main(args, prog="robonet-sim --from")
    _start_logging(args.verbose)
    from twisted.internet import reactor

    log = Logger(namespace="robonet.sim")
    n_native, n_legacy = (0, args.robots) if args.legacy else (args.robots, 0)
    fleet = make_fleet(
        reactor,
        args.host,
        args.port,
        robots=n_native,
        legacy=n_legacy,
        rate=args.rate,
        prefix=args.device_prefix,
        seed=args.seed,
        scan_interval=args.scan_interval,
    )
    log.info(
        "robonet-sim: {n} {kind} robot(s) -> {host}:{port}, {what}",
        n=args.robots,
        kind="legacy (Cartobot)" if args.legacy else "native",
        host=args.host,
        port=args.port,
        what=f"scans every {args.scan_interval:g} s" if args.legacy else f"telemetry {args.rate:g} Hz",
    )
    # Ctrl-C stops cleanly even where SIGINT started out ignored (e.g. a background job).
    signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(reactor.stop))  # type: ignore[attr-defined]
    fleet.startService()
    reactor.addSystemEventTrigger("before", "shutdown", fleet.stopService)  # type: ignore[attr-defined]
    if args.duration is not None:
        reactor.callLater(args.duration, reactor.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    # Re-import as robonet.sim so log namespaces (and the log filter) are robonet.sim.*.
    from robonet.sim import main as _main

    sys.exit(_main())
