"""The staircase-robot WebSocket dialect (spec/websocket.md): pure shapes, no Twisted, no I/O.

What the original staircase server sent, byte for byte where it matters (greetings, notices, acks
with Python-printed values, errors), plus the helpers the relay decides with: the server-to-client
text frame encoder (one framing for every website), the ``Origin`` rule, the query-string token
rule, the robot id rule and what counts as a stop. The Autobahn side is
:mod:`robonet.protocols.websocket`.
"""

from __future__ import annotations

import fnmatch
import struct
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from robonet.protocols.envelope import MAX_DEVICE_ID, check_token

ROBOT = "robot"
WEBSITE = "website"
MOTION_COMMANDS = ("robot_move", "camera_move")


def py_str(value: Any) -> str:
    """``value`` as the original Python server printed it in its messages (``str()``).

    The value is what the JSON decoder produced: ``0.5`` -> ``"0.5"``, ``60`` -> ``"60"``,
    ``None`` -> ``"None"``, ``True`` -> ``"True"``, strings unchanged.
    """
    return value if isinstance(value, str) else str(value)


def ack_message(cmd_type: str, body: dict[str, Any]) -> str:
    """The ``message`` of the ack a website gets for command ``cmd_type`` (spec "Ack messages").

    ``set`` {name: speed|brightness} reads as set_speed/set_brightness; commands the original did
    not know read ``Command received: <type>``.
    """
    if cmd_type == "set":
        name = body.get("name")
        if name == "speed":
            cmd_type = "set_speed"
        elif name == "brightness":
            cmd_type = "set_brightness"
    if cmd_type == "robot_move":
        return f"Command received: Robot move x={py_str(body.get('x'))}, y={py_str(body.get('y'))}"
    if cmd_type == "camera_move":
        return f"Command received: Camera move x={py_str(body.get('x'))}, y={py_str(body.get('y'))}"
    if cmd_type == "set_speed":
        return f"Command received: Speed set to {py_str(body.get('value'))}%"
    if cmd_type == "set_brightness":
        return f"Command received: Brightness set to {py_str(body.get('value'))}%"
    return f"Command received: {cmd_type}"


def ack_json(original_type: str, message: str) -> bytes:
    """``{"type":"ack","original_type":T,"status":"received","message":M}``."""
    return orjson.dumps(
        {"type": "ack", "original_type": original_type, "status": "received", "message": message}
    )


def error_json(code: str, original_type: Any = None, message: str | None = None) -> bytes:
    """``{"type":"error","code":C,"original_type":T[,"message":M]}`` (robonet's error shape)."""
    obj: dict[str, Any] = {"type": "error", "code": code, "original_type": original_type}
    if message is not None:
        obj["message"] = message
    return orjson.dumps(obj)


def robot_welcome_json(device_id: str) -> bytes:
    """What a robot gets when it connects."""
    return orjson.dumps(
        {
            "status": "connected",
            "device_type": "robot",
            "device_id": device_id,
            "message": f"Robot {device_id} connected to server",
        }
    )


def website_welcome_json(website_id: str) -> bytes:
    """What a website gets when it connects (``website_id`` is robonet's additive field)."""
    return orjson.dumps(
        {
            "status": "connected",
            "device_type": "website",
            "message": "Dashboard connected to server",
            "website_id": website_id,
        }
    )


_NOTICE_TEXT = {
    "connected": ("connected", "Robot {} has connected"),
    "disconnected": ("disconnected", "Robot {} has disconnected"),
    "currently": ("connected", "Robot {} is currently connected"),
}


def robot_notice_json(device_id: str, kind: str) -> bytes:
    """The original ``robot_status`` notice for websites; ``kind`` connected|disconnected|currently."""
    status, text = _NOTICE_TEXT[kind]
    return orjson.dumps(
        {
            "type": "robot_status",
            "status": status,
            "device_type": "robot",
            "device_id": device_id,
            "message": text.format(device_id),
        }
    )


INVALID_JSON = b'{"error":"Invalid JSON format"}'
TELEMETRY_ACK = ack_json("telemetry", "Telemetry data received and saved")
VIDEO_ACK = ack_json("video_frame", "Video frame received")
BINARY_ERROR = orjson.dumps(
    {"type": "error", "code": "bad_frame", "message": "binary messages are not supported; send JSON text"}
)
# Robot data types that get no ack (the original only forwarded them).
NO_ACK_TYPES = frozenset(("status",))

_HDR16 = struct.Struct("!BBH").pack
_HDR64 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented server-to-client text frame (RFC 6455 section 5.2) for ``payload``.

    Used instead of Autobahn's per-connection ``sendMessage`` so a fan-out message is framed once
    for every website and several frames can go out in one ``transport.write``. Such frames are
    valid on permessage-deflate connections too (RSV1 clear = not compressed).
    """
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _HDR16(0x81, 126, n) + payload
    return _HDR64(0x81, 127, n) + payload


def origin_allowed(origin: str, host: str, allowed: Iterable[str]) -> bool:
    """Whether a browser's ``Origin`` header may open a dashboard connection.

    ``allowed`` is ``web.allowed_origins``: entries are origins such as ``http://hub.local:8000``,
    shell-style patterns (``https://*.example.org``) or ``*``; ``null`` must be listed to allow the
    ``null`` origin. Empty means the page's own host: the origin's host and port must equal the
    request's ``Host`` header (default ports 80/443 implied by the scheme).
    """
    origin = origin.strip().lower()
    patterns = [a.strip().lower().rstrip("/") for a in allowed]
    if patterns:
        return any(p == "*" or p == origin or fnmatch.fnmatchcase(origin, p) for p in patterns)
    if origin == "null":
        return False
    try:
        parts = urlsplit(origin)
        o_host, o_port = parts.hostname, parts.port
        scheme = parts.scheme
    except ValueError:
        return False
    if scheme not in ("http", "https") or not o_host:
        return False
    default = 443 if scheme == "https" else 80
    try:
        h = urlsplit("//" + host.strip().lower())
        h_host, h_port = h.hostname, h.port
    except ValueError:
        return False
    return o_host == h_host and (o_port or default) == (h_port or default)


def is_stop(body: dict[str, Any]) -> bool:
    """A motion command that stops (x and y both zero)."""
    x, y = body.get("x"), body.get("y")
    return x == 0 and y == 0 and not isinstance(x, bool) and not isinstance(y, bool)


def token_role(tokens: Mapping[str, str], token: str, device_id: str) -> str:
    """Check a ``?token=`` against ``auth.tokens`` for a connection with/without ``device_id``.

    Returns ``""`` when the token grants that connection; otherwise the refusal: ``"unknown"``
    (missing or unknown token: 401), ``"needs_device_id"`` (a robot token without ``device_id``:
    400) or ``"not_robot"`` (a website token with ``device_id``: 403). ``any``/``admin`` tokens
    grant both, as they do on the bot link (the grant rule is :func:`envelope.check_token`).
    """
    granted = tokens.get(token) if token else None
    if granted is None:
        return "unknown"
    if device_id:
        return "" if check_token(tokens, token, ROBOT) else "not_robot"
    return "needs_device_id" if granted == ROBOT else ""  # any other token opens a website


def robot_name(body: Mapping[str, Any]) -> str | None:
    """The robot's own name in a message (``device_name``, as robot_client.py sends it), or None.

    Only a non-empty string counts; it is cut to 128 characters.
    """
    name = body.get("device_name")
    if name.__class__ is str and name:
        return name[:MAX_DEVICE_ID]  # type: ignore[no-any-return]
    return None
