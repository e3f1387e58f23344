"""Hub statistics (seed 000 "Statistics & Monitoring"): counters cheap enough for the hot path.

Counts messages and bytes in/out per message type, errors per code, fan-out drops per reason, and
keeps bounded samples of ack round-trip times (commands the hub sent, acked by robots) and of ack
delays (frame received -> ack written, which includes the store's group commit). Latencies are also
counted into fixed histogram buckets, exported on ``/metrics`` as Prometheus histograms.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any

#: Upper bounds (seconds, inclusive) of the latency histogram buckets; +Inf is implied.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip


class Samples:
    """Latency samples (seconds): a bounded ring for percentiles in milliseconds, and histogram
    bucket counters over every sample ever added (Prometheus ``_bucket``/``_sum``/``_count``).

    ``add`` is on the hot path: one append, one bisect over ``buckets``, two additions.
    """

    __slots__ = ("_ring", "count", "sum", "buckets", "_counts")

    def __init__(self, size: int = 4096, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._ring: deque[float] = deque(maxlen=size)
        self.count = 0
        self.sum = 0.0
        self.buckets = buckets
        # one counter per bucket plus the +Inf bucket; not cumulative (histogram() makes them so)
        self._counts = [0] * (len(buckets) + 1)

    def add(self, seconds: float) -> None:
        """Record one sample."""
        self._ring.append(seconds)
        self.count += 1
        self.sum += seconds
        self._counts[bisect_left(self.buckets, seconds)] += 1

    def histogram(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs for every bucket, ending with ``("+Inf", count)``."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip(self.buckets, self._counts, strict=False):
            total += n
            out.append((repr(float(bound)), total))
        out.append(("+Inf", total + self._counts[-1]))
        return out

    def summary(self) -> dict[str, Any]:
        """``{"count", "p50_ms", "p99_ms", "max_ms"}`` over the retained window (None when empty)."""
        if not self._ring:
            return {"count": self.count, "p50_ms": None, "p99_ms": None, "max_ms": None}
        s = sorted(self._ring)
        n = len(s)
        # nearest rank: the smallest sample with at least p% of the samples at or below it
        return {
            "count": self.count,
            "p50_ms": round(s[(n * 50 + 99) // 100 - 1] * 1000, 3),
            "p99_ms": round(s[(n * 99 + 99) // 100 - 1] * 1000, 3),
            "max_ms": round(s[-1] * 1000, 3),
        }


class Stats:
    """Process-wide counters. ``started_at`` is hub time (Unix seconds) at construction."""

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.msgs_in: dict[str, int] = {}
        self.msgs_out: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors: dict[str, int] = {}
        self.drops: dict[str, int] = {}
        self.connections: dict[str, int] = {}
        self.ack_rtt = Samples()
        self.ack_delay = Samples()

    def count_in(self, mtype: str, nbytes: int = 0) -> None:
        """One message of ``mtype`` received (``nbytes`` of payload)."""
        m = self.msgs_in
        m[mtype] = m.get(mtype, 0) + 1
        self.bytes_in += nbytes

    def count_out(self, mtype: str, nbytes: int = 0) -> None:
        """One message of ``mtype`` sent."""
        m = self.msgs_out
        m[mtype] = m.get(mtype, 0) + 1
        self.bytes_out += nbytes

    def bytes_received(self, nbytes: int) -> None:
        """``nbytes`` of payload read by a face, counted apart from any message (framing, partial reads)."""
        self.bytes_in += nbytes

    def bytes_sent(self, nbytes: int) -> None:
        """``nbytes`` written by a face, counted apart from any message (batched writes)."""
        self.bytes_out += nbytes

    def error(self, code: str) -> None:
        """One error of spec code ``code`` (bad_json, frame_too_large, ...)."""
        self.errors[code] = self.errors.get(code, 0) + 1

    def drop(self, reason: str, count: int = 1) -> None:
        """``count`` items dropped for ``reason`` (slow subscriber, udp garbage, ...)."""
        self.drops[reason] = self.drops.get(reason, 0) + count

    def connection(self, face: str, delta: int) -> None:
        """Track open connections per face (+1 on open, -1 on close)."""
        self.connections[face] = self.connections.get(face, 0) + delta

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything as a JSON-able dict (the ``stats`` endpoint adds registry counts)."""
        return {
            "uptime_s": round(now - self.started_at, 3),
            "messages_in": dict(self.msgs_in),
            "messages_out": dict(self.msgs_out),
            "messages_in_total": sum(self.msgs_in.values()),
            "messages_out_total": sum(self.msgs_out.values()),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors": dict(self.errors),
            "drops": dict(self.drops),
            "connections": dict(self.connections),
            "ack_rtt": self.ack_rtt.summary(),
            "ack_delay": self.ack_delay.summary(),
        }
