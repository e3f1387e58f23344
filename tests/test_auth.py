"""The auth core (robonet/auth.py): portal logins, the one Authorizer, sessions, the hub hooks."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import capturedLogs
from twisted.trial import unittest

from robonet.audit import AuditLog
from robonet.auth import (
    COMMAND,
    PUBLISH,
    READ,
    REQUEST,
    Auth,
    Forbidden,
    Identity,
    Unauthorized,
    address_class,
    identity_for,
)
from robonet.config import load_config
from robonet.hub import Hub
from robonet.lease import Leases
from robonet.model import Command, Message
from robonet.tokens import TokenStore


def make_auth(test: unittest.SynchronousTestCase, mode: str = "lan", **kw: Any) -> tuple[Auth, task.Clock]:
    clock = task.Clock()
    store = TokenStore(test.mktemp(), kw.pop("config_tokens", None))
    return Auth(mode, store, clock, **kw), clock


class FakeLink:
    """A robot's link that records commands and acks them at once."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.closed: list[str] = []

    def deliver(self, cmd: Command) -> defer.Deferred[None]:
        self.commands.append(cmd)
        return defer.succeed(None)

    def close_link(self, code: str, message: str) -> None:
        self.closed.append(code)


class AddressTests(unittest.SynchronousTestCase):
    """How addresses are classified for lan mode."""

    def test_classes(self) -> None:
        """Loopback, RFC 1918, link-local, ULA, CGNAT and mapped addresses; garbage is public."""
        cases = {
            "127.0.0.1": "loopback",
            "127.0.0.2": "loopback",
            "::1": "loopback",
            "10.1.2.3": "private",
            "192.168.1.20": "private",
            "172.16.0.1": "private",
            "169.254.3.4": "private",
            "fd00::1": "private",
            "fe80::1%eth0": "private",
            "100.64.1.1": "private",
            "::ffff:192.168.0.1": "private",
            "8.8.8.8": "public",
            "2001:4860::1": "public",
            "not-an-ip": "public",
            "": "local",
        }
        for host, want in cases.items():
            self.assertEqual(address_class(host), want, host)


class LoginTests(unittest.SynchronousTestCase):
    """Portal logins per mode."""

    def test_lan_mode_identities(self) -> None:
        """lan: loopback trusted; legacy dialects from private networks may command; others may only
        publish/read; the web face without a token is read-only; public addresses are refused."""
        auth, _ = make_auth(self)
        local = auth.login_now(None, "127.0.0.1", "botlink")
        self.assertTrue(local.may(COMMAND) and local.may(PUBLISH))
        self.assertFalse(local.may("admin"))
        legacy = auth.login_now(None, "192.168.1.9", "line", legacy=True)
        self.assertTrue(legacy.may(COMMAND))
        native = auth.login_now(None, "192.168.1.9", "botlink")
        self.assertEqual((native.may(COMMAND), native.may(PUBLISH)), (False, True))
        web = auth.login_now(None, "127.0.0.1", "web")
        self.assertEqual((web.may(COMMAND), web.may(READ)), (False, True))
        with self.assertRaises(Unauthorized) as cm:
            auth.login_now(None, "8.8.8.8", "botlink", legacy=True)
        self.assertEqual(cm.exception.code, "unauthorized")
        self.assertEqual(auth.authorizer.denied, {("botlink", "address"): 1})

    def test_allow_list(self) -> None:
        """A public address inside auth.allow is treated like a private one."""
        auth, _ = make_auth(self, allow=["203.0.113.0/24"])
        self.assertTrue(auth.login_now(None, "203.0.113.5", "botlink", legacy=True).may(COMMAND))
        self.assertRaises(Unauthorized, auth.login_now, None, "203.0.114.5", "botlink")

    def test_token_mode(self) -> None:
        """token: no credential is refused even from loopback; a good token logs in; a bad one not."""
        auth, _ = make_auth(self, "token")
        _, token = auth.store.add("alice", "operator", 0.0, ["robot_*"])
        with self.assertRaises(Unauthorized) as cm:
            auth.login_now(None, "127.0.0.1", "botlink")
        self.assertEqual(cm.exception.reason, "no_credential")
        alice = auth.login_now(token, "127.0.0.1", "botlink")
        self.assertEqual((alice.name, alice.role, alice.devices), ("alice", "operator", ("robot_*",)))
        with self.assertRaises(Unauthorized) as cm:
            auth.login_now(token + "x", "127.0.0.1", "botlink")
        self.assertEqual(cm.exception.reason, "bad_credential")
        self.assertEqual(
            auth.authorizer.denied, {("botlink", "no_credential"): 1, ("botlink", "bad_credential"): 1}
        )

    def test_config_tokens(self) -> None:
        """[auth] tokens keep working, with the old 'client' role and optional device patterns."""
        auth, _ = make_auth(self, "token", config_tokens={"s3cret": "client", "r": "robot:robot_1"})
        self.assertEqual(auth.login_now("s3cret", "10.0.0.1", "web").role, "operator")
        robot = auth.login_now("r", "10.0.0.1", "botlink")
        self.assertEqual((robot.role, robot.devices, robot.source), ("robot", ("robot_1",), "config"))

    def test_open_mode(self) -> None:
        """open: everyone is the open identity, even from a public address."""
        auth, _ = make_auth(self, "open")
        self.assertTrue(auth.login_now(None, "8.8.8.8", "botlink").may("admin"))

    def test_camera_password(self) -> None:
        """The camera password is a UsernamePassword checker in the same portal."""
        from twisted.cred.credentials import UsernamePassword

        auth, _ = make_auth(self, "token", camera_password=lambda: "pw")
        ok: list[Any] = []
        auth.login(UsernamePassword(b"", b"pw")).addBoth(ok.append)
        self.assertEqual(ok[0].name, "camera")
        bad: list[Any] = []
        auth.login(UsernamePassword(b"", b"nope")).addBoth(bad.append)
        self.assertIsInstance(bad[0].value, Unauthorized)


class AuthorizerTests(unittest.SynchronousTestCase):
    """The one decision: roles, device patterns, command types."""

    def setUp(self) -> None:
        self.auth, self.clock = make_auth(self)
        self.check = self.auth.authorizer.check

    def test_robot_only_its_own_device(self) -> None:
        """A robot publishes as its own name (or its patterns), never as another device."""
        robot = Identity("robot_1", "robot", frozenset({PUBLISH, REQUEST}))
        self.check(robot, PUBLISH, "robot_1")
        with self.assertRaises(Forbidden) as cm:
            self.check(robot, PUBLISH, "robot_2", face="botlink")
        self.assertEqual((cm.exception.code, cm.exception.reason), ("forbidden", "not_own_device"))
        self.assertRaises(Forbidden, self.check, robot, COMMAND, "robot_1", "robot_move")

    def test_operator_patterns_and_types(self) -> None:
        """An operator limited to robot_* and robot_move may not drive arm_1 nor set_speed; stop passes."""
        op = Identity("alice", "operator", frozenset({COMMAND, REQUEST, READ}), ("robot_*",), ("robot_move",))
        self.check(op, COMMAND, "robot_7", "robot_move")
        self.check(op, COMMAND, "robot_7", "stop")
        for target, mtype, reason in (
            ("arm_1", "robot_move", "device_pattern"),
            ("robot_7", "set_speed", "command_type"),
            ("*", "robot_move", "device_pattern"),
        ):
            with self.assertRaises(Forbidden) as cm:
                self.check(op, COMMAND, target, mtype, face="web")
            self.assertEqual(cm.exception.reason, reason)
        self.assertEqual(self.auth.authorizer.denied[("web", "device_pattern")], 2)

    def test_viewer_read_only(self) -> None:
        """A viewer reads and calls read-only endpoints, but may not command or call others."""
        viewer = Identity("v", "viewer", frozenset({READ}))
        self.check(viewer, READ)
        self.check(viewer, REQUEST, "status", "status")
        self.assertRaises(Forbidden, self.check, viewer, REQUEST, "reboot", "reboot")
        self.assertRaises(Forbidden, self.check, viewer, COMMAND, "robot_1", "robot_move")
        self.assertRaises(Forbidden, self.check, viewer, "admin")

    def test_denials_logged_once_a_minute(self) -> None:
        """Repeated denials of one identity and reason log one line per minute, but all count."""
        viewer = Identity("v", "viewer", frozenset({READ}))
        with capturedLogs() as events:
            for _ in range(5):
                self.assertRaises(Forbidden, self.check, viewer, COMMAND, "r", "robot_move")
            self.clock.advance(61)
            self.assertRaises(Forbidden, self.check, viewer, COMMAND, "r", "robot_move")
        lines = [e for e in events if "denied" in e.get("log_format", "")]
        self.assertEqual(len(lines), 2)
        self.assertEqual(self.auth.authorizer.denied[("hub", "no_right")], 6)


class RevocationTests(unittest.SynchronousTestCase):
    """A revoked token's live sessions are closed by the watcher within 2 s."""

    def test_revoke_closes_sessions(self) -> None:
        """Two connections of alice and one of bob; revoking alice (another process) closes only hers
        within poll_interval; a later login with that token is refused."""
        auth, clock = make_auth(self, "token")
        _, a_token = auth.store.add("alice", "operator", 0.0)
        auth.store.add("bob", "operator", 0.0)
        auth.startService()
        self.addCleanup(auth.stopService)
        closed: list[tuple[str, str]] = []
        alice = auth.login_now(a_token, "10.0.0.1", "botlink")
        bob = identity_for(auth.store.get("bob"))  # type: ignore[arg-type]
        for who, n in ((alice, 1), (alice, 2), (bob, 3)):
            auth.sessions.add(
                who, "botlink", "10.0.0.1", lambda r, who=who, n=n: closed.append((who.name, r))
            )
        other = TokenStore(auth.store.path.parent)  # the CLI, in another process
        other.revoke("alice")
        clock.advance(1.0)
        self.assertEqual(closed, [("alice", "revoked"), ("alice", "revoked")])
        self.assertEqual(auth.sessions.count("bob"), 1)
        self.assertRaises(Unauthorized, auth.login_now, a_token, "10.0.0.1", "botlink")


class HubHookTests(unittest.SynchronousTestCase):
    """The hub calls the Authorizer for commands, requests and data; denials change nothing."""

    def setUp(self) -> None:
        self.auth, self.clock = make_auth(self)
        self.hub = Hub(load_config(environ={}, overrides={"hub": {"state_dir": self.mktemp()}}), self.clock)
        self.hub.auth = self.auth
        self.hub.audit = AuditLog(10)
        self.hub.leases = Leases()
        self.link = FakeLink()
        self.robot = self.hub.connect(self.link, "robot_1", face="botlink", role="robot", address="x")
        self.op = Identity("alice", "operator", frozenset({COMMAND, REQUEST, READ}), ("robot_*",))
        self.viewer = Identity("v", "viewer", frozenset({READ}))

    def failure(self, d: defer.Deferred[Any]) -> Any:
        return self.failureResultOf(d).value

    def test_viewer_cannot_command(self) -> None:
        """A viewer's command fails forbidden, reaches no robot, is counted and audited."""
        err = self.failure(
            self.hub.command({"type": "robot_move", "x": 1}, "web-1", "robot_1", self.viewer, "web")
        )
        self.assertIsInstance(err, Forbidden)
        self.assertEqual(self.link.commands, [])
        self.assertEqual(self.hub.stats.errors["forbidden"], 1)
        entry = self.hub.audit.recent()[-1]
        self.assertEqual((entry["identity"], entry["outcome"]), ("v", "denied:no_right"))

    def test_operator_commands_and_is_audited(self) -> None:
        """An operator's command reaches the robot and the audit log records who, where and what."""
        self.assertEqual(
            self.successResultOf(
                self.hub.command({"type": "robot_move"}, "c", "robot_1", self.op, "line", "10.0.0.2")
            ),
            ["robot_1"],
        )
        self.assertEqual(len(self.link.commands), 1)
        e = self.hub.audit.recent()[-1]
        self.assertEqual(
            (e["identity"], e["face"], e["address"], e["target"], e["mtype"], e["outcome"]),
            ("alice", "line", "10.0.0.2", "robot_1", "robot_move", "ok"),
        )

    def test_request_right(self) -> None:
        """A robot identity may call endpoints; a viewer only the read-only built-ins."""
        self.assertEqual(self.successResultOf(self.hub.request("ping", None, "v", self.viewer))["pong"], True)
        self.hub.register_endpoint("reboot", lambda data, origin: "ok")
        self.assertIsInstance(self.failure(self.hub.request("reboot", None, "v", self.viewer)), Forbidden)

    def test_robot_as_other_device(self) -> None:
        """A robot identity may not connect or ingest as another device id; nothing is registered."""
        robot2 = Identity("robot_2", "robot", frozenset({PUBLISH, REQUEST}))
        self.assertRaises(
            Forbidden,
            self.hub.connect,
            FakeLink(),
            "robot_3",
            face="botlink",
            role="robot",
            address="x",
            identity=robot2,
        )
        self.assertIsNone(self.hub.registry.get("robot_3"))
        msg = Message("telemetry", {"type": "telemetry", "battery": 5}, "robot_1", 0.0)
        self.assertRaises(Forbidden, self.hub.ingest, self.robot, msg, robot2)
        self.assertNotIn("telemetry", self.robot.latest)
        own = Identity("robot_1", "robot", frozenset({PUBLISH, REQUEST}))
        self.hub.ingest(self.robot, msg, own)
        self.hub.ingest(self.robot, msg, own)  # cached: no second check
        self.assertEqual(self.robot.msgs_in, 2)

    def test_lease(self) -> None:
        """Two dashboards: the first to drive holds the lease; the second gets lease_held until it takes
        it, which tells the first; stop always passes; the holder leaving stops the robot."""
        told: list[tuple[str, dict[str, Any]]] = []
        self.hub.leases.watch("web-1", lambda ev, body: told.append((ev, body)))
        move = {"type": "robot_move", "x": 1}
        self.successResultOf(self.hub.command(dict(move), "web-1", "robot_1", self.op, "web"))
        err = self.failure(self.hub.command(dict(move), "web-2", "robot_1", self.op, "web"))
        self.assertEqual((err.code, err.reason), ("forbidden", "lease_held"))
        self.successResultOf(self.hub.command({"type": "stop"}, "web-2", "robot_1", self.op, "web"))
        self.hub.take_control("robot_1", "web-2", self.op)
        self.assertEqual(told[0][0], "lease_lost")
        self.assertEqual(told[0][1]["holder"], "web-2")
        self.assertIsInstance(
            self.failure(self.hub.command(dict(move), "web-1", "robot_1", self.op, "web")), Forbidden
        )
        self.successResultOf(self.hub.command(dict(move), "web-2", "robot_1", self.op, "web"))
        before = len(self.link.commands)
        self.assertEqual(self.hub.release_control("web-2"), ["robot_1"])
        self.assertEqual(self.link.commands[before].type, "stop")
        self.assertIsNone(self.hub.leases.holder("robot_1"))
