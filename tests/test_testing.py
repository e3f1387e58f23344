"""robonet.testing: the shared fakes behave as the test modules rely on."""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase

from robonet.model import Message
from robonet.protocols.botlink import encode_frame
from robonet.testing import (
    REQUIRE_ALL,
    T0,
    FakeBatch,
    FakeLink,
    FakeStore,
    RecordingTransport,
    checksum,
    make_hub,
    require,
)


class FakeStoreTests(SynchronousTestCase):
    def test_group_batch(self) -> None:
        """Rows join the current batch until next_batch; commit runs ok(*args) once."""
        store = FakeStore()
        b1 = store.append("r1", "telemetry", 1.0, {"a": 1}, b"raw")
        self.assertIs(store.append("r1", "telemetry", 2.0, {}, None), b1)
        b2 = store.next_batch()
        self.assertIs(store.append("r2", "status", 3.0, {}, None), b2)
        self.assertEqual(store.rows[0], ("r1", "telemetry", 1.0, {"a": 1}, b"raw"))
        self.assertEqual(store.batches, [b1, b2])
        got: list[Any] = []
        b1.when_committed(got.append, lambda f, x: got.append(("failed", x)), "first")
        b1.commit()
        b1.commit()
        self.assertEqual(got, ["first"])

    def test_batch_per_row_and_fail(self) -> None:
        """batch_per_row gives each row its own batch; fail() hands the failure to every waiter."""
        store = FakeStore(batch_per_row=True)
        a = store.append("r1", "t", 0.0, {}, None)
        b = store.append("r1", "t", 0.0, {}, None)
        self.assertIsNot(a, b)
        failures: list[tuple[Failure, str]] = []
        a.when_committed(lambda x: None, lambda f, x: failures.append((f, x)), "row")
        a.fail()
        self.assertEqual(failures[0][1], "row")
        self.assertIsInstance(failures[0][0].value, RuntimeError)
        batch = FakeBatch()
        batch.fail()  # no waiters: nothing happens


class FakeLinkTests(SynchronousTestCase):
    def test_modes(self) -> None:
        """deferred / succeed / None / exception, and close_link recorded with codes."""
        link = FakeLink()
        d = link.deliver("cmd")  # type: ignore[arg-type]
        self.assertIs(link.pending[0], d)
        self.assertIsNone(self.successResultOf(FakeLink("succeed").deliver("c")))  # type: ignore[arg-type]
        self.assertIsNone(FakeLink(None).deliver("c"))  # type: ignore[arg-type]
        self.assertRaises(ValueError, FakeLink(ValueError("x")).deliver, "c")
        link.close_link("replaced", "a newer connection")
        self.assertEqual(
            (link.closed, link.closed_codes), ([("replaced", "a newer connection")], ["replaced"])
        )


class MakeHubTests(SynchronousTestCase):
    def test_real_hub_on_clock(self) -> None:
        """make_hub: a real Hub at T0 on a Clock, config from the overrides, rows into the store."""
        store = FakeStore()
        hub, clock = make_hub(self, store=store, botlink={"max_per_ip": 3})
        self.assertEqual((hub.now(), hub.config.botlink.max_per_ip), (T0, 3))
        dev = hub.connect(FakeLink(), "r1", face="botlink", role="robot", address="x")
        hub.ingest(dev, Message("telemetry", {"type": "telemetry", "battery": 1}, "r1", hub.now()))
        self.assertEqual([r[:2] for r in store.rows], [("r1", "telemetry")])
        clock.advance(5)
        self.assertEqual(hub.now(), T0 + 5)


class RecordingTransportTests(SynchronousTestCase):
    def test_frames_and_lines(self) -> None:
        """Frames split across writes are decoded once complete; lines likewise; writes counted."""
        t = RecordingTransport("10.0.0.1:1234")
        self.assertEqual(t.getPeer().host, "10.0.0.1")
        frame = encode_frame(b'{"type":"ack","id":1}')
        t.write(frame[:3])
        self.assertEqual(t.frames(), [])
        t.write(frame[3:] + frame)
        self.assertEqual(t.json_frames(), [{"type": "ack", "id": 1}] * 2)
        self.assertEqual((t.writes, b"".join(t.chunks)), (2, frame * 2))
        lines = RecordingTransport()
        lines.writeSequence([b'{"a":1}\nte', b"xt\n"])
        self.assertEqual(lines.lines(), [b'{"a":1}', b"text"])
        lines.abortConnection()
        self.assertTrue(lines.aborted)

    def test_checksum(self) -> None:
        """The ack sum is the byte sum mod 2**32."""
        self.assertEqual(checksum(b"\xff" * 3), 765)


class RequireTests(SynchronousTestCase):
    def test_skip_or_fail(self) -> None:
        """Missing -> SkipTest normally, FailTest when REQUIRE_ALL_TESTS=1; present -> nothing."""
        with mock.patch.dict(os.environ, {REQUIRE_ALL: ""}):
            self.assertRaises(SkipTest, require, None, "no ffmpeg")
            require("/usr/bin/ffmpeg", "no ffmpeg")
        with mock.patch.dict(os.environ, {REQUIRE_ALL: "1"}):
            self.assertRaises(FailTest, require, False, "no ffmpeg")
