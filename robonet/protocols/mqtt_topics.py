"""MQTT topic and payload mapping of the bridge (docs/mqtt.rst). Pure: no I/O, no clock.

Topics, under ``<prefix>/<project_id>``:

- ``<device_id>/<type>``: a data message; payload the message's JSON body plus ``device_id``,
  ``hub`` (the publishing hub's node id) and ``received_at`` (Unix seconds, hub time). The data type
  ``status`` is published as ``robot_status`` (``<device_id>/status`` is the device's own status).
- ``<device_id>/status``: the device's retained status (``status`` online/offline, face, role, ...).
- ``$hubs/<node_id>``: a hub's retained status, the plain string ``online`` or ``offline`` (the
  Last Will).
- ``<device_id>/cmd/<type>``: a command (a JSON object, optional ``id``); its outcome goes to
  ``<device_id>/cmd/<type>/result``.

The MQTT codec itself is paho-mqtt's; this module only names topics and shapes JSON payloads.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from robonet.model import HubError

HUBS = "$hubs"
STATUS = "status"
CMD = "cmd"
RESULT = "result"
# A data message of type "status" cannot use <device_id>/status (the device's own status topic).
DATA_STATUS_SEGMENT = "robot_status"
# Keys the bridge adds to a data payload; stripped again when a federated hub ingests it.
ADDED_KEYS = ("hub", "received_at")
_BAD_CHARS = frozenset("/+#\x00")


def valid_segment(segment: str) -> bool:
    """Whether ``segment`` can be one topic level: non-empty, no ``/ + #`` or NUL, no leading ``$``."""
    return (
        bool(segment)
        and not segment.startswith("$")
        and _BAD_CHARS.isdisjoint(segment)
        and (len(segment.encode()) <= 1024)
    )


def valid_prefix(prefix: str) -> bool:
    """Whether ``prefix`` is a usable topic prefix (levels separated by ``/``, each a valid segment)."""
    return bool(prefix) and all(valid_segment(level) for level in prefix.split("/"))


@attrs.frozen
class Parsed:
    """One incoming topic, classified. ``kind`` is data, status, cmd, result or hub.

    ``device_id`` is the device (or, for ``hub``, the node id); ``type`` the message or command
    type ("" for status and hub).
    """

    kind: str
    device_id: str
    type: str = ""


@attrs.define
class Topics:
    """Topic names for one project. Raises ValueError for a prefix/project id unusable in a topic."""

    prefix: str
    project_id: str
    base: str = attrs.field(init=False)
    _data: dict[tuple[str, str], str | None] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if not valid_prefix(self.prefix):
            raise ValueError(f"invalid MQTT topic prefix {self.prefix!r}")
        if not valid_segment(self.project_id):
            raise ValueError(f"project id {self.project_id!r} cannot be an MQTT topic level")
        self.base = f"{self.prefix}/{self.project_id}/"

    def data(self, device_id: str, mtype: str) -> str | None:
        """The data topic of ``(device_id, mtype)``, or None when either cannot be a topic level.

        Cached per pair (the hot path); the cache is cleared past 10,000 pairs to stay bounded.
        """
        key = (device_id, mtype)
        try:
            return self._data[key]
        except KeyError:
            pass
        segment = DATA_STATUS_SEGMENT if mtype == STATUS else mtype
        topic = (
            f"{self.base}{device_id}/{segment}"
            if valid_segment(device_id) and valid_segment(segment) and segment != CMD
            else None
        )
        if len(self._data) >= 10000:
            self._data.clear()
        self._data[key] = topic
        return topic

    def status(self, device_id: str) -> str | None:
        """The retained status topic of a device (None for an id unusable in a topic)."""
        return f"{self.base}{device_id}/{STATUS}" if valid_segment(device_id) else None

    def hub(self, node_id: str) -> str:
        """The retained status topic of hub ``node_id``."""
        return f"{self.base}{HUBS}/{node_id}"

    def cmd(self, device_id: str, cmd_type: str) -> str | None:
        """The command topic of ``device_id`` for ``cmd_type``."""
        if not (valid_segment(device_id) and valid_segment(cmd_type)):
            return None
        return f"{self.base}{device_id}/{CMD}/{cmd_type}"

    def result(self, device_id: str, cmd_type: str) -> str | None:
        """The result topic of a command topic."""
        topic = self.cmd(device_id, cmd_type)
        return None if topic is None else f"{topic}/{RESULT}"

    def filters(self, federate: bool) -> list[str]:
        """Subscription filters: commands always; hubs, statuses, data and results when federating.

        ``$hubs`` comes first so a dead hub's Last Will arrives before its devices' stale statuses.
        """
        out = [f"{self.base}{HUBS}/+"] if federate else []
        out.append(f"{self.base}+/{CMD}/+")
        if federate:
            out += [f"{self.base}+/{STATUS}", f"{self.base}+/+", f"{self.base}+/{CMD}/+/{RESULT}"]
        return out

    def parse(self, topic: str) -> Parsed | None:
        """Classify an incoming topic of this project; None for anything else."""
        if not topic.startswith(self.base):
            return None
        levels = topic[len(self.base) :].split("/")
        n = len(levels)
        if not all(levels):
            return None
        if n == 2 and levels[0] == HUBS:
            return Parsed("hub", levels[1])
        if levels[0].startswith("$"):
            return None
        if n == 2:
            if levels[1] == STATUS:
                return Parsed("status", levels[0])
            return Parsed("data", levels[0], STATUS if levels[1] == DATA_STATUS_SEGMENT else levels[1])
        if n == 3 and levels[1] == CMD:
            return Parsed("cmd", levels[0], levels[2])
        if n == 4 and levels[1] == CMD and levels[3] == RESULT:
            return Parsed("result", levels[0], levels[2])
        return None


# --- payloads ------------------------------------------------------------------------------------


def data_payload(body: dict[str, Any], device_id: str, hub: str, received_at: float) -> bytes:
    """A data message's MQTT payload: ``body`` plus ``device_id``, ``hub`` and ``received_at``."""
    out = dict(body)
    out["device_id"] = device_id
    out["hub"] = hub
    out["received_at"] = received_at
    return orjson.dumps(out)


def status_payload(record: dict[str, Any], hub: str, at: float) -> bytes:
    """A device's retained status payload from its registry record (``Device.as_dict``)."""
    return orjson.dumps(
        {
            "status": "online" if record.get("status") == "online" else "offline",
            "device_id": record.get("device_id"),
            "name": record.get("name"),
            "face": record.get("face"),
            "role": record.get("role"),
            "dialect": record.get("dialect"),
            "hub": hub,
            "at": at,
        }
    )


def result_payload(
    req_id: Any, device_id: str, cmd_type: str, hub: str, error: HubError | None = None
) -> bytes:
    """A command result: ``{"id", "device_id", "type", "hub", "status": "ack"}`` or ``"error"`` + code."""
    out: dict[str, Any] = {"id": req_id, "device_id": device_id, "type": cmd_type, "hub": hub}
    if error is None:
        out["status"] = "ack"
    else:
        out["status"] = "error"
        out["code"] = error.code
        out["message"] = error.message
    return orjson.dumps(out)


def decode_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Decode a JSON object payload; HubError ``frame_too_large``, ``bad_json`` or ``not_object``."""
    if len(payload) > max_bytes:
        raise HubError("frame_too_large", f"payload of {len(payload)} bytes over {max_bytes}")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise HubError("bad_json", "payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise HubError("not_object", "payload must be a JSON object")
    return obj


def command_body(obj: dict[str, Any], device_id: str, cmd_type: str) -> dict[str, Any]:
    """The hub command for a decoded cmd payload: the topic's type and device win over the payload's."""
    body = {k: v for k, v in obj.items() if k not in ("id", "hub", "origin")}
    body["type"] = cmd_type
    body["device_id"] = device_id
    return body


def request_id(obj: dict[str, Any]) -> Any:
    """The command's optional ``id`` (a string, integer or null; anything else becomes null)."""
    rid = obj.get("id")
    if rid is None or isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)):
        return rid
    return None
