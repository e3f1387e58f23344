"""The MQTT bridge end to end: real ``twistd -n robonet`` daemons and a real Mosquitto on loopback.

Each test starts its own broker (tests/mosquitto.py) on a free 127.0.0.1 port and daemons with
``[mqtt]`` enabled through the environment; waits are bounded. Skipped only where the mosquitto
binary is missing.
"""

from __future__ import annotations

import socket
from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase

from tests.daemon import Daemon, start_daemon
from tests.mosquitto import MOSQUITTO, SKIP_REASON, Broker, Watcher, start_mosquitto
from tests.test_daemon_e2e import RawConn, checksum

PREFIX = "robonet/default"


def mqtt_env(broker_port: int, **extra: str) -> dict[str, str]:
    env = {
        "ROBONET_MQTT_ENABLED": "true",
        "ROBONET_MQTT_BROKER": f"tcp:127.0.0.1:{broker_port}",
        "ROBONET_MQTT_RECONNECT_MAX": "1",
        "ROBONET_MQTT_BATCH_INTERVAL": "0",
        "ROBONET_PEERS_AUTO": "false",
    }
    env.update({f"ROBONET_MQTT_{k.upper()}": v for k, v in extra.items()})
    return env


def node_id(daemon: Daemon) -> str:
    conn = RawConn(daemon.ports["botlink"])
    try:
        conn.hello(role="client", device_id=f"probe-{id(conn)}")
        return str(conn.request("info")["data"]["server_id"])
    finally:
        conn.close()


def loads(payload: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = orjson.loads(payload)
    return obj


def is_status(device_id: str, status: str, hub: str | None = None) -> Any:
    def pred(topic: str, payload: bytes, retain: bool) -> bool:
        if topic != f"{PREFIX}/{device_id}/status":
            return False
        obj = loads(payload)
        return obj.get("status") == status and (hub is None or obj.get("hub") == hub)

    return pred


class LineRobot:
    """A line-link robot: newline JSON; acks commands by id."""

    def __init__(self, port: int, device_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.send({"type": "hello", "role": "robot", "device_id": device_id})

    def send(self, obj: Any) -> None:
        self.sock.sendall(orjson.dumps(obj) + b"\n")

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return loads(line)

    def recv_type(self, mtype: str) -> dict[str, Any]:
        while True:
            obj = self.recv()
            if obj.get("type") == mtype:
                return obj

    def close(self) -> None:
        self.sock.close()


class BridgeEndToEndTests(SynchronousTestCase):
    """One hub, one broker: data out, commands in (every face), results back, metrics."""

    if MOSQUITTO is None:
        skip = SKIP_REASON

    def setUp(self) -> None:
        self.broker: Broker = start_mosquitto(self)
        self.watch = Watcher(self, self.broker.port, "robonet/#")
        self.daemon = start_daemon(self, env=mqtt_env(self.broker.port), store=False)
        self.node = node_id(self.daemon)
        self.watch.wait_for(
            lambda t, p, r: t == f"{PREFIX}/$hubs/{self.node}" and p == b"online", what="hub online"
        )

    def robot(self, device_id: str) -> RawConn:
        conn = RawConn(self.daemon.ports["botlink"], timeout=10)
        self.addCleanup(conn.close)
        conn.hello(role="robot", device_id=device_id)
        self.watch.wait_for(is_status(device_id, "online", self.node), what=f"{device_id} online")
        return conn

    def test_telemetry_on_topic(self) -> None:
        """A bot-link robot's telemetry arrives on <prefix>/<project>/<device>/telemetry with extras."""
        conn = self.robot("bot-t")
        payload = conn.send({"type": "telemetry", "id": 1, "battery": 81.5, "cpu": 3})
        self.assertEqual(conn.recv(), {"type": "ack", "id": 1, "sum": checksum(payload)})
        _, data, retain = self.watch.wait_for(lambda t, p, r: t == f"{PREFIX}/bot-t/telemetry")
        obj = loads(data)
        self.assertEqual((obj["battery"], obj["cpu"], obj["device_id"]), (81.5, 3, "bot-t"))
        self.assertEqual(obj["hub"], self.node)
        self.assertIsInstance(obj["received_at"], float)
        self.assertFalse(retain)
        status = loads(self.watch.find(is_status("bot-t", "online"))[0][1])
        self.assertEqual((status["face"], status["role"]), ("botlink", "robot"))

    def test_command_to_every_face(self) -> None:
        """A command on .../cmd/<type> reaches bot-link, WebSocket and line-link robots; results return."""
        from websockets.sync.client import connect

        bot = self.robot("bot-c")
        ws = connect(
            f"ws://127.0.0.1:{self.daemon.ports['web']}/ws/telemetry/?device_id=ws-c", open_timeout=10
        )
        self.addCleanup(ws.close)
        self.watch.wait_for(is_status("ws-c", "online"), what="ws robot online")
        line = LineRobot(self.daemon.ports["line"], "line-c")
        self.addCleanup(line.close)
        self.watch.wait_for(is_status("line-c", "online"), what="line robot online")

        self.watch.publish(f"{PREFIX}/bot-c/cmd/robot_move", b'{"id":"m1","x":0.5,"y":0.25}')
        cmd = bot.recv_type("robot_move")
        self.assertEqual((cmd["x"], cmd["y"]), (0.5, 0.25))
        bot.send({"type": "ack", "id": cmd["id"]})

        self.watch.publish(f"{PREFIX}/ws-c/cmd/set_speed", b'{"id":7,"value":3}')
        while True:
            got = loads(ws.recv(timeout=10))  # type: ignore[arg-type]
            if got.get("type") == "set_speed":
                break
        self.assertEqual(got["value"], 3)

        self.watch.publish(f"{PREFIX}/line-c/cmd/stop", b'{"id":"s1"}')
        lcmd = line.recv_type("stop")
        line.send({"type": "ack", "id": lcmd["id"]})

        for dev, ctype, rid in (
            ("bot-c", "robot_move", "m1"),
            ("ws-c", "set_speed", 7),
            ("line-c", "stop", "s1"),
        ):
            _, res, _ = self.watch.wait_for(
                lambda t, p, r, dev=dev, ctype=ctype: t == f"{PREFIX}/{dev}/cmd/{ctype}/result",
                what=f"{dev} result",
            )
            self.assertEqual(loads(res)["id"], rid)
            self.assertEqual(loads(res)["status"], "ack", res)

    def test_command_errors(self) -> None:
        """Bad JSON, unknown commands and offline devices get error results; the hub keeps serving."""
        self.robot("bot-e")
        cases = (
            ("bot-e", "robot_move", b"{nope", "bad_json"),
            ("bot-e", "robot_move", b"[1]", "not_object"),
            ("bot-e", "self_destruct", b'{"id":"u"}', "unknown_command"),
            ("ghost", "robot_move", b'{"id":"g","x":0,"y":0}', "device_offline"),
        )
        for dev, ctype, payload, code in cases:
            self.watch.publish(f"{PREFIX}/{dev}/cmd/{ctype}", payload)
            _, res, _ = self.watch.wait_for(
                lambda t, p, r, dev=dev, ctype=ctype, code=code: (
                    t == f"{PREFIX}/{dev}/cmd/{ctype}/result" and loads(p).get("code") == code
                ),
                what=f"{code} result",
            )
            self.assertEqual(loads(res)["status"], "error")
        self.assertTrue(self.daemon.alive())
        conn = self.robot("bot-e2")
        payload = conn.send({"type": "telemetry", "id": 5, "battery": 1})
        self.assertEqual(conn.recv(), {"type": "ack", "id": 5, "sum": checksum(payload)})

    def test_metrics(self) -> None:
        """/metrics carries the bridge's gauges and counters."""
        import urllib.request

        self.robot("bot-m")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.daemon.ports['web']}/metrics", timeout=10) as r:
            text = r.read().decode()
        self.assertIn("robonet_mqtt_connected 1.0", text)
        self.assertIn("robonet_mqtt_messages_out_total", text)
        self.assertIn("robonet_mqtt_reconnects_total", text)

    def test_last_will(self) -> None:
        """kill -9 of the hub: the broker publishes its retained Last Will ``offline``."""
        self.daemon.kill9()
        self.watch.wait_for(
            lambda t, p, r: t == f"{PREFIX}/$hubs/{self.node}" and p == b"offline", what="last will"
        )
        late = Watcher(self, self.broker.port, f"{PREFIX}/$hubs/+")
        _, payload, retain = late.wait_for(lambda t, p, r: t == f"{PREFIX}/$hubs/{self.node}")
        self.assertEqual((payload, retain), (b"offline", True))


class OutageTests(SynchronousTestCase):
    """The broker dies mid-stream and comes back on the same port."""

    if MOSQUITTO is None:
        skip = SKIP_REASON

    def test_broker_restart(self) -> None:
        """Reconnects, re-publishes statuses, keeps the newest queued data within the byte bound."""
        broker = start_mosquitto(self)
        port, directory = broker.port, broker.conf.parent
        daemon = start_daemon(self, env=mqtt_env(port, max_queue_bytes="4096"), store=False)
        node = node_id(daemon)
        # a persistent session: the broker keeps (and saves) its subscription over the restart
        watch = Watcher(self, port, "robonet/#", persistent="outage-watcher")
        conn = RawConn(daemon.ports["botlink"], timeout=10)
        self.addCleanup(conn.close)
        conn.hello(role="robot", device_id="bot-o")
        watch.wait_for(is_status("bot-o", "online", node), what="online")
        watch.close()

        broker.stop()  # mid-stream outage (SIGTERM so the broker saves the watcher's session)
        # 400 messages of ~150 bytes while the broker is away: far over the 4 KiB queue
        for i in range(1, 401):
            conn.send({"type": "sensor_data", "id": i, "seq": i, "pad": "x" * 100})
            self.assertEqual(conn.recv()["id"], i)

        broker2 = start_mosquitto(self, port=port, directory=directory)
        watch2 = Watcher(self, broker2.port, persistent="outage-watcher")
        watch2.wait_for(is_status("bot-o", "online", node), timeout=30, what="status re-published")
        watch2.wait_for(
            lambda t, p, r: t == f"{PREFIX}/bot-o/sensor_data" and loads(p)["seq"] == 400, what="newest"
        )
        watch2.wait_for(lambda t, p, r: t == f"{PREFIX}/$hubs/{node}" and p == b"online", what="hub online")
        seqs = [loads(p)["seq"] for t, p, r in watch2.find(lambda t, p, r: t.endswith("/sensor_data"))]
        self.assertLess(len(seqs), 40)  # the bound held: most of the 400 were dropped, oldest first
        self.assertEqual(seqs, sorted(seqs))
        stats = RawConn(daemon.ports["botlink"])
        self.addCleanup(stats.close)
        stats.hello(role="client", device_id="stats-o")
        snap = stats.request("stats")["data"]
        self.assertGreater(snap["drops"].get("mqtt_queue", 0), 300)
        # the data keeps flowing after the reconnect
        conn.send({"type": "sensor_data", "id": 999, "seq": 999})
        self.assertEqual(conn.recv()["id"], 999)
        watch2.wait_for(
            lambda t, p, r: t == f"{PREFIX}/bot-o/sensor_data" and loads(p)["seq"] == 999, what="after"
        )


class FederationTests(SynchronousTestCase):
    """Two hubs on one broker, no peer link: each sees the other's robots and commands cross."""

    if MOSQUITTO is None:
        skip = SKIP_REASON

    def test_two_hubs(self) -> None:
        """Hub B's robot appears on hub A as remote; its data and A's command cross the broker."""
        broker = start_mosquitto(self)
        env = mqtt_env(broker.port, federate="true")
        a = start_daemon(self, env=env, store=False)
        b = start_daemon(self, env=env, store=False)
        node_a, node_b = node_id(a), node_id(b)
        watch = Watcher(self, broker.port, "robonet/#")

        robot = RawConn(b.ports["botlink"], timeout=10)
        self.addCleanup(robot.close)
        robot.hello(role="robot", device_id="far-bot")
        watch.wait_for(is_status("far-bot", "online", node_b), what="far-bot online")

        client = RawConn(a.ports["botlink"], timeout=10)
        self.addCleanup(client.close)
        client.hello(role="client", device_id="script-a")
        for _ in range(100):  # bounded: the status crosses the broker asynchronously
            devices = client.request("devices", {"role": "robot"})["data"]["devices"]
            far = [d for d in devices if d["device_id"] == "far-bot" and d["status"] == "online"]
            if far:
                break
            watch._pace.wait(0.05)
        self.assertEqual(far[0]["hub"], node_b)

        # A's robots do not leak back: A never republishes far-bot
        robot.send({"type": "telemetry", "id": 1, "battery": 42.0})
        robot.recv()
        watch.wait_for(lambda t, p, r: t == f"{PREFIX}/far-bot/telemetry", what="far-bot telemetry")
        for _ in range(100):
            devices = client.request("devices", {"role": "robot"})["data"]["devices"]
            far = [d for d in devices if d["device_id"] == "far-bot"]
            if far and far[0].get("latest", {}).get("telemetry", {}).get("battery") == 42.0:
                break
            watch._pace.wait(0.05)
        self.assertEqual(far[0]["latest"]["telemetry"]["battery"], 42.0)
        hubs = {loads(p)["hub"] for t, p, r in watch.find(lambda t, p, r: t == f"{PREFIX}/far-bot/telemetry")}
        self.assertEqual(hubs, {node_b})

        # a command sent on hub A to far-bot goes over the broker to hub B's robot and is acked
        client.send({"type": "robot_move", "id": 50, "device_id": "far-bot", "x": 1, "y": 0})
        cmd = robot.recv_type("robot_move")
        self.assertEqual(cmd["x"], 1)
        robot.send({"type": "ack", "id": cmd["id"]})
        reply = client.recv()
        self.assertEqual((reply["type"], reply["id"]), ("ack", 50), reply)
        self.assertNotEqual(node_a, node_b)
