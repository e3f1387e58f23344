"""The device registry (ARCHITECTURE.md "The registry"): pure, every call takes ``now``."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from robonet.registry import Device, Registry
from robonet.testing import FakeLink


class RegistryTests(SynchronousTestCase):
    """connect / disconnect / replace / events / lookups."""

    def setUp(self) -> None:
        self.reg = Registry()
        self.events: list[tuple[str, str, str]] = []
        self.reg.observe(lambda ev, dev: self.events.append((ev, dev.device_id, dev.status)))

    def connect(self, device_id: str, link: Any, now: float = 100.0, **kw: Any) -> tuple[Device, Any]:
        args: dict[str, Any] = {"face": "botlink", "role": "robot", "address": "1.2.3.4:5", **kw}
        return self.reg.connect(device_id, link=link, now=now, **args)

    def test_connect(self) -> None:
        """A new device is online with its metadata and times; device_up is emitted."""
        link = FakeLink()
        dev, replaced = self.connect("r1", link, name="Robot", dialect="robonet/1")
        self.assertIsNone(replaced)
        self.assertEqual(
            (
                dev.device_id,
                dev.face,
                dev.role,
                dev.address,
                dev.name,
                dev.status,
                dev.connected_at,
                dev.last_activity,
            ),
            ("r1", "botlink", "robot", "1.2.3.4:5", "Robot", "online", 100.0, 100.0),
        )
        self.assertTrue(dev.online)
        self.assertIs(dev.link, link)
        self.assertIs(self.reg.get("r1"), dev)
        self.assertEqual(self.events, [("device_up", "r1", "online")])

    def test_replace(self) -> None:
        """A second connect with another link returns the old link to close; the device keeps its values."""
        old, new = FakeLink(), FakeLink()
        dev, _ = self.connect("r1", old)
        dev.latest["telemetry"] = {"battery": 5}
        dev2, replaced = self.connect("r1", new, now=200.0, address="9.9.9.9:1")
        self.assertIs(dev2, dev)
        self.assertIs(replaced, old)
        self.assertEqual((dev.link, dev.address, dev.connected_at), (new, "9.9.9.9:1", 200.0))
        self.assertEqual(dev.latest["telemetry"], {"battery": 5})

    def test_same_link_not_replaced(self) -> None:
        """Reconnecting on the same link (a legacy bot's refresh) replaces nothing."""
        link = FakeLink()
        self.connect("r1", link)
        _dev, replaced = self.connect("r1", link)
        self.assertIsNone(replaced)

    def test_disconnect(self) -> None:
        """disconnect marks the device offline (kept, with last_activity) and emits device_down."""
        link = FakeLink()
        dev, _ = self.connect("r1", link)
        self.assertIs(self.reg.disconnect("r1", link, 150.0), dev)
        self.assertEqual((dev.status, dev.link, dev.last_activity), ("offline", None, 150.0))
        self.assertFalse(dev.online)
        self.assertEqual(self.events[-1], ("device_down", "r1", "offline"))
        self.assertIsNone(self.reg.disconnect("r1", link, 160.0))

    def test_disconnect_stale_link(self) -> None:
        """A replaced link's disconnect does nothing: the device stays online on the new link."""
        old, new = FakeLink(), FakeLink()
        self.connect("r1", old)
        dev, _ = self.connect("r1", new)
        self.assertIsNone(self.reg.disconnect("r1", old, 150.0))
        self.assertEqual((dev.status, dev.link), ("online", new))

    def test_disconnect_unknown(self) -> None:
        """Disconnecting an unknown device returns None."""
        self.assertIsNone(self.reg.disconnect("ghost", None, 1.0))

    def test_unreachable(self) -> None:
        """disconnect with status unreachable (a peer's device) keeps last_activity."""
        link = FakeLink()
        dev, _ = self.connect("r1", link, hub="node-b")
        self.reg.disconnect("r1", link, 500.0, status="unreachable")
        self.assertEqual((dev.status, dev.last_activity), ("unreachable", 100.0))

    def test_set_status_and_update(self) -> None:
        """set_status emits device_update only when the status changes; update always emits."""
        dev, _ = self.connect("r1", FakeLink())
        self.events.clear()
        self.reg.set_status(dev, "online")
        self.assertEqual(self.events, [])
        self.reg.set_status(dev, "unreachable")
        self.reg.update(dev)
        self.assertEqual(self.events, [("device_update", "r1", "unreachable")] * 2)

    def test_remove(self) -> None:
        """remove forgets the device (device_down if it was online)."""
        self.connect("r1", FakeLink())
        self.assertIsNotNone(self.reg.remove("r1"))
        self.assertIsNone(self.reg.get("r1"))
        self.assertEqual(self.events[-1], ("device_down", "r1", "offline"))
        self.assertIsNone(self.reg.remove("r1"))

    def test_unobserve(self) -> None:
        """An unobserved function is no longer called."""
        seen: list[str] = []

        def fn(ev: str, dev: Device) -> None:
            seen.append(ev)

        self.reg.observe(fn)
        self.connect("a", FakeLink())
        self.reg.unobserve(fn)
        self.reg.unobserve(fn)
        self.connect("b", FakeLink())
        self.assertEqual(seen, ["device_up"])

    def test_listing(self) -> None:
        """devices() is online first then by id; online(role) filters; len and iteration."""
        la, lb, lc = FakeLink(), FakeLink(), FakeLink()
        self.connect("b", lb)
        self.connect("a", la, role="client")
        self.connect("c", lc)
        self.reg.disconnect("b", lb, 101.0)
        self.assertEqual([d.device_id for d in self.reg.devices()], ["a", "c", "b"])
        self.assertEqual([d.device_id for d in self.reg.online("robot")], ["c"])
        self.assertEqual(sorted(d.device_id for d in self.reg.online()), ["a", "c"])
        self.assertEqual(len(self.reg), 3)
        self.assertEqual(sorted(d.device_id for d in self.reg), ["a", "b", "c"])

    def test_field(self) -> None:
        """field('id.key') finds the newest value of key in any type; 'id.type.key' names the type."""
        dev, _ = self.connect("robot_01", FakeLink())
        dev.latest["telemetry"] = {"battery": 80, "cpu": 1}
        dev.latest_at["telemetry"] = 10.0
        dev.latest["status"] = {"battery": 70}
        dev.latest_at["status"] = 20.0
        self.assertEqual(self.reg.field("robot_01.battery"), 70)
        self.assertEqual(self.reg.field("robot_01.telemetry.battery"), 80)
        self.assertEqual(self.reg.field("robot_01.cpu"), 1)
        self.assertIsNone(self.reg.field("robot_01.nope"))
        self.assertIsNone(self.reg.field("robot_01"))
        self.assertIsNone(self.reg.field("ghost.battery"))
        self.assertIsNone(self.reg.field("robot_01.telemetry.nope"))

    def test_as_dict(self) -> None:
        """as_dict has the documented keys; name falls back to the id; it is a copy of latest."""
        dev, _ = self.connect("r1", FakeLink())
        dev.latest["telemetry"] = {"battery": 1}
        dev.latest_at["telemetry"] = 100.5
        d = dev.as_dict()
        for key in (
            "device_id",
            "name",
            "face",
            "role",
            "address",
            "status",
            "hub",
            "connected_at",
            "last_seen",
            "latest",
            "latest_at",
        ):
            self.assertIn(key, d)
        self.assertEqual((d["name"], d["last_seen"], d["latest_at"]), ("r1", 100.0, {"telemetry": 100.5}))
        d["latest"]["x"] = {}
        self.assertNotIn("x", dev.latest)

    def test_prune_offline(self) -> None:
        """Beyond max_offline offline records, the oldest offline ones are forgotten; online ones never."""
        reg = Registry(max_offline=2)
        links = {}
        for i in range(4):
            links[i] = FakeLink()
            reg.connect(f"d{i}", face="botlink", role="robot", address="", link=links[i], now=float(i))
        for i in range(4):
            reg.disconnect(f"d{i}", links[i], float(10 + i))
        reg.connect("live", face="botlink", role="robot", address="", link=FakeLink(), now=20.0)
        self.assertEqual(sorted(d.device_id for d in reg), ["d2", "d3", "live"])

    def test_returning_device_keeps_name(self) -> None:
        """A device reconnecting without a name keeps its old one."""
        link = FakeLink()
        dev, _ = self.connect("r1", link, name="Robot One")
        self.reg.disconnect("r1", link, 101.0)
        self.connect("r1", FakeLink())
        self.assertEqual((dev.name, dev.status), ("Robot One", "online"))


class ObserverIsolationTests(SynchronousTestCase):
    def test_failing_observer_does_not_stop_others(self) -> None:
        """An observer that raises is logged; later observers still run and connect() still returns."""
        from twisted.logger import capturedLogs

        reg = Registry()
        seen: list[str] = []

        def broken(event: str, dev: Device) -> None:
            raise RuntimeError("boom")

        reg.observe(broken)
        reg.observe(lambda event, dev: seen.append(event))
        with capturedLogs() as events:
            dev, replaced = reg.connect("r1", face="botlink", role="robot", address="a", link=None, now=1.0)
        self.assertEqual((dev.device_id, replaced, seen), ("r1", None, ["device_up"]))
        self.assertTrue(any("registry observer failed" in e.get("log_format", "") for e in events))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
