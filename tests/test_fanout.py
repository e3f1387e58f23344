"""Fan-out queues (robonet.fanout.OutboundQueue) and hub statistics (robonet.stats).

OutboundQueue: write-through while the transport keeps up; while paused CONTROL is kept in order,
LATEST conflated per key, BULK dropped first; a subscriber stalled for slow_timeout (or over the
hard cap) is handed to on_slow.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from robonet.fanout import OutboundQueue
from robonet.model import Priority
from robonet.stats import Samples, Stats

C, L, B = Priority.CONTROL, Priority.LATEST, Priority.BULK


class QueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.out: list[bytes] = []
        self.slow: list[int] = []
        self.stats = Stats(0.0)
        self.q = self.make()

    def make(self, max_bytes: int = 100, slow_timeout: float = 10.0) -> OutboundQueue:
        return OutboundQueue(
            self.out.append,
            clock=self.clock,
            max_bytes=max_bytes,
            slow_timeout=slow_timeout,
            on_slow=lambda: self.slow.append(1),
            stats=self.stats,
        )

    def test_producer_interface(self) -> None:
        """It is an IPushProducer a transport can register."""
        verifyObject(IPushProducer, self.q)
        t = StringTransport()
        t.registerProducer(self.q, True)
        self.assertIs(t.producer, self.q)

    def test_write_through(self) -> None:
        """While not paused every item is written at once, whatever its priority."""
        self.q.put(b"a", C)
        self.q.put(b"b", L, key="k")
        self.q.put(b"c", B)
        self.assertEqual(self.out, [b"a", b"b", b"c"])
        self.assertEqual(self.q.queued_bytes, 0)

    def test_control_kept_in_order(self) -> None:
        """While paused CONTROL items are held (never dropped, even over max_bytes) and written in order."""
        self.q.pauseProducing()
        for i in range(30):
            self.q.put(b"c%02d" % i + b"x" * 7, C)
        self.assertEqual(self.out, [])
        self.assertEqual(self.q.queued_bytes, 300)
        self.q.resumeProducing()
        self.assertEqual(self.out, [b"c%02d" % i + b"x" * 7 for i in range(30)])
        self.assertEqual((self.q.queued_bytes, self.q.dropped), (0, 0))

    def test_latest_conflated(self) -> None:
        """While paused only the newest LATEST item per key is kept; drops are counted."""
        self.q.pauseProducing()
        for i in range(5):
            self.q.put(b"a%d" % i, L, key=("r1", "telemetry"))
            self.q.put(b"b%d" % i, L, key=("r2", "telemetry"))
        self.q.resumeProducing()
        self.assertEqual(sorted(self.out), [b"a4", b"b4"])
        self.assertEqual(self.q.dropped, 8)
        self.assertEqual(self.stats.drops["slow_conflated"], 8)

    def test_flush_priority_order(self) -> None:
        """On resume CONTROL goes first, then LATEST, then BULK."""
        self.q.pauseProducing()
        self.q.put(b"bulk", B)
        self.q.put(b"latest", L, key="k")
        self.q.put(b"control", C)
        self.q.resumeProducing()
        self.assertEqual(self.out, [b"control", b"latest", b"bulk"])

    def test_bulk_dropped_first(self) -> None:
        """Over max_bytes the oldest BULK items go first; CONTROL and LATEST stay."""
        self.q.pauseProducing()
        for i in range(4):
            self.q.put(b"B%d" % i + b"." * 18, B)  # 4 x 20 bytes
        self.q.put(b"L" * 30, L, key="k")  # 110 > 100: drop B0
        self.q.put(b"C" * 30, C)  # 120: drop B1 -> 100
        self.q.resumeProducing()
        self.assertEqual(self.out, [b"C" * 30, b"L" * 30, b"B2" + b"." * 18, b"B3" + b"." * 18])
        self.assertEqual(self.stats.drops["slow_bulk"], 2)

    def test_new_bulk_dropped_when_full(self) -> None:
        """A BULK item that does not fit is dropped itself."""
        self.q.pauseProducing()
        self.q.put(b"C" * 90, C)
        self.q.put(b"B" * 20, B)
        self.q.resumeProducing()
        self.assertEqual(self.out, [b"C" * 90])
        self.assertEqual(self.q.dropped, 1)

    def test_latest_without_key_is_droppable(self) -> None:
        """A LATEST item without a key cannot be conflated and is treated like BULK."""
        self.q.pauseProducing()
        self.q.put(b"C" * 95, C)
        self.q.put(b"L" * 10, L)
        self.q.resumeProducing()
        self.assertEqual(self.out, [b"C" * 95])

    def test_on_slow_after_timeout(self) -> None:
        """A subscriber paused for slow_timeout is handed to on_slow once, and the queue is closed."""
        self.q.pauseProducing()
        self.q.put(b"x", C)
        self.clock.advance(9.9)
        self.assertEqual(self.slow, [])
        self.clock.advance(0.1)
        self.assertEqual(self.slow, [1])
        self.assertTrue(self.q.closed)
        self.assertEqual(self.stats.drops["slow_subscriber_closed"], 1)
        self.q.put(b"y", C)
        self.q.resumeProducing()
        self.clock.advance(100)
        self.assertEqual((self.out, self.slow), ([], [1]))

    def test_resume_in_time(self) -> None:
        """Resuming before slow_timeout cancels the timer: no on_slow."""
        self.q.pauseProducing()
        self.q.put(b"x", C)
        self.clock.advance(9)
        self.q.resumeProducing()
        self.clock.advance(100)
        self.assertEqual(self.slow, [])
        self.assertFalse(self.q.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pause_again_rearms(self) -> None:
        """Each new stall gets the full slow_timeout."""
        self.q.pauseProducing()
        self.clock.advance(9)
        self.q.resumeProducing()
        self.q.pauseProducing()
        self.clock.advance(9)
        self.assertEqual(self.slow, [])
        self.clock.advance(1)
        self.assertEqual(self.slow, [1])

    def test_slow_reader_making_progress(self) -> None:
        """A reader that keeps draining (resume, partial flush, pause again) is not closed: each new pause
        gets the full slow_timeout from when it began."""
        self.q.pauseProducing()
        for i in range(3):
            self.q.put(b"%d" % i, C)

        def write(data: bytes) -> None:
            self.out.append(data)
            self.q.pauseProducing()  # the transport's buffer fills again after each write

        self.q._write = write
        for second in range(5, 50, 5):
            self.clock.advance(5)
            self.q.put(b"%d" % second, C)
            self.q.resumeProducing()
            self.assertEqual(self.slow, [], second)
        self.clock.advance(10)
        self.assertEqual(self.slow, [1])

    def test_hard_cap(self) -> None:
        """More than 4 x max_bytes held (CONTROL cannot be dropped) gives up at once."""
        self.q.pauseProducing()
        for _ in range(4):
            self.q.put(b"x" * 100, C)
        self.assertEqual(self.slow, [])
        self.q.put(b"x", C)
        self.assertEqual(self.slow, [1])
        self.assertEqual(self.q.queued_bytes, 0)

    def test_pause_during_flush(self) -> None:
        """If the transport pauses again while flushing, the rest stays queued, in order."""
        self.q.pauseProducing()
        for i in range(4):
            self.q.put(b"%d" % i, C)

        def write(data: bytes) -> None:
            self.out.append(data)
            if data == b"1":
                self.q.pauseProducing()

        self.q._write = write
        self.q.resumeProducing()
        self.assertEqual(self.out, [b"0", b"1"])
        self.q.put(b"4", C)
        self.q.resumeProducing()
        self.assertEqual(self.out, [b"0", b"1", b"2", b"3", b"4"])

    def test_stop_producing(self) -> None:
        """stopProducing (connection gone) drops everything without calling on_slow."""
        self.q.pauseProducing()
        self.q.put(b"x", C)
        self.q.stopProducing()
        self.clock.advance(100)
        self.q.put(b"y", C)
        self.assertEqual((self.out, self.slow, self.q.queued_bytes), ([], [], 0))


class SamplesTests(SynchronousTestCase):
    """Samples: a bounded ring with nearest-rank percentiles in milliseconds."""

    def test_empty(self) -> None:
        """No samples: percentiles are None."""
        self.assertEqual(Samples().summary(), {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None})

    def test_percentiles(self) -> None:
        """1..100 ms (any order): p50 50 ms, p99 99 ms, max 100 ms (nearest rank)."""
        s = Samples()
        for v in [*range(100, 50, -1), *range(1, 51)]:
            s.add(v / 1000)
        self.assertEqual(s.summary(), {"count": 100, "p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0})

    def test_small(self) -> None:
        """One sample is every percentile; two samples: p50 is the lower one."""
        s = Samples()
        s.add(0.004)
        self.assertEqual(s.summary()["p50_ms"], 4.0)
        self.assertEqual(s.summary()["p99_ms"], 4.0)
        s.add(0.002)
        self.assertEqual((s.summary()["p50_ms"], s.summary()["p99_ms"]), (2.0, 4.0))

    def test_thousand(self) -> None:
        """1..1000 ms: p50 500 ms, p99 990 ms."""
        s = Samples()
        for v in range(1, 1001):
            s.add(v / 1000)
        self.assertEqual((s.summary()["p50_ms"], s.summary()["p99_ms"]), (500.0, 990.0))

    def test_bounded(self) -> None:
        """Only the newest ``size`` samples are kept; count keeps counting."""
        s = Samples(size=10)
        for v in range(1, 21):
            s.add(v / 1000)
        summary = s.summary()
        self.assertEqual((summary["count"], summary["max_ms"], summary["p50_ms"]), (20, 20.0, 15.0))


class StatsTests(SynchronousTestCase):
    """Stats counters and their snapshot."""

    def test_counters(self) -> None:
        """count_in/out, errors, drops and connections add up in the snapshot."""
        s = Stats(100.0)
        s.count_in("telemetry", 10)
        for _ in range(3):
            s.count_in("telemetry", 10)
        s.count_out("ack", 5)
        s.error("bad_json")
        s.error("bad_json")
        s.drop("slow_bulk", 4)
        s.connection("botlink", 1)
        s.connection("botlink", 1)
        s.connection("botlink", -1)
        s.ack_rtt.add(0.01)
        snap = s.snapshot(112.5)
        self.assertEqual(snap["uptime_s"], 12.5)
        self.assertEqual(
            (snap["messages_in"], snap["messages_in_total"], snap["bytes_in"]), ({"telemetry": 4}, 4, 40)
        )
        self.assertEqual(
            (snap["messages_out"], snap["messages_out_total"], snap["bytes_out"]), ({"ack": 1}, 1, 5)
        )
        self.assertEqual(
            (snap["errors"], snap["drops"], snap["connections"]),
            ({"bad_json": 2}, {"slow_bulk": 4}, {"botlink": 1}),
        )
        self.assertEqual(snap["ack_rtt"]["p50_ms"], 10.0)
        self.assertEqual(snap["ack_delay"]["count"], 0)

    def test_histogram_buckets(self) -> None:
        """Every sample lands in the first bucket whose bound is >= it (le), cumulatively, with the
        sum and the +Inf count; the ring's summary is unaffected."""
        s = Samples(size=2, buckets=(0.01, 0.1))
        for seconds in (0.005, 0.01, 0.05, 3.0):
            s.add(seconds)
        self.assertEqual(s.histogram(), [("0.01", 2), ("0.1", 3), ("+Inf", 4)])
        self.assertAlmostEqual(s.sum, 3.065)
        self.assertEqual(s.summary()["count"], 4)

    def test_snapshot_is_copy(self) -> None:
        """Changing a snapshot does not change the counters."""
        s = Stats(0.0)
        s.error("x")
        s.snapshot(1.0)["errors"]["x"] = 99
        self.assertEqual(s.errors["x"], 1)
