"""Bounded per-subscriber outbound queues (ARCHITECTURE.md "Fan-out", PERFORMANCE.md lever 4).

While the transport keeps up, :meth:`OutboundQueue.put` writes straight through (the transport
coalesces writes within a reactor iteration). When the transport pauses us (its buffer is over its
high-water mark) items are held: CONTROL in order and never dropped, LATEST conflated to the newest
item per key, BULK dropped first when over ``max_bytes``. A subscriber that stays paused or over
``max_bytes`` for ``slow_timeout`` seconds is handed to ``on_slow`` (the face closes it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from robonet.interfaces import StatsSink
from robonet.model import Priority


@implementer(IPushProducer)
class OutboundQueue:
    """One subscriber's bounded queue; register it as the transport's streaming producer.

    ``write(data)`` is the transport's write (or a framing wrapper); ``clock`` an IReactorTime;
    ``max_bytes`` the queue budget in bytes; ``slow_timeout`` seconds; ``on_slow()`` is called once
    when the subscriber has been stalled too long. ``stats`` (optional) counts drops.
    """

    def __init__(
        self,
        write: Callable[[bytes], object],
        *,
        clock: IReactorTime,
        max_bytes: int,
        slow_timeout: float,
        on_slow: Callable[[], object],
        stats: StatsSink | None = None,
    ) -> None:
        self._write = write
        self._clock = clock
        self.max_bytes = max_bytes
        self.slow_timeout = slow_timeout
        self._on_slow = on_slow
        self._stats = stats
        self.paused = False
        self.closed = False
        self.queued_bytes = 0
        self.dropped = 0
        self._control: deque[bytes] = deque()
        self._latest: dict[Hashable, bytes] = {}
        self._bulk: deque[bytes] = deque()
        self._slow_call: IDelayedCall | None = None

    # -- producer interface (called by the transport) --

    def pauseProducing(self) -> None:
        """The transport's buffer is full: hold items from now on."""
        self.paused = True
        self._arm()

    def resumeProducing(self) -> None:
        """The transport drained: write what is held, in priority order."""
        self.paused = False
        self._disarm()  # progress: a pause during the flush below starts a fresh slow_timeout
        self._flush()

    def stopProducing(self) -> None:
        """The connection is gone: drop everything."""
        self.close()

    # -- API for faces --

    def put(self, data: bytes, priority: Priority, key: Hashable | None = None) -> None:
        """Send ``data`` now, or hold/conflate/drop it by ``priority`` while paused.

        ``key`` identifies the latest-value stream (e.g. ``(device_id, type)``) for LATEST items.
        """
        if self.closed:
            return
        if not self.paused:
            self._write(data)
            return
        n = len(data)
        if priority is Priority.CONTROL:
            self._control.append(data)
            self.queued_bytes += n
        elif priority is Priority.LATEST and key is not None:
            old = self._latest.pop(key, None)
            if old is not None:
                self.queued_bytes -= len(old)
                self._count_drop("conflated")
            self._latest[key] = data
            self.queued_bytes += n
        else:
            if self.queued_bytes + n > self.max_bytes:
                self._count_drop("bulk")
                return
            self._bulk.append(data)
            self.queued_bytes += n
        while self.queued_bytes > self.max_bytes and self._bulk:
            self.queued_bytes -= len(self._bulk.popleft())
            self._count_drop("bulk")
        self._arm()
        if self.queued_bytes > 4 * self.max_bytes:
            self._give_up()

    def close(self) -> None:
        """Release everything; later puts are ignored."""
        self.closed = True
        self._control.clear()
        self._latest.clear()
        self._bulk.clear()
        self.queued_bytes = 0
        self._disarm()

    # -- internals --

    def _count_drop(self, reason: str) -> None:
        self.dropped += 1
        if self._stats is not None:
            self._stats.drop("slow_" + reason)

    def _flush(self) -> None:
        while not self.paused and not self.closed and (self._control or self._latest or self._bulk):
            if self._control:
                data = self._control.popleft()
            elif self._latest:
                key = next(iter(self._latest))
                data = self._latest.pop(key)
            else:
                data = self._bulk.popleft()
            self.queued_bytes -= len(data)
            self._write(data)
        if not self.paused:
            self._disarm()

    def _arm(self) -> None:
        if self._slow_call is None and not self.closed:
            self._slow_call = self._clock.callLater(self.slow_timeout, self._check_slow)

    def _disarm(self) -> None:
        if self._slow_call is not None:
            if self._slow_call.active():
                self._slow_call.cancel()
            self._slow_call = None

    def _check_slow(self) -> None:
        self._slow_call = None
        if self.closed:
            return
        if self.paused or self.queued_bytes > self.max_bytes:
            self._give_up()

    def _give_up(self) -> None:
        if self.closed:
            return
        self.close()
        if self._stats is not None:
            self._stats.drop("slow_subscriber_closed")
        self._on_slow()
