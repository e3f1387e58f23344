"""Unit tests of the MQTT bridge's pure parts: topics, payloads, broker addresses, the queue."""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from robonet.config import ConfigError, load_config
from robonet.model import HubError
from robonet.protocols import mqtt_topics as mt
from robonet.services.mqtt import DropOldestQueue, parse_broker


class TopicTests(SynchronousTestCase):
    """Topic names and their parsing (docs/mqtt.rst)."""

    def setUp(self) -> None:
        self.t = mt.Topics("robonet", "lab")

    def test_names(self) -> None:
        """Data, status, hub, cmd and result topics follow <prefix>/<project>/..."""
        self.assertEqual(self.t.data("bot-1", "telemetry"), "robonet/lab/bot-1/telemetry")
        self.assertEqual(self.t.status("bot-1"), "robonet/lab/bot-1/status")
        self.assertEqual(self.t.hub("n1"), "robonet/lab/$hubs/n1")
        self.assertEqual(self.t.cmd("bot-1", "robot_move"), "robonet/lab/bot-1/cmd/robot_move")
        self.assertEqual(self.t.result("bot-1", "stop"), "robonet/lab/bot-1/cmd/stop/result")

    def test_data_status_type(self) -> None:
        """A data message of type status goes to robot_status (status is the device's own topic)."""
        self.assertEqual(self.t.data("bot-1", "status"), "robonet/lab/bot-1/robot_status")
        self.assertEqual(self.t.parse("robonet/lab/bot-1/robot_status"), mt.Parsed("data", "bot-1", "status"))

    def test_unusable_levels(self) -> None:
        """Ids with wildcards, slashes, NUL, a leading $ or nothing yield no topic."""
        for bad in ("a/b", "a+", "#", "", "$x", "a\x00b"):
            self.assertIsNone(self.t.data(bad, "telemetry"), bad)
            self.assertIsNone(self.t.data("bot", bad), bad)
            self.assertIsNone(self.t.status(bad), bad)
        self.assertIsNone(self.t.data("bot", "cmd"))

    def test_cache_bounded(self) -> None:
        """The per-(device, type) topic cache never holds more than 10,000 pairs."""
        for i in range(25000):
            self.t.data(f"d{i}", "telemetry")
        self.assertLessEqual(len(self.t._data), 10000)

    def test_parse(self) -> None:
        """Every topic kind parses back; foreign or malformed topics give None."""
        p = self.t.parse
        self.assertEqual(p("robonet/lab/bot-1/telemetry"), mt.Parsed("data", "bot-1", "telemetry"))
        self.assertEqual(p("robonet/lab/bot-1/status"), mt.Parsed("status", "bot-1"))
        self.assertEqual(p("robonet/lab/$hubs/n1"), mt.Parsed("hub", "n1"))
        self.assertEqual(p("robonet/lab/bot-1/cmd/stop"), mt.Parsed("cmd", "bot-1", "stop"))
        self.assertEqual(p("robonet/lab/bot-1/cmd/stop/result"), mt.Parsed("result", "bot-1", "stop"))
        for other in (
            "robonet/other/bot/telemetry",
            "robonet/lab/bot",
            "robonet/lab//x",
            "robonet/lab/a/b/c",
        ):
            self.assertIsNone(p(other), other)
        self.assertIsNone(p("robonet/lab/$SYS/x"))

    def test_filters(self) -> None:
        """Commands always; with federation the hubs first, then statuses, data, results."""
        self.assertEqual(self.t.filters(False), ["robonet/lab/+/cmd/+"])
        self.assertEqual(
            self.t.filters(True),
            [
                "robonet/lab/$hubs/+",
                "robonet/lab/+/cmd/+",
                "robonet/lab/+/status",
                "robonet/lab/+/+",
                "robonet/lab/+/cmd/+/result",
            ],
        )

    def test_bad_prefix(self) -> None:
        """A prefix or project id unusable in a topic is refused."""
        self.assertRaises(ValueError, mt.Topics, "robo/#", "lab")
        self.assertRaises(ValueError, mt.Topics, "robonet", "a/b")
        self.assertEqual(mt.Topics("site/robonet", "lab").hub("n"), "site/robonet/lab/$hubs/n")


class PayloadTests(SynchronousTestCase):
    """JSON payload shapes and validation."""

    def test_data_payload(self) -> None:
        """The body plus device_id, hub and received_at; the body itself is not changed."""
        body = {"type": "telemetry", "battery": 9}
        out = orjson.loads(mt.data_payload(body, "bot", "n1", 12.5))
        self.assertEqual(
            out, {"type": "telemetry", "battery": 9, "device_id": "bot", "hub": "n1", "received_at": 12.5}
        )
        self.assertEqual(body, {"type": "telemetry", "battery": 9})

    def test_status_payload(self) -> None:
        """online/offline with face, role and the owning hub."""
        rec = {"device_id": "bot", "status": "online", "face": "botlink", "role": "robot", "name": "B"}
        out = orjson.loads(mt.status_payload(rec, "n1", 3.0))
        self.assertEqual(
            (out["status"], out["face"], out["role"], out["hub"]), ("online", "botlink", "robot", "n1")
        )
        rec["status"] = "unreachable"
        self.assertEqual(orjson.loads(mt.status_payload(rec, "n1", 3.0))["status"], "offline")

    def test_result_payload(self) -> None:
        """ack, or error with the HubError's code and message; the id echoed."""
        self.assertEqual(orjson.loads(mt.result_payload("a", "bot", "stop", "n1"))["status"], "ack")
        err = orjson.loads(mt.result_payload(7, "bot", "stop", "n1", HubError("device_offline", "gone")))
        self.assertEqual(
            (err["id"], err["status"], err["code"], err["message"]), (7, "error", "device_offline", "gone")
        )

    def test_decode_object(self) -> None:
        """Non-JSON, non-objects and oversize payloads are HubErrors with the spec codes."""
        self.assertEqual(mt.decode_object(b'{"a":1}', 100), {"a": 1})
        for payload, code in (
            (b"{nope", "bad_json"),
            (b"\xff\xfe", "bad_json"),
            (b"", "bad_json"),
            (b"[1]", "not_object"),
            (b"null", "not_object"),
            (b'"x"', "not_object"),
            (b"[" * 2000 + b"]" * 2000, "bad_json"),
            (b'{"a":"' + b"x" * 200 + b'"}', "frame_too_large"),
        ):
            with self.assertRaises(HubError) as ctx:
                mt.decode_object(payload, 100 if code == "frame_too_large" else 10**6)
            self.assertEqual(ctx.exception.code, code, payload[:20])

    def test_command_body(self) -> None:
        """The topic's type and device win; id, hub and origin are not forwarded to the robot."""
        body = mt.command_body({"type": "x", "id": 3, "hub": "h", "origin": "o", "x": 1}, "bot", "robot_move")
        self.assertEqual(body, {"type": "robot_move", "device_id": "bot", "x": 1})

    def test_request_id(self) -> None:
        """Strings, integers and null are echoed; anything else becomes null."""
        for rid, want in (("a", "a"), (5, 5), (None, None), (True, None), ([1], None), (1.5, None)):
            self.assertEqual(mt.request_id({"id": rid}), want)


class BrokerTests(SynchronousTestCase):
    """``mqtt.broker`` forms."""

    def test_forms(self) -> None:
        """Endpoint strings (positional and keyword) and URLs, with default ports."""
        b = parse_broker("tcp:127.0.0.1:1884")
        self.assertEqual((b.host, b.port, b.tls), ("127.0.0.1", 1884, False))
        b = parse_broker("ssl:host=broker.example:port=8884")
        self.assertEqual((b.host, b.port, b.tls), ("broker.example", 8884, True))
        self.assertEqual(parse_broker("ssl:broker.example").port, 8883)
        b = parse_broker("mqtts://u%40x:p%3Aw@broker.example")
        self.assertEqual(
            (b.host, b.port, b.tls, b.username, b.password), ("broker.example", 8883, True, "u@x", "p:w")
        )
        self.assertEqual(parse_broker("mqtt://10.0.0.1").port, 1883)

    def test_bad(self) -> None:
        """No host, bad ports and other schemes are ValueErrors."""
        for bad in ("tcp:", "tcp::1883", "unix:/x", "tcp:h:99999", "mqtt://"):
            self.assertRaises(ValueError, parse_broker, bad)

    def test_config(self) -> None:
        """The [mqtt] section: off by default, keys validated with one clear line."""
        cfg = load_config(None, environ={})
        self.assertFalse(cfg.mqtt.enabled)
        self.assertEqual((cfg.mqtt.prefix, cfg.mqtt.data_qos, cfg.mqtt.status_qos), ("robonet", 0, 1))
        self.assertEqual(cfg.mqtt.qos_by_type, {"system_status": 1})
        env = {"ROBONET_MQTT_QOS_BY_TYPE": '{"telemetry": 2}', "ROBONET_MQTT_PROTOCOL": "5"}
        cfg = load_config(None, environ=env)
        self.assertEqual((cfg.mqtt.qos_by_type, cfg.mqtt.protocol), ({"telemetry": 2}, "5"))
        for key, value in (
            ("QOS_BY_TYPE", '{"t": 3}'),
            ("DATA_QOS", "x"),
            ("BROKER", "udp:1"),
            ("PROTOCOL", "4"),
        ):
            with self.assertRaises(ConfigError) as ctx:
                load_config(None, environ={f"ROBONET_MQTT_{key}": value})
            self.assertIn("mqtt.", str(ctx.exception))


class QueueTests(SynchronousTestCase):
    """The outage queue: bounded by bytes, drops the oldest, counts drops."""

    def test_drop_oldest(self) -> None:
        """Past max_bytes the oldest items go; the newest are kept in order."""
        drops: list[int] = []
        q = DropOldestQueue(100, drops.append)
        for i in range(10):
            q.put("t", b"%02d" % i + b"x" * 17, 0, False)  # 20 bytes each
        self.assertEqual(len(q), 5)
        self.assertLessEqual(q.bytes, 100)
        self.assertEqual([q.pop()[1][:2] for _ in range(5)], [b"05", b"06", b"07", b"08", b"09"])
        self.assertEqual((q.dropped, sum(drops)), (5, 5))
        self.assertEqual(q.bytes, 0)

    def test_oversize(self) -> None:
        """A single item larger than the budget is dropped at once (the bound always holds)."""
        q = DropOldestQueue(10)
        q.put("topic", b"x" * 50, 0, False)
        self.assertEqual((len(q), q.bytes, q.dropped), (0, 0, 1))
