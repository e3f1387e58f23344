"""The robonet/1 envelope: message shapes and per-message decisions, for every face (spec/botlink.md).

Pure: no Twisted, no I/O, no clock (nothing here needs time). The bot link, line link, WebSocket
relay and peer link translate their framing and dialects into plain dicts and ask this module what a
message is, whom it targets, what to answer and with which error code. Error codes are
:data:`ERROR_CODES` (documented in docs/errors.rst).

Public API (stable; only additions from here on):

Constants
    ``PROTO`` (1), ``MAX_ID`` (2**53), ``MAX_DEVICE_ID`` (128), ``ROLES``, ``ANY_ROLE``,
    ``SPECIAL_TYPES``, ``ERROR_CODES`` (code -> :class:`ErrorCode`), ``LINE_TEXT_COMMAND`` (``"line"``).
Checks
    ``valid_id(v)``, ``valid_device_id(v)``, ``valid_proto(v)``, ``message_id(obj)``,
    ``message_type(obj)``, ``check_proto(obj)``, ``check_token(tokens, token, role)``,
    ``command_target(obj)``, ``classify(mtype, commands)``, ``parse_hello(obj, ...)`` -> :class:`Hello`.
Acks
    ``additive_sum(payload)``, ``ack_obj(id, sum)``, ``ack_sum_ok(ack, expected)``.
Answers
    ``error_obj(code, message, ref)``, ``welcome_obj(...)``, ``response_obj(id, result)``,
    ``response_error_obj(id, code, message)``, ``encode_response(id, result, dumps)``,
    ``failure_code(exc)``, ``remote_error(obj)``.

Every check that refuses raises :class:`~robonet.model.HubError` with a code from ERROR_CODES, so a
face maps one exception to its own error shape and counts ``hub.stats.error(e.code)``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs

from robonet.model import HubError

PROTO = 1
MAX_ID = 2**53
MAX_DEVICE_ID = 128
ROLES = ("robot", "client", "peer")
# Token grants that allow any hello role.
ANY_ROLE = ("any", "admin")
# Envelope types with their own meaning; everything else is a command (in the allowlist) or data.
SPECIAL_TYPES = frozenset(("hello", "welcome", "ack", "error", "ping", "request", "response"))
# The command type that carries one plain text line to a LabAuto-dialect device (docs/linelink.rst).
LINE_TEXT_COMMAND = "line"

# classify() kinds
SPECIAL = "special"
COMMAND = "command"
DATA = "data"

BOT, LINE, WEB, PEER, CAMERA = "botlink", "line", "web", "peer", "camera"
ALL_FACES = (BOT, LINE, WEB, PEER)


@attrs.frozen
class ErrorCode:
    """One entry of the error table: what the code means, which faces send it, whether it closes."""

    meaning: str
    faces: tuple[str, ...]
    closes: bool = False


ERROR_CODES: Mapping[str, ErrorCode] = {
    "bad_json": ErrorCode("the frame/line is not valid UTF-8 JSON", ALL_FACES),
    "not_object": ErrorCode("the JSON top level is not an object", (BOT, WEB, PEER)),
    "missing_type": ErrorCode("the message has no string `type`", ALL_FACES),
    "bad_frame": ErrorCode(
        "a malformed envelope field: `id` not an integer 0..2^53, a non-string or invalid `device_id`, "
        "invalid UTF-8 on the line link, out-of-range legacy instruction",
        ALL_FACES,
    ),
    "frame_too_large": ErrorCode("frame or line over the size cap", (BOT, LINE, WEB), True),
    "bad_hello": ErrorCode("hello malformed (role, device_id) or missing in time", ALL_FACES, True),
    "auth_failed": ErrorCode("hello token missing, unknown or not valid for the role", ALL_FACES, True),
    "proto_unsupported": ErrorCode("hello `proto` is not the integer 1", (BOT, LINE), True),
    "unauthorized": ErrorCode("data, a command or a request before an authenticated hello", ALL_FACES, True),
    "unknown_endpoint": ErrorCode("request for an endpoint the hub does not serve", ALL_FACES),
    "unknown_command": ErrorCode("command type not in `hub.commands` or not taken by the device", ALL_FACES),
    "device_offline": ErrorCode("the command's target is not connected (or disconnected)", ALL_FACES),
    "delivery_timeout": ErrorCode("the target did not ack within `botlink.ack_timeout`", ALL_FACES),
    "bad_checksum": ErrorCode(
        "an ack's `sum` does not match the command sent (counted and logged; the command's sender gets it)",
        ALL_FACES,
    ),
    "rate_limited": ErrorCode(
        "per-address connection cap reached, or a subscriber too slow", ALL_FACES, True
    ),
    "replaced": ErrorCode("another connection took over this device_id", ALL_FACES, True),
    "idle_timeout": ErrorCode("nothing received within the idle/hello deadline", (BOT, LINE, WEB), True),
    "internal": ErrorCode(
        "the hub failed (store commit, endpoint crash, result not JSON-serialisable)", ALL_FACES
    ),
    "bad_request": ErrorCode("a dashboard/robot WebSocket message of the wrong shape", (WEB,)),
    "forbidden_origin": ErrorCode("WebSocket `Origin` not allowed (HTTP 403)", (WEB,), True),
    "server_full": ErrorCode("line link `max_clients` reached", (LINE,), True),
    "unknown_request": ErrorCode("witch-core `request` other than ping/echo/status/info", (LINE,)),
    "incompatible": ErrorCode("peer hello with another protocol version", (PEER,), True),
    "wrong_project": ErrorCode("peer of another `hub.project_id`", (PEER,), True),
}


# --- checks ----------------------------------------------------------------------------------------


def valid_id(v: Any) -> bool:
    """A message ``id``: an int (bool refused) 0..2**53."""
    return v.__class__ is int and 0 <= v <= MAX_ID


def valid_device_id(v: Any) -> bool:
    """THE device id rule for every face: a str of 1..128 printable characters, no spaces."""
    return v.__class__ is str and 0 < len(v) <= MAX_DEVICE_ID and v.isprintable() and " " not in v


def valid_proto(v: Any) -> bool:
    """``proto`` is the integer 1 exactly (``true``, ``1.0`` and ``"1"`` are refused)."""
    return v.__class__ is int and v == PROTO


def message_id(obj: Mapping[str, Any]) -> int | None:
    """The message's ``id`` (None if absent); raises HubError ``bad_frame`` if not an int 0..2**53."""
    mid = obj.get("id")
    if mid is None or valid_id(mid):
        return mid
    raise HubError("bad_frame", "id must be an integer 0..2^53")


def ref_of(obj: Mapping[str, Any]) -> int | None:
    """The ``id`` to quote as ``ref`` in an error about ``obj``: its id when valid, else None."""
    mid = obj.get("id")
    return mid if valid_id(mid) else None


def message_type(obj: Mapping[str, Any]) -> str:
    """The message's ``type``; raises HubError ``missing_type`` unless a non-empty string."""
    mtype = obj.get("type")
    if mtype.__class__ is not str or not mtype:
        raise HubError("missing_type", "message has no string 'type'")
    return mtype  # type: ignore[no-any-return]


def check_proto(obj: Mapping[str, Any]) -> None:
    """A hello's ``proto`` (absent = 1); raises HubError ``proto_unsupported`` otherwise."""
    proto = obj.get("proto", PROTO)
    if not valid_proto(proto):
        raise HubError("proto_unsupported", f"proto {proto!r} is not supported; use {PROTO}")


def check_token(tokens: Mapping[str, str] | None, token: Any, role: str) -> bool:
    """Whether ``token`` grants ``role``; ``tokens`` None = auth off (always true).

    ``tokens`` maps token -> granted role (``any``/``admin`` grant every role).
    """
    if tokens is None:
        return True
    granted = tokens.get(token) if token.__class__ is str else None
    return granted is not None and (granted in ANY_ROLE or granted == role)


def command_target(obj: Mapping[str, Any]) -> str | None:
    """Whom a command targets: its ``device_id``, or None (every robot) when absent or null.

    Raises HubError ``bad_frame`` when ``device_id`` is present but not a valid id string: a
    malformed target is an error, never a broadcast.
    """
    target = obj.get("device_id")
    if target is None:
        return None
    if not valid_device_id(target):
        raise HubError("bad_frame", f"device_id must be a string of 1..{MAX_DEVICE_ID} printable characters")
    return target  # type: ignore[no-any-return]


def classify(mtype: str, commands: Collection[str]) -> str:
    """``SPECIAL`` (envelope type), ``COMMAND`` (in the hub's allowlist ``commands``) or ``DATA``."""
    if mtype in SPECIAL_TYPES:
        return SPECIAL
    if mtype in commands:
        return COMMAND
    return DATA


@attrs.frozen
class Hello:
    """A validated hello: ``role``, ``device_id`` (None = let the face assign one), ``name``."""

    role: str
    device_id: str | None
    name: str


def parse_hello(
    obj: Mapping[str, Any],
    *,
    roles: Collection[str] = ROLES,
    tokens: Mapping[str, str] | None = None,
    default_role: str = "client",
) -> Hello:
    """Validate a hello (spec/botlink.md "Native dialect" 1) in the order every face uses.

    Raises HubError ``proto_unsupported`` (proto not the integer 1), ``bad_hello`` (role not in
    ``roles``, device_id not a valid id), ``auth_failed`` (token does not grant the role; ``tokens``
    None = auth off). A non-string ``name`` becomes ``""``; names are cut to 128 characters.
    """
    check_proto(obj)
    role = obj.get("role", default_role)
    if role.__class__ is not str or role not in roles:
        raise HubError("bad_hello", f"role must be one of {', '.join(roles)}")
    device_id = obj.get("device_id")
    if device_id is not None and not valid_device_id(device_id):
        raise HubError(
            "bad_hello", f"device_id must be a string of 1..{MAX_DEVICE_ID} printable characters, no spaces"
        )
    name = obj.get("name", "")
    if name.__class__ is not str:
        name = ""
    if not check_token(tokens, obj.get("token"), role):
        raise HubError("auth_failed", "invalid token for this role")
    return Hello(role, device_id, name[:MAX_DEVICE_ID])


# --- acks ------------------------------------------------------------------------------------------


def additive_sum(payload: bytes | bytearray | memoryview) -> int:
    """Sum of all bytes of ``payload`` modulo 2**32 (spec: native ack ``sum`` and legacy ACK)."""
    return sum(payload) & 0xFFFFFFFF


def ack_obj(msg_id: int, checksum: int) -> dict[str, Any]:
    """``{"type":"ack","id":N,"sum":S}``."""
    return {"type": "ack", "id": msg_id, "sum": checksum}


def ack_sum_ok(ack: Mapping[str, Any], expected: int) -> bool:
    """Verify a received ack against the additive sum of the payload we sent.

    True when ``sum`` matches or is absent (it is optional for senders); False on a mismatch or a
    ``sum`` that is not an integer. Faces count ``bad_checksum`` and fail the delivery on False.
    """
    got = ack.get("sum")
    if got is None:
        return True
    return got.__class__ is int and got == expected


# --- answers ---------------------------------------------------------------------------------------


def error_obj(code: str, message: str, ref: int | None = None) -> dict[str, Any]:
    """The spec's error object ``{"type":"error","code","message","ref"}``."""
    return {"type": "error", "code": code, "message": message, "ref": ref}


def welcome_obj(
    *,
    session: str,
    node_id: str,
    node_name: str,
    version: str,
    heartbeat_s: int,
    max_frame: int,
    device_id: str,
) -> dict[str, Any]:
    """The welcome answering a hello (spec/botlink.md "Native dialect" 1); ``session`` a uuid4 string."""
    return {
        "type": "welcome",
        "proto": PROTO,
        "session": session,
        "server": {"id": node_id, "name": node_name, "version": version},
        "heartbeat_s": heartbeat_s,
        "max_frame": max_frame,
        "device_id": device_id,
    }


def response_obj(msg_id: int | None, result: Any) -> dict[str, Any]:
    """A successful response ``{"type":"response","id","status":"success","data"}``."""
    return {"type": "response", "id": msg_id, "status": "success", "data": result}


def response_error_obj(msg_id: int | None, code: str, message: str) -> dict[str, Any]:
    """An error response ``{"type":"response","id","status":"error","code","message"}``."""
    return {"type": "response", "id": msg_id, "status": "error", "code": code, "message": message}


def encode_response(msg_id: int | None, result: Any, dumps: Callable[[Any], bytes]) -> tuple[bytes, bool]:
    """Encode the response to request ``msg_id`` safely with the face's ``dumps``.

    Returns ``(encoded, ok)``: when ``result`` is not JSON-serialisable (``dumps`` raises TypeError
    or ValueError) the encoded value is an ``internal`` error response and ``ok`` is False (the face
    counts ``internal``). Never raises for a bad result.
    """
    try:
        return dumps(response_obj(msg_id, result)), True
    except (TypeError, ValueError):
        err = response_error_obj(msg_id, "internal", "endpoint result is not JSON-serialisable")
        return dumps(err), False


def failure_code(exc: BaseException | None) -> tuple[str, str]:
    """``(code, message)`` for an exception from the hub (e.g. ``failure.value``): a HubError's own,
    else ``internal``."""
    if isinstance(exc, HubError):
        return exc.code, exc.message
    return "internal", f"{type(exc).__name__}: {exc}"


def remote_error(obj: Mapping[str, Any]) -> HubError:
    """The HubError for a device's ``{"type":"error","code","message"}`` (code defaults to internal)."""
    code = obj.get("code")
    code = code if code.__class__ is str and code else "internal"
    message = obj.get("message")
    return HubError(code, message if message.__class__ is str and message else code)
