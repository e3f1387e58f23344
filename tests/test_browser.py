"""Browser tests of the dashboard (robonet/web/static) in headless Chromium via Playwright.

Three levels:

- ``StaticPageTests``: the static files alone on a plain HTTP server (``http.server``), no hub: the
  page loads without JavaScript errors, shows "disconnected" and keeps retrying, and fits a phone.
- ``MockHubTests``: the same static server with the WebSocket relay and the REST API mocked inside
  the browser (Playwright's ``route_web_socket`` / ``route``), speaking spec/websocket.md: device
  table, robot cards, scan plot, video frame, peers, stats, camera panel, joysticks and sliders.
- ``DaemonTests``: the real daemon (``tests/daemon.py``), a simulated robot on the bot link
  (spec/botlink.md framing), the real dashboard: the robot's card shows live values and a joystick
  drag reaches the robot as ``robot_move``. Saves ``test-artifacts/dashboard.png``.

Playwright's sync API runs its own event loop, so every browser session runs in a worker thread,
never on the reactor thread. Chromium is the system one (/usr/bin/chromium); no browser is ever
downloaded. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.server
import json
import os
import re
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, task, threads
from twisted.protocols.basic import Int32StringReceiver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from robonet.testing import require

try:
    from playwright.sync_api import Browser, Page, Route, WebSocketRoute, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "robonet" / "web" / "static"
ARTIFACTS = ROOT / "test-artifacts"
BROWSER_TIMEOUT_S = 120  # whole browser session, generous for a loaded CI machine
WAIT_MS = 10_000  # any single wait inside the page
VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}
# Records what the page sends on any WebSocket, so tests wait on page state, not on time.
RECORD_SENT = """
window.__sent = [];
const origSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  try { window.__sent.push(JSON.parse(data)); } catch (e) { window.__sent.push(data); }
  return origSend.call(this, data);
};
"""


def _require_browser() -> None:
    """Skip without playwright or Chromium; fail instead under REQUIRE_ALL_TESTS=1 (.ci/run)."""
    require(
        sync_playwright is not None,
        "playwright (python) is not installed: pip install playwright (never run 'playwright install')",
    )
    require(
        os.access(CHROMIUM, os.X_OK),
        f"no Chromium at {CHROMIUM} (apt-get install chromium); these tests never download a browser",
    )


def _in_browser_thread(fn: Callable[[Browser], Any]) -> Any:
    """Run fn(browser) with a fresh headless Chromium in a worker thread; return its result."""

    def session() -> Any:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
            try:
                return fn(browser)
            finally:
                browser.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(session).result(timeout=BROWSER_TIMEOUT_S)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@contextmanager
def static_server() -> Iterator[str]:
    """Serve robonet/web/static on 127.0.0.1 (like ``python -m http.server``); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(STATIC))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _iso(ts: float | None = None) -> str:
    when = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return when.isoformat()


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _page_errors(page: Page, allow: str = r"^$") -> list[str]:
    """Collect uncaught exceptions, console errors and HTTP error responses. Not counted: the
    browser's own WebSocket connection failures (expected while no hub is there), and responses
    whose "STATUS PATH" matches ``allow`` (e.g. ``404 /api/camera`` with the camera off)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))

    def on_console(msg: Any) -> None:
        text = msg.text
        if msg.type == "error" and not text.startswith(
            ("WebSocket connection to", "Failed to load resource")
        ):
            errors.append(f"console: {text}")

    def on_response(res: Any) -> None:
        what = f"{res.status} /{res.url.split('://', 1)[1].split('/', 1)[1].split('?', 1)[0]}"
        if res.status >= 400 and not re.search(allow, what):
            errors.append(f"http: {what}")

    page.on("console", on_console)
    page.on("response", on_response)
    return errors


def _record_url(acc: list[str], item: Any) -> None:
    acc.append(item.url)


def _fits_width(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


class StaticPageTests(SynchronousTestCase):
    """The dashboard served by a plain file server, with no hub behind it."""

    def setUp(self) -> None:
        _require_browser()
        ARTIFACTS.mkdir(exist_ok=True)

    def test_no_hub_disconnected_and_retrying(self) -> None:
        """Without a hub the page raises no JavaScript errors, shows "disconnected", keeps
        opening new WebSockets (backoff), sends nothing else, and fits both viewports."""

        def run(browser: Browser) -> dict[str, Any]:
            out: dict[str, Any] = {}
            with static_server() as base:
                for name, (w, h) in VIEWPORTS.items():
                    page = browser.new_page(viewport={"width": w, "height": h})
                    errors = _page_errors(page)
                    requests: list[str] = []
                    attempts: list[str] = []
                    page.on("request", functools.partial(_record_url, requests))
                    page.on("websocket", functools.partial(_record_url, attempts))
                    page.goto(base)
                    # Three attempts means at least two retries after a failed connect.
                    page.wait_for_function(
                        "document.getElementById('conn').dataset.attempt >= 3", timeout=WAIT_MS
                    )
                    out[name] = {
                        "state": page.inner_text("#conn-state"),
                        "attempts": list(attempts),
                        "errors": list(errors),
                        "fits": _fits_width(page),
                        "api": [u for u in requests if "/api/" in u],
                    }
                    page.screenshot(
                        path=str(ARTIFACTS / f"dashboard-disconnected-{name}.png"), full_page=True
                    )
                    page.close()
            return out

        out = _in_browser_thread(run)
        for name, got in out.items():
            self.assertEqual(got["state"], "disconnected", name)
            self.assertGreaterEqual(len(got["attempts"]), 3, name)
            self.assertTrue(
                all(re.search(r"^ws://127\.0\.0\.1:\d+/ws/telemetry/$", u) for u in got["attempts"]), got
            )
            self.assertEqual(got["errors"], [], name)
            self.assertTrue(got["fits"], f"{name}: page is wider than the viewport")
            self.assertEqual(got["api"], [], f"{name}: REST calls while disconnected")

    def test_token_from_page_query(self) -> None:
        """A ?token= on the page's URL is passed on to the WebSocket URL."""

        def run(browser: Browser) -> list[str]:
            with static_server() as base:
                page = browser.new_page()
                attempts: list[str] = []
                page.on("websocket", lambda ws: attempts.append(ws.url))
                page.goto(base + "?token=s%20cret")
                page.wait_for_function(
                    "document.getElementById('conn').dataset.attempt >= 1", timeout=WAIT_MS
                )
                page.close()
                return attempts

        attempts = _in_browser_thread(run)
        self.assertTrue(attempts)
        self.assertTrue(attempts[0].endswith("/ws/telemetry/?token=s%20cret"), attempts[0])


def _device(device_id: str, **kw: Any) -> dict[str, Any]:
    now = _now()
    rec = {
        "device_id": device_id,
        "name": "",
        "face": "botlink",
        "role": "robot",
        "address": "127.0.0.1:40000",
        "status": "online",
        "hub": "",
        "connected_at": now - 600,
        "last_seen": now - 1,
        "latest": {},
        "latest_at": {},
    }
    rec.update(kw)
    return rec


GIF_1PX = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


class MockHub:
    """A fake hub inside the browser: the WebSocket relay and the REST API, per spec/websocket.md.

    ``camera`` is the GET /api/camera body (None -> 404); ``settings_reply`` is (status, body) for
    POST /api/camera/settings. All sockets and requests are answered on Playwright's dispatcher, in
    the browser thread.
    """

    def __init__(self, devices: list[dict[str, Any]], camera: dict[str, Any] | None = None) -> None:
        self.devices = devices
        self.camera = camera
        self.settings_reply: tuple[int, dict[str, Any]] = (200, {"settings": {}})
        self.settings_posts: list[Any] = []
        self.sockets: list[WebSocketRoute] = []
        self.history_requests: list[str] = []

    def install(self, page: Page) -> None:
        page.route_web_socket(re.compile(r"/ws/telemetry/?(\?.*)?$"), self._on_socket)
        page.add_init_script(RECORD_SENT)  # after route_web_socket, which replaces WebSocket
        page.route(re.compile(r"/(api|camera)/"), self._on_http)

    def _on_socket(self, ws: WebSocketRoute) -> None:
        self.sockets.append(ws)
        ws.on_message(self._on_command(ws))
        self.send(
            ws,
            {
                "status": "connected",
                "device_type": "website",
                "message": "Dashboard connected to server",
                "website_id": "website-3",
            },
        )
        for d in self.devices:
            if d["role"] == "robot" and d["status"] == "online":
                self.send(
                    ws,
                    {
                        "type": "robot_status",
                        "status": "connected",
                        "device_type": "robot",
                        "device_id": d["device_id"],
                        "message": f"Robot {d['device_id']} is currently connected",
                    },
                )
        self.send(ws, {"type": "snapshot", "devices": self.devices})

    def _on_command(self, ws: WebSocketRoute) -> Callable[[str | bytes], None]:
        def on_message(raw: str | bytes) -> None:
            try:
                msg = json.loads(raw)
            except ValueError:
                self.send(ws, {"error": "Invalid JSON format"})
                return
            kind = msg.get("type")
            if kind == "robot_move":
                text = f"Command received: Robot move x={msg.get('x')}, y={msg.get('y')}"
            elif kind == "set_speed":
                text = f"Command received: Speed set to {msg.get('value')}%"
            else:
                text = "Command received"
            self.send(ws, {"type": "ack", "original_type": kind, "status": "received", "message": text})

        return on_message

    @staticmethod
    def send(ws: WebSocketRoute, msg: dict[str, Any]) -> None:
        ws.send(json.dumps(msg))

    def broadcast(self, msg: dict[str, Any]) -> None:
        for ws in self.sockets:
            self.send(ws, msg)

    def _on_http(self, route: Route) -> None:
        url = route.request.url
        path = url.split("://", 1)[1].split("/", 1)[1]
        path = "/" + path.split("?", 1)[0]
        now = _now()
        if path == "/api/peers":
            route.fulfill(
                json={
                    "peers": [
                        {
                            "node_id": "9f2c1a7e",
                            "name": "hub-lab",
                            "address": "127.0.0.1:5100",
                            "state": "connected",
                            "rtt_ms": 1.8,
                            "last_seen": now - 2,
                            "authenticated": True,
                            "devices": 4,
                        },
                        {
                            "node_id": "4be01c33",
                            "name": "hub-yard",
                            "address": "127.0.0.1:5101",
                            "state": "connecting",
                            "rtt_ms": None,
                            "last_seen": now - 95,
                            "authenticated": False,
                            "devices": 0,
                        },
                    ]
                }
            )
        elif path == "/api/stats":
            route.fulfill(
                json={
                    "node": {"name": "hub-main"},
                    "uptime_s": 93784.0,
                    "msgs_per_s": 42.5,
                    "errors": {"bad_json": 3, "unknown_command": 1},
                    "drops": {"video": 12},
                }
            )
        elif path == "/api/camera" and route.request.method == "GET":
            if self.camera is None:
                route.fulfill(status=404, json={"error": "camera service disabled"})
            else:
                route.fulfill(json=self.camera)
        elif path == "/api/camera/settings":
            self.settings_posts.append(route.request.post_data_json)
            status, body = self.settings_reply
            route.fulfill(status=status, json=body)
        elif path == "/api/battery-history/":
            self.history_requests.append(url)
            if "device_id=robot_0" in url:
                route.fulfill(json=[[int((now - 600 + i * 10) * 1000), 95 - i * 0.2] for i in range(58)])
            else:
                route.fulfill(json=[])
        elif path == "/api/devices":
            route.fulfill(json={"devices": self.devices})
        elif path == "/camera/preview.mjpg":
            route.fulfill(body=GIF_1PX, content_type="image/gif")
        else:
            route.fulfill(status=404, json={"error": "not found"})


def _fleet() -> list[dict[str, Any]]:
    now = _now()
    scan = {
        "sensor_type": "ultrasonic_scanner",
        "data_count": 19,
        "data_points": [
            {"angle": a, "distance_cm": (-1 if a in (40, 50) else 40 + 60 * abs((a - 90) / 90) ** 2)}
            for a in range(0, 181, 10)
        ],
    }
    return [
        _device(
            "robot_01",
            name="Stair climber",
            latest={"telemetry": {"battery": 82.0, "cpu": 37.5, "temperature": 41.2, "signal": 88.0}},
            latest_at={"telemetry": now - 1},
        ),
        _device(
            "robot_02",
            status="offline",
            last_seen=now - 3600,
            address="127.0.0.1:40002",
            latest={"telemetry": {"battery": 14.0, "cpu": 5.0, "temperature": 29.0, "signal": 0.0}},
            latest_at={"telemetry": now - 3600},
        ),
        _device(
            "bot-127.0.0.9",
            face="botlink",
            address="127.0.0.9",
            latest={"sensor_data": scan, "system_status": {"message": "boot ok"}},
            latest_at={"sensor_data": now - 4, "system_status": now - 300},
        ),
        _device(
            "camera",
            face="local",
            role="camera",
            address="",
            latest={"camera_state": {"state": "running"}},
            latest_at={"camera_state": now - 2},
        ),
        _device(
            "lab-script",
            face="line",
            role="client",
            address="127.0.0.1:51234",
            last_seen=now - 20,
            name="<img src=x onerror=window.__xss=1>",
        ),
    ]


CAMERA_STATUS: dict[str, Any] = {
    "pipeline": "test",
    "state": "running",
    "restarts": 2,
    "fps": 23.9,
    "last_error": None,
    "pid": 4242,
    "settings": {
        "shutter": 10000,
        "gain": 1,
        "awb_red": 1.0,
        "awb_blue": 1.0,
        "contrast": 1.0,
        "brightness": 0.0,
    },
    "rtsp_url": "rtsp://127.0.0.1:8554/ES_MTX",
    "ranges": {
        "shutter": [100, 10000],
        "gain": [1, 16],
        "awb_red": [0.1, 5.0],
        "awb_blue": [0.1, 5.0],
        "contrast": [0.0, 2.0],
        "brightness": [-1.0, 1.0],
    },
}

# The newest robot_move / camera_move the page sent is the stop {x: 0, y: 0}.
LAST_IS_STOP = """type => { const m = window.__sent.filter(m => m.type === type).at(-1);
  return m !== undefined && m.x === 0 && m.y === 0; }"""

# The joystick's knob is back in the middle (it glides back after release).
KNOB_CENTRED = """sel => { const b = document.querySelector(sel).getBoundingClientRect();
  const k = document.querySelector(sel + ' .knob').getBoundingClientRect();
  return Math.abs(b.x + b.width / 2 - (k.x + k.width / 2)) < 1
    && Math.abs(b.y + b.height / 2 - (k.y + k.height / 2)) < 1; }"""

# Every robot chart shows everything its buffer holds (redraws are throttled, and cards off screen
# are drawn only when they come into view).
CHARTS_CAUGHT_UP = """() => [...window.robonet.cards.values()].every(c =>
  c.buffer.length === 0 || (c.chart && c.chart.data[0].length === c.buffer.length))"""

# A test pattern drawn by the browser itself, returned as bare base64 JPEG (video_frame's frame_data).
MAKE_JPEG = """() => {
  const c = document.createElement('canvas'); c.width = 320; c.height = 240;
  const g = c.getContext('2d');
  const grad = g.createLinearGradient(0, 0, 320, 240);
  grad.addColorStop(0, '#1e3a8a'); grad.addColorStop(1, '#0e7490');
  g.fillStyle = grad; g.fillRect(0, 0, 320, 240);
  g.fillStyle = '#fde68a';
  g.fillRect(40, 150, 240, 14); g.fillRect(70, 120, 180, 14); g.fillRect(100, 90, 120, 14);
  g.fillStyle = '#fff'; g.font = '20px sans-serif'; g.fillText('robot_01 cam', 100, 50);
  return c.toDataURL('image/jpeg', 0.8).split(',')[1];
}"""


class MockHubTests(SynchronousTestCase):
    """The dashboard against a hub mocked in the browser (spec/websocket.md shapes)."""

    def setUp(self) -> None:
        _require_browser()
        ARTIFACTS.mkdir(exist_ok=True)

    def _feed_live(self, page: Page, hub: MockHub) -> None:
        now = _now()
        for i in range(40):
            t = now - (39 - i) * 7.5
            hub.broadcast(
                {
                    "type": "telemetry_update",
                    "device_id": "robot_01",
                    "device_name": "Stair climber",
                    "battery": 80 - i * 0.1,
                    "cpu": 30 + (i * 7) % 25,
                    "temperature": 40 + (i % 9) * 0.4,
                    "signal": 85 + (i % 5),
                    "timestamp": _iso(t),
                }
            )
        frame = page.evaluate(MAKE_JPEG)
        hub.broadcast(
            {"type": "video_frame", "device_id": "robot_01", "frame_data": frame, "timestamp": _iso()}
        )
        hub.broadcast(
            {
                "type": "system_status",
                "device_id": "robot_01",
                "message": "stairs: step 4 of 12",
                "timestamp": _iso(),
            }
        )
        hub.broadcast(
            {
                "type": "error",
                "code": "device_offline",
                "original_type": "robot_move",
                "message": "robot_02 is offline",
            }
        )

    def test_fleet_renders(self) -> None:
        """Snapshot and live messages fill the device table, the robot cards (values, chart, scan
        plot, video frame), peers, stats and the camera panel; untrusted names stay text; the layout
        fits 1280x800 and 390x844."""

        def run(browser: Browser) -> dict[str, Any]:
            out: dict[str, Any] = {}
            with static_server() as base:
                for name, (w, h) in VIEWPORTS.items():
                    hub = MockHub(_fleet(), camera=CAMERA_STATUS)
                    page = browser.new_page(viewport={"width": w, "height": h})
                    errors = _page_errors(page)
                    hub.install(page)
                    page.goto(base)
                    page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT_MS)
                    page.wait_for_selector("[data-device-id=robot_01].card", timeout=WAIT_MS)
                    self._feed_live(page, hub)
                    page.wait_for_function(
                        "document.querySelector('.card[data-device-id=robot_01] img.frame')"
                        ".src.startsWith('data:image/jpeg;base64,')",
                        timeout=WAIT_MS,
                    )
                    page.wait_for_function(
                        "document.querySelector('#peer-table tbody tr') !== null", timeout=WAIT_MS
                    )
                    page.wait_for_function(
                        "document.querySelector('[data-stat=uptime]').textContent !== '–'", timeout=WAIT_MS
                    )
                    page.wait_for_selector("#camera-panel:not([hidden])", timeout=WAIT_MS)
                    # The whole page in view, so that every card is drawn for the screenshot.
                    page.set_viewport_size(
                        {"width": w, "height": page.evaluate("document.body.scrollHeight")}
                    )
                    page.wait_for_function(CHARTS_CAUGHT_UP, timeout=WAIT_MS)
                    card = ".card[data-device-id=robot_01]"
                    got = {
                        "cards": page.eval_on_selector_all(
                            "#robot-cards .card", "els => els.map(e => e.dataset.deviceId)"
                        ),
                        "rows": page.eval_on_selector_all(
                            "#device-table tbody tr", "els => els.map(e => e.dataset.deviceId)"
                        ),
                        "battery": page.inner_text(f"{card} [data-field=battery] .metric-value"),
                        "temperature": page.inner_text(f"{card} [data-field=temperature] .metric-value"),
                        "status2": page.get_attribute(".card[data-device-id=robot_02]", "data-status"),
                        "chart_points": page.evaluate("window.robonet.cards.get('robot_01').buffer.length"),
                        "scan_points": page.get_attribute(
                            ".card[data-device-id='bot-127.0.0.9'] canvas.polar", "data-points"
                        ),
                        "note": page.inner_text(f"{card} .card-note"),
                        "targets": page.eval_on_selector_all(
                            "#target-select option", "els => els.map(e => e.value)"
                        ),
                        "xss": page.evaluate("window.__xss === undefined"),
                        "name_text": page.inner_text("tr[data-device-id=lab-script] .dev-name"),
                        "peers": page.eval_on_selector_all(
                            "#peer-table tbody tr", "els => els.map(e => e.dataset.nodeId)"
                        ),
                        "uptime": page.inner_text("[data-stat=uptime]"),
                        "rate": page.inner_text("[data-stat=rate]"),
                        "errors_total": page.inner_text("[data-stat=errors]"),
                        "hub_name": page.inner_text("#hub-name"),
                        "website": page.inner_text("#website-id"),
                        "camera_state": page.inner_text("#camera-state"),
                        "preview": page.get_attribute("#camera-preview", "src"),
                        "log": page.inner_text("#event-log"),
                        "history": list(hub.history_requests),
                        "fits": _fits_width(page),
                        "errors": list(errors),
                    }
                    page.set_viewport_size({"width": w, "height": h})
                    page.screenshot(
                        path=str(ARTIFACTS / f"dashboard-mock-{name}.png"), full_page=(name == "phone")
                    )
                    out[name] = got
                    page.close()
            return out

        out = _in_browser_thread(run)
        for name, got in out.items():
            self.assertEqual(got["cards"], ["bot-127.0.0.9", "robot_01", "robot_02"], name)
            self.assertEqual(got["rows"][:3], ["bot-127.0.0.9", "camera", "lab-script"], name)
            self.assertEqual(got["rows"][-1], "robot_02", f"{name}: offline devices sort last")
            self.assertEqual(got["battery"], "76 %", name)
            self.assertEqual(got["temperature"], "41.2 °C", name)
            self.assertEqual(got["status2"], "offline", name)
            self.assertGreater(got["chart_points"], 60, f"{name}: history prefill + live samples")
            self.assertEqual(got["scan_points"], "19", name)
            self.assertEqual(got["note"], "system status: stairs: step 4 of 12", name)
            self.assertEqual(got["targets"], ["", "bot-127.0.0.9", "robot_01", "robot_02"], name)
            self.assertTrue(got["xss"], name)
            self.assertEqual(got["name_text"], "<img src=x onerror=window.__xss=1>", name)
            self.assertEqual(got["peers"], ["9f2c1a7e", "4be01c33"], name)
            self.assertEqual(got["uptime"], "1 d 2 h", name)
            self.assertEqual(got["rate"], "43", name)
            self.assertEqual(got["errors_total"], "4", name)
            self.assertEqual(got["hub_name"], "hub-main", name)
            self.assertEqual(got["website"], "website-3", name)
            self.assertEqual(got["camera_state"], "running", name)
            self.assertEqual(got["preview"], "/camera/preview.mjpg", name)
            self.assertIn("robot_move device_offline: robot_02 is offline", got["log"], name)
            self.assertTrue(any("device_id=robot_01" in u for u in got["history"]), got["history"])
            self.assertTrue(got["fits"], f"{name}: page is wider than the viewport")
            self.assertEqual(got["errors"], [], name)

    def test_history_download_links(self) -> None:
        """Each robot card offers its stored history for download: CSV and MCAP links to
        /api/export for that device (issue 10), marked as downloads."""

        def run(browser: Browser) -> Any:
            with static_server() as base:
                hub = MockHub(_fleet(), camera=CAMERA_STATUS)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                errors = _page_errors(page)
                hub.install(page)
                page.goto(base)
                page.wait_for_selector(".card[data-device-id=robot_01] .history-download a", timeout=WAIT_MS)
                links = page.eval_on_selector_all(
                    ".card[data-device-id=robot_01] .history-download a",
                    "els => els.map(a => [a.dataset.format, a.getAttribute('href'), a.hasAttribute('download')])",
                )
                page.close()
                return links, errors

        links, errors = _in_browser_thread(run)
        self.assertEqual(
            links,
            [
                ["csv", "/api/export?device_id=robot_01&format=csv", True],
                ["mcap", "/api/export?device_id=robot_01&format=mcap", True],
            ],
        )
        self.assertEqual(errors, [])

    def test_joystick_and_sliders(self) -> None:
        """Dragging the robot joystick with a mouse sends robot_move with the selected target's
        device_id, repeats the held value every 100 ms, and sends {x:0, y:0} once on release; two
        touches drive both joysticks at once and lifting them stops both; speed and brightness
        sliders send set_speed/set_brightness {value}; acks land in the event log."""

        def run(browser: Browser) -> dict[str, Any]:
            with static_server() as base:
                hub = MockHub(_fleet())
                context = browser.new_context(viewport={"width": 1280, "height": 800}, has_touch=True)
                page = context.new_page()
                errors = _page_errors(page, allow=r"^404 /api/camera$")  # no camera on this hub
                hub.install(page)
                page.goto(base)
                page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT_MS)
                page.wait_for_selector(
                    "#target-select option[value=robot_01]", state="attached", timeout=WAIT_MS
                )
                page.select_option("#target-select", "robot_01")

                box = page.locator("#robot-joystick").bounding_box()
                assert box is not None
                cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.mouse.move(cx, cy)
                page.mouse.down()
                page.mouse.move(cx + box["width"], cy - box["height"], steps=5)  # beyond the rim: clamped
                # Held still: the same value must keep coming (repeat every 100 ms).
                page.wait_for_function(
                    "() => window.__sent.filter(m => m.type === 'robot_move' && m.x === 0.71 && m.y === 0.71)"
                    ".length >= 4",
                    timeout=WAIT_MS,
                )
                held = page.evaluate("window.__sent.filter(m => m.type === 'robot_move').at(-1)")
                page.mouse.up()
                page.wait_for_function(
                    LAST_IS_STOP,
                    arg="robot_move",
                    timeout=WAIT_MS,
                )
                page.wait_for_function(
                    "document.querySelector('#event-log li[data-kind=ack]') !== null", timeout=WAIT_MS
                )

                # Two thumbs at once (camera stick and robot stick), through Chromium's real touch
                # input path, with no target: commands carry no device_id.
                page.select_option("#target-select", "")
                cbox = page.locator("#camera-joystick").bounding_box()
                assert cbox is not None
                tx, ty = cbox["x"] + cbox["width"] / 2, cbox["y"] + cbox["height"] / 2

                def touches(i: int) -> list[dict[str, float]]:
                    return [
                        {"x": tx - i * 12, "y": ty + i * 4, "id": 1},  # camera: left and a bit down
                        {"x": cx, "y": cy - i * 12, "id": 2},  # robot: straight up
                    ]

                cdp = context.new_cdp_session(page)
                cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": touches(0)})
                for i in range(1, 6):
                    cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": touches(i)})
                page.wait_for_function(
                    "() => window.__sent.filter(m => m.type === 'camera_move' && m.x < -0.5).length >= 2"
                    " && window.__sent.filter(m => m.type === 'robot_move' && m.y > 0.5 && !m.device_id)"
                    ".length >= 2",
                    timeout=WAIT_MS,
                )
                cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
                page.wait_for_function(LAST_IS_STOP, arg="camera_move", timeout=WAIT_MS)
                page.wait_for_function(LAST_IS_STOP, arg="robot_move", timeout=WAIT_MS)

                page.focus("#speed-slider")
                page.keyboard.press("ArrowRight")
                page.focus("#brightness-slider")
                page.keyboard.press("ArrowLeft")
                page.wait_for_function(
                    "() => window.__sent.some(m => m.type === 'set_brightness')", timeout=WAIT_MS
                )
                sent = page.evaluate("window.__sent")
                result = {
                    "sent": sent,
                    "held": held,
                    "log": page.inner_text("#event-log"),
                    "errors": list(errors),
                    "still_held": page.evaluate("window.robonet.sticks.map(s => s.held)"),
                }
                context.close()
                return result

        got = _in_browser_thread(run)
        moves = [m for m in got["sent"] if m["type"] == "robot_move"]
        mouse = [m for m in moves if "device_id" in m]
        touch = [m for m in moves if "device_id" not in m]
        self.assertEqual(moves[: len(mouse)], mouse, "every move while robot_01 was the target names it")
        self.assertTrue(all(m["device_id"] == "robot_01" for m in mouse), mouse)
        held = got["held"]
        self.assertLess(
            abs((held["x"] ** 2 + held["y"] ** 2) ** 0.5 - 1.0), 0.02, f"clamped to the rim: {held}"
        )
        self.assertEqual(held["x"], held["y"])
        self.assertEqual(mouse[-1], {"type": "robot_move", "x": 0, "y": 0, "device_id": "robot_01"})
        last_moving = max(i for i, m in enumerate(mouse) if m["x"] or m["y"])
        self.assertEqual(len(mouse) - 1 - last_moving, 1, "exactly one stop after release, then silence")
        self.assertGreaterEqual(sum(1 for m in mouse if m == held), 4, "held value repeated")
        self.assertTrue(any(m["y"] > 0.5 and m["x"] == 0 for m in touch), touch)
        self.assertEqual(touch[-1], {"type": "robot_move", "x": 0, "y": 0})
        cams = [m for m in got["sent"] if m["type"] == "camera_move"]
        self.assertTrue(all("device_id" not in m for m in cams), "target 'all robots' sends no device_id")
        self.assertTrue(any(m["x"] < -0.5 and m["y"] < 0 for m in cams), cams)
        self.assertEqual(cams[-1], {"type": "camera_move", "x": 0, "y": 0})
        self.assertIn({"type": "set_speed", "value": 51}, got["sent"])
        self.assertIn({"type": "set_brightness", "value": 49}, got["sent"])
        self.assertIn("robot_move: Command received: Robot move x=0, y=0", got["log"])
        self.assertEqual(got["still_held"], [False, False])
        self.assertEqual(got["errors"], [])

    def test_camera_panel(self) -> None:
        """A 404 on /api/camera hides the camera panel; with a camera, a rejected settings POST
        (400 {"error","field"}) marks that field, and an accepted one reports success and posts
        only the edited fields."""

        def run(browser: Browser) -> dict[str, Any]:
            out: dict[str, Any] = {}
            with static_server() as base:
                hub = MockHub(_fleet(), camera=None)
                page = browser.new_page()
                hub.install(page)
                page.goto(base)
                page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT_MS)
                page.wait_for_function("window.robonet.camera.disabled === true", timeout=WAIT_MS)
                out["hidden_404"] = page.get_attribute("#camera-panel", "hidden") is not None
                page.close()

                hub = MockHub(
                    _fleet(), camera=dict(CAMERA_STATUS, state="backoff", last_error="ffmpeg exited 1")
                )
                page = browser.new_page()
                errors = _page_errors(page, allow=r"^400 /api/camera/settings$")
                hub.install(page)
                page.goto(base)
                page.wait_for_selector("#camera-panel:not([hidden])", timeout=WAIT_MS)
                out["preview_src"] = page.get_attribute("#camera-preview", "src")
                out["gain_max"] = page.get_attribute("#camera-gain", "max")
                hub.settings_reply = (400, {"error": "out of range", "field": "gain"})
                page.fill("#camera-gain", "99")
                page.click("#camera-settings button[type=submit]")
                page.wait_for_selector("#camera-gain[aria-invalid=true]", timeout=WAIT_MS)
                out["msg_400"] = page.inner_text("#camera-settings-msg")
                hub.settings_reply = (200, {"settings": dict(CAMERA_STATUS["settings"], gain=4)})
                page.fill("#camera-gain", "4")
                page.click("#camera-settings button[type=submit]")
                page.wait_for_function(
                    "document.getElementById('camera-settings-msg').textContent === 'Applied.'",
                    timeout=WAIT_MS,
                )
                out["posts"] = list(hub.settings_posts)
                out["invalid_after"] = page.get_attribute("#camera-gain", "aria-invalid")
                out["last_error"] = page.inner_text("[data-camera=last_error]")
                out["errors"] = list(errors)
                page.close()
            return out

        got = _in_browser_thread(run)
        self.assertTrue(got["hidden_404"])
        self.assertIsNone(got["preview_src"], "no preview while the pipeline is not running")
        self.assertEqual(got["gain_max"], "16")
        self.assertEqual(got["msg_400"], "gain: out of range")
        self.assertEqual(got["posts"], [{"gain": 99}, {"gain": 4}])
        self.assertIsNone(got["invalid_after"])
        self.assertEqual(got["last_error"], "ffmpeg exited 1")
        self.assertEqual(got["errors"], [])


# ---- the real daemon ---------------------------------------------------------------------------


class _Robot(Int32StringReceiver):
    """A simulated robot on the bot link (spec/botlink.md native dialect): hello, then telemetry
    every 200 ms with ids; acks every command it receives and records it."""

    MAX_LENGTH = 1 << 20

    def __init__(self, device_id: str, clock: Any) -> None:
        self.device_id = device_id
        self.clock = clock
        self.welcomed: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.commands: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.next_id = 0
        self.loop = task.LoopingCall(self.telemetry)
        self.loop.clock = clock

    def send(self, msg: dict[str, Any]) -> None:
        self.sendString(json.dumps(msg).encode())

    def connectionMade(self) -> None:
        self.send(
            {"type": "hello", "proto": 1, "role": "robot", "device_id": self.device_id, "name": "Robot 7"}
        )

    def stringReceived(self, data: bytes) -> None:
        msg = json.loads(data)
        kind = msg.get("type")
        if kind == "welcome" and not self.welcomed.called:
            self.loop.start(0.2)
            self.welcomed.callback(msg)
        elif kind == "error" and not self.welcomed.called:
            self.welcomed.errback(RuntimeError(f"hello refused: {msg}"))
        elif kind not in ("ack", "response", "welcome", "ping", "error"):
            if "id" in msg:
                self.send({"type": "ack", "id": msg["id"], "sum": sum(data) % 2**32})
            with self.cond:
                self.commands.append(msg)
                self.cond.notify_all()

    def telemetry(self) -> None:
        self.next_id += 1
        n = self.next_id
        self.send(
            {
                "type": "telemetry",
                "id": n,
                "battery": 90.0 - n * 0.05,
                "cpu": 20.0 + n % 30,
                "temperature": 38.5,
                "signal": 77.0,
            }
        )

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop.running:
            self.loop.stop()
        self.lost.callback(None)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """From another thread: block until a recorded command matches (or the timeout passes)."""
        with self.cond:
            self.cond.wait_for(lambda: any(predicate(m) for m in self.commands), timeout=timeout)
            return next((m for m in self.commands if predicate(m)), None)


class DaemonTests(TestCase):
    """The dashboard served by the real daemon, with a robot on the bot link."""

    timeout = BROWSER_TIMEOUT_S + 60

    def setUp(self) -> None:
        _require_browser()
        ARTIFACTS.mkdir(exist_ok=True)

    @defer.inlineCallbacks
    def test_robot_card_and_joystick(self) -> Generator[defer.Deferred[Any], Any, None]:
        """A robot on the bot link appears as a card with its live battery value; dragging the
        robot joystick with the robot selected delivers robot_move {x, y, ...} to the robot, and
        release delivers {x: 0, y: 0}."""
        from twisted.internet import reactor

        from tests.daemon import start_daemon  # part of the suite: an ImportError is a failure

        daemon = start_daemon(self)  # blocks until the ports listen; stopped at cleanup
        robot = _Robot("robot_07", reactor)
        endpoint_factory = protocol.Factory.forProtocol(lambda: robot)
        from twisted.internet.endpoints import TCP4ClientEndpoint

        yield TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.ports["botlink"], timeout=10).connect(
            endpoint_factory
        )

        def close_robot() -> defer.Deferred[None]:
            assert robot.transport is not None
            robot.transport.loseConnection()
            return robot.lost

        self.addCleanup(close_robot)
        yield robot.welcomed
        url = f"http://127.0.0.1:{daemon.ports['web']}/"

        def run(browser: Browser) -> dict[str, Any]:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors = _page_errors(page, allow=r"^404 /api/camera$")  # the camera service is off
            page.add_init_script(RECORD_SENT)
            page.goto(url)
            page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT_MS)
            card = ".card[data-device-id=robot_07]"
            page.wait_for_selector(card, timeout=WAIT_MS)
            page.wait_for_function(
                f"document.querySelector('{card} [data-field=battery] .metric-value').textContent !== '–'",
                timeout=WAIT_MS,
            )
            first = page.inner_text(f"{card} [data-field=cpu] .metric-value")
            # Live: the value changes as new telemetry arrives (cpu cycles through 30 values).
            page.wait_for_function(
                "([sel, first]) => document.querySelector(sel).textContent !== first",
                arg=[f"{card} [data-field=cpu] .metric-value", first],
                timeout=WAIT_MS,
            )
            page.wait_for_selector("#target-select option[value=robot_07]", state="attached", timeout=WAIT_MS)
            page.select_option("#target-select", "robot_07")
            box = page.locator("#robot-joystick").bounding_box()
            assert box is not None
            cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(cx, cy)
            page.mouse.down()
            page.mouse.move(cx, cy - box["height"], steps=4)
            moved = robot.wait_for(
                lambda m: m.get("type") == "robot_move" and m.get("y", 0) > 0.5, timeout=10
            )
            page.mouse.up()
            stopped = robot.wait_for(
                lambda m: m.get("type") == "robot_move" and m.get("x") == 0 and m.get("y") == 0, timeout=10
            )
            page.wait_for_function(
                "document.querySelector('#event-log li[data-kind=ack]') !== null", timeout=WAIT_MS
            )
            page.wait_for_function(KNOB_CENTRED, arg="#robot-joystick", timeout=WAIT_MS)  # for the picture
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
            result = {
                "battery": page.inner_text(f"{card} [data-field=battery] .metric-value"),
                "row": page.inner_text("#device-table tr[data-device-id=robot_07]"),
                "moved": moved,
                "stopped": stopped,
                "errors": list(errors),
            }
            page.close()
            return result

        got = yield threads.deferToThread(_in_browser_thread, run)
        self.assertRegex(got["battery"], r"^\d+ %$")
        self.assertIn("online", got["row"])
        self.assertIsNotNone(got["moved"], "robot never received robot_move")
        self.assertEqual(got["moved"]["x"], 0)
        self.assertGreater(got["moved"]["y"], 0.5)
        self.assertIsNotNone(got["stopped"], "robot never received the stop on release")
        self.assertEqual(got["errors"], [])
