"""Line link dialects witch-core (seed 002) and LabAuto (seed 001), split out of linelink.py.

Functions of the connection (``self`` is the :class:`~robonet.protocols.linelink.LineLinkProtocol`):
they shape replies in their dialect and hand them to the connection's in-order reply slots.
:func:`line_text` validates the ``line`` command that sends a bare text line to a device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from robonet.model import HubError, Message
from robonet.protocols.envelope import failure_code
from robonet.protocols.linelink_codec import encode_answer, encode_line, encode_status_error

if TYPE_CHECKING:
    from robonet.protocols.linelink import LineLinkProtocol


class Slot:
    """One reply owed to a witch-core/LabAuto line, in request order. ``data`` None = no line."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.done = False


def line_text(body: dict[str, Any]) -> str:
    """The text of a ``line`` command ``{"type":"line","text":T}``: a non-empty str, one line.

    Raises HubError ``bad_frame`` for a missing/non-string/empty ``text`` or one with a line break.
    """
    text = body.get("text")
    if text.__class__ is not str or not text.strip() or "\n" in text or "\r" in text:
        raise HubError("bad_frame", "line needs 'text': a non-empty string without line breaks")
    return text  # type: ignore[no-any-return]


def witch_endpoint(self: LineLinkProtocol, name: Any, data: Any) -> None:
    """witch-core ``{"endpoint"|"protocol_name": name, "data": data}``: one in-order reply line."""
    if not self.helloed:
        self.dialect = "witch"
    if not isinstance(name, str):
        self.hub.stats.error("unknown_endpoint")
        self._reply(encode_status_error(f"Unknown endpoint: {name}", self._ts()))
        return
    slot = self._reply_later()

    def ok(result: Any) -> None:
        ts = self._ts()
        try:
            line = encode_line({"status": "success", "data": result, "timestamp": ts})
        except TypeError:
            self.hub.stats.error("internal")
            line = encode_status_error("Error processing endpoint: result is not JSON-serialisable", ts)
        self._fill(slot, line)

    def failed(f: Failure) -> None:
        code, message = failure_code(f.value)
        ts = self._ts()
        if code == "unknown_endpoint":
            text = f"Unknown endpoint: {name}"
        else:
            text = f"Error processing endpoint: {message}"
        self._fill(slot, encode_status_error(text, ts))

    self.hub.request(name, data, self.device_id).addCallbacks(ok, failed)


def witch_request(self: LineLinkProtocol, obj: dict[str, Any]) -> None:
    """witch-core ``{"request": ping|echo|status|info}``: one in-order reply line."""
    if not self.helloed:
        self.dialect = "witch"
    self.hub.stats.count_in("request")
    req = obj.get("request")
    ts = self._ts()
    if req == "ping":
        reply: dict[str, Any] = {"status": "success", "pong": True, "server_time": ts, "timestamp": ts}
    elif req == "echo":
        reply = {"status": "success", "echo": obj.get("data", {}), "timestamp": ts}
    elif req in ("status", "info"):
        reply = {"status": "success", "data": self.factory.server_info(self), "timestamp": ts}
    else:
        self.hub.stats.error("unknown_request")
        reply = {"status": "error", "message": f"Unknown request type: {req}", "timestamp": ts}
    self._reply(encode_line(reply))


def labauto(self: LineLinkProtocol, mtype: str, value: Any, line: bytes) -> None:
    """Text or a plain JSON object: ingest (callbacks), then the ``text``/``json`` endpoint answers."""
    if not self.dialect:
        self.dialect = "labauto"
    dev = self._ensure_device("labauto")
    if mtype == "text":
        body: dict[str, Any] = {"type": "text", "text": value}
        msg = Message("text", body, self.device_id, self._now)
    else:
        msg = Message("json", value, self.device_id, self._now, None, line)
    self.hub.ingest(dev, msg)
    if not self.factory.has_endpoint(mtype):
        if mtype == "text":
            builtin = self.factory.text_replies.get(value)
            if builtin is not None:
                self._reply(encode_answer(builtin))
        return
    slot = self._reply_later()

    def ok(result: Any) -> None:
        try:
            line = encode_answer(result)
        except TypeError:
            self.hub.stats.error("internal")
            line = encode_status_error(
                "Error processing endpoint: result is not JSON-serialisable", self._ts()
            )
        self._fill(slot, line)

    def failed(f: Failure) -> None:
        _code, message = failure_code(f.value)
        ts = self._ts()
        self._fill(slot, encode_status_error(f"Error processing endpoint: {message}", ts))

    self.hub.request(mtype, value, self.device_id).addCallbacks(ok, failed)
