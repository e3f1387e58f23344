"""The bot link over the real SQLite store's cap: past ``store.max_pending_rows`` a frame with an id
gets a ``store_unavailable`` error frame (never an ack), an id-less frame is dropped and counted,
and rows already taken are still acked after their COMMIT (issue 9, issue 11 item 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from robonet.services.store import TelemetryStore
from tests.test_botlink import Wire, make_hub

reactor: Any = _reactor


class StoreUnavailableTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_over_cap_gets_store_unavailable(self) -> Any:
        """Three rows fit under max_pending_rows=3; the fourth (with id) gets error
        store_unavailable, the fifth (no id) is dropped silently but counted; the first three are
        acked once committed."""
        store = TelemetryStore(
            Path(self.mktemp()) / "t.sqlite3", reactor=reactor, max_pending_rows=3, commit_interval=3600
        )
        store.startService()
        self.addCleanup(store.stopService)
        hub, factory, clock = make_hub(self, store=store)
        w = Wire(factory)
        w.hello(role="robot", device_id="robot_01")
        for i in range(1, 4):
            w.send({"type": "telemetry", "id": i, "battery": i})
        self.assertEqual(w.frames(), [])
        w.send({"type": "telemetry", "id": 4, "battery": 4})
        w.send({"type": "telemetry", "battery": 5})
        frames = w.frames()
        self.assertEqual(len(frames), 1, frames)
        self.assertEqual((frames[0]["type"], frames[0]["code"], frames[0]["ref"]), ("error", "store_unavailable", 4))
        self.assertEqual(store.stats()["rows_dropped"], 2)
        self.assertEqual(hub.stats.errors.get("store_unavailable"), 1)
        store._close_open()  # the commit timer is an hour away: close the batch now
        for _ in range(100):
            frames = w.frames()
            if frames:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([(f["type"], f["id"]) for f in frames], [("ack", 1), ("ack", 2), ("ack", 3)])
        self.assertFalse(w.closed)
