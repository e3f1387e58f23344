"""The one message model every face speaks to the hub (ARCHITECTURE.md, "The hub").

A face decodes its dialect into a :class:`Message` and hands it to the hub; the hub answers with
what to send back. Fan-out to dashboards/peers travels as :class:`Event`; commands to robots travel
as :class:`Command` through the device's :class:`Link`. Faces never talk to each other directly.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import orjson

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

TELEMETRY_FIELDS = ("battery", "cpu", "temperature", "signal")


class HubError(Exception):
    """A routing/processing error with a spec error code (spec/botlink.md section 7).

    ``code`` is one of bad_json, not_object, missing_type, frame_too_large, bad_frame, unauthorized,
    unknown_endpoint, unknown_command, device_offline, delivery_timeout, rate_limited, replaced,
    idle_timeout, internal (faces map it to their own dialect).
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or code.replace("_", " ")


class Priority(enum.IntEnum):
    """Fan-out priority: CONTROL is never dropped, LATEST is conflated per key, BULK dropped first."""

    CONTROL = 0
    LATEST = 1
    BULK = 2


# Data types that are events rather than latest values: never conflated on a slow subscriber.
CONTROL_DATA_TYPES = frozenset(("status", "movement_complete", "system_status", "error"))
BULK_DATA_TYPES = frozenset(("video_frame",))


def iso_utc(t: float) -> str:
    """Unix seconds -> ISO-8601 UTC with microseconds, as ``2025-12-09T10:30:45.123456+00:00``."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")


@attrs.define(slots=True, eq=False)
class Message:
    """One decoded message from a device.

    ``body`` is the whole decoded JSON object (reserved keys included, never copied);
    ``source`` is the device_id of the connection it came from; ``received_at`` is hub time in
    Unix seconds; ``raw`` is the UTF-8 JSON payload as received when the face has it (stored as is).
    """

    type: str
    body: dict[str, Any]
    source: str
    received_at: float
    id: int | None = None
    raw: bytes | None = None


@attrs.define(slots=True, eq=False)
class Command:
    """A command on its way to one robot.

    ``body`` is the message to deliver (``type`` plus fields, no ``id``: the link numbers its own
    frames); ``origin`` is the sender's device id (e.g. ``website-3``), ``target`` the robot's id.
    """

    type: str
    body: dict[str, Any]
    origin: str
    target: str


@attrs.define(slots=True, eq=False)
class Event:
    """A fan-out item for subscribers (dashboards, peers, line/bot-link clients).

    ``kind`` is ``"data"`` (a device's message; ``type`` is its message type and ``body`` the message
    object) or ``"status"`` (a device went up/down/changed; ``type`` is ``"device_up"``,
    ``"device_down"`` or ``"device_update"`` and ``body`` the device's ``as_dict()``).
    ``at`` is hub time (Unix seconds). ``hub`` is the owning node id ("" = this hub).
    """

    kind: str
    device_id: str
    type: str
    body: dict[str, Any]
    at: float
    priority: Priority = Priority.LATEST
    hub: str = ""
    name: str = ""
    _dashboard: bytes | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Conflation key: a slow subscriber keeps only the newest LATEST event per key."""
        return (self.device_id, self.type)

    def dashboard_json(self) -> bytes:
        """The spec/websocket.md shape of this event for websites, encoded once and cached.

        data telemetry -> ``telemetry_update``; other data -> ``{"type":T,"device_id",...,"timestamp"}``;
        data ``status`` -> ``robot_status``; status events -> ``device_update`` (robonet addition)
        carrying the device record; robots' up/down also produce the original ``robot_status``
        notices, which the web face sends itself.
        """
        if self._dashboard is None:
            self._dashboard = orjson.dumps(dashboard_shape(self))
        return self._dashboard


def dashboard_shape(ev: Event) -> dict[str, Any]:
    """Build the website JSON object for ``ev`` (see :meth:`Event.dashboard_json`)."""
    ts = iso_utc(ev.at)
    if ev.kind == "status":
        return {"type": "device_update", "event": ev.type, "device": ev.body, "timestamp": ts}
    body = ev.body
    if ev.type == "telemetry":
        out: dict[str, Any] = {
            "type": "telemetry_update",
            "device_id": ev.device_id,
            "device_name": ev.name or ev.device_id,
        }
        for f in TELEMETRY_FIELDS:
            out[f] = body.get(f)
        out["timestamp"] = ts
        if ev.hub:
            out["hub"] = ev.hub
        return out
    if ev.type == "status":
        return {
            "type": "robot_status",
            "device_id": ev.device_id,
            "status": body.get("status"),
            "message": body.get("message"),
            "timestamp": ts,
        }
    out = {k: v for k, v in body.items() if k not in ("id", "ts", "ref")}
    out["type"] = ev.type
    out["device_id"] = ev.device_id
    if "timestamp" in body and ev.type != "video_frame":
        out["robot_timestamp"] = body["timestamp"]
    out["timestamp"] = ts
    if ev.hub:
        out["hub"] = ev.hub
    return out


class Link(Protocol):
    """A face's connection to one device, as the hub sees it."""

    face: str

    def deliver(self, command: Command) -> Deferred[Any] | None:
        """Send ``command`` to the device.

        Returns None when delivery is complete at once (no device ack in that dialect), or a
        Deferred that fires when the device acknowledged it, failing with
        ``HubError("delivery_timeout")`` (or another HubError) otherwise.
        """

    def close_link(self, code: str, message: str) -> None:
        """Close this connection, telling the device why (e.g. code ``replaced``)."""


class Subscriber(Protocol):
    """Anything that receives fan-out events. ``offer`` must never block and never grow unbounded."""

    def offer(self, event: Event) -> None:
        """Take one event (queue, conflate, drop or write it at once)."""
