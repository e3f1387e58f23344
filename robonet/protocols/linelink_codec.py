"""Line link codec (spec/linelink.md): pure line splitting and encoding, split out of linelink.py.

No I/O. :class:`LineSplitter` turns reads into stripped lines, :func:`decode_line` classifies one,
the ``encode_*`` helpers build the reply lines of each dialect.
"""

from __future__ import annotations

from typing import Any

import orjson

from robonet.model import Event

_OPT = orjson.OPT_NON_STR_KEYS
_dumps = orjson.dumps
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError
_ACK = b'{"type":"ack","id":%d,"sum":%d}\n'

# decode_line kinds
TEXT = 0
OBJECT = 1
BAD_JSON = 2
BAD_UTF8 = 3


class LineSplitter:
    """Incremental line splitter: feed it reads of any size, get whole stripped lines back.

    Lines end with ``\\n``; each returned line has surrounding ASCII whitespace (and so a trailing
    ``\\r``) stripped; blank lines are dropped. A line whose raw length (without its ``\\n``) exceeds
    ``max_line`` bytes is an overflow: :meth:`feed` reports it at once (even before its newline
    arrives) and the splitter holds nothing more. One ``bytes.split`` per read with a newline; a
    partial line is kept as a list of chunks, so a line dribbled in byte by byte costs O(n), not
    O(n^2) as re-joining on every read would.
    """

    __slots__ = ("max_line", "_parts", "_held")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._parts: list[bytes] = []
        self._held = 0

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete line."""
        return self._held

    def reset(self) -> None:
        """Forget any partial line."""
        self._parts = []
        self._held = 0

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """Append ``data``; return ``(complete non-blank lines in order, overflow)``.

        When ``overflow`` is true the lines before the over-long one are still returned; the
        caller is expected to reject the connection (the stream cannot be trusted past it).
        """
        limit = self.max_line
        if data.find(b"\n") < 0:
            held = self._held + len(data)
            if held > limit:
                self.reset()
                return [], True
            if data:
                self._parts.append(data)
                self._held = held
            return [], False
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts = []
        raw_lines = data.split(b"\n")
        tail = raw_lines.pop()
        out: list[bytes] = []
        append = out.append
        for raw in raw_lines:
            if len(raw) > limit:
                self.reset()
                return out, True
            line = raw.strip()
            if line:
                append(line)
        if len(tail) > limit:
            self.reset()
            return out, True
        if tail:
            self._parts = [tail]
            self._held = len(tail)
        else:
            self._held = 0
        return out, False


def decode_line(line: bytes) -> tuple[int, Any]:
    """Classify one stripped, non-empty line.

    Returns ``(OBJECT, dict)`` for a line starting with ``{`` that parses as JSON (it is then an
    object), ``(TEXT, str)`` for any other valid UTF-8 line (``[1]``, ``42`` and ``"x"`` are text),
    ``(BAD_JSON, reason)`` for a ``{`` line that does not parse (depth over 1024 included), and
    ``(BAD_UTF8, reason)`` for invalid UTF-8.
    """
    if line[0] == 0x7B:  # "{"
        try:
            return OBJECT, _loads(line)
        except _JSONDecodeError as e:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return BAD_UTF8, "line is not valid UTF-8"
            return BAD_JSON, f"invalid JSON: {str(e)[:120]}"
    try:
        return TEXT, line.decode("utf-8")
    except UnicodeDecodeError:
        return BAD_UTF8, "line is not valid UTF-8"


def encode_line(obj: Any) -> bytes:
    """One JSON line (``orjson``; non-string dict keys allowed). Raises TypeError if not JSON-able."""
    return _dumps(obj, option=_OPT) + b"\n"


def encode_ack(msg_id: int, checksum: int) -> bytes:
    """``{"type":"ack","id":N,"sum":S}`` line from a template (hot path)."""
    return _ACK % (msg_id, checksum)


def encode_error(code: str, message: str, ref: int | None = None) -> bytes:
    """Bot-link error line ``{"type":"error","code","message","ref"}`` (spec/botlink.md section 7)."""
    return encode_line({"type": "error", "code": code, "message": message, "ref": ref})


def encode_status_error(message: str, timestamp: str, code: str | None = None) -> bytes:
    """witch-core error line ``{"status":"error",["code",]"message","timestamp"}``."""
    obj: dict[str, Any] = {"status": "error"}
    if code is not None:
        obj["code"] = code
    obj["message"] = message
    obj["timestamp"] = timestamp
    return encode_line(obj)


def encode_answer(result: Any) -> bytes | None:
    """A callback/endpoint answer to a LabAuto line as exactly one line, or None for no answer.

    None and ``""`` -> no line; ``str`` (``bytes`` decoded as UTF-8) -> the text itself with line
    breaks replaced by spaces; anything else -> its JSON. Raises TypeError if not JSON-able.
    """
    if result is None:
        return None
    if isinstance(result, (bytes, bytearray)):
        result = bytes(result).decode("utf-8", "replace")
    if isinstance(result, str):
        if "\n" in result or "\r" in result:
            result = result.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        result = result.strip()
        return (result + "\n").encode("utf-8") if result else None
    return encode_line(result)


def encode_event(ev: Event) -> bytes:
    """A fan-out event as one robonet-envelope line for a subscribed line-link connection.

    data: ``{...body without id/ref/ts, "type": T, "device_id": D, "ts": at[, "hub": H]}``;
    status: ``{"type":"device_update","event":"device_up"|...,"device":{record},"ts":at}``.
    """
    if ev.kind == "status":
        return encode_line({"type": "device_update", "event": ev.type, "device": ev.body, "ts": ev.at})
    out = {k: v for k, v in ev.body.items() if k not in ("id", "ref", "ts")}
    out["type"] = ev.type
    out["device_id"] = ev.device_id
    out["ts"] = ev.at
    if ev.hub:
        out["hub"] = ev.hub
    return encode_line(out)
