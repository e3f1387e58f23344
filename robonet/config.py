"""robonet configuration: built-in defaults < TOML file < environment < command line.

Every key lives in a section (``[hub]``, ``[botlink]``, ...) and can also be set in the
environment as ``ROBONET_<SECTION>_<KEY>`` (e.g. ``ROBONET_BOTLINK_IDLE_TIMEOUT=60``). The camera
service additionally honours the original ES_Stream_MTX variables ``SERVER_HOST``, ``DATA_PORT``,
``SETTINGS_PORT``, ``AUTH_PORT``, ``AUTH_PASSWORD`` and ``LOG_LEVEL`` (spec/camera.md), below the
``ROBONET_*`` variables.

Invalid input raises :class:`ConfigError` whose ``str()`` is one line naming the key, e.g.
``botlink.idle_timeout: expected a number > 0, got 'soon'``. ``etc/robonet.toml`` documents every key.
"""

from __future__ import annotations

import math
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
DEFAULT_COMMANDS = (
    "robot_move",
    "camera_move",
    "set_speed",
    "set_brightness",
    "set",
    "stop",
    "movement_instruction",
    "trial_response",
    "line",  # one bare text line to a line-link (LabAuto) device, docs/linelink.rst
)


class ConfigError(Exception):
    """An invalid or unknown configuration key; ``str(err)`` is one line naming the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


# --- value checkers: (raw value, key) -> normalised value, raising ConfigError -------------------

Checker = Callable[[Any, str], Any]


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(key, f"expected {expected}, got {value!r}")


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, "a string", value)
    return value


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise _fail(key, "true or false", value)


def _number(kind: type, minimum: float, strict: bool, maximum: float = math.inf) -> Checker:
    label = f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} {minimum:g}"
    if maximum != math.inf:
        label += f" and <= {maximum:g}"

    def check(value: Any, key: str) -> Any:
        if isinstance(value, str):
            try:
                value = kind(value.strip())
            except ValueError:
                raise _fail(key, label, value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, label, value)
        if kind is int and not isinstance(value, int):
            raise _fail(key, label, value)
        # not (x >= min) also catches nan; inf is no valid duration or size either
        if not value >= minimum or (strict and value == minimum) or value > maximum or value == math.inf:
            raise _fail(key, label, value)
        return kind(value)

    return check


def _choice(*choices: str) -> Checker:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise _fail(key, "one of " + ", ".join(choices), value)
        return value.lower()

    return check


def _parse_env_structure(value: str) -> Any:
    """Environment values for lists/tables: JSON (``["a","b"]``) or comma-separated (``a,b``)."""
    text = value.strip()
    if text.startswith(("[", "{")):
        return orjson.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


def _str_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = _parse_env_structure(value) if value.strip() else []
        except orjson.JSONDecodeError:
            raise _fail(key, "a list of strings", value) from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(key, "a list of strings", value)
    return tuple(value)


LISTEN_BACKLOG = 1024


def with_backlog(desc: str) -> str:
    """Give a ``tcp:``/``ssl:`` listen description a deep accept backlog unless it sets one.

    Twisted's default (50) makes a burst of connects wait for SYN retries (1 s each).
    """
    kind = desc.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in desc:
        return f"{desc}:backlog={LISTEN_BACKLOG}"
    return desc


def _listen(value: Any, key: str) -> tuple[str, ...]:
    """A listen key: one endpoint string or a list of them; ``none`` (or ``[]``) disables the face."""
    if isinstance(value, str) and "," not in value and not value.strip().startswith("["):
        value = [value]
    items = _str_list(value, key)
    out = tuple(v.strip() for v in items if v.strip() and v.strip().lower() != "none")
    for desc in out:
        if ":" not in desc:
            raise ConfigError(key, f"expected a Twisted endpoint string such as 'tcp:5100', got {desc!r}")
    return out


def _one_listen(value: Any, key: str) -> str:
    items = _listen(value, key)
    if len(items) > 1:
        raise _fail(key, "one endpoint string", value)
    return items[0] if items else ""


def _str_table(value: Any, key: str) -> dict[str, str]:
    if isinstance(value, str):
        try:
            value = orjson.loads(value) if value.strip() else {}
        except orjson.JSONDecodeError:
            raise _fail(key, "a table of strings", value) from None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _fail(key, "a table of strings", value)
    return dict(value)


def _forward(value: Any, key: str) -> str | tuple[str, ...]:
    if isinstance(value, str) and value.lower() in ("all", "none"):
        return value.lower()
    return _str_list(value, key)


_POS_INT = _number(int, 0, True)
_NONNEG_INT = _number(int, 0, False)
_POS_NUM = _number(float, 0, True)
_NONNEG_NUM = _number(float, 0, False)
_PORT = _number(int, 0, False, 65535)


def _key(default: Any, check: Checker, doc: str = "") -> Any:
    return attrs.field(default=default, metadata={"check": check, "doc": doc})


# --- sections ------------------------------------------------------------------------------------


@attrs.frozen
class HubConfig:
    """``[hub]``: who this hub is and where it keeps state (etc/robonet.toml documents every key).

    ``name`` is shown to peers and dashboards (empty: the host name); ``project_id`` groups hubs
    that federate; ``state_dir`` holds the node id, the SQLite history and the camera files
    (empty: ``$STATE_DIRECTORY``, else ``$XDG_STATE_HOME/robonet``); ``commands`` lists the
    message types dashboards, clients and peers may send to robots.
    """

    name: str = _key("", _str, "hub name shown to peers and dashboards (default: host name)")
    project_id: str = _key("default", _str)
    state_dir: str = _key("", _str)
    commands: tuple[str, ...] = _key(DEFAULT_COMMANDS, _str_list)


@attrs.frozen
class BotlinkConfig:
    """``[botlink]``: the robonet/1 bot link and legacy Cartobot dialect (spec/botlink.md, docs/botlink.rst).

    ``listen``: endpoint strings (empty list: face off). Limits: ``max_frame`` / ``max_hello_frame``
    bytes per frame after / before hello, ``hello_timeout`` and ``idle_timeout`` seconds,
    ``ack_timeout`` seconds for a robot to ack a command, ``max_per_ip`` concurrent connections
    per client address. Legacy: ``legacy_poll_wait`` seconds an instruction poll is held,
    ``legacy_queue`` instructions queued per bot, ``legacy_names`` IP -> device id.
    """

    listen: tuple[str, ...] = _key(("tcp:5100",), _listen)
    max_frame: int = _key(1048576, _POS_INT)
    idle_timeout: float = _key(30.0, _POS_NUM)
    ack_timeout: float = _key(5.0, _POS_NUM)
    legacy_poll_wait: float = _key(10.0, _NONNEG_NUM)
    legacy_queue: int = _key(32, _POS_INT)
    legacy_names: dict[str, str] = _key(attrs.Factory(dict), _str_table)
    max_hello_frame: int = _key(65536, _POS_INT)
    hello_timeout: float = _key(10.0, _POS_NUM)
    max_per_ip: int = _key(64, _POS_INT)


@attrs.frozen
class LineConfig:
    """``[line]``: the newline-delimited JSON/text line link (spec/linelink.md, docs/linelink.rst).

    ``listen``: endpoint strings (empty list: face off); ``max_line`` bytes per line;
    ``max_clients`` concurrent connections; ``idle_timeout`` seconds without a complete line;
    ``text_replies``: LabAuto text lines answered while no ``text`` endpoint is registered.
    """

    listen: tuple[str, ...] = _key(("tcp:5555",), _listen)
    max_line: int = _key(65536, _POS_INT)
    max_clients: int = _key(256, _POS_INT)
    idle_timeout: float = _key(600.0, _POS_NUM, "s without a complete line before a connection is closed")
    text_replies: dict[str, str] = _key(
        attrs.Factory(lambda: {"hello": "ok", "ping": "pong"}),
        _str_table,
        "exact LabAuto text lines answered while no `text` endpoint is registered",
    )


@attrs.frozen
class CameraConfig:
    """``[camera]``: the ES_Stream_MTX-compatible camera face and its pipeline (spec/camera.md,
    docs/camera.rst).

    Ports: ``data_listen`` / ``settings_listen`` / ``auth_listen`` (``none`` disables one),
    ``max_per_ip`` connections per client IP on each, ``packet_timeout`` and ``slow_timeout``
    seconds. Auth: ``password`` (empty: generated into ``<state_dir>/camera_password``),
    ``require_auth``, ``auth_ttl`` seconds, ``auth_max_failures``. Data: ``rate_hz``,
    ``data_source``. Pipeline (:mod:`robonet.services.camera_pipeline`): ``pipeline``
    off/test/libcamera, the argv templates, ``rtsp_url``, ``output_format``, ``preview_fps``,
    ``stall_timeout`` seconds without a frame before a restart.
    """

    enabled: bool = _key(True, _bool)
    data_listen: str = _key("tcp:5000", _one_listen)
    settings_listen: str = _key("tcp:5001", _one_listen)
    auth_listen: str = _key("tcp:5002", _one_listen)
    password: str = _key("", _str, "empty: generated on first start into <state_dir>/camera_password")
    require_auth: bool = _key(True, _bool)
    auth_ttl: float = _key(43200.0, _POS_NUM)
    auth_max_failures: int = _key(5, _POS_INT)
    rate_hz: float = _key(24.0, _POS_NUM)
    data_source: str = _key("random", _str, "'random' (0..10) or '<device_id>.<field>' from the registry")
    pipeline: str = _key("off", _choice("off", "test", "libcamera"))
    stall_timeout: float = _key(10.0, _POS_NUM)
    rtsp_url: str = _key("rtsp://localhost:8554/ES_MTX", _str, "output URL or file path ({rtsp_url})")
    output_format: str = _key(
        "", _str, "ffmpeg -f for rtsp_url ({output_format}); empty: rtsp for rtsp://, else mpegts"
    )
    camera_tool: str = _key("rpicam-vid", _str, "libcamera-vid on Raspberry Pi OS before Bookworm")
    camera_argv: tuple[str, ...] = _key(
        (
            "{camera_tool}",
            "-t",
            "0",
            "--width",
            "640",
            "--height",
            "480",
            "--framerate",
            "24",
            "--codec",
            "h264",
            "--inline",
            "--profile",
            "baseline",
            "--level",
            "4.2",
            "--vflip",
            "--nopreview",
            "--shutter",
            "{shutter}",
            "--gain",
            "{gain}",
            "--awbgains",
            "{awb_red},{awb_blue}",
            "--contrast",
            "{contrast}",
            "--brightness",
            "{brightness}",
            "-o",
            "-",
        ),
        _str_list,
    )
    encoder_argv: tuple[str, ...] = _key(
        (
            "ffmpeg",
            "-hide_banner",
            "-nostats",
            "-loglevel",
            "warning",
            "-progress",
            "pipe:2",
            "-fflags",
            "nobuffer",
            "-flags",
            "low_delay",
            "-probesize",
            "32",
            "-analyzeduration",
            "0",
            "-r",
            "24",
            "-f",
            "h264",
            "-i",
            "-",
            "-c:v",
            "copy",
            "-y",
            "-f",
            "{output_format}",
            "{rtsp_url}",
        ),
        _str_list,
    )
    test_argv: tuple[str, ...] = _key(
        (
            "ffmpeg",
            "-hide_banner",
            "-nostdin",
            "-nostats",
            "-loglevel",
            "warning",
            "-progress",
            "pipe:2",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=640x480:rate=24",
            "-vf",
            "eq=brightness={brightness}:contrast={contrast}",
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            "24",
            "-y",
            "-f",
            "{output_format}",
            "{rtsp_url}",
        ),
        _str_list,
    )
    preview_fps: float = _key(
        2.0, _NONNEG_NUM, "MJPEG preview frames per second (every 24/preview_fps-th frame); 0: no preview"
    )
    preview_argv: tuple[str, ...] = _key(
        (
            "-an",
            "-vf",
            "select='not(mod(n,{preview_every}))',scale=320:-2",
            "-fps_mode",
            "passthrough",
            "-pix_fmt",
            "yuvj420p",
            "-c:v",
            "mjpeg",
            "-q:v",
            "8",
            "-f",
            "image2pipe",
            "pipe:1",
        ),
        _str_list,
        "second ffmpeg output appended to the last process of the chain when preview_fps > 0",
    )
    packet_timeout: float = _key(5.0, _POS_NUM, "seconds a started packet (and the auth request) may take")
    slow_timeout: float = _key(30.0, _POS_NUM, "seconds a data client may stop reading before it is closed")
    max_per_ip: int = _key(32, _POS_INT, "connections per client IP on each camera port")


@attrs.frozen
class WebConfig:
    """``[web]``: dashboard, REST API, ``/ws/telemetry/`` and ``/metrics`` (spec/websocket.md,
    docs/web.rst).

    ``listen``: endpoint strings (empty list: face off); ``allowed_origins`` (empty: same host
    only); ``max_queue_bytes`` per dashboard send queue and ``slow_timeout`` seconds over it before
    the dashboard is closed; ``max_message`` bytes per WebSocket message; ``header_timeout``
    absolute seconds for an HTTP request's headers; ``echo`` serves ``/ws/echo`` for fuzzing.
    """

    listen: tuple[str, ...] = _key(("tcp:8000",), _listen)
    allowed_origins: tuple[str, ...] = _key((), _str_list)
    max_queue_bytes: int = _key(1048576, _POS_INT)
    slow_timeout: float = _key(10.0, _POS_NUM)
    max_message: int = _key(1048576, _POS_INT)
    header_timeout: float = _key(10.0, _POS_NUM)
    echo: bool = _key(False, _bool)


def _dsn(value: Any, key: str) -> str:
    text = _str(value, key)
    if text and not text.startswith(("postgresql://", "postgres://")) and "=" not in text:
        raise _fail(key, "a postgresql:// URL or a libpq key=value string", value)
    return text


@attrs.frozen
class StoreConfig:
    """``[store]``: the telemetry history (docs/store.rst). ``backend`` "sqlite" (a file per hub at
    ``path``) or "postgresql" (``dsn``, shared by several hubs; ``pool_size`` connections). Group
    commit: ``commit_interval`` s, ``max_batch`` rows, ``max_batch_bytes``; at most
    ``max_pending_rows`` uncommitted rows (then ``store_unavailable``); ``stop_timeout`` s to flush."""

    enabled: bool = _key(True, _bool)
    path: str = _key("", _str)
    retention_days: float = _key(30.0, _NONNEG_NUM)
    max_rows: int = _key(5000000, _NONNEG_INT)
    synchronous: str = _key("normal", _choice("normal", "full"))
    backend: str = _key("sqlite", _choice("sqlite", "postgresql"))
    dsn: str = _key("", _dsn)
    pool_size: int = _key(2, _POS_INT)
    commit_interval: float = _key(0.005, _NONNEG_NUM)
    max_batch: int = _key(10000, _POS_INT)
    max_batch_bytes: int = _key(4194304, _POS_INT)
    max_pending_rows: int = _key(200000, _POS_INT)
    stop_timeout: float = _key(10.0, _NONNEG_NUM)

    def __attrs_post_init__(self) -> None:
        if self.backend == "postgresql" and not self.dsn:
            raise ConfigError("store.dsn", 'required when store.backend = "postgresql"')


@attrs.frozen
class DiscoveryConfig:
    """``[discovery]``: UDP broadcast announcements and mDNS (spec/discovery-peers.md).

    ``port`` UDP port, ``interval`` seconds between announcements, ``broadcast_addresses``
    (empty: every interface), ``mdns`` also advertises ``_robonet._tcp.local.``.
    """

    enabled: bool = _key(True, _bool)
    port: int = _key(8890, _PORT)
    interval: float = _key(5.0, _POS_NUM)
    broadcast_addresses: tuple[str, ...] = _key((), _str_list)
    mdns: bool = _key(True, _bool)


@attrs.frozen
class PeersConfig:
    """``[peers]``: federation with other robonet hubs (spec/discovery-peers.md, docs/federation.rst).

    The PeerService runs whenever the bot link listens: ``auto`` decides whether it dials
    discovered hubs, ``accept`` whether it takes inbound peer links on the bot link.
    """

    auto: bool = _key(True, _bool, "dial compatible discovered hubs of the same project")
    accept: bool = _key(True, _bool, "accept authenticated inbound peer links on the bot link")
    static: tuple[str, ...] = _key((), _str_list)
    require_same_hash: bool = _key(False, _bool)
    forward: str | tuple[str, ...] = _key("all", _forward)
    secret: str = _key("", _str)


def _cidr_list(value: Any, key: str) -> tuple[str, ...]:
    import ipaddress

    items = _str_list(value, key)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _fail(key, "a list of CIDR networks such as '203.0.113.0/24'", item) from None
    return items


@attrs.frozen
class AuthConfig:
    """``[auth]``: the security model (robonet/auth.py, docs/security.rst)."""

    mode: str = _key(
        "lan",
        _choice("lan", "token", "open"),
        "lan: loopback and legacy dialects from private networks trusted, tokens elsewhere; "
        "token: a credential everywhere; open: no checks (loud warning)",
    )
    tokens: dict[str, str] = _key(
        attrs.Factory(dict), _str_table, "config-file tokens: {token = role} or role:device-glob,..."
    )
    allow: tuple[str, ...] = _key((), _cidr_list, "public networks treated like private ones in lan mode")
    poll_interval: float = _key(1.0, _POS_NUM, "s between checks of <state_dir>/tokens.json for changes")
    pairing: bool = _key(True, _bool, "on first start create an admin token and log a pairing URL")
    pairing_host: str = _key("", _str, "host name in the pairing URL (default: this host's address)")
    audit_max: int = _key(1000, _POS_INT, "audit entries kept in memory for GET /api/audit")
    deny_log_interval: float = _key(60.0, _POS_NUM, "s between log lines per denied identity and reason")
    lease: bool = _key(True, _bool, "control lease per robot for dashboard commands")


@attrs.frozen
class TlsConfig:
    """``[tls]``: certificates for HTTPS/WSS and ssl: listeners (robonet/tls.py)."""

    mode: str = _key("off", _choice("off", "auto", "files"), "auto: self-signed into <state_dir>/tls")
    cert: str = _key("", _str, "PEM certificate (chain) for mode = files")
    key: str = _key("", _str, "PEM private key for mode = files")
    web_listen: tuple[str, ...] = _key(("ssl:8443",), _listen, "HTTPS/WSS listeners when tls is on")
    botlink_listen: tuple[str, ...] = _key(("ssl:5101",), _listen, "TLS bot link listeners")
    line_listen: tuple[str, ...] = _key(("ssl:5556",), _listen, "TLS line link listeners")


@attrs.frozen
class TeleopConfig:
    """``[teleop]``: ``deadman_ms``: a moving robot that gets no motion command (robot_move,
    camera_move) for this long is sent a stop (0: off; a dashboard that goes away always stops the
    robots it was driving)."""

    deadman_ms: int = _key(500, _NONNEG_INT, "ms without a repeated motion command before a stop; 0: off")


@attrs.frozen
class LogConfig:
    """``[log]``: ``level`` (debug, info, warn, error, critical) and ``json_file`` (a JSON-lines
    log file next to the text log; empty: none)."""

    level: str = _key("info", _choice(*LOG_LEVELS, "warning"))
    json_file: str = _key("", _str)


@attrs.frozen
class FoxgloveConfig:
    """``[foxglove]``: the Foxglove WebSocket face (foxglove.websocket.v1, docs/foxglove.rst).

    ``listen`` endpoints (``none`` disables); ``max_message`` caps every incoming frame, message
    and inflated message (bytes, close 1009 above); ``max_queue_bytes`` is each client's send
    queue budget; ``slow_timeout`` the seconds a client may stay stalled before it is closed;
    ``max_clients`` open connections; ``max_channels`` server channels (one per device and message
    type); ``max_client_channels`` channels one client may advertise; ``handshake_timeout`` seconds
    to complete the WebSocket opening handshake.
    """

    listen: tuple[str, ...] = _key(("tcp:8765",), _listen)
    max_message: int = _key(1048576, _POS_INT)
    max_queue_bytes: int = _key(1048576, _POS_INT)
    slow_timeout: float = _key(10.0, _POS_NUM)
    max_clients: int = _key(32, _POS_INT)
    max_channels: int = _key(10000, _POS_INT)
    max_client_channels: int = _key(64, _POS_INT)
    handshake_timeout: float = _key(10.0, _POS_NUM)


@attrs.frozen
class RecorderConfig:
    """``[recorder]``: the MCAP recorder (docs/recording.rst). Off by default.

    ``dir`` defaults to ``<state_dir>/recordings``; a file is rotated after ``rotate_mb`` MiB or
    ``rotate_minutes``; the oldest files go once the directory holds over ``keep_gb`` GiB (0 = keep
    all). ``queue`` bounds the events waiting for the writer thread (oldest dropped and counted);
    ``chunk_kb`` is the MCAP chunk size and ``flush_interval`` (s) how often the chunk in progress
    is written out, which bounds what a crash can lose; ``exclude_types`` are not recorded.
    """

    enabled: bool = _key(False, _bool)
    dir: str = _key("", _str)
    rotate_mb: float = _key(256.0, _POS_NUM)
    rotate_minutes: float = _key(60.0, _POS_NUM)
    keep_gb: float = _key(10.0, _NONNEG_NUM)
    queue: int = _key(100000, _POS_INT)
    chunk_kb: int = _key(1024, _POS_INT)
    flush_interval: float = _key(1.0, _POS_NUM)
    compression: str = _key("zstd", _choice("zstd", "lz4", "none"))
    exclude_types: tuple[str, ...] = _key(("video_frame",), _str_list)


def _qos(value: Any, key: str) -> int:
    if isinstance(value, str) and value.strip() in ("0", "1", "2"):
        return int(value.strip())
    if isinstance(value, bool) or value not in (0, 1, 2):
        raise _fail(key, "an MQTT QoS 0, 1 or 2", value)
    return int(value)


def _qos_table(value: Any, key: str) -> dict[str, int]:
    if isinstance(value, str):
        try:
            value = orjson.loads(value) if value.strip() else {}
        except orjson.JSONDecodeError:
            raise _fail(key, "a table of message type = QoS", value) from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _fail(key, "a table of message type = QoS", value)
    return {k: _qos(v, f"{key}.{k}") for k, v in value.items()}


def _mqtt_broker(value: Any, key: str) -> str:
    text = _str(value, key).strip()
    if not text.lower().startswith(("tcp:", "ssl:", "mqtt://", "mqtts://")):
        raise ConfigError(
            key, f"expected tcp:HOST:PORT, ssl:HOST:PORT, mqtt://HOST:PORT or mqtts://..., got {text!r}"
        )
    return text


@attrs.frozen
class MqttConfig:
    """``[mqtt]``: the MQTT bridge (docs/mqtt.rst), an MQTT client of ``broker``; off by default.

    ``broker`` is ``tcp:HOST:PORT``, ``ssl:HOST:PORT`` (TLS: CA ``ca_file`` or the system CAs, the
    host name checked; ``cert_file``/``key_file`` for a client certificate) or an ``mqtt://`` /
    ``mqtts://`` URL (``user:password@`` allowed). Times are seconds, sizes bytes.
    """

    enabled: bool = _key(False, _bool, "run the MQTT bridge")
    broker: str = _key("tcp:127.0.0.1:1883", _mqtt_broker, "broker endpoint or URL")
    protocol: str = _key("3.1.1", _choice("3.1.1", "5"), "MQTT protocol version")
    client_id: str = _key("", _str, "MQTT client id (default robonet-<node_id>)")
    username: str = _key("", _str)
    password: str = _key("", _str)
    ca_file: str = _key("", _str, "CA bundle for ssl: (default: the system CAs)")
    cert_file: str = _key("", _str, "client certificate (PEM) for ssl:")
    key_file: str = _key("", _str, "client certificate key (PEM)")
    keepalive: int = _key(30, _number(int, 5, False, 65535), "MQTT keep-alive")
    connect_timeout: float = _key(10.0, _POS_NUM)
    reconnect_max: float = _key(30.0, _POS_NUM, "longest reconnect back-off delay")
    prefix: str = _key("robonet", _str, "topic prefix")
    data_qos: int = _key(0, _qos, "QoS of data messages")
    qos_by_type: dict[str, int] = _key(attrs.Factory(lambda: {"system_status": 1}), _qos_table)
    status_qos: int = _key(1, _qos, "QoS of retained statuses and command results")
    batch_interval: float = _key(0.05, _NONNEG_NUM, "latest-value data conflation window; 0 = none")
    max_queue_bytes: int = _key(1048576, _POS_INT, "outbound queue while disconnected (drop-oldest)")
    max_payload: int = _key(65536, _POS_INT, "largest incoming payload acted on")
    command_timeout: float = _key(10.0, _POS_NUM, "wait for a remote command's result")
    federate: bool = _key(False, _bool, "import devices of other hubs on the broker")
    max_remote_devices: int = _key(10000, _POS_INT, "devices imported from the broker, at most")


SECTIONS: dict[str, type] = {
    "hub": HubConfig,
    "botlink": BotlinkConfig,
    "line": LineConfig,
    "camera": CameraConfig,
    "web": WebConfig,
    "store": StoreConfig,
    "discovery": DiscoveryConfig,
    "peers": PeersConfig,
    "auth": AuthConfig,
    "tls": TlsConfig,
    "teleop": TeleopConfig,
    "log": LogConfig,
    "foxglove": FoxgloveConfig,
    "recorder": RecorderConfig,
    "mqtt": MqttConfig,
}


@attrs.frozen
class Config:
    """The whole validated configuration. Sections are frozen attrs classes; see ``SECTIONS``."""

    hub: HubConfig = attrs.Factory(HubConfig)
    botlink: BotlinkConfig = attrs.Factory(BotlinkConfig)
    line: LineConfig = attrs.Factory(LineConfig)
    camera: CameraConfig = attrs.Factory(CameraConfig)
    web: WebConfig = attrs.Factory(WebConfig)
    store: StoreConfig = attrs.Factory(StoreConfig)
    discovery: DiscoveryConfig = attrs.Factory(DiscoveryConfig)
    peers: PeersConfig = attrs.Factory(PeersConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    tls: TlsConfig = attrs.Factory(TlsConfig)
    teleop: TeleopConfig = attrs.Factory(TeleopConfig)
    log: LogConfig = attrs.Factory(LogConfig)
    foxglove: FoxgloveConfig = attrs.Factory(FoxgloveConfig)
    recorder: RecorderConfig = attrs.Factory(RecorderConfig)
    mqtt: MqttConfig = attrs.Factory(MqttConfig)

    @property
    def state_path(self) -> Path:
        """The resolved state directory (``hub.state_dir``)."""
        return Path(self.hub.state_dir)

    @property
    def store_path(self) -> Path:
        """The resolved SQLite path (``store.path``, default ``<state_dir>/telemetry.sqlite3``)."""
        return Path(self.store.path) if self.store.path else self.state_path / "telemetry.sqlite3"

    @property
    def recorder_dir(self) -> Path:
        """The resolved recordings directory (``recorder.dir``, default ``<state_dir>/recordings``)."""
        return Path(self.recorder.dir) if self.recorder.dir else self.state_path / "recordings"


def _merge(layers: list[tuple[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Fold layers of ``{section: {key: value}}``; check names, leave values for the section."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for _origin, layer in layers:
        for section, values in layer.items():
            if section not in SECTIONS:
                raise ConfigError(section, "unknown section")
            if not isinstance(values, Mapping):
                raise ConfigError(section, "expected a table")
            names = {f.name for f in attrs.fields(SECTIONS[section])}
            for key, value in values.items():
                if key not in names:
                    raise ConfigError(f"{section}.{key}", "unknown key")
                merged[section][key] = value
    return merged


def _build_section(section: str, values: Mapping[str, Any]) -> Any:
    cls = SECTIONS[section]
    checked = {}
    for f in attrs.fields(cls):
        if f.name in values:
            checked[f.name] = f.metadata["check"](values[f.name], f"{section}.{f.name}")
    return cls(**checked)


def environment_layer(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Config values from ``ROBONET_<SECTION>_<KEY>`` and the camera's original variables.

    Unknown ``ROBONET_*`` names raise :class:`ConfigError` (a typo should not be silently ignored).
    """
    layer: dict[str, dict[str, Any]] = {}
    host = environ.get("SERVER_HOST")
    for env_name, key, default_port in (
        ("DATA_PORT", "data_listen", 5000),
        ("SETTINGS_PORT", "settings_listen", 5001),
        ("AUTH_PORT", "auth_listen", 5002),
    ):
        port_text = environ.get(env_name)
        if port_text is None and not host:
            continue
        if port_text is not None and not port_text.strip().isdigit():
            raise ConfigError(env_name, f"expected a port number, got {port_text!r}")
        port = int(port_text) if port_text is not None else default_port
        layer.setdefault("camera", {})[key] = f"tcp:{port}" + (f":interface={host}" if host else "")
    if "AUTH_PASSWORD" in environ:
        layer.setdefault("camera", {})["password"] = environ["AUTH_PASSWORD"]
    if "LOG_LEVEL" in environ:
        layer.setdefault("log", {})["level"] = environ["LOG_LEVEL"].lower()
    for name, value in environ.items():
        if not name.startswith("ROBONET_"):
            continue
        rest = name[len("ROBONET_") :].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(name, "unknown section in environment variable")
        layer.setdefault(section, {})[rest[len(section) + 1 :]] = value
    return layer


def default_state_dir(environ: Mapping[str, str]) -> str:
    """``$STATE_DIRECTORY`` (systemd), else ``$XDG_STATE_HOME/robonet``, else ``~/.local/state/robonet``."""
    if environ.get("STATE_DIRECTORY"):
        return environ["STATE_DIRECTORY"].split(":")[0]
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "robonet")


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the configuration from defaults, the TOML file at ``path``, ``environ`` and ``overrides``.

    ``overrides`` has the same ``{section: {key: value}}`` shape as the file (the command line).
    Raises :class:`ConfigError` for an unreadable file, invalid TOML, unknown keys or invalid values.
    """
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path:
        try:
            with open(path, "rb") as f:
                layers.append((path, tomllib.load(f)))
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"invalid TOML in {path}: {e}") from None
    layers.append(("environment", environment_layer(environ)))
    if overrides:
        layers.append(("command line", overrides))
    merged = _merge(layers)
    sections = {name: _build_section(name, values) for name, values in merged.items()}
    hub = sections["hub"]
    hub = attrs.evolve(
        hub,
        name=hub.name or socket.gethostname(),
        state_dir=os.path.abspath(os.path.expanduser(hub.state_dir or default_state_dir(environ))),
    )
    sections["hub"] = hub
    return Config(**sections)
