"""The PostgreSQL backend of the telemetry store (issue 9): several hubs share one database.

Same contract as the SQLite store (:class:`robonet.services.store.GroupCommitStore`): group commit on
one writer thread with its own psycopg 3 connection (sync API), one binary ``COPY`` per transaction
(psycopg's C row writer; a multi-row ``INSERT ... unnest`` spent its time in psycopg's pure-Python
array dumper), acks only after COMMIT, retention
by age and by row count (each hub prunes its own rows), queries on a small
``psycopg_pool.ConnectionPool`` (``pool_size`` connections, as many reader threads).

Database outage: a commit that fails with a connection-level error (``psycopg.OperationalError``:
refused, reset, admin shutdown) is retried with backoff (0.1 s doubling to 5 s) on a fresh connection;
its waiters keep waiting, so robots keep their unacked data and resend after a reconnect if the hub
dies meanwhile. New rows keep gathering in memory up to ``max_pending_rows``, then senders get
``store_unavailable``. A COMMIT whose reply was lost with the connection may be retried although it
landed: rows can be duplicated by an outage, never lost. Other errors (bad data) fail the batch.

Table ``telemetry``::

    id bigint identity PRIMARY KEY, hub text (the writing hub's node id), device_id text, type text,
    received_at double precision (hub time, Unix s), robot_ts, body text, battery, cpu,
    temperature, signal (double precision)

indexed on ``(device_id, received_at)`` and ``(hub, id)``. TimescaleDB is not used (see docs/store.rst).
"""

from __future__ import annotations

import re
import threading
from typing import Any

from twisted.python.failure import Failure

from robonet.services.store import PRUNE_CHUNK, GroupCommitStore, Row, _body, _WorkerPool

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS telemetry (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        hub text NOT NULL DEFAULT '',
        device_id text NOT NULL,
        type text NOT NULL,
        received_at double precision NOT NULL,
        robot_ts double precision,
        body text NOT NULL,
        battery double precision,
        cpu double precision,
        temperature double precision,
        signal double precision
    )""",
    "CREATE INDEX IF NOT EXISTS telemetry_device_time ON telemetry (device_id, received_at)",
    "CREATE INDEX IF NOT EXISTS telemetry_hub_id ON telemetry (hub, id)",
)
COPY = (
    "COPY telemetry (hub, device_id, type, received_at, robot_ts, body, battery, cpu, temperature, signal)"
    " FROM STDIN (FORMAT BINARY)"
)
COPY_TYPES = ("text", "text", "text", "float8", "float8", "text", "float8", "float8", "float8", "float8")
COLUMNS = ("id", "device_id", "type", "received_at", "robot_ts", "battery", "cpu", "temperature", "signal")
SELECT = "SELECT " + ", ".join(COLUMNS) + ", body FROM telemetry"
CONNECT_TIMEOUT = 5  # s, libpq connect_timeout of every connection
SCHEMA_LOCK = 0x726F626F  # advisory lock id: hubs creating the schema at once take turns


def _redact(dsn: str) -> str:
    """The DSN without its password, for logs and stats."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)


class PostgresStore(GroupCommitStore):
    """Persist robot messages to PostgreSQL with group commit (issue 9; docs/store.rst).

    ``dsn``: a libpq connection string or ``postgresql://`` URL. ``pool_size``: reader connections
    (and threads) for queries. Other keyword arguments as :class:`GroupCommitStore`; ``node_id`` is
    written into every row's ``hub``. Nothing connects before :meth:`startService`, and start does not
    wait for the database: the writer connects (and creates the schema) on its first commit, so a
    hub starts while its database is down and its rows wait in memory (bounded).
    """

    backend = "postgresql"

    def __init__(self, dsn: str, *, pool_size: int = 2, **kw: Any) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        super().__init__(**kw)
        self.dsn = dsn
        self.pool_size = int(pool_size)
        self._wconn: Any = None  # writer thread only
        self._pool: Any = None
        self._schema_ready = threading.Event()
        self._row_count: int | None = None  # writer thread only: this hub's rows

    def describe(self) -> str:
        """The DSN without its password."""
        return _redact(self.dsn)

    def _start_backend(self) -> None:
        from psycopg_pool import ConnectionPool

        # open=True, wait=False: the pool connects in its own threads; start never blocks on the DB.
        self._pool = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
            timeout=CONNECT_TIMEOUT,
            name="robonet-store-readers",
            open=False,
        )
        self._pool.open(wait=False)

    def startService(self) -> None:
        """As :meth:`GroupCommitStore.startService`, with ``pool_size`` reader threads."""
        super().startService()
        if self._reader is not None and self.pool_size > 1:
            self._reader.stop()
            self._reader = _WorkerPool(1, self.pool_size, "robonet-store-reader")
            self._reader.start()

    # --- writer thread ---------------------------------------------------------------------------

    def _connection(self) -> Any:
        import psycopg

        conn = self._wconn
        if conn is not None and not conn.closed:
            return conn
        self._wconn = None
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        try:
            if not self._schema_ready.is_set():
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    for stmt in SCHEMA:
                        conn.execute(stmt)
                self._schema_ready.set()
        except BaseException:
            conn.close()
            raise
        self._wconn = conn
        return conn

    def _drop_connection(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _commit_rows(self, row_lists: list[list[Row]]) -> int:
        import psycopg

        try:
            conn = self._connection()
            hub = self.node_id
            n = 0
            # One binary COPY per transaction (psycopg's C row writer), COMMIT when the block ends.
            with conn.transaction(), conn.cursor().copy(COPY) as copy:
                copy.set_types(COPY_TYPES)
                write = copy.write_row
                for rows in row_lists:
                    n += len(rows)
                    for row in rows:
                        write((hub, *row))
        except psycopg.OperationalError:
            self._drop_connection()
            raise
        except psycopg.Error:
            if self._wconn is not None and self._wconn.closed:
                self._drop_connection()
            raise
        if self._row_count is not None:
            self._row_count += n
        return n

    def _transient(self, failure: Failure) -> bool:
        import psycopg

        return failure.check(psycopg.OperationalError, psycopg.InterfaceError) is not None

    def _close_writer(self) -> None:
        self._drop_connection()

    def _close_reader(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=CONNECT_TIMEOUT)

    def _prune_step(self, cutoff: float | None, max_rows: int) -> int:
        import psycopg

        try:
            conn = self._connection()
            hub = self.node_id
            if self._row_count is None:
                self._row_count = conn.execute(
                    "SELECT count(*) FROM telemetry WHERE hub = %s", (hub,)
                ).fetchone()[0]
            deleted = 0
            if cutoff is not None:
                deleted = conn.execute(
                    "DELETE FROM telemetry WHERE id IN (SELECT id FROM telemetry WHERE hub = %s"
                    " AND received_at < %s ORDER BY hub, id LIMIT %s)",
                    (hub, cutoff, PRUNE_CHUNK),
                ).rowcount
            if max_rows and deleted < PRUNE_CHUNK:
                excess = self._row_count - deleted - max_rows
                if excess > 0:
                    deleted += conn.execute(
                        "DELETE FROM telemetry WHERE id IN (SELECT id FROM telemetry WHERE hub = %s"
                        " ORDER BY hub, id LIMIT %s)",
                        (hub, min(excess, PRUNE_CHUNK - deleted)),
                    ).rowcount
        except psycopg.OperationalError:
            self._drop_connection()
            raise
        self._row_count -= deleted
        return deleted

    # --- reader threads --------------------------------------------------------------------------

    def _scoped(self, where: list[tuple[str, Any]], scope: str) -> list[tuple[str, Any]]:
        where = super()._scoped(where, scope)
        return [*where, ("hub = ?", self.node_id)] if scope == "hub" else where

    def _select(self, kind: str, where: list[tuple[str, Any]], limit: int, after_id: int | None) -> Any:
        if self._pool is None:
            raise RuntimeError("telemetry store is not running")
        clauses = [c.replace("?", "%s") for c, _ in where]
        params: list[Any] = [v for _, v in where]
        by_device = any(c.startswith("device_id") for c in clauses)
        order = " ORDER BY received_at DESC, id DESC" if by_device else " ORDER BY id DESC"
        with self._pool.connection() as conn:
            if kind == "count":
                return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
            if kind == "history":
                clauses.append("battery IS NOT NULL")
                sql = "SELECT received_at, battery FROM telemetry WHERE " + " AND ".join(clauses)
                rows = conn.execute(sql + order + " LIMIT %s", [*params, limit]).fetchall()
                rows.reverse()
                return [[int(at * 1000), battery] for at, battery in rows]
            if kind == "page":
                if after_id is not None:
                    clauses.append("id > %s")
                    params.append(int(after_id))
                sql = "SELECT id, device_id, type, received_at, body, hub FROM telemetry"
                sql += (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY id LIMIT %s"
                return [
                    {"id": i, "device_id": d, "type": t, "received_at": at, "body": b, "hub": h}
                    for i, d, t, at, b, h in conn.execute(sql, [*params, limit])
                ]
            sql = SELECT + (" WHERE " + " AND ".join(clauses) if clauses else "") + order + " LIMIT %s"
            out = []
            for row in conn.execute(sql, [*params, limit]):
                d = dict(zip(COLUMNS, row, strict=False))
                d["body"] = _body(row[-1])
                out.append(d)
            return out
