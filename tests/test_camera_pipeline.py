"""The camera pipeline supervisor, settings persistence and preview (spec/camera.md, "Camera pipeline").

Unit tests drive CameraPipeline with a fake process reactor (task.Clock + recorded spawnProcess);
end-to-end tests run Debian's ffmpeg for real (test mode, and a two-process chain with ffmpeg
standing in for the camera tool), bounded by trial's per-test timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from robonet.config import load_config
from robonet.protocols.camera import CameraSettings
from robonet.services.camera import CameraSettingsStore, make_camera_service
from robonet.services.camera_pipeline import (
    CameraPipeline,
    JpegSplitter,
    ProgressParser,
    build_argvs,
    output_format_for,
)
from robonet.services.camera_web import camera_resources
from robonet.testing import require

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")


def camera_config(**camera: Any) -> Any:
    return load_config(environ={}, overrides={"camera": camera}).camera


# --- fakes ----------------------------------------------------------------------------------------


class FakeProcess:
    def __init__(self, proto: Any, pid: int, argv: list[str], fds: dict[int, Any]) -> None:
        self.proto = proto
        self.pid = pid
        self.argv = argv
        self.fds = fds
        self.signals: list[str] = []
        self.ended = False
        self.stdin_closed = False

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def end(self, code: int | None = 1, sig: int | None = None) -> None:
        """Simulate the process exiting (reaped, pipes closed)."""
        self.ended = True
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code, signal=sig)
        self.proto.processEnded(Failure(reason))

    def err(self, text: str) -> None:
        self.proto.errReceived(text.encode())


class FakeProcessReactor(Clock):
    """task.Clock plus a spawnProcess that records the call and returns a FakeProcess."""

    def __init__(self) -> None:
        super().__init__()
        self.procs: list[FakeProcess] = []
        self.fail_spawn: Exception | None = None

    def spawnProcess(
        self,
        proto: Any,
        executable: str,
        args: list[str],
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: Any = 0,
        childFDs: Any = None,
    ) -> FakeProcess:
        if self.fail_spawn is not None:
            raise self.fail_spawn
        proc = FakeProcess(proto, 1000 + len(self.procs), list(args), dict(childFDs or {}))
        self.procs.append(proc)
        proto.makeConnection(proc)
        return proc

    def live(self) -> list[FakeProcess]:
        return [p for p in self.procs if not p.ended]


def progress(frame: int) -> str:
    return f"frame={frame}\nfps=24.0\nout_time_us=1\nprogress=continue\n"


class PureHelperTests(SynchronousTestCase):
    def test_output_format(self) -> None:
        """-f is rtsp for rtsp://, flv for rtmp://, mpegts otherwise, unless configured."""
        self.assertEqual(output_format_for("rtsp://localhost:8554/ES_MTX"), "rtsp")
        self.assertEqual(output_format_for("rtmp://x/live"), "flv")
        self.assertEqual(output_format_for("udp://127.0.0.1:9999"), "mpegts")
        self.assertEqual(output_format_for("/tmp/out.ts"), "mpegts")
        self.assertEqual(output_format_for("/tmp/out.mkv", "matroska"), "matroska")

    def test_build_test_argv(self) -> None:
        """test mode: one ffmpeg with settings, output and the preview output substituted."""
        cam = camera_config(pipeline="test", rtsp_url="udp://127.0.0.1:9000")
        (argv,) = build_argvs(cam, CameraSettings(brightness=0.5, contrast=1.5))
        self.assertEqual(argv[0], "ffmpeg")
        self.assertIn("eq=brightness=0.5:contrast=1.5", argv)
        i = argv.index("udp://127.0.0.1:9000")
        self.assertEqual(argv[i - 2 : i], ["-f", "mpegts"])
        self.assertEqual(argv[-1], "pipe:1")
        self.assertIn("select='not(mod(n,12))',scale=320:-2", argv)

    def test_build_libcamera_argv(self) -> None:
        """libcamera mode: the camera tool with every setting, then the encoder to RTSP."""
        cam = camera_config(pipeline="libcamera", camera_tool="libcamera-vid", preview_fps=0)
        camera, encoder = build_argvs(cam, CameraSettings(5000, 4, 2.3, 1.5, 1.2, -0.25))
        self.assertEqual(camera[0], "libcamera-vid")
        for flag, value in (
            ("--shutter", "5000"),
            ("--gain", "4"),
            ("--awbgains", "2.3,1.5"),
            ("--contrast", "1.2"),
            ("--brightness", "-0.25"),
        ):
            self.assertEqual(camera[camera.index(flag) + 1], value)
        self.assertEqual(encoder[-3:], ["-f", "rtsp", "rtsp://localhost:8554/ES_MTX"])
        self.assertEqual(build_argvs(camera_config(pipeline="off"), CameraSettings()), [])

    def test_progress_parser(self) -> None:
        """-progress blocks are parsed across arbitrary splits; other lines are kept (bounded)."""
        p = ProgressParser(keep=2)
        text = "[h264 @ 0x1] warning one\n" + progress(5) + "error two\r\n" + progress(9) + "third\n"
        blocks: list[dict[str, str]] = []
        lines: list[str] = []
        for i in range(0, len(text), 7):
            b, ln = p.feed(text[i : i + 7].encode())
            blocks += b
            lines += ln
        self.assertEqual([b["frame"] for b in blocks], ["5", "9"])
        self.assertEqual(lines, ["[h264 @ 0x1] warning one", "error two", "third"])
        self.assertEqual(list(p.lines), ["error two", "third"])
        p.feed(b"x" * 100000)
        self.assertLessEqual(len(p._buf), p.max_line)

    def test_jpeg_splitter(self) -> None:
        """JPEG images are split at FFD8..FFD9 across splits; junk skipped; oversize discarded."""
        a = b"\xff\xd8aaaa\xff\xd9"
        b = b"\xff\xd8bb\xff\x00bb\xff\xd9"
        s = JpegSplitter(max_frame=100)
        stream = b"junk" + a + b
        out = []
        for i in range(len(stream)):
            out += s.feed(stream[i : i + 1])
        self.assertEqual(out, [a, b])
        self.assertEqual(s.feed(b"\xff\xd8" + b"z" * 200), [])
        self.assertEqual(s.discarded, 1)
        self.assertEqual(s.feed(a), [a])


class SupervisorTests(SynchronousTestCase):
    """CameraPipeline with a fake process reactor."""

    def make(self, **camera: Any) -> tuple[CameraPipeline, FakeProcessReactor, list[dict[str, Any]]]:
        camera.setdefault("pipeline", "test")
        camera.setdefault("rtsp_url", "/tmp/x.ts")
        reactor = FakeProcessReactor()
        self.settings = CameraSettings()
        published: list[dict[str, Any]] = []
        p = CameraPipeline(
            camera_config(**camera),
            reactor,
            lambda: self.settings,
            published.append,
            which=lambda name: "/usr/bin/" + name,
        )
        p.startService()
        return p, reactor, published

    def test_start_running(self) -> None:
        """Start -> starting; frames on -progress -> running, fps measured; state published."""
        p, r, pub = self.make()
        (proc,) = r.procs
        self.assertEqual(p.state, "starting")
        self.assertEqual(proc.fds, {0: "w", 1: "r", 2: "r"})
        self.assertTrue(proc.stdin_closed)
        for i in range(1, 6):
            r.advance(0.5)
            proc.err(progress(12 * i))
        self.assertEqual(p.state, "running")
        self.assertAlmostEqual(p.fps, 24.0)
        self.assertEqual(p.status()["pid"], proc.pid)
        self.assertEqual([s["state"] for s in pub][:2], ["starting", "running"])

    def test_off(self) -> None:
        """pipeline off: nothing spawned, state off, stop is immediate."""
        p, r, pub = self.make(pipeline="off")
        self.assertEqual((r.procs, p.state), ([], "off"))
        d = p.stopService()
        self.assertIsNone(self.successResultOf(d))

    def test_backoff_doubles_and_resets(self) -> None:
        """Exits restart after 1, 2, 4, ... 60 s; a stable run (30 s) resets the delay to 1 s."""
        p, r, _ = self.make()
        delays = []
        for _ in range(9):
            r.procs[-1].end(1)
            self.assertEqual(p.state, "backoff")
            n = len(r.procs)
            waited = 0.0
            while len(r.procs) == n:
                r.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.assertEqual(p.restarts, 9)
        proc = r.procs[-1]
        for i in range(1, 70):
            r.advance(0.5)
            proc.err(progress(12 * i))
        proc.end(1)
        r.advance(1.0)
        self.assertEqual(len(r.live()), 1)
        self.assertIn("exited with code 1", p.last_error)

    def test_retry_policy_injected(self) -> None:
        """Restart delays come from retry_policy(attempt): attempts 0, 1, 2, ... and back to 0
        after a stable run; the default is backoffPolicy (1 s doubling to 60 s, no jitter)."""
        reactor = FakeProcessReactor()
        attempts: list[int] = []

        def policy(attempt: int) -> float:
            attempts.append(attempt)
            return 3.0

        p = CameraPipeline(
            camera_config(pipeline="test", rtsp_url="/tmp/x.ts"),
            reactor,
            CameraSettings,
            which=lambda name: "/usr/bin/" + name,
            retry_policy=policy,
        )
        p.startService()
        for _ in range(3):
            reactor.procs[-1].end(1)
            n = len(reactor.procs)
            reactor.advance(2.9)
            self.assertEqual(len(reactor.procs), n)
            reactor.advance(0.1)
            self.assertEqual(len(reactor.procs), n + 1)
        reactor.advance(p.stable_after)
        reactor.procs[-1].end(1)
        self.assertEqual(attempts, [0, 1, 2, 0])
        default, _, _ = self.make()
        self.assertEqual([default.retry_policy(a) for a in (0, 1, 5, 6, 20)], [1.0, 2.0, 32.0, 60.0, 60.0])

    def test_stall(self) -> None:
        """No new frames for stall_timeout -> stalled, SIGTERM, SIGKILL after the grace period, then
        a backoff restart."""
        p, r, _ = self.make(stall_timeout=3.0)
        proc = r.procs[0]
        proc.err(progress(10))
        r.advance(2.0)
        proc.err(progress(10))  # the same count is not progress
        r.advance(1.0)
        self.assertEqual(p.state, "stalled")
        self.assertIn("stalled", p.last_error)
        self.assertEqual(proc.signals, ["TERM"])
        r.advance(p.stop_grace)
        self.assertEqual(proc.signals, ["TERM", "KILL"])
        proc.end(None, signal.SIGKILL)
        self.assertEqual(p.state, "backoff")
        r.advance(1.0)
        self.assertEqual(len(r.live()), 1)

    def test_settings_restart_debounced(self) -> None:
        """Three restart requests within 0.3 s -> one restart 0.5 s after the last, with the new
        settings in the argv; not counted as a failure restart."""
        p, r, _ = self.make()
        old = r.procs[0]
        for _ in range(3):
            p.request_restart()
            r.advance(0.1)
        self.settings = CameraSettings(brightness=-0.5)
        self.assertEqual(old.signals, [])
        r.advance(0.4)
        self.assertEqual(old.signals, ["TERM"])
        old.end(255)
        self.assertEqual(len(r.procs), 2)
        self.assertIn("eq=brightness=-0.5:contrast=1", r.procs[1].argv)
        self.assertEqual(p.restarts, 0)
        self.settings = CameraSettings(brightness=-0.5, gain=8)  # not in the test-mode argv
        p.request_restart()
        r.advance(1.0)
        self.assertEqual((len(r.procs), r.procs[1].signals), (2, []))

    def test_stop_waits_for_reaping(self) -> None:
        """stopService: SIGTERM, SIGKILL after the grace period, Deferred fires only once every child
        is reaped; nothing restarts afterwards."""
        p, r, _ = self.make(pipeline="libcamera")
        cam, enc = r.procs
        d = p.stopService()
        self.assertEqual((cam.signals, enc.signals), (["TERM"], ["TERM"]))
        self.assertNoResult(d)
        enc.end(None, signal.SIGTERM)
        self.assertNoResult(d)
        r.advance(p.stop_grace)
        self.assertEqual(cam.signals, ["TERM", "KILL"])
        cam.end(None, signal.SIGKILL)
        self.successResultOf(d)
        self.assertEqual(p.state, "stopped")
        r.advance(120)
        self.assertEqual(len(r.procs), 2)

    def test_chain_plumbing(self) -> None:
        """libcamera mode: camera stdout -> os.pipe -> ffmpeg stdin; the parent keeps neither end;
        when one process exits the other is terminated and the chain restarts."""
        p, r, _ = self.make(pipeline="libcamera")
        cam, enc = r.procs
        self.assertEqual(cam.argv[0], "rpicam-vid")
        self.assertEqual((cam.fds[0], cam.fds[2], enc.fds[1], enc.fds[2]), ("w", "r", "r", "r"))
        w, rd = cam.fds[1], enc.fds[0]
        self.assertIsInstance(w, int)
        for fd in (w, rd):
            self.assertRaises(OSError, os.fstat, fd)
        cam.err("ERROR: *** no cameras available ***\n")
        cam.end(255)
        self.assertIn("no cameras available", p.last_error)
        self.assertEqual(enc.signals, ["TERM"])
        enc.end(None, signal.SIGPIPE)
        r.advance(1.0)
        self.assertEqual(len(r.live()), 2)

    def test_missing_command(self) -> None:
        """A missing executable is a clear last_error and a backoff, not a crash."""
        reactor = FakeProcessReactor()
        p = CameraPipeline(camera_config(pipeline="libcamera"), reactor, CameraSettings, which=lambda n: None)
        p.startService()
        self.assertEqual(p.state, "backoff")
        self.assertIn("rpicam-vid: command not found", p.last_error)
        reactor.fail_spawn = OSError(2, "No such file")
        p.which = lambda n: "/bin/" + n
        reactor.advance(1.0)
        self.assertEqual(p.state, "backoff")
        self.assertIn("cannot start", p.last_error)


class SettingsStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = self.dir / "camera_settings.json"

    def test_missing_file(self) -> None:
        """No file -> defaults, and the defaults are written (six keys, original units)."""
        store = CameraSettingsStore(self.path)
        store.startService()
        self.assertEqual(store.settings, CameraSettings())
        self.assertEqual(
            orjson.loads(self.path.read_bytes()),
            {
                "shutter": 10000,
                "gain": 1,
                "awb_red": 1.0,
                "awb_blue": 1.0,
                "contrast": 1.0,
                "brightness": 0.0,
            },
        )

    def test_valid_file(self) -> None:
        """A valid file (e.g. the original's config/camera_settings.json) is loaded."""
        self.path.write_text(
            '{"shutter": 8000, "gain": 1, "awb_red": 1.0, "awb_blue": 1.0, '
            '"contrast": 1.0, "brightness": 0.0}'
        )
        store = CameraSettingsStore(self.path)
        store.load()
        self.assertEqual(store.settings.shutter, 8000)
        self.path.write_text(
            '{"shutter": 5000, "gain": 3, "awb_red": 2.5, "awb_blue": 0.7, '
            '"contrast": 1.8, "brightness": -0.2}'
        )
        self.assertEqual(store.load(), CameraSettings(5000, 3, 2.5, 0.7, 1.8, -0.2))

    def test_corrupt_files(self) -> None:
        """Invalid JSON, wrong shapes and out-of-range values: error logged, defaults, file rewritten."""
        for content in (
            b"{not json",
            b"[]",
            b'{"gain": 2}',
            b'{"shutter": 1, "gain": 1, "awb_red": 1, "awb_blue": 1, "contrast": 1, "brightness": 0}',
            b"\xff\xfe",
            b"",
        ):
            self.path.write_bytes(content)
            store = CameraSettingsStore(self.path)
            with capturedLogs() as events:
                store.startService()
            self.assertEqual(store.settings, CameraSettings(), content)
            self.assertTrue(any(e["log_level"].name == "error" for e in events), content)
            self.assertEqual(orjson.loads(self.path.read_bytes()), CameraSettings().as_dict())

    def test_atomic_save(self) -> None:
        """save() replaces the file in one rename and leaves no temporary file behind."""
        store = CameraSettingsStore(self.path)
        store.load()
        inode = self.path.stat().st_ino
        self.assertTrue(store.save(CameraSettings(gain=5)))
        self.assertNotEqual(self.path.stat().st_ino, inode)
        self.assertEqual(sorted(os.listdir(self.dir)), ["camera_settings.json"])
        self.assertEqual(orjson.loads(self.path.read_bytes())["gain"], 5)

    def test_unwritable(self) -> None:
        """An unwritable state directory is logged; the settings still apply in memory."""
        blocker = self.dir / "file"
        blocker.write_text("x")
        store = CameraSettingsStore(blocker / "camera_settings.json")
        with capturedLogs() as events:
            store.startService()
            self.assertFalse(store.save(CameraSettings(gain=2)))
        self.assertEqual(store.settings.gain, 2)
        self.assertTrue(any(e["log_level"].name == "error" for e in events))


class PreviewStopTests(SynchronousTestCase):
    def test_stop_finishes_preview_viewers(self) -> None:
        """Stopping the camera service finishes every open preview viewer (close_all's caller)."""
        state = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, state, True)
        base = {"data_listen": "none", "settings_listen": "none", "auth_listen": "none", "password": "x"}
        config = load_config(environ={}, overrides={"hub": {"state_dir": state}, "camera": base})
        svc = make_camera_service(config, FakeHub(config), Clock())
        preview = camera_resources(svc)["camera/preview.mjpg"]
        finished: list[str] = []

        class Viewer:
            def finish(self, request_gone: bool = False) -> None:
                finished.append("viewer")
                preview.viewers.discard(self)  # type: ignore[attr-defined]

        svc.startService()
        preview.viewers.add(Viewer())  # type: ignore[attr-defined]
        self.successResultOf(svc.stopService())
        self.assertEqual((finished, preview.viewers), (["viewer"], set()))  # type: ignore[attr-defined]


# --- end to end with Debian's ffmpeg ----------------------------------------------------------------


class FakeHub:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.published: list[tuple[str, str, dict[str, Any]]] = []

        class Stats:
            def error(self, code: str) -> None:
                pass

            def drop(self, reason: str, count: int = 1) -> None:
                pass

            def count_in(self, mtype: str, nbytes: int = 0) -> None:
                pass

            def count_out(self, mtype: str, nbytes: int = 0) -> None:
                pass

            def connection(self, face: str, delta: int) -> None:
                pass

        self.stats = Stats()
        self.registry = None

    def publish_local(self, device_id: str, type: str, body: dict[str, Any], *, face: str, role: str) -> None:
        self.published.append((device_id, type, body))


def wait_for(pipeline: CameraPipeline, predicate: Callable[[], bool]) -> Deferred[None]:
    """Fires when ``predicate()`` holds after a pipeline change (bounded by the test timeout)."""
    d: Deferred[None] = Deferred()

    def check() -> None:
        if not d.called and predicate():
            pipeline.change_listeners.remove(check)
            d.callback(None)

    pipeline.change_listeners.append(check)
    check()
    return d


def size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@inlineCallbacks
def ffprobe(path: str) -> Any:
    out, err, code = yield getProcessOutputAndValue(
        FFPROBE,
        [
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height",
            "-of",
            "json",
            path,
        ],
        env=os.environ,
    )
    return orjson.loads(out)["streams"][0] if code == 0 else {"error": err.decode()}


@inlineCallbacks
def probe_when_ready(p: CameraPipeline, path: str) -> Any:
    """ffprobe ``path`` once ffmpeg has flushed some of it; retry after more frames (ffmpeg writes
    files in 32 KiB blocks)."""
    while True:
        frames = p.frames
        yield wait_for(p, lambda f=frames: p.frames >= f + 12 and size(path) > 0)  # type: ignore[misc]
        stream = yield ffprobe(path)
        if "error" not in stream:
            return stream


class EndToEndTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        require(FFMPEG and FFPROBE, "ffmpeg/ffprobe not installed (apt-get install ffmpeg)")
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def start(self, **camera: Any) -> Any:
        base = {"data_listen": "none", "settings_listen": "none", "auth_listen": "none", "password": "x"}
        base.update(camera)
        config = load_config(environ={}, overrides={"hub": {"state_dir": self.dir}, "camera": base})
        svc = make_camera_service(config, FakeHub(config), global_reactor)
        svc.startService()
        self.pids: set[int] = set()
        svc.pipeline.change_listeners.append(lambda: self.pids.update(svc.pipeline.pids))

        def stop() -> Any:
            d = svc.stopService()
            d.addCallback(lambda _: self.assertEqual([p for p in self.pids if alive(p)], []))
            return d

        self.addCleanup(stop)
        return svc

    @inlineCallbacks
    def test_test_mode(self) -> Any:
        """test mode: a real H.264 stream (ffprobe), preview JPEGs, a settings update restarts it
        with the new values in its argv, killing ffmpeg restarts it, stopping leaves no child."""
        out = os.path.join(self.dir, "out.ts")
        svc = self.start(pipeline="test", rtsp_url=out, stall_timeout=10)
        p = svc.pipeline
        stream = yield probe_when_ready(p, out)
        self.assertEqual(stream, {"codec_name": "h264", "width": 640, "height": 480})
        jpegs: list[bytes] = []
        got_jpeg: Deferred[None] = Deferred()

        def on_jpeg(jpeg: bytes) -> None:
            jpegs.append(jpeg)
            if not got_jpeg.called:
                got_jpeg.callback(None)

        p.preview_listeners.add(on_jpeg)
        yield got_jpeg
        self.assertEqual(jpegs[0][:2], b"\xff\xd8")
        p.preview_listeners.discard(on_jpeg)

        first_pid = p.status()["pid"]
        svc.update_settings({"brightness": 0.5, "contrast": 1.5})
        yield wait_for(p, lambda: p.status()["pid"] not in (None, first_pid) and p.state == "running")
        self.assertIn("eq=brightness=0.498039:contrast=1.5", p.argvs[0])
        self.assertFalse(alive(first_pid))
        self.assertEqual(p.restarts, 0)

        second_pid = p.status()["pid"]
        os.kill(second_pid, signal.SIGKILL)
        yield wait_for(p, lambda: p.restarts == 1 and p.state == "running")
        self.assertIn("killed by signal SIGKILL", p.last_error)
        self.assertNotEqual(p.status()["pid"], second_pid)
        states = [b["state"] for _, t, b in svc.hub.published if t == "camera_state"]
        self.assertIn("backoff", states)

        yield svc.stopService()
        self.assertEqual(p.state, "stopped")
        self.assertEqual([pid for pid in self.pids if alive(pid)], [])

    @inlineCallbacks
    def test_two_process_chain(self) -> Any:
        """libcamera mode with ffmpeg standing in for the camera tool: the os.pipe chain carries
        H.264 into the encoder, which writes the stream and preview; killing the camera process
        brings both down and back up; stopping reaps both."""
        out = os.path.join(self.dir, "chain.ts")
        fake_camera = [
            "{camera_tool}",
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=640x480:rate=24",
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            "12",
            "-f",
            "h264",
            "-",
        ]
        svc = self.start(pipeline="libcamera", camera_tool=FFMPEG, camera_argv=fake_camera, rtsp_url=out)
        p = svc.pipeline
        yield wait_for(p, lambda: p.state == "running" and p.last_jpeg is not None)
        self.assertEqual(len(p.pids), 2)
        stream = yield probe_when_ready(p, out)
        self.assertEqual(stream, {"codec_name": "h264", "width": 640, "height": 480})
        cam_pid, enc_pid = p.pids
        os.kill(cam_pid, signal.SIGKILL)
        yield wait_for(p, lambda: p.restarts == 1 and p.state == "running")
        self.assertFalse(alive(cam_pid))
        self.assertFalse(alive(enc_pid))
        self.assertEqual(len(p.pids), 2)

    @inlineCallbacks
    def test_preview_http(self) -> Any:
        """GET /camera/preview.mjpg streams multipart JPEG parts; while the HTTP transport is paused
        frames are dropped, not buffered; after resuming they flow again."""
        svc = self.start(pipeline="test", rtsp_url=os.path.join(self.dir, "p.ts"), preview_fps=6)
        p = svc.pipeline
        yield wait_for(p, lambda: p.state == "running")
        root = Resource()
        cam = Resource()
        root.putChild(b"camera", cam)
        cam.putChild(b"preview.mjpg", camera_resources(svc)["camera/preview.mjpg"])
        site = Site(root)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /camera/preview.mjpg HTTP/1.1\r\nHost: hub\r\n\r\n")
        frames: list[bytes] = []
        p.preview_listeners.add(frames.append)

        def frames_seen(n: int) -> Deferred[None]:
            d: Deferred[None] = Deferred()

            def check(_: bytes) -> None:
                if len(frames) >= n and not d.called:
                    p.preview_listeners.discard(check)
                    d.callback(None)

            p.preview_listeners.add(check)
            return d

        yield frames_seen(2)
        head = transport.value()
        self.assertIn(b"multipart/x-mixed-replace; boundary=robonetframe", head)
        self.assertIn(b"Content-Type: image/jpeg", head)
        self.assertIn(b"\xff\xd8", head)
        producer = transport.producer
        assert producer is not None
        producer.pauseProducing()
        size = len(transport.value())
        yield frames_seen(len(frames) + 3)
        self.assertEqual(len(transport.value()), size)
        producer.resumeProducing()
        yield frames_seen(len(frames) + 2)
        self.assertGreater(len(transport.value()), size)
        p.preview_listeners.discard(frames.append)
        channel.connectionLost(Failure(ConnectionError()))
        self.assertEqual(p.preview_listeners, set())
