"""The telemetry store: the common group-commit contract, and its SQLite backend.

Implements spec/websocket.md "Persistence" and the HARDENING.md "store" row: every message a face
hands to :meth:`GroupCommitStore.append` lands in the open :class:`Batch`; one dedicated writer thread
commits batches in order, one transaction at a time, and each Batch tells its waiters on the reactor
thread once its COMMIT returned. Faces ack only then, so a kill -9 never loses an acknowledged row
(SQLite: WAL + ``synchronous=NORMAL`` survives a process crash, ``FULL`` also power loss).

Batching (reactor thread): while no commit is in flight, a new batch is closed ``commit_interval``
seconds after its first row; while one is in flight, rows gather in the open batch and it is handed
to the writer the moment the previous COMMIT is back, so transactions grow with the load ("larger
chunks under load") and no row waits for a timer behind a busy writer. A batch also closes at
``max_batch`` rows or ``max_batch_bytes`` of JSON. Rows not yet committed are capped at
``max_pending_rows``: past it :meth:`append` returns a batch that has already failed with
``HubError("store_unavailable")`` and the row is dropped and counted (``rows_dropped``). Frames with
an id then get a ``store_unavailable`` error instead of an ack; id-less (fire-and-forget) frames are
dropped, counted, never buffered without bound (drops, not backpressure).

:class:`TelemetryStore` (below) is the SQLite backend; ``robonet.services.store_pg`` has the
PostgreSQL one. Both expose the same reads: :meth:`~GroupCommitStore.query`,
:meth:`~GroupCommitStore.battery_history`, :meth:`~GroupCommitStore.count` and the streaming
:meth:`~GroupCommitStore.query_page`. :func:`build_store` makes the configured one.

This module is over 600 lines because the contract (Batch, group commit, lifecycle) and the
SQLite backend are documented to live together; the backend part is the smaller half.

SQLite table ``telemetry`` (one row per message)::

    id INTEGER PRIMARY KEY, device_id TEXT, type TEXT, received_at REAL (hub time, Unix s),
    robot_ts REAL (the message's ts/timestamp when numeric), body TEXT (the message JSON),
    battery REAL, cpu REAL, temperature REAL, signal REAL

with one index, ``(device_id, received_at)``. Rows are in ``id`` order = the order the hub received
them; unfiltered history and age retention walk that order instead of a second index.
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
from typing import TYPE_CHECKING, Any, Protocol, cast

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

from robonet.model import HubError

if TYPE_CHECKING:
    from robonet.config import Config

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
    # One index per row written, not two: time order is id order (see the module docstring).
    "DROP INDEX IF EXISTS telemetry_time",
)
_COLS = "(device_id, type, received_at, robot_ts, body, battery, cpu, temperature, signal)"
# Fixed statement sizes (rows): a chunk of m rows uses the smallest size >= m, padded with NULL rows
# that the WHERE drops, so only these few statements are ever prepared (and stay cached); 3640 rows
# x 9 parameters stays under SQLite's 32766. One execute = one GIL hand-off of the writer thread.
STATEMENT_ROWS = (8, 32, 128, 512, 2048, 3640)
CHECKPOINT_ROWS = 200_000  # rows after which a WAL checkpoint runs even if the writer never idles

RETENTION_INTERVAL = 60.0  # seconds between retention passes (plus one at start)
PRUNE_CHUNK = 20_000  # rows deleted per writer job, so commits interleave with a large prune
MAX_QUERY_ROWS = 10_000  # cap on query()/battery_history()/query_page() limit
BUSY_TIMEOUT = 10.0  # seconds SQLite waits on a lock held by another process before failing
RETRY_MIN, RETRY_MAX = 0.1, 5.0  # backoff (s) between retries of a commit that failed transiently

COLUMNS = ("id", "device_id", "type", "received_at", "robot_ts", "battery", "cpu", "temperature", "signal")
SELECT = "SELECT " + ", ".join(COLUMNS) + ", body FROM telemetry"

# A stored row: (device_id, type, received_at, robot_ts, body, battery, cpu, temperature, signal).
Row = tuple[str, str, float, float | None, str, float | None, float | None, float | None, float | None]


@functools.lru_cache(maxsize=len(STATEMENT_ROWS))
def _insert_padded(n: int) -> str:
    """A multi-row INSERT of ``n`` parameter rows; rows whose device_id is NULL are skipped."""
    values = ",".join(["(?,?,?,?,?,?,?,?,?)"] * n)
    return f"INSERT INTO telemetry {_COLS} SELECT * FROM (VALUES {values}) WHERE column1 IS NOT NULL"


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
        return cast(float, v)
    if v.__class__ is int:
        try:
            return float(cast(int, v))
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
    nbytes: int = 0  # JSON bytes of the rows (for max_batch_bytes)

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


def _failed_batch(code: str, message: str) -> Batch:
    """A batch that has already failed with ``HubError(code)`` (waiters run at once)."""
    batch = Batch()
    batch._settle(Failure(HubError(code, message)))
    return batch


class GroupCommitStore(Service):
    """The store contract shared by the backends: group commit off the reactor thread.

    Subclasses implement the writer-thread methods ``_open_writer``, ``_commit_rows``,
    ``_prune_step``, ``_close_writer``, the reader-thread ones ``_select`` and ``_close_reader``,
    and may override ``_transient`` (a failed commit is retried, its waiters keep waiting) and
    ``_idle`` (writer-thread housekeeping when no commit is queued).

    Arguments (all keyword): ``reactor`` (:class:`StoreReactor`); ``retention_days`` (rows older are
    deleted, 0 = keep); ``max_rows`` (oldest rows beyond it deleted, 0 = unlimited; both checked at
    start and every 60 s); ``commit_interval`` (s a batch stays open after its first row while the
    writer is idle; 0 = next reactor turn); ``max_batch`` (rows; also the most rows of one
    transaction); ``max_batch_bytes`` (JSON bytes a batch closes at); ``max_pending_rows`` (rows not
    yet committed beyond which appends fail with ``store_unavailable``); ``stop_timeout`` (s
    :meth:`stopService` waits for pending commits before failing them); ``node_id`` (this hub's node
    id: the ``hub`` of its rows). Raises ``ValueError`` for invalid arguments.
    """

    log = Logger()
    backend = "none"

    def __init__(
        self,
        *,
        reactor: StoreReactor,
        retention_days: float = 30,
        max_rows: int = 5_000_000,
        commit_interval: float = 0.005,
        max_batch: int = 10_000,
        max_batch_bytes: int = 4 << 20,
        max_pending_rows: int = 200_000,
        stop_timeout: float = 10.0,
        node_id: str = "",
    ) -> None:
        if retention_days < 0 or max_rows < 0 or commit_interval < 0 or stop_timeout < 0:
            raise ValueError("retention_days, max_rows, commit_interval, stop_timeout must be >= 0")
        if max_batch < 1 or max_batch_bytes < 1 or max_pending_rows < 1:
            raise ValueError("max_batch, max_batch_bytes and max_pending_rows must be >= 1")
        self._reactor = reactor
        self._threads_reactor = cast(IReactorFromThreads, reactor)
        self.retention_days = float(retention_days)
        self.max_rows = int(max_rows)
        self.commit_interval = float(commit_interval)
        self.max_batch = int(max_batch)
        self.max_batch_bytes = int(max_batch_bytes)
        self.max_pending_rows = int(max_pending_rows)
        self.stop_timeout = float(stop_timeout)
        self.node_id = node_id

        self._accepting = False
        self._open: Batch | None = None
        self._timer: IDelayedCall | None = None
        self._closed: deque[Batch] = deque()
        self._inflight: list[Batch] = []
        self._pending = 0  # rows appended and not yet settled
        self._handed_at = 0.0
        self._retry: IDelayedCall | None = None
        self._retry_delay = RETRY_MIN
        self._stopping: list[Deferred[None]] | None = None  # waiters for stopService
        self._stop_timer: IDelayedCall | None = None
        self._closing = False  # the close jobs are queued
        self._writer: ThreadPool | None = None
        self._reader: ThreadPool | None = None
        self._retention: LoopingCall | None = None
        self._since_idle = 0  # rows committed since the last idle job

        self.rows_written = 0
        self.batches_committed = 0
        self.transactions = 0
        self.rows_deleted = 0
        self.rows_dropped = 0
        self.errors = 0
        self.retries = 0
        self.last_commit_ms = 0.0
        self._commit_ms: deque[float] = deque(maxlen=2048)  # recent commit latencies, for p50/p99
        self._failing = 0  # consecutive failed commits (logs once per run of failures, not per batch)

    # --- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        """Open the backend, start the writer/reader threads and retention (raises if it cannot)."""
        if self._accepting:
            return
        if self._stopping is not None:
            raise RuntimeError("telemetry store is still stopping")
        self._start_backend()
        self._writer = _WorkerPool(1, 1, "robonet-store-writer")
        self._reader = _WorkerPool(1, 1, "robonet-store-reader")
        self._writer.start()
        self._reader.start()
        self._accepting = True
        super().startService()  # type: ignore[no-untyped-call]
        self.log.info(
            "telemetry store ({backend}) open at {where} (retention {days} days, max {max_rows} rows)",
            backend=self.backend,
            where=self.describe(),
            days=self.retention_days,
            max_rows=self.max_rows,
        )
        if self.retention_days or self.max_rows:
            loop = self._retention = LoopingCall(self._retention_pass)
            loop.clock = cast(Any, self._reactor)
            loop.start(RETENTION_INTERVAL, now=True)

    def _start_backend(self) -> None:
        """Synchronous setup at start (reactor thread); the default does nothing."""

    def describe(self) -> str:
        """Where the rows go, for logs and stats (a path, or a DSN without its password)."""
        return ""

    def stopService(self) -> Deferred[None]:
        """Stop taking rows, commit everything pending, close the backend; fires when done.

        Commits still pending after ``stop_timeout`` seconds are given up: their waiters get a
        ``store_unavailable`` failure (never an ack) and the threads are abandoned (daemon threads).
        """
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
        self._stop_timer = self._reactor.callLater(self.stop_timeout, self._stop_deadline)
        self._maybe_finish_stop()
        return done

    def _stop_deadline(self) -> None:
        self._stop_timer = None
        if self._stopping is None:
            return
        batches = self._inflight + list(self._closed)
        lost = sum(b.size for b in batches)
        self.log.error(
            "telemetry store: stop deadline ({s} s) passed with {rows} rows uncommitted; not acked",
            s=self.stop_timeout,
            rows=lost,
        )
        self._inflight, self._closed = [], deque()
        self._pending = 0
        self.rows_dropped += lost
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        failure = Failure(HubError("store_unavailable", "telemetry store stopped before committing"))
        for b in batches:
            b._settle(failure)
        # The writer may be stuck in the backend: abandon both threads (daemon) instead of joining.
        self._writer = self._reader = None
        self._finish_stop()

    def _maybe_finish_stop(self) -> None:
        if self._stopping is None or self._inflight or self._closed or self._open is not None:
            return
        if self._closing:
            return
        self._closing = True
        writer, reader = self._writer, self._reader
        assert writer is not None and reader is not None
        # FIFO pools: these run after every job queued before them (commits, prune steps, queries).
        dw = deferToThreadPool(self._threads_reactor, writer, self._close_writer)
        dr = deferToThreadPool(self._threads_reactor, reader, self._close_reader)

        def closed(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("telemetry store: closing the database failed", failure=result)
            if self._stopping is None:  # the deadline already finished the stop
                return
            writer.stop()
            reader.stop()
            self._writer = self._reader = None
            self._finish_stop()

        dw.addBoth(lambda r: dr).addBoth(closed)

    def _finish_stop(self) -> None:
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self._stop_timer = None
        self._closing = False
        waiters, self._stopping = self._stopping or [], None
        self.log.info("telemetry store closed ({rows} rows written)", rows=self.rows_written)
        for d in waiters:
            d.callback(None)

    # --- the hot path (reactor thread) ---------------------------------------------------------

    def append(
        self, device_id: str, type: str, received_at: float, body: dict[str, Any], raw: bytes | None
    ) -> Batch:
        """Queue one message for the next group commit; returns the Batch to wait on before acking.

        ``received_at`` is hub time (Unix s); ``body`` the decoded JSON object; ``raw`` its UTF-8 JSON
        as received, stored as is when given (else ``body`` is encoded with orjson). O(1), no I/O.
        Past ``max_pending_rows`` uncommitted rows the row is dropped (counted in ``rows_dropped``)
        and the returned batch has already failed with ``HubError("store_unavailable")``.
        Raises RuntimeError when the store is not running (before start, after stopService).
        """
        batch = self._open
        if batch is None:
            if not self._accepting:
                raise RuntimeError("telemetry store is not running")
            if self._pending >= self.max_pending_rows:
                return self._drop()
            batch = self._open = Batch()
            if not self._inflight and self._retry is None:
                self._timer = self._reactor.callLater(self.commit_interval, self._on_timer)
        elif self._pending >= self.max_pending_rows:
            return self._drop()
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
        self._pending += 1
        batch.nbytes += len(raw)
        if len(rows) >= self.max_batch or batch.nbytes >= self.max_batch_bytes:
            self._close_open()
        return batch

    def _drop(self) -> Batch:
        self.rows_dropped += 1
        if self.rows_dropped == 1 or self.rows_dropped % 10_000 == 0:
            self.log.warn(
                "telemetry store: {n} rows waiting for the database (max_pending_rows); dropping new"
                " rows, senders get store_unavailable ({dropped} dropped so far)",
                n=self._pending,
                dropped=self.rows_dropped,
            )
        return _failed_batch("store_unavailable", "telemetry store is not keeping up or unreachable")

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
        """Start the next transaction if none is in flight: closed batches up to max_batch rows."""
        if self._inflight or self._retry is not None or not self._closed:
            return
        closed = self._closed
        batches = [closed.popleft()]
        n = len(batches[0].rows)
        while closed and n + len(closed[0].rows) <= self.max_batch:
            b = closed.popleft()
            n += len(b.rows)
            batches.append(b)
        self._inflight = batches
        self._submit()

    def _submit(self) -> None:
        self._handed_at = self._reactor.seconds()
        assert self._writer is not None
        self._writer.callInThreadWithCallback(
            self._from_writer, self._commit_rows, [b.rows for b in self._inflight]
        )

    def _from_writer(self, success: bool, result: object) -> None:
        self._reactor.callFromThread(self._committed, success, result)

    # --- back on the reactor thread --------------------------------------------------------------

    def _committed(self, success: bool, result: object) -> None:
        batches = self._inflight
        if not batches:  # given up by the stop deadline
            return
        now = self._reactor.seconds()
        if not success and self._transient(cast(Failure, result)):
            self.retries += 1
            self._failing += 1
            if self._failing == 1 or self._failing % 100 == 0:
                self.log.warn(
                    "telemetry store: database unavailable ({error}); {rows} rows wait, retry in"
                    " {delay} s ({n} failures in a row)",
                    error=str(cast(Failure, result).value).strip(),
                    rows=self._pending,
                    delay=self._retry_delay,
                    n=self._failing,
                )
            self._retry = self._reactor.callLater(self._retry_delay, self._retry_commit)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
            return
        self._inflight = []
        self._retry_delay = RETRY_MIN
        rows = sum(len(b.rows) for b in batches)
        self._pending -= rows
        if success:
            self.rows_written += cast(int, result)
            self._since_idle += rows
            self.batches_committed += len(batches)
            self.transactions += 1
            self.last_commit_ms = (now - self._handed_at) * 1000.0
            self._commit_ms.append(self.last_commit_ms)
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
                    rows=rows,
                    n=self._failing,
                )
        for b in batches:
            b._settle(failure)
        # The writer is free: what gathered meanwhile goes now (no timer wait behind a busy writer).
        if self._open is not None:
            self._close_open()
        else:
            self._kick()
        if self._writer is not None and self._since_idle and (
            not self._inflight or self._since_idle >= CHECKPOINT_ROWS
        ):
            self._since_idle = 0
            self._writer.callInThread(self._idle_safe)
        self._maybe_finish_stop()

    def _retry_commit(self) -> None:
        self._retry = None
        if self._inflight and self._writer is not None:
            self._submit()

    def _idle_safe(self) -> None:
        try:
            self._idle()
        except Exception:
            self.log.failure("telemetry store: writer housekeeping failed")

    # --- backend hooks -----------------------------------------------------------------------------

    def _commit_rows(self, row_lists: list[list[Row]]) -> int:
        """Insert all rows in one transaction (writer thread); returns the row count."""
        raise NotImplementedError

    def _transient(self, failure: Failure) -> bool:
        """True if a failed commit should be retried with its waiters still waiting."""
        return False

    def _idle(self) -> None:
        """Writer-thread housekeeping after commits (e.g. a WAL checkpoint)."""

    def _close_writer(self) -> None:
        """Close the writer's connection (writer thread)."""

    def _close_reader(self) -> None:
        """Close the reader's connection (reader thread)."""

    def _prune_step(self, cutoff: float | None, max_rows: int) -> int:
        """Delete up to PRUNE_CHUNK rows (writer thread); returns how many."""
        raise NotImplementedError

    def _select(self, kind: str, where: list[tuple[str, Any]], limit: int, after_id: int | None) -> Any:
        """Run read ``kind`` (rows, history, page, count) on the reader thread."""
        raise NotImplementedError

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

    # --- queries (reader thread) -------------------------------------------------------------------

    def _read(self, kind: str, where: list[tuple[str, Any]], limit: int, after_id: int | None = None) -> Any:
        if self._reader is None or self._stopping is not None:
            return fail(RuntimeError("telemetry store is not running"))
        limit = max(0, min(int(limit), MAX_QUERY_ROWS))
        reader = self._reader
        return deferToThreadPool(self._threads_reactor, reader, self._select, kind, where, limit, after_id)

    @staticmethod
    def _where(
        device_id: str | None, mtype: str | None, since: float | None, until: float | None
    ) -> list[tuple[str, Any]]:
        where: list[tuple[str, Any]] = []
        if device_id is not None:
            where.append(("device_id = ?", device_id))
        if mtype is not None:
            where.append(("type = ?", mtype))
        if since is not None:
            where.append(("received_at >= ?", float(since)))
        if until is not None:
            where.append(("received_at <= ?", float(until)))
        return where

    def query(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        type: str | None = None,
        scope: str = "project",
    ) -> Deferred[list[dict[str, Any]]]:
        """Stored rows, newest first, as dicts with keys ``id, device_id, type, received_at, robot_ts,
        battery, cpu, temperature, signal, body`` (``body`` parsed). ``since``/``until`` bound
        ``received_at`` (inclusive, Unix s); ``limit`` is clamped to 0..10,000. ``scope``
        ``"hub"`` keeps only this hub's rows, ``"project"`` (default) every hub's in the database
        (the same for SQLite: one file per hub). Newest first = ``received_at`` descending for one
        device, receive order (``id``) descending otherwise."""
        return self._read("rows", self._scoped(self._where(device_id, type, since, until), scope), limit)

    def battery_history(
        self, device_id: str | None = None, limit: int = 100, scope: str = "project"
    ) -> Deferred[list[list[Any]]]:
        """The last ``limit`` ``telemetry`` rows with a battery value, oldest first, as
        ``[epoch_ms (int), battery (float)]`` (the original ``/api/battery-history/`` shape)."""
        where = self._scoped(self._where(device_id, "telemetry", None, None), scope)
        return self._read("history", where, limit)

    def count(self) -> Deferred[int]:
        """The number of rows in the table (committed ones)."""
        return self._read("count", [], 0)

    def query_page(
        self,
        device_id: str | None = None,
        mtype: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> Deferred[list[dict[str, Any]]]:
        """One page of stored rows for streaming readers (exports), ordered by ``id`` ascending.

        Filters: ``device_id``, message type ``mtype``, ``received_at`` in ``[since, until]``
        (inclusive, Unix s), ``id > after_id``; at most ``limit`` rows (clamped to 0..10,000). Each row
        is ``{"id": int, "device_id": str, "type": str, "received_at": float (Unix s), "body": str
        (the stored JSON text, unparsed), "hub": str (the writing hub's node id, or "")}``. Page with
        ``after_id`` = the last row's id until a page comes back shorter than ``limit``. Fails with
        RuntimeError when the store is not running. Every hub's rows (PostgreSQL: the whole database).
        """
        return self._read("page", self._where(device_id, mtype, since, until), limit, after_id)

    def _scoped(self, where: list[tuple[str, Any]], scope: str) -> list[tuple[str, Any]]:
        if scope not in ("hub", "project"):
            raise ValueError(f"scope must be 'hub' or 'project', got {scope!r}")
        return where

    # --- introspection -----------------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        """Rows appended but not yet settled (open, closed and in-flight batches)."""
        return self._pending

    def commit_latency_ms(self) -> tuple[float, float]:
        """(p50, p99) of the last 2,048 commits, in ms (hand-off to the writer until it reported back)."""
        vals = sorted(self._commit_ms)
        if not vals:
            return 0.0, 0.0
        return vals[len(vals) // 2], vals[min(len(vals) - 1, int(len(vals) * 0.99))]

    def stats(self) -> dict[str, Any]:
        """Counters: rows_written, batches_committed, transactions, pending_rows, last_commit_ms,
        commit_p50_ms, commit_p99_ms (reactor time from hand-off to the writer until the commit was
        reported back), errors, retries, rows_deleted, rows_dropped, backend, path."""
        p50, p99 = self.commit_latency_ms()
        return {
            "rows_written": self.rows_written,
            "batches_committed": self.batches_committed,
            "transactions": self.transactions,
            "pending_rows": self.pending_rows,
            "last_commit_ms": round(self.last_commit_ms, 3),
            "commit_p50_ms": round(p50, 3),
            "commit_p99_ms": round(p99, 3),
            "errors": self.errors,
            "retries": self.retries,
            "rows_deleted": self.rows_deleted,
            "rows_dropped": self.rows_dropped,
            "backend": self.backend,
            "path": self.describe(),
        }


def _body(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"raw": text}


class TelemetryStore(GroupCommitStore):
    """Persist robot messages to SQLite with group commit (spec/websocket.md "Persistence").

    ``path``: the database file (parent directories are created at start). ``synchronous``:
    ``"normal"`` (survives a process crash) or ``"full"`` (also power loss). Other keyword arguments
    as :class:`GroupCommitStore`. WAL checkpoints run on the writer thread when it idles (or every
    200,000 rows), never inside a commit (``wal_autocheckpoint`` is off).

    No I/O happens before :meth:`startService`, which opens (and creates) the database and raises
    ``sqlite3.Error``/``OSError`` if it cannot. Raises ``ValueError`` for invalid arguments.
    """

    backend = "sqlite"

    def __init__(self, path: Path, *, synchronous: str = "normal", **kw: Any) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        super().__init__(**kw)
        self.path = Path(path)
        self.synchronous = synchronous
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._row_count: int | None = None  # writer thread only: rows in the table

    def describe(self) -> str:
        """The database file."""
        return str(self.path)

    def _start_backend(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wconn = self._connect()
        try:
            mode = wconn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path}: cannot use WAL journal mode (got {mode})")
            wconn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            # Checkpoints off the commit path: _idle runs them when the writer has nothing queued.
            wconn.execute("PRAGMA wal_autocheckpoint=0")
            for stmt in SCHEMA:
                wconn.execute(stmt)
            rconn = self._connect()
            rconn.execute("PRAGMA query_only=ON")
        except BaseException:
            wconn.close()
            raise
        self._wconn, self._rconn = wconn, rconn
        self._row_count = None

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: transactions are explicit. Used only from one thread each, but opened here.
        return sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )

    def _close_writer(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

    def _close_reader(self) -> None:
        conn, self._rconn = self._rconn, None
        if conn is not None:
            conn.close()

    # --- writer thread ---------------------------------------------------------------------------

    def _commit_rows(self, row_lists: list[list[Row]]) -> int:
        conn = self._wconn
        assert conn is not None
        rows = row_lists[0] if len(row_lists) == 1 else list(itertools.chain.from_iterable(row_lists))
        n = len(rows)
        big = STATEMENT_ROWS[-1]
        # One statement is its own (atomic) transaction in autocommit mode: one GIL hand-off.
        single = n <= big
        if not single:
            conn.execute("BEGIN")
        try:
            for i in range(0, n, big):
                part = rows[i : i + big]
                m = len(part)
                size = next(s for s in STATEMENT_ROWS if s >= m)
                params = list(itertools.chain.from_iterable(part))
                if size > m:
                    params.extend(itertools.repeat(None, 9 * (size - m)))
                conn.execute(_insert_padded(size), params)
            if not single:
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

    def _idle(self) -> None:
        conn = self._wconn
        if conn is not None:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _prune_step(self, cutoff: float | None, max_rows: int) -> int:
        conn = self._wconn
        assert conn is not None
        if self._row_count is None:
            self._row_count = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
        deleted = 0
        if cutoff is not None:
            # Walk from the oldest id (receive order) rather than keep an index on received_at.
            deleted = conn.execute(
                "DELETE FROM telemetry WHERE id IN (SELECT id FROM"
                " (SELECT id, received_at FROM telemetry ORDER BY id LIMIT ?) WHERE received_at < ?)",
                (PRUNE_CHUNK, cutoff),
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

    # --- reader thread ---------------------------------------------------------------------------

    def _select(self, kind: str, where: list[tuple[str, Any]], limit: int, after_id: int | None) -> Any:
        conn = self._rconn
        assert conn is not None
        clauses = [c for c, _ in where]
        params: list[Any] = [v for _, v in where]
        by_device = any(c.startswith("device_id") for c in clauses)
        order = " ORDER BY received_at DESC, id DESC" if by_device else " ORDER BY id DESC"
        if kind == "count":
            return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
        if kind == "history":
            clauses.append("battery IS NOT NULL")
            sql = "SELECT received_at, battery FROM telemetry WHERE " + " AND ".join(clauses)
            rows = conn.execute(sql + order + " LIMIT ?", [*params, limit]).fetchall()
            rows.reverse()
            return [[int(at * 1000), battery] for at, battery in rows]
        if kind == "page":
            if after_id is not None:
                clauses.append("id > ?")
                params.append(int(after_id))
            sql = "SELECT id, device_id, type, received_at, body FROM telemetry"
            sql += (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY id LIMIT ?"
            hub = self.node_id
            return [
                {"id": i, "device_id": d, "type": t, "received_at": at, "body": b, "hub": hub}
                for i, d, t, at, b in conn.execute(sql, [*params, limit])
            ]
        sql = SELECT + (" WHERE " + " AND ".join(clauses) if clauses else "") + order + " LIMIT ?"
        out = []
        for row in conn.execute(sql, [*params, limit]):
            d = dict(zip(COLUMNS, row, strict=False))
            d["body"] = _body(row[-1])
            out.append(d)
        return out


def build_store(config: Config, reactor: StoreReactor, node_id: str = "") -> GroupCommitStore:
    """The store ``config.store`` describes (``backend`` sqlite or postgresql), not started."""
    s = config.store
    common: dict[str, Any] = {
        "reactor": reactor,
        "retention_days": s.retention_days,
        "max_rows": s.max_rows,
        "commit_interval": s.commit_interval,
        "max_batch": s.max_batch,
        "max_batch_bytes": s.max_batch_bytes,
        "max_pending_rows": s.max_pending_rows,
        "stop_timeout": s.stop_timeout,
        "node_id": node_id,
    }
    if s.backend == "postgresql":
        from robonet.services.store_pg import PostgresStore

        return PostgresStore(s.dsn, pool_size=s.pool_size, **common)
    return TelemetryStore(config.store_path, synchronous=s.synchronous, **common)
