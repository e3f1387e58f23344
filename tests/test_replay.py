"""``robonet-replay`` (robonet/replay.py; issue 10 item 4)."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import orjson
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from robonet import replay
from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Message
from robonet.services.recorder import Recorder
from tests.daemon import start_daemon

reactor: Any = _reactor
T0 = 1_764_800_000.0


def record_fleet(testcase: unittest.TestCase) -> tuple[Path, dict[str, dict[str, int]]]:
    """Record a small fleet with the real Hub and Recorder on a Clock; returns the file and the
    data counts per device and type. r3 comes up (role robot) but never sends data."""
    directory = Path(testcase.mktemp())
    config = load_config(None, environ={}, overrides={"hub": {"state_dir": str(directory)}})
    clock = task.Clock()
    clock.advance(T0)
    hub = Hub(config, clock)
    rec = Recorder(
        config.recorder, directory, hub, clock, to_thread=lambda fn, *a: defer.maybeDeferred(fn, *a)
    )
    rec.startService()
    counts: dict[str, dict[str, int]] = {}
    devs = {d: hub.connect(None, d, face="botlink", role="robot", address="x") for d in ("r1", "r2", "r3")}
    hub.connect(None, "website-1", face="web", role="dashboard", address="x")
    for i in range(60):
        clock.advance(0.01)
        device = ("r1", "r2")[i % 2]
        mtype = ("telemetry", "telemetry", "sensor_data", "status")[i % 4]
        body = {"type": mtype, "id": i, "seq": i, "battery": 70.0}
        hub.ingest(devs[device], Message(mtype, body, device, clock.seconds(), i))
        per = counts.setdefault(device, {})
        per[mtype] = per.get(mtype, 0) + 1
        if i == 30:
            hub.disconnect(None, "r2")  # r2 goes away and comes back: a second connection
            devs["r2"] = hub.connect(None, "r2", face="botlink", role="robot", address="x")
    hub.command({"type": "robot_move", "x": 1, "y": 0}, "website-1", "nobody").addErrback(lambda f: None)
    testcase.successResultOf(rec.stopService())
    [path] = directory.glob("*.mcap")
    return path, counts


def http_json(port: int, path: str) -> defer.Deferred[Any]:
    d = Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    return d.addCallback(readBody).addCallback(orjson.loads)


class ScanTests(unittest.SynchronousTestCase):
    """The up-front check: device set, counts, clear errors."""

    def test_scan_counts(self) -> None:
        """scan() reports each device's data counts per type; --devices filters them."""
        path, counts = record_fleet(self)
        self.assertEqual(replay.scan(str(path)).devices, counts)
        self.assertEqual(set(replay.scan(str(path), replay.device_filter("r2,x*")).devices), {"r2"})

    def test_bad_files_clear_error_exit_2(self) -> None:
        """Missing, garbage and truncated files: one line on stderr, status 2, no traceback;
        --partial accepts the complete part of a truncated file."""
        path, _ = record_fleet(self)
        data = path.read_bytes()
        garbage = Path(self.mktemp())
        garbage.write_bytes(b"\x89MCAP0\r\n" + b"\x01" * 200)
        text = Path(self.mktemp())
        text.write_text("just some text\n" * 20)
        cut = Path(self.mktemp())
        cut.write_bytes(data[: len(data) // 2])
        for bad, words in (
            ("/nonexistent/x.mcap", "cannot open"),
            (str(garbage), "not a readable MCAP"),
            (str(text), "invalid magic"),
            (str(cut), "truncated"),
        ):
            err, out = io.StringIO(), io.StringIO()
            status = replay.replay_main(replay.parse_args([bad]), stdout=out, stderr=err)
            self.assertEqual(status, 2, bad)
            self.assertIn(words, err.getvalue(), bad)
            self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
            self.assertNotIn("Traceback", err.getvalue())
        self.assertIn("--partial", self._partial_hint(cut))

    def test_sim_from(self) -> None:
        """``robonet-sim --from FILE`` takes the replay options and refuses a bad file the same way."""
        from robonet import sim

        args = sim.parse_args(["--from", "x.mcap", "--speed", "2", "--loop", "--devices", "r*"])
        self.assertEqual((args.from_file, args.speed, args.loop, args.devices), ("x.mcap", 2.0, True, "r*"))
        garbage = Path(self.mktemp())
        garbage.write_bytes(b"not mcap" * 10)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(sim.main(["--from", str(garbage)]), 2)
        self.assertIn("robonet-sim --from: ", err.getvalue())
        self.assertIn("not a readable MCAP", err.getvalue())

    def _partial_hint(self, cut: Path) -> str:
        try:
            replay.scan(str(cut))
        except replay.ReplayError as e:
            return str(e)
        raise AssertionError("no error")


class ReplayE2ETests(unittest.TestCase):
    """A recorded file replayed into a fresh real daemon reproduces its devices and counts."""

    timeout = 60

    @defer.inlineCallbacks
    def test_replay_into_fresh_hub(self) -> Any:
        """Same device set (r1, r2 and the data-less r3; not the dashboard) and the same number of
        messages per type as recorded, every one acked."""
        path, counts = record_fleet(self)
        daemon = start_daemon(self, faces=("botlink", "web"), store=False)
        r = replay.Replayer(reactor, str(path), "127.0.0.1", daemon.ports["botlink"], speed=0)
        yield r.run()
        total = sum(sum(c.values()) for c in counts.values())
        self.assertEqual((r.acked, r.unacked, r.connect_errors), (total, 0, []))
        devices = yield http_json(daemon.ports["web"], "/api/devices")
        self.assertEqual({d["device_id"] for d in devices["devices"]}, {"r1", "r2", "r3"})
        stats = yield http_json(daemon.ports["web"], "/api/stats")
        want: dict[str, int] = {}
        for per in counts.values():
            for mtype, n in per.items():
                want[mtype] = want.get(mtype, 0) + n
        got = {t: n for t, n in stats["messages_in"].items() if t in want}
        self.assertEqual(got, want)

    @defer.inlineCallbacks
    def test_original_timing(self) -> Any:
        """Messages keep their recorded spacing divided by the speed: the 0.59 s the recording spans
        take at least 0.59 s at speed 1 and at least a quarter of that at speed 4 (lower bounds:
        the replay can never run ahead of the schedule)."""
        path, _ = record_fleet(self)
        daemon = start_daemon(self, faces=("botlink",), store=False)
        started = reactor.seconds()
        yield replay.Replayer(reactor, str(path), "127.0.0.1", daemon.ports["botlink"], speed=1.0).run()
        slow = reactor.seconds() - started
        started = reactor.seconds()
        yield replay.Replayer(reactor, str(path), "127.0.0.1", daemon.ports["botlink"], speed=4.0).run()
        fast = reactor.seconds() - started
        self.assertGreaterEqual(slow, 0.585)
        self.assertGreaterEqual(fast, 0.585 / 4)

    @defer.inlineCallbacks
    def test_hub_unreachable(self) -> Any:
        """No hub listening: the connection errors are reported, nothing hangs."""
        path, _ = record_fleet(self)
        from tests.daemon import free_port

        r = replay.Replayer(reactor, str(path), "127.0.0.1", free_port(), speed=0)
        yield r.run()
        self.assertEqual(r.acked, 0)
        # r2 is connected twice (it went down and came back in the recording)
        self.assertEqual(sorted(e.split(":")[0] for e in r.connect_errors), ["r1", "r2", "r2", "r3"])
        self.flushLoggedErrors()
