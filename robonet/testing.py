"""Test doubles for robonet's collaborators: one public copy for every test module (and for plugins'
tests), instead of a FakeStore in each file.

Nothing here opens a socket, starts a process or reads the wall clock:

- :class:`FakeBatch` / :class:`FakeStore`: the store's ``append(...) -> batch`` and
  ``batch.when_committed(ok, failed, *args)`` seam (robonet/services/store.py), settled by the test
  with :meth:`FakeBatch.commit` or :meth:`FakeBatch.fail`;
- :class:`FakeLink`: a :class:`robonet.model.Link` (what the hub delivers commands to);
- :func:`make_hub`: a real :class:`robonet.hub.Hub` on a ``task.Clock`` with config from overrides
  only (no environment, no file) and a per-test state directory;
- :class:`RecordingTransport`: a ``StringTransport`` that records every write and decodes what was
  written as bot-link frames (4-byte length + JSON) or lines (newline JSON / text);
- :func:`require`: skip a test whose outside tool is missing, or fail it when the run must be
  complete (``REQUIRE_ALL_TESTS=1``, set by .ci/run).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from robonet.config import Config
    from robonet.hub import Hub
    from robonet.model import Command

#: Hub time at which :func:`make_hub`'s clock starts (Unix seconds, 2023-11-14T22:13:20Z).
T0 = 1_700_000_000.0

#: Environment variable that turns :func:`require`'s skips into failures.
REQUIRE_ALL = "REQUIRE_ALL_TESTS"  # not ROBONET_*: those are config keys


def checksum(payload: bytes) -> int:
    """The robonet/1 additive ack checksum of ``payload`` (sum of bytes mod 2**32, spec/botlink.md),
    computed independently of robonet's own helper."""
    return sum(payload) % 2**32


class FakeBatch:
    """A store batch whose COMMIT the test decides.

    ``when_committed(ok, failed, *args)`` queues a waiter; :meth:`commit` calls ``ok(*args)`` and
    :meth:`fail` calls ``failed(failure, *args)`` for every queued waiter, then forgets them.
    """

    def __init__(self) -> None:
        self.waiters: list[tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...]]] = []

    def when_committed(self, ok: Callable[..., Any], failed: Callable[..., Any], *args: Any) -> None:
        """Call ``ok(*args)`` once committed, ``failed(failure, *args)`` if the commit fails."""
        self.waiters.append((ok, failed, args))

    def commit(self) -> None:
        """The batch is durable: run every ``ok``."""
        waiters, self.waiters = self.waiters, []
        for ok, _failed, args in waiters:
            ok(*args)

    def fail(self, failure: Failure | None = None) -> None:
        """The commit failed (default: ``RuntimeError("disk full")``): run every ``failed``."""
        failure = failure or Failure(RuntimeError("disk full"))
        waiters, self.waiters = self.waiters, []
        for _ok, failed, args in waiters:
            failed(failure, *args)


class FakeStore:
    """A TelemetryStore stand-in: ``append`` records the row and returns a :class:`FakeBatch`.

    ``rows`` holds ``(device_id, type, at, body, raw)`` tuples. By default every row joins the
    current ``batch`` until :meth:`next_batch` (group commit); with ``batch_per_row=True`` each
    row gets its own batch. ``batches`` lists every batch handed out, oldest first.
    """

    def __init__(self, batch_per_row: bool = False) -> None:
        self.batch_per_row = batch_per_row
        self.rows: list[tuple[str, str, float, Any, bytes | None]] = []
        self.batch = FakeBatch()
        self.batches: list[FakeBatch] = []

    def append(self, device_id: str, mtype: str, at: float, body: Any, raw: bytes | None) -> FakeBatch:
        """Record one row; return the batch whose commit makes it durable."""
        self.rows.append((device_id, mtype, at, body, raw))
        if self.batch_per_row:
            self.batch = FakeBatch()
        if not self.batches or self.batches[-1] is not self.batch:
            self.batches.append(self.batch)
        return self.batch

    def next_batch(self) -> FakeBatch:
        """Start a new current batch (rows appended from now on join it) and return it."""
        self.batch = FakeBatch()
        return self.batch

    def commit_all(self) -> None:
        """Commit every batch handed out so far."""
        for batch in self.batches:
            batch.commit()


class FakeLink:
    """A :class:`robonet.model.Link`: records delivered commands and close requests.

    ``mode`` decides what :meth:`deliver` returns: ``"deferred"`` (default) a new Deferred kept in
    ``pending`` for the test to fire, ``"succeed"`` an already-fired Deferred, ``None`` nothing
    (delivered at once); an exception instance is raised instead. ``closed`` holds
    ``(code, message)`` pairs; :attr:`closed_codes` just the codes.
    """

    def __init__(self, mode: Any = "deferred", face: str = "botlink") -> None:
        self.mode = mode
        self.face = face
        self.commands: list[Command] = []
        self.pending: list[Deferred[Any]] = []
        self.closed: list[tuple[str, str]] = []

    def deliver(self, command: Command) -> Deferred[Any] | None:
        """Record ``command``; see the class docstring for the return value."""
        if isinstance(self.mode, BaseException):
            raise self.mode
        self.commands.append(command)
        if self.mode is None:
            return None
        if self.mode == "succeed":
            return succeed(None)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def close_link(self, code: str, message: str) -> None:
        """Record the hub's request to close this link."""
        self.closed.append((code, message))

    @property
    def closed_codes(self) -> list[str]:
        """The codes of :attr:`closed`, in order."""
        return [code for code, _ in self.closed]


def make_config(testcase: Any, **sections: dict[str, Any]) -> Config:
    """A Config from built-in defaults and ``sections`` only (no environment, no file), with
    ``hub.state_dir`` in ``testcase.mktemp()`` unless given. Raises ConfigError like startup."""
    from robonet.config import load_config

    overrides: dict[str, dict[str, Any]] = {name: dict(values) for name, values in sections.items()}
    overrides.setdefault("hub", {}).setdefault("state_dir", testcase.mktemp())
    return load_config(environ={}, overrides=overrides)


def make_hub(
    testcase: Any,
    *,
    store: Any = None,
    clock: task.Clock | None = None,
    now: float = T0,
    **sections: dict[str, Any],
) -> tuple[Hub, task.Clock]:
    """A real Hub on a ``task.Clock`` (advanced to ``now`` if it is fresh) with ``store``
    (e.g. a :class:`FakeStore`, or None for no store) and the config of :func:`make_config`.

    Returns ``(hub, clock)``; ``hub.config`` is the config.
    """
    from robonet.hub import Hub

    config = make_config(testcase, **sections)
    if clock is None:
        clock = task.Clock()
        clock.advance(now)
    return Hub(config, clock, store=store), clock


class RecordingTransport(StringTransport):
    """A StringTransport that keeps every ``write`` call and decodes what was written.

    ``writes`` counts write calls, ``chunks`` keeps each one's bytes, ``aborted`` records
    ``abortConnection``. :meth:`frames` / :meth:`lines` return the complete bot-link frames /
    lines written since the last take (partial ones stay buffered); :meth:`json_frames` /
    :meth:`json_lines` decode them with orjson. ``peer`` is ``"host:port"`` or an IPv4Address.
    """

    def __init__(self, peer: str | IPv4Address = "192.0.2.10:40000", host: IPv4Address | None = None) -> None:
        if isinstance(peer, str):
            ip, _, port = peer.rpartition(":")
            peer = IPv4Address("TCP", ip, int(port))
        super().__init__(hostAddress=host, peerAddress=peer)
        self.writes = 0
        self.chunks: list[bytes] = []
        self.aborted = False
        self._pending = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.chunks.append(bytes(data))
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def take(self) -> bytes:
        """Every byte written since the last take (clears the buffer)."""
        data = self.value()
        self.clear()
        return data

    def frames(self) -> list[bytes]:
        """Complete 4-byte-big-endian-length frames' payloads written since the last take."""
        buf = self._pending + self.take()
        out = []
        while len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + n:
                break
            out.append(buf[4 : 4 + n])
            buf = buf[4 + n :]
        self._pending = buf
        return out

    def lines(self) -> list[bytes]:
        """Complete newline-terminated lines (without the newline) written since the last take."""
        buf = self._pending + self.take()
        *complete, self._pending = buf.split(b"\n")
        return complete

    def json_frames(self) -> list[Any]:
        """:meth:`frames`, each decoded as JSON."""
        return [orjson.loads(f) for f in self.frames()]

    def json_lines(self) -> list[Any]:
        """:meth:`lines`, each decoded as JSON."""
        return [orjson.loads(line) for line in self.lines()]


def require(available: object, reason: str) -> None:
    """Skip the running test with ``reason`` unless ``available`` is truthy; when the environment
    sets ``REQUIRE_ALL_TESTS=1`` (CI), fail it instead, so a broken install cannot pass as a
    skip. Call from ``setUp`` or a test method. Raises ``SkipTest`` or ``FailTest``."""
    if available:
        return
    from twisted.trial.unittest import FailTest, SkipTest

    if os.environ.get(REQUIRE_ALL, "") not in ("", "0"):
        raise FailTest(f"{reason} ({REQUIRE_ALL} is set: a required test may not skip)")
    raise SkipTest(reason)
