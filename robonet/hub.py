"""The hub: one router for every face (ARCHITECTURE.md, "The hub: one message model for every face").

Faces decode their dialects into :class:`~robonet.model.Message` objects and call the hub:

- :meth:`Hub.connect` / :meth:`Hub.disconnect` when a device comes and goes;
- :meth:`Hub.ingest` for a device's data (latest values, callbacks, store, fan-out);
- :meth:`Hub.command` for commands to one robot or to all robots, on whatever face each is;
- :meth:`Hub.request` for endpoints (built-ins ping, echo, status, info, devices, stats, peer_list).

Subscribers (dashboards, peer links) get :class:`~robonet.model.Event` objects through
:meth:`Hub.subscribe`; each owns a bounded queue (robonet.fanout), so fan-out never blocks.
The hub counts what passes through it (ingest, command, request); faces count the rest of their
traffic (acks, pings, hello) and their bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import robonet
from robonet.config import Config
from robonet.model import (
    BULK_DATA_TYPES,
    CONTROL_DATA_TYPES,
    Command,
    Event,
    HubError,
    Message,
    Priority,
    Subscriber,
    iso_utc,
)
from robonet.node import NodeIdentity
from robonet.registry import Device, Registry
from robonet.stats import Stats

if TYPE_CHECKING:
    from robonet.interfaces import Batch, PeerAcceptor, PeerDirectory, PeerService, Store
    from robonet.model import Link

Callback = Callable[[Message, Device], object]
Endpoint = Callable[[Any, str], Any]

# `set` from the newer original page: {"type":"set","name":"speed"|"brightness","value":N}.
_SET_NAMES = {"speed": "set_speed", "brightness": "set_brightness"}
STATS_LOG_INTERVAL = 60.0


class _FailedBatch:
    """A store batch that has already failed (the store stopped): waiters get ``internal`` at once."""

    size = 0

    def when_committed(self, ok: Callable[..., object], failed: Callable[..., object], *args: Any) -> None:
        failed(Failure(HubError("internal", "telemetry store is not running")), *args)


_STORE_STOPPED = _FailedBatch()


def _priority(mtype: str) -> Priority:
    if mtype in BULK_DATA_TYPES:
        return Priority.BULK
    if mtype in CONTROL_DATA_TYPES:
        return Priority.CONTROL
    return Priority.LATEST


class Hub(Service):
    """Registry + router, shared by every face. A Service: it logs stats every minute while running.

    ``config`` is the validated :class:`~robonet.config.Config`; ``clock`` an IReactorTime (all hub
    time comes from it); ``store`` an optional TelemetryStore (``append(...) -> Batch``); ``node``
    this hub's :class:`~robonet.node.NodeIdentity` (a throwaway one when None, for tests).
    """

    log = Logger()
    name = "hub"

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        store: Store | None = None,
        node: NodeIdentity | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.node = node or NodeIdentity(
            str(uuid.uuid4()), config.hub.name, config.hub.project_id, "", robonet.__version__
        )
        self.registry = Registry()
        self.stats = Stats(clock.seconds())
        self.commands = frozenset(config.hub.commands)
        self.faces: dict[str, list[str]] = {}
        self.peers: PeerDirectory | None = None  # the PeerService, while attached (attach_peers)
        self.peer_acceptor: PeerAcceptor | None = None  # accepts inbound role=peer hellos on the bot link
        self.auth: Any = None  # robonet.auth.Auth; None: no authorization (tests, open mode)
        self.audit: Any = None  # robonet.audit.AuditLog; None: commands are not audited
        self.leases: Any = None  # robonet.lease.Leases; None: no control lease
        self._publish_ok: dict[tuple[int, str], Any] = {}  # (id(identity), device_id) -> identity
        self.mqtt: Any = None  # the MqttBridge, when [mqtt] is enabled (its stats() feed /metrics)
        self._callbacks: dict[str, list[Callback]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._subscribers: list[Subscriber] = []
        self._command_observers: list[tuple[Any, Any]] = []
        self._stats_loop: task.LoopingCall | None = None
        self.stats_interval = STATS_LOG_INTERVAL
        self.registry.observe(self._on_registry_event)
        for ep_name, fn in (
            ("ping", self._ep_ping),
            ("echo", self._ep_echo),
            ("status", self._ep_status),
            ("info", self._ep_info),
            ("devices", self._ep_devices),
            ("stats", self._ep_stats),
            ("peer_list", self._ep_peer_list),
        ):
            self.register_endpoint(ep_name, fn)

    # -- service --

    def startService(self) -> None:
        """Start the stats log line (every ``stats_interval`` s, default 60)."""
        super().startService()
        self._stats_loop = task.LoopingCall(self._log_stats)
        self._stats_loop.clock = self.clock
        self._stats_loop.start(self.stats_interval, now=False)

    def stopService(self) -> defer.Deferred[None] | None:
        """Stop the stats loop."""
        if self._stats_loop is not None and self._stats_loop.running:
            self._stats_loop.stop()
        return super().stopService()  # type: ignore[no-any-return]

    def now(self) -> float:
        """Hub time, Unix seconds."""
        return self.clock.seconds()

    # -- registration --

    def register_callback(self, mtype: str, fn: Callback) -> None:
        """Call ``fn(message, device)`` for every ingested message of type ``mtype`` (seed 000)."""
        self._callbacks.setdefault(mtype, []).append(fn)

    def register_endpoint(self, name: str, fn: Endpoint) -> None:
        """Serve request endpoint ``name`` with ``fn(data, origin_device_id) -> value | Deferred``."""
        self._endpoints[name] = fn

    def has_endpoint(self, name: str) -> bool:
        """Whether endpoint ``name`` is registered (O(1))."""
        return name in self._endpoints

    @property
    def endpoints(self) -> list[str]:
        """Names of all registered endpoints."""
        return sorted(self._endpoints)

    def subscribe(self, sub: Subscriber) -> None:
        """Start offering every fan-out Event to ``sub``."""
        if sub not in self._subscribers:
            self._subscribers.append(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        """Stop offering events to ``sub``."""
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    @property
    def subscriber_count(self) -> int:
        """Number of fan-out subscribers."""
        return len(self._subscribers)

    # -- devices --

    def connect(
        self,
        link: Link | None,
        device_id: str,
        *,
        face: str,
        role: str,
        address: str,
        name: str = "",
        hub_id: str = "",
        dialect: str = "",
        identity: Any = None,
    ) -> Device:
        """Register ``device_id`` as online on ``link``; an older link with that id gets ``replaced``.

        With an ``identity`` (robonet.auth.Identity) and auth on, a ``robot`` must be allowed to
        publish as ``device_id``; else raises robonet.auth.Forbidden before anything changes.
        """
        if identity is not None and role == "robot":
            self.authorize(identity, "publish", device_id, face=face)
        dev, replaced = self.registry.connect(
            device_id,
            face=face,
            role=role,
            address=address,
            link=link,
            now=self.now(),
            name=name,
            hub=hub_id,
            dialect=dialect,
        )
        if replaced is not None:
            self.stats.error("replaced")
            self.log.info("device {device_id}: older connection replaced", device_id=device_id)
            replaced.close_link("replaced", f"replaced by a newer connection for {device_id}")
        return dev

    def disconnect(self, link: Link | None, device_id: str, status: str = "offline") -> None:
        """Mark ``device_id`` offline if ``link`` is still its current connection."""
        self.registry.disconnect(device_id, link, self.now(), status)
        if self.leases is not None:
            self.release_control(device_id)

    # -- authorization (robonet/auth.py; docs/security.rst) --

    def authorize(
        self, identity: Any, action: str, target: str = "", mtype: str = "", face: str = ""
    ) -> None:
        """The one authorization hook: allow, or raise robonet.auth.Forbidden (counted, logged).

        A no-op when ``identity`` is None or no auth core is attached.
        """
        if identity is None or self.auth is None:
            return
        try:
            self.auth.check(identity, action, target, mtype, face)
        except HubError as e:
            self.stats.error(e.code)
            raise

    def release_control(self, holder: str) -> list[str]:
        """``holder`` (a dashboard or client connection key) went away: drop its control leases and
        send each of those robots a ``stop`` (origin ``lease``). Returns the robots' ids."""
        if self.leases is None:
            return []
        robots = self.leases.release_holder(holder)
        for robot in robots:
            d = self.command({"type": "stop"}, "lease", robot)
            d.addErrback(lambda _f: None)  # the robot may be gone too
        return list(robots)

    def take_control(self, device_id: str, holder: str, identity: Any, face: str = "web") -> dict[str, Any]:
        """Take the control lease of ``device_id`` explicitly (the former holder is notified);
        requires the command right on that robot. Returns the new lease as a dict."""
        self.authorize(identity, "command", device_id, "stop", face=face)
        name = getattr(identity, "name", holder)
        if self.leases is None:
            return {"device_id": device_id, "holder": holder, "holder_name": name}
        old = self.leases.take(device_id, holder, name, self.now())
        if self.audit is not None:
            self.audit.record(
                self.now(),
                identity,
                face=face,
                action="lease_take",
                target=device_id,
                outcome="ok" if old is None else f"ok: taken from {old.holder_name}",
            )
        return dict(self.leases.holder(device_id).as_dict())

    def rename(self, device: Device, name: str) -> None:
        """Set ``device``'s display name (cut to 128 characters); observers get ``device_update``.

        Nothing happens when the name is unchanged, so a face may call it for every message that
        carries a name (e.g. a staircase robot's ``device_name``).
        """
        name = name[:128]
        if device.name != name:
            device.name = name
            self.registry.update(device)

    def _on_registry_event(self, event: str, dev: Device) -> None:
        if dev.hub == "":
            if event == "device_up":
                self.log.info(
                    "device {device_id} up on {face} as {role} from {address}",
                    device_id=dev.device_id,
                    face=dev.face,
                    role=dev.role,
                    address=dev.address,
                )
            elif event == "device_down":
                self.log.info("device {device_id} down ({face})", device_id=dev.device_id, face=dev.face)
        if self._subscribers:
            ev = Event(
                "status",
                dev.device_id,
                event,
                dev.as_dict(latest=False),
                self.now(),
                Priority.CONTROL,
                dev.hub,
                dev.name,
            )
            for sub in list(self._subscribers):
                sub.offer(ev)

    def touch(self, device: Device, now: float) -> None:
        """``device`` showed activity without data (e.g. a Cartobot poll): its last_seen moves to ``now``."""
        device.last_activity = max(device.last_activity, now)

    # -- data --

    def ingest(self, device: Device, msg: Message, identity: Any = None) -> Batch | None:
        """Take one data message from ``device``: the hot path, O(1) per subscriber.

        Updates the device's latest values, counts it, runs the type's callbacks, appends it to the
        store (all but bulk types such as video_frame) and offers it to every subscriber. Returns the
        store's Batch (ack the sender only once ``batch.when_committed`` fires) or None when there is
        nothing to wait for. With an ``identity`` it must be allowed to publish as the device
        (checked once per identity and device, then a dict lookup); raises Forbidden otherwise.
        """
        if identity is not None and self.auth is not None:
            key = (id(identity), device.device_id)
            if self._publish_ok.get(key) is not identity:
                self.authorize(identity, "publish", device.device_id, face=device.face)
                if len(self._publish_ok) > 65536:
                    self._publish_ok.clear()
                self._publish_ok[key] = identity
        mtype = msg.type
        body = msg.body
        at = msg.received_at
        device.latest[mtype] = body
        device.latest_at[mtype] = at
        device.last_activity = at
        device.msgs_in += 1
        m = self.stats.msgs_in
        m[mtype] = m.get(mtype, 0) + 1
        cbs = self._callbacks.get(mtype)
        if cbs is not None:
            for fn in cbs:
                try:
                    fn(msg, device)
                except Exception:
                    self.stats.error("internal")
                    self.log.failure("callback for {mtype} failed", mtype=mtype)
        batch: Batch | None = None
        if self.store is not None and mtype not in BULK_DATA_TYPES:
            try:
                batch = self.store.append(device.device_id, mtype, at, body, msg.raw)
            except RuntimeError:  # the store has stopped (shutdown): never ack what was not stored
                batch = _STORE_STOPPED
        subs = self._subscribers
        if subs:
            ev = Event("data", device.device_id, mtype, body, at, _priority(mtype), device.hub, device.name)
            for sub in subs:
                sub.offer(ev)
        return batch

    def publish_local(
        self, device_id: str, mtype: str, body: dict[str, Any], *, face: str, role: str
    ) -> None:
        """Ingest data from an in-process source (e.g. the camera service) as device ``device_id``."""
        dev = self.registry.get(device_id)
        if dev is None or not dev.online:
            dev = self.connect(None, device_id, face=face, role=role, address="local")
        body = dict(body)
        body["type"] = mtype
        self.ingest(dev, Message(mtype, body, device_id, self.now()))

    # -- commands --

    def observe_commands(
        self,
        on_command: Callable[[str, str | None, dict[str, Any]], object],
        on_outcome: Callable[[str, str | None, dict[str, Any], Any], object] | None = None,
    ) -> None:
        """Watch every :meth:`command` (the MCAP recorder): ``on_command(origin, target, body)`` when
        it is routed, ``on_outcome(origin, target, body, result)`` when its Deferred fires
        (``result``: the device id list, or the Failure). Observers must not block or raise."""
        self._command_observers.append((on_command, on_outcome))

    def command(
        self,
        body: dict[str, Any],
        origin: str,
        target: str | None = None,
        identity: Any = None,
        face: str = "",
        address: str = "",
    ) -> defer.Deferred[list[str]]:
        """Route a command (see :meth:`_checked_command`), telling the command observers."""
        observers = self._command_observers
        if not observers:
            return self._checked_command(body, origin, target, identity, face, address)
        for on_command, _ in observers:
            try:
                on_command(origin, target, body)
            except Exception:
                self.log.failure("command observer failed")
        d = self._checked_command(body, origin, target, identity, face, address)

        def settled(result: Any) -> Any:
            for _, on_outcome in observers:
                if on_outcome is not None:
                    try:
                        on_outcome(origin, target, body, result)
                    except Exception:
                        self.log.failure("command outcome observer failed")
            return result

        return d.addBoth(settled)

    def _checked_command(
        self,
        body: dict[str, Any],
        origin: str,
        target: str | None = None,
        identity: Any = None,
        face: str = "",
        address: str = "",
    ) -> defer.Deferred[list[str]]:
        """Route a command to robot ``target`` (or to every online robot when None).

        ``body`` is ``{"type": T, ...fields}``; ``set`` {name, value} becomes set_speed/set_brightness.
        Fires with the device ids that took it (acked, or queued for legacy bots); fails with
        HubError ``unknown_command`` (T not in ``hub.commands``), ``device_offline`` (unknown or
        offline target) or the link's error (``delivery_timeout``, ...). A broadcast fails only if
        every robot failed; with no robot online it fires with ``[]``.

        With an ``identity`` (robonet.auth.Identity) the command is authorized first (Forbidden:
        code ``forbidden``), and a dashboard's command (``face`` web) must hold the robot's control
        lease (taken implicitly when free; reason ``lease_held`` otherwise; a stop always passes).
        Every command is recorded in the audit log when one is attached.
        """
        try:
            cmd_type, fields = self._normalise(body)
        except HubError as e:
            self.stats.error(e.code)
            return defer.fail(e)
        audit = self.audit
        if identity is None and audit is None:
            return self._route_command(cmd_type, fields, origin, target)
        try:
            self._authorize_command(identity, origin, target, cmd_type, face)
        except HubError as e:
            if audit is not None:
                reason = getattr(e, "reason", e.code)
                self._audit_command(identity, origin, face, address, target, cmd_type, f"denied:{reason}")
            return defer.fail(e)
        d = self._route_command(cmd_type, fields, origin, target)
        if audit is None:
            return d

        def done(result: Any) -> Any:
            outcome = "ok"
            if isinstance(result, Failure):
                err = result.value
                outcome = "error:" + (err.code if isinstance(err, HubError) else "internal")
            self._audit_command(identity, origin, face, address, target, cmd_type, outcome)
            return result

        return d.addBoth(done)

    def _authorize_command(
        self, identity: Any, origin: str, target: str | None, cmd_type: str, face: str
    ) -> None:
        if identity is None or self.auth is None:
            return
        self.authorize(identity, "command", target or "*", cmd_type, face=face)
        if self.leases is not None and face == "web" and target and cmd_type != "stop":
            from robonet.lease import LeaseHeld

            try:
                self.leases.check(target, origin, identity.name, self.now())
            except LeaseHeld as e:
                self.stats.error("forbidden")
                self.auth.authorizer.deny(identity, "lease_held", face, str(e))

    def _audit_command(
        self,
        identity: Any,
        origin: str,
        face: str,
        address: str,
        target: str | None,
        cmd_type: str,
        outcome: str,
    ) -> None:
        who = identity
        if who is None:
            from robonet.auth import Identity

            who = Identity(origin, "", frozenset(), source="unknown")
        self.audit.record(
            self.now(),
            who,
            face=face,
            address=address,
            action="command",
            target=target or "*",
            mtype=cmd_type,
            outcome=outcome,
        )

    def _route_command(
        self, cmd_type: str, fields: dict[str, Any], origin: str, target: str | None
    ) -> defer.Deferred[list[str]]:
        m = self.stats.msgs_in
        m[cmd_type] = m.get(cmd_type, 0) + 1
        if target is not None:
            dev = self.registry.get(target)
            if dev is None or not dev.online or dev.link is None:
                self.stats.error("device_offline")
                return defer.fail(HubError("device_offline", f"device {target} is not connected"))
            targets = [dev]
        else:
            targets = [
                d for d in self.registry.online("robot") if d.link is not None and d.device_id != origin
            ]
        if not targets:
            return defer.succeed([])
        results: list[defer.Deferred[Any]] = []
        for dev in targets:
            results.append(self._deliver(dev, cmd_type, fields, origin))
        if len(results) == 1:
            return results[0].addCallback(lambda _: [targets[0].device_id])

        def gather(outcomes: list[tuple[bool, Any]]) -> list[str] | Failure:
            reached = [d.device_id for d, (ok, _) in zip(targets, outcomes, strict=True) if ok]
            if not reached:
                return outcomes[0][1]  # type: ignore[no-any-return]
            return reached

        return defer.DeferredList(results, consumeErrors=True).addCallback(gather)  # type: ignore[arg-type]

    def _normalise(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        cmd_type = body.get("type")
        if not isinstance(cmd_type, str):
            raise HubError("missing_type", "command has no type")
        fields = {k: v for k, v in body.items() if k not in ("id", "ref", "token", "ts")}
        if cmd_type == "set":
            new = _SET_NAMES.get(str(body.get("name")))
            if new is None:
                raise HubError("unknown_command", f"unknown setting {body.get('name')!r}")
            cmd_type = new
            fields = {"type": new, "value": body.get("value")}
            if "device_id" in body:
                fields["device_id"] = body["device_id"]
        if cmd_type not in self.commands:
            raise HubError("unknown_command", f"unknown command {cmd_type!r}")
        fields["type"] = cmd_type
        fields["timestamp"] = iso_utc(self.now())
        return cmd_type, fields

    def _deliver(
        self, dev: Device, cmd_type: str, fields: dict[str, Any], origin: str
    ) -> defer.Deferred[Any]:
        link = dev.link
        assert link is not None
        sent_at = self.now()
        try:
            d = link.deliver(Command(cmd_type, fields, origin, dev.device_id))
        except HubError as e:
            self.stats.error(e.code)
            return defer.fail(e)
        except Exception:
            self.stats.error("internal")
            self.log.failure(
                "delivering {cmd_type} to {device_id} failed", cmd_type=cmd_type, device_id=dev.device_id
            )
            return defer.fail(HubError("internal", "delivery failed"))
        dev.msgs_out += 1
        o = self.stats.msgs_out
        o[cmd_type] = o.get(cmd_type, 0) + 1
        if d is None:
            return defer.succeed(None)

        def acked(result: Any) -> Any:
            self.stats.ack_rtt.add(self.now() - sent_at)
            return result

        def failed(f: Failure) -> Failure:
            code = f.value.code if isinstance(f.value, HubError) else "internal"
            self.stats.error(code)
            return f

        return d.addCallbacks(acked, failed)

    # -- requests --

    def request(
        self, endpoint: str, data: Any, origin: str, identity: Any = None, face: str = ""
    ) -> defer.Deferred[Any]:
        """Call endpoint ``endpoint`` with ``data``; fails with HubError ``unknown_endpoint``.

        A handler exception becomes HubError ``internal`` carrying the exception's text (logged).
        With an ``identity`` it must hold the request right (or read, for the read-only built-ins).
        """
        if identity is not None:
            try:
                self.authorize(identity, "request", endpoint, endpoint, face=face)
            except HubError as e:
                return defer.fail(e)
        m = self.stats.msgs_in
        m["request"] = m.get("request", 0) + 1
        fn = self._endpoints.get(endpoint)
        if fn is None:
            self.stats.error("unknown_endpoint")
            return defer.fail(HubError("unknown_endpoint", f"Unknown endpoint: {endpoint}"))

        def crashed(f: Failure) -> Failure:
            if isinstance(f.value, HubError):
                return f
            self.stats.error("internal")
            self.log.failure("endpoint {endpoint} failed", f, endpoint=endpoint)
            return Failure(HubError("internal", f"{type(f.value).__name__}: {f.value}"))

        return defer.maybeDeferred(fn, data, origin).addErrback(crashed)

    # -- peers (delegated to the PeerService when federation runs) --

    def attach_peers(self, service: PeerService) -> None:
        """Delegate peer_list and peer messages to ``service``; its ``acceptor`` (None: refuse)
        takes inbound ``role: "peer"`` hellos on the bot link. Called by the PeerService on start."""
        self.peers = service
        self.peer_acceptor = service.acceptor

    def detach_peers(self, service: PeerService) -> None:
        """Undo :meth:`attach_peers` if ``service`` is still the attached one (it is stopping)."""
        if self.peers is service:
            self.peers = None
            self.peer_acceptor = None

    def broadcast_to_peers(self, body: Any) -> int:
        """Send ``{"type":"peer_message","from":node_id,"data":body}`` to every linked peer; returns count."""
        if self.peers is None:
            return 0
        return int(self.peers.broadcast_to_peers(body))

    def send_to_peer(self, node_id: str, body: Any) -> bool:
        """Send a peer_message to one peer; False if that peer is not linked."""
        if self.peers is None:
            return False
        return bool(self.peers.send_to_peer(node_id, body))

    # -- built-in endpoints --

    def _ep_ping(self, data: Any, origin: str) -> dict[str, Any]:
        return {"pong": True, "server_time": iso_utc(self.now())}

    def _ep_echo(self, data: Any, origin: str) -> Any:
        return data

    def _ep_status(self, data: Any, origin: str) -> dict[str, Any]:
        online = self.registry.online()
        return {
            "server_id": self.node.node_id,
            "name": self.node.name,
            "version": self.node.version,
            "project_id": self.node.project_id,
            "uptime": round(self.now() - self.stats.started_at, 3),
            "devices_online": len(online),
            "robots_online": sum(1 for d in online if d.role == "robot"),
            "client_count": sum(self.stats.connections.values()),
        }

    def _ep_info(self, data: Any, origin: str) -> dict[str, Any]:
        return {
            "server_id": self.node.node_id,
            "name": self.node.name,
            "version": self.node.version,
            "proto": robonet.PROTO_VERSION,
            "project_id": self.node.project_id,
            "hash": self.node.hash,
            "protocols": ["robonet/1", f"PROJECT:{self.node.project_id}"],
            "endpoints": self.endpoints,
            "commands": sorted(self.commands),
            "faces": self.faces,
        }

    def _ep_devices(self, data: Any, origin: str) -> dict[str, Any]:
        want_role = data.get("role") if isinstance(data, dict) else None
        only_online = bool(data.get("online")) if isinstance(data, dict) else False
        devices = [
            d.as_dict()
            for d in self.registry.devices()
            if (want_role is None or d.role == want_role) and (d.online or not only_online)
        ]
        return {"devices": devices, "count": len(devices)}

    def device_counts(self) -> dict[str, Any]:
        """Online devices by face and by role, and the total."""
        by_face: dict[str, int] = {}
        by_role: dict[str, int] = {}
        online = self.registry.online()
        for d in online:
            by_face[d.face] = by_face.get(d.face, 0) + 1
            by_role[d.role] = by_role.get(d.role, 0) + 1
        return {"online": len(online), "known": len(self.registry), "by_face": by_face, "by_role": by_role}

    def _ep_stats(self, data: Any, origin: str) -> dict[str, Any]:
        snap = self.stats.snapshot(self.now())
        snap["node"] = {"node_id": self.node.node_id, "name": self.node.name, "version": self.node.version}
        snap["devices"] = self.device_counts()
        snap["subscribers"] = len(self._subscribers)
        if self.store is not None and hasattr(self.store, "stats"):
            snap["store"] = self.store.stats()
        if self.mqtt is not None:
            snap["mqtt"] = self.mqtt.stats()
        return snap

    def _ep_peer_list(self, data: Any, origin: str) -> Any:
        if self.peers is None:
            return {"peers": []}
        return self.peers.peer_list()

    def _log_stats(self) -> None:
        s = self.stats
        counts = self.device_counts()
        self.log.info(
            "stats: {online} devices online {by_face}, {msgs_in} msgs in {by_type}, {msgs_out} out, "
            "{errors} errors, ack p50 {p50} ms p99 {p99} ms",
            online=counts["online"],
            by_face=counts["by_face"],
            msgs_in=sum(s.msgs_in.values()),
            by_type=dict(sorted(s.msgs_in.items(), key=lambda kv: -kv[1])[:6]),
            msgs_out=sum(s.msgs_out.values()),
            errors=sum(s.errors.values()),
            p50=s.ack_delay.summary()["p50_ms"],
            p99=s.ack_delay.summary()["p99_ms"],
            stats=s.snapshot(self.now()),
        )
