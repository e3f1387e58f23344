"""JSON Schemas for robonet's message types, shared by the Foxglove face and the MCAP recorder.

One channel per (device, message type): topic ``/<device_id>/<type>``, message encoding ``json``,
schema encoding ``jsonschema``, schema name ``robonet.<type>``. The known types (telemetry,
sensor_data, system_status, status, and the dashboard commands) get a schema that names their
fields; any other type gets a permissive ``{"type": "object"}`` schema, so every message is still
typed as an object in Foxglove and in MCAP files. Pure module: no I/O, no Twisted.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import attrs
import orjson

SCHEMA_ENCODING = "jsonschema"
MESSAGE_ENCODING = "json"

_NUM = {"type": "number"}
_STR = {"type": "string"}
_TS = {"type": ["string", "number"], "description": "sender's timestamp (ISO-8601 or Unix seconds)"}

_KNOWN: dict[str, dict[str, Any]] = {
    "telemetry": {
        "title": "robonet telemetry",
        "properties": {
            "device_id": _STR,
            "device_name": _STR,
            "battery": {**_NUM, "description": "percent"},
            "cpu": {**_NUM, "description": "percent"},
            "temperature": {**_NUM, "description": "degrees Celsius"},
            "signal": {**_NUM, "description": "dBm or percent, as the robot reports"},
            "timestamp": _TS,
        },
    },
    "sensor_data": {
        "title": "robonet sensor data (ultrasonic scan)",
        "properties": {
            "sensor_type": _STR,
            "data_points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "angle": {**_NUM, "description": "degrees"},
                        "distance_cm": {**_NUM, "description": "centimetres"},
                    },
                },
            },
            "data_count": {"type": "integer"},
            "timestamp": _TS,
        },
    },
    "system_status": {
        "title": "robonet system status",
        "properties": {"message": _STR, "status": _STR, "timestamp": _TS},
    },
    "status": {
        "title": "robonet device status",
        "properties": {"status": _STR, "message": _STR, "timestamp": _TS},
    },
    "robot_move": {
        "title": "robonet robot_move command",
        "properties": {
            "x": {**_NUM, "description": "-1..1 turn"},
            "y": {**_NUM, "description": "-1..1 drive"},
        },
    },
    "camera_move": {
        "title": "robonet camera_move command",
        "properties": {"x": _NUM, "y": _NUM},
    },
    "set_speed": {"title": "robonet set_speed command", "properties": {"value": _NUM}},
    "set_brightness": {"title": "robonet set_brightness command", "properties": {"value": _NUM}},
}

_SAFE = re.compile(r"[^A-Za-z0-9_]")


@attrs.frozen
class Schema:
    """One schema: ``name`` (e.g. ``robonet.telemetry``), ``encoding`` (``jsonschema``), ``data``
    (the JSON Schema as UTF-8 bytes), ``known`` (False for the permissive fallback)."""

    name: str
    encoding: str
    data: bytes
    known: bool


def schema_name(mtype: str) -> str:
    """``robonet.<type>``, with characters outside ``[A-Za-z0-9_]`` replaced by ``_``."""
    return "robonet." + _SAFE.sub("_", mtype)


@functools.lru_cache(maxsize=1024)
def schema_for(mtype: str) -> Schema:
    """The :class:`Schema` for message type ``mtype`` (cached; permissive for unknown types)."""
    known = _KNOWN.get(mtype)
    doc: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}
    if known is not None:
        doc.update(known)
    else:
        doc["title"] = f"robonet {mtype} (any fields)"
    doc["additionalProperties"] = True
    return Schema(schema_name(mtype), SCHEMA_ENCODING, orjson.dumps(doc), known is not None)


def topic_for(device_id: str, mtype: str) -> str:
    """The channel topic of ``device_id``'s ``mtype`` messages: ``/<device_id>/<type>``."""
    return f"/{device_id}/{mtype}"


def parse_topic(topic: str) -> tuple[str, str] | None:
    """``/<device_id>/<type>`` -> (device_id, type); None for any other shape."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "" or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


# --- standard Foxglove schemas (added for the Foxglove face; the recorder may use them too) ------

POINT_CLOUD_SCHEMA_NAME = "foxglove.PointCloud"
_TIME = {
    "type": "object",
    "title": "time",
    "properties": {"sec": {"type": "integer", "minimum": 0}, "nsec": {"type": "integer", "minimum": 0}},
}
_VEC3 = {"type": "object", "properties": {"x": _NUM, "y": _NUM, "z": _NUM}}
_POINT_CLOUD: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "foxglove.PointCloud",
    "description": "A collection of N-dimensional points (Foxglove's standard schema, JSON encoding)",
    "type": "object",
    "properties": {
        "timestamp": _TIME,
        "frame_id": _STR,
        "pose": {
            "type": "object",
            "properties": {
                "position": _VEC3,
                "orientation": {"type": "object", "properties": {"x": _NUM, "y": _NUM, "z": _NUM, "w": _NUM}},
            },
        },
        "point_stride": {"type": "integer", "minimum": 0},
        "fields": {
            "type": "array",
            "items": {
                "type": "object",
                "title": "foxglove.PackedElementField",
                "properties": {
                    "name": _STR,
                    "offset": {"type": "integer", "minimum": 0},
                    "type": {"type": "integer", "description": "foxglove.NumericType (7 = FLOAT32)"},
                },
            },
        },
        "data": {"type": "string", "contentEncoding": "base64"},
    },
}


@functools.lru_cache(maxsize=1)
def point_cloud_schema() -> Schema:
    """The ``foxglove.PointCloud`` JSON Schema (Foxglove's 3D panel renders this schema name)."""
    return Schema(POINT_CLOUD_SCHEMA_NAME, SCHEMA_ENCODING, orjson.dumps(_POINT_CLOUD), True)


def points_topic_for(device_id: str) -> str:
    """The topic of ``device_id``'s ultrasonic scans as a point cloud: ``/<device_id>/sensor_data/points``."""
    return f"/{device_id}/sensor_data/points"
