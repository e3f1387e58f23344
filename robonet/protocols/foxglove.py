"""The Foxglove WebSocket protocol ``foxglove.websocket.v1``: a pure codec, no I/O.

Spec: foxglove/ws-protocol ``docs/spec.md`` (the version the ``@foxglove/ws-protocol`` 0.8 client
implements). Server -> client: JSON ``serverInfo``, ``status``, ``advertise``, ``unadvertise``;
binary ``messageData`` (opcode 0x01, u32 LE subscription id, u64 LE receive time in ns,
payload) and ``time`` (0x02, u64 LE ns). Client -> server: JSON ``subscribe``, ``unsubscribe``,
``advertise`` (client channels), ``unadvertise``; binary ``clientMessageData`` (opcode 0x01, u32
LE channel id, payload). Parsers raise :class:`FoxgloveError` with a code the face counts and a
message it sends back as a ``status`` of level error.

Also here, because they are pure mappings from robonet's messages to Foxglove's world: the
``geometry_msgs/Twist`` -> ``robot_move`` mapping (:func:`twist_to_robot_move`) and the ultrasonic
scan -> ``foxglove.PointCloud`` conversion (:func:`scan_point_cloud`).
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterable
from typing import Any

import attrs
import orjson

SUBPROTOCOL = "foxglove.websocket.v1"

# Binary opcodes (spec "Binary messages").
OP_MESSAGE_DATA = 0x01
OP_TIME = 0x02
OP_CLIENT_MESSAGE_DATA = 0x01

# Status levels (spec "Status").
INFO = 0
WARNING = 1
ERROR = 2

CAP_CLIENT_PUBLISH = "clientPublish"
CAP_TIME = "time"

# JSON ops of capabilities robonet does not offer: answered with an error status, not ignored.
UNSUPPORTED_OPS = frozenset(
    (
        "getParameters",
        "setParameters",
        "subscribeParameterUpdates",
        "unsubscribeParameterUpdates",
        "subscribeConnectionGraph",
        "unsubscribeConnectionGraph",
        "fetchAsset",
    )
)
U32_MAX = 0xFFFFFFFF

_DATA_HDR = struct.Struct("<BIQ")  # opcode, subscription id, receive time (ns)
_TIME = struct.Struct("<BQ")
_CLIENT_HDR = struct.Struct("<BI")  # opcode, client channel id
_WS16 = struct.Struct("!BBH").pack
_WS64 = struct.Struct("!BBQ").pack


class FoxgloveError(Exception):
    """Bad client input: ``code`` (counted with ``stats.error``) and a human ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class Channel:
    """A server channel (spec "Advertise"): ``id`` u32, ``topic``, message ``encoding``,
    ``schema_name``, ``schema`` (text), ``schema_encoding``."""

    id: int
    topic: str
    encoding: str
    schema_name: str
    schema: str
    schema_encoding: str

    def as_json(self) -> dict[str, Any]:
        """The channel object of an ``advertise`` message."""
        return {
            "id": self.id,
            "topic": self.topic,
            "encoding": self.encoding,
            "schemaName": self.schema_name,
            "schema": self.schema,
            "schemaEncoding": self.schema_encoding,
        }


@attrs.frozen
class ClientChannel:
    """A client-advertised channel (spec "Client Advertise")."""

    id: int
    topic: str
    encoding: str
    schema_name: str


@attrs.frozen
class Subscribe:
    """``subscribe``: ``subscriptions`` is a list of (subscription id, channel id)."""

    subscriptions: tuple[tuple[int, int], ...]


@attrs.frozen
class Unsubscribe:
    """``unsubscribe``: subscription ids."""

    subscription_ids: tuple[int, ...]


@attrs.frozen
class ClientAdvertise:
    """Client ``advertise``: the channels it will publish on."""

    channels: tuple[ClientChannel, ...]


@attrs.frozen
class ClientUnadvertise:
    """Client ``unadvertise``: channel ids."""

    channel_ids: tuple[int, ...]


ClientOp = Subscribe | Unsubscribe | ClientAdvertise | ClientUnadvertise


# --- server -> client ------------------------------------------------------------------------------


def server_info(
    name: str,
    capabilities: Iterable[str],
    supported_encodings: Iterable[str],
    session_id: str,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """The ``serverInfo`` JSON (sent first on every connection)."""
    obj: dict[str, Any] = {
        "op": "serverInfo",
        "name": name,
        "capabilities": list(capabilities),
        "supportedEncodings": list(supported_encodings),
        "metadata": dict(metadata or {}),
        "sessionId": session_id,
    }
    return orjson.dumps(obj)


def status(level: int, message: str, status_id: str | None = None) -> bytes:
    """A ``status`` JSON; ``level`` is INFO, WARNING or ERROR."""
    obj: dict[str, Any] = {"op": "status", "level": level, "message": message}
    if status_id is not None:
        obj["id"] = status_id
    return orjson.dumps(obj)


def advertise(channels: Iterable[Channel]) -> bytes:
    """An ``advertise`` JSON for ``channels`` (may be empty: sent once to every new client)."""
    return orjson.dumps({"op": "advertise", "channels": [c.as_json() for c in channels]})


def unadvertise(channel_ids: Iterable[int]) -> bytes:
    """An ``unadvertise`` JSON."""
    return orjson.dumps({"op": "unadvertise", "channelIds": list(channel_ids)})


def message_data_header(subscription_id: int, receive_ns: int) -> bytes:
    """The 13-byte head of a binary ``messageData`` (opcode, u32 LE id, u64 LE ns); payload follows."""
    return _DATA_HDR.pack(OP_MESSAGE_DATA, subscription_id, receive_ns)


def message_data(subscription_id: int, receive_ns: int, payload: bytes) -> bytes:
    """A whole binary ``messageData`` message."""
    return _DATA_HDR.pack(OP_MESSAGE_DATA, subscription_id, receive_ns) + payload


def time_message(now_ns: int) -> bytes:
    """A binary ``time`` message (only with the ``time`` capability)."""
    return _TIME.pack(OP_TIME, now_ns)


def to_ns(seconds: float) -> int:
    """Unix seconds (float) -> integer nanoseconds, clamped to u64."""
    ns = int(round(seconds * 1e9))
    return min(max(ns, 0), 0xFFFFFFFFFFFFFFFF)


def ws_binary_header(n: int) -> bytes:
    """The head of one unmasked, unfragmented server-to-client binary frame (RFC 6455 5.2) of ``n``
    payload bytes; the fan-out frames a message itself so one ``transport.write`` can carry many."""
    if n < 126:
        return bytes((0x82, n))
    if n < 65536:
        return _WS16(0x82, 126, n)
    return _WS64(0x82, 127, n)


def ws_text_frame(payload: bytes) -> bytes:
    """One unmasked server-to-client text frame for ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _WS16(0x81, 126, n) + payload
    return _WS64(0x81, 127, n) + payload


# --- client -> server ------------------------------------------------------------------------------


def _u32(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U32_MAX:
        raise FoxgloveError("bad_request", f"{what} must be an integer 0..{U32_MAX}, got {value!r}")
    return value


def _list(obj: dict[str, Any], key: str, op: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise FoxgloveError("bad_request", f"{op}: {key} must be an array")
    return value


def _str_field(item: dict[str, Any], key: str, op: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise FoxgloveError("bad_request", f"{op}: channel {key} must be a string")
    return value


def parse_client_text(payload: bytes) -> ClientOp:
    """Decode one client text message into a :data:`ClientOp`.

    Raises :class:`FoxgloveError` ``bad_json`` (not JSON), ``not_object``, ``missing_op``,
    ``unsupported_op`` (a known op of a capability robonet does not offer), ``unknown_op`` or
    ``bad_request`` (wrong field shapes). Duplicates within one message are left to the caller.
    """
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise FoxgloveError("bad_json", "text message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FoxgloveError("not_object", "text message must be a JSON object")
    op = obj.get("op")
    if not isinstance(op, str):
        raise FoxgloveError("missing_op", "text message has no op")
    if op == "subscribe":
        subs = []
        for item in _list(obj, "subscriptions", op):
            if not isinstance(item, dict):
                raise FoxgloveError("bad_request", "subscribe: subscriptions must be objects")
            subs.append((_u32(item.get("id"), "subscription id"), _u32(item.get("channelId"), "channelId")))
        return Subscribe(tuple(subs))
    if op == "unsubscribe":
        return Unsubscribe(tuple(_u32(i, "subscription id") for i in _list(obj, "subscriptionIds", op)))
    if op == "advertise":
        channels = []
        for item in _list(obj, "channels", op):
            if not isinstance(item, dict):
                raise FoxgloveError("bad_request", "advertise: channels must be objects")
            channels.append(
                ClientChannel(
                    _u32(item.get("id"), "channel id"),
                    _str_field(item, "topic", op),
                    _str_field(item, "encoding", op),
                    _str_field(item, "schemaName", op),
                )
            )
        return ClientAdvertise(tuple(channels))
    if op == "unadvertise":
        return ClientUnadvertise(tuple(_u32(i, "channel id") for i in _list(obj, "channelIds", op)))
    if op in UNSUPPORTED_OPS:
        raise FoxgloveError("unsupported_op", f"op {op!r} is not supported by this server")
    raise FoxgloveError("unknown_op", f"unknown op {op[:64]!r}")


def parse_client_binary(payload: bytes) -> tuple[int, bytes]:
    """Decode a binary ``clientMessageData`` -> (client channel id, message payload).

    Raises :class:`FoxgloveError` ``bad_frame`` for an empty or short message or another opcode
    (service calls are not offered).
    """
    if len(payload) < _CLIENT_HDR.size:
        raise FoxgloveError("bad_frame", f"binary message of {len(payload)} bytes is too short")
    opcode, channel_id = _CLIENT_HDR.unpack_from(payload)
    if opcode != OP_CLIENT_MESSAGE_DATA:
        raise FoxgloveError("bad_frame", f"unsupported binary opcode 0x{opcode:02x}")
    return channel_id, payload[_CLIENT_HDR.size :]


# --- mappings ----------------------------------------------------------------------------------------


def _clamp(v: float) -> float:
    return max(-1.0, min(1.0, v))


def _component(vec: Any, axis: str, what: str) -> float:
    if vec is None:
        return 0.0
    if not isinstance(vec, dict):
        raise FoxgloveError("bad_request", f"cmd_vel: {what} must be an object {{x, y, z}}")
    v = vec.get(axis, 0)
    if v is None:
        return 0.0
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise FoxgloveError("bad_request", f"cmd_vel: {what}.{axis} must be a finite number")
    return float(v)


def twist_to_robot_move(twist: Any) -> dict[str, Any]:
    """A ``geometry_msgs/Twist``-shaped JSON ``{linear:{x,y,z}, angular:{x,y,z}}`` -> robot_move.

    ``y`` (drive) = ``linear.x``, ``x`` (turn, positive = right) = ``-angular.z`` (ROS: positive z
    turns left), both clamped to [-1, 1]; missing components count as 0. Raises
    :class:`FoxgloveError` ``bad_request`` for other shapes or non-finite numbers.
    """
    if not isinstance(twist, dict):
        raise FoxgloveError("bad_request", "cmd_vel must be a JSON object {linear, angular}")
    drive = _component(twist.get("linear"), "x", "linear")
    turn = _component(twist.get("angular"), "z", "angular")
    return {"type": "robot_move", "x": _clamp(-turn) + 0.0, "y": _clamp(drive)}


_POINT = struct.Struct("<fff")
# foxglove.PackedElementField numeric type FLOAT32.
FLOAT32 = 7
POINT_FIELDS = (
    {"name": "x", "offset": 0, "type": FLOAT32},
    {"name": "y", "offset": 4, "type": FLOAT32},
    {"name": "z", "offset": 8, "type": FLOAT32},
    {"name": "distance", "offset": 12, "type": FLOAT32},
)
POINT_STRIDE = 16


def scan_points(body: dict[str, Any]) -> list[tuple[float, float]] | None:
    """The (angle degrees, distance cm) pairs of an ultrasonic ``sensor_data`` body (no-echo
    readings, ``distance_cm`` < 0, left out); None when ``body`` has no ``data_points`` list."""
    points = body.get("data_points")
    if not isinstance(points, list):
        return None
    out = []
    for p in points:
        if not isinstance(p, dict):
            continue
        a, d = p.get("angle"), p.get("distance_cm")
        if (
            isinstance(a, (int, float))
            and isinstance(d, (int, float))
            and not isinstance(a, bool)
            and not isinstance(d, bool)
            and math.isfinite(a)
            and math.isfinite(d)
            and d >= 0
        ):
            out.append((float(a), float(d)))
    return out


def scan_point_cloud(points: list[tuple[float, float]], frame_id: str, receive_ns: int) -> dict[str, Any]:
    """A ``foxglove.PointCloud`` (JSON encoding) of a scan, in metres in ``frame_id``.

    The scanner's angles follow the dashboard's polar plot: 0 deg right, 90 deg straight ahead,
    180 deg left. In ROS axes (x forward, y left): ``x = d sin(a)``, ``y = -d cos(a)``, ``z = 0``.
    Each point is 16 bytes (x, y, z, distance in m as float32 LE); ``data`` is base64 as Foxglove's
    JSON schemas require for bytes fields.
    """
    buf = bytearray()
    for a, d in points:
        r = math.radians(a)
        m = d / 100.0
        buf += _POINT.pack(m * math.sin(r), -m * math.cos(r), 0.0)
        buf += struct.pack("<f", m)
    return {
        "timestamp": {"sec": receive_ns // 1_000_000_000, "nsec": receive_ns % 1_000_000_000},
        "frame_id": frame_id,
        "pose": {"position": {"x": 0, "y": 0, "z": 0}, "orientation": {"x": 0, "y": 0, "z": 0, "w": 1}},
        "point_stride": POINT_STRIDE,
        "fields": list(POINT_FIELDS),
        "data": base64.b64encode(bytes(buf)).decode("ascii"),
    }
