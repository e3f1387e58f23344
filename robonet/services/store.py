"""The telemetry store: SQLite in WAL mode with group commit off the reactor thread.

Implements spec/websocket.md "Persistence" and the HARDENING.md "store" row: every message a face
hands to :meth:`TelemetryStore.append` lands in the open :class:`Batch`; one dedicated writer thread
commits batches in order, one transaction at a time, and each Batch tells its waiters on the reactor
thread once its COMMIT returned. Faces ack only then, so a kill -9 never loses an acknowledged row
(WAL + ``synchronous=NORMAL`` survives a process crash; ``synchronous=FULL`` also survives power loss).

Threads: the writer is a private ``ThreadPool(1, 1)`` that owns the write connection (commits and
retention); queries run on a second private one-thread pool with their own read connection (WAL lets
it read while the writer writes). Neither is the reactor's default pool.

Table ``telemetry`` (one row per message)::

    id INTEGER PRIMARY KEY, device_id TEXT, type TEXT, received_at REAL (hub time, Unix s),
    robot_ts REAL (the message's ts/timestamp when numeric), body TEXT (the message JSON),
    battery REAL, cpu REAL, temperature REAL, signal REAL
"""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import attrs
import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS telemetry (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        type TEXT NOT NULL,
        received_at REAL NOT NULL,
        robot_ts REAL,
        body TEXT NOT NULL,
        battery REAL,
        cpu REAL,
        temperature REAL,
        signal REAL
    )""",
    "CREATE INDEX IF NOT EXISTS telemetry_device_time ON telemetry (device_id, received_at)",
    "CREATE INDEX IF NOT EXISTS telemetry_time ON telemetry (received_at)",
)
INSERT = (
    "INSERT INTO telemetry (device_id, type, received_at, robot_ts, body, battery, cpu, temperature, signal)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Rows per multi-row INSERT statement (9 parameters each; SQLite allows 32766 per statement).
# executemany releases and re-takes the GIL around every row's sqlite3_step; against a busy reactor
# thread that fell to ~5k rows/s here, while one statement per chunk (bound in C, stepped once)
# kept ~68k rows/s: the writer needs the GIL a few times per transaction, not once per row.
INSERT_CHUNK = 1000


@functools.lru_cache(maxsize=8)
def _insert_many(n: int) -> str:
    """``INSERT ... VALUES (...),(...)`` for ``n`` rows."""
    return INSERT.split(" VALUES ")[0] + " VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?)"] * n)


COLUMNS = ("id", "device_id", "type", "received_at", "robot_ts", "battery", "cpu", "temperature", "signal")
SELECT = "SELECT " + ", ".join(COLUMNS) + ", body FROM telemetry"

RETENTION_INTERVAL = 60.0  # seconds between retention passes (plus one at start)
PRUNE_CHUNK = 20_000  # rows deleted per writer job, so commits interleave with a large prune
MAX_QUERY_ROWS = 10_000  # cap on query()/battery_history() limit
BUSY_TIMEOUT = 10.0  # seconds SQLite waits on a lock held by another process before failing

# A stored row: (device_id, type, received_at, robot_ts, body, battery, cpu, temperature, signal).
Row = tuple[str, str, float, float | None, str, float | None, float | None, float | None, float | None]


class StoreReactor(Protocol):
    """What the store needs of its reactor: IReactorTime's ``callLater``/``seconds`` and
    IReactorFromThreads' ``callFromThread`` (structurally; any reactor, or a test double, fits)."""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        """Run ``callable`` after ``delay`` seconds."""

    def seconds(self) -> float:
        """The current time in Unix seconds."""

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kw: object) -> None:
        """Run ``callable`` on the reactor thread soon; safe to call from any thread."""


def _as_float(v: object) -> float | None:
    """A telemetry value as stored: int/float (not bool) -> float, anything else -> None."""
    if v.__class__ is float:
        return v
    if v.__class__ is int:
        try:
            return float(v)
        except OverflowError:
            return None
    return None


def _daemon_thread(*args: Any, **kw: Any) -> threading.Thread:
    thread = threading.Thread(*args, **kw)
    thread.daemon = True
    return thread


class _WorkerPool(ThreadPool):
    """A ThreadPool whose workers are daemon threads: if the reactor stops without stopService having
    finished, the process still exits (like a crash: committed rows are safe, unacked ones are lost)
    instead of hanging on a worker forever."""

    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


_Waiter = tuple[Callable[..., object], Callable[..., object], tuple[Any, ...]]


@attrs.define(slots=True, eq=False)
class Batch:
    """Rows committed together in one transaction; faces wait on it before acking.

    ``size`` is the number of rows. Settled once, on the reactor thread: committed or failed.
    """

    log = Logger()

    rows: list[Row] = attrs.Factory(list)
    _waiters: list[_Waiter] | None = attrs.Factory(list)  # None once settled
    _failure: Failure | None = None
    _size: int = 0  # the row count once settled (rows are then released)

    @property
    def size(self) -> int:
        """Rows in this batch."""
        return len(self.rows) if self._waiters is not None else self._size

    @property
    def settled(self) -> bool:
        """True once the COMMIT succeeded or failed."""
        return self._waiters is None

    def when_committed(self, ok: Callable[..., object], failed: Callable[..., object], *args: Any) -> None:
        """Call ``ok(*args)`` after the COMMIT succeeded, or ``failed(failure, *args)`` after it failed.

        Both are called on the reactor thread; at once if the batch has already settled. Exceptions
        they raise are logged and do not affect other waiters.
        """
        waiters = self._waiters
        if waiters is not None:
            waiters.append((ok, failed, args))
        else:
            self._call(ok, failed, args)

    def _call(self, ok: Callable[..., object], failed: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            if self._failure is None:
                ok(*args)
            else:
                failed(self._failure, *args)
        except Exception:
            self.log.failure("store batch callback {cb!r} raised", cb=ok if self._failure is None else failed)

    def _settle(self, failure: Failure | None) -> None:
        """Record the outcome and run the waiters (reactor thread)."""
        waiters = self._waiters
        if waiters is None:
            return
        self._size = len(self.rows)
        self.rows = []
        self._failure = failure
        self._waiters = None
        for ok, failed, args in waiters:
            self._call(ok, failed, args)


class TelemetryStore(Service):
    """Persist robot messages to SQLite with group commit (spec/websocket.md "Persistence").

    ``path``: the database file (parent directories are created at start). ``reactor``: provides
    ``callLater``, ``seconds`` and ``callFromThread`` (see :class:`StoreReactor`).
    ``retention_days``: rows whose ``received_at`` is older are deleted (0 = keep forever).
    ``max_rows``: the oldest rows beyond this count are deleted (0 = unlimited); both checked at start
    and every 60 s. ``synchronous``: ``"normal"`` (survives a process crash) or ``"full"`` (also power
    loss). ``commit_interval``: seconds a batch stays open after its first row (0 = until the next
    reactor turn). ``max_batch``: a batch is closed at once when it holds this many rows.

    No I/O happens before :meth:`startService`, which opens (and creates) the database and raises
    ``sqlite3.Error``/``OSError`` if it cannot. Raises ``ValueError`` for invalid arguments.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        *,
        reactor: StoreReactor,
        retention_days: float = 30,
        max_rows: int = 5_000_000,
        synchronous: str = "normal",
        commit_interval: float = 0.005,
        max_batch: int = 10_000,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if retention_days < 0 or max_rows < 0 or commit_interval < 0 or max_batch < 1:
            raise ValueError("retention_days, max_rows, commit_interval must be >= 0 and max_batch >= 1")
        self.path = Path(path)
        self._reactor = reactor
        self._threads_reactor = cast(IReactorFromThreads, reactor)
        self.retention_days = float(retention_days)
        self.max_rows = int(max_rows)
        self.synchronous = synchronous
        self.commit_interval = float(commit_interval)
        self.max_batch = int(max_batch)

        self._accepting = False
        self._open: Batch | None = None
        self._timer: IDelayedCall | None = None
        self._closed: deque[Batch] = deque()
        self._inflight: list[Batch] = []
        self._handed_at = 0.0
        self._stopping: list[Deferred[None]] | None = None  # waiters for stopService
        self._closing = False  # the close jobs are queued
        self._writer: ThreadPool | None = None
        self._reader: ThreadPool | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._retention: LoopingCall | None = None
        self._row_count: int | None = None  # writer thread only: rows in the table

        self.rows_written = 0
        self.batches_committed = 0
        self.transactions = 0
        self.rows_deleted = 0
        self.errors = 0
        self.last_commit_ms = 0.0
        self._failing = 0  # consecutive failed commits (logs once per run of failures, not per batch)

    # --- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        """Open the database (create dirs, schema, WAL), start the writer/reader threads and retention."""
        if self._accepting:
            return
        if self._stopping is not None:
            raise RuntimeError("telemetry store is still stopping")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wconn = self._connect()
        try:
            mode = wconn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path}: cannot use WAL journal mode (got {mode})")
            wconn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            for stmt in SCHEMA:
                wconn.execute(stmt)
            rconn = self._connect()
            rconn.execute("PRAGMA query_only=ON")
        except BaseException:
            wconn.close()
            raise
        self._wconn, self._rconn = wconn, rconn
        self._row_count = None
        self._writer = _WorkerPool(1, 1, "robonet-store-writer")
        self._reader = _WorkerPool(1, 1, "robonet-store-reader")
        self._writer.start()
        self._reader.start()
        self._accepting = True
        super().startService()  # type: ignore[no-untyped-call]
        self.log.info(
            "telemetry store open at {path} (synchronous={sync}, retention {days} days, max {max_rows} rows)",
            path=str(self.path),
            sync=self.synchronous,
            days=self.retention_days,
            max_rows=self.max_rows,
        )
        if self.retention_days or self.max_rows:
            loop = self._retention = LoopingCall(self._retention_pass)
            loop.clock = cast(Any, self._reactor)
            loop.start(RETENTION_INTERVAL, now=True)

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: transactions are explicit. Used only from one thread each, but opened here.
        return sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )

    def stopService(self) -> Deferred[None]:
        """Stop taking rows, commit everything pending, close the database; fires when done."""
        if self._stopping is not None:
            d: Deferred[None] = Deferred()
            self._stopping.append(d)
            return d
        if not self._accepting:
            return succeed(None)
        super().stopService()  # type: ignore[no-untyped-call]
        self._accepting = False
        if self._retention is not None and self._retention.running:
            self._retention.stop()
        self._retention = None
        self._close_open()
        done: Deferred[None] = Deferred()
        self._stopping = [done]
        self._maybe_finish_stop()
        return done

    def _maybe_finish_stop(self) -> None:
        if self._stopping is None or self._inflight or self._closed or self._open is not None:
            return
        if self._closing:
            return
        self._closing = True
        writer, reader = self._writer, self._reader
        assert writer is not None and reader is not None
        # FIFO pools: these run after every job queued before them (commits, prune steps, queries).
        dw = deferToThreadPool(self._threads_reactor, writer, self._close_conn, self._wconn)
        dr = deferToThreadPool(self._threads_reactor, reader, self._close_conn, self._rconn)

        def closed(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("telemetry store: closing the database failed", failure=result)
            writer.stop()
            reader.stop()
            self._writer = self._reader = None
            self._closing = False
            self._wconn = self._rconn = None
            waiters, self._stopping = self._stopping or [], None
            self.log.info("telemetry store closed ({rows} rows written)", rows=self.rows_written)
            for d in waiters:
                d.callback(None)

        dw.addBoth(lambda r: dr).addBoth(closed)

    @staticmethod
    def _close_conn(conn: sqlite3.Connection | None) -> None:
        if conn is not None:
            conn.close()

    # --- the hot path (reactor thread) ---------------------------------------------------------

    def append(
        self, device_id: str, type: str, received_at: float, body: dict[str, Any], raw: bytes | None
    ) -> Batch:
        """Queue one message for the next group commit; returns the Batch to wait on before acking.

        ``received_at`` is hub time (Unix s); ``body`` the decoded JSON object; ``raw`` its UTF-8 JSON
        as received, stored as is when given (else ``body`` is encoded with orjson). O(1), no I/O.
        Raises RuntimeError when the store is not running (before start, after stopService).
        """
        batch = self._open
        if batch is None:
            if not self._accepting:
                raise RuntimeError("telemetry store is not running")
            batch = self._open = Batch()
            self._timer = self._reactor.callLater(self.commit_interval, self._on_timer)
        get = body.get
        ts = get("ts")
        if ts.__class__ is not float:
            ts = _as_float(ts)
            if ts is None:
                ts = _as_float(get("timestamp"))
        v1 = get("battery")
        if v1.__class__ is not float:
            v1 = _as_float(v1)
        v2 = get("cpu")
        if v2.__class__ is not float:
            v2 = _as_float(v2)
        v3 = get("temperature")
        if v3.__class__ is not float:
            v3 = _as_float(v3)
        v4 = get("signal")
        if v4.__class__ is not float:
            v4 = _as_float(v4)
        if raw is None:
            try:
                raw = orjson.dumps(body)
            except TypeError:  # not JSON-able by orjson (e.g. an int beyond 64 bits): keep it readable
                raw = json.dumps(body, default=repr).encode()
        text = raw.decode("utf-8", "replace")
        rows = batch.rows
        rows.append((device_id, type, received_at, ts, text, v1, v2, v3, v4))
        if len(rows) >= self.max_batch:
            self._close_open()
        return batch

    def _on_timer(self) -> None:
        self._timer = None
        self._close_open()

    def _close_open(self) -> None:
        """Close the open batch (if any) and hand it towards the writer."""
        timer = self._timer
        if timer is not None:
            self._timer = None
            if timer.active():
                timer.cancel()
        batch = self._open
        if batch is not None:
            self._open = None
            self._closed.append(batch)
            self._kick()

    def _kick(self) -> None:
        """Start the next transaction if none is in flight: all closed batches up to max_batch rows."""
        if self._inflight or not self._closed:
            return
        closed = self._closed
        batches = [closed.popleft()]
        n = len(batches[0].rows)
        while closed and n + len(closed[0].rows) <= self.max_batch:
            b = closed.popleft()
            n += len(b.rows)
            batches.append(b)
        self._inflight = batches
        self._handed_at = self._reactor.seconds()
        assert self._writer is not None
        self._writer.callInThreadWithCallback(self._from_writer, self._commit, [b.rows for b in batches])

    # --- writer thread ---------------------------------------------------------------------------

    def _commit(self, row_lists: list[list[Row]]) -> int:
        """Insert all rows in one transaction (writer thread); returns the row count."""
        conn = self._wconn
        assert conn is not None
        conn.execute("BEGIN")
        try:
            rows = row_lists[0] if len(row_lists) == 1 else list(itertools.chain.from_iterable(row_lists))
            n = len(rows)
            for i in range(0, n, INSERT_CHUNK):
                part = rows[i : i + INSERT_CHUNK]
                conn.execute(_insert_many(len(part)), list(itertools.chain.from_iterable(part)))
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error is the one to report
            raise
        if self._row_count is not None:
            self._row_count += n
        return n

    def _from_writer(self, success: bool, result: object) -> None:
        self._reactor.callFromThread(self._committed, success, result)

    # --- back on the reactor thread --------------------------------------------------------------

    def _committed(self, success: bool, result: object) -> None:
        batches, self._inflight = self._inflight, []
        now = self._reactor.seconds()
        if success:
            self.rows_written += cast(int, result)
            self.batches_committed += len(batches)
            self.transactions += 1
            self.last_commit_ms = (now - self._handed_at) * 1000.0
            failure = None
            if self._failing:
                self.log.info("telemetry store: commits succeed again after {n} failures", n=self._failing)
                self._failing = 0
        else:
            failure = cast(Failure, result)
            self.errors += 1
            self._failing += 1
            if self._failing == 1 or self._failing % 1000 == 0:
                self.log.failure(
                    "telemetry store: commit of {rows} rows failed ({n} in a row); their acks become errors",
                    failure=failure,
                    rows=sum(len(b.rows) for b in batches),
                    n=self._failing,
                )
        for b in batches:
            b._settle(failure)
        self._kick()
        self._maybe_finish_stop()

    # --- retention ---------------------------------------------------------------------------------

    def _retention_pass(self) -> Deferred[int]:
        d = self.prune(self._reactor.seconds())

        def failed(f: Failure) -> int:
            self.errors += 1
            self.log.failure("telemetry store: retention pass failed", failure=f)
            return 0

        return d.addErrback(failed)

    def prune(self, now: float) -> Deferred[int]:
        """Delete rows with ``received_at < now - retention_days`` (unless 0) and the oldest rows beyond
        ``max_rows`` (unless 0), in chunks on the writer thread; fires with the number deleted."""
        if self._writer is None:
            return fail(RuntimeError("telemetry store is not running"))
        cutoff = now - self.retention_days * 86400.0 if self.retention_days else None
        result: Deferred[int] = Deferred()
        total = 0

        def step() -> None:
            if self._writer is None:
                result.callback(total)
                return
            d = deferToThreadPool(
                self._threads_reactor, self._writer, self._prune_step, cutoff, self.max_rows
            )
            d.addCallbacks(stepped, result.errback)

        def stepped(deleted: int) -> None:
            nonlocal total
            total += deleted
            self.rows_deleted += deleted
            if deleted >= PRUNE_CHUNK and self._accepting:
                step()
                return
            if total:
                self.log.info("telemetry store: retention deleted {rows} rows", rows=total)
            result.callback(total)

        step()
        return result

    def _prune_step(self, cutoff: float | None, max_rows: int) -> int:
        """Delete up to PRUNE_CHUNK rows (writer thread); returns how many."""
        conn = self._wconn
        assert conn is not None
        if self._row_count is None:
            self._row_count = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
        deleted = 0
        if cutoff is not None:
            deleted = conn.execute(
                "DELETE FROM telemetry WHERE id IN"
                " (SELECT id FROM telemetry WHERE received_at < ? ORDER BY received_at LIMIT ?)",
                (cutoff, PRUNE_CHUNK),
            ).rowcount
        if max_rows and deleted < PRUNE_CHUNK:
            excess = self._row_count - deleted - max_rows
            if excess > 0:
                deleted += conn.execute(
                    "DELETE FROM telemetry WHERE id IN (SELECT id FROM telemetry ORDER BY id LIMIT ?)",
                    (min(excess, PRUNE_CHUNK - deleted),),
                ).rowcount
        self._row_count -= deleted
        return deleted

    # --- queries (reader thread) -------------------------------------------------------------------

    def _read(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._reader is None or self._stopping is not None:
            return fail(RuntimeError("telemetry store is not running"))
        return deferToThreadPool(self._threads_reactor, self._reader, fn, *args)

    def query(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        type: str | None = None,
    ) -> Deferred[list[dict[str, Any]]]:
        """Stored rows, newest first, as dicts with keys ``id, device_id, type, received_at, robot_ts,
        battery, cpu, temperature, signal, body`` (``body`` parsed). ``since``/``until`` bound
        ``received_at`` (inclusive, Unix s); ``limit`` is clamped to 0..10,000."""
        where: list[str] = []
        params: list[Any] = []
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if type is not None:
            where.append("type = ?")
            params.append(type)
        if since is not None:
            where.append("received_at >= ?")
            params.append(float(since))
        if until is not None:
            where.append("received_at <= ?")
            params.append(float(until))
        sql = SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY received_at DESC, id DESC LIMIT ?"
        params.append(max(0, min(int(limit), MAX_QUERY_ROWS)))
        return self._read(self._query_rows, sql, params)

    def _query_rows(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        conn = self._rconn
        assert conn is not None
        out = []
        for row in conn.execute(sql, params):
            d = dict(zip(COLUMNS, row, strict=False))
            try:
                d["body"] = orjson.loads(row[-1])
            except orjson.JSONDecodeError:
                d["body"] = {"raw": row[-1]}
            out.append(d)
        return out

    def battery_history(self, device_id: str | None = None, limit: int = 100) -> Deferred[list[list[Any]]]:
        """The last ``limit`` ``telemetry`` rows with a battery value, oldest first, as
        ``[epoch_ms (int), battery (float)]`` (the original ``/api/battery-history/`` shape)."""
        sql = "SELECT received_at, battery FROM telemetry WHERE type = 'telemetry' AND battery IS NOT NULL"
        params: list[Any] = []
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        sql += " ORDER BY received_at DESC, id DESC LIMIT ?"
        params.append(max(0, min(int(limit), MAX_QUERY_ROWS)))
        return self._read(self._history_rows, sql, params)

    def _history_rows(self, sql: str, params: list[Any]) -> list[list[Any]]:
        conn = self._rconn
        assert conn is not None
        rows = conn.execute(sql, params).fetchall()
        rows.reverse()
        return [[int(at * 1000), battery] for at, battery in rows]

    def count(self) -> Deferred[int]:
        """The number of rows in the table (committed ones)."""
        return self._read(self._count_rows)

    def _count_rows(self) -> int:
        conn = self._rconn
        assert conn is not None
        return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])

    # --- introspection -----------------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        """Rows appended but not yet settled (open, closed and in-flight batches)."""
        n = sum(b.size for b in self._closed) + sum(b.size for b in self._inflight)
        return n + (self._open.size if self._open is not None else 0)

    def stats(self) -> dict[str, Any]:
        """Counters: rows_written, batches_committed, transactions, pending_rows, last_commit_ms
        (reactor time from hand-off to the writer until the commit was reported back), errors,
        rows_deleted, path."""
        return {
            "rows_written": self.rows_written,
            "batches_committed": self.batches_committed,
            "transactions": self.transactions,
            "pending_rows": self.pending_rows,
            "last_commit_ms": round(self.last_commit_ms, 3),
            "errors": self.errors,
            "rows_deleted": self.rows_deleted,
            "path": str(self.path),
        }
