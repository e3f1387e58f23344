"""The hub (ARCHITECTURE.md "The hub"): ingest, callbacks, store, fan-out, command routing, endpoints.

Faces are replaced by fake links and subscribers; time is a task.Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Event, HubError, Message, Priority
from robonet.testing import FakeLink, FakeStore


class Recorder:
    """A Subscriber that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def offer(self, event: Event) -> None:
        self.events.append(event)


def result_of(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


class HubTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_000.0)
        self.store: FakeStore | None = None
        self.hub = self.make()

    def make(self, store: Any = None, **hub_keys: Any) -> Hub:
        config = load_config(environ={}, overrides={"hub": {"state_dir": self.mktemp(), **hub_keys}})
        return Hub(config, self.clock, store=store)

    def robot(self, device_id: str, mode: Any = "deferred", role: str = "robot") -> FakeLink:
        link = FakeLink(mode)
        self.hub.connect(link, device_id, face="test", role=role, address="local")
        return link

    def msg(self, device_id: str, mtype: str, **body: Any) -> Message:
        return Message(mtype, {"type": mtype, **body}, device_id, self.hub.now())


class ConnectTests(HubTestCase):
    """connect / disconnect through the hub."""

    def test_replaced_link_closed(self) -> None:
        """Connecting a device id again closes the older link with code replaced (and counts it)."""
        old = self.robot("r1")
        new = self.robot("r1")
        self.assertEqual(old.closed_codes, ["replaced"])
        self.assertEqual(new.closed_codes, [])
        self.assertEqual(self.hub.stats.errors["replaced"], 1)

    def test_disconnect_only_current(self) -> None:
        """disconnect with a stale link leaves the device online."""
        old = self.robot("r1")
        new = self.robot("r1")
        self.hub.disconnect(old, "r1")
        self.assertTrue(self.hub.registry.get("r1").online)  # type: ignore[union-attr]
        self.hub.disconnect(new, "r1")
        self.assertFalse(self.hub.registry.get("r1").online)  # type: ignore[union-attr]

    def test_status_events_fan_out(self) -> None:
        """Subscribers get device_up / device_down status events (CONTROL, record without latest)."""
        rec = Recorder()
        self.hub.subscribe(rec)
        link = self.robot("r1")
        self.hub.disconnect(link, "r1")
        self.assertEqual(
            [(e.kind, e.type, e.device_id) for e in rec.events],
            [("status", "device_up", "r1"), ("status", "device_down", "r1")],
        )
        self.assertEqual(rec.events[0].priority, Priority.CONTROL)
        self.assertNotIn("latest", rec.events[0].body)
        self.assertEqual(rec.events[1].body["status"], "offline")

    def test_connect_logged(self) -> None:
        """A local device coming up is logged with its id and face."""
        with capturedLogs() as events:
            self.robot("r1")
        self.assertTrue(any(e.get("device_id") == "r1" and e.get("face") == "test" for e in events))


class IngestTests(HubTestCase):
    """hub.ingest: latest values, counters, callbacks, store, fan-out."""

    def test_latest_and_counters(self) -> None:
        """ingest updates latest/latest_at/last_activity and counts the message."""
        self.robot("r1")
        dev = self.hub.registry.get("r1")
        assert dev is not None
        self.clock.advance(5)
        self.assertIsNone(self.hub.ingest(dev, self.msg("r1", "telemetry", battery=50)))
        self.assertEqual(dev.latest["telemetry"]["battery"], 50)
        self.assertEqual((dev.latest_at["telemetry"], dev.last_activity), (1005.0, 1005.0))
        self.assertEqual((dev.msgs_in, self.hub.stats.msgs_in["telemetry"]), (1, 1))
        self.assertEqual(self.hub.registry.field("r1.battery"), 50)

    def test_callbacks(self) -> None:
        """Callbacks of the message's type run with (message, device); others do not."""
        self.robot("r1")
        dev = self.hub.registry.get("r1")
        seen: list[tuple[str, str]] = []
        self.hub.register_callback("sensor_data", lambda m, d: seen.append((m.type, d.device_id)))
        self.hub.register_callback("sensor_data", lambda m, d: seen.append(("second", d.device_id)))
        self.hub.register_callback("status", lambda m, d: seen.append(("wrong", "")))
        self.hub.ingest(dev, self.msg("r1", "sensor_data"))  # type: ignore[arg-type]
        self.assertEqual(seen, [("sensor_data", "r1"), ("second", "r1")])

    def test_callback_crash_isolated(self) -> None:
        """A raising callback is logged and counted as internal; later callbacks and fan-out still run."""
        self.robot("r1")
        dev = self.hub.registry.get("r1")
        rec = Recorder()
        self.hub.subscribe(rec)
        seen: list[int] = []

        def boom(m: Message, d: Any) -> None:
            raise RuntimeError("bad callback")

        self.hub.register_callback("telemetry", boom)
        self.hub.register_callback("telemetry", lambda m, d: seen.append(1))
        self.hub.ingest(dev, self.msg("r1", "telemetry"))  # type: ignore[arg-type]
        self.assertEqual(seen, [1])
        self.assertEqual(self.hub.stats.errors["internal"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(rec.events[-1].type, "telemetry")

    def test_store_batch_returned(self) -> None:
        """With a store, ingest appends (device, type, time, body, raw) and returns the store's batch."""
        store = FakeStore()
        self.hub = self.make(store=store)
        self.robot("r1")
        dev = self.hub.registry.get("r1")
        m = self.msg("r1", "telemetry", battery=1)
        m.raw = b'{"raw":1}'
        self.assertIs(self.hub.ingest(dev, m), store.batch)  # type: ignore[arg-type]
        self.assertEqual(store.rows, [("r1", "telemetry", 1000.0, m.body, b'{"raw":1}')])

    def test_fan_out_priorities(self) -> None:
        """Data events carry the device, type, body and priority: video bulk, status control, else latest."""
        self.robot("r1")
        dev = self.hub.registry.get("r1")
        rec = Recorder()
        self.hub.subscribe(rec)
        self.hub.subscribe(rec)  # subscribing twice changes nothing
        for mtype in ("telemetry", "video_frame", "status", "movement_complete", "custom"):
            self.hub.ingest(dev, self.msg("r1", mtype))  # type: ignore[arg-type]
        got = [(e.kind, e.type, e.priority) for e in rec.events]
        self.assertEqual(
            got,
            [
                ("data", "telemetry", Priority.LATEST),
                ("data", "video_frame", Priority.BULK),
                ("data", "status", Priority.CONTROL),
                ("data", "movement_complete", Priority.CONTROL),
                ("data", "custom", Priority.LATEST),
            ],
        )
        self.assertEqual(rec.events[0].key, ("r1", "telemetry"))
        self.assertEqual(self.hub.subscriber_count, 1)
        self.hub.unsubscribe(rec)
        self.hub.ingest(dev, self.msg("r1", "telemetry"))  # type: ignore[arg-type]
        self.assertEqual(len(rec.events), 5)

    def test_publish_local(self) -> None:
        """publish_local upserts an in-process device and ingests the message as it."""
        rec = Recorder()
        self.hub.subscribe(rec)
        self.hub.publish_local("camera", "camera_status", {"fps": 24}, face="camera", role="camera")
        self.hub.publish_local("camera", "camera_status", {"fps": 23}, face="camera", role="camera")
        dev = self.hub.registry.get("camera")
        assert dev is not None
        self.assertEqual((dev.face, dev.role, dev.online, dev.address), ("camera", "camera", True, "local"))
        self.assertEqual(dev.latest["camera_status"], {"fps": 23, "type": "camera_status"})
        self.assertEqual([e.type for e in rec.events], ["device_up", "camera_status", "camera_status"])


class CommandTests(HubTestCase):
    """hub.command routing."""

    def test_to_one_robot(self) -> None:
        """A command reaches its target link with origin/target; fires with [target] once acked."""
        link = self.robot("r1")
        d = self.hub.command({"type": "robot_move", "id": 4, "x": 1, "device_id": "r1"}, "web-1", "r1")
        cmd = link.commands[0]
        self.assertEqual((cmd.type, cmd.origin, cmd.target), ("robot_move", "web-1", "r1"))
        self.assertEqual(cmd.body["x"], 1)
        self.assertNotIn("id", cmd.body)
        self.assertEqual(cmd.body["timestamp"], "1970-01-01T00:16:40.000000+00:00")
        self.assertFalse(d.called)
        self.clock.advance(0.25)
        link.pending[0].callback({"type": "ack"})
        self.assertEqual(result_of(d), ["r1"])
        self.assertEqual(self.hub.stats.ack_rtt.summary()["p50_ms"], 250.0)
        self.assertEqual(self.hub.stats.msgs_out["robot_move"], 1)
        self.assertEqual(self.hub.registry.get("r1").msgs_out, 1)  # type: ignore[union-attr]

    def test_immediate_link(self) -> None:
        """A link that completes delivery at once (returns None) gives an immediate result."""
        self.robot("r1", mode=None)
        self.assertEqual(result_of(self.hub.command({"type": "stop"}, "c", "r1")), ["r1"])

    def test_unknown_command(self) -> None:
        """A type not in hub.commands fails with unknown_command and reaches nobody."""
        link = self.robot("r1")
        f = result_of(self.hub.command({"type": "self_destruct"}, "c", "r1"))
        self.assertIsInstance(f, Failure)
        self.assertEqual(f.value.code, "unknown_command")
        self.assertEqual(link.commands, [])
        self.assertEqual(self.hub.stats.errors["unknown_command"], 1)

    def test_configured_commands(self) -> None:
        """hub.commands decides what is a command."""
        self.hub = self.make(commands=["dance"])
        link = self.robot("r1", mode=None)
        self.assertEqual(result_of(self.hub.command({"type": "dance"}, "c", "r1")), ["r1"])
        self.assertEqual(
            result_of(self.hub.command({"type": "stop"}, "c", "r1")).value.code, "unknown_command"
        )
        self.assertEqual(len(link.commands), 1)

    def test_missing_type(self) -> None:
        """A command body without a string type fails with missing_type."""
        self.assertEqual(result_of(self.hub.command({"x": 1}, "c", None)).value.code, "missing_type")

    def test_set_normalised(self) -> None:
        """set {name, value} becomes set_speed / set_brightness with only value (and device_id)."""
        link = self.robot("r1", mode=None)
        self.hub.command(
            {"type": "set", "name": "speed", "value": 70, "device_id": "r1", "extra": 1}, "c", "r1"
        )
        self.hub.command({"type": "set", "name": "brightness", "value": 0.5}, "c", "r1")
        self.assertEqual([c.type for c in link.commands], ["set_speed", "set_brightness"])
        body = dict(link.commands[0].body)
        body.pop("timestamp")
        self.assertEqual(body, {"type": "set_speed", "value": 70, "device_id": "r1"})
        f = result_of(self.hub.command({"type": "set", "name": "volume", "value": 1}, "c", "r1"))
        self.assertEqual(f.value.code, "unknown_command")

    def test_device_offline(self) -> None:
        """Unknown, offline or link-less targets fail with device_offline."""
        link = self.robot("r1")
        self.hub.disconnect(link, "r1")
        for target in ("r1", "ghost"):
            self.assertEqual(
                result_of(self.hub.command({"type": "stop"}, "c", target)).value.code, "device_offline"
            )
        self.assertEqual(self.hub.stats.errors["device_offline"], 2)

    def test_link_errors(self) -> None:
        """A link raising HubError gives that code; any other exception gives internal (logged)."""
        self.robot("a", mode=HubError("bad_frame", "range"))
        self.robot("b", mode=ValueError("oops"))
        self.assertEqual(result_of(self.hub.command({"type": "stop"}, "c", "a")).value.code, "bad_frame")
        self.assertEqual(result_of(self.hub.command({"type": "stop"}, "c", "b")).value.code, "internal")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_delivery_failure_counted(self) -> None:
        """A delivery Deferred failing with HubError passes the error on and counts its code."""
        link = self.robot("r1")
        d = self.hub.command({"type": "stop"}, "c", "r1")
        link.pending[0].errback(HubError("delivery_timeout"))
        self.assertEqual(result_of(d).value.code, "delivery_timeout")
        self.assertEqual(self.hub.stats.errors["delivery_timeout"], 1)

    def test_broadcast(self) -> None:
        """target None reaches every online robot except the sender, never clients."""
        a, b = self.robot("a", mode=None), self.robot("b", mode=None)
        client = self.robot("c", mode=None, role="client")
        origin = self.robot("o", mode=None)
        off = self.robot("off", mode=None)
        self.hub.disconnect(off, "off")
        reached = result_of(self.hub.command({"type": "stop"}, "o", None))
        self.assertEqual(sorted(reached), ["a", "b"])
        self.assertEqual(
            (len(a.commands), len(b.commands), client.commands, origin.commands, off.commands),
            (1, 1, [], [], []),
        )

    def test_broadcast_partial_and_total_failure(self) -> None:
        """A broadcast fires with the robots that took it; it fails only when all failed."""
        self.robot("a", mode=None)
        self.robot("b", mode=HubError("unknown_command"))
        self.assertEqual(result_of(self.hub.command({"type": "robot_move"}, "c", None)), ["a"])
        self.hub = self.make()
        self.robot("a", mode=HubError("unknown_command"))
        self.robot("b", mode=HubError("unknown_command"))
        self.assertEqual(
            result_of(self.hub.command({"type": "robot_move"}, "c", None)).value.code, "unknown_command"
        )

    def test_broadcast_no_robots(self) -> None:
        """A broadcast with no robot online fires with []."""
        self.assertEqual(result_of(self.hub.command({"type": "stop"}, "c", None)), [])


class RequestTests(HubTestCase):
    """hub.request and the built-in endpoints."""

    def call(self, endpoint: str, data: Any = None, origin: str = "c") -> Any:
        return result_of(self.hub.request(endpoint, data, origin))

    def test_builtins_registered(self) -> None:
        """All built-in endpoints exist."""
        self.assertEqual(
            sorted(self.hub.endpoints), ["devices", "echo", "info", "peer_list", "ping", "stats", "status"]
        )

    def test_ping_echo(self) -> None:
        """ping answers pong + server time; echo returns its data."""
        self.assertEqual(self.call("ping"), {"pong": True, "server_time": "1970-01-01T00:16:40.000000+00:00"})
        self.assertEqual(self.call("echo", [1, "x"]), [1, "x"])

    def test_status(self) -> None:
        """status: node identity, uptime and online counts."""
        self.robot("r1")
        self.robot("c1", role="client")
        self.clock.advance(12.5)
        s = self.call("status")
        self.assertEqual(
            (s["server_id"], s["uptime"], s["devices_online"], s["robots_online"]),
            (self.hub.node.node_id, 12.5, 2, 1),
        )

    def test_info(self) -> None:
        """info: identity, proto, endpoints, commands and faces."""
        self.hub.faces["botlink"] = ["tcp:5100"]
        i = self.call("info")
        self.assertEqual(
            (i["proto"], i["faces"], i["commands"]), (1, {"botlink": ["tcp:5100"]}, sorted(self.hub.commands))
        )
        self.assertIn("ping", i["endpoints"])

    def test_devices_filters(self) -> None:
        """devices: every device; role and online filters."""
        self.robot("r1")
        gone = self.robot("r2")
        self.hub.disconnect(gone, "r2")
        self.robot("c1", role="client")
        self.assertEqual(self.call("devices")["count"], 3)
        self.assertEqual(
            [d["device_id"] for d in self.call("devices", {"role": "robot"})["devices"]], ["r1", "r2"]
        )
        self.assertEqual(
            [d["device_id"] for d in self.call("devices", {"role": "robot", "online": True})["devices"]],
            ["r1"],
        )

    def test_stats(self) -> None:
        """stats: counters, devices by face/role, subscribers, and the store's own stats when it has them."""
        store = FakeStore()
        store.stats = lambda: {"rows": 3}  # type: ignore[attr-defined]
        self.hub = self.make(store=store)
        self.robot("r1")
        self.hub.subscribe(Recorder())
        s = self.call("stats")
        self.assertEqual(
            s["devices"], {"online": 1, "known": 1, "by_face": {"test": 1}, "by_role": {"robot": 1}}
        )
        self.assertEqual((s["subscribers"], s["store"]), (1, {"rows": 3}))

    def test_peer_list(self) -> None:
        """peer_list is empty without a PeerService, delegated with one."""
        self.assertEqual(self.call("peer_list"), {"peers": []})

        class Peers:
            def peer_list(self) -> Any:
                return {"peers": [{"node_id": "x"}]}

        self.hub.peers = Peers()
        self.assertEqual(self.call("peer_list"), {"peers": [{"node_id": "x"}]})

    def test_unknown_endpoint(self) -> None:
        """An unknown endpoint fails with unknown_endpoint and is counted."""
        f = self.call("nope")
        self.assertEqual((f.value.code, f.value.message), ("unknown_endpoint", "Unknown endpoint: nope"))
        self.assertEqual(self.hub.stats.errors["unknown_endpoint"], 1)

    def test_custom_endpoint(self) -> None:
        """A registered endpoint gets (data, origin); a crash becomes internal with the exception text."""
        self.hub.register_endpoint("add", lambda data, origin: {"sum": sum(data), "by": origin})
        self.assertEqual(self.call("add", [1, 2], "me"), {"sum": 3, "by": "me"})

        def crash(data: Any, origin: str) -> Any:
            raise KeyError("k")

        self.hub.register_endpoint("crash", crash)
        f = self.call("crash")
        self.assertEqual(f.value.code, "internal")
        self.assertIn("KeyError", f.value.message)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class ServiceTests(HubTestCase):
    """The hub as a Service: the once-a-minute stats log line."""

    def test_stats_logged_every_minute(self) -> None:
        """While running, a stats line is logged every 60 s; none after stopService."""
        self.hub.startService()
        with capturedLogs() as events:
            self.clock.advance(59)
            self.assertEqual([e for e in events if "stats" in e], [])
            self.clock.advance(1)
            lines = [e for e in events if "stats" in e]
            self.assertEqual(len(lines), 1)
            self.assertIn("online", lines[0])
            self.hub.stopService()
            self.clock.advance(600)
            self.assertEqual(len([e for e in events if "stats" in e]), 1)
