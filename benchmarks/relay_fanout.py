#!/usr/bin/env python3
"""Fleet fan-out benchmark (PERFORMANCE.md scenario S2): robots on the bot link -> dashboards on WebSocket.

R robots (default 200) send ``{"type":"bench","seq":n,"t":<send time>}`` at F Hz (default 10) over the
native bot link (no ``id``: fire and forget, like a telemetry stream); S dashboards (default 10)
connect to ``/ws/telemetry/`` and receive every message as ``{"type":"bench",...,"device_id",
"timestamp"}``. Reported: end-to-end latency p50/p99 (robot send -> dashboard receive, from the
embedded ``t``), delivered messages/s against the expected R*F*S, drops (robonet's counters), and
the server's CPU% and RSS over the measurement window.

The same load runs against a reference "bare relay" (the ~80-line Twisted relay PERFORMANCE.md
describes: Int32StringReceiver framing, orjson, Autobahn ``prepareMessage``/``sendPreparedMessage``
fan-out, no registry/store/queues) so results can be read as ratios on whatever machine runs them.

The server is pinned to CPU 0 and the load generator (one asyncio process with a minimal WebSocket
frame parser, so it is not the bottleneck) to CPU 1 when the machine has two or more CPUs.

Usage: ``python benchmarks/relay_fanout.py [--robots 200] [--hz 10] [--websites 10] [--duration 20]
[--no-reference] [--only-reference] [--no-store]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
T_RE = re.compile(rb'"t":([0-9.eE+-]+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


# --- servers ---------------------------------------------------------------------------------------


def start_robonet(state: Path, botlink: int, web: int, store: bool, pin: bool) -> subprocess.Popen[bytes]:
    """``twistd -n robonet`` with the bot link and web faces on loopback."""
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


def start_bare(botlink: int, web: int, pin: bool) -> subprocess.Popen[bytes]:
    """The reference bare relay (``--serve-bare``) in a subprocess."""
    args = [sys.executable, __file__, "--serve-bare", str(botlink), str(web)]
    if pin:
        args = ["taskset", "-c", "0", *args]
    return subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(REPO)})


def serve_bare(botlink: int, web: int) -> None:
    """The ~80-line bare relay of PERFORMANCE.md: the reference robonet is compared with."""
    import orjson
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import Int32StringReceiver

    clients: set[Any] = set()

    class Dash(WebSocketServerProtocol):
        def onOpen(self) -> None:
            clients.add(self)

        def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
            clients.discard(self)

    wsf = WebSocketServerFactory(f"ws://127.0.0.1:{web}")
    wsf.protocol = Dash

    class Bot(Int32StringReceiver):
        MAX_LENGTH = 1 << 20

        def stringReceived(self, data: bytes) -> None:
            try:
                msg = orjson.loads(data)
            except orjson.JSONDecodeError:
                return
            if msg.get("type") == "hello":
                self.sendString(orjson.dumps({"type": "welcome", "proto": 1}))
                return
            if "id" in msg:
                self.sendString(b'{"type":"ack","id":%d,"sum":%d}' % (msg["id"], sum(data) & 0xFFFFFFFF))
            prepared = wsf.prepareMessage(data)
            for c in clients:
                c.sendPreparedMessage(prepared)

    reactor.listenTCP(botlink, Factory.forProtocol(Bot), interface="127.0.0.1")
    reactor.listenTCP(web, wsf, interface="127.0.0.1")
    reactor.run()


# --- load generator ----------------------------------------------------------------------------------


class Dashboard(asyncio.Protocol):
    """A minimal WebSocket client: handshake, then parse unmasked server frames and time ``bench`` ones."""

    def __init__(self, stats: dict[str, Any], path: str) -> None:
        self.stats = stats
        self.path = path
        self.buf = b""
        self.open = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closed_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

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
            if opcode == 1:
                if b'"bench"' in payload:
                    if stats["measuring"]:
                        m = T_RE.search(payload)
                        if m:
                            stats["lat"].append(now - float(m.group(1)))
                        stats["received"] += 1
            elif opcode == 9 and self.transport is not None:  # ping -> masked pong
                mask = os.urandom(4)
                masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + mask + masked)
            elif opcode == 8:
                self.closed_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        self.buf = buf[pos:]


class Robot(asyncio.Protocol):
    """A native bot link robot that sends fire-and-forget ``bench`` frames (reads and drops replies)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def send(self, obj_bytes: bytes) -> None:
        assert self.transport is not None
        self.transport.write(struct.pack(">I", len(obj_bytes)) + obj_bytes)


async def run_load(args: argparse.Namespace, botlink: int, web: int, pid: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"lat": [], "received": 0, "measuring": False}
    dashboards = []
    for _ in range(args.websites):
        _, d = await loop.create_connection(lambda: Dashboard(stats, "/ws/telemetry/"), "127.0.0.1", web)
        await asyncio.wait_for(d.open, 10)
        dashboards.append(d)
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
    await asyncio.sleep(0.5)  # messages still in flight count as delivered (latency includes them)
    stats["measuring"] = False
    elapsed = t_measure1 - t_measure0
    rss_peak = max(rss_peak, proc.memory_info().rss)
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed * 100
    lat = sorted(stats["lat"])
    n = len(lat)
    for r in robots:
        if r.transport is not None:
            r.transport.close()
    for d in dashboards:
        if d.transport is not None:
            d.transport.close()
    return {
        "sent_per_s": round(sent_measured / elapsed),
        "expected_deliveries_per_s": round(sent_measured * args.websites / elapsed),
        "delivered_per_s": round(stats["received"] / elapsed),
        "delivered_ratio": round(stats["received"] / max(1, sent_measured * args.websites), 4),
        "p50_ms": round(lat[n // 2] * 1000, 3) if n else None,
        "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 3) if n else None,
        "cpu_percent": round(cpu, 1),
        "rss_mb": round(rss_peak / 2**20, 1),
    }


def robonet_drops(web: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/stats", timeout=5) as r:
        return dict(json.loads(r.read())["drops"])


def run_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    botlink, web = free_port(), free_port()
    state = Path(tempfile.mkdtemp(prefix=f"relay_fanout_{kind}_"))
    if kind == "robonet":
        proc = start_robonet(state, botlink, web, not args.no_store, args.pin)
    else:
        proc = start_bare(botlink, web, args.pin)
    try:
        wait_port(botlink, proc)
        wait_port(web, proc)
        server_pid = proc.pid
        if args.pin:  # taskset execs the server in place: same pid
            pass
        result = asyncio.run(run_load(args, botlink, web, server_pid))
        if kind == "robonet":
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
    p.add_argument("--websites", type=int, default=10)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--no-reference", action="store_true", help="skip the bare-relay reference run")
    p.add_argument("--only-reference", action="store_true")
    p.add_argument("--no-store", action="store_true", help="robonet with store.enabled = false")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--serve-bare", nargs=2, type=int, metavar=("BOTLINK", "WEB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_bare:
        serve_bare(*args.serve_bare)
        return
    if args.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    else:
        args.pin = False
    print(
        f"S2: {args.robots} robots x {args.hz:g} Hz (bot link) -> {args.websites} dashboards (WebSocket), "
        f"{args.duration:g} s measured after {args.warmup:g} s warm-up, server pinned: {args.pin}"
    )
    results: dict[str, dict[str, Any]] = {}
    kinds = (
        ["reference"] if args.only_reference else ["robonet"] + ([] if args.no_reference else ["reference"])
    )
    for kind in kinds:
        results[kind] = run_one(kind, args)
        print(f"{kind:>9}: {json.dumps(results[kind])}")
    if "robonet" in results and "reference" in results:
        a, b = results["robonet"], results["reference"]
        ratios = {
            k: round(a[k] / b[k], 2)
            for k in ("p50_ms", "p99_ms", "cpu_percent", "rss_mb", "delivered_per_s")
            if a.get(k) and b.get(k)
        }
        print(f"   ratios robonet/reference: {json.dumps(ratios)}")


if __name__ == "__main__":
    main()
