#!/usr/bin/env python3
"""Bot-link ingest benchmark (PERFORMANCE.md scenarios S1 and S3). Not a test.

S1 ingest: N connections (default 100) say hello as robots, then each sends ~190-byte telemetry
frames with ids, keeping a window of W (default 32) un-acked, for a bounded time. Reports acked
messages/s, ack round-trip p50/p99, the daemon's CPU% and RSS, and the load generator's own CPU
(so a generator-bound run is visible). Every ack's ``sum`` is checked.

S3 idle (``--idle N``): N hello'd connections that then stay idle; reports the daemon's RSS growth
per connection.

By default it starts ``twistd -n robonet`` itself (from this checkout) on a free loopback port with
a temporary state dir, only the bot link enabled, ``botlink.max_per_ip`` lifted, and
``ROBONET_STORE_ENABLED`` from ``--store on|off``; ``--host/--port`` use a running daemon instead
(``--pid`` to measure its CPU/RSS). The generator is a lean selectors loop over raw sockets in
``--procs`` processes (default 2), never the client library. Connections from a loopback host are
spread over 127.3.x.y source addresses (50 per address) so a running daemon's per-IP cap does not
refuse them.

    python benchmarks/botlink_ingest.py                        # S1, store on, 100 x 32, 10 s
    python benchmarks/botlink_ingest.py --store off --duration 20
    python benchmarks/botlink_ingest.py --idle 10000           # S3
    python benchmarks/botlink_ingest.py --host 127.0.0.1 --port 5100 --pid $(pidof -s twistd)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import multiprocessing as mp
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
_LEN = struct.Struct(">I")
PER_SOURCE_IP = 50


# --- helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback and ":" not in host
    except ValueError:
        return host == "localhost"


def source_for(index: int, host: str) -> tuple[str, int] | None:
    if not is_loopback(host):
        return None
    group = index // PER_SOURCE_IP
    return (f"127.3.{group // 250}.{group % 250 + 1}", 0)


def frame(obj: Any) -> bytes:
    payload = orjson.dumps(obj)
    return _LEN.pack(len(payload)) + payload


class Telemetry:
    """~``size``-byte telemetry payloads differing only in their id; sums precomputed."""

    def __init__(self, size: int) -> None:
        self.prefix = b'{"type":"telemetry","id":'
        body = (
            b',"ts":1733740245.123456,"battery":84.8,"cpu":45.2,"temperature":34.8,"signal":89.5,'
            b'"speed":50,"state":"idle","pad":"'
        )
        base = len(self.prefix) + 6 + len(body) + 2  # 6-digit ids typical
        self.suffix = body + b"x" * max(0, size - base) + b'"}'
        self.fixed_sum = sum(self.prefix) + sum(self.suffix)
        self.fixed_len = len(self.prefix) + len(self.suffix)
        self.size = self.fixed_len + 6

    def make(self, msg_id: int) -> tuple[bytes, int]:
        digits = b"%d" % msg_id
        n = self.fixed_len + len(digits)
        return (
            _LEN.pack(n) + self.prefix + digits + self.suffix,
            (self.fixed_sum + sum(digits)) & 0xFFFFFFFF,
        )


def open_connections(
    host: str, port: int, first: int, count: int, tag: str, timeout: float = 30.0
) -> list[Any]:
    """Open ``count`` connections, say hello on each, wait for every welcome. Returns sockets."""
    socks: list[socket.socket] = []
    # Small batches: Twisted listens with a backlog of 50; overflowing it costs 1 s SYN retries.
    batch = 25
    for start in range(0, count, batch):
        chunk = []
        for i in range(start, min(count, start + batch)):
            s = socket.create_connection(
                (host, port), timeout=timeout, source_address=source_for(first + i, host)
            )
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(
                frame({"type": "hello", "proto": 1, "role": "robot", "device_id": f"{tag}-{first + i}"})
            )
            chunk.append(s)
        for s in chunk:
            buf = b""
            while len(buf) < 4 or len(buf) < 4 + _LEN.unpack_from(buf)[0]:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("daemon closed a connection during hello")
                buf += data
            welcome = orjson.loads(buf[4 : 4 + _LEN.unpack_from(buf)[0]])
            if welcome.get("type") != "welcome":
                raise ConnectionError(f"hello refused: {welcome}")
            s.setblocking(False)
        socks.extend(chunk)
    return socks


# --- S1 worker -----------------------------------------------------------------------------


class Conn:
    __slots__ = ("sock", "buf", "out", "next_id", "inflight", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.out = b""
        self.next_id = 1
        self.inflight: dict[int, tuple[int, int]] = {}  # id -> (send time ns, expected sum)
        self.writing = False


def ingest_worker(
    wid: int,
    host: str,
    port: int,
    first: int,
    count: int,
    window: int,
    size: int,
    ready: Any,
    go: Any,
    warmup: float,
    duration: float,
    results: Any,
) -> None:
    raise_fd_limit()
    tele = Telemetry(size)
    try:
        socks = open_connections(host, port, first, count, f"bench{wid}")
    except Exception as e:  # reported to the parent, which stops the run
        ready.put((wid, f"{type(e).__name__}: {e}"))
        return
    ready.put((wid, None))
    go.wait()
    sel = selectors.DefaultSelector()
    conns = [Conn(s) for s in socks]
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    perf_ns = time.perf_counter_ns
    loads = orjson.loads
    unpack = _LEN.unpack_from
    t_start = perf_ns()
    m_start = t_start + int(warmup * 1e9)
    m_end = m_start + int(duration * 1e9)
    acked = 0
    bad_sum = 0
    errors = 0
    closed = 0
    rtts = array("I")
    cpu0 = os.times()

    def fill(c: Conn, n: int) -> None:
        now = perf_ns()
        parts = []
        for _ in range(n):
            mid = c.next_id
            c.next_id = mid + 1
            data, s = tele.make(mid)
            c.inflight[mid] = (now, s)
            parts.append(data)
        c.out += b"".join(parts)
        flush(c)

    def flush(c: Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            sent = 0
        c.out = c.out[sent:]
        want = bool(c.out)
        if want != c.writing:
            c.writing = want
            sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), c)

    for c in conns:
        fill(c, window)
    sending = True
    while True:
        now = perf_ns()
        if now >= m_end and sending:
            sending = False
            drain_deadline = now + int(2e9)
        if not sending and (now >= drain_deadline or not any(c.inflight for c in conns)):
            break
        for key, events in sel.select(timeout=0.2):
            c = key.data
            if events & selectors.EVENT_WRITE:
                flush(c)
            if not events & selectors.EVENT_READ:
                continue
            try:
                data = c.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                closed += 1
                sel.unregister(c.sock)
                c.inflight.clear()
                continue
            buf = c.buf + data if c.buf else data
            pos = 0
            n = len(buf)
            got = 0
            t = perf_ns()
            while n - pos >= 4:
                ln = unpack(buf, pos)[0]
                end = pos + 4 + ln
                if end > n:
                    break
                msg = loads(buf[pos + 4 : end])
                pos = end
                if msg.get("type") != "ack":
                    errors += 1
                    continue
                entry = c.inflight.pop(msg.get("id"), None)
                if entry is None:
                    continue
                got += 1
                if msg.get("sum") != entry[1]:
                    bad_sum += 1
                if m_start <= t < m_end:
                    acked += 1
                    rtts.append(min((t - entry[0]) // 1000, 0xFFFFFFFF))
            c.buf = buf[pos:] if pos < n else b""
            if got and sending:
                fill(c, got)
    cpu1 = os.times()
    for c in conns:
        c.sock.close()
    results.put(
        {
            "wid": wid,
            "acked": acked,
            "bad_sum": bad_sum,
            "errors": errors,
            "closed": closed,
            "rtts_us": rtts.tobytes(),
            "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        }
    )


# --- S3 worker -----------------------------------------------------------------------------


def idle_worker(wid: int, host: str, port: int, first: int, count: int, ready: Any, done: Any) -> None:
    raise_fd_limit()
    try:
        socks = open_connections(host, port, first, count, f"idle{wid}", timeout=60.0)
    except Exception as e:
        ready.put((wid, f"{type(e).__name__}: {e}"))
        return
    ready.put((wid, None))
    done.wait()
    for s in socks:
        s.close()


# --- daemon --------------------------------------------------------------------------------


class Daemon:
    """``twistd -n robonet`` from this checkout on a free loopback port, bot link only."""

    def __init__(
        self, store: bool, idle_timeout: float, log_level: str = "warn", extra_env: dict[str, str] | None = None
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="robonet-bench-"))
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        env.update(
            {
                "ROBONET_STORE_ENABLED": "true" if store else "false",
                "ROBONET_BOTLINK_MAX_PER_IP": "1000000",
                "ROBONET_BOTLINK_IDLE_TIMEOUT": str(idle_timeout),
                "ROBONET_CAMERA_ENABLED": "false",
                "ROBONET_DISCOVERY_ENABLED": "false",
                "ROBONET_PEERS_AUTO": "false",
            }
        )
        env.update(extra_env or {})
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
            f"tcp:{self.port}:interface=127.0.0.1",
            "--line",
            "none",
            "--web",
            "none",
            "--log-level",
            log_level,
        ]
        self.proc = subprocess.Popen(
            argv, cwd=self.dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise SystemExit(f"robonet exited with {self.proc.returncode}:\n{err}\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(
                        "robonet did not start listening within 30 s\n" + self.log_tail()
                    ) from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.dir / "twistd.log").read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, keep: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# The "bare relay" of PERFORMANCE.md minus fan-out: Int32StringReceiver, orjson, an ack per id.
REFERENCE_SERVER = r"""
import sys, orjson
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver

class Bare(Int32StringReceiver):
    MAX_LENGTH = 1048576
    def stringReceived(self, payload):
        msg = orjson.loads(payload)
        if msg.get("type") == "hello":
            self.sendString(orjson.dumps({"type": "welcome", "proto": 1, "device_id": msg.get("device_id")}))
        elif "id" in msg:
            self.sendString(b'{"type":"ack","id":%d,"sum":%d}' % (msg["id"], sum(payload) & 0xFFFFFFFF))

reactor.listenTCP(int(sys.argv[1]), Factory.forProtocol(Bare), backlog=50, interface="127.0.0.1")
reactor.run()
"""


class Reference:
    """The bare Twisted relay (:data:`REFERENCE_SERVER`) on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", REFERENCE_SERVER, str(self.port)])
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("the reference relay did not start") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, keep: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class ProcStats:
    """CPU time and RSS of a process, from psutil or /proc."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_s(self) -> float | None:
        if self.pid is None:
            return None
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / self.tick

    def rss_bytes(self) -> int | None:
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


# --- runs ----------------------------------------------------------------------------------


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """(first index, count) for each of ``parts`` workers."""
    out, first = [], 0
    for p in range(parts):
        n = total // parts + (1 if p < total % parts else 0)
        out.append((first, n))
        first += n
    return [x for x in out if x[1] > 0]


def percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return float(sorted_vals[i])


def run_ingest(args: argparse.Namespace, host: str, port: int, stats: ProcStats) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    tele = Telemetry(args.payload)
    procs = []
    for wid, (first, count) in enumerate(split(args.connections, args.procs)):
        p = ctx.Process(
            target=ingest_worker,
            args=(
                wid,
                host,
                port,
                first,
                count,
                args.window,
                args.payload,
                ready,
                go,
                args.warmup,
                args.duration,
                results,
            ),
        )
        p.start()
        procs.append(p)
    try:
        for _ in procs:
            wid, err = ready.get(timeout=120)
            if err:
                raise SystemExit(f"worker {wid}: {err}")
        go.set()
        time.sleep(args.warmup)
        cpu0, t0 = stats.cpu_s(), time.monotonic()
        rss_peak = stats.rss_bytes() or 0
        end = t0 + args.duration
        while time.monotonic() < end:
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
            rss_peak = max(rss_peak, stats.rss_bytes() or 0)
        cpu1, t1 = stats.cpu_s(), time.monotonic()
        rss_end = stats.rss_bytes()
        parts = [results.get(timeout=60) for _ in procs]
    finally:
        go.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    rtts: list[int] = []
    for part in parts:
        a = array("I")
        a.frombytes(part["rtts_us"])
        rtts.extend(a)
    rtts.sort()
    acked = sum(p["acked"] for p in parts)
    return {
        "scenario": "ingest",
        "connections": args.connections,
        "window": args.window,
        "payload_bytes": tele.size,
        "duration_s": args.duration,
        "store": args.store,
        "acked_msgs_per_s": acked / args.duration,
        "ack_rtt_p50_ms": percentile(rtts, 0.50) / 1000,
        "ack_rtt_p99_ms": percentile(rtts, 0.99) / 1000,
        "bad_sums": sum(p["bad_sum"] for p in parts),
        "error_frames": sum(p["errors"] for p in parts),
        "closed_by_daemon": sum(p["closed"] for p in parts),
        "daemon_cpu_pct": None if cpu0 is None or cpu1 is None else 100 * (cpu1 - cpu0) / (t1 - t0),
        "daemon_rss_mb": None if rss_end is None else rss_end / 2**20,
        "daemon_rss_peak_mb": rss_peak / 2**20 if rss_peak else None,
        "generator_cpu_pct": 100 * sum(p["cpu_s"] for p in parts) / (args.warmup + args.duration),
        "generator_procs": len(procs),
    }


def run_idle(args: argparse.Namespace, host: str, port: int, stats: ProcStats) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    ready = ctx.Queue()
    done = ctx.Event()
    rss0 = stats.rss_bytes()
    t0 = time.monotonic()
    procs = []
    for wid, (first, count) in enumerate(split(args.idle, args.procs)):
        p = ctx.Process(target=idle_worker, args=(wid, host, port, first, count, ready, done))
        p.start()
        procs.append(p)
    try:
        for _ in procs:
            wid, err = ready.get(timeout=300)
            if err:
                raise SystemExit(f"worker {wid}: {err}")
        opened = time.monotonic() - t0
        time.sleep(1.0)
        rss1 = stats.rss_bytes()
    finally:
        done.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    per = None if rss0 is None or rss1 is None else (rss1 - rss0) / args.idle
    return {
        "scenario": "idle",
        "connections": args.idle,
        "open_s": opened,
        "daemon_rss_before_mb": None if rss0 is None else rss0 / 2**20,
        "daemon_rss_after_mb": None if rss1 is None else rss1 / 2**20,
        "rss_per_connection_kb": None if per is None else per / 1024,
    }


def print_result(r: dict[str, Any]) -> None:
    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    if r["scenario"] == "ingest":
        print(
            f"botlink ingest: {r['connections']} connections x window {r['window']}, "
            f"{r['payload_bytes']}-byte telemetry, {r['duration_s']:g} s, store {r['store']}"
        )
        print(f"  acked msgs/s        {r['acked_msgs_per_s']:,.0f}")
        print(f"  ack rtt p50 / p99   {r['ack_rtt_p50_ms']:.2f} / {r['ack_rtt_p99_ms']:.2f} ms")
        print(f"  daemon CPU          {f(r['daemon_cpu_pct'], '.0f')} %")
        print(
            f"  daemon RSS end/peak {f(r['daemon_rss_mb'], '.1f')} / {f(r['daemon_rss_peak_mb'], '.1f')} MB"
        )
        print(f"  generator CPU       {r['generator_cpu_pct']:.0f} % over {r['generator_procs']} processes")
        print(
            f"  bad sums {r['bad_sums']}, error frames {r['error_frames']}, "
            f"connections closed by daemon {r['closed_by_daemon']}"
        )
    else:
        print(f"botlink idle: {r['connections']} hello'd connections opened in {r['open_s']:.1f} s")
        print(
            f"  daemon RSS {f(r['daemon_rss_before_mb'], '.1f')} -> {f(r['daemon_rss_after_mb'], '.1f')} MB, "
            f"{f(r['rss_per_connection_kb'], '.2f')} KB per connection"
        )


def run_one(args: argparse.Namespace, run: Any, mode: str, extra: dict[str, str]) -> dict[str, Any]:
    """One run against a daemon started with store ``mode`` (or the running one at --host)."""
    daemon: Daemon | None = None
    spy: subprocess.Popen[bytes] | None = None
    if args.host is None:
        daemon = Daemon(store=mode != "off", idle_timeout=600.0, extra_env=extra)
        host, port, pid = "127.0.0.1", daemon.port, daemon.pid
        print(f"started robonet (pid {pid}) on 127.0.0.1:{port}, store {mode}, state in {daemon.dir}")
    else:
        host, port, pid = args.host, args.port, args.pid
    if args.profile and pid:
        out = Path(args.profile) / f"store-{mode}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        spy = subprocess.Popen(
            [spy_bin, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", "200", "--threads",
             "-d", str(int(args.warmup + args.duration))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        result: dict[str, Any] = run(args, host, port, ProcStats(pid))
    finally:
        if spy is not None:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
        if daemon is not None:
            daemon.stop(keep=args.keep)
    result["store"] = mode
    print_result(result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="use a running daemon at this address (default: start one)")
    p.add_argument("--port", type=int, help="its bot-link port")
    p.add_argument("--pid", type=int, help="the running daemon's pid, to report its CPU and RSS")
    p.add_argument("--connections", type=int, default=100, help="connections (default 100)")
    p.add_argument("--window", type=int, default=32, help="un-acked messages per connection (default 32)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    p.add_argument("--payload", type=int, default=190, help="telemetry payload bytes (default 190)")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument(
        "--store",
        default="on",
        help="daemon's telemetry store: on, off, sqlite, postgresql, or a comma list run one after the"
        " other in this invocation (e.g. 'off,on' or 'sqlite,postgresql'); default on (= sqlite)",
    )
    p.add_argument("--dsn", default="", help="store.dsn for --store postgresql (default: start one)")
    p.add_argument("--profile", default="", help="py-spy record each daemon into this directory")
    p.add_argument("--idle", type=int, default=0, help="S3: open this many idle connections instead")
    p.add_argument(
        "--reference",
        action="store_true",
        help="also run the same load against a bare Twisted relay and print the ratio",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    p.add_argument("--keep", action="store_true", help="keep the daemon's temp dir (log, database)")
    args = p.parse_args(argv)
    if (args.host is None) != (args.port is None):
        p.error("--host and --port go together")
    raise_fd_limit()
    run = run_idle if args.idle else run_ingest
    modes = [m.strip() for m in args.store.split(",") if m.strip()]
    for m in modes:
        if m not in ("on", "off", "sqlite", "postgresql"):
            p.error(f"--store: unknown mode {m!r}")
    results = []
    pg = None
    try:
        for mode in modes:
            args.store = mode
            extra: dict[str, str] = {}
            if mode == "postgresql":
                dsn = args.dsn
                if not dsn:
                    if pg is None:
                        sys.path.insert(0, str(REPO))
                        from tests.pg import PostgresServer

                        pg = PostgresServer.start_new(Path(tempfile.mkdtemp(prefix="robonet-bench-pg-")))
                    dsn = pg.fresh_database()
                extra = {"ROBONET_STORE_BACKEND": "postgresql", "ROBONET_STORE_DSN": dsn}
            results.append(run_one(args, run, mode, extra))
    finally:
        if pg is not None:
            pg.stop()
    result = results[-1]
    if len(results) > 1 and not args.idle:
        base = results[0]
        for r in results[1:]:
            if base.get("acked_msgs_per_s") and r.get("acked_msgs_per_s"):
                r["ratio_to_first"] = r["acked_msgs_per_s"] / base["acked_msgs_per_s"]
                print(
                    f"store {r['store']} / store {base['store']} acked msgs/s: {r['ratio_to_first']:.2f}"
                    " (same invocation)"
                )
    if args.reference:
        ref = Reference()
        print(f"reference: bare Twisted relay (pid {ref.pid}) on 127.0.0.1:{ref.port}")
        try:
            ref_result = run(args, "127.0.0.1", ref.port, ProcStats(ref.pid))
        finally:
            ref.stop()
        ref_result["store"] = "n/a"
        print_result(ref_result)
        key = "rss_per_connection_kb" if args.idle else "acked_msgs_per_s"
        for r in results:
            if r.get(key) and ref_result.get(key):
                r["ratio_to_reference"] = r[key] / ref_result[key]
                print(f"robonet (store {r['store']}) / reference {key}: {r['ratio_to_reference']:.2f}")
        result["reference"] = ref_result
    if args.json:
        for r in results[:-1]:
            print(json.dumps(r))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
