"""The telemetry store on both backends: group commit, acks only after COMMIT, typed columns,
queries, the streaming page API, retention, restart, stop/flush and its deadline, commit failures,
the pending-row cap, and a kill -9 of a writing process that must lose no acknowledged row.

Every test is written once in a mixin and runs against SQLite (``...SQLite`` classes) and a real
PostgreSQL started by ``tests/pg.py`` (``...Postgres`` classes, skipped only when the server
binaries are missing). The store's writer and reader are real threads, so these are trial
``TestCase``s on the real reactor; where time matters the store gets a reactor double whose clock is
a ``task.Clock``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import tempfile
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

from robonet.model import HubError
from robonet.services.store import RETENTION_INTERVAL, Batch, GroupCommitStore, TelemetryStore
from tests import pg

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


class SQLiteBackend:
    """Test helpers for the SQLite backend (mixed into a TestCase)."""

    backend = "sqlite"
    mktemp: Callable[[], str]
    addCleanup: Callable[..., None]

    def make_store(self, where: Any = None, *, start: bool = True, **kw: Any) -> GroupCommitStore:
        """A store in a fresh temporary directory (or at ``where``), always stopped at the end."""
        if where is None:
            where = self.new_target()
        kw.setdefault("reactor", reactor)
        kw.setdefault("node_id", "node-a")
        store = TelemetryStore(where, **kw)
        if start:
            store.startService()
        self.addCleanup(store.stopService)
        return store

    def new_target(self) -> Any:
        """Where a new, empty store keeps its rows."""
        return Path(self.mktemp()) / "state" / "telemetry.sqlite3"

    def target(self, store: Any) -> Any:
        return store.path

    def sql(self, where: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """``query`` (``?`` placeholders) on an independent connection."""
        return sql(where, query, *params)

    def refuse_device(self, where: Any, device_id: str) -> None:
        """Make the database refuse rows of ``device_id`` (a trigger)."""
        sql(
            where,
            f"CREATE TRIGGER no_bad BEFORE INSERT ON telemetry WHEN NEW.device_id = '{device_id}'"
            " BEGIN SELECT RAISE(ABORT, 'refused by test'); END",
        )

    @property
    def refused_error(self) -> type[Exception]:
        return sqlite3.IntegrityError

    def seq_sql(self) -> str:
        return "SELECT json_extract(body, '$.seq') FROM telemetry"

    def block_writes(self, where: Any) -> Callable[[], None]:
        """Hold a write lock from another connection; returns the release function."""
        conn = sqlite3.connect(str(where), isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")

        def release() -> None:
            conn.execute("ROLLBACK")
            conn.close()

        return release


class PostgresBackend(SQLiteBackend):
    """Test helpers for the PostgreSQL backend: a fresh database on the shared test server."""

    backend = "postgresql"
    skip = pg.SKIP_REASON

    def make_store(self, where: Any = None, *, start: bool = True, **kw: Any) -> GroupCommitStore:
        from robonet.services.store_pg import PostgresStore

        if where is None:
            where = self.new_target()
        kw.setdefault("reactor", reactor)
        kw.setdefault("node_id", "node-a")
        kw.pop("synchronous", None)
        store = PostgresStore(where, **kw)
        if start:
            store.startService()
        self.addCleanup(store.stopService)
        return store

    def new_target(self) -> Any:
        return pg.shared_server().fresh_database()

    def target(self, store: Any) -> Any:
        return store.dsn

    def sql(self, where: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(where, autocommit=True) as conn:
            cur = conn.execute(query.replace("?", "%s"), params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    def refuse_device(self, where: Any, device_id: str) -> None:
        self.ensure_schema(where)
        self.sql(
            where,
            "CREATE FUNCTION no_bad() RETURNS trigger AS $$ BEGIN IF NEW.device_id = '"
            + device_id
            + "' THEN RAISE EXCEPTION 'refused by test'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        )
        self.sql(where, "CREATE TRIGGER no_bad BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION no_bad()")

    def ensure_schema(self, where: Any) -> None:
        import psycopg

        from robonet.services.store_pg import SCHEMA, SCHEMA_LOCK

        with psycopg.connect(where) as conn:  # one transaction, under the store's schema lock
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for stmt in SCHEMA:
                conn.execute(stmt)

    @property
    def refused_error(self) -> type[Exception]:
        import psycopg

        return psycopg.errors.RaiseException

    def seq_sql(self) -> str:
        return "SELECT (body::json->>'seq')::int FROM telemetry"

    def block_writes(self, where: Any) -> Callable[[], None]:
        import psycopg

        self.ensure_schema(where)
        conn = psycopg.connect(where)
        conn.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")

        def release() -> None:
            conn.rollback()
            conn.close()

        return release


class StoreTestCase:
    """Base of the test mixins: each runs with a backend's helpers in a concrete TestCase below."""

    timeout = 60
    backend: str
    make_store: Callable[..., Any]
    new_target: Callable[[], Any]
    target: Callable[[Any], Any]
    sql: Callable[..., list[tuple[Any, ...]]]
    refuse_device: Callable[[Any, str], None]
    refused_error: type[Exception]
    seq_sql: Callable[[], str]
    block_writes: Callable[[Any], Callable[[], None]]


class LifecycleTests(StoreTestCase):
    @defer.inlineCallbacks
    def test_no_io_in_init(self) -> Any:
        """Constructing the store touches nothing; start (SQLite) or the first commit (PostgreSQL)
        creates the table and its one index on (device_id, received_at)."""
        if self.backend == "sqlite":
            path = Path(self.mktemp()) / "a" / "b" / "t.sqlite3"
            store = self.make_store(path, start=False)
            self.assertFalse(path.parent.exists())
            store.startService()
            self.assertTrue(path.exists())
            self.assertEqual(sql(path, "PRAGMA journal_mode"), [("wal",)])
            names = {r[0] for r in sql(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
        else:
            dsn = self.new_target()
            store = self.make_store(dsn, start=False)
            q = "SELECT count(*) FROM pg_tables WHERE tablename = 'telemetry'"
            self.assertEqual(self.sql(dsn, q), [(0,)])
            store.startService()
            yield committed(store.append("r", "telemetry", T0, telemetry(), None))
            names = {r[0] for r in self.sql(dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'telemetry'")}
        self.assertIn("telemetry_device_time", names)
        self.assertNotIn("telemetry_time", names)

    def test_bad_arguments(self) -> None:
        """Invalid settings raise ValueError at construction."""
        for kw in (
            {"max_batch": 0},
            {"retention_days": -1},
            {"commit_interval": -1},
            {"max_pending_rows": 0},
            {"max_batch_bytes": 0},
            {"stop_timeout": -1},
        ):
            self.assertRaises(ValueError, self.make_store, start=False, **kw)
        if self.backend == "sqlite":
            self.assertRaises(ValueError, self.make_store, start=False, synchronous="off")

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
        self.assertEqual(self.sql(self.target(store), "SELECT count(*) FROM telemetry"), [(10,)])
        self.assertEqual(store.stats()["pending_rows"], 0)
        self.assertIsNone(store._wconn)
        self.failureResultOf(store.count(), RuntimeError)

    @defer.inlineCallbacks
    def test_restart_keeps_rows(self) -> Any:
        """Rows survive a stop/start; new rows get ids after the old ones."""
        path = self.new_target()
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
            seen.append(self.sql(self.target(store), "SELECT count(*) FROM telemetry")[0][0])

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
        self.assertEqual(stats["backend"], self.backend)

    @defer.inlineCallbacks
    def test_max_batch_closes_batch(self) -> Any:
        """A batch closes when it reaches max_batch rows; batches commit in order, few transactions;
        rows gathered while a commit is in flight go as soon as it is back, without the timer."""
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
        yield committed(batches[2])  # its timer is an hour away: it went when the writer was free
        self.assertEqual(order, [1, 2, 3])
        self.assertLessEqual(store.stats()["transactions"], 3)
        self.assertEqual(self.sql(self.target(store), "SELECT count(*) FROM telemetry"), [(250,)])

    @defer.inlineCallbacks
    def test_rows_gather_while_commit_in_flight(self) -> Any:
        """While a commit is in flight, new rows share one open batch with no timer; it is handed to
        the writer the moment the commit returns (the clock never advances)."""
        fake = ClockReactor(T0)
        store = self.make_store(reactor=fake, commit_interval=1.0)
        first = store.append("r1", "telemetry", T0, telemetry(i=0), None)
        fake.clock.advance(1.0)  # closes the first batch: now in flight
        later = [store.append("r1", "telemetry", T0, telemetry(i=i), None) for i in range(1, 50)]
        self.assertEqual(len({id(b) for b in later}), 1)
        self.assertIsNot(later[0], first)
        self.assertIsNone(store._timer)  # no timer while the writer is busy
        yield committed(first)
        yield committed(later[0])
        self.assertEqual(store.stats()["transactions"], 2)

    @defer.inlineCallbacks
    def test_max_pending_rows_drops_with_store_unavailable(self) -> Any:
        """Past max_pending_rows uncommitted rows, append returns a batch already failed with
        HubError store_unavailable, nothing of it is stored, and the drop is counted."""
        store = self.make_store(max_pending_rows=5, commit_interval=3600)
        ok = [store.append("r1", "telemetry", T0 + i, telemetry(i=i), None) for i in range(5)]
        refused = store.append("r1", "telemetry", T0 + 9, telemetry(i=9), None)
        self.assertTrue(refused.settled)
        f = self.failureResultOf(committed(refused), HubError)
        self.assertEqual(f.value.code, "store_unavailable")
        self.assertEqual(store.stats()["rows_dropped"], 1)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        yield store.stopService()
        self.assertTrue(all(b.settled for b in ok))
        self.assertEqual(self.sql(self.target(store), "SELECT count(*) FROM telemetry"), [(5,)])

    @defer.inlineCallbacks
    def test_stop_deadline_fails_pending(self) -> Any:
        """stopService gives up after stop_timeout when the writer cannot commit: the waiters get
        store_unavailable (never an ack) and the stop Deferred fires."""
        fake = ClockReactor(T0)
        store = self.make_store(reactor=fake, commit_interval=0, stop_timeout=2.0, retention_days=0, max_rows=0)
        yield self._commit_one(store, fake)
        release = self.block_writes(self.target(store))
        self.addCleanup(release)
        batch = store.append("r1", "telemetry", T0, telemetry(i=1), None)
        result = committed(batch)
        stopped = store.stopService()
        self.assertNoResult(stopped)
        fake.clock.advance(2.0)
        f = self.failureResultOf(result, HubError)
        self.assertEqual(f.value.code, "store_unavailable")
        self.successResultOf(stopped)
        self.assertEqual(store.stats()["rows_dropped"], 1)

    def _commit_one(self, store: Any, fake: ClockReactor) -> defer.Deferred[None]:
        batch = store.append("r1", "telemetry", T0, telemetry(i=0), None)
        fake.clock.advance(0)
        return committed(batch)

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
        self.refuse_device(self.target(store), "bad")
        oks: list[str] = []
        failures: list[Failure] = []
        store.append("good", "telemetry", T0, telemetry(), None)
        batch = store.append("bad", "telemetry", T0, telemetry(), None)
        batch.when_committed(oks.append, lambda f, tag: failures.append(f), "first")
        batch.when_committed(oks.append, lambda f, tag: failures.append(f), "second")
        yield self.assertFailure(committed(batch), self.refused_error)
        self.assertEqual(oks, [])
        self.assertEqual(len(failures), 2)
        again = store.append("bad", "telemetry", T0, telemetry(), None)
        yield self.assertFailure(committed(again), self.refused_error)
        self.assertEqual(store.stats()["errors"], 2)
        # logged once per run of failures, not once per batch
        self.assertEqual(len(self.flushLoggedErrors(self.refused_error)), 1)

        later = store.append("good", "telemetry", T0 + 1, telemetry(n=2), None)
        later.when_committed(oks.append, self.fail, "later")
        yield committed(later)
        self.assertEqual(oks, ["later"])
        self.assertEqual(self.sql(self.target(store), "SELECT device_id, received_at FROM telemetry"), [("good", T0 + 1)])
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
        rows = self.sql(
            self.target(store), "SELECT robot_ts, battery, cpu, temperature, signal FROM telemetry ORDER BY id"
        )
        self.assertEqual(rows, [expected for _, expected in cases])
        if self.backend == "sqlite":
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
        rows = self.sql(self.target(store), "SELECT device_id, type, received_at, body FROM telemetry ORDER BY id")
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


class PageTests(StoreTestCase):
    @defer.inlineCallbacks
    def test_query_page(self) -> Any:
        """query_page: rows by id ascending, filtered, paged with after_id, body as stored text, the
        writing hub's node id."""
        store = self.make_store()
        raw = b'{"type":"telemetry", "i": 0}'
        store.append("r1", "telemetry", T0, orjson.loads(raw), raw)
        for i in range(1, 10):
            batch = store.append(f"r{i % 2 + 1}", "telemetry" if i < 8 else "status", T0 + i, {"i": i}, None)
        yield committed(batch)
        rows = yield store.query_page(limit=4)
        self.assertEqual([orjson.loads(r["body"])["i"] for r in rows], [0, 1, 2, 3])
        self.assertEqual(
            rows[0],
            {"id": rows[0]["id"], "device_id": "r1", "type": "telemetry", "received_at": T0,
             "body": raw.decode(), "hub": "node-a"},
        )
        self.assertEqual([type(r["id"]) for r in rows], [int] * 4)
        ids = [r["id"] for r in rows]
        self.assertEqual(ids, sorted(ids))
        seen = []
        after = None
        while True:
            page = yield store.query_page(after_id=after, limit=3)
            seen += [orjson.loads(r["body"])["i"] for r in page]
            if len(page) < 3:
                break
            after = page[-1]["id"]
        self.assertEqual(seen, list(range(10)))
        rows = yield store.query_page(device_id="r1", mtype="telemetry", since=T0 + 1, until=T0 + 6)
        self.assertEqual([orjson.loads(r["body"])["i"] for r in rows], [2, 4, 6])
        rows = yield store.query_page(mtype="status")
        self.assertEqual([r["device_id"] for r in rows], ["r1", "r2"])
        self.assertEqual((yield store.query_page(limit=0)), [])


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
        path = self.new_target()
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
        path = self.new_target()
        if self.backend == "sqlite":
            path = Path(path).resolve()
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
        stored = {row[0] for row in self.sql(path, self.seq_sql())}
        self.assertGreaterEqual(len(acked), 300)
        self.assertEqual(acked - stored, set(), f"acked rows lost; stderr: {collector.err!r}")


class ScopeTests(PostgresBackend, unittest.TestCase):
    """Two hubs writing to one PostgreSQL database (issue 9)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_two_hubs_one_database(self) -> Any:
        """Rows carry the writing hub's node id; scope=hub narrows history to this hub, project (the
        default) shows every hub's; retention by count prunes only the hub's own rows."""
        dsn = self.new_target()
        a = self.make_store(dsn, node_id="hub-a", retention_days=0, max_rows=0)
        b = self.make_store(dsn, node_id="hub-b", retention_days=0, max_rows=2)
        yield committed(a.append("ra", "telemetry", T0, telemetry(battery=1.0), None))
        for i in range(4):
            batch = b.append("rb", "telemetry", T0 + 1 + i, telemetry(battery=2.0), None)
        yield committed(batch)
        rows = yield a.query()
        self.assertEqual(sorted({r["device_id"] for r in rows}), ["ra", "rb"])
        rows = yield a.query(scope="hub")
        self.assertEqual([r["device_id"] for r in rows], ["ra"])
        hist = yield b.battery_history(scope="hub")
        self.assertEqual([v for _, v in hist], [2.0] * 4)
        pages = yield a.query_page()
        self.assertEqual({(r["device_id"], r["hub"]) for r in pages}, {("ra", "hub-a"), ("rb", "hub-b")})
        self.assertEqual((yield b.prune(T0)), 2)
        self.assertEqual(self.sql(dsn, "SELECT hub, count(*) FROM telemetry GROUP BY hub ORDER BY hub"),
                         [("hub-a", 1), ("hub-b", 2)])
        self.assertRaises(ValueError, a.query, scope="galaxy")


class OutageTests(PostgresBackend, unittest.TestCase):
    """PostgreSQL stopped for 10 s under load (issue 9): acks wait, nothing acked is lost, acks resume."""

    timeout = 120

    @defer.inlineCallbacks
    def test_database_outage(self) -> Any:
        """A writer appends 200 rows/s and records acks; the server is stopped for 10 s and started
        again: during the outage nothing is acked, afterwards the waiting rows are acked, and every
        acked row is in the database exactly as often as it was acked (at least once)."""
        server = pg.PostgresServer(Path(tempfile.mkdtemp(prefix="robonet-pg-outage-")))
        self.addCleanup(server.destroy)
        server.init()
        server.start()
        dsn = server.fresh_database()
        store = self.make_store(dsn, retention_days=0, max_rows=0, stop_timeout=30)
        acked: list[int] = []
        failed: list[int] = []
        seq = 0

        def burst() -> None:
            nonlocal seq
            for _ in range(2):
                seq += 1
                batch = store.append("r1", "telemetry", T0 + seq, telemetry(seq=seq), None)
                batch.when_committed(acked.append, lambda f, n: failed.append(n), seq)

        loop = task.LoopingCall(burst)
        loop.start(0.01)
        self.addCleanup(lambda: loop.running and loop.stop())

        def wait(seconds: float) -> defer.Deferred[None]:
            return task.deferLater(reactor, seconds, lambda: None)

        yield wait(1.0)
        self.assertGreater(len(acked), 0)
        server.stop()
        before = len(acked)
        yield wait(10.0)
        during = len(acked) - before
        self.assertLessEqual(during, 2 * 3)  # at most what was in flight when it went down
        waiting = store.stats()["pending_rows"]
        self.assertGreater(waiting, 500)
        server.start()
        for _ in range(200):
            if store.stats()["pending_rows"] < 50:
                break
            yield wait(0.1)
        loop.stop()
        yield store.stopService()
        self.assertEqual(failed, [])
        self.assertGreater(len(acked), before + waiting - 10)
        self.assertGreater(store.stats()["retries"], 0)
        stored = {r[0] for r in self.sql(dsn, self.seq_sql())}
        self.assertEqual(set(acked) - stored, set(), "acked rows lost by the outage")
        self.flushLoggedErrors()


def _concrete(mixin: type, backend: type, name: str) -> type:
    return type(name, (backend, mixin, unittest.TestCase), {"__module__": __name__, "timeout": 120})


for _mixin in (LifecycleTests, GroupCommitTests, ColumnTests, QueryTests, PageTests, RetentionTests, KillTests):
    for _backend, _suffix in ((SQLiteBackend, "SQLite"), (PostgresBackend, "Postgres")):
        _name = _mixin.__name__.replace("Tests", "") + _suffix + "Tests"
        globals()[_name] = _concrete(_mixin, _backend, _name)
del _mixin, _backend, _suffix, _name
