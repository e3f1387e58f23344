"""The MCAP recorder (``[recorder]``, issue 10 item 2; docs/recording.rst).

A hub fan-out :class:`~robonet.model.Subscriber` plus a command observer
(:meth:`robonet.hub.Hub.observe_commands`) that writes everything the hub routes — data,
commands, their outcomes, device up/down — to rotating, chunked MCAP files (robonet.mcapio).

Off the hot path and bounded: on the reactor thread :meth:`Recorder.offer` only appends the Event
to a deque; every :data:`HANDOFF_INTERVAL` seconds the deque is handed as one batch to a single
writer thread, which encodes (orjson), writes (``mcap``), rotates and prunes. While the writer is
busy the deque fills up to ``recorder.queue`` items; beyond that the oldest are dropped and
counted (``hub.stats.drop("recorder_queue")``). Only the reactor thread touches hub state; the
writer thread touches only its files and returns what it did.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import orjson
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from robonet import mcapio, schemas
from robonet.config import RecorderConfig
from robonet.model import Event, HubError

HANDOFF_INTERVAL = 0.1  # seconds between batches handed to the writer thread
FILE_PREFIX = "robonet-"
FILE_SUFFIX = ".mcap"

# Queue items besides Event: ("cmd", at, origin, target, body) and
# ("result", at, origin, target, type, ok, devices, code, message).
Item = Any
ToThread = Callable[..., "defer.Deferred[Any]"]


@attrs.define
class BatchResult:
    """What the writer thread did with one batch (read on the reactor thread)."""

    written: int = 0
    failed: int = 0
    path: str = ""
    size: int = 0
    opened: list[str] = attrs.Factory(list)
    deleted: list[str] = attrs.Factory(list)
    flushed: bool = False


def recording_name(now: float) -> str:
    """File name for a recording opened at hub time ``now``: ``robonet-20261204T223000.123Z.mcap``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    return FILE_PREFIX + stamp + FILE_SUFFIX


class RecordingFiles:
    """The writer thread's side: the current MCAP file, rotation and pruning. Thread-confined.

    ``directory`` holds the files; ``rotate_bytes``/``rotate_seconds`` bound one file;
    ``keep_bytes`` (0 = no limit) bounds the directory (oldest files deleted first, never the
    current one); ``chunk_size`` (bytes), ``compression`` and ``flush_interval`` (s) as in
    :class:`~robonet.config.RecorderConfig`. Every method takes hub time ``now``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        rotate_bytes: int,
        rotate_seconds: float,
        keep_bytes: int,
        chunk_size: int,
        compression: str,
        flush_interval: float,
    ) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.keep_bytes = keep_bytes
        self.chunk_size = chunk_size
        self.compression = compression
        self.flush_interval = flush_interval
        self.path: Path | None = None
        self._fh: Any = None
        self._sink: mcapio.McapSink | None = None
        self._opened_at = 0.0
        self._flushed_at = 0.0
        self._unflushed = 0

    def write_batch(self, items: Iterable[Item], now: float) -> BatchResult:
        """Write ``items`` (Events and command tuples) at hub time ``now``; rotate/flush as due.

        An item that cannot be encoded is skipped and counted in ``failed``. Raises OSError when
        the file cannot be written (the file is then abandoned; the next batch opens a new one).
        """
        result = BatchResult()
        try:
            self._maybe_rotate(now, result)
            for item in items:
                if self._sink is None:
                    self._open(now, result)
                assert self._sink is not None
                try:
                    self._write_one(self._sink, item)
                except (TypeError, ValueError, orjson.JSONEncodeError):
                    result.failed += 1
                    continue
                result.written += 1
                self._unflushed += 1
            if self._unflushed and now - self._flushed_at >= self.flush_interval:
                self._flush(now)
                result.flushed = True
        except OSError:
            self._abandon()
            raise
        result.path = str(self.path) if self.path else ""
        result.size = self._size()
        return result

    @staticmethod
    def _write_one(sink: mcapio.McapSink, item: Item) -> None:
        if isinstance(item, Event):
            if item.kind == "data":
                sink.add_data(item.device_id, item.type, item.at, orjson.dumps(item.body))
            else:
                cid = sink.channel(
                    mcapio.DEVICES_TOPIC, mcapio.DEVICE_EVENT_SCHEMA, "device", item.device_id, item.type
                )
                data = orjson.dumps({"event": item.type, "device_id": item.device_id, "device": item.body})
                sink.add(cid, mcapio.to_ns(item.at), data)
            return
        if item[0] == "cmd":
            _, at, origin, target, body = item
            mtype = str(body.get("type"))
            cid = sink.channel(
                mcapio.command_topic(target, mtype), schemas.schema_for(mtype), "command", target or "", mtype
            )
            sink.add(cid, mcapio.to_ns(at), orjson.dumps({**body, "origin": origin, "target": target}))
            return
        _, at, origin, target, mtype, ok, devices, code, message = item
        cid = sink.channel(
            mcapio.result_topic(target, mtype), mcapio.COMMAND_RESULT_SCHEMA, "result", target or "", mtype
        )
        out: dict[str, Any] = {"type": mtype, "origin": origin, "target": target, "ok": ok}
        if ok:
            out["devices"] = devices
        else:
            out["code"], out["message"] = code, message
        sink.add(cid, mcapio.to_ns(at), orjson.dumps(out))

    def _size(self) -> int:
        try:
            return int(self._fh.tell()) if self._fh is not None else 0
        except (OSError, ValueError):
            return 0

    def _maybe_rotate(self, now: float, result: BatchResult) -> None:
        if self._sink is None:
            return
        if self._size() >= self.rotate_bytes or now - self._opened_at >= self.rotate_seconds:
            self.close()
            self._open(now, result)

    def _open(self, now: float, result: BatchResult) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = recording_name(now)
        path = self.directory / name
        n = 1
        while path.exists():  # two files in one millisecond (tiny rotate limits)
            path = self.directory / name.replace(FILE_SUFFIX, f"-{n}{FILE_SUFFIX}")
            n += 1
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()/_abandon()
        self.path = path
        self._sink = mcapio.McapSink(self._fh, chunk_size=self.chunk_size, compression=self.compression)
        self._opened_at = self._flushed_at = now
        self._unflushed = 0
        result.opened.append(str(path))
        result.deleted.extend(self.prune())

    def _flush(self, now: float) -> None:
        assert self._sink is not None
        self._sink.flush()
        self._fh.flush()
        self._flushed_at = now
        self._unflushed = 0

    def close(self) -> None:
        """Finish the current file (summary, footer) and close it."""
        if self._sink is not None:
            try:
                self._sink.finish()
                self._fh.flush()
                os.fsync(self._fh.fileno())
            finally:
                self._fh.close()
                self._sink = None
                self._fh = None

    def _abandon(self) -> None:
        fh, self._fh, self._sink = self._fh, None, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def prune(self) -> list[str]:
        """Delete the oldest recordings while the directory holds more than ``keep_bytes``."""
        if not self.keep_bytes:
            return []
        files = []
        for p in self.directory.glob(FILE_PREFIX + "*" + FILE_SUFFIX):
            try:
                files.append((p.stat().st_mtime, p.name, p, p.stat().st_size))
            except OSError:
                continue
        files.sort()
        total = sum(f[3] for f in files)
        deleted = []
        for _, _, p, size in files:
            if total <= self.keep_bytes:
                break
            if p == self.path:
                continue
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
            deleted.append(str(p))
        return deleted


def _daemon_thread(*args: Any, **kw: Any) -> threading.Thread:
    thread = threading.Thread(*args, **kw)
    thread.daemon = True
    return thread


class _WriterPool(ThreadPool):
    """One daemon worker: if the reactor stops without stopService finishing, the process still
    exits (like a crash: the file keeps every chunk written so far)."""

    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


class Recorder(Service):
    """Records the hub's traffic to MCAP (see the module docstring). A Service and a Subscriber.

    ``config`` is the ``[recorder]`` section, ``directory`` the resolved recordings directory,
    ``hub`` the Hub, ``reactor`` an IReactorTime (plus IReactorThreads unless ``to_thread`` is
    given). ``to_thread(fn, *args) -> Deferred`` runs the writer's work; by default a one-thread
    pool owned by this service (tests pass a synchronous one).
    """

    log = Logger()
    name = "recorder"

    def __init__(
        self,
        config: RecorderConfig,
        directory: Path,
        hub: Any,
        reactor: IReactorTime,
        *,
        to_thread: ToThread | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        self.reactor = reactor
        self.files = RecordingFiles(
            directory,
            rotate_bytes=int(config.rotate_mb * 1024 * 1024),
            rotate_seconds=config.rotate_minutes * 60.0,
            keep_bytes=int(config.keep_gb * 1024**3),
            chunk_size=config.chunk_kb * 1024,
            compression=config.compression,
            flush_interval=config.flush_interval,
        )
        self._exclude = frozenset(config.exclude_types)
        self._maxlen = config.queue
        self._pending: deque[Item] = deque(maxlen=config.queue)
        self._to_thread = to_thread
        self._pool: ThreadPool | None = None
        self._loop: task.LoopingCall | None = None
        self._inflight: defer.Deferred[Any] | None = None
        self._unflushed = False
        self._accepting = False
        self.recorded = 0
        self.dropped = 0
        self.failed = 0
        self.current = ""
        self.current_size = 0
        hub.observe_commands(self._on_command, self._on_outcome)
        hub.register_endpoint("recorder", lambda data, origin: self.stats())

    # --- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        """Start the writer thread and the hand-off loop; subscribe to the hub."""
        super().startService()
        if self._to_thread is None:
            pool = self._pool = _WriterPool(1, 1, "robonet-recorder")
            pool.start()
            reactor: Any = self.reactor
            self._to_thread = lambda fn, *a: threads.deferToThreadPool(reactor, pool, fn, *a)
        self._accepting = True
        self.hub.subscribe(self)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(HANDOFF_INTERVAL, now=False)
        self.log.info(
            "recording to {dir} (rotate {mb} MiB / {minutes} min, keep {gb} GiB)",
            dir=str(self.files.directory),
            mb=self.config.rotate_mb,
            minutes=self.config.rotate_minutes,
            gb=self.config.keep_gb,
        )

    def stopService(self) -> defer.Deferred[None]:
        """Write what is queued, finish the current file (summary and footer) and stop the thread."""
        super().stopService()
        self._accepting = False
        self.hub.unsubscribe(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        inflight = self._inflight or defer.succeed(None)

        def final(_: object) -> defer.Deferred[Any]:
            batch, self._pending = self._pending, deque(maxlen=self._maxlen)
            assert self._to_thread is not None
            return self._to_thread(self._write_and_close, batch, self._now())

        def done(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("recorder: finishing {path} failed", result, path=self.current)
            elif isinstance(result, BatchResult):
                self._account(result)
            if self._pool is not None:
                self._pool.stop()
                self._pool = None
                self._to_thread = None
            self.log.info(
                "recorder stopped: {n} messages recorded, {dropped} dropped",
                n=self.recorded,
                dropped=self.dropped,
            )

        d: defer.Deferred[Any] = inflight.addBoth(lambda _: None).addCallback(final)
        return d.addBoth(done)

    def _write_and_close(self, batch: Iterable[Item], now: float) -> BatchResult:
        try:
            return self.files.write_batch(batch, now)
        finally:
            self.files.close()

    def _now(self) -> float:
        return self.reactor.seconds()

    # --- intake (reactor thread) ---------------------------------------------------------------

    def offer(self, event: Event) -> None:
        """Queue one fan-out event (never blocks; over ``recorder.queue`` the oldest is dropped)."""
        if event.type in self._exclude:
            return
        self._put(event)

    def _put(self, item: Item) -> None:
        if not self._accepting:
            return
        pending = self._pending
        if len(pending) == self._maxlen:
            self.dropped += 1
            self.hub.stats.drop("recorder_queue")
        pending.append(item)

    def _on_command(self, origin: str, target: str | None, body: dict[str, Any]) -> None:
        self._put(("cmd", self._now(), origin, target, dict(body)))

    def _on_outcome(self, origin: str, target: str | None, body: dict[str, Any], result: Any) -> None:
        mtype = str(body.get("type"))
        if isinstance(result, Failure):
            err = result.value
            code = err.code if isinstance(err, HubError) else "internal"
            message = err.message if isinstance(err, HubError) else str(err)
            self._put(("result", self._now(), origin, target, mtype, False, None, code, message))
        else:
            devices = list(result) if isinstance(result, list) else []
            self._put(("result", self._now(), origin, target, mtype, True, devices, None, None))

    # --- hand-off ------------------------------------------------------------------------------

    def _tick(self) -> None:
        if self._inflight is not None or self._to_thread is None:
            return
        if not self._pending and not self._unflushed:
            return
        batch, self._pending = self._pending, deque(maxlen=self._maxlen)
        self._unflushed = True
        d = self._inflight = self._to_thread(self.files.write_batch, batch, self._now())
        d.addCallbacks(self._written, self._write_failed, errbackArgs=(len(batch),))

    def _written(self, result: BatchResult) -> None:
        self._inflight = None
        self._account(result)
        if result.flushed:
            self._unflushed = False

    def _account(self, result: BatchResult) -> None:
        self.recorded += result.written
        if result.failed:
            self.failed += result.failed
            self.hub.stats.drop("recorder_unencodable", result.failed)
        for path in result.opened:
            self.log.info("recording to {path}", path=path)
        for path in result.deleted:
            self.log.info("deleted old recording {path} (recorder.keep_gb)", path=path)
        self.current, self.current_size = result.path, result.size

    def _write_failed(self, failure: Failure, lost: int) -> None:
        self._inflight = None
        self._unflushed = False
        self.failed += lost
        self.hub.stats.error("recorder_write")
        self.hub.stats.drop("recorder_write", lost)
        self.log.failure("recorder: writing {n} messages failed", failure, n=lost)

    def stats(self) -> dict[str, Any]:
        """``{"enabled", "dir", "file", "file_bytes", "recorded", "dropped", "failed", "queued"}``."""
        return {
            "enabled": True,
            "dir": str(self.files.directory),
            "file": self.current,
            "file_bytes": self.current_size,
            "recorded": self.recorded,
            "dropped": self.dropped,
            "failed": self.failed,
            "queued": len(self._pending),
        }
