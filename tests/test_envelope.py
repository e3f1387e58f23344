"""Unit tests of robonet.protocols.envelope: the robonet/1 shapes and decisions shared by every face."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase

from robonet.model import HubError
from robonet.protocols import envelope as env


class IdTests(SynchronousTestCase):
    def test_valid_id(self) -> None:
        """ids are ints 0..2**53; bool, float, negative and larger values are refused."""
        for ok in (0, 1, 2**53):
            self.assertTrue(env.valid_id(ok), ok)
        for bad in (True, False, -1, 2**53 + 1, 1.0, "1", None):
            self.assertFalse(env.valid_id(bad), bad)

    def test_message_id(self) -> None:
        """message_id returns the id or None, raises bad_frame on a malformed one."""
        self.assertIsNone(env.message_id({}))
        self.assertEqual(env.message_id({"id": 7}), 7)
        e = self.assertRaises(HubError, env.message_id, {"id": True})
        self.assertEqual(e.code, "bad_frame")
        self.assertIsNone(env.ref_of({"id": "x"}))
        self.assertEqual(env.ref_of({"id": 3}), 3)

    def test_message_type(self) -> None:
        """type must be a non-empty string: missing_type otherwise."""
        self.assertEqual(env.message_type({"type": "telemetry"}), "telemetry")
        for bad in ({}, {"type": ""}, {"type": 5}, {"type": None}):
            self.assertEqual(self.assertRaises(HubError, env.message_type, bad).code, "missing_type")


class DeviceIdTests(SynchronousTestCase):
    def test_one_rule(self) -> None:
        """One rule: a str of 1..128 printable characters without spaces."""
        for ok in ("robot_01", "bot-10.0.0.1", "a" * 128, "line-127.0.0.1:5000", "ü"):
            self.assertTrue(env.valid_device_id(ok), ok)
        for bad in ("", "a" * 129, "a b", " a", "a\n", "a\x00", 5, True, None, ["a"], {"a": 1}):
            self.assertFalse(env.valid_device_id(bad), bad)

    def test_command_target(self) -> None:
        """No device_id (or null) targets every robot; a bad one is bad_frame, never a broadcast."""
        self.assertIsNone(env.command_target({"type": "stop"}))
        self.assertIsNone(env.command_target({"type": "stop", "device_id": None}))
        self.assertEqual(env.command_target({"type": "stop", "device_id": "r1"}), "r1")
        for bad in (5, 0, True, "", ["r1"], "r 1"):
            e = self.assertRaises(HubError, env.command_target, {"type": "stop", "device_id": bad})
            self.assertEqual(e.code, "bad_frame")


class ProtoTests(SynchronousTestCase):
    def test_proto_integer_one_only(self) -> None:
        """proto must be the integer 1; true, 1.0, "1", 2 are proto_unsupported; absent is 1."""
        env.check_proto({})
        env.check_proto({"proto": 1})
        for bad in (True, 1.0, "1", 2, 0, None):
            e = self.assertRaises(HubError, env.check_proto, {"proto": bad})
            self.assertEqual(e.code, "proto_unsupported", bad)


class ClassifyTests(SynchronousTestCase):
    def test_classify(self) -> None:
        """Envelope types are special, allowlisted types commands, the rest data."""
        cmds = ("stop", "robot_move")
        self.assertEqual(env.classify("ack", cmds), env.SPECIAL)
        self.assertEqual(env.classify("request", cmds), env.SPECIAL)
        self.assertEqual(env.classify("stop", cmds), env.COMMAND)
        self.assertEqual(env.classify("telemetry", cmds), env.DATA)


class HelloTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """A bare hello is a client without a device id."""
        h = env.parse_hello({"type": "hello"})
        self.assertEqual((h.role, h.device_id, h.name), ("client", None, ""))

    def test_fields(self) -> None:
        """role, device_id and name are taken; a non-string name becomes empty."""
        h = env.parse_hello({"type": "hello", "role": "robot", "device_id": "r1", "name": 5})
        self.assertEqual((h.role, h.device_id, h.name), ("robot", "r1", ""))

    def test_refusals(self) -> None:
        """Each bad hello raises its code."""
        cases: list[tuple[dict[str, Any], str]] = [
            ({"proto": True}, "proto_unsupported"),
            ({"role": "king"}, "bad_hello"),
            ({"role": ["robot"]}, "bad_hello"),
            ({"device_id": 5}, "bad_hello"),
            ({"device_id": ""}, "bad_hello"),
        ]
        for extra, code in cases:
            e = self.assertRaises(HubError, env.parse_hello, {"type": "hello", **extra})
            self.assertEqual(e.code, code, extra)

    def test_roles_restricted(self) -> None:
        """A face may narrow the roles (the line link has no peers)."""
        e = self.assertRaises(HubError, env.parse_hello, {"role": "peer"}, roles=("robot", "client"))
        self.assertEqual(e.code, "bad_hello")

    def test_tokens(self) -> None:
        """A token must grant the role; any/admin grant every role; auth off accepts all."""
        tokens = {"rt": "robot", "ad": "admin", "an": "any"}
        self.assertEqual(env.parse_hello({"role": "robot", "token": "rt"}, tokens=tokens).role, "robot")
        self.assertEqual(env.parse_hello({"role": "client", "token": "ad"}, tokens=tokens).role, "client")
        self.assertEqual(env.parse_hello({"role": "client", "token": "an"}, tokens=tokens).role, "client")
        for bad in ({"role": "client", "token": "rt"}, {"role": "robot"}, {"role": "robot", "token": 5}):
            e = self.assertRaises(HubError, env.parse_hello, bad, tokens=tokens)
            self.assertEqual(e.code, "auth_failed")
        self.assertTrue(env.check_token(None, None, "robot"))


class AckTests(SynchronousTestCase):
    def test_additive_sum(self) -> None:
        """The spec's example: the 42-byte system_status payload sums to 0x0E28."""
        self.assertEqual(env.additive_sum(b'{"type": "system_status", "message": "hi"}'), 0x0E28)
        self.assertEqual(env.additive_sum(b"\xff" * (2**24 + 1)), (255 * (2**24 + 1)) & 0xFFFFFFFF)

    def test_ack_sum_ok(self) -> None:
        """A matching or absent sum passes; a different or non-integer one fails."""
        self.assertTrue(env.ack_sum_ok({"type": "ack", "id": 1}, 99))
        self.assertTrue(env.ack_sum_ok({"type": "ack", "id": 1, "sum": 99}, 99))
        self.assertFalse(env.ack_sum_ok({"type": "ack", "id": 1, "sum": 98}, 99))
        self.assertFalse(env.ack_sum_ok({"type": "ack", "id": 1, "sum": "99"}, 99))
        self.assertFalse(env.ack_sum_ok({"type": "ack", "id": 1, "sum": True}, 1))
        self.assertEqual(env.ack_obj(3, 4), {"type": "ack", "id": 3, "sum": 4})


class AnswerTests(SynchronousTestCase):
    def test_encode_response(self) -> None:
        """A JSON-able result is a success response; anything else an internal error response."""
        data, ok = env.encode_response(3, {"a": 1}, orjson.dumps)
        self.assertTrue(ok)
        self.assertEqual(
            orjson.loads(data), {"type": "response", "id": 3, "status": "success", "data": {"a": 1}}
        )
        data, ok = env.encode_response(4, object(), orjson.dumps)
        self.assertFalse(ok)
        got = orjson.loads(data)
        self.assertEqual((got["id"], got["status"], got["code"]), (4, "error", "internal"))

    def test_failure_code(self) -> None:
        """HubErrors keep their code; other exceptions are internal."""
        self.assertEqual(env.failure_code(HubError("device_offline", "gone")), ("device_offline", "gone"))
        self.assertEqual(env.failure_code(ValueError("x")), ("internal", "ValueError: x"))

    def test_remote_error(self) -> None:
        """A device's error frame becomes a HubError; a bad code is internal."""
        e = env.remote_error({"type": "error", "code": "busy", "message": "later"})
        self.assertEqual((e.code, e.message), ("busy", "later"))
        self.assertEqual(env.remote_error({"type": "error", "code": 5}).code, "internal")

    def test_shapes(self) -> None:
        """error, welcome and response objects have the spec's keys."""
        self.assertEqual(env.error_obj("x", "m"), {"type": "error", "code": "x", "message": "m", "ref": None})
        w = env.welcome_obj(
            session="s", node_id="n", node_name="nm", version="v", heartbeat_s=10, max_frame=5, device_id="d"
        )
        self.assertEqual(
            list(w), ["type", "proto", "session", "server", "heartbeat_s", "max_frame", "device_id"]
        )
        self.assertEqual(env.response_error_obj(1, "c", "m")["status"], "error")

    def test_error_table(self) -> None:
        """Every code used by the envelope's checks is in the table, with faces from the known set."""
        for code in (
            "bad_frame",
            "missing_type",
            "proto_unsupported",
            "bad_hello",
            "auth_failed",
            "internal",
        ):
            self.assertIn(code, env.ERROR_CODES)
        for code, entry in env.ERROR_CODES.items():
            self.assertTrue(entry.meaning, code)
            self.assertTrue(set(entry.faces) <= {"botlink", "line", "web", "peer", "camera"}, code)


class ErrorsPageTests(SynchronousTestCase):
    def test_docs_list_every_code(self) -> None:
        """docs/errors.rst lists exactly the codes of ERROR_CODES (documented once, kept in sync)."""
        import pathlib
        import re

        page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "errors.rst"
        if not page.exists():
            raise self.skipTest("docs/ not shipped with this installation")
        listed = re.findall(r"^   \* - ``([a-z_]+)``$", page.read_text(), re.M)
        self.assertEqual(listed, list(env.ERROR_CODES))
