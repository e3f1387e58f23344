"""The ES_Stream_MTX camera protocol (spec/camera.md): pure codec, auth gate and thin Protocols.

Packet (spec/camera.md, "Packet"), both directions, all three ports::

    [0x00][0xFF][ID][TYPE][LEN_HI][LEN_LO][PAYLOAD x LEN][CHK]     CHK = XOR of every preceding byte

The codec half (:func:`encode_packet`, :class:`PacketDecoder`, the settings table) does no I/O.
The :class:`AuthGate` is the pure authentication/authorisation policy (it takes ``now``). The three
factories are thin: they feed bytes to a decoder and dispatch. Every packet is written with exactly
one ``transport.write`` because the original desktop client reads exactly 6 header bytes, then exactly
LEN+1 bytes, each in a single ``recv``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import socket
from collections import deque
from collections.abc import Callable, Iterator
from functools import reduce
from operator import xor
from typing import Any
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet import interfaces
from twisted.internet.base import DelayedCall
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from robonet.limits import PerAddressLimiter

# --- constants (spec/camera.md, "Packet") ---------------------------------------------------------

MAGIC = b"\x00\xff"
HEADER_LEN = 6
MAX_PAYLOAD = 0xFFFF

ID_AUTH = 0x00
ID_DATA = 0x01
ID_SETTINGS = 0x02

TYPE_RESPONSE = 0x00
TYPE_REQUEST = 0x01
TYPE_ERROR = 0x02

# Largest LEN each port accepts from a client; anything larger is a fatal decode error (the
# connection is closed at the header, nothing is buffered).
SETTINGS_MAX_LEN = 64
AUTH_MAX_LEN = 256

# Data port socket tuning (see CameraDataProtocol): kernel send buffer, userspace pause threshold.
DATA_SNDBUF = 8192
DATA_PAUSE_BYTES = 1024


def checksum(data: bytes | bytearray | memoryview) -> int:
    """XOR of every byte of ``data`` (the CHK byte of a packet is this over the preceding bytes)."""
    return reduce(xor, bytes(data), 0)


def encode_packet(id: int, type: int, payload: bytes = b"") -> bytes:
    """Encode one packet: ``00 FF ID TYPE LEN_HI LEN_LO PAYLOAD CHK`` (spec/camera.md, "Packet").

    ``id`` and ``type`` are 0..255; ``payload`` at most 65535 bytes. Raises ``ValueError`` otherwise.
    """
    if not (0 <= id <= 0xFF and 0 <= type <= 0xFF):
        raise ValueError(f"id and type must be bytes, got {id!r}, {type!r}")
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"payload of {n} bytes is longer than {MAX_PAYLOAD}")
    head = bytes((0x00, 0xFF, id, type, n >> 8, n & 0xFF)) + payload
    return head + bytes((checksum(head),))


# Fixed packets (spec/camera.md, the packet table).
SETTINGS_REQUEST = encode_packet(ID_SETTINGS, TYPE_REQUEST)
SETTINGS_REJECTED = encode_packet(ID_SETTINGS, TYPE_ERROR)
AUTH_SUCCESS = encode_packet(ID_AUTH, TYPE_RESPONSE, b"ready")
AUTH_FAILURE = encode_packet(ID_AUTH, TYPE_ERROR)

_DATA_HEAD = bytes((0x00, 0xFF, ID_DATA, TYPE_RESPONSE, 0x00, 0x09))
_DATA_HEAD_CHK = checksum(_DATA_HEAD)


def encode_data_sample(value: int, millis: int) -> bytes:
    """The 16-byte data sample: ``00 FF 01 00 00 09 vv t7..t0 CK``.

    ``value`` is clamped to 0..255; ``millis`` is milliseconds since the Unix epoch (u64 big-endian).
    """
    value = 0 if value < 0 else 255 if value > 255 else value
    body = bytes((value,)) + (millis & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
    return _DATA_HEAD + body + bytes((_DATA_HEAD_CHK ^ checksum(body),))


def encode_auth_request(password: bytes) -> bytes:
    """Client side: ``00 FF 00 01 LEN password CK``."""
    return encode_packet(ID_AUTH, TYPE_REQUEST, password)


def encode_settings_update(raw: bytes) -> bytes:
    """Client side: a settings update carrying the six setting bytes."""
    return encode_packet(ID_SETTINGS, TYPE_REQUEST, raw)


def encode_settings_response(raw: bytes) -> bytes:
    """Server side: the six setting bytes followed by three zero bytes (LEN 9)."""
    return encode_packet(ID_SETTINGS, TYPE_RESPONSE, raw + b"\x00\x00\x00")


# --- decoder --------------------------------------------------------------------------------------


@attrs.frozen
class Packet:
    """One decoded, checksum-verified packet."""

    id: int
    type: int
    payload: bytes


@attrs.frozen
class DecodeError:
    """Something the decoder dropped.

    ``code`` is ``bad_magic`` (``nbytes`` bytes skipped while resyncing on ``00 FF``),
    ``bad_checksum`` (a whole packet of ``nbytes`` dropped) or ``too_long`` (LEN above the port's
    limit; ``fatal``: the decoder refuses further input and the connection must be closed).
    """

    code: str
    nbytes: int
    detail: str = ""
    fatal: bool = False


class PacketDecoder:
    """Incremental packet decoder; feed it bytes split anywhere.

    ``max_len`` is the largest LEN accepted (per port). :meth:`feed` returns, in stream order, the
    :class:`Packet` objects and :class:`DecodeError` items found. After a fatal error every later
    :meth:`feed` returns nothing.
    """

    __slots__ = ("_buf", "max_len", "failed")

    def __init__(self, max_len: int) -> None:
        self._buf = bytearray()
        self.max_len = max_len
        self.failed = False

    @property
    def pending(self) -> int:
        """Bytes of a started, incomplete packet held in the buffer (0 = between packets)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet | DecodeError]:
        """Add ``data`` and return what it completed (see the class docstring)."""
        if self.failed:
            return []
        buf = self._buf
        buf += data
        out: list[Packet | DecodeError] = []
        while buf:
            if buf[0] != 0x00 or (len(buf) >= 2 and buf[1] != 0xFF):
                idx = buf.find(MAGIC, 1)
                if idx < 0:
                    # keep a trailing 00: it may be the first half of the next magic
                    idx = len(buf) - 1 if buf[-1] == 0x00 else len(buf)
                out.append(DecodeError("bad_magic", idx, "resynchronised on 00 FF"))
                del buf[:idx]
                continue
            if len(buf) < HEADER_LEN:
                break
            length = (buf[4] << 8) | buf[5]
            if length > self.max_len:
                out.append(DecodeError("too_long", len(buf), f"LEN {length} > {self.max_len}", fatal=True))
                self.failed = True
                buf.clear()
                break
            total = HEADER_LEN + length + 1
            if len(buf) < total:
                break
            packet = bytes(buf[:total])
            del buf[:total]
            if checksum(packet[:-1]) != packet[-1]:
                out.append(DecodeError("bad_checksum", total, f"id {packet[2]} type {packet[3]}"))
                continue
            out.append(Packet(packet[2], packet[3], packet[HEADER_LEN:-1]))
        return out


# --- settings (spec/camera.md, "Setting bytes") ---------------------------------------------------

SETTINGS_FIELDS = ("shutter", "gain", "awb_red", "awb_blue", "contrast", "brightness")

# Valid byte ranges, inclusive (the "valid range" column).
BYTE_RANGES: dict[str, tuple[int, int]] = {
    "shutter": (1, 100),
    "gain": (1, 16),
    "awb_red": (1, 50),
    "awb_blue": (1, 50),
    "contrast": (0, 20),
    "brightness": (0, 255),
}

# The same ranges in the original units, for the web API and docs.
UNIT_RANGES: dict[str, tuple[float, float]] = {
    "shutter": (100, 10000),
    "gain": (1, 16),
    "awb_red": (0.1, 5.0),
    "awb_blue": (0.1, 5.0),
    "contrast": (0.0, 2.0),
    "brightness": (-1.0, 1.0),
}

# Encoding truncates like the original (`int(v * 10)`), plus a tiny epsilon so that decoded values
# survive float rounding: without it int((b / 127.5 - 1.0 + 1.0) * 127.5) == b - 1 for 20 bytes.
_EPS = 1e-6


class SettingsError(ValueError):
    """A setting that is missing, of the wrong type or out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@attrs.frozen
class CameraSettings:
    """The six camera settings in the original units (spec/camera.md, defaults row).

    shutter in microseconds (int), gain (int), awb_red/awb_blue/contrast (float), brightness -1..1.
    """

    shutter: int = 10000
    gain: int = 1
    awb_red: float = 1.0
    awb_blue: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """``{"shutter": 10000, "gain": 1, "awb_red": 1.0, ...}`` (the settings JSON file shape)."""
        return {name: getattr(self, name) for name in SETTINGS_FIELDS}


def _encode_field(name: str, value: float) -> int:
    if name == "shutter":
        return int(value // 100)
    if name == "gain":
        return int(value)
    if name == "brightness":
        return int((value + 1.0) * 127.5 + _EPS) if value >= -1.0 else -1
    return int(value * 10 + _EPS) if value >= 0 else -1


def _decode_field(name: str, b: int) -> Any:
    if name == "shutter":
        return b * 100
    if name == "gain":
        return b
    if name == "brightness":
        return b / 127.5 - 1.0
    return b / 10


def validate_settings_bytes(raw: bytes) -> None:
    """Check six setting bytes against the table; raise :class:`SettingsError` naming the first bad one."""
    if len(raw) != 6:
        raise SettingsError("settings", f"expected 6 bytes, got {len(raw)}")
    for name, b in zip(SETTINGS_FIELDS, raw, strict=True):
        lo, hi = BYTE_RANGES[name]
        if not lo <= b <= hi:
            raise SettingsError(name, f"byte {b} out of range {lo}..{hi}")


def settings_to_bytes(settings: CameraSettings) -> bytes:
    """Encode the six settings (the "encode" column). Raises :class:`SettingsError` if a value does
    not fit in a byte at all; range checking is :func:`validate_settings_bytes`'s job."""
    out = []
    for name in SETTINGS_FIELDS:
        b = _encode_field(name, getattr(settings, name))
        if not 0 <= b <= 255:
            lo, hi = UNIT_RANGES[name]
            raise SettingsError(name, f"{getattr(settings, name)!r} out of range {lo:g}..{hi:g}")
        out.append(b)
    return bytes(out)


def settings_from_bytes(raw: bytes, current: CameraSettings | None = None) -> CameraSettings:
    """Validate and decode six setting bytes (the "decode" column).

    Fields whose byte equals the encoding of ``current``'s value keep ``current``'s value (so the
    default brightness 0.0, sent back as byte 127, stays 0.0 instead of becoming -0.0039).
    Raises :class:`SettingsError`.
    """
    validate_settings_bytes(raw)
    values: dict[str, Any] = {}
    for name, b in zip(SETTINGS_FIELDS, raw, strict=True):
        if current is not None and _encode_field(name, getattr(current, name)) == b:
            values[name] = getattr(current, name)
        else:
            values[name] = _decode_field(name, b)
    return CameraSettings(**values)


def settings_from_units(values: Any, base: CameraSettings) -> bytes:
    """Merge a mapping of any subset of the six keys (original units) over ``base``; return the six
    bytes to apply (encoded, then validated). Raises :class:`SettingsError` for unknown keys, wrong
    types (booleans, strings, non-finite numbers) and out-of-range values."""
    if not isinstance(values, dict):
        raise SettingsError("settings", "expected a JSON object")
    merged = base.as_dict()
    for key, value in values.items():
        if key not in SETTINGS_FIELDS:
            raise SettingsError(str(key), "unknown setting")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise SettingsError(key, f"expected a number, got {value!r}")
        if not -1e9 < value < 1e9:  # also inf: keeps the arithmetic below finite
            lo, hi = UNIT_RANGES[key]
            raise SettingsError(key, f"{value!r} out of range {lo:g}..{hi:g}")
        merged[key] = value
    raw = settings_to_bytes(CameraSettings(**merged))
    try:
        validate_settings_bytes(raw)
    except SettingsError as e:
        lo, hi = UNIT_RANGES[e.field]
        raise SettingsError(e.field, f"{merged[e.field]!r} out of range {lo:g}..{hi:g}") from None
    return raw


def settings_from_json_object(obj: Any) -> CameraSettings:
    """Settings from the persisted JSON object (all six keys, original units). Raises SettingsError."""
    if not isinstance(obj, dict):
        raise SettingsError("settings", "expected a JSON object")
    missing = [k for k in SETTINGS_FIELDS if k not in obj]
    if missing:
        raise SettingsError(missing[0], "missing")
    raw = settings_from_units(obj, CameraSettings())
    # keep the file's own values where they encode to the same byte (e.g. brightness 0.0)
    typed = CameraSettings(
        int(obj["shutter"]), int(obj["gain"]), *(float(obj[k]) for k in SETTINGS_FIELDS[2:])
    )
    return settings_from_bytes(raw, typed)


# --- authentication / authorisation policy (spec/camera.md, "Auth", "Authorisation") -------------


class AuthResult(enum.Enum):
    """Outcome of one auth request: reply success, reply failure, or close without a reply."""

    SUCCESS = "success"
    FAILURE = "failure"
    LIMITED = "limited"  # over the failure limit: failure sent without checking the password
    DROP = "drop"  # over the limit and over the answered-attempt budget: close, no reply


@attrs.define(slots=True)
class _IpRecord:
    failures: deque[float] = attrs.Factory(deque)
    limited: deque[float] = attrs.Factory(deque)


class AuthGate:
    """Per-IP password checks with a failure limit, and the table of authorised IPs.

    ``attempt(ip, password, now)``: after ``max_failures`` checked failures from one IP within
    ``window`` seconds, further attempts are answered with failure *without* checking
    (:attr:`AuthResult.LIMITED`), at most ``limited_answers`` per window; the rest are dropped. A
    success authorises the IP until ``now + ttl``. ``allowed(ip, now)`` is the gate for the data
    and settings ports (always true when ``require_auth`` is false). Passwords are compared in
    constant time (SHA-256 digests, so the length does not leak either). Memory is bounded by
    ``max_tracked`` IPs per table.
    """

    def __init__(
        self,
        *,
        require_auth: bool = True,
        ttl: float = 43200.0,
        max_failures: int = 5,
        window: float = 60.0,
        limited_answers: int = 10,
        max_tracked: int = 4096,
    ) -> None:
        self.require_auth = require_auth
        self.ttl = ttl
        self.max_failures = max_failures
        self.window = window
        self.limited_answers = limited_answers
        self.max_tracked = max_tracked
        self._digest = b""
        self._ips: dict[str, _IpRecord] = {}
        self._authorised: dict[str, float] = {}

    def set_password(self, password: str) -> None:
        """Set the password (ASCII/UTF-8 text); an empty password matches nothing."""
        self._digest = hashlib.sha256(password.encode("utf-8")).digest() if password else b""

    def _record(self, ip: str, now: float) -> _IpRecord:
        rec = self._ips.get(ip)
        if rec is None:
            if len(self._ips) >= self.max_tracked:
                self._prune(now)
                if len(self._ips) >= self.max_tracked:
                    self._ips.pop(next(iter(self._ips)))
            rec = self._ips[ip] = _IpRecord()
        for q in (rec.failures, rec.limited):
            while q and q[0] <= now - self.window:
                q.popleft()
        return rec

    def _prune(self, now: float) -> None:
        cutoff = now - self.window
        for ip in [ip for ip, r in self._ips.items() if not r.failures or r.failures[-1] <= cutoff]:
            del self._ips[ip]

    def attempt(self, ip: str, password: bytes, now: float) -> AuthResult:
        """Check one auth request from ``ip`` at ``now`` (seconds); see the class docstring."""
        rec = self._record(ip, now)
        if len(rec.failures) >= self.max_failures:
            if len(rec.limited) >= self.limited_answers:
                return AuthResult.DROP
            rec.limited.append(now)
            return AuthResult.LIMITED
        given = hashlib.sha256(password).digest()
        if self._digest and hmac.compare_digest(given, self._digest):
            self._ips.pop(ip, None)
            self._authorise(ip, now)
            return AuthResult.SUCCESS
        rec.failures.append(now)
        return AuthResult.FAILURE

    def _authorise(self, ip: str, now: float) -> None:
        if ip not in self._authorised and len(self._authorised) >= self.max_tracked:
            for old in [k for k, until in self._authorised.items() if until <= now]:
                del self._authorised[old]
            if len(self._authorised) >= self.max_tracked:
                del self._authorised[min(self._authorised, key=self._authorised.__getitem__)]
        self._authorised[ip] = now + self.ttl

    def allowed(self, ip: str, now: float) -> bool:
        """True if connections from ``ip`` to the data/settings ports may be served at ``now``."""
        if not self.require_auth:
            return True
        until = self._authorised.get(ip)
        if until is None:
            return False
        if until <= now:
            del self._authorised[ip]
            return False
        return True

    def authorised_count(self, now: float) -> int:
        """Number of IPs currently authorised (for status pages)."""
        return sum(1 for until in self._authorised.values() if until > now)


# --- thin protocols -------------------------------------------------------------------------------


class Stats(TypingProtocol):
    """What the camera face needs from ``hub.stats`` (robonet/stats.py)."""

    def error(self, code: str) -> None: ...

    def drop(self, reason: str, count: int = 1) -> None: ...

    def count_in(self, mtype: str, nbytes: int = 0) -> None: ...

    def count_out(self, mtype: str, nbytes: int = 0) -> None: ...

    def connection(self, face: str, delta: int) -> None: ...


class _CameraFactory(ServerFactory["_CameraProtocol"]):
    """Shared connection bookkeeping: clock, stats, auth gate and a per-IP connection cap."""

    log = Logger()
    face = ""

    def __init__(self, *, clock: Any, gate: AuthGate, stats: Stats, max_per_ip: int = 32) -> None:
        self.clock = clock
        self.gate = gate
        self.stats = stats
        self.max_per_ip = max_per_ip
        self.limiter = PerAddressLimiter(max_per_ip)
        self.connections: set[Protocol] = set()

    def admit(self, proto: _CameraProtocol, ip: str, gated: bool) -> bool:
        """Register a new connection; False (and counted) if it must be closed at once."""
        if not self.limiter.acquire(ip):
            self.stats.error("camera_too_many_connections")
            self.log.debug("camera {face}: too many connections from {ip}", face=self.face, ip=ip)
            return False
        if gated and not self.gate.allowed(ip, self.clock.seconds()):
            self.limiter.release(ip)
            self.stats.error("camera_unauthorised")
            self.log.debug("camera {face}: {ip} has not authenticated; closed", face=self.face, ip=ip)
            return False
        self.connections.add(proto)
        self.stats.connection("camera", 1)
        return True

    def release(self, proto: _CameraProtocol, ip: str) -> None:
        """Forget a closed connection admitted by :meth:`admit`."""
        if proto in self.connections:
            self.connections.discard(proto)
            self.stats.connection("camera", -1)
            self.limiter.release(ip)


class _CameraProtocol(Protocol):
    factory: _CameraFactory
    log = Logger()

    def __init__(self) -> None:
        self.ip = ""
        self.admitted = False

    def _peer_ip(self) -> str:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        return str(getattr(peer, "host", "unix"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.admitted:
            self.factory.release(self, self.ip)


@implementer(interfaces.IPushProducer)
class CameraDataProtocol(_CameraProtocol):
    """Port 5000: one data sample every 1/rate_hz seconds from accept (spec/camera.md, "Data").

    Registered as a streaming producer with its transport: while the transport is paused, samples
    are skipped (counted as drops), never queued; a client paused longer than ``slow_timeout``
    seconds is closed. Bytes from the client are discarded (the original never read them).
    """

    factory: CameraDataFactory

    def __init__(self) -> None:
        super().__init__()
        self.paused_since: float | None = None
        self.loop: LoopingCall | None = None
        self.sent = 0
        self.dropped = 0

    def connectionMade(self) -> None:
        f = self.factory
        self.ip = self._peer_ip()
        if not f.admit(self, self.ip, gated=True):
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.admitted = True
        self._small_buffers()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.loop = LoopingCall(self._tick)
        self.loop.clock = f.clock
        self.loop.start(1.0 / f.rate_hz, now=True)

    def _small_buffers(self) -> None:
        # A non-reader should be noticed (paused) after seconds of samples, not after megabytes:
        # a small kernel send buffer, and a small userspace threshold for pauseProducing (Twisted's
        # FileDescriptor.bufferSize, 64 KiB by default; the data port never reads much).
        transport = self.transport
        try:
            sock = transport.getHandle()  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DATA_SNDBUF)
        except (AttributeError, OSError):
            pass
        if hasattr(transport, "bufferSize"):
            setattr(transport, "bufferSize", DATA_PAUSE_BYTES)  # noqa: B010

    def _tick(self) -> None:
        f = self.factory
        now = f.clock.seconds()
        if self.paused_since is not None:
            self.dropped += 1
            f.stats.drop("camera_slow_reader")
            if now - self.paused_since >= f.slow_timeout:
                f.stats.error("camera_slow_reader")
                self.log.info(
                    "camera data: closing {ip}, not reading for {s:.0f} s",
                    ip=self.ip,
                    s=now - self.paused_since,
                )
                self._stop_loop()
                self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.transport.write(encode_data_sample(f.sample(), int(now * 1000)))  # type: ignore[union-attr]
        f.stats.count_out("camera_data", 16)
        self.sent += 1

    def dataReceived(self, data: bytes) -> None:
        """Clients send nothing on this port; discard it."""

    def pauseProducing(self) -> None:
        if self.paused_since is None:
            self.paused_since = self.factory.clock.seconds()

    def resumeProducing(self) -> None:
        self.paused_since = None

    def stopProducing(self) -> None:
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_loop()
        super().connectionLost(reason)


class CameraDataFactory(_CameraFactory):
    """Factory for port 5000. ``sample()`` returns the value byte for the next packet (0..255)."""

    protocol = CameraDataProtocol
    face = "data"

    def __init__(
        self,
        *,
        clock: Any,
        gate: AuthGate,
        stats: Stats,
        sample: Callable[[], int],
        rate_hz: float = 24.0,
        slow_timeout: float = 30.0,
        max_per_ip: int = 32,
    ) -> None:
        super().__init__(clock=clock, gate=gate, stats=stats, max_per_ip=max_per_ip)
        self.sample = sample
        self.rate_hz = rate_hz
        self.slow_timeout = slow_timeout


class _PacketProtocol(_CameraProtocol):
    """A decoder-fed protocol with a per-packet read deadline (a started packet must complete)."""

    max_len = SETTINGS_MAX_LEN
    timeout_code = "camera_packet_timeout"

    def __init__(self) -> None:
        super().__init__()
        self.decoder = PacketDecoder(self.max_len)
        self.deadline: DelayedCall | None = None
        self.closing = False

    def _close(self, abort: bool = False) -> None:
        self.closing = True
        self._cancel_deadline()
        if abort:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _cancel_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def _arm_deadline(self, timeout: float, restart: bool) -> None:
        if self.deadline is not None and self.deadline.active():
            if not restart:
                return
            self.deadline.cancel()
        self.deadline = self.factory.clock.callLater(timeout, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self.deadline = None
        self.factory.stats.error(self.timeout_code)
        self.log.debug(
            "camera {face}: {ip} did not complete a packet in time; closed",
            face=self.factory.face,
            ip=self.ip,
        )
        self._close(abort=True)

    def _decode(self, data: bytes, timeout: float) -> Iterator[Packet | DecodeError]:
        """Feed ``data``; yield items; keep the per-packet deadline armed while a packet is pending."""
        items = self.decoder.feed(data)
        completed = any(isinstance(i, Packet) for i in items)
        yield from items
        if self.closing:
            return
        if self.decoder.pending:
            self._arm_deadline(timeout, restart=completed)
        else:
            self._cancel_deadline()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self.decoder.pending and not self.closing:
            self.factory.stats.error("camera_truncated")
        super().connectionLost(reason)


class CameraSettingsProtocol(_PacketProtocol):
    """Port 5001 (spec/camera.md, "Settings"): LEN 0 request -> response; LEN 6 update -> apply or
    settings rejected. Other packets are dropped and counted; bad magic resyncs; bad checksum drops
    the packet; LEN over :data:`SETTINGS_MAX_LEN` closes the connection."""

    factory: CameraSettingsFactory

    def connectionMade(self) -> None:
        self.ip = self._peer_ip()
        if not self.factory.admit(self, self.ip, gated=True):
            self.closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.admitted = True

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        f = self.factory
        for item in self._decode(data, f.packet_timeout):
            if isinstance(item, DecodeError):
                f.stats.error("camera_" + item.code)
                self.log.debug(
                    "camera settings: {ip}: {code} ({detail})", ip=self.ip, code=item.code, detail=item.detail
                )
                if item.fatal:
                    self._close(abort=True)
                    return
                continue
            self._packet(item)
            if self.closing:
                return

    def _packet(self, p: Packet) -> None:
        f = self.factory
        f.stats.count_in("camera_settings", len(p.payload))
        if p.id != ID_SETTINGS or p.type != TYPE_REQUEST or len(p.payload) not in (0, 6):
            f.stats.error("camera_bad_packet")
            self.log.debug(
                "camera settings: {ip}: dropped id {id} type {type} len {n}",
                ip=self.ip,
                id=p.id,
                type=p.type,
                n=len(p.payload),
            )
            return
        if not p.payload:
            self.transport.write(encode_settings_response(f.current_bytes()))  # type: ignore[union-attr]
            f.stats.count_out("camera_settings", 9)
            return
        try:
            f.apply(p.payload)
        except SettingsError as e:
            f.stats.error("camera_settings_rejected")
            self.log.info("camera settings: rejected update from {ip}: {err}", ip=self.ip, err=str(e))
            self.transport.write(SETTINGS_REJECTED)  # type: ignore[union-attr]


class CameraSettingsFactory(_CameraFactory):
    """Factory for port 5001.

    ``current_bytes()`` returns the six current setting bytes; ``apply(raw)`` validates and applies six
    bytes, raising :class:`SettingsError` when they are rejected (nothing changed).
    """

    protocol = CameraSettingsProtocol
    face = "settings"

    def __init__(
        self,
        *,
        clock: Any,
        gate: AuthGate,
        stats: Stats,
        current_bytes: Callable[[], bytes],
        apply: Callable[[bytes], object],
        packet_timeout: float = 5.0,
        max_per_ip: int = 32,
    ) -> None:
        super().__init__(clock=clock, gate=gate, stats=stats, max_per_ip=max_per_ip)
        self.current_bytes = current_bytes
        self.apply = apply
        self.packet_timeout = packet_timeout


class CameraAuthProtocol(_PacketProtocol):
    """Port 5002 (spec/camera.md, "Auth"): one request within ``request_timeout``, one reply, close.

    Auth success -> ``ready``; wrong password or rate limited -> auth failure; anything malformed
    (bad magic, bad checksum, wrong id/type, empty password, LEN > 256) -> close without a reply.
    """

    factory: CameraAuthFactory
    max_len = AUTH_MAX_LEN
    timeout_code = "camera_auth_timeout"

    def connectionMade(self) -> None:
        f = self.factory
        self.ip = self._peer_ip()
        if not f.admit(self, self.ip, gated=False):
            self.closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.admitted = True
        self.deadline = f.clock.callLater(f.request_timeout, self._deadline_passed)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        f = self.factory
        items = self.decoder.feed(data)
        if not items:
            return  # the whole-request deadline armed at connect keeps running
        item = items[0]
        if isinstance(item, DecodeError):
            f.stats.error("camera_" + item.code)
            self.log.debug("camera auth: {ip}: {code}; closed without reply", ip=self.ip, code=item.code)
            self._close(abort=item.fatal)
            return
        if item.id != ID_AUTH or item.type != TYPE_REQUEST or not item.payload:
            f.stats.error("camera_bad_packet")
            self.log.debug("camera auth: {ip}: bad request; closed without reply", ip=self.ip)
            self._close()
            return
        f.stats.count_in("camera_auth", len(item.payload))
        result = f.gate.attempt(self.ip, item.payload, f.clock.seconds())
        if result is AuthResult.SUCCESS:
            self.log.info("camera auth: {ip} authenticated", ip=self.ip)
            self.transport.write(AUTH_SUCCESS)  # type: ignore[union-attr]
        elif result is AuthResult.DROP:
            f.stats.error("camera_auth_limited")
        else:
            f.stats.error("camera_auth_failed" if result is AuthResult.FAILURE else "camera_auth_limited")
            self.log.info("camera auth: {result} from {ip}", result=result.value, ip=self.ip)
            self.transport.write(AUTH_FAILURE)  # type: ignore[union-attr]
        self._close()


class CameraAuthFactory(_CameraFactory):
    """Factory for port 5002; ``request_timeout`` seconds to send the one request."""

    protocol = CameraAuthProtocol
    face = "auth"

    def __init__(
        self, *, clock: Any, gate: AuthGate, stats: Stats, request_timeout: float = 5.0, max_per_ip: int = 32
    ) -> None:
        super().__init__(clock=clock, gate=gate, stats=stats, max_per_ip=max_per_ip)
        self.request_timeout = request_timeout
