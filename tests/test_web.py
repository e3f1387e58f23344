"""The web face's HTTP side: URL map, REST API, metrics, health, token checks, the header deadline,
and (on 127.0.0.1) the relay behind real twisted.web with the real SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import orjson
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from autobahn.websocket.compress import PerMessageDeflateOffer
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.static import Data
from twisted.web.test.requesthelper import DummyRequest

from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Message
from robonet.protocols.websocket import RelayProtocol
from robonet.services import web
from robonet.services.store import TelemetryStore
from robonet.services.web import make_site, parse_time

T0 = 1_733_740_245.0


@attrs.define
class FakeStore:
    """Records queries; answers with canned rows."""

    rows: list[dict[str, Any]] = attrs.Factory(list)
    history: list[list[Any]] = attrs.Factory(list)
    queries: list[dict[str, Any]] = attrs.Factory(list)
    broken: bool = False

    def append(self, *args: Any) -> None:
        return None

    def query(self, **kw: Any) -> Deferred[list[dict[str, Any]]]:
        self.queries.append(kw)
        if self.broken:
            return fail(RuntimeError("disk on fire"))
        return succeed(self.rows)

    def battery_history(self, device_id: str | None = None, limit: int = 100) -> Deferred[list[list[Any]]]:
        self.queries.append({"battery_history": device_id, "limit": limit})
        return succeed(self.history)

    def stats(self) -> dict[str, Any]:
        return {"rows_written": 3, "path": "/x"}


def make(
    testcase: unittest.TestCase, store: Any = None, clock: Any = None, **sections: dict[str, Any]
) -> Any:
    """A config, hub and site (on ``clock``, default a MemoryReactorClock)."""
    overrides: dict[str, dict[str, Any]] = {"hub": {"state_dir": testcase.mktemp(), "name": "test-hub"}}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    config = load_config(environ={}, overrides=overrides)
    if clock is None:
        clock = MemoryReactorClock()
        clock.advance(T0)
    hub = Hub(config, clock, store=store)
    site = make_site(config, hub, clock)
    testcase.addCleanup(site.relay.shutdown)
    return config, hub, site


@attrs.define
class Response:
    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None


def get(site: Any, path: str, method: bytes = b"GET", headers: dict[str, str] | None = None) -> Response:
    """Render ``path`` (with query) through the site's resource tree with a DummyRequest."""
    raw_path, _, query = path.partition("?")
    segments = [s.encode() for s in raw_path.split("/")[1:]]
    request = DummyRequest(segments)
    request.method = method
    request.uri = path.encode()
    request.path = raw_path.encode()
    for part in filter(None, query.split("&")):
        k, _, v = part.partition("=")
        request.args.setdefault(k.encode(), []).append(v.encode())
    for k, v in (headers or {}).items():
        request.requestHeaders.addRawHeader(k.encode(), v.encode())
    resource = getChildForRequest(site.resource, request)
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    assert request.finished, f"{path} did not finish"
    return Response(request.responseCode or 200, request.responseHeaders, b"".join(request.written))


class DeviceApiTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.config, self.hub, self.site = make(self)

    def test_devices(self) -> None:
        """/api/devices lists Device.as_dict() records; ?role= and ?online= filter."""
        dev = self.hub.connect(None, "robot_01", face="botlink", role="robot", address="10.0.0.2:5000")
        self.hub.ingest(dev, Message("telemetry", {"type": "telemetry", "battery": 80}, "robot_01", T0))
        self.hub.connect(None, "lab_1", face="line", role="client", address="10.0.0.3:5000")
        self.hub.disconnect(None, "lab_1")
        r = get(self.site, "/api/devices")
        self.assertEqual((r.code, r.header("content-type")), (200, "application/json"))
        body = r.json()
        self.assertEqual(body["count"], 2)
        self.assertEqual(body["devices"][0], dev.as_dict())
        self.assertEqual(
            [d["device_id"] for d in get(self.site, "/api/devices?role=robot").json()["devices"]],
            ["robot_01"],
        )
        self.assertEqual(get(self.site, "/api/devices?online=1").json()["count"], 1)

    def test_one_device(self) -> None:
        """/api/devices/<id> is one record; an unknown id is a JSON 404."""
        dev = self.hub.connect(None, "robot_01", face="web", role="robot", address="x")
        self.assertEqual(get(self.site, "/api/devices/robot_01").json(), dev.as_dict())
        r = get(self.site, "/api/devices/ghost")
        self.assertEqual((r.code, r.json()), (404, {"error": "unknown device", "device_id": "ghost"}))

    def test_unknown_api_path_and_method(self) -> None:
        """Unknown /api paths are JSON 404s; POST to a GET endpoint is a JSON 405."""
        r = get(self.site, "/api/nothing")
        self.assertEqual((r.code, r.json()), (404, {"error": "not found"}))
        r = get(self.site, "/api/devices", method=b"POST")
        self.assertEqual(
            (r.code, r.json()["error"], r.header("allow")), (405, "method not allowed", "GET, HEAD")
        )

    def test_stats(self) -> None:
        """/api/stats is the hub's stats endpoint."""
        body = get(self.site, "/api/stats").json()
        self.assertIn("messages_in", body)
        self.assertEqual(body["devices"]["online"], 0)

    def test_peers(self) -> None:
        """/api/peers is peer_list, or {"peers": []} when the hub has no such endpoint."""
        self.assertEqual(get(self.site, "/api/peers").json(), {"peers": []})
        del self.hub._endpoints["peer_list"]
        self.assertEqual(get(self.site, "/api/peers").json(), {"peers": []})
        self.hub.register_endpoint("peer_list", lambda data, origin: {"peers": [{"node_id": "n1"}]})
        self.assertEqual(get(self.site, "/api/peers").json(), {"peers": [{"node_id": "n1"}]})

    def test_endpoint_failure_is_json_500(self) -> None:
        """An endpoint that raises gives a JSON 500 with its code."""
        self.hub.register_endpoint("stats", lambda data, origin: 1 / 0)
        r = get(self.site, "/api/stats")
        self.assertEqual((r.code, r.json()["code"]), (500, "internal"))
        self.flushLoggedErrors(ZeroDivisionError)

    def test_unserialisable_result_is_json_500(self) -> None:
        """An endpoint result that cannot be encoded as JSON is a JSON 500, not a hung request."""
        self.hub.register_endpoint("stats", lambda data, origin: {"when": object()})
        r = get(self.site, "/api/stats")
        self.assertEqual((r.code, r.json()), (500, {"error": "internal error"}))
        self.flushLoggedErrors(TypeError)

    def test_healthz(self) -> None:
        """/healthz answers 200 with status ok."""
        r = get(self.site, "/healthz")
        self.assertEqual((r.code, r.json()["status"]), (200, "ok"))

    def test_extra_resources_are_mounted(self) -> None:
        """extra_resources are mounted at their paths, next to the built-in API."""
        config, hub, site = make(self)
        site = make_site(
            config,
            hub,
            MemoryReactorClock(),
            extra_resources={
                "api/camera": Data(b'{"camera":1}', "application/json"),
                "camera/preview.mjpg": Data(b"jpeg", "image/jpeg"),
            },
        )
        self.addCleanup(site.relay.shutdown)
        self.assertEqual(get(site, "/api/camera").body, b'{"camera":1}')
        self.assertEqual(get(site, "/camera/preview.mjpg").body, b"jpeg")
        self.assertEqual(get(site, "/api/devices").code, 200)


class EchoTests(unittest.SynchronousTestCase):
    def test_echo_only_when_enabled_with_the_same_options(self) -> None:
        """/ws/echo exists only with web.echo, built with exactly the relay's WebSocket options."""

        def resource(site: Any, path: str) -> Any:
            return getChildForRequest(site.resource, DummyRequest([s.encode() for s in path.split("/")[1:]]))

        _, _, site = make(self)
        self.assertIsInstance(resource(site, "/ws/telemetry/"), WebSocketResource)
        self.assertNotIsInstance(resource(site, "/ws/echo"), WebSocketResource)
        _, _, site = make(self, web={"echo": True, "max_message": 4096})
        echo = resource(site, "/ws/echo")._factory
        relay = resource(site, "/ws/telemetry")._factory
        self.assertIs(relay, site.relay)
        options = [
            "maxFramePayloadSize",
            "maxMessagePayloadSize",
            "failByDrop",
            "utf8validateIncoming",
            "openHandshakeTimeout",
            "closeHandshakeTimeout",
            "autoPingInterval",
            "autoPingTimeout",
        ]
        self.assertEqual([getattr(echo, o) for o in options], [getattr(relay, o) for o in options])
        self.assertEqual(echo.maxMessagePayloadSize, 4096)
        accept = echo.perMessageCompressionAccept([PerMessageDeflateOffer()])
        self.assertEqual(accept.max_message_size, 4096)


class TelemetryApiTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.store = FakeStore(rows=[{"id": 1, "device_id": "r1", "type": "telemetry", "received_at": T0}])
        self.config, self.hub, self.site = make(self, store=self.store)

    def test_query(self) -> None:
        """Parameters reach store.query; rows come back as {"rows", "count"}."""
        r = get(self.site, "/api/telemetry?device_id=r1&since=1733740000&until=2024-12-09T11:00:00Z&limit=5")
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json(), {"rows": self.store.rows, "count": 1})
        self.assertEqual(
            self.store.queries,
            [{"device_id": "r1", "since": 1733740000.0, "until": 1733742000.0, "limit": 5, "type": None}],
        )
        get(self.site, "/api/telemetry")
        self.assertEqual(self.store.queries[-1]["limit"], 1000)

    def test_bad_parameters(self) -> None:
        """Bad since/until/limit are 400 {"error", "param"}; the store is not asked."""
        for query, param in (
            ("since=yesterday", "since"),
            ("until=nan", "until"),
            ("limit=0", "limit"),
            ("limit=10001", "limit"),
            ("limit=ten", "limit"),
            ("since=2000&until=1000", "until"),
        ):
            r = get(self.site, "/api/telemetry?" + query)
            self.assertEqual(r.code, 400, query)
            self.assertEqual(r.json()["param"], param, query)
            self.assertIn("error", r.json())
        request = DummyRequest([b"api", b"telemetry"])
        request.args = {b"device_id": [b"\xff"]}
        request.render(getChildForRequest(self.site.resource, request))
        self.assertEqual(
            (request.responseCode, orjson.loads(b"".join(request.written))["param"]), (400, "device_id")
        )
        self.assertEqual(self.store.queries, [])

    def test_store_errors(self) -> None:
        """A failing store query is a JSON 500; a disabled store is a JSON 503."""
        self.store.broken = True
        r = get(self.site, "/api/telemetry")
        self.assertEqual((r.code, r.json()), (500, {"error": "internal error"}))
        self.flushLoggedErrors(RuntimeError)
        _, _, site = make(self)
        r = get(site, "/api/telemetry?limit=3")
        self.assertEqual((r.code, r.json()), (503, {"error": "telemetry store is disabled"}))

    def test_battery_history(self) -> None:
        """/api/battery-history/ is the store's [[epoch_ms, battery], ...]; ?device_id= narrows it."""
        self.store.history = [[1733740245000, 80.5], [1733740248000, 80.4]]
        r = get(self.site, "/api/battery-history/?device_id=r1")
        self.assertEqual(r.json(), [[1733740245000, 80.5], [1733740248000, 80.4]])
        self.assertEqual(self.store.queries[-1], {"battery_history": "r1", "limit": 100})
        _, _, site = make(self)
        self.assertEqual(get(site, "/api/battery-history/").json(), [])

    def test_parse_time(self) -> None:
        """since/until: Unix seconds or ISO-8601 (Z, offsets, naive = UTC)."""
        self.assertEqual(parse_time("1733740245.5", "since"), 1733740245.5)
        self.assertEqual(parse_time("2024-12-09T10:30:45Z", "since"), T0)
        self.assertEqual(parse_time("2024-12-09T11:30:45+01:00", "since"), T0)
        self.assertEqual(parse_time("2024-12-09T10:30:45", "since"), T0)
        self.assertRaises(web.BadParam, parse_time, "inf", "since")


class MetricsAndAuthTests(unittest.SynchronousTestCase):
    def test_metrics(self) -> None:
        """/metrics is Prometheus text with the hub's counters, devices and latest telemetry."""
        config, hub, site = make(self, store=FakeStore())
        dev = hub.connect(None, "robot_01", face="botlink", role="robot", address="x")
        hub.ingest(
            dev, Message("telemetry", {"type": "telemetry", "battery": 80.5, "cpu": "n/a"}, "robot_01", T0)
        )
        hub.stats.error("bad_json")
        r = get(site, "/metrics")
        self.assertTrue(r.header("content-type").startswith("text/plain"))  # type: ignore[union-attr]
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.body.decode())
            for s in fam.samples
        }
        self.assertEqual(samples[("robonet_messages_in_total", (("type", "telemetry"),))], 1)
        self.assertEqual(samples[("robonet_errors_total", (("code", "bad_json"),))], 1)
        self.assertEqual(
            samples[
                ("robonet_device_up", (("device_id", "robot_01"), ("face", "botlink"), ("role", "robot")))
            ],
            1,
        )
        self.assertEqual(
            samples[("robonet_telemetry", (("device_id", "robot_01"), ("field", "battery")))], 80.5
        )
        self.assertNotIn(("robonet_telemetry", (("device_id", "robot_01"), ("field", "cpu"))), samples)
        self.assertEqual(samples[("robonet_store_rows_written", ())], 3)
        self.assertEqual(samples[("robonet_web_websites", ())], 0)

    def test_latency_histograms(self) -> None:
        """ack_rtt and ack_delay are Prometheus histograms in seconds: cumulative buckets, _sum and
        _count (no quantile gauges); the stats endpoint keeps its JSON summary."""
        config, hub, site = make(self, store=FakeStore())
        for seconds in (0.002, 0.002, 0.3):
            hub.stats.ack_delay.add(seconds)
        hub.stats.ack_rtt.add(20.0)
        families = {f.name: f for f in text_string_to_metric_families(get(site, "/metrics").body.decode())}
        delay = families["robonet_ack_delay_seconds"]
        self.assertEqual(delay.type, "histogram")
        values = {(s.name, s.labels.get("le")): s.value for s in delay.samples}
        self.assertEqual(values[("robonet_ack_delay_seconds_bucket", "0.001")], 0)
        self.assertEqual(values[("robonet_ack_delay_seconds_bucket", "0.0025")], 2)
        self.assertEqual(values[("robonet_ack_delay_seconds_bucket", "0.5")], 3)
        self.assertEqual(values[("robonet_ack_delay_seconds_bucket", "+Inf")], 3)
        self.assertEqual(values[("robonet_ack_delay_seconds_count", None)], 3)
        self.assertAlmostEqual(values[("robonet_ack_delay_seconds_sum", None)], 0.304)
        rtt = {(s.name, s.labels.get("le")): s.value for s in families["robonet_ack_rtt_seconds"].samples}
        self.assertEqual(
            (
                rtt[("robonet_ack_rtt_seconds_bucket", "10.0")],
                rtt[("robonet_ack_rtt_seconds_bucket", "+Inf")],
            ),
            (0, 1),
        )
        self.assertNotIn("robonet_ack_delay_ms", families)
        self.assertEqual(hub.stats.snapshot(hub.now())["ack_delay"]["count"], 3)

    def test_token_auth(self) -> None:
        """With auth.mode=token the API and metrics need a known token (query or Bearer); the page and
        /healthz do not."""
        _, _, site = make(self, auth={"mode": "token", "tokens": {"t0k": "website"}})
        for path in ("/api/devices", "/api/devices?token=bad", "/metrics", "/api/stats"):
            r = get(site, path)
            self.assertEqual(r.code, 401, path)
            self.assertIn("unauthorized", r.json()["error"])
        self.assertEqual(get(site, "/api/devices?token=t0k").code, 200)
        self.assertEqual(get(site, "/metrics", headers={"Authorization": "Bearer t0k"}).code, 200)
        self.assertEqual(get(site, "/healthz").code, 200)


class StaticTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        root = Path(self.mktemp())
        (root / "vendor").mkdir(parents=True)
        (root / "index.html").write_text("<!doctype html><title>robonet</title>")
        (root / "app.js").write_text("export {};")
        (root / "vendor" / "lib.css").write_text("body{}")
        config, hub, _ = make(self)
        self.site = make_site(config, hub, MemoryReactorClock(), static_dir=root)
        self.addCleanup(self.site.relay.shutdown)

    def render_file(self, path: str) -> Response:
        r = get(self.site, path)
        return r

    def test_dashboard_urls(self) -> None:
        """/, /robot/controller/, /robot/dashboard/ and /static/ serve index.html; files resolve relative
        to each of them."""
        for path in ("/", "/robot/controller/", "/robot/dashboard/", "/static/"):
            request = DummyRequest([s.encode() for s in path.split("/")[1:]])
            resource = getChildForRequest(self.site.resource, request)
            self.assertEqual(Path(resource.path).name, "index.html", path)
        for path in (
            "/app.js",
            "/robot/controller/app.js",
            "/static/app.js",
            "/robot/dashboard/vendor/lib.css",
        ):
            request = DummyRequest([s.encode() for s in path.split("/")[1:]])
            resource = getChildForRequest(self.site.resource, request)
            self.assertTrue(resource.exists(), path)

    def test_no_listing_and_no_escape(self) -> None:
        """Directories without index.html are 404 (no listing); .. cannot leave the static directory."""
        for path in ("/static/vendor/", "/static/../../etc/passwd", "/nope.js"):
            request = DummyRequest([s.encode() for s in path.split("/")[1:]])
            resource = getChildForRequest(self.site.resource, request)
            request.render(resource)
            self.assertEqual(request.responseCode, 404, path)


class HeaderDeadlineTests(unittest.SynchronousTestCase):
    """The absolute deadline for HTTP request headers (HARDENING.md, web rows)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.config, self.hub, self.site = make(self, clock=self.clock, web={"header_timeout": 10})

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_silent_connection_is_aborted(self) -> None:
        """A connection that sends nothing is aborted at the deadline and counted."""
        _, transport = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.hub.stats.errors["header_timeout"], 1)

    def test_dribbling_headers_are_aborted(self) -> None:
        """A byte every second does not extend the deadline (twisted.web's idle timer alone would)."""
        channel, transport = self.connect()
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 30
        for i in range(10):
            channel.dataReceived(request[i : i + 1])
            self.clock.advance(1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")

    def test_complete_headers_in_time(self) -> None:
        """Headers complete in time: served; a kept-alive connection's next request gets a new deadline."""
        channel, transport = self.connect()
        self.clock.advance(5)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\n")
        self.clock.advance(10.1)
        self.assertTrue(transport.disconnected)

    def test_slow_response_is_not_a_header_timeout(self) -> None:
        """A request whose headers arrived in time may take longer than the deadline to answer."""
        d: Deferred[Any] = Deferred()
        self.hub.register_endpoint("stats", lambda data, origin: d)
        channel, transport = self.connect()
        channel.dataReceived(b"GET /api/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(60)
        self.assertFalse(transport.disconnecting)
        d.callback({"ok": True})
        self.assertIn(b'{"ok":true}', transport.value())


class WsClient(WebSocketClientProtocol):
    """A real-socket WebSocket client recording messages; ``opened``/``got``/``closed`` Deferreds."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Any] = []
        self.waiters: list[tuple[int, Deferred[Any]]] = []
        self.done: Deferred[Any] = Deferred()

    def onOpen(self) -> None:
        self.factory.opened.callback(self)  # type: ignore[attr-defined]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(orjson.loads(payload))
        for n, d in list(self.waiters):
            if len(self.messages) >= n:
                self.waiters.remove((n, d))
                d.callback(self.messages[:n])

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:  # type: ignore[attr-defined]
            self.factory.opened.errback(Failure(ConnectionError(f"refused: {self.wasNotCleanReason}")))  # type: ignore[attr-defined]
        self.done.callback(code)

    def wait_for(self, n: int) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if len(self.messages) >= n:
            d.callback(self.messages[:n])
        else:
            self.waiters.append((n, d))
        return d.addTimeout(10, reactor)


class RealSiteTests(unittest.TestCase):
    """The relay behind real twisted.web on 127.0.0.1 with the real SQLite store."""

    timeout = 30

    def setUp(self) -> None:
        state = Path(self.mktemp())
        self.store = TelemetryStore(state / "t.sqlite3", reactor=reactor)
        self.store.startService()
        self.config, self.hub, self.site = make(self, store=self.store, clock=reactor)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.base = f"127.0.0.1:{self.port.getHost().port}"
        self.clients: list[WsClient] = []

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        for c in self.clients:
            if c.transport is not None:
                c.transport.abortConnection()
            yield c.done
        yield self.port.stopListening()
        yield self.store.stopService()

    def ws(self, query: str = "", **kw: Any) -> Deferred[WsClient]:
        factory = WebSocketClientFactory(f"ws://{self.base}/ws/telemetry/{query}", **kw)
        factory.protocol = WsClient
        factory.opened = Deferred()  # type: ignore[attr-defined]
        proto_holder: list[WsClient] = []

        orig = factory.buildProtocol

        def build(addr: Any) -> Any:
            p = orig(addr)
            proto_holder.append(p)
            self.clients.append(p)
            return p

        factory.buildProtocol = build  # type: ignore[method-assign]
        connectWS(factory)
        return factory.opened.addTimeout(10, reactor)  # type: ignore[no-any-return]

    @defer.inlineCallbacks
    def http(self, path: str) -> Any:
        agent = Agent(reactor)
        response = yield agent.request(b"GET", f"http://{self.base}{path}".encode(), Headers())
        body = yield readBody(response)
        return response.code, body

    @defer.inlineCallbacks
    def test_relay_store_and_api(self) -> Any:
        """Through real twisted.web: the relay took over as the transport's producer, telemetry is acked
        after the SQLite commit, and the REST API reads it back."""
        site_client = yield self.ws()
        yield site_client.wait_for(2)
        robot = yield self.ws("?device_id=robot_01")
        yield robot.wait_for(1)
        server = self.hub.registry.get("robot_01").link
        self.assertIsInstance(server, RelayProtocol)
        self.assertIs(server.transport.producer, server)
        website_server = self.site.relay.websites.members["website-1"]
        self.assertIs(website_server.transport.producer, website_server)
        robot.sendMessage(
            orjson.dumps({"type": "telemetry", "battery": 42.5, "cpu": 1, "temperature": 2, "signal": 3})
        )
        msgs = yield robot.wait_for(2)
        self.assertEqual(msgs[1]["message"], "Telemetry data received and saved")
        self.assertEqual(self.store.rows_written, 1)  # committed before the ack
        code, body = yield self.http("/api/telemetry?device_id=robot_01")
        self.assertEqual(code, 200)
        rows = orjson.loads(body)["rows"]
        self.assertEqual([(r["device_id"], r["battery"]) for r in rows], [("robot_01", 42.5)])
        code, body = yield self.http("/api/battery-history/")
        self.assertEqual([p[1] for p in orjson.loads(body)], [42.5])
        updates = yield site_client.wait_for(5)
        self.assertEqual(updates[-1]["type"], "telemetry_update")

    @defer.inlineCallbacks
    def test_hostile_origin_over_http(self) -> Any:
        """A foreign Origin gets HTTP 403 from the real server; the dashboard's own origin is accepted."""
        with self.assertRaises(ConnectionError) as ctx:
            yield self.ws("", origin="http://evil.example")
        self.assertIn("403", str(ctx.exception))
        client = yield self.ws("", origin=f"http://{self.base}")
        yield client.wait_for(2)

    @defer.inlineCallbacks
    def test_garbage_http_then_good_client(self) -> Any:
        """Garbage on the HTTP port gets 400/close; the next client is served."""
        done: Deferred[bytes] = Deferred()

        class Garbage(Protocol):
            data = b""

            def connectionMade(self) -> None:
                self.transport.write(b"\x00\xff NONSENSE\r\n\r\n")

            def dataReceived(self, data: bytes) -> None:
                self.data += data

            def connectionLost(self, reason: Any) -> None:
                done.callback(self.data)

        from twisted.internet.protocol import ClientCreator

        yield ClientCreator(reactor, Garbage).connectTCP("127.0.0.1", self.port.getHost().port)
        data = yield done.addTimeout(10, reactor)
        self.assertIn(b"400", data)
        code, body = yield self.http("/healthz")
        self.assertEqual(code, 200)
