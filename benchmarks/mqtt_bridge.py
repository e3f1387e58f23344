#!/usr/bin/env python3
"""MQTT bridge benchmark (issue 9): bot-link ingest with the bridge on vs off, side by side. Not a test.

Starts a local Mosquitto on a free loopback port, then runs benchmarks/botlink_ingest.py's S1 load
(N connections x W un-acked telemetry frames) against ``twistd -n robonet`` with ``[mqtt]`` off and
on, alternating (``--rounds``, default 2 of each), and reports the acked msgs/s of each run, the
medians and the ratio on/off (the issue's budget: the bridge may cost at most 25 %). For the "on"
runs it also reports the bridge's counters (messages published, conflated, dropped).

The bridge's own work per message is measured in-process (``--micro``, on by default): the hub's
fan-out to the bridge (``offer``, conflating) per ingested message, and the cost of one published
message (payload + paho ``publish`` + the batch flush) with paho's socket a local socketpair.

    python benchmarks/mqtt_bridge.py                           # 100 x 32, 10 s per run, 2 rounds
    python benchmarks/mqtt_bridge.py --batch-interval 0        # no conflation: every message published
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import botlink_ingest as bi  # noqa: E402


def start_mosquitto() -> tuple[subprocess.Popen[bytes], int, Path]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    d = Path(tempfile.mkdtemp(prefix="robonet-mqtt-bench-"))
    port = bi.free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port, d
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("mosquitto did not start") from None
            time.sleep(0.05)


def bridge_stats(port: int) -> dict[str, Any]:
    """The daemon's ``stats`` endpoint over the bot link (its ``mqtt`` part)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for obj in (
            {"type": "hello", "proto": 1, "role": "client", "device_id": "bench-stats"},
            {"type": "request", "id": 1, "endpoint": "stats"},
        ):
            s.sendall(bi.frame(obj))
        buf = b""
        while True:
            data = s.recv(65536)
            if not data:
                return {}
            buf += data
            while len(buf) >= 4:
                n = int.from_bytes(buf[:4], "big")
                if len(buf) < 4 + n:
                    break
                msg = orjson.loads(buf[4 : 4 + n])
                buf = buf[4 + n :]
                if msg.get("type") == "response":
                    return dict(msg.get("data", {}).get("mqtt") or {})


def run_one(args: argparse.Namespace, mqtt_on: bool, broker_port: int) -> dict[str, Any]:
    keys = [k for k in os.environ if k.startswith("ROBONET_MQTT_")]
    for k in keys:
        del os.environ[k]
    if mqtt_on:
        os.environ.update(
            {
                "ROBONET_MQTT_ENABLED": "true",
                "ROBONET_MQTT_BROKER": f"tcp:127.0.0.1:{broker_port}",
                "ROBONET_MQTT_BATCH_INTERVAL": str(args.batch_interval),
            }
        )
    daemon = bi.Daemon(store=args.store == "on", idle_timeout=600.0)
    try:
        time.sleep(0.5 if mqtt_on else 0)  # let the bridge connect first
        result = bi.run_ingest(args, "127.0.0.1", daemon.port, bi.ProcStats(daemon.pid))
        result["mqtt"] = bridge_stats(daemon.port) if mqtt_on else None
    finally:
        daemon.stop()
    return result


def micro(n: int = 200000) -> dict[str, float]:
    """In-process per-message costs of the bridge (microseconds)."""
    import paho.mqtt.client as paho
    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    from robonet.config import load_config
    from robonet.hub import Hub
    from robonet.model import Message
    from robonet.services.mqtt import MqttBridge

    def setup(env: dict[str, str]) -> tuple[Any, Any, Any, Any]:
        cfg = load_config(None, environ={"ROBONET_MQTT_ENABLED": "true", **env})
        reactor = MemoryReactorClock()
        hub = Hub(cfg, reactor)
        a, b = socket.socketpair()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench")

        def factory(bridge: Any) -> Any:
            client.on_socket_register_write = lambda *x: None
            return client

        bridge = MqttBridge(
            cfg, hub, reactor, client_factory=factory, run_blocking=lambda fn: defer.succeed(0)
        )
        bridge.startService()
        client._sock = a
        client._state = paho._ConnectionState.MQTT_CS_CONNECTED
        bridge.connected = True
        dev = hub.connect(None, "bot-1", face="botlink", role="robot", address="x")
        return hub, reactor, bridge, (dev, client, b)

    body = {"type": "telemetry", "battery": 87.5, "cpu": 12.0, "temperature": 41.2, "signal": -48, "id": 7}
    out: dict[str, float] = {}
    for label, env in (("ingest_without_bridge", None), ("ingest_with_bridge_conflating", {})):
        hub, reactor, bridge, (dev, client, peer) = setup(env or {})
        if env is None:
            hub.unsubscribe(bridge)
        t = time.perf_counter()
        for i in range(n):
            hub.ingest(dev, Message("telemetry", body, "bot-1", 1.0))
            if i % 1000 == 999:
                reactor.advance(0.05)
                client._out_packet.clear()
        out[label + "_us"] = (time.perf_counter() - t) / n * 1e6
    # every message published: batch_interval 0 -> one payload + paho publish per message
    hub, reactor, bridge, (dev, client, peer) = setup({"ROBONET_MQTT_BATCH_INTERVAL": "0"})
    m = n // 4
    t = time.perf_counter()
    for i in range(m):
        hub.ingest(dev, Message("telemetry", body, "bot-1", 1.0))
        if i % 100 == 99:
            reactor.advance(0)
            client._out_packet.clear()
            bridge._backlog = 0
    out["ingest_with_bridge_every_message_us"] = (time.perf_counter() - t) / m * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--payload", type=int, default=190)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--store", choices=("on", "off"), default="off")
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs (default 2)")
    p.add_argument("--batch-interval", type=float, default=0.05, help="mqtt.batch_interval of the on runs")
    p.add_argument("--no-micro", action="store_true", help="skip the in-process per-message figures")
    args = p.parse_args(argv)
    bi.raise_fd_limit()
    proc, port, d = start_mosquitto()
    runs: dict[bool, list[float]] = {False: [], True: []}
    try:
        for r in range(args.rounds):
            for on in (False, True):
                res = run_one(args, on, port)
                runs[on].append(res["acked_msgs_per_s"])
                extra = f" bridge {res['mqtt']}" if on else ""
                print(
                    f"round {r + 1} mqtt {'on ' if on else 'off'}: {res['acked_msgs_per_s']:,.0f} acked msgs/s, "
                    f"daemon CPU {res['daemon_cpu_pct']}%{extra}",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)
    off, on = statistics.median(runs[False]), statistics.median(runs[True])
    print(f"median acked msgs/s: off {off:,.0f}, on {on:,.0f}; on/off = {on / off:.2f} (budget >= 0.75)")
    if not args.no_micro:
        for k, v in micro().items():
            print(f"  {k:42s} {v:6.2f} us per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
