"""``robonet-replay FILE.mcap``: re-enact recorded robots against a hub's bot link (issue 10 item 4).

Every device with data messages in the recording (channels of kind ``data``, ``/<device_id>/<type>``)
becomes one native robonet/1 connection (role ``robot``, same ``device_id``) made with the Twisted
client (robonet.client.tx), and sends its messages again with their original spacing divided by
``--speed`` (0 = as fast as acks allow). Each message is sent with an ``id`` and must be acked by
the hub. A recorded ``device_down`` closes that connection once its acks are in (the next data
opens a new one); a recorded ``device_up`` of a robot connects it even before it sends data.
Commands and their outcomes in the file are not replayed (the hub's dashboards produced them).

The file is read twice, streaming, never whole into memory: once up front to check it (a corrupt or
truncated file is refused with one clear line, exit status 2, unless ``--partial`` replays the
complete chunks of a truncated one), then while replaying. docs/recording.rst has the details.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet import mcapio
from robonet.client.botclient import hello_message
from robonet.client.tx import BotLinkClientProtocol

BURST = 500  # messages sent in one reactor turn before yielding
STRIP = ("id", "ref", "device_id", "token")  # per-connection keys the new connection chooses itself


class ReplayError(Exception):
    """The recording cannot be replayed (``str()`` is one line)."""


@attrs.define
class Summary:
    """What a recording holds for replay: ``devices`` (data counts per type per device),
    ``messages`` (data messages), ``first``/``last`` log times (ns), ``truncated`` (an error text)."""

    devices: dict[str, dict[str, int]] = attrs.Factory(dict)
    messages: int = 0
    first: int = 0
    last: int = 0
    truncated: str = ""


def device_filter(pattern: str | None) -> Any:
    """``"robot_*,bot-10.*"`` -> predicate on device ids (fnmatch globs, comma-separated); None = all."""
    if not pattern:
        return lambda device_id: True
    globs = [p.strip() for p in pattern.split(",") if p.strip()]
    return lambda device_id: any(fnmatch.fnmatchcase(device_id, g) for g in globs)


def _open(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as e:
        raise ReplayError(f"cannot open {path}: {e.strerror}") from None


def scan(path: str, wanted: Any = None, partial: bool = False) -> Summary:
    """Check the recording at ``path`` and summarise its data messages.

    Raises :class:`ReplayError` for an unreadable file, a corrupt one, or a truncated one unless
    ``partial`` (then ``truncated`` says where it ends).
    """
    wanted = wanted or device_filter(None)
    out = Summary()
    with _open(path) as f:
        try:
            for rec in mcapio.iter_recording(f):
                if rec.kind != "data" or not wanted(rec.device_id):
                    continue
                per = out.devices.setdefault(rec.device_id, {})
                per[rec.type] = per.get(rec.type, 0) + 1
                if not out.messages:
                    out.first = rec.log_time
                out.messages += 1
                out.last = max(out.last, rec.log_time)
        except mcapio.TruncatedRecording as e:
            if not partial:
                raise ReplayError(f"{path}: {e} (use --partial to replay the complete part)") from None
            out.truncated = str(e)
        except mcapio.BadRecording as e:
            raise ReplayError(f"{path}: not a readable MCAP recording: {e}") from None
    return out


class _Robot:
    """One replayed device's connection: sends once welcomed, closes after its acks when asked."""

    def __init__(self, replayer: Replayer, device_id: str) -> None:
        self.replayer = replayer
        self.device_id = device_id
        self.proto: BotLinkClientProtocol | None = None
        self.ready = False
        self.failed = False
        self.backlog: list[dict[str, Any]] = []
        self.outstanding = 0
        self.closing = False
        self.idle: defer.Deferred[None] | None = None

    def connect(self) -> None:
        r = self.replayer
        proto = BotLinkClientProtocol(
            hello_message("robot", self.device_id, self.device_id, r.token),
            clock=r.reactor,
            ack_timeout=r.ack_timeout,
        )
        self.proto = proto
        endpoint = TCP4ClientEndpoint(r.reactor, r.host, r.port, timeout=10)
        d = connectProtocol(endpoint, proto)
        d.addCallback(lambda _: proto.whenWelcomed())
        d.addCallbacks(self._welcomed, self._connect_failed)

    def _welcomed(self, _: object) -> None:
        self.ready = True
        backlog, self.backlog = self.backlog, []
        for body in backlog:
            self.send(body)
        self._maybe_close()

    def _connect_failed(self, failure: Failure) -> None:
        self.failed = True
        self.replayer.connect_failed(self, failure)
        lost, self.backlog = len(self.backlog), []
        self.replayer.unacked += lost
        self._settle()

    def send(self, body: dict[str, Any]) -> None:
        if self.failed:
            self.replayer.unacked += 1
            return
        if not self.ready:
            self.backlog.append(body)
            return
        assert self.proto is not None
        self.outstanding += 1
        self.proto.send(body, ack=True).addCallbacks(self._acked, self._not_acked, errbackArgs=(body,))

    def _acked(self, _: object) -> None:
        self.outstanding -= 1
        self.replayer.acked += 1
        self._maybe_close()

    def _not_acked(self, failure: Failure, body: dict[str, Any]) -> None:
        self.outstanding -= 1
        self.replayer.unacked += 1
        self.replayer.log.warn(
            "{device_id}: {type} not acknowledged: {why}",
            device_id=self.device_id,
            type=body.get("type"),
            why=failure.getErrorMessage(),
        )
        self._maybe_close()

    def close(self) -> defer.Deferred[None]:
        """Close once every sent message is acked; the Deferred fires when closed."""
        self.closing = True
        if self.idle is None:
            self.idle = defer.Deferred()
        d: defer.Deferred[None] = defer.Deferred()
        self.idle.addBoth(lambda _: d.callback(None))
        self._maybe_close()
        return d

    def _maybe_close(self) -> None:
        if self.closing and (self.ready or self.failed) and not self.backlog and not self.outstanding:
            if self.proto is not None and self.proto.transport is not None and self.proto.connected_:
                self.proto.transport.loseConnection()
            self._settle()

    def _settle(self) -> None:
        if self.closing and self.idle is not None and not self.idle.called:
            self.idle.callback(None)


class Replayer:
    """Replays one recording at ``path`` against the bot link at ``host``:``port`` (see module doc).

    ``reactor`` provides TCP and time; ``speed`` > 0 divides the recorded spacing (0 = no waits);
    ``wanted`` is a device-id predicate (:func:`device_filter`); ``partial`` accepts a truncated
    file's complete chunks. :meth:`run` returns a Deferred firing with this Replayer when every
    message is sent and acked (or failed) and every connection is closed.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: str,
        host: str,
        port: int,
        *,
        speed: float = 1.0,
        wanted: Any = None,
        partial: bool = False,
        token: str | None = None,
        ack_timeout: float = 10.0,
    ) -> None:
        self.reactor: IReactorTime = reactor
        self.tcp: IReactorTCP = reactor
        self.path = path
        self.host = host
        self.port = port
        self.speed = speed
        self.wanted = wanted or device_filter(None)
        self.partial = partial
        self.token = token
        self.ack_timeout = ack_timeout
        self.robots: dict[str, _Robot] = {}
        self.closing: list[defer.Deferred[None]] = []
        self._leaving: dict[str, defer.Deferred[None]] = {}
        self.sent: dict[str, int] = {}
        self.devices: set[str] = set()
        self.acked = 0
        self.unacked = 0
        self.connect_errors: list[str] = []
        self._done: defer.Deferred[Replayer] | None = None
        self._it: Iterator[mcapio.Recorded] | None = None
        self._file: IO[bytes] | None = None
        self._t0_log = 0
        self._t0 = 0.0

    def run(self) -> defer.Deferred[Replayer]:
        """Replay the file once (see the class docstring)."""
        self._done = defer.Deferred()
        self._file = _open(self.path)
        self._it = mcapio.iter_recording(self._file)
        self._t0_log = -1
        self._t0 = self.reactor.seconds()
        self._step()
        return self._done

    def _step(self) -> None:
        assert self._it is not None
        for _ in range(BURST):
            rec = self._peek()
            if rec is None:
                self._finish()
                return
            if self._t0_log < 0:
                self._t0_log = rec.log_time
            if self.speed > 0:
                due = self._t0 + (rec.log_time - self._t0_log) / 1e9 / self.speed
                wait = due - self.reactor.seconds()
                if wait > 0.0005:
                    self.reactor.callLater(wait, self._step)
                    return
            self._next = None
            self._dispatch(rec)
        self.reactor.callLater(0, self._step)

    _next: mcapio.Recorded | None = None

    def _peek(self) -> mcapio.Recorded | None:
        if self._next is None:
            assert self._it is not None
            try:
                self._next = next(self._it)
            except StopIteration:
                return None
            except mcapio.BadRecording as e:  # checked up front; only --partial gets here
                self.log.warn("recording ends early: {why}", why=str(e))
                return None
        return self._next

    def _dispatch(self, rec: mcapio.Recorded) -> None:
        if rec.kind == "data":
            if not self.wanted(rec.device_id):
                return
            try:
                body = rec.body()
            except ValueError:
                return
            if not isinstance(body, dict):
                return
            for key in STRIP:
                body.pop(key, None)
            body["type"] = rec.type
            self._robot(rec.device_id).send(body)
            self.sent[rec.type] = self.sent.get(rec.type, 0) + 1
        elif rec.kind == "device":
            try:
                ev = rec.body()
            except ValueError:
                return
            device_id = str(ev.get("device_id", ""))
            if not self.wanted(device_id):
                return
            if ev.get("event") == "device_down" and device_id in self.robots:
                self._close(device_id)
            elif ev.get("event") == "device_up" and (ev.get("device") or {}).get("role") == "robot":
                self._robot(device_id)

    def _robot(self, device_id: str) -> _Robot:
        robot = self.robots.get(device_id)
        if robot is None:
            robot = self.robots[device_id] = _Robot(self, device_id)
            self.devices.add(device_id)
            previous = self._leaving.get(device_id)
            if previous is None:
                robot.connect()
            else:  # connecting now would get the old connection "replaced" before its acks arrive
                previous.addCallback(lambda _: robot.connect())
        return robot

    def _close(self, device_id: str) -> None:
        d = self.robots.pop(device_id).close()
        relay: defer.Deferred[None] = defer.Deferred()
        self._leaving[device_id] = relay

        def closed(_: object) -> None:
            if self._leaving.get(device_id) is relay:
                del self._leaving[device_id]
            relay.callback(None)

        d.addCallback(closed)
        self.closing.append(d)

    def connect_failed(self, robot: _Robot, failure: Failure) -> None:
        """A device's connection or hello failed (logged, counted)."""
        why = failure.getErrorMessage()
        self.connect_errors.append(f"{robot.device_id}: {why}")
        self.log.error(
            "{device_id}: cannot connect to {host}:{port}: {why}",
            device_id=robot.device_id,
            host=self.host,
            port=self.port,
            why=why,
        )

    def _finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for device_id in list(self.robots):
            self._close(device_id)
        done = self._done
        defer.DeferredList(self.closing).addCallback(lambda _: done.callback(self) if done else None)


def parse_args(argv: Sequence[str] | None, prog: str = "robonet-replay") -> argparse.Namespace:
    """The ``robonet-replay`` options."""
    p = argparse.ArgumentParser(
        prog=prog, description="Re-enact the robots of an MCAP recording against a robonet hub's bot link."
    )
    p.add_argument("file", metavar="FILE.mcap", help="a recording (robonet's recorder or /api/export)")
    add_replay_options(p)
    args = p.parse_args(argv)
    if args.speed < 0:
        p.error("--speed must be >= 0 (0 = as fast as possible)")
    return args


def add_replay_options(p: argparse.ArgumentParser, host_port: bool = True) -> None:
    """The options robonet-replay shares with ``robonet-sim --from``."""
    if host_port:
        p.add_argument("--host", default="127.0.0.1", help="hub address (default 127.0.0.1)")
        p.add_argument("--port", type=int, default=5100, help="hub bot-link port (default 5100)")
    p.add_argument("--speed", type=float, default=1.0, help="time factor: 2 = twice as fast, 0 = no waits")
    p.add_argument("--loop", action="store_true", help="start over at the end, until interrupted")
    p.add_argument("--devices", default=None, help="only these device ids (globs, comma-separated)")
    p.add_argument("--partial", action="store_true", help="replay the complete part of a truncated file")
    p.add_argument("--token", default=None, help="bot-link token when the hub has auth on")


def replay_main(
    args: argparse.Namespace, stdout: Any = None, stderr: Any = None, prog: str = "robonet-replay"
) -> int:
    """Check the file, then run the replay under the global reactor; returns the exit status.

    0 = everything acked; 1 = the hub refused or lost messages; 2 = unreadable recording.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    wanted = device_filter(args.devices)
    try:
        summary = scan(args.file, wanted, args.partial)
    except ReplayError as e:
        stderr.write(f"{prog}: {e}\n")
        return 2
    if not summary.devices:
        stderr.write(
            f"{prog}: {args.file}: no data messages to replay"
            + (" for --devices" if args.devices else "")
            + "\n"
        )
        return 2
    span = (summary.last - summary.first) / 1e9
    stdout.write(
        f"{prog}: {summary.messages} messages from {len(summary.devices)} devices over {span:.1f} s"
        f" -> {args.host}:{args.port} at speed {args.speed:g}"
        + (f" (truncated: {summary.truncated})" if summary.truncated else "")
        + "\n"
    )
    stdout.flush()
    from twisted.internet import reactor

    status = [0]

    def once() -> None:
        r = Replayer(
            reactor,
            args.file,
            args.host,
            args.port,
            speed=args.speed,
            wanted=wanted,
            partial=args.partial,
            token=args.token,
        )
        r.run().addCallback(finished)

    def finished(r: Replayer) -> None:
        stdout.write(
            f"{prog}: sent {sum(r.sent.values())} ({dict(sorted(r.sent.items()))}), acked {r.acked}, "
            f"not acked {r.unacked}\n"
        )
        stdout.flush()
        if r.connect_errors:
            stderr.write(f"{prog}: cannot connect: {r.connect_errors[0]}\n")
        if r.unacked or r.connect_errors:
            status[0] = 1
        if args.loop and not r.connect_errors:
            reactor.callLater(0, once)  # type: ignore[attr-defined]
        else:
            reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(once)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return status[0]


def main(argv: Sequence[str] | None = None) -> int:
    """``robonet-replay`` entry point."""
    return replay_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
