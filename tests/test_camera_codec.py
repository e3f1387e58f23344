"""The camera wire codec (spec/camera.md): packet table byte for byte, decoder, settings, auth gate."""

from __future__ import annotations

import random
from functools import reduce

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from robonet.protocols import camera as c
from robonet.protocols.camera import (
    AuthGate,
    AuthResult,
    CameraSettings,
    DecodeError,
    Packet,
    PacketDecoder,
    SettingsError,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def xor_all(data: bytes) -> int:
    """An independent checksum for the tests: XOR of every byte."""
    return reduce(lambda a, b: a ^ b, data, 0)


class PacketTableTests(SynchronousTestCase):
    """Every row of the spec's packet table, byte for byte."""

    def test_data_sample(self) -> None:
        """Data sample: 00 FF 01 00 00 09 vv t7..t0 CK, u64 BE milliseconds, XOR checksum."""
        ms = 1_733_740_245_123
        packet = c.encode_data_sample(7, ms)
        body = h("00 FF 01 00 00 09 07") + ms.to_bytes(8, "big")
        self.assertEqual(packet, body + bytes([xor_all(body)]))
        self.assertEqual(len(packet), 16)

    def test_data_sample_clamps(self) -> None:
        """The value byte is clamped to 0..255."""
        self.assertEqual(c.encode_data_sample(300, 0)[6], 255)
        self.assertEqual(c.encode_data_sample(-4, 0)[6], 0)

    def test_settings_request(self) -> None:
        """Settings request: 00 FF 02 01 00 00 FC."""
        self.assertEqual(c.SETTINGS_REQUEST, h("00 FF 02 01 00 00 FC"))
        self.assertEqual(c.encode_packet(2, 1), h("00 FF 02 01 00 00 FC"))

    def test_settings_response_defaults(self) -> None:
        """Settings response with the defaults: six setting bytes + three zero bytes, CHK E4."""
        raw = c.settings_to_bytes(CameraSettings())
        self.assertEqual(raw, h("64 01 0A 0A 0A 7F"))
        self.assertEqual(
            c.encode_settings_response(raw), h("00 FF 02 00 00 09 64 01 0A 0A 0A 7F 00 00 00 E4")
        )

    def test_settings_update(self) -> None:
        """Settings update with the defaults: 00 FF 02 01 00 06 64 01 0A 0A 0A 7F EA."""
        raw = c.settings_to_bytes(CameraSettings())
        self.assertEqual(c.encode_settings_update(raw), h("00 FF 02 01 00 06 64 01 0A 0A 0A 7F EA"))

    def test_settings_rejected(self) -> None:
        """Settings rejected (robonet): 00 FF 02 02 00 00 FF."""
        self.assertEqual(c.SETTINGS_REJECTED, h("00 FF 02 02 00 00 FF"))

    def test_auth_request(self) -> None:
        """Auth request for password "1111": 00 FF 00 01 00 04 31 31 31 31 FA."""
        self.assertEqual(c.encode_auth_request(b"1111"), h("00 FF 00 01 00 04 31 31 31 31 FA"))

    def test_auth_success(self) -> None:
        """Auth success: "ready", CHK 91."""
        self.assertEqual(c.AUTH_SUCCESS, h("00 FF 00 00 00 05 72 65 61 64 79 91"))

    def test_auth_failure(self) -> None:
        """Auth failure: 00 FF 00 02 00 00 FD."""
        self.assertEqual(c.AUTH_FAILURE, h("00 FF 00 02 00 00 FD"))

    def test_encode_rejects_bad_fields(self) -> None:
        """IDs/types outside a byte and payloads over 65535 bytes are refused."""
        self.assertRaises(ValueError, c.encode_packet, 256, 0)
        self.assertRaises(ValueError, c.encode_packet, 0, -1)
        self.assertRaises(ValueError, c.encode_packet, 0, 0, b"x" * 65536)
        self.assertEqual(len(c.encode_packet(0, 0, b"x" * 65535)), 65535 + 7)


class SettingsTableTests(SynchronousTestCase):
    """The setting-bytes table: encode, decode, valid ranges."""

    def test_encode_each_field(self) -> None:
        """Each field uses its encode column (shutter//100, int(gain), int(v*10), int((v+1)*127.5))."""
        s = CameraSettings(shutter=2550, gain=7, awb_red=2.3, awb_blue=0.1, contrast=1.5, brightness=1.0)
        self.assertEqual(c.settings_to_bytes(s), bytes([25, 7, 23, 1, 15, 255]))
        s = CameraSettings(shutter=100, gain=16, awb_red=5.0, awb_blue=5.0, contrast=0.0, brightness=-1.0)
        self.assertEqual(c.settings_to_bytes(s), bytes([1, 16, 50, 50, 0, 0]))

    def test_decode_each_field(self) -> None:
        """Each field uses its decode column (b*100, b, b/10, b/127.5-1)."""
        s = c.settings_from_bytes(bytes([25, 7, 23, 1, 15, 255]))
        self.assertEqual(s, CameraSettings(2500, 7, 2.3, 0.1, 1.5, 1.0))

    def test_round_trip_every_valid_byte(self) -> None:
        """encode(decode(b)) == b for every valid byte of every field (float rounding is absorbed)."""
        for index, name in enumerate(c.SETTINGS_FIELDS):
            lo, hi = c.BYTE_RANGES[name]
            for b in range(lo, hi + 1):
                raw = bytearray(c.settings_to_bytes(CameraSettings()))
                raw[index] = b
                self.assertEqual(
                    c.settings_to_bytes(c.settings_from_bytes(bytes(raw))), bytes(raw), (name, b)
                )

    def test_valid_ranges(self) -> None:
        """Bytes just outside each field's range are rejected and the error names the field."""
        for index, name in enumerate(c.SETTINGS_FIELDS):
            lo, hi = c.BYTE_RANGES[name]
            for b in (lo - 1, hi + 1):
                if not 0 <= b <= 255:
                    continue
                raw = bytearray(c.settings_to_bytes(CameraSettings()))
                raw[index] = b
                with self.assertRaises(SettingsError) as cm:
                    c.settings_from_bytes(bytes(raw))
                self.assertEqual(cm.exception.field, name)

    def test_wrong_length(self) -> None:
        """Anything but six bytes is rejected."""
        self.assertRaises(SettingsError, c.validate_settings_bytes, b"\x64\x01\x0a")

    def test_default_brightness_kept(self) -> None:
        """Byte 127 for the current brightness 0.0 keeps 0.0 (not -0.0039); a new byte decodes."""
        raw = c.settings_to_bytes(CameraSettings())
        self.assertEqual(c.settings_from_bytes(raw, CameraSettings()).brightness, 0.0)
        self.assertAlmostEqual(c.settings_from_bytes(raw).brightness, 127 / 127.5 - 1.0)

    def test_units_subset(self) -> None:
        """A subset of keys in original units is merged over the base and converted to bytes."""
        raw = c.settings_from_units({"gain": 4, "awb_red": 2.3}, CameraSettings())
        self.assertEqual(raw, bytes([100, 4, 23, 10, 10, 127]))

    def test_units_errors(self) -> None:
        """Unknown keys, non-numbers, booleans and out-of-range values name the field."""
        cases = [
            ({"iso": 100}, "iso"),
            ({"gain": "4"}, "gain"),
            ({"gain": True}, "gain"),
            ({"gain": 17}, "gain"),
            ({"shutter": 50}, "shutter"),
            ({"shutter": 20000}, "shutter"),
            ({"brightness": 1.5}, "brightness"),
            ({"brightness": -1.01}, "brightness"),
            ({"awb_blue": -1}, "awb_blue"),
            ({"contrast": float("inf")}, "contrast"),
            ({"awb_red": 1e308}, "awb_red"),
            ({"shutter": 10**400}, "shutter"),
        ]
        for values, field in cases:
            with self.assertRaises(SettingsError, msg=str(values)) as cm:
                c.settings_from_units(values, CameraSettings())
            self.assertEqual(cm.exception.field, field, values)
        self.assertRaises(SettingsError, c.settings_from_units, [1, 2], CameraSettings())

    def test_json_object(self) -> None:
        """The persisted object needs all six keys; values keep the file's units where they fit."""
        obj = {
            "shutter": 10050,
            "gain": 2,
            "awb_red": 1.5,
            "awb_blue": 1.2,
            "contrast": 1.0,
            "brightness": 0.0,
        }
        s = c.settings_from_json_object(obj)
        self.assertEqual(s, CameraSettings(10050, 2, 1.5, 1.2, 1.0, 0.0))
        self.assertRaises(SettingsError, c.settings_from_json_object, {"gain": 2})
        self.assertRaises(SettingsError, c.settings_from_json_object, dict(obj, gain=99))
        self.assertRaises(SettingsError, c.settings_from_json_object, "x")


def _packets() -> st.SearchStrategy[list[tuple[int, int, bytes]]]:
    return st.lists(
        st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40)), min_size=1, max_size=6
    )


class DecoderTests(SynchronousTestCase):
    """PacketDecoder: any split, resync on bad magic, bad checksum dropped, LEN limit."""

    @settings(max_examples=200, deadline=None)
    @given(packets=_packets(), data=st.data())
    def test_any_split(self, packets: list[tuple[int, int, bytes]], data: st.DataObject) -> None:
        """The same packets come out whatever the split points of the byte stream."""
        stream = b"".join(c.encode_packet(i, t, p) for i, t, p in packets)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        decoder = PacketDecoder(64)
        out: list[Packet | DecodeError] = []
        last = 0
        for cut in [*cuts, len(stream)]:
            out += decoder.feed(stream[last:cut])
            last = cut
        self.assertEqual(out, [Packet(i, t, p) for i, t, p in packets])
        self.assertEqual(decoder.pending, 0)

    @settings(max_examples=100, deadline=None)
    @given(garbage=st.binary(max_size=50), packets=_packets())
    def test_resync_after_garbage(self, garbage: bytes, packets: list[tuple[int, int, bytes]]) -> None:
        """Garbage without 00 FF before valid packets is skipped (reported) and the packets decode."""
        garbage = garbage.replace(b"\x00", b"\x01")
        stream = garbage + b"".join(c.encode_packet(i, t, p) for i, t, p in packets)
        decoder = PacketDecoder(64)
        out = []
        for i in range(len(stream)):  # one byte at a time: the worst split
            out += decoder.feed(stream[i : i + 1])
        good = [x for x in out if isinstance(x, Packet)]
        errors = [x for x in out if isinstance(x, DecodeError)]
        self.assertEqual(good, [Packet(i, t, p) for i, t, p in packets])
        self.assertEqual(sum(e.nbytes for e in errors), len(garbage))
        self.assertTrue(all(e.code == "bad_magic" for e in errors))

    def test_bad_magic_keeps_trailing_zero(self) -> None:
        """A trailing 00 after garbage may start the next magic and is kept."""
        decoder = PacketDecoder(64)
        self.assertEqual(
            decoder.feed(b"\x12\x34\x00"), [DecodeError("bad_magic", 2, "resynchronised on 00 FF")]
        )
        self.assertEqual(decoder.feed(c.SETTINGS_REQUEST[1:]), [Packet(2, 1, b"")])

    def test_bad_checksum_dropped(self) -> None:
        """A packet with a wrong XOR is dropped whole and reported; the next one decodes."""
        bad = bytearray(c.encode_settings_update(b"\x64\x01\x0a\x0a\x0a\x7f"))
        bad[-1] ^= 0x55
        decoder = PacketDecoder(64)
        out = decoder.feed(bytes(bad) + c.SETTINGS_REQUEST)
        self.assertEqual([type(x) for x in out], [DecodeError, Packet])
        self.assertEqual(out[0].code, "bad_checksum")  # type: ignore[union-attr]
        self.assertEqual(out[0].nbytes, len(bad))  # type: ignore[union-attr]

    def test_len_over_limit_is_fatal(self) -> None:
        """LEN above the port's limit is fatal at the header; nothing is buffered afterwards."""
        decoder = PacketDecoder(64)
        out = decoder.feed(h("00 FF 02 01 FF FF"))
        self.assertEqual(len(out), 1)
        assert isinstance(out[0], DecodeError)
        self.assertTrue(out[0].fatal)
        self.assertEqual(out[0].code, "too_long")
        self.assertEqual(decoder.feed(c.SETTINGS_REQUEST), [])
        self.assertEqual(decoder.pending, 0)

    def test_len_at_limit_accepted(self) -> None:
        """LEN equal to the limit is fine."""
        decoder = PacketDecoder(8)
        self.assertEqual(decoder.feed(c.encode_packet(2, 1, b"12345678")), [Packet(2, 1, b"12345678")])

    def test_pending(self) -> None:
        """pending counts a started packet's bytes, 0 between packets."""
        decoder = PacketDecoder(64)
        decoder.feed(c.SETTINGS_REQUEST[:3])
        self.assertEqual(decoder.pending, 3)
        decoder.feed(c.SETTINGS_REQUEST[3:])
        self.assertEqual(decoder.pending, 0)

    def test_random_megabyte(self) -> None:
        """1 MB of random bytes: only errors (or a fatal LEN), never a plausible settings packet."""
        rng = random.Random(1234)
        blob = rng.randbytes(1 << 20)
        decoder = PacketDecoder(c.SETTINGS_MAX_LEN)
        out = []
        for i in range(0, len(blob), 65536):
            out += decoder.feed(blob[i : i + 65536])
        self.assertFalse(any(isinstance(x, Packet) and x.id == 2 and x.type == 1 for x in out))
        self.assertTrue(any(isinstance(x, DecodeError) for x in out))
        self.assertLessEqual(decoder.pending, 6 + c.SETTINGS_MAX_LEN + 1)


class AuthGateTests(SynchronousTestCase):
    """The pure authentication policy."""

    def gate(self, **kw: object) -> AuthGate:
        g = AuthGate(**kw)  # type: ignore[arg-type]
        g.set_password("s3cret")
        return g

    def test_success_authorises_until_ttl(self) -> None:
        """A right password authorises the IP for ttl seconds, other IPs stay out."""
        g = self.gate(ttl=100.0)
        self.assertFalse(g.allowed("10.0.0.1", 0))
        self.assertIs(g.attempt("10.0.0.1", b"s3cret", 10.0), AuthResult.SUCCESS)
        self.assertTrue(g.allowed("10.0.0.1", 109.0))
        self.assertFalse(g.allowed("10.0.0.2", 50.0))
        self.assertFalse(g.allowed("10.0.0.1", 110.0))

    def test_require_auth_off(self) -> None:
        """Without require_auth every IP is allowed."""
        self.assertTrue(self.gate(require_auth=False).allowed("1.2.3.4", 0))

    def test_wrong_password(self) -> None:
        """A wrong password (also a prefix, also a longer one) fails."""
        g = self.gate()
        for pw in (b"s3cre", b"s3cret!", b"", b"S3CRET"):
            self.assertIs(g.attempt("10.0.0.9", pw, 0), AuthResult.FAILURE)

    def test_empty_password_matches_nothing(self) -> None:
        """An unset password never authenticates."""
        g = AuthGate()
        self.assertIs(g.attempt("1.1.1.1", b"", 0), AuthResult.FAILURE)

    def test_rate_limit(self) -> None:
        """After 5 failures a minute: the right password is not even checked; at most 10 answers a
        minute, the rest dropped; a minute later checking resumes."""
        g = self.gate(max_failures=5)
        results = [g.attempt("6.6.6.6", b"wrong", 1.0) for _ in range(1000)]
        self.assertEqual(results[:5], [AuthResult.FAILURE] * 5)
        self.assertEqual(results[5:15], [AuthResult.LIMITED] * 10)
        self.assertEqual(set(results[15:]), {AuthResult.DROP})
        self.assertIs(g.attempt("6.6.6.6", b"s3cret", 30.0), AuthResult.DROP)
        self.assertFalse(g.allowed("6.6.6.6", 30.0))
        self.assertIs(g.attempt("7.7.7.7", b"s3cret", 30.0), AuthResult.SUCCESS)
        self.assertIs(g.attempt("6.6.6.6", b"s3cret", 61.5), AuthResult.SUCCESS)

    def test_memory_bounded(self) -> None:
        """Tracking many IPs never exceeds max_tracked records."""
        g = self.gate(max_tracked=100)
        for i in range(1000):
            g.attempt(f"10.0.{i // 256}.{i % 256}", b"bad", float(i))
            g.attempt(f"11.0.{i // 256}.{i % 256}", b"s3cret", float(i))
        self.assertLessEqual(len(g._ips), 100)
        self.assertLessEqual(len(g._authorised), 100)
