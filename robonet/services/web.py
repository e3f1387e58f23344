"""The web face's HTTP side (spec/websocket.md): dashboard files, the relay, REST API, metrics.

:func:`make_site` builds one twisted.web :class:`RobonetSite` serving

- ``/``, ``/robot/controller/``, ``/robot/dashboard/`` and ``/static/``: the dashboard's files
  (``robonet/web/static``, ``index.html`` as the directory index; no directory listings);
- ``/ws/telemetry/`` (and without the slash): the WebSocket relay
  (:mod:`robonet.protocols.websocket`); ``/ws/echo`` when ``web.echo`` is on;
- ``/api/devices``, ``/api/devices/<id>``, ``/api/telemetry``, ``/api/battery-history/``,
  ``/api/stats``, ``/api/peers``: JSON (errors are ``{"error": ..., ...}`` with a proper status);
- ``/metrics`` (Prometheus text format, its own CollectorRegistry) and ``/healthz``;
- whatever ``extra_resources`` the daemon passes (e.g. ``api/camera`` from the camera service).

With ``auth.mode = "token"`` the API and metrics need ``?token=`` (or ``Authorization: Bearer``)
from ``auth.tokens``; the page itself and ``/healthz`` stay public. Every connection must deliver
its request headers within ``web.header_timeout`` seconds (an absolute deadline: twisted.web's own
idle timer restarts on every byte, so a client dribbling a header byte at a time would hold the
socket forever).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application import strports
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import File

import robonet
import robonet.web
from robonet.config import Config, with_backlog
from robonet.hub import Hub
from robonet.model import TELEMETRY_FIELDS, HubError
from robonet.protocols.websocket import EchoFactory, RelayFactory
from robonet.services.web_auth import auth_resources, read_allowed

STATIC_DIR = Path(robonet.web.__file__).resolve().parent / "static"
# twisted.web's idle timeout for kept-alive connections between requests (its default is 12 h).
IDLE_TIMEOUT = 60.0
TELEMETRY_LIMIT_DEFAULT = 1000
TELEMETRY_LIMIT_MAX = 10000
BATTERY_HISTORY_ROWS = 100


class BadParam(Exception):
    """A query parameter with a bad value: ``param`` names it, ``str()`` explains."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# --- small helpers ---------------------------------------------------------------------------------


def json_body(request: Request, obj: Any, status: int = 200) -> bytes:
    """Set ``status`` and JSON headers on ``request``; return ``obj`` encoded (orjson)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def json_error(request: Request, status: int, message: str, **extra: Any) -> bytes:
    """``{"error": message, **extra}`` with HTTP status ``status``."""
    return json_body(request, {"error": message, **extra}, status)


def arg(request: Request, name: str) -> str | None:
    """The first value of query parameter ``name`` (UTF-8), or None."""
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadParam(name, f"{name} is not valid UTF-8") from None


def parse_time(value: str, param: str) -> float:
    """Unix seconds (``1733740245.5``) or ISO-8601 (``2025-12-09T10:30:45Z``; naive = UTC) -> Unix seconds."""
    text = value.strip()
    try:
        t = float(text)
    except ValueError:
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise BadParam(param, f"{param} must be Unix seconds or ISO-8601, got {value!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    if not math.isfinite(t):
        raise BadParam(param, f"{param} must be a finite number, got {value!r}")
    return t


def parse_limit(value: str | None, default: int, maximum: int) -> int:
    """``limit`` as an integer in 1..``maximum`` (``default`` when absent)."""
    if value is None:
        return default
    try:
        n = int(value.strip())
    except ValueError:
        raise BadParam("limit", f"limit must be an integer 1..{maximum}, got {value!r}") from None
    if not 1 <= n <= maximum:
        raise BadParam("limit", f"limit must be an integer 1..{maximum}, got {n}")
    return n


def token_ok(config: Config, request: Request) -> bool:
    """True when auth is open, or the request carries a token from ``auth.tokens``."""
    if config.auth.mode != "token":
        return True
    token: str | None = None
    header = request.getHeader(b"authorization")
    if header and header[:7].lower() == b"bearer ":
        token = header[7:].strip().decode("utf-8", "replace")
    if token is None:
        try:
            token = arg(request, "token")
        except BadParam:
            return False
    return bool(token) and token in config.auth.tokens


def deferred_json(request: Request, d: Deferred[Any], shape: Any = None) -> int:
    """Finish ``request`` with the JSON result of ``d`` (``shape(result)`` first, if given).

    HubError -> 404 (unknown endpoint/device) or 500 with the error code; the request may be gone
    by then (client closed), in which case nothing is written.
    """
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def ok(result: Any) -> None:
        if gone:
            return
        try:
            body = json_body(request, shape(result) if shape is not None else result)
        except Exception:
            failed(Failure())
            return
        request.write(body)
        request.finish()

    def failed(failure: Failure) -> None:
        if gone:
            return
        err = failure.value
        if isinstance(err, BadParam):
            body = json_error(request, 400, str(err), param=err.param)
        elif isinstance(err, HubError):
            status = 404 if err.code in ("unknown_endpoint", "device_offline") else 500
            body = json_error(request, status, err.message, code=err.code)
        else:
            WebLog.log.failure("API request {uri} failed", failure, uri=request.uri)
            body = json_error(request, 500, "internal error")
        request.write(body)
        request.finish()

    d.addCallbacks(ok, failed)
    return NOT_DONE_YET


class WebLog:
    """Namespace for the web service's logger."""

    log = Logger(namespace="robonet.web")


# --- resources ---------------------------------------------------------------------------------------


class JsonResource(Resource):
    """A GET-only JSON endpoint; subclasses implement :meth:`get` (may return a Deferred via NOT_DONE_YET).

    Other methods get 405; with token auth on, a request without a valid token gets 401.
    """

    isLeaf = True

    def __init__(self, config: Config, hub: Hub) -> None:
        super().__init__()
        self.config = config
        self.hub = hub

    def render(self, request: Request) -> bytes | int:
        """Dispatch GET/HEAD to :meth:`get`; JSON errors otherwise."""
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return json_error(request, 405, "method not allowed")
        if not read_allowed(self.config, self.hub, request):
            self.hub.stats.error("unauthorized")
            return json_error(request, 401, "unauthorized: a valid ?token= is required")
        try:
            return self.get(request)
        except BadParam as e:
            return json_error(request, 400, str(e), param=e.param)

    def get(self, request: Request) -> bytes | int:
        """Render the GET response."""
        raise NotImplementedError


class DevicesResource(JsonResource):
    """``/api/devices`` -> ``{"devices": [Device.as_dict(), ...], "count": n}`` (``?role=``,
    ``?online=1`` filter); ``/api/devices/<id>`` -> one record, or 404 ``{"error", "device_id"}``."""

    def get(self, request: Request) -> bytes | int:
        """Render the device list or one device."""
        path = [p for p in getattr(request, "postpath", []) if p]
        if path:
            try:
                device_id = b"/".join(path).decode("utf-8")
            except UnicodeDecodeError:
                return json_error(request, 404, "unknown device")
            dev = self.hub.registry.get(device_id)
            if dev is None:
                return json_error(request, 404, "unknown device", device_id=device_id)
            return json_body(request, dev.as_dict())
        role = arg(request, "role")
        online = arg(request, "online")
        only_online = online is not None and online.lower() in ("1", "true", "yes")
        devices = [
            d.as_dict()
            for d in self.hub.registry.devices()
            if (role is None or d.role == role) and (d.online or not only_online)
        ]
        return json_body(request, {"devices": devices, "count": len(devices)})


def _scope_arg(request: Request) -> dict[str, str]:
    """``?scope=hub|project`` of the history endpoints (docs/store.rst): ``{}`` for the default
    (project: every hub's rows in the database), ``{"scope": "hub"}`` for this hub's only."""
    scope = arg(request, "scope")
    if scope is None or scope == "project":
        return {}
    if scope != "hub":
        raise BadParam("scope", "scope must be 'hub' or 'project'")
    return {"scope": "hub"}


class TelemetryResource(JsonResource):
    """``/api/telemetry?device_id=&type=&since=&until=&limit=`` -> ``{"rows": [...], "count": n}``.

    Rows come from the store, newest first: ``{"id", "device_id", "type", "received_at" (Unix s),
    "robot_ts", "battery", "cpu", "temperature", "signal", "body"}``. ``since``/``until`` bound
    ``received_at`` (inclusive; Unix seconds or ISO-8601, naive = UTC); ``limit`` 1..10000 (default
    1000); ``scope`` ``project`` (default: every hub writing to the database) or ``hub``. Bad
    values -> 400 ``{"error", "param"}``; 503 when the store is disabled.
    """

    def get(self, request: Request) -> bytes | int:
        """Validate the query and run it on the store."""
        device_id = arg(request, "device_id") or None
        mtype = arg(request, "type") or None
        since_s, until_s = arg(request, "since"), arg(request, "until")
        since = parse_time(since_s, "since") if since_s is not None else None
        until = parse_time(until_s, "until") if until_s is not None else None
        if since is not None and until is not None and until < since:
            raise BadParam("until", "until is before since")
        limit = parse_limit(arg(request, "limit"), TELEMETRY_LIMIT_DEFAULT, TELEMETRY_LIMIT_MAX)
        store = self.hub.store
        if store is None:
            return json_error(request, 503, "telemetry store is disabled")
        kw = _scope_arg(request)
        d = maybeDeferred(
            store.query, device_id=device_id, since=since, until=until, limit=limit, type=mtype, **kw
        )

        def shape(rows: list[dict[str, Any]]) -> dict[str, Any]:
            return {"rows": rows, "count": len(rows)}

        return deferred_json(request, d, shape)


class BatteryHistoryResource(JsonResource):
    """``/api/battery-history/`` as the original: ``[[epoch_ms, battery], ...]``, the last 100
    telemetry rows that have a battery value, oldest first; ``?device_id=`` narrows it to one robot,
    ``?scope=hub`` to this hub's rows (default ``project``).
    With the store disabled: ``[]`` (the original page then simply shows no history).
    """

    def get(self, request: Request) -> bytes | int:
        """Query the newest rows and reshape them."""
        device_id = arg(request, "device_id") or None
        store = self.hub.store
        if store is None:
            return json_body(request, [])
        kw = _scope_arg(request)
        d = maybeDeferred(store.battery_history, device_id, BATTERY_HISTORY_ROWS, **kw)
        return deferred_json(request, d)


class HubRequestResource(JsonResource):
    """A hub endpoint as JSON (``/api/stats`` -> ``stats``; ``/api/peers`` -> ``peer_list``).

    ``fallback`` is returned when the hub does not know the endpoint (e.g. federation off).
    """

    def __init__(self, config: Config, hub: Hub, endpoint: str, fallback: Any = None) -> None:
        super().__init__(config, hub)
        self.endpoint = endpoint
        self.fallback = fallback

    def get(self, request: Request) -> bytes | int:
        """Call the endpoint."""
        d = self.hub.request(self.endpoint, None, "web")
        if self.fallback is not None:

            def unknown(failure: Failure) -> Any:
                err = failure.value
                if isinstance(err, HubError) and err.code == "unknown_endpoint":
                    return self.fallback
                return failure

            d.addErrback(unknown)
        return deferred_json(request, d)


class HealthResource(Resource):
    """``/healthz`` -> 200 ``{"status":"ok","version","node_id","uptime_s","devices_online"}``."""

    isLeaf = True

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub

    def render_GET(self, request: Request) -> bytes:
        """Report liveness."""
        hub = self.hub
        return json_body(
            request,
            {
                "status": "ok",
                "version": robonet.__version__,
                "node_id": hub.node.node_id,
                "uptime_s": round(hub.now() - hub.stats.started_at, 3),
                "devices_online": sum(1 for d in hub.registry.devices() if d.online),
            },
        )

    render_HEAD = render_GET


class HubCollector(Collector):
    """Prometheus metrics read from the hub's stats and registry at scrape time (no global state)."""

    def __init__(self, hub: Hub, relay: RelayFactory | None = None) -> None:
        self.hub = hub
        self.relay = relay

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from the current counters."""
        hub = self.hub
        s = hub.stats
        now = hub.now()
        info = GaugeMetricFamily(
            "robonet_info", "robonet build and node", labels=["version", "node_id", "name"]
        )
        info.add_metric([robonet.__version__, hub.node.node_id, hub.node.name], 1)
        yield info
        yield GaugeMetricFamily(
            "robonet_uptime_seconds", "Seconds since the hub started", value=now - s.started_at
        )
        for name, doc, counts, label in (
            ("robonet_messages_in", "Messages received, by type", s.msgs_in, "type"),
            ("robonet_messages_out", "Messages sent, by type", s.msgs_out, "type"),
            ("robonet_errors", "Errors, by code", s.errors, "code"),
            ("robonet_drops", "Fan-out and input drops, by reason", s.drops, "reason"),
        ):
            counter = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(counts.items()):
                counter.add_metric([str(key)], value)
            yield counter
        yield CounterMetricFamily("robonet_bytes_in", "Payload bytes received", value=s.bytes_in)
        yield CounterMetricFamily("robonet_bytes_out", "Payload bytes sent", value=s.bytes_out)
        conns = GaugeMetricFamily("robonet_connections", "Open connections, by face", labels=["face"])
        for face, n in sorted(s.connections.items()):
            conns.add_metric([face], n)
        yield conns
        for name, doc, samples in (
            ("robonet_ack_rtt_seconds", "Command sent to its ack received (seconds)", s.ack_rtt),
            ("robonet_ack_delay_seconds", "Frame received to its ack written (seconds)", s.ack_delay),
        ):
            yield HistogramMetricFamily(name, doc, buckets=samples.histogram(), sum_value=samples.sum)
        by_kind: dict[tuple[str, str, str], int] = {}
        up = GaugeMetricFamily(
            "robonet_device_up", "1 while the device is online", labels=["device_id", "face", "role"]
        )
        seen = GaugeMetricFamily(
            "robonet_device_last_seen_seconds", "Unix time of last activity", labels=["device_id"]
        )
        dev_in = CounterMetricFamily(
            "robonet_device_messages_in", "Messages from the device", labels=["device_id"]
        )
        tele = GaugeMetricFamily("robonet_telemetry", "Latest telemetry value", labels=["device_id", "field"])
        for d in hub.registry.devices():
            kind = (d.face, d.role, d.status)
            by_kind[kind] = by_kind.get(kind, 0) + 1
            up.add_metric([d.device_id, d.face, d.role], 1 if d.online else 0)
            seen.add_metric([d.device_id], d.last_activity)
            dev_in.add_metric([d.device_id], d.msgs_in)
            latest = d.latest.get("telemetry")
            if latest:
                for field in TELEMETRY_FIELDS:
                    v = latest.get(field)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        tele.add_metric([d.device_id, field], float(v))
        devices = GaugeMetricFamily("robonet_devices", "Known devices", labels=["face", "role", "status"])
        for (face, role, status), n in sorted(by_kind.items()):
            devices.add_metric([face, role, status], n)
        yield devices
        yield up
        yield seen
        yield dev_in
        yield tele
        yield GaugeMetricFamily("robonet_subscribers", "Fan-out subscribers", value=hub.subscriber_count)
        if self.relay is not None:
            members = self.relay.websites.members
            yield GaugeMetricFamily("robonet_web_websites", "Open dashboard connections", value=len(members))
            yield GaugeMetricFamily(
                "robonet_web_queued_bytes",
                "Bytes held in dashboard send queues",
                value=sum(m.queue.queued_bytes for m in members.values() if m.queue is not None),
            )
        auth = getattr(hub, "auth", None)
        if auth is not None:
            denied = CounterMetricFamily(
                "robonet_auth_denied", "Refused logins and denied actions", labels=["face", "reason"]
            )
            for (face, reason), n in sorted(auth.authorizer.denied.items()):
                denied.add_metric([face, reason], n)
            yield denied
            yield GaugeMetricFamily(
                "robonet_auth_sessions", "Live token sessions", value=auth.sessions.count()
            )
        store = hub.store
        stats_fn = getattr(store, "stats", None) if store is not None else None
        if callable(stats_fn):
            try:
                store_stats = stats_fn()
            except Exception:
                store_stats = {}
            if isinstance(store_stats, dict):
                for key, value in sorted(store_stats.items()):
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        yield GaugeMetricFamily(f"robonet_store_{key}", f"store {key}", value=float(value))

        bridge = getattr(hub, "mqtt", None)
        if bridge is not None:
            ms = bridge.stats()
            yield GaugeMetricFamily(
                "robonet_mqtt_connected", "1 while the MQTT bridge is connected", value=ms["connected"]
            )
            for key in ("messages_out", "messages_in", "dropped", "reconnects"):
                yield CounterMetricFamily(f"robonet_mqtt_{key}", f"MQTT bridge {key}", value=ms[key])


class MetricsResource(Resource):
    """``/metrics``: Prometheus text exposition of a :class:`HubCollector` (token-checked)."""

    isLeaf = True

    def __init__(self, config: Config, hub: Hub, relay: RelayFactory | None) -> None:
        super().__init__()
        self.config = config
        self.hub = hub
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(hub, relay))

    def render_GET(self, request: Request) -> bytes:
        """Render every metric."""
        if not read_allowed(self.config, self.hub, request):
            self.hub.stats.error("unauthorized")
            return json_error(request, 401, "unauthorized: a valid ?token= is required")
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.registry)


class StaticFiles(File):
    """The dashboard's files: ``index.html`` is the only directory index; no listings; revalidate."""

    indexNames = ["index.html"]
    contentTypes = {
        **File.contentTypes,
        ".js": "text/javascript; charset=utf-8",
        ".mjs": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".html": "text/html; charset=utf-8",
        ".json": "application/json",
        ".svg": "image/svg+xml",
        ".map": "application/json",
    }

    def directoryListing(self) -> IResource:
        """Directories without index.html are not listed."""
        return pages.notFound()

    def render_GET(self, request: Request) -> bytes | int:
        """Serve the file, asking browsers to revalidate (the dashboard changes with upgrades)."""
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return super().render_GET(request)  # type: ignore[no-any-return]

    render_HEAD = render_GET


class ApiResource(Resource):
    """``/api/``: its children, else a JSON 404."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        """Unknown API paths: ``404 {"error": "not found"}``."""
        return JsonNotFound()


class JsonNotFound(Resource):
    """``404 {"error": "not found"}`` for any method."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        """Render the 404."""
        return json_error(request, 404, "not found")


class RootResource(Resource):
    """``/``: named children first, else a file from the dashboard's static directory."""

    def __init__(self, static: StaticFiles) -> None:
        super().__init__()
        self.static = static

    def getChild(self, path: bytes, request: Request) -> IResource:
        """Fall back to the static directory (``/`` -> index.html, ``/app.js``, ...)."""
        return self.static.getChild(path, request)  # type: ignore[no-any-return]


# --- the site ------------------------------------------------------------------------------------------


class HeaderDeadlineChannel(HTTPChannel):
    """An HTTPChannel whose request line and headers must arrive within ``header_timeout`` seconds.

    The deadline starts when the connection opens and again with the first byte of each later
    request on a kept-alive connection; it is absolute (not reset by each byte). A connection that
    misses it is aborted and counted (``header_timeout``). After a WebSocket upgrade the channel is
    out of the picture (its headers were complete).
    """

    header_timeout: float = 10.0
    hub: Hub | None = None
    _deadline: IDelayedCall | None = None
    _in_request = False

    def connectionMade(self) -> None:
        """Start the header deadline."""
        super().connectionMade()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        """The first byte of a new request on a kept-alive connection starts a new deadline."""
        if not self._in_request and self._deadline is None:
            self._arm()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        """Headers complete in time."""
        self._disarm()
        self._in_request = True
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        """The response is finished; the next request's headers get a fresh deadline."""
        self._in_request = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """Forget the deadline."""
        self._disarm()
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._deadline = self.callLater(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.hub is not None:
            self.hub.stats.error("header_timeout")
        transport: Any = self.transport
        WebLog.log.debug(
            "HTTP headers not complete within {t} s: aborting {peer}",
            t=self.header_timeout,
            peer=transport.getPeer(),
        )
        transport.abortConnection()


class RobonetSite(Site):
    """twisted.web Site with the absolute header deadline and access logging at debug level.

    ``relay`` is the WebSocket relay's factory (for metrics and shutdown).
    """

    protocol = HeaderDeadlineChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        reactor: IReactorTime,
        header_timeout: float,
        hub: Hub,
        relay: RelayFactory,
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=IDLE_TIMEOUT)
        self.header_timeout = header_timeout
        self.hub = hub
        self.relay = relay

    def buildProtocol(self, addr: Any) -> Any:
        """A channel with this site's header deadline."""
        channel: Any = super().buildProtocol(addr)
        channel.header_timeout = self.header_timeout
        channel.hub = self.hub
        return channel

    def log(self, request: Request) -> None:
        """Access log line at debug level (not the legacy log file)."""
        WebLog.log.debug(
            "{method} {uri} {code}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            code=request.code,
        )


def _mount(root: Resource, path: str, resource: IResource) -> None:
    """Put ``resource`` at ``path`` (``"api/camera"``), creating plain intermediate resources."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        raise ValueError(f"cannot mount at {path!r}")
    node = root
    for part in parts[:-1]:
        child = node.children.get(part.encode())
        if child is None:
            child = Resource()
            node.putChild(part.encode(), child)
        node = child
    node.putChild(parts[-1].encode(), resource)


def make_site(
    config: Config,
    hub: Hub,
    reactor: IReactorTime,
    *,
    extra_resources: Mapping[str, IResource] | None = None,
    static_dir: Path | None = None,
) -> RobonetSite:
    """Build the web face's Site (module docstring has the URL map).

    ``reactor`` provides time for the relay, queues and the header deadline; ``extra_resources``
    maps paths such as ``"api/camera"`` to resources mounted there; ``static_dir`` defaults to
    ``robonet/web/static``. The returned site's ``relay`` is the WebSocket relay's factory.
    """
    static = StaticFiles(str(static_dir or STATIC_DIR))
    root = RootResource(static)
    relay = RelayFactory(hub, reactor)
    ws_resource = WebSocketResource(relay)
    ws = Resource()
    ws.putChild(b"telemetry", ws_resource)
    if config.web.echo:
        ws.putChild(b"echo", WebSocketResource(EchoFactory(config, reactor)))
    root.putChild(b"ws", ws)
    root.putChild(b"static", static)
    robot = Resource()
    robot.putChild(b"controller", static)
    robot.putChild(b"dashboard", static)
    root.putChild(b"robot", robot)
    api = ApiResource()
    api.putChild(b"devices", DevicesResource(config, hub))
    api.putChild(b"telemetry", TelemetryResource(config, hub))
    api.putChild(b"battery-history", BatteryHistoryResource(config, hub))
    api.putChild(b"stats", HubRequestResource(config, hub, "stats"))
    api.putChild(b"peers", HubRequestResource(config, hub, "peer_list", fallback={"peers": []}))
    for child, auth_resource in auth_resources(config, hub).items():  # docs/security.rst
        api.putChild(child.encode(), auth_resource)
    from robonet.services.export import ExportResource  # imports this module: import here

    api.putChild(b"export", ExportResource(config, hub))
    root.putChild(b"api", api)
    root.putChild(b"metrics", MetricsResource(config, hub, relay))
    root.putChild(b"healthz", HealthResource(hub))
    # Shallow paths first, so "api/camera/settings" lands under the resource mounted at "api/camera".
    for path, resource in sorted((extra_resources or {}).items(), key=lambda kv: kv[0].strip("/").count("/")):
        _mount(root, path, resource)
    return RobonetSite(root, reactor=reactor, header_timeout=config.web.header_timeout, hub=hub, relay=relay)


class _RelayShutdown(Service):
    """Unsubscribes the relay from the hub when the daemon stops."""

    def __init__(self, relay: RelayFactory) -> None:
        self.relay = relay

    def stopService(self) -> None:  # type: ignore[override]
        """Stop the relay's timers and fan-out."""
        super().stopService()
        self.relay.shutdown()


def web_services(
    config: Config,
    hub: Hub,
    reactor: IReactorTime,
    extra_resources: Mapping[str, IResource] | None = None,
) -> list[IService]:
    """One ``strports.service`` per ``web.listen`` address (all serving one Site), plus a small
    service that shuts the relay down on stop. Empty when the web face is disabled (no listen)."""
    if not config.web.listen:
        return []
    site = make_site(config, hub, reactor, extra_resources=extra_resources)
    services: list[IService] = []
    for desc in config.web.listen:
        svc = strports.service(with_backlog(desc), site, reactor=reactor)  # type: ignore[arg-type]
        svc.setName(f"web:{desc}")
        services.append(svc)
    shutdown = _RelayShutdown(site.relay)
    shutdown.setName("web:relay")
    services.append(shutdown)
    if "web" not in hub.faces:
        hub.faces["web"] = list(config.web.listen)
    return services
