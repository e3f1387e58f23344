"""Bot-link framing (spec/botlink.md "Transport", HARDENING.md bot-link rows).

Property tests: however a stream of frames is cut into reads, the decoder (and the protocol) sees
the same frames. Bad length prefixes (0, 2**31-1, 2**32-1) get an error frame and close at once,
with nothing buffered; before hello the frame cap is ``max_hello_frame``.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from robonet.protocols.botlink import FrameDecoder, FrameError, encode_frame
from tests.test_botlink import Wire, checksum, make_hub

payloads = st.lists(st.binary(min_size=1, max_size=300), max_size=20)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (sorted, deduplicated, clipped to the data)."""
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


class DecoderPropertyTests(SynchronousTestCase):
    """FrameDecoder is independent of how the stream is split into reads."""

    @settings(max_examples=300, deadline=None)
    @given(payloads, st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
    def test_any_split_same_frames(self, frames: list[bytes], cuts: list[int]) -> None:
        """Feeding the stream in arbitrary pieces yields exactly the frames, in order, nothing left over."""
        stream = b"".join(encode_frame(p) for p in frames)
        decoder = FrameDecoder(1024)
        got: list[bytes] = []
        for piece in split(stream, cuts):
            got.extend(decoder.feed(piece))
        self.assertEqual(got, frames)
        self.assertEqual(decoder.pending, 0)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(min_size=1, max_size=50), st.integers(min_value=1, max_value=53))
    def test_partial_frame_pending(self, payload: bytes, cut: int) -> None:
        """An incomplete frame yields nothing and is held until its last byte arrives."""
        frame = encode_frame(payload)
        cut = min(cut, len(frame) - 1)
        decoder = FrameDecoder(1024)
        self.assertEqual(decoder.feed(frame[:cut]), [])
        self.assertEqual(decoder.pending, cut)
        self.assertEqual(decoder.feed(frame[cut:]), [payload])

    def test_bad_lengths(self) -> None:
        """Length 0 is bad_frame, over the cap frame_too_large; raised on the prefix, buffer emptied."""
        for length, code in (
            (0, "bad_frame"),
            (1025, "frame_too_large"),
            (2**31 - 1, "frame_too_large"),
            (2**32 - 1, "frame_too_large"),
        ):
            decoder = FrameDecoder(1024)
            decoder.feed(b"\x00\x00")
            with self.assertRaises(FrameError) as cm:
                decoder.feed(struct.pack(">I", length)[2:])
            self.assertEqual(cm.exception.code, code)
            self.assertEqual(decoder.pending, 0)

    def test_cap_inclusive(self) -> None:
        """A frame of exactly max_frame bytes is accepted."""
        self.assertEqual(FrameDecoder(10).feed(encode_frame(b"x" * 10)), [b"x" * 10])


class ProtocolPropertyTests(SynchronousTestCase):
    """Through BotLinkProtocol: the replies do not depend on how the frames were split into reads."""

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["telemetry", "status", "ping", "sensor_data"]),
                    "v": st.one_of(
                        st.integers(-(2**63), 2**63 - 1), st.text(max_size=30), st.floats(allow_nan=False)
                    ),
                }
            ),
            max_size=12,
        ),
        st.lists(st.integers(min_value=0, max_value=5000), max_size=30),
    )
    def test_split_independent(self, messages: list[dict[str, Any]], cuts: list[int]) -> None:
        """hello + N frames with ids, cut anywhere: welcome then one ack per frame with the right sum."""
        _hub, factory, _clock = make_hub(self)
        w = Wire(factory)
        hello = encode_frame(orjson.dumps({"type": "hello", "proto": 1, "role": "robot", "device_id": "r"}))
        bodies = [orjson.dumps({**m, "id": i}) for i, m in enumerate(messages)]
        for piece in split(hello + b"".join(encode_frame(b) for b in bodies), cuts):
            w.raw(piece)
        frames = w.frames()
        self.assertEqual(frames[0]["type"], "welcome")
        self.assertEqual(
            frames[1:], [{"type": "ack", "id": i, "sum": checksum(b)} for i, b in enumerate(bodies)]
        )
        self.assertFalse(w.closed)

    @settings(max_examples=100, deadline=None)
    @given(
        st.integers(min_value=0, max_value=6),
        st.lists(st.integers(min_value=0, max_value=400), max_size=6),
        st.sampled_from([0, 2**31 - 1, 2**32 - 1]),
    )
    def test_frames_before_bad_prefix(self, n: int, cuts: list[int], length: int) -> None:
        """Frames complete before a bad prefix are processed whatever the split; then error and close."""
        _hub, factory, _clock = make_hub(self)
        w = Wire(factory)
        w.hello(device_id="r")
        bodies = [orjson.dumps({"type": "telemetry", "id": i}) for i in range(n)]
        stream = b"".join(encode_frame(b) for b in bodies) + struct.pack(">I", length) + b"trailing"
        for piece in split(stream, cuts):
            w.raw(piece)
        frames = w.frames()
        self.assertEqual(
            frames[:-1], [{"type": "ack", "id": i, "sum": checksum(b)} for i, b in enumerate(bodies)]
        )
        self.assertEqual(frames[-1]["code"], "bad_frame" if length == 0 else "frame_too_large")
        self.assertTrue(w.closed)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=80_000), max_size=4))
    def test_hello_then_big_frame(self, cuts: list[int]) -> None:
        """hello then a frame over max_hello_frame (under max_frame) is accepted however it is split."""
        _hub, factory, _clock = make_hub(self)
        w = Wire(factory)
        hello = encode_frame(orjson.dumps({"type": "hello", "proto": 1, "device_id": "r"}))
        big = orjson.dumps({"type": "telemetry", "id": 1, "pad": "x" * 70_000})
        for piece in split(hello + encode_frame(big), cuts):
            w.raw(piece)
        frames = w.frames()
        self.assertEqual([f["type"] for f in frames], ["welcome", "ack"])
        self.assertEqual(frames[1]["sum"], checksum(big))


class BadPrefixTests(SynchronousTestCase):
    """HARDENING.md: length 0, 2**31-1, 2**32-1 -> error frame, close on the prefix, nothing buffered."""

    def check(self, prefix: int, code: str, hello: bool) -> None:
        hub, factory, _clock = make_hub(self)
        w = Wire(factory)
        if hello:
            w.hello(device_id="r")
        w.raw(struct.pack(">I", prefix) + b"x" * 100)
        err = w.one()
        self.assertEqual((err["type"], err["code"], err["ref"]), ("error", code, None))
        self.assertTrue(w.closed)
        self.assertEqual(w.pending, 0)
        self.assertEqual(hub.stats.errors[code], 1)
        w.raw(encode_frame(b'{"type":"ping","id":1}'))
        self.assertEqual(w.written(), b"")

    def test_zero_before_hello(self) -> None:
        """Length 0 before hello: bad_frame and close."""
        self.check(0, "bad_frame", False)

    def test_zero_after_hello(self) -> None:
        """Length 0 after hello: bad_frame and close."""
        self.check(0, "bad_frame", True)

    def test_2_31_before_hello(self) -> None:
        """Length 2**31-1 before hello: frame_too_large and close."""
        self.check(2**31 - 1, "frame_too_large", False)

    def test_2_31_after_hello(self) -> None:
        """Length 2**31-1 after hello: frame_too_large and close."""
        self.check(2**31 - 1, "frame_too_large", True)

    def test_2_32_before_hello(self) -> None:
        """Length 2**32-1 before hello: frame_too_large and close."""
        self.check(2**32 - 1, "frame_too_large", False)

    def test_2_32_after_hello(self) -> None:
        """Length 2**32-1 after hello: frame_too_large and close."""
        self.check(2**32 - 1, "frame_too_large", True)

    def test_prefix_dribbled(self) -> None:
        """A bad prefix arriving one byte per read is caught on its fourth byte."""
        _hub, factory, _clock = make_hub(self)
        w = Wire(factory)
        w.hello(device_id="r")
        for b in struct.pack(">I", 2**31 - 1)[:3]:
            w.raw(bytes([b]))
            self.assertFalse(w.closed)
        w.raw(b"\xff")
        self.assertTrue(w.closed)
        self.assertEqual(w.one()["code"], "frame_too_large")
        self.assertEqual(w.pending, 0)


class HelloCapTests(SynchronousTestCase):
    """Before the welcome a frame may be at most max_hello_frame bytes; after it, max_frame."""

    def frame_of(self, size: int) -> bytes:
        head = b'{"type":"telemetry","id":1,"pad":"'
        return encode_frame(head + b"x" * (size - len(head) - 2) + b'"}')

    def test_over_hello_cap(self) -> None:
        """A 64 KiB + 1 frame before hello is refused with frame_too_large and close, before it is read."""
        hub, factory, _clock = make_hub(self)
        w = Wire(factory)
        w.raw(self.frame_of(65537)[:4])
        err = w.one()
        self.assertEqual(err["code"], "frame_too_large")
        self.assertTrue(w.closed)
        self.assertEqual(hub.registry.devices(), [])

    def test_at_hello_cap(self) -> None:
        """A hello padded to exactly max_hello_frame bytes is accepted."""
        _hub, factory, _clock = make_hub(self)
        w = Wire(factory)
        head = b'{"type":"hello","proto":1,"device_id":"r","name":"'
        w.raw(encode_frame(head + b"n" * (65536 - len(head) - 2) + b'"}'))
        self.assertEqual(w.one()["type"], "welcome")

    def test_after_hello_max_frame(self) -> None:
        """After the welcome, frames up to max_frame are accepted and one byte more is refused."""
        _hub, factory, _clock = make_hub(self, botlink={"max_frame": 200_000})
        w = Wire(factory)
        w.hello(device_id="r")
        w.raw(self.frame_of(200_000))
        self.assertEqual(w.one()["type"], "ack")
        w.raw(self.frame_of(200_001)[:4])
        self.assertEqual(w.one()["code"], "frame_too_large")
        self.assertTrue(w.closed)

    def test_configured_hello_cap(self) -> None:
        """botlink.max_hello_frame is honoured."""
        _hub, factory, _clock = make_hub(self, botlink={"max_hello_frame": 100})
        w = Wire(factory)
        w.raw(self.frame_of(101)[:4])
        self.assertEqual(w.one()["code"], "frame_too_large")
