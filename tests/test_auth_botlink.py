"""The bot link translating its credentials into the auth core (robonet/auth.py), fake transports."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from robonet.auth import Auth
from robonet.audit import AuditLog
from robonet.tokens import TokenStore
from tests.test_botlink import Wire, make_hub


class BotLinkAuthTests(SynchronousTestCase):
    """lan and token mode on the bot link: every refusal is a clear error, counted, changes nothing."""

    def setUp(self, mode: str = "lan") -> None:
        self.hub, self.factory, self.clock = make_hub(self, auth={"mode": mode})
        self.store = TokenStore(self.hub.config.state_path)
        self.auth = Auth(mode, self.store, self.clock)
        self.hub.auth = self.auth
        self.hub.audit = AuditLog(100)
        _, self.robot_token = self.store.add("robot_1", "robot", 0.0)
        _, self.viewer_token = self.store.add("v", "viewer", 0.0)
        _, self.op_token = self.store.add("alice", "operator", 0.0, ["robot_*"])
        self.robot = Wire(self.factory, "10.0.0.5")
        self.robot.hello(role="robot", device_id="robot_1", token=self.robot_token)

    def refused(self, wire: Wire, **hello: object) -> dict[str, object]:
        wire.send({"type": "hello", "proto": 1, **hello})
        frame = wire.one()
        self.assertTrue(wire.closed)
        return frame

    def test_no_credential_from_public_address(self) -> None:
        """lan: a hello without a token from a public address is refused unauthorized; loopback works."""
        frame = self.refused(Wire(self.factory, "8.8.8.8"), role="client")
        self.assertEqual(frame["code"], "unauthorized")
        Wire(self.factory, "127.0.0.1").hello(role="client")
        self.assertEqual(self.auth.authorizer.denied[("botlink", "address")], 1)

    def test_bad_credential(self) -> None:
        """A wrong token is auth_failed and closes."""
        frame = self.refused(
            Wire(self.factory, "10.0.0.9"), role="robot", device_id="robot_1", token="rn_nope"
        )
        self.assertEqual(frame["code"], "auth_failed")
        self.assertEqual(self.hub.stats.errors["auth_failed"], 1)

    def test_robot_as_other_device(self) -> None:
        """A robot token may not say hello as another device: forbidden, closed, not registered."""
        frame = self.refused(
            Wire(self.factory, "10.0.0.9"), role="robot", device_id="robot_2", token=self.robot_token
        )
        self.assertEqual(frame["code"], "forbidden")
        self.assertIsNone(self.hub.registry.get("robot_2"))

    def test_viewer_cannot_command(self) -> None:
        """A viewer's command gets a forbidden error frame, reaches no robot; the connection stays."""
        v = Wire(self.factory, "10.0.0.7")
        v.hello(role="client", token=self.viewer_token)
        self.robot.frames()
        v.send({"type": "robot_move", "id": 4, "device_id": "robot_1", "x": 1})
        err = v.one()
        self.assertEqual((err["type"], err["code"], err.get("ref")), ("error", "forbidden", 4))
        self.assertEqual(self.robot.frames(), [])
        self.assertFalse(v.closed)
        v.send({"type": "request", "id": 5, "endpoint": "ping"})
        self.assertEqual(v.one()["type"], "response")

    def test_operator_outside_pattern(self) -> None:
        """An operator limited to robot_* may drive robot_1 but not arm_1; both are audited."""
        arm = Wire(self.factory, "10.0.0.8")
        arm.hello(role="robot", device_id="arm_1", token=self.store.add("arm_1", "robot", 0.0)[1])
        op = Wire(self.factory, "10.0.0.6")
        op.hello(role="client", token=self.op_token)
        op.send({"type": "robot_move", "id": 1, "device_id": "arm_1", "x": 1})
        self.assertEqual(op.one()["code"], "forbidden")
        self.assertEqual(arm.frames(), [])
        op.send({"type": "robot_move", "id": 2, "device_id": "robot_1", "x": 1})
        self.assertEqual(self.robot.one()["type"], "robot_move")
        outcomes = [(e["identity"], e["target"], e["outcome"]) for e in self.hub.audit.recent()]
        self.assertEqual(outcomes[0], ("alice", "arm_1", "denied:device_pattern"))

    def test_revoked_credential(self) -> None:
        """Revoking a token (the CLI, another process) closes its live connection at the next poll;
        a new hello with it is refused."""
        self.auth.startService()
        self.addCleanup(self.auth.stopService)
        TokenStore(self.hub.config.state_path).revoke("robot_1")
        self.clock.advance(1.0)
        self.assertTrue(self.robot.closed)
        self.assertEqual(self.robot.one()["code"], "unauthorized")
        frame = self.refused(
            Wire(self.factory, "10.0.0.5"), role="robot", device_id="robot_1", token=self.robot_token
        )
        self.assertEqual(frame["code"], "auth_failed")


class BotLinkTokenModeTests(BotLinkAuthTests):
    """The same in token mode, where even loopback needs a credential."""

    def setUp(self) -> None:  # type: ignore[override]
        super().setUp("token")

    def test_no_credential_from_public_address(self) -> None:
        """token: no token is refused from every address, loopback included."""
        frame = self.refused(Wire(self.factory, "127.0.0.1"), role="client")
        self.assertEqual(frame["code"], "unauthorized")

    def test_legacy_bot_refused(self) -> None:
        """token: a legacy (Cartobot) frame from an unlisted IP is refused."""
        w = Wire(self.factory, "10.0.0.44")
        w.send({"type": "telemetry", "battery": 3})
        self.assertEqual(w.one()["code"], "unauthorized")
        self.assertTrue(w.closed)


class BotLinkLanLegacyTests(SynchronousTestCase):
    """lan: the legacy dialect works from private networks, not from public ones."""

    def test_legacy_by_address(self) -> None:
        hub, factory, clock = make_hub(self)
        hub.auth = Auth("lan", TokenStore(hub.config.state_path), clock)
        ok = Wire(factory, "192.168.1.50")
        ok.send({"type": "telemetry", "battery": 3})
        self.assertFalse(ok.closed)
        bad = Wire(factory, "8.8.4.4")
        bad.send({"type": "telemetry", "battery": 3})
        self.assertTrue(bad.closed)
        self.assertEqual(hub.stats.errors["unauthorized"], 1)
