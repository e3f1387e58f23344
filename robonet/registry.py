"""The live device registry (ARCHITECTURE.md, "The registry"). Pure: every method takes ``now``.

One table of devices keyed by ``device_id``, unique across faces. A second connection with the same
id replaces the first; the caller (the hub) closes the replaced link. Devices that go offline stay in
the table (status ``offline``, last values kept) so dashboards can show when they were last seen;
the oldest offline records are pruned beyond ``max_offline``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs
from twisted.logger import Logger

from robonet.model import Link

Observer = Callable[[str, "Device"], None]

ONLINE = "online"
OFFLINE = "offline"


@attrs.define(slots=True, eq=False)
class Device:
    """One device as the hub knows it.

    ``face`` is the face it is connected on (botlink, line, web, camera, peer); ``role`` robot,
    client, website, peer or camera; ``hub`` the owning node id ("" = this hub); times are Unix
    seconds; ``latest`` maps message type -> the newest message body of that type.
    """

    device_id: str
    face: str
    role: str
    address: str
    connected_at: float
    last_activity: float
    name: str = ""
    hub: str = ""
    status: str = ONLINE
    link: Link | None = None
    latest: dict[str, dict[str, Any]] = attrs.Factory(dict)
    latest_at: dict[str, float] = attrs.Factory(dict)
    msgs_in: int = 0
    msgs_out: int = 0
    dialect: str = ""

    @property
    def online(self) -> bool:
        """True while connected (locally, or via a reachable peer)."""
        return self.status == ONLINE

    def as_dict(self, latest: bool = True) -> dict[str, Any]:
        """JSON-able record for dashboards, the REST API and peers (times in Unix seconds).

        ``latest=False`` leaves out the latest message bodies (status events carry metadata only).
        """
        record = {
            "device_id": self.device_id,
            "name": self.name or self.device_id,
            "face": self.face,
            "role": self.role,
            "address": self.address,
            "status": self.status,
            "hub": self.hub,
            "dialect": self.dialect,
            "connected_at": self.connected_at,
            "last_seen": self.last_activity,
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
            "latest_at": dict(self.latest_at),
        }
        if latest:
            record["latest"] = dict(self.latest)
        return record


class Registry:
    """All devices, by id, with device_up / device_down / device_update events to observers."""

    log = Logger()

    def __init__(self, max_offline: int = 1000) -> None:
        self._devices: dict[str, Device] = {}
        self._observers: list[Observer] = []
        self.max_offline = max_offline

    def observe(self, fn: Observer) -> None:
        """Call ``fn(event, device)`` on ``device_up``, ``device_down`` and ``device_update``."""
        self._observers.append(fn)

    def unobserve(self, fn: Observer) -> None:
        """Stop calling ``fn``."""
        if fn in self._observers:
            self._observers.remove(fn)

    def _emit(self, event: str, device: Device) -> None:
        for fn in list(self._observers):
            try:
                fn(event, device)
            except Exception:  # one faulty observer must not stop the others, nor the face
                self.log.failure(
                    "registry observer failed on {event} for {device_id}",
                    event=event,
                    device_id=device.device_id,
                )

    def connect(
        self,
        device_id: str,
        *,
        face: str,
        role: str,
        address: str,
        link: Link | None,
        now: float,
        name: str = "",
        hub: str = "",
        dialect: str = "",
    ) -> tuple[Device, Link | None]:
        """Mark ``device_id`` online on ``link``; return ``(device, replaced_link_or_None)``.

        Latest values of a returning device are kept. Emits ``device_up``.
        """
        dev = self._devices.get(device_id)
        replaced: Link | None = None
        if dev is None:
            dev = Device(
                device_id, face, role, address, now, now, name=name, hub=hub, link=link, dialect=dialect
            )
            self._devices[device_id] = dev
        else:
            if dev.online and dev.link is not None and dev.link is not link:
                replaced = dev.link
            dev.face, dev.role, dev.address, dev.link, dev.hub = face, role, address, link, hub
            dev.name = name or dev.name
            dev.dialect = dialect
            dev.connected_at = dev.last_activity = now
            dev.status = ONLINE
        self._emit("device_up", dev)
        self._prune()
        return dev, replaced

    def disconnect(
        self, device_id: str, link: Link | None, now: float, status: str = OFFLINE
    ) -> Device | None:
        """Mark the device offline (or ``unreachable``) if ``link`` is still its current link.

        Returns the device, or None when it was already replaced or unknown. Emits ``device_down``.
        """
        dev = self._devices.get(device_id)
        if dev is None or dev.link is not link or not dev.online:
            return None
        dev.status = status
        dev.link = None
        if status == OFFLINE:
            dev.last_activity = max(dev.last_activity, now)
        self._emit("device_down", dev)
        return dev

    def set_status(self, device: Device, status: str) -> None:
        """Change a device's status (e.g. a peer's devices become ``unreachable``); emits an update."""
        if device.status != status:
            device.status = status
            self._emit("device_update", device)

    def update(self, device: Device) -> None:
        """Tell observers that ``device``'s metadata (name, status, ...) changed."""
        self._emit("device_update", device)

    def remove(self, device_id: str) -> Device | None:
        """Forget a device entirely (a peer withdrew it); emits ``device_down`` if it was online."""
        dev = self._devices.pop(device_id, None)
        if dev is not None and dev.online:
            dev.status = OFFLINE
            self._emit("device_down", dev)
        return dev

    def get(self, device_id: str) -> Device | None:
        """The device record, online or not, or None."""
        return self._devices.get(device_id)

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[Device]:
        return iter(list(self._devices.values()))

    def devices(self) -> list[Device]:
        """Every known device (online first, then by id)."""
        return sorted(self._devices.values(), key=lambda d: (not d.online, d.device_id))

    def online(self, role: str | None = None) -> list[Device]:
        """Online devices, optionally of one role."""
        return [d for d in self._devices.values() if d.online and (role is None or d.role == role)]

    def field(self, path: str) -> Any:
        """Look up ``"<device_id>.<field>"`` in the device's latest values (any message type).

        E.g. ``robot_01.battery``; ``robot_01.telemetry.battery`` names the type explicitly.
        Returns None when the device or field is unknown.
        """
        device_id, _, rest = path.partition(".")
        dev = self._devices.get(device_id)
        if dev is None or not rest:
            return None
        mtype, _, key = rest.partition(".")
        if key:
            return dev.latest.get(mtype, {}).get(key)
        newest: tuple[float, Any] | None = None
        for t, body in dev.latest.items():
            if rest in body:
                at = dev.latest_at.get(t, 0.0)
                if newest is None or at >= newest[0]:
                    newest = (at, body[rest])
        return None if newest is None else newest[1]

    def _prune(self) -> None:
        if len(self._devices) <= self.max_offline:
            return
        offline = [d for d in self._devices.values() if not d.online]
        if len(offline) <= self.max_offline:
            return
        offline.sort(key=lambda d: d.last_activity)
        for d in offline[: len(offline) - self.max_offline]:
            del self._devices[d.device_id]
