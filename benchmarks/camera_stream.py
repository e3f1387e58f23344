"""Camera data stream benchmark: N clients on the 24 Hz data port (spec/camera.md, "Data").

By default it starts ``twistd -n robonet`` from this checkout with only the camera face (pipeline
off, ``require_auth`` off, free loopback ports, a temporary state directory) and measures that
process. ``--service`` runs just the camera service's data factory in a bare reactor instead;
``--port`` measures a running daemon (``--pid`` for its CPU, ``--password`` to authenticate first);
``--reference`` repeats the run against a bare Twisted server (one LoopingCall per connection
writing a fixed-shape packet, nothing else) and prints robonet / reference ratios.

Reports: per-client packet rate (target 24.0 +- 0.2 Hz); inter-arrival jitter |dt - 1/rate| as seen
by the clients (p50/p99/max) and from the server's own millisecond timestamps (p99); server CPU %
(user+system, 100 % = one core) and RSS over the measured window; the load average, since jitter on
a shared machine is mostly other processes.

    python benchmarks/camera_stream.py                       # 50 clients, 30 s, twistd
    python benchmarks/camera_stream.py --clients 200 --duration 10 --reference
    python benchmarks/camera_stream.py --host 192.168.1.20 --port 5000 --password secret --pid 1234
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- servers --------------------------------------------------------------------------------------

SERVICE_SERVER = r"""
import sys, tempfile
from twisted.internet import reactor
from robonet.config import load_config
from robonet.services.camera import make_camera_service

class Stats:
    def error(self, code): pass
    def drop(self, reason, count=1): pass
    def count_in(self, mtype, nbytes=0): pass
    def count_out(self, mtype, nbytes=0): pass
    def connection(self, face, delta): pass

class Hub:
    stats = Stats()
    registry = None
    def publish_local(self, *a, **kw): pass

port, rate = int(sys.argv[1]), float(sys.argv[2])
config = load_config(environ={}, overrides={
    "hub": {"state_dir": tempfile.mkdtemp(prefix="robonet-bench-")},
    "camera": {"data_listen": "none", "settings_listen": "none", "auth_listen": "none",
               "require_auth": False, "password": "bench", "rate_hz": rate, "max_per_ip": 100000}})
svc = make_camera_service(config, Hub(), reactor)
svc.startService()
reactor.listenTCP(port, svc.data_factory, interface="127.0.0.1", backlog=1024)
reactor.run()
"""

# The reference: what a bare Twisted 24 Hz stream costs (no gate, producer, stats or registry).
REFERENCE_SERVER = r"""
import sys
from functools import reduce
from operator import xor
from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, Protocol

port, rate = int(sys.argv[1]), float(sys.argv[2])

class Stream(Protocol):
    def connectionMade(self):
        self.loop = task.LoopingCall(self.tick)
        self.loop.start(1 / rate)
    def tick(self):
        body = bytes((0, 255, 1, 0, 0, 9, 5)) + int(reactor.seconds() * 1000).to_bytes(8, "big")
        self.transport.write(body + bytes((reduce(xor, body, 0),)))
    def connectionLost(self, reason):
        if self.loop.running:
            self.loop.stop()

reactor.listenTCP(port, Factory.forProtocol(Stream), interface="127.0.0.1", backlog=1024)
reactor.run()
"""


class Server:
    """A server subprocess on a free loopback port: ``daemon`` (twistd), ``service`` or ``reference``."""

    def __init__(self, kind: str, rate: float) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="robonet-bench-"))
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        if kind == "daemon":
            env.update(
                {
                    "ROBONET_CAMERA_REQUIRE_AUTH": "false",
                    "ROBONET_CAMERA_PASSWORD": "bench",
                    "ROBONET_CAMERA_RATE_HZ": str(rate),
                    "ROBONET_CAMERA_MAX_PER_IP": "100000",
                    "ROBONET_CAMERA_PIPELINE": "off",
                    "ROBONET_STORE_ENABLED": "false",
                    "ROBONET_DISCOVERY_ENABLED": "false",
                    "ROBONET_PEERS_AUTO": "false",
                }
            )
            argv = [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "--logfile",
                str(self.dir / "twistd.log"),
                "robonet",
                "--state-dir",
                str(self.dir / "state"),
                "--botlink",
                "none",
                "--line",
                "none",
                "--web",
                "none",
                "--camera-data",
                f"tcp:{self.port}:interface=127.0.0.1",
                "--camera-settings",
                "none",
                "--camera-auth",
                "none",
                "--log-level",
                "warn",
            ]
        else:
            code = SERVICE_SERVER if kind == "service" else REFERENCE_SERVER
            argv = [sys.executable, "-c", code, str(self.port), str(rate)]
        self.proc = subprocess.Popen(argv, cwd=self.dir, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{kind} server exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"{kind} server did not listen within 30 s\n{self.log_tail()}") from None
                time.sleep(0.1)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.dir / "twistd.log").read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- clients ----------------------------------------------------------------------------------------


def authenticate(host: str, port: int, password: str) -> None:
    from robonet.protocols.camera import AUTH_SUCCESS, encode_auth_request

    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(encode_auth_request(password.encode()))
        reply = s.recv(64)
    if reply != AUTH_SUCCESS:
        raise SystemExit(f"authentication on {host}:{port} failed: {reply.hex()}")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


CLIENT = r"""
import sys, time, orjson
sys.path.insert(0, sys.argv[1])
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from robonet.protocols.camera import Packet, PacketDecoder

host, port, clients, total = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

class Client(Protocol):
    def __init__(self):
        self.decoder = PacketDecoder(64)
        self.arrivals, self.stamps, self.bad = [], [], 0
    def dataReceived(self, data):
        now = time.monotonic()
        for item in self.decoder.feed(data):
            if isinstance(item, Packet) and item.id == 1 and len(item.payload) == 9:
                self.arrivals.append(now)
                self.stamps.append(int.from_bytes(item.payload[1:], "big"))
            else:
                self.bad += 1

conns = []
factory = Factory.forProtocol(Client)
def connect():
    for _ in range(clients):
        TCP4ClientEndpoint(reactor, host, port).connect(factory).addCallback(conns.append)
def done():
    for c in conns:
        c.transport.loseConnection()
    reactor.callLater(0.2, reactor.stop)
reactor.callWhenRunning(connect)
reactor.callLater(total, done)
reactor.run()
sys.stdout.buffer.write(orjson.dumps([[c.arrivals, c.stamps, c.bad] for c in conns]))
"""


def run_clients(
    host: str, port: int, clients: int, duration: float, warmup: float, rate: float, pid: int | None
) -> dict[str, Any]:
    """Run the clients in a separate process (so the client's CPU never competes with the
    measurement inside one interpreter) and compute the figures for the window after warmup."""
    import psutil

    proc = psutil.Process(pid) if pid else None
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(REPO), host, str(port), str(clients), str(warmup + duration)],
        stdout=subprocess.PIPE,
    )
    start = time.monotonic()
    time.sleep(warmup)
    t0 = time.monotonic()
    cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
    time.sleep(duration)
    t1 = time.monotonic()
    cpu1 = sum(proc.cpu_times()[:2]) if proc else 0.0
    rss = proc.memory_info().rss if proc else 0
    load = os.getloadavg()[0]
    out_bytes, _ = client.communicate(timeout=60)
    conns = orjson.loads(out_bytes)
    del start
    period = 1.0 / rate
    rates, jitter, server_jitter = [], [], []
    for arrivals, stamps, _bad in conns:
        idx = [i for i, t in enumerate(arrivals) if t0 <= t < t1]
        rates.append(len(idx) / (t1 - t0))
        for a, b in zip(idx, idx[1:], strict=False):
            jitter.append(abs((arrivals[b] - arrivals[a]) - period) * 1000)
            server_jitter.append(abs((stamps[b] - stamps[a]) / 1000 - period) * 1000)
    result: dict[str, Any] = {
        "clients": clients,
        "connected": len(conns),
        "duration_s": round(t1 - t0, 2),
        "target_hz": rate,
        "rate_hz_mean": round(sum(rates) / len(rates), 3) if rates else 0,
        "rate_hz_min": round(min(rates), 3) if rates else 0,
        "rate_hz_max": round(max(rates), 3) if rates else 0,
        "clients_within_0.2hz": sum(1 for r in rates if abs(r - rate) <= 0.2),
        "jitter_ms_p50": round(percentile(jitter, 50), 3),
        "jitter_ms_p99": round(percentile(jitter, 99), 3),
        "jitter_ms_max": round(max(jitter), 3) if jitter else None,
        "server_stamp_jitter_ms_p99": round(percentile(server_jitter, 99), 3),
        "bad_packets": sum(c[2] for c in conns),
        "load_avg_1m": round(load, 2),
    }
    if proc:
        result["server_cpu_percent"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 2)
        result["server_rss_mb"] = round(rss / 1e6, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="data port of a running daemon (default: start one)")
    ap.add_argument("--auth-port", type=int, default=0, help="auth port (default: data port + 2)")
    ap.add_argument("--password", default="", help="authenticate first (running daemon with require_auth)")
    ap.add_argument("--pid", type=int, default=0, help="PID of a running daemon, for CPU%%")
    ap.add_argument("--service", action="store_true", help="run only the camera service, not twistd")
    ap.add_argument("--reference", action="store_true", help="also run a bare Twisted server; print ratios")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=24.0, help="rate_hz of the started server / the target")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    if args.port:
        if args.password:
            authenticate(args.host, args.auth_port or args.port + 2, args.password)
        results["robonet"] = run_clients(
            args.host, args.port, args.clients, args.duration, args.warmup, args.rate, args.pid or None
        )
    else:
        kinds = ["service" if args.service else "daemon"] + (["reference"] if args.reference else [])
        for kind in kinds:
            server = Server(kind, args.rate)
            try:
                results["robonet" if kind != "reference" else "reference"] = run_clients(
                    "127.0.0.1",
                    server.port,
                    args.clients,
                    args.duration,
                    args.warmup,
                    args.rate,
                    server.proc.pid,
                )
            finally:
                server.stop()
        if args.reference:
            r, ref = results["robonet"], results["reference"]
            results["ratio_robonet_over_reference"] = {
                k: round(r[k] / ref[k], 2) if ref.get(k) else None
                for k in ("server_cpu_percent", "jitter_ms_p99", "server_stamp_jitter_ms_p99", "rate_hz_mean")
            }
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
