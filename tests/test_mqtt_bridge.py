"""The MQTT bridge's logic with a fake paho client and a MemoryReactorClock (no broker, no sockets).

The fake records publishes and subscriptions; tests drive the bridge through the same callbacks
paho would call (``on_connect``, ``on_message``, ``on_disconnect``).
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import HubError, Message
from robonet.services.mqtt import MqttBridge, MqttRemoteLink
from tests.test_hub import FakeLink, result_of

BASE = "robonet/default"


@attrs.define
class Info:
    rc: int = 0


class FakeSocket:
    def fileno(self) -> int:
        return 42


class FakeClient:
    """Just enough of paho.mqtt.client.Client for the bridge."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.subscribed: list[Any] = []
        self.reconnects = 0
        self.fail_connect: Exception | None = None
        self.disconnected = False
        self.refuse_publish = False

    def reconnect(self) -> int:
        self.reconnects += 1
        if self.fail_connect is not None:
            raise self.fail_connect
        return 0

    def socket(self) -> FakeSocket:
        return FakeSocket()

    def want_write(self) -> bool:
        return False

    def loop_read(self) -> None: ...

    def loop_write(self) -> None: ...

    def loop_misc(self) -> None: ...

    def subscribe(self, subs: Any) -> None:
        self.subscribed.append(subs)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Info:
        if self.refuse_publish:
            return Info(15)
        self.published.append((topic, payload, qos, retain))
        return Info()

    def disconnect(self) -> None:
        self.disconnected = True

    def topics(self) -> list[str]:
        return [t for t, _, _, _ in self.published]

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(p) for t, p, _, _ in self.published if t == topic]


class Msg:
    def __init__(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.topic, self.payload, self.retain = topic, payload, retain


class BridgeTestCase(SynchronousTestCase):
    env: dict[str, str] = {}

    def setUp(self) -> None:
        env = {"ROBONET_MQTT_ENABLED": "true", **self.env}
        self.config = load_config(None, environ=env)
        self.reactor = MemoryReactorClock()
        self.hub = Hub(self.config, self.reactor)
        self.client = FakeClient()
        self.bridge = MqttBridge(
            self.config,
            self.hub,
            self.reactor,
            client_factory=lambda b: self.client,
            run_blocking=lambda fn: defer.maybeDeferred(fn),
        )
        self.node = self.hub.node.node_id
        self.bridge.startService()
        self.addCleanup(self.bridge.stopService)

    def connack(self) -> None:
        self.bridge.on_connect(self.client, None, None, 0, None)

    def robot(self, device_id: str = "bot", mode: Any = "deferred") -> FakeLink:
        link = FakeLink(mode)
        self.hub.connect(link, device_id, face="botlink", role="robot", address="127.0.0.1")
        return link

    def message(self, topic: str, payload: bytes | dict[str, Any], retain: bool = False) -> None:
        raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        self.bridge.on_message(self.client, None, Msg(topic, raw, retain))


class ConnectionTests(BridgeTestCase):
    """Connecting, the hub status, reconnect back-off, the outage queue."""

    def test_connect_registers_and_announces(self) -> None:
        """After CONNACK: subscriptions, retained hub online, every local device's status."""
        self.assertEqual(self.client.reconnects, 1)
        self.assertIn(self.bridge._sock, self.reactor.getReaders())
        self.robot("bot")
        self.hub.connect(None, "website-1", face="web", role="website", address="x")
        self.assertEqual(self.client.published, [])  # not connected yet: statuses are not queued
        self.connack()
        self.assertEqual(self.client.subscribed, [[(f"{BASE}/+/cmd/+", 1)]])
        self.assertIn((f"{BASE}/$hubs/{self.node}", b"online", 1, True), self.client.published)
        status = self.client.on(f"{BASE}/bot/status")
        self.assertEqual((status[0]["status"], status[0]["hub"]), ("online", self.node))
        self.assertNotIn(f"{BASE}/website-1/status", self.client.topics())
        self.assertEqual(self.bridge.stats()["connected"], 1)

    def test_backoff(self) -> None:
        """A failed connect is retried later on the injected clock, with growing delays."""
        self.bridge.stopService()
        self.client.fail_connect = ConnectionRefusedError("refused")
        self.bridge.startService()
        self.assertEqual(self.client.reconnects, 2)
        self.reactor.advance(0.1)
        self.assertEqual(self.client.reconnects, 2)
        for _ in range(6):
            self.reactor.advance(30)
        self.assertEqual(self.client.reconnects, 8)
        self.assertGreaterEqual(self.hub.stats.errors["mqtt_connect_failed"], 6)
        self.client.fail_connect = None
        self.reactor.advance(30)
        self.connack()
        self.assertTrue(self.bridge.connected)

    def test_outage_queue(self) -> None:
        """Disconnected: data is queued within max_queue_bytes (oldest dropped), sent on reconnect."""
        self.connack()
        self.bridge.on_disconnect(self.client, None, None, "gone", None)
        self.assertEqual(self.bridge.stats()["reconnects"], 1)
        dev = self.hub.connect(None, "bot", face="botlink", role="robot", address="x")
        for i in range(20000):
            body = {"type": "system_status", "seq": i}
            self.hub.ingest(dev, Message("system_status", body, "bot", self.reactor.seconds()))
            if i % 1000 == 0:
                self.reactor.advance(0.06)
        self.reactor.advance(0.06)
        self.assertLessEqual(self.bridge.queue.bytes, self.config.mqtt.max_queue_bytes)
        self.assertGreater(self.hub.stats.drops["mqtt_queue"], 10000)
        self.client.published.clear()
        self.reactor.advance(60)  # the retry fires
        self.connack()
        self.bridge.on_socket_unregister_write(self.client, None, FakeSocket())  # paho's buffer drained
        seqs = [o["seq"] for o in self.client.on(f"{BASE}/bot/system_status")]
        self.assertEqual(seqs[-1], 19999)
        self.assertEqual(seqs, sorted(seqs))
        self.assertIn(f"{BASE}/bot/status", self.client.topics())  # status re-published

    def test_stop_announces_offline(self) -> None:
        """A clean stop publishes the devices and the hub offline, then disconnects."""
        self.robot("bot")
        self.connack()
        self.bridge.stopService()
        self.assertEqual(self.client.on(f"{BASE}/bot/status")[-1]["status"], "offline")
        self.assertEqual(self.client.published[-1][:2], (f"{BASE}/$hubs/{self.node}", b"offline"))
        self.assertTrue(self.client.disconnected)


class DataTests(BridgeTestCase):
    """Data out: topics, payloads, QoS, conflation, no re-publishing of remote devices."""

    def test_data_and_qos(self) -> None:
        """Telemetry at QoS 0, system_status at QoS 1 (qos_by_type), payload extras set."""
        self.connack()
        dev = self.hub.connect(None, "bot", face="botlink", role="robot", address="x")
        self.hub.ingest(dev, Message("telemetry", {"type": "telemetry", "battery": 5}, "bot", 100.0))
        self.hub.ingest(dev, Message("system_status", {"type": "system_status", "ok": True}, "bot", 101.0))
        self.reactor.advance(0.05)
        by_topic = {t: (orjson.loads(p), q, r) for t, p, q, r in self.client.published if "$hubs" not in t}
        tele, qos, retain = by_topic[f"{BASE}/bot/telemetry"]
        self.assertEqual(
            (tele["battery"], tele["device_id"], tele["hub"], tele["received_at"]),
            (5, "bot", self.node, 100.0),
        )
        self.assertEqual((qos, retain), (0, False))
        self.assertEqual(by_topic[f"{BASE}/bot/system_status"][1], 1)

    def test_conflation(self) -> None:
        """Within one batch_interval only the newest telemetry per device goes out (counted)."""
        self.connack()
        dev = self.hub.connect(None, "bot", face="botlink", role="robot", address="x")
        for i in range(10):
            self.hub.ingest(dev, Message("telemetry", {"type": "telemetry", "seq": i}, "bot", 1.0))
        self.reactor.advance(0.05)
        self.assertEqual([o["seq"] for o in self.client.on(f"{BASE}/bot/telemetry")], [9])
        self.assertEqual((self.hub.stats.drops["mqtt_conflated"], self.bridge.stats()["conflated"]), (9, 9))

    def test_remote_not_republished(self) -> None:
        """Data of a device owned by another hub (peer or MQTT) never goes to the broker."""
        self.connack()
        dev = self.hub.connect(None, "far", face="botlink", role="robot", address="x", hub_id="other")
        self.hub.ingest(dev, Message("telemetry", {"type": "telemetry"}, "far", 1.0))
        self.reactor.advance(1)
        self.assertFalse([t for t in self.client.topics() if "/far/" in t])

    def test_bad_device_id(self) -> None:
        """A device id unusable in a topic is counted and skipped, nothing else is disturbed."""
        self.connack()
        dev = self.hub.connect(None, "a/b#", face="botlink", role="robot", address="x")
        self.hub.ingest(dev, Message("telemetry", {"type": "telemetry"}, "a/b#", 1.0))
        self.reactor.advance(1)
        self.assertGreaterEqual(self.hub.stats.drops["mqtt_bad_topic"], 1)


class CommandTests(BridgeTestCase):
    """Commands in from the broker, results out."""

    def result(self, dev: str, ctype: str) -> dict[str, Any]:
        out = self.client.on(f"{BASE}/{dev}/cmd/{ctype}/result")
        self.assertTrue(out, f"no result for {dev}/{ctype}")
        return out[-1]

    def test_ack(self) -> None:
        """A command reaches the robot through hub.command; the ack is published with the id."""
        link = self.robot("bot")
        self.connack()
        self.message(f"{BASE}/bot/cmd/robot_move", {"id": "r1", "x": 1, "y": 0, "hub": "someone"})
        (cmd,) = link.commands
        self.assertEqual((cmd.type, cmd.body["x"], cmd.origin), ("robot_move", 1, "mqtt"))
        self.assertNotIn("hub", cmd.body)
        link.pending[0].callback(None)
        self.assertEqual(
            self.result("bot", "robot_move"),
            {"id": "r1", "device_id": "bot", "type": "robot_move", "hub": self.node, "status": "ack"},
        )

    def test_errors(self) -> None:
        """bad_json, not_object, unknown_command, device_offline and delivery_timeout results."""
        link = self.robot("bot")
        self.connack()
        self.message(f"{BASE}/bot/cmd/stop", b"{x")
        self.assertEqual(self.result("bot", "stop")["code"], "bad_json")
        self.message(f"{BASE}/bot/cmd/stop", b"[]")
        self.assertEqual(self.result("bot", "stop")["code"], "not_object")
        self.message(f"{BASE}/bot/cmd/launch", {"id": 1})
        self.assertEqual(self.result("bot", "launch")["code"], "unknown_command")
        self.message(f"{BASE}/nobody/cmd/stop", {"id": 2})
        self.assertEqual(
            (self.result("nobody", "stop")["code"], self.result("nobody", "stop")["id"]),
            ("device_offline", 2),
        )
        self.message(f"{BASE}/bot/cmd/stop", {"id": 3})
        link.pending[0].errback(HubError("delivery_timeout"))
        self.assertEqual(self.result("bot", "stop")["code"], "delivery_timeout")
        self.assertEqual(self.hub.stats.errors["bad_json"], 1)
        self.message(f"{BASE}/bot/cmd/stop", b'{"a":"' + b"x" * 70000 + b'"}')
        self.assertEqual(self.result("bot", "stop")["code"], "frame_too_large")

    def test_own_echo_ignored(self) -> None:
        """A command carrying this hub's own node id (its forwarded command, echoed) is not acted on."""
        link = self.robot("bot")
        self.connack()
        self.message(f"{BASE}/bot/cmd/stop", {"id": "x", "hub": self.node})
        self.assertEqual(link.commands, [])

    def test_deadman_on_disconnect(self) -> None:
        """A robot moved over MQTT is stopped when the broker link is lost (the web face's rule)."""
        link = self.robot("bot", mode=None)
        self.connack()
        self.message(f"{BASE}/bot/cmd/robot_move", {"x": 1, "y": 1})
        self.bridge.on_disconnect(self.client, None, None, "gone", None)
        self.assertEqual(
            [(c.type, c.body["x"], c.origin) for c in link.commands],
            [("robot_move", 1, "mqtt"), ("robot_move", 0, "deadman")],
        )

    def test_handler_crash_contained(self) -> None:
        """An exception inside the handling is logged and counted, never raised into paho."""
        self.connack()
        self.bridge.handle = lambda *a: 1 / 0  # type: ignore[method-assign]
        self.message(f"{BASE}/bot/cmd/stop", {})
        self.assertEqual(self.hub.stats.errors["internal"], 1)
        self.flushLoggedErrors(ZeroDivisionError)


class FederationTests(BridgeTestCase):
    """mqtt.federate: other hubs' devices become remote devices here."""

    env = {"ROBONET_MQTT_FEDERATE": "true", "ROBONET_MQTT_COMMAND_TIMEOUT": "5"}

    def announce(
        self, dev: str = "far", hub: str = "hubB", status: str = "online", retain: bool = True
    ) -> None:
        self.message(
            f"{BASE}/{dev}/status",
            {"status": status, "hub": hub, "face": "web", "role": "robot", "name": "Far"},
            retain,
        )

    def test_remote_device_and_data(self) -> None:
        """A status from hub B registers the device with hub_id; its data is ingested, not re-published."""
        self.connack()
        self.assertEqual(len(self.client.subscribed[0]), 5)
        self.message(f"{BASE}/$hubs/hubB", b"online")
        self.announce()
        dev = self.hub.registry.get("far")
        assert dev is not None
        self.assertEqual((dev.hub, dev.face, dev.role, dev.online), ("hubB", "web", "robot", True))
        self.message(
            f"{BASE}/far/telemetry",
            {"type": "telemetry", "battery": 3, "hub": "hubB", "device_id": "far", "received_at": 1.0},
        )
        self.assertEqual(dev.latest["telemetry"], {"type": "telemetry", "battery": 3, "device_id": "far"})
        self.message(f"{BASE}/far/telemetry", {"type": "telemetry", "battery": 4, "hub": "hubC"})
        self.assertEqual(dev.latest["telemetry"]["battery"], 3)  # data from a hub that does not own it
        self.reactor.advance(1)
        self.assertFalse([t for t in self.client.topics() if "/far/" in t])

    def test_remote_command(self) -> None:
        """A command to a remote device is published on its cmd topic and resolves on the result."""
        self.connack()
        self.announce()
        d = self.hub.command({"type": "stop"}, origin="website-1", target="far")
        ((topic, payload, qos, _),) = [p for p in self.client.published if "/cmd/" in p[0]]
        body = orjson.loads(payload)
        self.assertEqual(
            (topic, body["hub"], body["origin"], qos), (f"{BASE}/far/cmd/stop", self.node, "website-1", 1)
        )
        self.message(f"{BASE}/far/cmd/stop", payload)  # our own command, echoed: ignored
        self.message(f"{BASE}/far/cmd/stop/result", {"id": body["id"], "status": "ack", "hub": "hubB"})
        self.assertEqual(result_of(d), ["far"])
        d2 = self.hub.command({"type": "stop"}, origin="website-1", target="far")
        body2 = orjson.loads(self.client.published[-1][1])
        self.message(
            f"{BASE}/far/cmd/stop/result", {"id": body2["id"], "status": "error", "code": "device_offline"}
        )
        self.assertEqual(result_of(d2).value.code, "device_offline")
        d3 = self.hub.command({"type": "stop"}, origin="website-1", target="far")
        self.reactor.advance(5)
        self.assertEqual(result_of(d3).value.code, "delivery_timeout")

    def test_other_hubs_commands_not_answered(self) -> None:
        """A broker command for a device another hub owns is left to that hub."""
        self.connack()
        self.announce()
        self.message(f"{BASE}/far/cmd/stop", {"id": 1})
        self.assertEqual(self.client.on(f"{BASE}/far/cmd/stop/result"), [])

    def test_hub_offline(self) -> None:
        """The owner's Last Will takes its devices offline; its stale statuses are then ignored."""
        self.connack()
        self.announce()
        self.message(f"{BASE}/$hubs/hubB", b"offline", retain=True)
        dev = self.hub.registry.get("far")
        assert dev is not None
        self.assertFalse(dev.online)
        self.announce()
        self.assertFalse(dev.online)
        self.message(f"{BASE}/$hubs/hubB", b"online")
        self.announce(retain=False)
        self.assertTrue(dev.online)
        self.announce(status="offline")
        self.assertFalse(dev.online)

    def test_local_device_not_shadowed(self) -> None:
        """An online local device is never replaced by another hub's announcement of its id."""
        link = self.robot("bot")
        self.connack()
        self.announce("bot")
        dev = self.hub.registry.get("bot")
        assert dev is not None
        self.assertIs(dev.link, link)
        self.assertEqual(self.hub.stats.drops["mqtt_device_shadowed"], 1)

    def test_stale_own_status_cleared(self) -> None:
        """A retained 'online' of ours for a device not here (a previous run killed) is set offline."""
        self.connack()
        self.announce("gone", hub=self.node)
        self.assertEqual(self.client.on(f"{BASE}/gone/status")[-1]["status"], "offline")
        self.assertIsNone(self.hub.registry.get("gone"))

    def test_disconnect_marks_remote_unreachable(self) -> None:
        """Losing the broker takes every remote device offline (unreachable) until re-announced."""
        self.connack()
        self.announce()
        self.bridge.on_disconnect(self.client, None, None, "gone", None)
        dev = self.hub.registry.get("far")
        assert dev is not None
        self.assertEqual(dev.status, "unreachable")
        self.assertFalse(isinstance(dev.link, MqttRemoteLink) and dev.online)
        self.assertEqual(self.bridge.stats()["remote_devices"], 0)
