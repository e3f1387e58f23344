"""The MCAP recorder (robonet/services/recorder.py, robonet/mcapio.py; issue 10 item 2)."""

from __future__ import annotations

import io
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
from mcap.reader import make_reader
from twisted.internet import defer, error, protocol, task
from twisted.internet import reactor as _reactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from robonet import mcapio
from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Command, HubError, Message
from robonet.services.recorder import Recorder, RecordingFiles, recording_name

reactor: Any = _reactor
CRASH_WRITER = Path(__file__).resolve().parent / "recorder_crash_writer.py"
REPO_ROOT = Path(__file__).resolve().parent.parent
T0 = 1_764_800_000.25


def sync_thread(fn: Any, *args: Any) -> defer.Deferred[Any]:
    """Run the writer's work at once on this thread (unit tests)."""
    return defer.maybeDeferred(fn, *args)


class FakeLink:
    """A robot link whose deliveries wait for the test to ack (``acks``) or fail them."""

    face = "botlink"

    def __init__(self) -> None:
        self.delivered: list[Command] = []
        self.acks: list[defer.Deferred[Any]] = []

    def deliver(self, command: Command) -> defer.Deferred[Any]:
        self.delivered.append(command)
        d: defer.Deferred[Any] = defer.Deferred()
        self.acks.append(d)
        return d

    def close_link(self, code: str, message: str) -> None:
        pass


def make(
    testcase: unittest.TestCase, to_thread: Any = sync_thread, **recorder: Any
) -> tuple[Hub, Recorder, task.Clock, Path]:
    """A hub on a Clock at T0 and a started recorder writing to a temp dir."""
    directory = Path(testcase.mktemp())
    config = load_config(
        None,
        environ={},
        overrides={"hub": {"state_dir": str(directory)}, "recorder": {"enabled": True, **recorder}},
    )
    clock = task.Clock()
    clock.advance(T0)
    hub = Hub(config, clock)
    rec = Recorder(config.recorder, directory / "recordings", hub, clock, to_thread=to_thread)
    rec.startService()
    return hub, rec, clock, directory / "recordings"


def read_all(path: Path) -> list[mcapio.Recorded]:
    with open(path, "rb") as f:
        return list(mcapio.iter_recording(f))


class RecorderTests(unittest.SynchronousTestCase):
    """What the hub routes ends up in MCAP files exactly as routed."""

    def test_data_commands_outcomes_and_device_events(self) -> None:
        """Data, a command, its ack, a failed command and device up/down are recorded with their
        channels, schemas and hub timestamps; the mcap library's own reader agrees."""
        hub, rec, clock, directory = make(self)
        link = FakeLink()
        dev = hub.connect(link, "r1", face="botlink", role="robot", address="127.0.0.1")
        sent: list[tuple[float, dict[str, Any]]] = []
        for i in range(5):
            clock.advance(0.01)
            body = {"type": "telemetry", "id": i, "battery": 80.0 - i, "cpu": 10.5}
            hub.ingest(dev, Message("telemetry", body, "r1", clock.seconds(), i))
            sent.append((clock.seconds(), body))
        scan = {"type": "sensor_data", "data_points": [{"angle": 0, "distance_cm": 45.2}], "data_count": 1}
        hub.ingest(dev, Message("sensor_data", scan, "r1", clock.seconds()))
        d = hub.command({"type": "robot_move", "x": 0.5, "y": -1}, "website-1", "r1")
        cmd_at = clock.seconds()
        clock.advance(0.05)
        link.acks[0].callback(None)
        self.assertEqual(self.successResultOf(d), ["r1"])
        ack_at = clock.seconds()
        self.failureResultOf(hub.command({"type": "robot_move"}, "website-1", "nobody"), HubError)
        hub.disconnect(link, "r1")
        clock.advance(0.2)
        self.successResultOf(rec.stopService())

        files = sorted(directory.glob("*.mcap"))
        self.assertEqual(len(files), 1)
        recs = read_all(files[0])
        tele = [r for r in recs if r.topic == "/r1/telemetry"]
        self.assertEqual([(r.log_time, r.body()) for r in tele], [(mcapio.to_ns(t), b) for t, b in sent])
        self.assertEqual(
            {(r.kind, r.device_id, r.type, r.schema) for r in tele},
            {("data", "r1", "telemetry", "robonet.telemetry")},
        )
        [sd] = [r for r in recs if r.topic == "/r1/sensor_data"]
        self.assertEqual((sd.body(), sd.schema), (scan, "robonet.sensor_data"))
        [cmd] = [r for r in recs if r.topic == "/r1/cmd/robot_move"]
        self.assertEqual(
            cmd.body(), {"type": "robot_move", "x": 0.5, "y": -1, "origin": "website-1", "target": "r1"}
        )
        self.assertEqual(
            (cmd.kind, cmd.schema, cmd.log_time), ("command", "robonet.robot_move", mcapio.to_ns(cmd_at))
        )
        [ok] = [r for r in recs if r.topic == "/r1/cmd/robot_move/result"]
        self.assertEqual(
            ok.body(),
            {"type": "robot_move", "origin": "website-1", "target": "r1", "ok": True, "devices": ["r1"]},
        )
        self.assertEqual((ok.schema, ok.log_time), ("robonet.command_result", mcapio.to_ns(ack_at)))
        [bad] = [r for r in recs if r.topic == "/nobody/cmd/robot_move/result"]
        self.assertEqual((bad.body()["ok"], bad.body()["code"]), (False, "device_offline"))
        events = [r.body() for r in recs if r.topic == mcapio.DEVICES_TOPIC]
        self.assertEqual(
            [(e["event"], e["device_id"]) for e in events], [("device_up", "r1"), ("device_down", "r1")]
        )
        self.assertEqual(events[0]["device"]["role"], "robot")

        # The mcap library's seeking reader (summary, indexes) sees the same messages.
        with open(files[0], "rb") as f:
            reader = make_reader(f)
            summary = reader.get_summary()
            assert summary is not None
            self.assertEqual(summary.statistics.message_count if summary.statistics else -1, len(recs))
            topics = [ch.topic for _, ch, _ in reader.iter_messages(log_time_order=False)]
        self.assertEqual(topics, [r.topic for r in recs])
        self.assertEqual(rec.stats()["recorded"], len(recs))

    def test_excluded_types_and_nothing_before_start(self) -> None:
        """``exclude_types`` (video_frame by default) are not recorded."""
        hub, rec, clock, directory = make(self)
        dev = hub.connect(None, "cam", face="camera", role="camera", address="local")
        hub.ingest(dev, Message("video_frame", {"type": "video_frame", "frame": "x"}, "cam", clock.seconds()))
        hub.ingest(dev, Message("camera_state", {"type": "camera_state"}, "cam", clock.seconds()))
        self.successResultOf(rec.stopService())
        [path] = directory.glob("*.mcap")
        self.assertEqual([r.topic for r in read_all(path) if r.kind == "data"], ["/cam/camera_state"])

    def test_bounded_queue_drops_oldest_and_counts(self) -> None:
        """While the writer thread is stuck, at most ``queue`` events wait; the oldest are dropped
        and counted in the hub's stats; the newest ones are written once it is free."""
        stuck: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

        def slow_thread(fn: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            stuck.append((d, fn, args))
            return d

        hub, rec, clock, directory = make(self, slow_thread, queue=10)
        dev = hub.connect(None, "r1", face="botlink", role="robot", address="local")
        clock.advance(0.1)  # device_up handed to the (stuck) writer
        self.assertEqual(len(stuck), 1)
        for i in range(25):
            hub.ingest(dev, Message("telemetry", {"type": "telemetry", "seq": i}, "r1", clock.seconds()))
        clock.advance(0.1)
        self.assertEqual(len(stuck), 1)  # one batch in flight at a time
        self.assertEqual(rec.dropped, 15)
        self.assertEqual(hub.stats.drops["recorder_queue"], 15)
        d, fn, args = stuck.pop()
        d.callback(fn(*args))
        stop = rec.stopService()
        d, fn, args = stuck.pop()
        d.callback(fn(*args))
        self.successResultOf(stop)
        [path] = directory.glob("*.mcap")
        seqs = [r.body()["seq"] for r in read_all(path) if r.kind == "data"]
        self.assertEqual(seqs, list(range(15, 25)))

    def test_unencodable_body_skipped_and_counted(self) -> None:
        """A body orjson cannot encode is counted, never stops the others."""
        hub, rec, clock, directory = make(self)
        dev = hub.connect(None, "r1", face="local", role="robot", address="local")
        hub.ingest(dev, Message("odd", {"type": "odd", "x": {1, 2}}, "r1", clock.seconds()))
        hub.ingest(dev, Message("telemetry", {"type": "telemetry"}, "r1", clock.seconds()))
        self.successResultOf(rec.stopService())
        self.assertEqual(hub.stats.drops["recorder_unencodable"], 1)
        [path] = directory.glob("*.mcap")
        self.assertEqual([r.topic for r in read_all(path) if r.kind == "data"], ["/r1/telemetry"])

    def test_write_failure_counted_and_next_batch_recovers(self) -> None:
        """An OSError in the writer is logged and counted; the recorder keeps going."""
        hub, rec, clock, directory = make(self)
        dev = hub.connect(None, "r1", face="local", role="robot", address="local")
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.write_text("not a directory")  # mkdir fails -> OSError in the writer
        clock.advance(0.1)
        self.assertEqual(hub.stats.errors["recorder_write"], 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        directory.unlink()
        hub.ingest(dev, Message("telemetry", {"type": "telemetry"}, "r1", clock.seconds()))
        self.successResultOf(rec.stopService())
        [path] = directory.glob("*.mcap")
        self.assertEqual([r.topic for r in read_all(path)], ["/r1/telemetry"])

    def test_recorder_endpoint(self) -> None:
        """The hub's ``recorder`` endpoint reports the recorder's counters."""
        hub, rec, clock, directory = make(self)
        stats = self.successResultOf(hub.request("recorder", None, "x"))
        self.assertEqual((stats["enabled"], stats["recorded"], stats["dropped"]), (True, 0, 0))
        self.successResultOf(rec.stopService())


class RotationTests(unittest.SynchronousTestCase):
    """Files rotate by size and time; keep_gb deletes the oldest."""

    def files(self, **kw: Any) -> tuple[RecordingFiles, Path]:
        directory = Path(self.mktemp())
        args = {
            "rotate_bytes": 10**9,
            "rotate_seconds": 3600.0,
            "keep_bytes": 0,
            "chunk_size": 1024,
            "compression": "none",
            "flush_interval": 0.0,
        }
        args.update(kw)
        return RecordingFiles(directory, **args), directory

    def data(self, hub_dev: str, n: int, at: float) -> list[Any]:
        from robonet.model import Event

        return [
            Event("data", hub_dev, "telemetry", {"type": "telemetry", "seq": i, "pad": "x" * 200}, at)
            for i in range(n)
        ]

    def test_rotate_by_time(self) -> None:
        """A batch after ``rotate_seconds`` starts a new file; both files are complete MCAP."""
        files, directory = self.files(rotate_seconds=60.0)
        files.write_batch(self.data("r1", 3, T0), T0)
        files.write_batch(self.data("r1", 2, T0 + 30), T0 + 30)
        r = files.write_batch(self.data("r1", 4, T0 + 61), T0 + 61)
        files.close()
        self.assertEqual(len(r.opened), 1)
        paths = sorted(directory.glob("*.mcap"))
        self.assertEqual([p.name for p in paths], [recording_name(T0), recording_name(T0 + 61)])
        self.assertEqual([len(read_all(p)) for p in paths], [5, 4])

    def test_rotate_by_size(self) -> None:
        """Once a file passes ``rotate_bytes`` the next batch goes to a new file."""
        files, directory = self.files(rotate_bytes=4096)
        for i in range(10):
            files.write_batch(self.data("r1", 10, T0 + i), T0 + i)
        files.close()
        paths = sorted(directory.glob("*.mcap"))
        self.assertGreater(len(paths), 2)
        self.assertEqual(sum(len(read_all(p)) for p in paths), 100)

    def test_keep_bytes_deletes_oldest(self) -> None:
        """The directory stays under ``keep_bytes`` by deleting the oldest files, never the current."""
        files, directory = self.files(rotate_bytes=4096, keep_bytes=3 * 4096 + 2048)
        for i in range(30):
            files.write_batch(self.data("r1", 10, T0 + i), T0 + i)
        files.close()
        paths = sorted(directory.glob("*.mcap"))
        self.assertLessEqual(sum(p.stat().st_size for p in paths), 3 * 4096 + 2048 + 8192)
        self.assertLess(len(paths), 8)
        self.assertEqual(paths[-1], files.path)
        self.assertNotIn(recording_name(T0), [p.name for p in paths])


class ReadingTests(unittest.SynchronousTestCase):
    """iter_recording's errors are clear, never tracebacks."""

    def test_not_mcap(self) -> None:
        """Garbage is a BadRecording naming the problem."""
        with self.assertRaises(mcapio.BadRecording) as cm:
            list(mcapio.iter_recording(io.BytesIO(b"hello world, not an mcap file" * 10)))
        self.assertIn("invalid magic", str(cm.exception))

    def test_truncated(self) -> None:
        """A file cut inside a chunk yields the complete chunks, then TruncatedRecording."""
        buf = io.BytesIO()
        sink = mcapio.McapSink(buf, chunk_size=512, compression="zstd")
        for i in range(200):
            sink.add_data("r1", "telemetry", T0 + i, orjson.dumps({"seq": i, "pad": "y" * 40}))
        sink.finish()
        data = buf.getvalue()
        cut = io.BytesIO(data[: len(data) // 2])
        got, err = mcapio.read_complete(cut)
        self.assertIsInstance(err, mcapio.TruncatedRecording)
        self.assertGreater(len(got), 20)
        self.assertEqual([r.body()["seq"] for r in got], list(range(len(got))))

    def test_corrupt_chunk(self) -> None:
        """Flipped bytes inside a chunk fail its CRC: BadRecording after the good chunks."""
        buf = io.BytesIO()
        sink = mcapio.McapSink(buf, chunk_size=512, compression="none")
        for i in range(100):
            sink.add_data("r1", "telemetry", T0 + i, orjson.dumps({"seq": i, "pad": "z" * 40}))
        sink.finish()
        data = bytearray(buf.getvalue())
        mid = len(data) // 2
        data[mid : mid + 8] = b"\xff" * 8
        got, err = mcapio.read_complete(io.BytesIO(bytes(data)))
        self.assertIsInstance(err, mcapio.BadRecording)
        self.assertLess(len(got), 100)


class _Collector(protocol.ProcessProtocol):
    """Collects the crash writer's recorded counts; ``reached`` fires once one is >= ``want``."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.counts: list[int] = []
        self.err = b""
        self.buf = b""
        self.reached: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        self.counts.extend(int(x) for x in lines if x.strip())
        if self.counts and self.counts[-1] >= self.want and not self.reached.called:
            self.reached.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)


class CrashTests(unittest.TestCase):
    """A recorder killed with -9 leaves a file whose complete chunks still read."""

    @defer.inlineCallbacks
    def test_kill9_keeps_complete_chunks(self) -> Any:
        """kill -9 while ~1,000 msgs/s are recorded: every message the writer had flushed before the
        kill reads back, in order, from the unfinished file (no summary, no footer)."""
        directory = Path(self.mktemp())
        directory.mkdir()
        collector = _Collector(2000)
        env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
        transport = reactor.spawnProcess(
            collector, sys.executable, [sys.executable, str(CRASH_WRITER), str(directory)], env=env
        )

        def kill() -> None:
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

        def cleanup() -> defer.Deferred[None]:
            kill()
            return collector.ended

        self.addCleanup(cleanup)
        collector.reached.addTimeout(30, reactor)
        try:
            yield collector.reached
        except defer.TimeoutError:
            self.fail(f"crash writer reported {collector.counts[-1:]} in 30 s; stderr: {collector.err!r}")
        kill()
        yield collector.ended
        assert collector.reason is not None and isinstance(collector.reason.value, error.ProcessTerminated)
        self.assertEqual(collector.reason.value.signal, signal.SIGKILL)
        flushed = collector.counts[-1]

        [path] = directory.glob("*.mcap")
        with open(path, "rb") as f:
            got, err = mcapio.read_complete(f)
        self.assertIsInstance(err, mcapio.TruncatedRecording)  # no footer: it was killed mid-write
        seqs = [r.body()["seq"] for r in got if r.kind == "data"]
        self.assertGreaterEqual(len(got), flushed)
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))

        # The mcap library's own non-seeking reader reads the same complete chunks.
        from mcap.exceptions import McapError
        from mcap.reader import NonSeekingReader

        seen = 0
        with open(path, "rb") as f:
            try:
                for _ in NonSeekingReader(f).iter_messages(log_time_order=False):
                    seen += 1
            except McapError:
                pass
        self.assertEqual(seen, len(got))
