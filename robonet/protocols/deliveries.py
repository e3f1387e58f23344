"""Per-connection envelope state shared by the bot link and the line link (split out of botlink.py).

Two small pieces every robonet/1 connection needs, written once:

- :class:`PendingCommands`: commands this hub wrote to a device, each waiting for the device's
  ``ack`` (checksum verified with :func:`robonet.protocols.envelope.ack_sum_ok`) or ``error``
  (``ref``), with a timer on the injected clock (``delivery_timeout``).
- :class:`CommitAcks`: acks owed for data frames, written only once the store's batch committed,
  grouped so a read of many frames costs one ``when_committed`` per batch.

No I/O: the owner passes callables that write.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet.model import HubError
from robonet.protocols.envelope import ack_sum_ok, remote_error

T = TypeVar("T")


class PendingCommands:
    """Commands sent to one device, by the id this hub gave them, until acked, refused or timed out.

    ``clock`` is an IReactorTime, ``timeout`` the ack deadline in seconds, ``stats`` the hub's Stats
    (``bad_checksum`` is counted there), ``device_id`` names the device in errors and logs.
    """

    log = Logger()
    __slots__ = ("clock", "timeout", "stats", "device_id", "_next_id", "_entries")

    def __init__(self, clock: IReactorTime, timeout: float, stats: Any, device_id: str = "") -> None:
        self.clock = clock
        self.timeout = timeout
        self.stats = stats
        self.device_id = device_id
        self._next_id = 0
        self._entries: dict[int, tuple[defer.Deferred[Any], IDelayedCall, int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def next_id(self) -> int:
        """A fresh command id for this connection (1, 2, ...)."""
        self._next_id += 1
        return self._next_id

    def add(self, cid: int, checksum: int) -> defer.Deferred[Any]:
        """Wait for the ack of command ``cid`` whose payload sums to ``checksum``.

        The Deferred fires with the ack object, or fails with HubError ``delivery_timeout`` after
        ``timeout`` s, the device's own error code, or whatever :meth:`fail_all` is given.
        Cancelling it forgets the command.
        """

        def cancel(_: defer.Deferred[Any]) -> None:
            self._take(cid)

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        timer = self.clock.callLater(self.timeout, self._timed_out, cid)
        self._entries[cid] = (d, timer, checksum)
        return d

    def _take(self, cid: Any) -> tuple[defer.Deferred[Any], int] | None:
        entry = self._entries.pop(cid, None) if cid.__class__ is int else None
        if entry is None:
            return None
        d, timer, checksum = entry
        if timer.active():
            timer.cancel()
        return d, checksum

    def _timed_out(self, cid: int) -> None:
        entry = self._entries.pop(cid, None)
        if entry is not None:
            err = HubError("delivery_timeout", f"{self.device_id} did not ack within {self.timeout:g} s")
            entry[0].errback(err)

    def on_ack(self, obj: Mapping[str, Any]) -> bool:
        """A device's ``{"type":"ack","id":N[,"sum":S]}``: resolve command N; False if unknown.

        A ``sum`` that does not match what was sent is counted (``bad_checksum``) and logged; the
        command still resolves, since the device did receive a frame with that id (spec/botlink.md 3).
        """
        taken = self._take(obj.get("id"))
        if taken is None:
            return False
        d, checksum = taken
        if not ack_sum_ok(obj, checksum):
            self.stats.error("bad_checksum")
            self.log.info(
                "{device_id}: ack {id} sum {got!r} != {want}",
                device_id=self.device_id,
                id=obj.get("id"),
                got=obj.get("sum"),
                want=checksum,
            )
        d.callback(obj)
        return True

    def on_error(self, obj: Mapping[str, Any]) -> bool:
        """A device's ``{"type":"error","ref":N,...}``: command N fails with its code; False if unknown."""
        taken = self._take(obj.get("ref"))
        if taken is None:
            return False
        taken[0].errback(remote_error(obj))
        return True

    def fail_all(self, err: HubError) -> None:
        """The connection is gone: every waiting command fails with ``err``."""
        entries, self._entries = self._entries, {}
        for d, timer, _ in entries.values():
            if timer.active():
                timer.cancel()
            d.errback(err)


class CommitAcks(Generic[T]):
    """Acks owed once a store batch commits, one waiter per batch (items of type ``T``, e.g. ids).

    ``committed(items, received_at)`` and ``failed(failure, items, received_at)`` are called with
    the items added for that batch, in order.
    """

    __slots__ = ("committed", "failed", "_batch", "_items")

    def __init__(
        self,
        committed: Callable[[list[T], float], object],
        failed: Callable[[Failure, list[T], float], object],
    ) -> None:
        self.committed = committed
        self.failed = failed
        self._batch: Any = None
        self._items: list[T] | None = None

    def add(self, batch: Any, item: T, received_at: float) -> bool:
        """Owe ``item`` once ``batch`` commits; True when this started a new waiter."""
        if batch is self._batch and self._items is not None:
            self._items.append(item)
            return False
        self._batch = batch
        self._items = items = [item]
        batch.when_committed(self._done, self._failed, items, received_at)
        return True

    def _release(self, items: list[T]) -> None:
        if self._items is items:
            self._batch = self._items = None

    def _done(self, items: list[T], received_at: float) -> None:
        self._release(items)
        self.committed(items, received_at)

    def _failed(self, failure: Failure, items: list[T], received_at: float) -> None:
        self._release(items)
        self.failed(failure, items, received_at)
