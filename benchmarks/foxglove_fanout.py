#!/usr/bin/env python3
"""Foxglove fan-out benchmark: robots on the bot link -> Foxglove clients, next to robonet dashboards.

R robots (default 200) send ``{"type":"bench","seq":n,"t":<send time>}`` at F Hz (default 10)
over the native bot link (fire and forget), as in benchmarks/relay_fanout.py (whose helpers this
imports). Two runs of the same daemon (bot link + web + Foxglove faces on loopback), one after the
other:

- ``dashboards``: S (default 10) robonet dashboards on ``/ws/telemetry/``;
- ``foxglove``: S Foxglove clients (``foxglove.websocket.v1``) that subscribe to every
  ``/<robot>/bench`` channel as it is advertised and receive binary messageData.

Reported per run: end-to-end latency p50/p99 (robot send -> client receive, from the embedded
``t``), delivered messages/s against R*F*S, the server's CPU% and peak RSS, robonet's drops; then
the ratios foxglove/dashboards (the issue asks for within 1.5x). Server pinned to CPU 0 and the
load generator to CPU 1 when there are two CPUs.

Usage: ``python benchmarks/foxglove_fanout.py [--robots 200] [--hz 10] [--clients 10]
[--duration 20] [--only foxglove|dashboards] [--no-store]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_fanout import T_RE, Dashboard, Robot, free_port, robonet_drops, wait_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUBPROTOCOL = "foxglove.websocket.v1"


def start_robonet(
    state: Path, botlink: int, web: int, foxglove: int, store: bool, pin: bool
) -> subprocess.Popen[bytes]:
    """``twistd -n robonet`` with the bot link, web and Foxglove faces on loopback."""
    args = [
        os.path.join(os.path.dirname(sys.executable), "twistd"),
        "-n",
        "--pidfile=",
        "robonet",
        "--state-dir",
        str(state),
        "--botlink",
        f"tcp:{botlink}:interface=127.0.0.1",
        "--web",
        f"tcp:{web}:interface=127.0.0.1",
        "--foxglove",
        f"tcp:{foxglove}:interface=127.0.0.1",
        "--line",
        "none",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBONET_")}
    env.update(
        PYTHONPATH=str(REPO),
        ROBONET_CAMERA_ENABLED="false",
        ROBONET_DISCOVERY_ENABLED="false",
        ROBONET_STORE_ENABLED="true" if store else "false",
        ROBONET_BOTLINK_MAX_PER_IP="100000",
        ROBONET_LOG_LEVEL="warn",
    )
    if pin:
        args = ["taskset", "-c", "0", *args]
    log = open(state / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(state))


def masked(opcode: int, payload: bytes) -> bytes:
    """One masked client-to-server frame (RFC 6455 5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", n)
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


class FoxgloveClient(asyncio.Protocol):
    """A minimal Foxglove client: subprotocol handshake, subscribe to every ``/<robot>/bench``
    channel advertised, time binary messageData."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats
        self.buf = b""
        self.open = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.next_sub = 0
        self.subscribed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            ).encode()
        )

    def _on_text(self, payload: bytes) -> None:
        msg = json.loads(payload)
        if msg.get("op") != "advertise" or self.transport is None:
            return
        subs = []
        for ch in msg["channels"]:
            if ch["topic"].endswith("/bench"):
                subs.append({"id": self.next_sub, "channelId": ch["id"]})
                self.next_sub += 1
        if subs:
            self.subscribed += len(subs)
            self.transport.write(masked(1, json.dumps({"op": "subscribe", "subscriptions": subs}).encode()))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf + data
        if not self.open.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if b" 101 " not in buf[: buf.find(b"\r\n")]:
                self.open.set_exception(RuntimeError(buf[:200].decode(errors="replace")))
                return
            self.open.set_result(None)
            buf = buf[end + 4 :]
        pos, n = 0, len(buf)
        stats = self.stats
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            hdr = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                hdr = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                hdr = 10
            end = pos + hdr + length
            if end > n:
                break
            opcode = b0 & 0x0F
            payload = buf[pos + hdr : end]
            pos = end
            if opcode == 2:
                if stats["measuring"] and payload[:1] == b"\x01":
                    m = T_RE.search(payload, 13)
                    if m:
                        stats["lat"].append(now - float(m.group(1)))
                    stats["received"] += 1
            elif opcode == 1:
                self._on_text(payload)
            elif opcode == 9 and self.transport is not None:
                self.transport.write(masked(0xA, payload))
        self.buf = buf[pos:]


async def run_load(
    args: argparse.Namespace, botlink: int, pid: int, connect: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """Connect the clients (``connect(stats)`` -> protocol), the robots, send, measure."""
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"lat": [], "received": 0, "measuring": False}
    clients = []
    for _ in range(args.clients):
        c = await connect(stats)
        await asyncio.wait_for(c.open, 10)
        clients.append(c)
    robots = []
    for i in range(args.robots):
        _, r = await loop.create_connection(Robot, "127.0.0.1", botlink)
        hello = {"type": "hello", "proto": 1, "role": "robot", "device_id": f"bench_{i:04d}"}
        r.send(json.dumps(hello).encode())
        robots.append(r)
    await asyncio.sleep(1.0)

    period = 1.0 / args.hz
    start = loop.time()
    next_at = [start + period * i / args.robots for i in range(args.robots)]
    seq = 0
    sent_measured = 0
    proc = psutil.Process(pid)
    warm_end = start + args.warmup
    end = warm_end + args.duration
    cpu0: Any = None
    t_measure0 = 0.0
    rss_peak = 0
    tick = 0.002
    while True:
        now = loop.time()
        if now >= end:
            break
        if not stats["measuring"] and now >= warm_end:
            stats["measuring"] = True
            cpu0 = proc.cpu_times()
            t_measure0 = now
        for i, r in enumerate(robots):
            if next_at[i] <= now:
                seq += 1
                r.send(b'{"type":"bench","seq":%d,"t":%.6f}' % (seq, time.time()))
                next_at[i] += period
                if stats["measuring"]:
                    sent_measured += 1
        if stats["measuring"] and int(now * 4) != int((now - tick) * 4):
            rss_peak = max(rss_peak, proc.memory_info().rss)
        await asyncio.sleep(tick)
    cpu1 = proc.cpu_times()
    t_measure1 = loop.time()
    await asyncio.sleep(0.5)
    stats["measuring"] = False
    elapsed = t_measure1 - t_measure0
    rss_peak = max(rss_peak, proc.memory_info().rss)
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed * 100
    lat = sorted(stats["lat"])
    n = len(lat)
    for t in [r.transport for r in robots] + [c.transport for c in clients]:
        if t is not None:
            t.close()
    return {
        "sent_per_s": round(sent_measured / elapsed),
        "expected_deliveries_per_s": round(sent_measured * args.clients / elapsed),
        "delivered_per_s": round(stats["received"] / elapsed),
        "delivered_ratio": round(stats["received"] / max(1, sent_measured * args.clients), 4),
        "p50_ms": round(lat[n // 2] * 1000, 3) if n else None,
        "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 3) if n else None,
        "cpu_percent": round(cpu, 1),
        "rss_mb": round(rss_peak / 2**20, 1),
    }


def run_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    botlink, web, fox = free_port(), free_port(), free_port()
    state = Path(tempfile.mkdtemp(prefix=f"foxglove_fanout_{kind}_"))
    proc = start_robonet(state, botlink, web, fox, not args.no_store, args.pin)

    async def connect(stats: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        if kind == "foxglove":
            _, c = await loop.create_connection(lambda: FoxgloveClient(stats), "127.0.0.1", fox)
        else:
            _, c = await loop.create_connection(lambda: Dashboard(stats, "/ws/telemetry/"), "127.0.0.1", web)
        return c

    try:
        for port in (botlink, web, fox):
            wait_port(port, proc)
        result = asyncio.run(run_load(args, botlink, proc.pid, connect))
        result["drops"] = robonet_drops(web)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--robots", type=int, default=200)
    p.add_argument("--hz", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--only", choices=("foxglove", "dashboards"))
    p.add_argument("--no-store", action="store_true", help="robonet with store.enabled = false")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    args = p.parse_args()
    if args.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    else:
        args.pin = False
    print(
        f"{args.robots} robots x {args.hz:g} Hz (bot link) -> {args.clients} clients, "
        f"{args.duration:g} s measured after {args.warmup:g} s warm-up, server pinned: {args.pin}"
    )
    results: dict[str, dict[str, Any]] = {}
    for kind in [args.only] if args.only else ["dashboards", "foxglove"]:
        results[kind] = run_one(kind, args)
        print(f"{kind:>10}: {json.dumps(results[kind])}")
    if len(results) == 2:
        a, b = results["foxglove"], results["dashboards"]
        ratios = {
            k: round(a[k] / b[k], 2)
            for k in ("p50_ms", "p99_ms", "cpu_percent", "rss_mb", "delivered_per_s")
            if a.get(k) and b.get(k)
        }
        print(f"    ratios foxglove/dashboards: {json.dumps(ratios)}")


if __name__ == "__main__":
    main()
