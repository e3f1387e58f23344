"""The camera pipeline supervisor (spec/camera.md, "Camera pipeline"): the process chain
(``rpicam-vid | ffmpeg`` in ``libcamera`` mode, one ``ffmpeg`` testsrc process in ``test`` mode),
its argv templates, ffmpeg ``-progress`` and MJPEG parsing, and the :class:`CameraPipeline` service
that starts, watches, restarts (``twisted.application.internet.backoffPolicy``) and stops it.

Pipeline plumbing: in ``libcamera`` mode the camera tool and ffmpeg are two processes joined by an
``os.pipe()``: the write end becomes the camera's fd 1 and the read end ffmpeg's fd 0 (passed with
``childFDs``), and the daemon closes both ends after spawning, so H.264 never passes through Python
and either process sees EOF/SIGPIPE when the other dies. ffmpeg's ``-progress pipe:2`` key=value
output on stderr gives the frame count; its optional second output (``preview_argv``) writes MJPEG
frames to its stdout, which the supervisor reads for the web preview.

Split out of :mod:`robonet.services.camera` (settings, password, ports), which builds one
:class:`CameraPipeline` per camera service.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet.config import CameraConfig, ConfigError
from robonet.protocols.camera import CameraSettings

FRAME_RATE = 24  # the chain's frame rate (camera_argv --framerate); used for {preview_every}
PLACEHOLDERS = (
    "shutter",
    "gain",
    "awb_red",
    "awb_blue",
    "contrast",
    "brightness",
    "rtsp_url",
    "camera_tool",
    "output_format",
    "preview_fps",
    "preview_every",
)


# --- small pure helpers ---------------------------------------------------------------------------


def output_format_for(url: str, configured: str = "") -> str:
    """ffmpeg's ``-f`` for the output ``url``: ``configured`` if set, ``rtsp`` for rtsp(s)://,
    ``flv`` for rtmp(s)://, otherwise ``mpegts`` (udp://, tcp://, srt://, file paths)."""
    if configured:
        return configured
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("rtsp", "rtsps"):
        return "rtsp"
    if scheme in ("rtmp", "rtmps"):
        return "flv"
    return "mpegts"


def _fmt(v: float) -> str:
    return f"{v:g}"


def template_values(camera: CameraConfig, settings: CameraSettings) -> dict[str, str]:
    """The substitution values for the argv templates (see :data:`PLACEHOLDERS`)."""
    fps = camera.preview_fps
    return {
        "shutter": str(int(settings.shutter)),
        "gain": str(int(settings.gain)),
        "awb_red": _fmt(settings.awb_red),
        "awb_blue": _fmt(settings.awb_blue),
        "contrast": _fmt(settings.contrast),
        "brightness": _fmt(settings.brightness),
        "rtsp_url": camera.rtsp_url,
        "camera_tool": camera.camera_tool,
        "output_format": output_format_for(camera.rtsp_url, camera.output_format),
        "preview_fps": _fmt(fps),
        "preview_every": str(max(1, round(FRAME_RATE / fps))) if fps > 0 else "1",
    }


def build_argvs(camera: CameraConfig, settings: CameraSettings) -> list[list[str]]:
    """The process chain for ``camera.pipeline``: ``[]`` (off), ``[test]`` or ``[camera, encoder]``.

    The preview output (``preview_argv``) is appended to the last process when ``preview_fps > 0``.
    Raises ``KeyError``/``ValueError``/``IndexError`` for a template with an unknown placeholder.
    """
    if camera.pipeline == "off":
        return []
    values = template_values(camera, settings)
    templates = [camera.test_argv] if camera.pipeline == "test" else [camera.camera_argv, camera.encoder_argv]
    argvs = [[part.format_map(values) for part in t] for t in templates]
    if camera.preview_fps > 0:
        argvs[-1].extend(part.format_map(values) for part in camera.preview_argv)
    return argvs


def check_camera_config(camera: CameraConfig) -> None:
    """Validate what the config checker cannot: templates and ``data_source``. Raises ConfigError."""
    for key in ("camera_argv", "encoder_argv", "test_argv", "preview_argv"):
        argv = getattr(camera, key)
        try:
            for part in argv:
                part.format_map(template_values(camera, CameraSettings()))
        except (KeyError, ValueError, IndexError) as e:
            names = ", ".join(PLACEHOLDERS)
            raise ConfigError(f"camera.{key}", f"bad template {e}; placeholders: {names}") from None
        if key != "preview_argv" and not argv:
            raise ConfigError(f"camera.{key}", "expected a non-empty list")
    src = camera.data_source
    if src != "random" and ("." not in src or src.startswith(".") or src.endswith(".")):
        raise ConfigError("camera.data_source", f"expected 'random' or '<device_id>.<field>', got {src!r}")


class ProgressParser:
    """Split ffmpeg stderr into ``-progress`` blocks and log lines (bounded).

    :meth:`feed` returns the completed progress blocks (``{"frame": "70", "fps": "23.9", ...,
    "progress": "continue"}``) and the other lines; :attr:`lines` keeps the last ``keep`` of those.
    """

    def __init__(self, keep: int = 8, max_line: int = 4096) -> None:
        self._buf = b""
        self._block: dict[str, str] = {}
        self.lines: deque[str] = deque(maxlen=keep)
        self.max_line = max_line

    def feed(self, data: bytes) -> tuple[list[dict[str, str]], list[str]]:
        """Add stderr bytes; return ``(progress blocks, log lines)`` they completed."""
        buf = self._buf + data
        *complete, rest = buf.replace(b"\r", b"\n").split(b"\n")
        if len(rest) > self.max_line:
            complete.append(rest[: self.max_line])
            rest = b""
        self._buf = rest
        blocks = []
        lines = []
        for raw in complete:
            line = raw[: self.max_line].decode("utf-8", "replace").strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if sep and key and " " not in key and "[" not in key:
                self._block[key] = value.strip()
                if key == "progress":
                    blocks.append(self._block)
                    self._block = {}
            else:
                self.lines.append(line)
                lines.append(line)
        return blocks, lines


class JpegSplitter:
    """Split a concatenation of JPEG images (ffmpeg ``image2pipe``) at SOI (FFD8) / EOI (FFD9).

    Holds at most ``max_frame`` bytes; a frame larger than that is discarded.
    """

    def __init__(self, max_frame: int = 2 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        self.discarded = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the complete JPEG images found."""
        buf = self._buf
        buf += data
        frames = []
        while True:
            start = buf.find(b"\xff\xd8")
            if start < 0:
                del buf[: max(0, len(buf) - 1)]
                break
            if start:
                del buf[:start]
            end = buf.find(b"\xff\xd9", 2)
            if end < 0:
                break
            frames.append(bytes(buf[: end + 2]))
            del buf[: end + 2]
        if len(buf) > self.max_frame:
            self.discarded += 1
            buf.clear()
        return frames


# --- pipeline supervisor --------------------------------------------------------------------------


class _Child(ProcessProtocol):
    """One process of the chain; forwards output to the pipeline and fires ``ended`` when reaped."""

    def __init__(self, pipeline: CameraPipeline, chain: _Chain, name: str, last: bool) -> None:
        self.pipeline = pipeline
        self.chain = chain
        self.name = name
        self.last = last
        self.pid: int | None = None
        self.alive = True
        self.progress = ProgressParser()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        self.pipeline._stdout(self, data)

    def errReceived(self, data: bytes) -> None:
        self.pipeline._stderr(self, data)

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        self.reason = reason
        self.pipeline._ended(self)

    def signal(self, name: str) -> None:
        """Send SIGTERM/SIGKILL ("TERM"/"KILL") if the process is still running."""
        if self.alive and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except ierror.ProcessExitedAlready:
                pass

    def describe_exit(self) -> str:
        """``"ffmpeg exited with code 1: <last stderr line>"`` and similar."""
        value = self.reason.value if self.reason is not None else None
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if sig:
            name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
            text = f"{self.name} killed by signal {name}"
        else:
            text = f"{self.name} exited with code {code}"
        if self.progress.lines:
            text += ": " + self.progress.lines[-1]
        return text


class _Chain:
    """One run of the process chain. ``after`` is what to do once every child is reaped:
    ``backoff`` (failed/stalled), ``restart`` (settings changed) or ``stop``."""

    def __init__(self, started_at: float) -> None:
        self.children: list[_Child] = []
        self.started_at = started_at
        self.ended_at: float | None = None
        self.after = ""
        self.terminating = False
        self.kill_timer: DelayedCall | None = None
        self.waiters: list[Deferred[None]] = []

    @property
    def finished(self) -> bool:
        return not any(c.alive for c in self.children)

    def when_finished(self) -> Deferred[None]:
        if self.finished:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d


class CameraPipeline(Service):
    """Supervises the camera process chain (spec/camera.md, "Camera pipeline").

    ``pipeline`` off -> nothing runs (state ``off``). Otherwise the chain from :func:`build_argvs`
    runs with the settings from ``settings()``; it is restarted (debounced by ``restart_debounce``
    seconds) by :meth:`request_restart`, and when any process exits or no new frame is reported
    for ``stall_timeout`` seconds, after ``retry_policy(attempt)`` seconds (attempt 0, 1, 2, ...;
    back to 0 after a run of ``stable_after`` seconds). The default policy is Twisted's
    ``backoffPolicy``: ``initial_backoff`` doubling to ``max_backoff``, without jitter (one local
    camera has no thundering herd to spread). ``stopService`` sends SIGTERM, then SIGKILL after
    ``stop_grace`` seconds, and its Deferred fires once every child is reaped.

    State (``off|starting|running|backoff|stalled|stopped``), restarts (failure restarts only), fps
    (measured from ``-progress`` frame counts), frames, last_error and pid are in :meth:`status` and
    are published with ``publish(status)`` on every state change and every ``report_interval``
    seconds while running. Preview JPEGs go to the callables in :attr:`preview_listeners`; the
    callables in :attr:`change_listeners` are called after every state change and new frame count.
    """

    log = Logger()
    name = "camera-pipeline"

    initial_backoff = 1.0
    max_backoff = 60.0
    stable_after = 30.0
    stop_grace = 5.0
    restart_debounce = 0.5
    report_interval = 10.0

    def __init__(
        self,
        camera: CameraConfig,
        reactor: Any,
        settings: Callable[[], CameraSettings],
        publish: Callable[[dict[str, Any]], None] = lambda status: None,
        which: Callable[[str], str | None] = shutil.which,
        retry_policy: Callable[[int], float] | None = None,
    ) -> None:
        self.camera = camera
        self.reactor = reactor
        self.settings = settings
        self.publish = publish
        self.which = which
        self.mode = camera.pipeline
        self.state = "off" if self.mode == "off" else "stopped"
        self.restarts = 0
        self.fps = 0.0
        self.frames = 0
        self.last_error = ""
        self.argvs: list[list[str]] = []
        self.chain: _Chain | None = None
        self.preview_listeners: set[Callable[[bytes], None]] = set()
        self.change_listeners: list[Callable[[], None]] = []
        self.last_jpeg: bytes | None = None
        self._jpeg = JpegSplitter()
        self.retry_policy = retry_policy or backoffPolicy(
            initialDelay=self.initial_backoff, maxDelay=self.max_backoff, factor=2.0, jitter=lambda: 0.0
        )
        self._attempt = 0  # failure restarts since the last stable run
        self._backoff_timer: DelayedCall | None = None
        self._debounce_timer: DelayedCall | None = None
        self._stall_timer: DelayedCall | None = None
        self._report_timer: DelayedCall | None = None
        self._last_frame_at = 0.0
        self._fps_mark: tuple[float, int] | None = None

    # -- status -----------------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """PIDs of the running chain's live processes (camera first)."""
        if self.chain is None:
            return []
        return [c.pid for c in self.chain.children if c.alive and c.pid is not None]

    @property
    def preview_enabled(self) -> bool:
        """True if the running pipeline is configured to produce preview JPEGs."""
        return self.mode != "off" and self.camera.preview_fps > 0

    def status(self) -> dict[str, Any]:
        """``{"pipeline","state","restarts","fps","frames","last_error","pid","pids"}``."""
        pids = self.pids
        return {
            "pipeline": self.mode,
            "state": self.state,
            "restarts": self.restarts,
            "fps": round(self.fps, 2),
            "frames": self.frames,
            "last_error": self.last_error,
            "pid": pids[0] if pids else None,
            "pids": pids,
        }

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.log.info("camera pipeline: {state}", state=state)
            self._publish()

    def _publish(self) -> None:
        try:
            self.publish(self.status())
        except Exception:
            self.log.failure("camera pipeline: publishing the state failed")
        self._changed()

    def _changed(self) -> None:
        for listener in list(self.change_listeners):
            try:
                listener()
            except Exception:
                self.log.failure("camera pipeline: change listener failed")

    # -- service ----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.mode == "off":
            self.state = "off"  # not published: a hub without a camera gets no "camera" device
            return
        self._spawn()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for name in ("_backoff_timer", "_debounce_timer", "_stall_timer", "_report_timer"):
            self._cancel(name)
        chain = self.chain
        if chain is None or chain.finished:
            if self.mode != "off":
                self._set_state("stopped")
            return succeed(None)
        chain.after = "stop"
        d = self._terminate(chain)
        d.addCallback(lambda _: self._set_state("stopped"))
        return d

    def _cancel(self, attr: str) -> None:
        timer = getattr(self, attr)
        if timer is not None and timer.active():
            timer.cancel()
        setattr(self, attr, None)

    # -- starting ---------------------------------------------------------------------------------

    def _spawn(self) -> None:
        self._cancel("_backoff_timer")
        now = self.reactor.seconds()
        chain = self.chain = _Chain(now)
        self.frames = 0
        self.fps = 0.0
        self._fps_mark = None
        self._jpeg = JpegSplitter()
        self._last_frame_at = now
        try:
            argvs = self.argvs = build_argvs(self.camera, self.settings())
        except (KeyError, ValueError, IndexError) as e:
            self._fail_to_start(chain, f"bad argv template: {e}")
            return
        for argv in argvs:
            if self.which(argv[0]) is None:
                self._fail_to_start(chain, f"{argv[0]}: command not found")
                return
        fds: list[int] = []
        try:
            if len(argvs) == 1:
                self._spawn_one(chain, argvs[0], {0: "w", 1: "r", 2: "r"}, last=True)
            else:
                r, w = os.pipe()
                fds = [r, w]
                self._spawn_one(chain, argvs[0], {0: "w", 1: w, 2: "r"}, last=False)
                self._spawn_one(chain, argvs[1], {0: r, 1: "r", 2: "r"}, last=True)
        except OSError as e:
            self._fail_to_start(chain, f"cannot start {argvs[len(chain.children)][0]}: {e}")
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.log.info(
            "camera pipeline: started {argv} (pids {pids})",
            argv=" | ".join(" ".join(a) for a in argvs),
            pids=self.pids,
        )
        if self.state == "starting":
            self._publish()  # new pids
        self._set_state("starting")
        self._stall_timer = self.reactor.callLater(self.camera.stall_timeout, self._check_stall)
        if self._report_timer is None or not self._report_timer.active():
            self._report_timer = self.reactor.callLater(self.report_interval, self._report)

    def _spawn_one(self, chain: _Chain, argv: list[str], fds: dict[int, Any], last: bool) -> None:
        child = _Child(self, chain, os.path.basename(argv[0]), last)
        self.reactor.spawnProcess(child, argv[0], argv, env=None, childFDs=fds)
        chain.children.append(child)
        child.transport.closeStdin()  # type: ignore[union-attr]

    def _fail_to_start(self, chain: _Chain, message: str) -> None:
        self.last_error = message
        self.log.error("camera pipeline: {error}", error=message)
        chain.after = "backoff"
        if chain.finished:
            self._chain_finished(chain)
        else:
            self._terminate(chain)

    # -- running ----------------------------------------------------------------------------------

    def _stdout(self, child: _Child, data: bytes) -> None:
        if not child.last or child.chain is not self.chain:
            return
        for frame in self._jpeg.feed(data):
            self.last_jpeg = frame
            for listener in list(self.preview_listeners):
                try:
                    listener(frame)
                except Exception:
                    self.log.failure("camera preview listener failed")

    def _stderr(self, child: _Child, data: bytes) -> None:
        blocks, lines = child.progress.feed(data)
        for line in lines:
            self.log.debug("camera pipeline: {name}: {line}", name=child.name, line=line)
        if child.last and child.chain is self.chain:
            for block in blocks:
                self._progress(block)

    def _progress(self, block: dict[str, str]) -> None:
        try:
            frame = int(block.get("frame", "0"))
        except ValueError:
            return
        now = self.reactor.seconds()
        if frame > self.frames:
            self._last_frame_at = now
            if self._fps_mark is None:
                self._fps_mark = (now, frame)
            else:
                t0, f0 = self._fps_mark
                if now - t0 >= 1.0:
                    self.fps = (frame - f0) / (now - t0)
                    self._fps_mark = (now, frame)
            self.frames = frame
            if self.state in ("starting", "stalled"):
                self._set_state("running")
            else:
                self._changed()

    def _check_stall(self) -> None:
        self._stall_timer = None
        chain = self.chain
        if chain is None or chain.terminating or chain.finished or not self.running:
            return
        now = self.reactor.seconds()
        idle = now - self._last_frame_at
        if idle < self.camera.stall_timeout:
            self._stall_timer = self.reactor.callLater(self.camera.stall_timeout - idle, self._check_stall)
            return
        self.last_error = f"stalled: no new frames for {idle:.0f} s"
        lines = chain.children[-1].progress.lines if chain.children else ()
        if lines:
            self.last_error += f" ({lines[-1]})"
        self.log.warn("camera pipeline: {error}; restarting", error=self.last_error)
        self.fps = 0.0
        chain.after = "backoff"
        self._set_state("stalled")
        self._terminate(chain)

    def _report(self) -> None:
        self._report_timer = None
        if not self.running:
            return
        if self.state == "running":
            self._publish()
        self._report_timer = self.reactor.callLater(self.report_interval, self._report)

    # -- stopping and restarting ------------------------------------------------------------------

    def _terminate(self, chain: _Chain) -> Deferred[None]:
        """SIGTERM every live child now, SIGKILL after ``stop_grace``; fires when all are reaped."""
        if not chain.terminating:
            chain.terminating = True
            for child in chain.children:
                child.signal("TERM")
            if not chain.finished:
                chain.kill_timer = self.reactor.callLater(self.stop_grace, self._kill, chain)
        return chain.when_finished()

    def _kill(self, chain: _Chain) -> None:
        chain.kill_timer = None
        for child in chain.children:
            if child.alive:
                self.log.warn("camera pipeline: {name} ignored SIGTERM; sending SIGKILL", name=child.name)
                child.signal("KILL")

    def _ended(self, child: _Child) -> None:
        chain = child.chain
        self.log.info("camera pipeline: {what}", what=child.describe_exit())
        if not chain.terminating:
            # an unexpected exit: the whole chain goes down and comes back after a backoff delay
            self.last_error = child.describe_exit()
            chain.after = chain.after or "backoff"
            self.fps = 0.0
            self._terminate(chain)
        if chain.finished:
            self._chain_finished(chain)

    def _chain_finished(self, chain: _Chain) -> None:
        if chain.ended_at is not None:
            return
        chain.ended_at = self.reactor.seconds()
        if chain.kill_timer is not None and chain.kill_timer.active():
            chain.kill_timer.cancel()
        if chain is self.chain:
            self._cancel("_stall_timer")
        if chain is self.chain:
            self.last_jpeg = None
        waiters, chain.waiters = chain.waiters, []
        for d in waiters:
            d.callback(None)
        if chain is not self.chain or not self.running or chain.after == "stop":
            return
        if chain.after == "restart":
            self._spawn()
            return
        if chain.ended_at - chain.started_at >= self.stable_after:
            self._attempt = 0
        delay = self.retry_policy(self._attempt)
        self._attempt += 1
        self.log.info("camera pipeline: restarting in {delay:g} s", delay=delay)
        self._set_state("backoff")
        self._backoff_timer = self.reactor.callLater(delay, self._restart_after_backoff)

    def _restart_after_backoff(self) -> None:
        self._backoff_timer = None
        if self.running:
            self.restarts += 1
            self._spawn()

    def request_restart(self) -> None:
        """Restart the chain with the current settings, ``restart_debounce`` seconds after the last
        call (a burst of settings updates causes one restart). No-op when the pipeline is off or
        the new settings do not change any argv (a chain in backoff is started at once)."""
        if self.mode == "off" or not self.running:
            return
        self._cancel("_debounce_timer")
        self._debounce_timer = self.reactor.callLater(self.restart_debounce, self._debounced_restart)

    def _debounced_restart(self) -> None:
        self._debounce_timer = None
        if not self.running:
            return
        chain = self.chain
        if chain is not None and not chain.finished:
            try:
                unchanged = build_argvs(self.camera, self.settings()) == self.argvs
            except (KeyError, ValueError, IndexError):
                unchanged = False
            if unchanged:
                return  # e.g. gain in test mode: nothing in the argv depends on it
            chain.after = "restart"
            self._terminate(chain)
        else:
            self._spawn()
