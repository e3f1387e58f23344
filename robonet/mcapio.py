"""MCAP writing and reading shared by the recorder, ``/api/export`` and ``robonet-replay``.

Layout of robonet's MCAP files (docs/recording.rst): JSON message encoding, one ``jsonschema``
schema per message type (:func:`robonet.schemas.schema_for`, names ``robonet.<type>``) and these
channels:

- ``/<device_id>/<type>``: a device's data messages (the body as the hub routed it);
- ``/<target>/cmd/<type>``: a command to robot ``target`` (``/$all/cmd/<type>``: to every robot),
  the command body plus ``origin`` and ``target``;
- ``/<target>/cmd/<type>/result``: that command's outcome (schema ``robonet.command_result``);
- ``/$hub/devices``: device up/down/update events (schema ``robonet.device_event``).

Every channel's metadata says ``kind`` (``data``, ``command``, ``result``, ``device``),
``device_id`` and ``type``. ``log_time`` is hub time (receive time) in nanoseconds since the Unix
epoch; ``publish_time`` is the same (the sender's own clock stays in the body, ``ts``/``timestamp``).

Reading: :func:`iter_recording` walks a file in order with the ``mcap`` stream reader, chunk by
chunk, so a file cut short by a crash yields every complete chunk and then raises
:class:`TruncatedRecording`; anything that is not MCAP raises :class:`BadRecording`. Pure module:
no Twisted, no clock.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import IO, Any

import attrs
import orjson
from mcap.exceptions import EndOfFile, McapError
from mcap.records import Channel, Footer, Message, Schema
from mcap.stream_reader import StreamReader
from mcap.writer import CompressionType, Writer

import robonet
from robonet import schemas

DEVICES_TOPIC = "/$hub/devices"
BROADCAST_TARGET = "$all"
PROFILE = ""  # no ROS profile: plain JSON messages
LIBRARY = f"robonet {robonet.__version__}"
COMPRESSIONS = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
# Ceiling on one record while reading: a corrupt length field must not allocate gigabytes.
MAX_RECORD = 256 * 1024 * 1024


def _schema(name: str, title: str, properties: dict[str, Any]) -> schemas.Schema:
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "title": title,
        "properties": properties,
        "additionalProperties": True,
    }
    return schemas.Schema(name, schemas.SCHEMA_ENCODING, orjson.dumps(doc), True)


DEVICE_EVENT_SCHEMA = _schema(
    "robonet.device_event",
    "robonet device up/down/update",
    {
        "event": {"type": "string", "enum": ["device_up", "device_down", "device_update"]},
        "device_id": {"type": "string"},
        "device": {"type": "object", "description": "the registry's device record"},
    },
)
COMMAND_RESULT_SCHEMA = _schema(
    "robonet.command_result",
    "robonet command outcome (ack or error)",
    {
        "type": {"type": "string", "description": "the command's type"},
        "origin": {"type": "string"},
        "target": {"type": ["string", "null"], "description": "null for a broadcast"},
        "ok": {"type": "boolean"},
        "devices": {"type": "array", "items": {"type": "string"}, "description": "devices that took it"},
        "code": {"type": "string", "description": "error code when not ok"},
        "message": {"type": "string"},
    },
)


def to_ns(t: float) -> int:
    """Unix seconds -> integer nanoseconds (MCAP log/publish time)."""
    return round(t * 1e9)


def command_topic(target: str | None, mtype: str) -> str:
    """``/<target>/cmd/<type>`` (``/$all/cmd/<type>`` for a broadcast)."""
    return f"/{target or BROADCAST_TARGET}/cmd/{mtype}"


def result_topic(target: str | None, mtype: str) -> str:
    """``/<target>/cmd/<type>/result``."""
    return command_topic(target, mtype) + "/result"


class McapSink:
    """An ``mcap.writer.Writer`` on ``stream`` that registers schemas and channels on first use.

    ``chunk_size`` is the uncompressed chunk size in bytes (a crash loses at most the chunk in
    progress); ``compression`` one of ``zstd``, ``lz4``, ``none``. Not thread-safe: one thread
    owns a sink. Raises ``KeyError`` for an unknown compression.
    """

    def __init__(
        self, stream: IO[bytes], *, chunk_size: int = 1024 * 1024, compression: str = "zstd"
    ) -> None:
        self.stream = stream
        self.writer = Writer(stream, chunk_size=chunk_size, compression=COMPRESSIONS[compression])
        self.writer.start(PROFILE, LIBRARY)
        self._schema_ids: dict[str, int] = {}
        self._channel_ids: dict[str, int] = {}
        self.messages = 0
        self.finished = False

    def channel(self, topic: str, schema: schemas.Schema, kind: str, device_id: str, mtype: str) -> int:
        """The channel id of ``topic``, registering schema and channel the first time."""
        cid = self._channel_ids.get(topic)
        if cid is None:
            sid = self._schema_ids.get(schema.name)
            if sid is None:
                sid = self.writer.register_schema(schema.name, schema.encoding, schema.data)
                self._schema_ids[schema.name] = sid
            meta = {"kind": kind, "device_id": device_id, "type": mtype}
            cid = self.writer.register_channel(topic, schemas.MESSAGE_ENCODING, sid, meta)
            self._channel_ids[topic] = cid
        return cid

    def add(self, channel_id: int, log_ns: int, data: bytes) -> None:
        """Append one message (``data``: JSON bytes) at ``log_ns`` to the chunk in progress."""
        self.messages += 1
        self.writer.add_message(channel_id, log_ns, data, log_ns, self.messages)

    def add_data(self, device_id: str, mtype: str, at: float, data: bytes) -> None:
        """A device's data message on ``/<device_id>/<type>``."""
        cid = self.channel(
            schemas.topic_for(device_id, mtype), schemas.schema_for(mtype), "data", device_id, mtype
        )
        self.add(cid, to_ns(at), data)

    def flush(self) -> None:
        """Close the chunk in progress and write it out (no fsync)."""
        self.writer.flush()

    def finish(self) -> None:
        """Write the summary and footer; the stream stays open (the caller closes it)."""
        if not self.finished:
            self.finished = True
            self.writer.finish()


class BufferStream:
    """A write-only in-memory stream that hands out what was written (for streaming exports).

    ``tell()`` counts every byte ever written, as the MCAP writer needs for its offsets.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0

    def write(self, data: bytes) -> int:
        """Buffer ``data``."""
        if data:
            self._parts.append(bytes(data))
            self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        """Bytes written so far."""
        return self._pos

    def flush(self) -> None:
        """Nothing to flush."""

    def take(self) -> bytes:
        """Everything written since the last ``take``."""
        out = b"".join(self._parts)
        self._parts = []
        return out


# --- reading ----------------------------------------------------------------------------------


class BadRecording(Exception):
    """The file is not a readable MCAP file (``str()`` says why, one line)."""


class TruncatedRecording(BadRecording):
    """The file ends inside a record (e.g. the writer was killed): ``messages`` complete ones came first."""

    def __init__(self, messages: int, offset: int) -> None:
        super().__init__(f"file is truncated at byte {offset} after {messages} complete messages")
        self.messages = messages
        self.offset = offset


@attrs.frozen
class Recorded:
    """One message read back: ``topic``, ``kind`` (channel metadata, ``""`` if absent),
    ``device_id``, ``type``, ``schema`` name, ``log_time``/``publish_time`` (ns), ``data`` (bytes)."""

    topic: str
    kind: str
    device_id: str
    type: str
    schema: str
    log_time: int
    publish_time: int
    data: bytes

    def body(self) -> Any:
        """``data`` decoded as JSON (raises ``orjson.JSONDecodeError``)."""
        return orjson.loads(self.data)


def _describe(channel: Channel) -> tuple[str, str, str]:
    meta = channel.metadata or {}
    kind, device_id, mtype = meta.get("kind", ""), meta.get("device_id", ""), meta.get("type", "")
    if not kind:  # a file from another tool: infer from the topic
        parsed = schemas.parse_topic(channel.topic)
        if parsed is not None:
            kind, (device_id, mtype) = "data", parsed
    return kind, device_id, mtype


def iter_recording(stream: IO[bytes]) -> Iterator[Recorded]:
    """Yield every message of the MCAP file on ``stream``, in file order.

    Raises :class:`TruncatedRecording` after the last complete chunk of a cut-short file, and
    :class:`BadRecording` for bad magic, a corrupt record or chunk (CRCs are checked), or a
    message on an unknown channel.
    """
    reader = StreamReader(stream, validate_crcs=True, record_size_limit=MAX_RECORD)
    schemas_by_id: dict[int, str] = {}
    channels: dict[int, tuple[Channel, tuple[str, str, str]]] = {}
    count = 0
    try:
        for record in reader.records:
            if isinstance(record, Message):
                entry = channels.get(record.channel_id)
                if entry is None:
                    raise BadRecording(f"message on unknown channel {record.channel_id}")
                ch, (kind, device_id, mtype) = entry
                count += 1
                yield Recorded(
                    ch.topic,
                    kind,
                    device_id,
                    mtype,
                    schemas_by_id.get(ch.schema_id, ""),
                    record.log_time,
                    record.publish_time,
                    bytes(record.data),
                )
            elif isinstance(record, Schema):
                schemas_by_id[record.id] = record.name
            elif isinstance(record, Channel):
                channels[record.id] = (record, _describe(record))
            elif isinstance(record, Footer):
                return
    except EndOfFile:
        raise TruncatedRecording(count, _offset(stream)) from None
    except BadRecording:
        raise
    except McapError as e:
        raise BadRecording(str(e) or type(e).__name__) from None
    except (struct.error, ValueError, zlib.error, RuntimeError, MemoryError, UnicodeDecodeError) as e:
        # zstd/lz4 errors are subclasses of these; a garbage length or string lands here too.
        raise BadRecording(f"corrupt record after {count} messages ({type(e).__name__}: {e})") from None
    except Exception as e:  # any other decoder failure is still a bad file, never a traceback
        raise BadRecording(f"corrupt record after {count} messages ({type(e).__name__}: {e})") from None


def _offset(stream: IO[bytes]) -> int:
    try:
        return stream.tell()
    except (OSError, ValueError):
        return -1


def read_complete(stream: IO[bytes]) -> tuple[list[Recorded], BadRecording | None]:
    """Every readable message of ``stream`` and the error that stopped reading (None at a clean end)."""
    out: list[Recorded] = []
    try:
        for rec in iter_recording(stream):
            out.append(rec)
    except BadRecording as e:
        return out, e
    return out, None
