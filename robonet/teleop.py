"""Teleoperation safety (``[teleop]``, spec/websocket.md "Robonet guarantees beyond the original").

:class:`Deadman` stops robots whose driver (a website) went away or went quiet. The WebSocket
relay tells it who moved what; it sends the stops through the hub like any other command.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from robonet.protocols.staircase import is_stop

if TYPE_CHECKING:
    from robonet.interfaces import FaceHub


class Deadman:
    """Stops robots whose driver went away (spec "Robonet guarantees beyond the original").

    Remembers, per robot and motion command type (robot_move, camera_move), which website sent the
    last one. :meth:`website_gone` sends ``{x:0, y:0}`` of each type that website was the last to
    send. With ``deadman_ms`` > 0, a moving robot (last command not a stop) that gets no motion
    command of that type for ``deadman_ms`` is stopped too. Stops go through ``hub.command`` with
    origin ``deadman``; failures (robot already gone) are ignored.
    """

    _log = Logger()

    def __init__(self, hub: FaceHub, clock: IReactorTime, deadman_ms: int) -> None:
        self.hub = hub
        self.clock = clock
        self.timeout = deadman_ms / 1000.0
        self._drivers: dict[tuple[str, str], str] = {}
        self._timers: dict[tuple[str, str], IDelayedCall] = {}

    def moved(self, website_id: str, cmd_type: str, body: dict[str, Any], robots: Iterable[str]) -> None:
        """``website_id`` sent motion command ``cmd_type`` (``body``) to ``robots``."""
        stop = is_stop(body)
        for robot in robots:
            key = (robot, cmd_type)
            self._drivers[key] = website_id
            if self.timeout > 0:
                old = self._timers.pop(key, None)
                if old is not None and old.active():
                    old.cancel()
                if not stop:
                    self._timers[key] = self.clock.callLater(self.timeout, self._expired, key)

    def website_gone(self, website_id: str) -> list[tuple[str, str]]:
        """Stop everything ``website_id`` was the last to move; returns the (robot, type) stopped."""
        stopped = [key for key, driver in self._drivers.items() if driver == website_id]
        for key in stopped:
            del self._drivers[key]
            timer = self._timers.pop(key, None)
            if timer is not None and timer.active():
                timer.cancel()
            self._stop(key, f"website {website_id} disconnected")
        return stopped

    def _expired(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        self._stop(key, f"no {key[1]} for {self.timeout * 1000:g} ms")

    def _stop(self, key: tuple[str, str], why: str) -> None:
        robot, cmd_type = key
        self._log.info(
            "deadman: stopping {robot} ({cmd_type}): {why}",
            robot=robot,
            cmd_type=cmd_type,
            why=why,
        )
        d = self.hub.command({"type": cmd_type, "x": 0, "y": 0}, origin="deadman", target=robot)
        d.addErrback(lambda f: None)

    def stop(self) -> None:
        """Cancel every timer (the service is stopping)."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
