"""TelemetryStore: group commit, acks only after COMMIT, typed columns, queries, retention, restart,
stop/flush, commit failures, and a kill -9 of a writing process that must lose no acknowledged row.

The store's writer and reader are real threads, so these are trial ``TestCase``s on the real reactor;
where time matters (retention) the store gets a reactor double whose clock is a ``task.Clock``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from twisted.internet import defer, error, protocol, task
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.trial import unittest

from robonet.services.store import RETENTION_INTERVAL, Batch, TelemetryStore

reactor: Any = _reactor  # the real reactor: the store needs its threads and callFromThread
REPO_ROOT = Path(__file__).resolve().parent.parent
CRASH_WRITER = Path(__file__).resolve().parent / "store_crash_writer.py"
DAY = 86400.0
T0 = 1_700_000_000.0


def committed(batch: Batch) -> defer.Deferred[None]:
    """A Deferred that fires (None) when ``batch`` committed, or fails with the commit's failure."""
    d: defer.Deferred[None] = defer.Deferred()
    batch.when_committed(lambda: d.callback(None), lambda f: d.errback(f))
    return d


def telemetry(**fields: Any) -> dict[str, Any]:
    """A telemetry message body with ``fields``."""
    return {"type": "telemetry", **fields}


def sql(path: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run ``query`` on a fresh, independent sqlite3 connection (another reader of the file)."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


class ClockReactor:
    """A reactor double: time and timers from a ``task.Clock``, thread hand-off to the real reactor."""

    def __init__(self, now: float) -> None:
        self.clock = task.Clock()
        self.clock.advance(now)

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, f: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall:
        return self.clock.callLater(delay, f, *args, **kw)

    def callFromThread(self, f: Callable[..., Any], *args: object, **kw: object) -> None:
        reactor.callFromThread(f, *args, **kw)


class StoreTestCase(unittest.TestCase):
    """Helpers: a store in a fresh temporary directory, always stopped at the end."""

    timeout = 60

    def make_store(self, path: Path | None = None, *, start: bool = True, **kw: Any) -> TelemetryStore:
        if path is None:
            path = Path(self.mktemp()) / "state" / "telemetry.sqlite3"
        kw.setdefault("reactor", reactor)
        store = TelemetryStore(path, **kw)
        if start:
            store.startService()
        self.addCleanup(store.stopService)
        return store


class LifecycleTests(StoreTestCase):
    def test_no_io_in_init(self) -> None:
        """Constructing the store touches nothing on disk; startService creates dirs, file and WAL."""
        path = Path(self.mktemp()) / "a" / "b" / "t.sqlite3"
        store = self.make_store(path, start=False)
        self.assertFalse(path.parent.exists())
        store.startService()
        self.assertTrue(path.exists())
        self.assertEqual(sql(path, "PRAGMA journal_mode"), [("wal",)])
        names = {r[0] for r in sql(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
        self.assertTrue({"telemetry_device_time", "telemetry_time"} <= names)

    def test_bad_arguments(self) -> None:
        """Invalid settings raise ValueError at construction."""
        path = Path(self.mktemp())
        for kw in ({"synchronous": "off"}, {"max_batch": 0}, {"retention_days": -1}, {"commit_interval": -1}):
            self.assertRaises(ValueError, TelemetryStore, path, reactor=reactor, **kw)

    def test_append_before_start_and_after_stop_raises(self) -> defer.Deferred[None]:
        """append raises RuntimeError before startService and once stopService was called."""
        store = self.make_store(start=False)
        self.assertRaises(RuntimeError, store.append, "r", "telemetry", T0, {}, None)
        store.startService()
        store.append("r", "telemetry", T0, {}, None)
        d = store.stopService()
        self.assertRaises(RuntimeError, store.append, "r", "telemetry", T0, {}, None)

        def stopped(_: object) -> None:
            self.assertRaises(RuntimeError, store.append, "r", "telemetry", T0, {}, None)

        return d.addCallback(stopped)

    @defer.inlineCallbacks
    def test_stop_flushes_pending(self) -> Any:
        """stopService commits rows still in an open batch before it fires, then closes the file."""
        store = self.make_store(commit_interval=3600)  # the timer would never close the batch
        acked: list[int] = []
        for i in range(10):
            batch = store.append("r1", "telemetry", T0 + i, telemetry(battery=i), None)
            batch.when_committed(acked.append, self.fail, i)
        self.assertEqual(store.stats()["pending_rows"], 10)
        yield store.stopService()
        self.assertEqual(acked, list(range(10)))
        self.assertEqual(sql(store.path, "SELECT count(*) FROM telemetry"), [(10,)])
        self.assertEqual(store.stats()["pending_rows"], 0)
        self.assertIsNone(store._wconn)
        self.failureResultOf(store.count(), RuntimeError)

    @defer.inlineCallbacks
    def test_restart_keeps_rows(self) -> Any:
        """Rows survive a stop/start; new rows get ids after the old ones."""
        path = Path(self.mktemp()) / "t.sqlite3"
        store = self.make_store(path, retention_days=0)
        for i in range(5):
            batch = store.append("r1", "telemetry", T0 + i, telemetry(seq=i), None)
        yield committed(batch)
        yield store.stopService()
        again = self.make_store(path, retention_days=0)
        self.assertEqual((yield again.count()), 5)
        yield committed(again.append("r1", "telemetry", T0 + 9, telemetry(seq=9), None))
        rows = yield again.query(limit=10)
        self.assertEqual([r["body"]["seq"] for r in rows], [9, 4, 3, 2, 1, 0])
        self.assertEqual(rows[0]["id"], max(r["id"] for r in rows[1:]) + 1)


class GroupCommitTests(StoreTestCase):
    @defer.inlineCallbacks
    def test_many_appends_one_transaction(self) -> Any:
        """Rows appended within one commit interval share one Batch and one transaction, and every
        ok callback runs only once all of them are visible to another connection."""
        store = self.make_store()
        seen: list[int] = []

        def ok(i: int) -> None:
            seen.append(sql(store.path, "SELECT count(*) FROM telemetry")[0][0])

        batches = set()
        for i in range(1000):
            batch = store.append(f"r{i % 7}", "telemetry", T0 + i, telemetry(battery=50 + i % 50), None)
            batch.when_committed(ok, self.fail, i)
            batches.add(id(batch))
        self.assertEqual(len(batches), 1)
        self.assertEqual(batch.size, 1000)
        self.assertEqual(seen, [])  # nothing acked before the commit
        yield committed(batch)
        self.assertEqual(seen, [1000] * 1000)
        # the writer is its own daemon thread: never the reactor thread, never blocks process exit
        writer = store._writer
        assert writer is not None
        self.assertEqual(len(writer.threads), 1)
        self.assertTrue(writer.threads[0].daemon)
        self.assertIsNot(writer.threads[0], threading.current_thread())
        stats = store.stats()
        self.assertEqual(
            (stats["rows_written"], stats["transactions"], stats["batches_committed"]), (1000, 1, 1)
        )
        self.assertEqual(stats["pending_rows"], 0)
        self.assertEqual(stats["errors"], 0)
        self.assertEqual(stats["path"], str(store.path))

    @defer.inlineCallbacks
    def test_max_batch_closes_batch(self) -> Any:
        """A batch closes when it reaches max_batch rows; batches commit in order, few transactions."""
        store = self.make_store(max_batch=100, commit_interval=3600)
        order: list[int] = []
        batches: list[Batch] = []
        for i in range(250):
            batch = store.append("r1", "telemetry", T0 + i, telemetry(), None)
            if not batches or batches[-1] is not batch:
                batches.append(batch)
                batch.when_committed(order.append, self.fail, len(batches))
        self.assertEqual([b.size for b in batches], [100, 100, 50])
        yield committed(batches[1])
        self.assertEqual(order, [1, 2])
        self.assertEqual(batches[2].settled, False)  # still open: its timer is an hour away
        yield store.stopService()
        self.assertEqual(order, [1, 2, 3])
        self.assertLessEqual(store.stats()["transactions"], 3)
        self.assertEqual(sql(store.path, "SELECT count(*) FROM telemetry"), [(250,)])

    @defer.inlineCallbacks
    def test_when_committed_after_settle_runs_at_once(self) -> Any:
        """A waiter attached to an already committed batch is called immediately."""
        store = self.make_store()
        batch = store.append("r1", "telemetry", T0, telemetry(), None)
        yield committed(batch)
        calls: list[str] = []
        batch.when_committed(calls.append, self.fail, "late")
        self.assertEqual(calls, ["late"])
        self.assertEqual(batch.size, 1)

    @defer.inlineCallbacks
    def test_raising_waiter_does_not_stop_others(self) -> Any:
        """A waiter that raises is logged; the other waiters of the batch still run."""
        store = self.make_store()
        batch = store.append("r1", "telemetry", T0, telemetry(), None)
        calls: list[int] = []
        batch.when_committed(calls.append, self.fail, 1)
        batch.when_committed(lambda: 1 / 0, self.fail)
        batch.when_committed(calls.append, self.fail, 2)
        yield committed(batch)
        self.assertEqual(calls, [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    @defer.inlineCallbacks
    def test_commit_failure_errbacks_then_recovers(self) -> Any:
        """A failing COMMIT errbacks every waiter of its batch (no row of it is stored), is counted and
        logged (once per run of failures), and later batches still commit."""
        store = self.make_store()
        sql(
            store.path,
            "CREATE TRIGGER no_bad BEFORE INSERT ON telemetry WHEN NEW.device_id = 'bad'"
            " BEGIN SELECT RAISE(ABORT, 'refused by test'); END",
        )
        oks: list[str] = []
        failures: list[Failure] = []
        store.append("good", "telemetry", T0, telemetry(), None)
        batch = store.append("bad", "telemetry", T0, telemetry(), None)
        batch.when_committed(oks.append, lambda f, tag: failures.append(f), "first")
        batch.when_committed(oks.append, lambda f, tag: failures.append(f), "second")
        yield self.assertFailure(committed(batch), sqlite3.IntegrityError)
        self.assertEqual(oks, [])
        self.assertEqual(len(failures), 2)
        again = store.append("bad", "telemetry", T0, telemetry(), None)
        yield self.assertFailure(committed(again), sqlite3.IntegrityError)
        self.assertEqual(store.stats()["errors"], 2)
        # logged once per run of failures, not once per batch
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.IntegrityError)), 1)

        later = store.append("good", "telemetry", T0 + 1, telemetry(n=2), None)
        later.when_committed(oks.append, self.fail, "later")
        yield committed(later)
        self.assertEqual(oks, ["later"])
        self.assertEqual(sql(store.path, "SELECT device_id, received_at FROM telemetry"), [("good", T0 + 1)])
        self.assertEqual(store.stats()["rows_written"], 1)


class ColumnTests(StoreTestCase):
    @defer.inlineCallbacks
    def test_typed_columns(self) -> Any:
        """battery/cpu/temperature/signal are stored as REAL when numeric (ints become floats), else
        NULL (bools, strings, nulls, missing, overflowing ints); robot_ts is ts, else a numeric
        timestamp, else NULL."""
        store = self.make_store()
        cases = [
            (
                telemetry(battery=85, cpu=45.5, temperature=-3, signal=90.25, ts=1.5),
                (1.5, 85.0, 45.5, -3.0, 90.25),
            ),
            (telemetry(battery=True, cpu="45", temperature=None, timestamp=7), (7.0, None, None, None, None)),
            (telemetry(timestamp="2025-01-01T00:00:00Z", battery=2**64), (None, 2.0**64, None, None, None)),
            (telemetry(battery=10**400), (None, None, None, None, None)),
            (telemetry(ts="x", timestamp=2.5, signal=[1]), (2.5, None, None, None, None)),
            (telemetry(ts=False), (None, None, None, None, None)),
        ]
        for i, (body, _) in enumerate(cases):
            batch = store.append("r1", "telemetry", T0 + i, body, None)
        yield committed(batch)
        rows = sql(
            store.path, "SELECT robot_ts, battery, cpu, temperature, signal FROM telemetry ORDER BY id"
        )
        self.assertEqual(rows, [expected for _, expected in cases])
        types = sql(store.path, "SELECT typeof(battery), typeof(temperature) FROM telemetry WHERE id = 1")
        self.assertEqual(types, [("real", "real")])

    @defer.inlineCallbacks
    def test_raw_body_kept(self) -> Any:
        """The raw JSON is stored byte for byte (as text); without raw, the body is encoded as JSON."""
        store = self.make_store()
        raw = b'{ "type" : "telemetry",\n "battery": 85.00, "note": "caf\xc3\xa9" }'
        body = orjson.loads(raw)
        store.append("r1", "telemetry", T0, body, raw)
        batch = store.append("r2", "status", T0 + 1, {"type": "status", "status": "ok"}, None)
        yield committed(batch)
        rows = sql(store.path, "SELECT device_id, type, received_at, body FROM telemetry ORDER BY id")
        self.assertEqual(rows[0], ("r1", "telemetry", T0, raw.decode()))
        self.assertEqual(rows[1][:3], ("r2", "status", T0 + 1))
        self.assertEqual(orjson.loads(rows[1][3]), {"type": "status", "status": "ok"})


class QueryTests(StoreTestCase):
    @defer.inlineCallbacks
    def fill(self, store: TelemetryStore) -> Any:
        """r1 and r2 alternate telemetry rows at T0+0..T0+9 (battery = i); r1 also has one status."""
        for i in range(10):
            batch = store.append(f"r{i % 2 + 1}", "telemetry", T0 + i, telemetry(battery=i, i=i), None)
        batch = store.append("r1", "status", T0 + 10, {"type": "status", "status": "ok"}, None)
        yield committed(batch)

    @defer.inlineCallbacks
    def test_query_filters_and_limit(self) -> Any:
        """query filters by device, type and an inclusive time range, limits, and is newest first."""
        store = self.make_store()
        yield self.fill(store)
        rows = yield store.query()
        self.assertEqual(len(rows), 11)
        self.assertEqual([r["received_at"] for r in rows], [T0 + i for i in range(10, -1, -1)])
        first = rows[1]
        self.assertEqual(
            set(first),
            {
                "id",
                "device_id",
                "type",
                "received_at",
                "robot_ts",
                "battery",
                "cpu",
                "temperature",
                "signal",
                "body",
            },
        )
        self.assertEqual(first["body"], {"type": "telemetry", "battery": 9, "i": 9})
        self.assertEqual((first["device_id"], first["battery"], first["cpu"]), ("r2", 9.0, None))

        rows = yield store.query(device_id="r1")
        self.assertEqual([r["received_at"] - T0 for r in rows], [10, 8, 6, 4, 2, 0])
        rows = yield store.query(device_id="r1", type="telemetry", limit=2)
        self.assertEqual([r["body"]["i"] for r in rows], [8, 6])
        rows = yield store.query(since=T0 + 3, until=T0 + 5)
        self.assertEqual([r["body"]["i"] for r in rows], [5, 4, 3])
        rows = yield store.query(type="status")
        self.assertEqual([r["type"] for r in rows], ["status"])
        self.assertEqual((yield store.query(device_id="nobody")), [])
        self.assertEqual((yield store.query(limit=0)), [])
        self.assertEqual((yield store.query(limit=-5)), [])
        self.assertEqual((yield store.count()), 11)

    @defer.inlineCallbacks
    def test_battery_history(self) -> Any:
        """battery_history gives the last `limit` telemetry rows with a battery value, oldest first,
        as [epoch_ms int, battery float]; optionally for one device."""
        store = self.make_store()
        yield self.fill(store)
        batch = store.append("r1", "telemetry", T0 + 11.5, telemetry(cpu=3.0), None)  # no battery
        yield committed(batch)
        hist = yield store.battery_history(limit=3)
        self.assertEqual(
            hist, [[int((T0 + 7) * 1000), 7.0], [int((T0 + 8) * 1000), 8.0], [int((T0 + 9) * 1000), 9.0]]
        )
        self.assertIsInstance(hist[0][0], int)
        hist = yield store.battery_history(device_id="r1")
        self.assertEqual([b for _, b in hist], [0.0, 2.0, 4.0, 6.0, 8.0])
        self.assertEqual(len((yield store.battery_history())), 10)


class RetentionTests(StoreTestCase):
    @defer.inlineCallbacks
    def test_prune_by_age(self) -> Any:
        """prune(now) deletes rows received more than retention_days before now, and no others."""
        store = self.make_store(retention_days=1, max_rows=0)
        for age in (3 * DAY, 1.5 * DAY, DAY + 1, DAY - 1, 10, 0):
            batch = store.append("r1", "telemetry", T0 - age, telemetry(age=age), None)
        yield committed(batch)
        deleted = yield store.prune(T0)
        self.assertEqual(deleted, 3)
        rows = yield store.query()
        self.assertEqual([r["body"]["age"] for r in rows], [0, 10, DAY - 1])
        self.assertEqual(store.stats()["rows_deleted"], 3)

    @defer.inlineCallbacks
    def test_prune_by_count(self) -> Any:
        """prune deletes the oldest rows beyond max_rows; retention_days=0 keeps old rows otherwise."""
        store = self.make_store(retention_days=0, max_rows=5)
        for i in range(12):
            batch = store.append("r1", "telemetry", T0 - 1000 * DAY + i, telemetry(i=i), None)
        yield committed(batch)
        self.assertEqual((yield store.prune(T0)), 7)
        rows = yield store.query()
        self.assertEqual([r["body"]["i"] for r in rows], [11, 10, 9, 8, 7])
        self.assertEqual((yield store.prune(T0)), 0)
        batch = store.append("r1", "telemetry", T0, telemetry(i=12), None)
        yield committed(batch)
        self.assertEqual((yield store.prune(T0)), 1)
        self.assertEqual((yield store.count()), 5)

    @defer.inlineCallbacks
    def test_unlimited_keeps_everything(self) -> Any:
        """retention_days=0 and max_rows=0 never delete anything."""
        store = self.make_store(retention_days=0, max_rows=0)
        batch = store.append("r1", "telemetry", 0.0, telemetry(), None)
        yield committed(batch)
        self.assertEqual((yield store.prune(T0 + 1e9)), 0)
        self.assertEqual((yield store.count()), 1)

    @defer.inlineCallbacks
    def test_retention_runs_at_start_and_every_minute(self) -> Any:
        """Retention runs once at start (on the injected clock's time) and again every 60 s; the
        commit timer uses the same clock."""
        path = Path(self.mktemp()) / "t.sqlite3"
        first = self.make_store(path, retention_days=0, max_rows=0)
        store_old = first.append("r1", "telemetry", T0 - 2 * DAY, telemetry(i=0), None)
        first.append("r1", "telemetry", T0, telemetry(i=1), None)
        yield committed(store_old)
        yield first.stopService()

        fake = ClockReactor(T0)
        store = self.make_store(path, reactor=fake, retention_days=1, max_rows=0, commit_interval=0.005)

        @defer.inlineCallbacks
        def after_writer_jobs(i: int) -> Any:
            # The writer runs jobs in order: once a later commit is back, earlier prunes are done.
            batch = store.append("r1", "telemetry", T0 + 100, telemetry(i=i), None)
            self.assertFalse(batch.settled)
            fake.clock.advance(0.005)  # the commit timer runs on the injected clock too
            yield committed(batch)
            rows = yield store.query(limit=1000)
            return sorted(r["body"]["i"] for r in rows)

        self.assertEqual((yield after_writer_jobs(2)), [1, 2])  # T0 - 2 days went at start
        fake.clock.advance(DAY - RETENTION_INTERVAL - 1)  # ~T0 + DAY - 61: cutoff before T0
        fake.clock.advance(RETENTION_INTERVAL)  # ~T0 + DAY - 1: still before T0
        self.assertEqual((yield after_writer_jobs(3)), [1, 2, 3])
        fake.clock.advance(RETENTION_INTERVAL)  # ~T0 + DAY + 59: the row at T0 is now too old
        self.assertEqual((yield after_writer_jobs(4)), [2, 3, 4])


class CrashCollector(protocol.ProcessProtocol):
    """Collects the ids the crash writer printed (acked rows); fires ``reached`` at ``want`` ids."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.ids: list[int] = []
        self.buf = b""
        self.err = b""
        self.reached: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        self.ids.extend(int(line) for line in lines)
        if len(self.ids) >= self.want and not self.reached.called:
            self.reached.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        if not self.reached.called:
            self.reached.errback(reason)
        self.reason = reason
        self.ended.callback(None)


class KillTests(StoreTestCase):
    @defer.inlineCallbacks
    def test_kill_9_loses_no_acked_row(self) -> Any:
        """A process acking ~500 rows/s only after COMMIT is killed with SIGKILL: every row it acked
        is in the database afterwards."""
        path = Path(self.mktemp()).resolve() / "crash.sqlite3"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        collector = CrashCollector(want=300)
        transport = reactor.spawnProcess(
            collector, sys.executable, [sys.executable, str(CRASH_WRITER), str(path), "500"], env=env
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
        collector.reached.addTimeout(20, reactor)
        try:
            yield collector.reached
        except defer.TimeoutError:
            self.fail(
                f"crash writer printed only {len(collector.ids)} ids in 20 s; stderr: {collector.err!r}"
            )
        kill()
        yield collector.ended
        reason = collector.reason
        assert reason is not None and isinstance(reason.value, error.ProcessTerminated), reason
        self.assertEqual(reason.value.signal, signal.SIGKILL)

        acked = set(collector.ids)
        stored = {row[0] for row in sql(path, "SELECT json_extract(body, '$.seq') FROM telemetry")}
        self.assertGreaterEqual(len(acked), 300)
        self.assertEqual(acked - stored, set(), f"acked rows lost; stderr: {collector.err!r}")
