"""Bot link, legacy Cartobot dialect (spec/botlink.md "Legacy dialect"), split out of botlink.py.

A Cartobot bot opens one TCP connection per message, so its device (``bot-<ip>``) lives across
connections: :class:`LegacyDevice` keeps its presence and its bounded instruction queue, and
:class:`LegacyDevices` holds one per client IP only while that device is online (an entry is removed
when the bot has been silent for ``botlink.idle_timeout`` and no poll waits), so memory is bounded
by the bots seen within one idle period.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from robonet.config import BotlinkConfig
from robonet.model import Command, HubError

if TYPE_CHECKING:
    from robonet.protocols.botlink import BotLinkProtocol

LEGACY_COMMANDS = ("movement_instruction", "trial_response")


class LegacyDevices:
    """The online Cartobot devices of one bot-link factory, by client IP (bounded, see module doc)."""

    def __init__(self, hub: Any, config: BotlinkConfig, clock: IReactorTime) -> None:
        self.hub = hub
        self.config = config
        self.clock = clock
        self._by_ip: dict[str, LegacyDevice] = {}

    def __len__(self) -> int:
        return len(self._by_ip)

    def __contains__(self, ip: object) -> bool:
        return ip in self._by_ip

    def get(self, ip: str) -> LegacyDevice:
        """The Cartobot device for ``ip`` (named by ``legacy_names`` or ``bot-<ip>``), made if new."""
        dev = self._by_ip.get(ip)
        if dev is None:
            dev = LegacyDevice(self, ip, self.config.legacy_names.get(ip) or f"bot-{ip}")
            self._by_ip[ip] = dev
        return dev

    def forget(self, dev: LegacyDevice) -> None:
        """``dev`` expired: drop its entry (if it is still the one for its IP)."""
        if self._by_ip.get(dev.ip) is dev:
            del self._by_ip[dev.ip]


class LegacyDevice:
    """One Cartobot bot (``bot-<ip>``): presence across its short connections and its pull queue.

    It is the device's :class:`~robonet.model.Link`: commands are queued (bounded, oldest dropped)
    and handed to the next ``REQUEST_INSTRUCTION`` poll; the sender is acked when queued.
    """

    face = "botlink"
    log = Logger()

    def __init__(self, factory: LegacyDevices, ip: str, device_id: str) -> None:
        self.factory = factory
        self.hub = factory.hub
        self.ip = ip
        self.device_id = device_id
        self.queue: deque[dict[str, Any]] = deque()
        self.device: Any = None
        self._pollers: list[tuple[BotLinkProtocol, IDelayedCall]] = []
        self._expiry: IDelayedCall | None = None
        self._last = 0.0

    def touch(self, now: float) -> Any:
        """A frame or poll arrived: (re)connect the device and push its expiry out."""
        self._last = now
        if self.device is None or not self.device.online or self.device.link is not self:
            self.device = self.hub.connect(
                self, self.device_id, face="botlink", role="robot", address=self.ip, dialect="cartobot"
            )
        if self._expiry is None:
            self._expiry = self.factory.clock.callLater(self.factory.config.idle_timeout, self._expire)
        return self.device

    def _expire(self) -> None:
        self._expiry = None
        left = self._last + self.factory.config.idle_timeout - self.factory.clock.seconds()
        if left > 0 or self._pollers:
            self._expiry = self.factory.clock.callLater(max(left, 1.0), self._expire)
            return
        self.hub.disconnect(self, self.device_id)
        if self.queue:
            # Nobody can pull them any more: the next connection from this IP starts afresh.
            self.hub.stats.drop("legacy_expired", len(self.queue))
            self.log.info(
                "{device_id}: {n} queued instructions dropped (bot silent)",
                device_id=self.device_id,
                n=len(self.queue),
            )
            self.queue.clear()
        self.factory.forget(self)

    def deliver(self, command: Command) -> None:
        """Queue ``command`` for the bot's next poll (ack now); only Cartobot instructions."""
        if command.type not in LEGACY_COMMANDS:
            raise HubError(
                "unknown_command",
                f"{self.device_id} is a Cartobot bot: it takes movement_instruction and trial_response only",
            )
        body = {k: v for k, v in command.body.items() if k not in ("device_id", "timestamp")}
        if command.type == "movement_instruction":
            d, a = body.get("distance_cm"), body.get("angle_degrees")
            if not _num_in(d, 1000) or not _num_in(a, 360):
                raise HubError(
                    "bad_frame",
                    "movement_instruction needs -1000<=distance_cm<=1000, -360<=angle_degrees<=360",
                )
        if self._pollers:
            proto, timer = self._pollers.pop(0)
            if timer.active():
                timer.cancel()
            proto.give_instruction(body)
            return None
        if len(self.queue) >= self.factory.config.legacy_queue:
            self.queue.popleft()
            self.hub.stats.drop("legacy_queue_full")
        self.queue.append(body)
        return None

    def poll(self, proto: BotLinkProtocol) -> None:
        """A bot asked for an instruction: answer now, or wait up to ``legacy_poll_wait``."""
        if self.queue:
            proto.give_instruction(self.queue.popleft())
            return
        timer = self.factory.clock.callLater(self.factory.config.legacy_poll_wait, self._poll_expired, proto)
        self._pollers.append((proto, timer))

    def _poll_expired(self, proto: BotLinkProtocol) -> None:
        self._pollers = [(p, t) for p, t in self._pollers if p is not proto]
        proto.give_instruction(None)

    def poll_gone(self, proto: BotLinkProtocol) -> None:
        """The polling connection closed before an instruction came."""
        keep = []
        for p, t in self._pollers:
            if p is proto:
                if t.active():
                    t.cancel()
            else:
                keep.append((p, t))
        self._pollers = keep

    def close_link(self, code: str, message: str) -> None:
        """model.Link: a native connection took this id over; stop answering polls for it."""
        for proto, timer in self._pollers:
            if timer.active():
                timer.cancel()
            proto.give_instruction(None)
        self._pollers = []
        self.device = None


def _num_in(v: Any, limit: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and -limit <= v <= limit
