"""The MQTT bridge (docs/mqtt.rst, issue 9): robonet as an MQTT client of an existing broker.

paho-mqtt 2.x does the MQTT codec; this module drives it from the reactor with paho's external-loop
API: the socket from ``on_socket_open`` is registered with the reactor through a small
IReadDescriptor/IWriteDescriptor (:class:`_PahoSocket`) whose ``doRead``/``doWrite`` call
``loop_read``/``loop_write``; ``on_socket_register_write``/``unregister_write`` add and remove the
writer; a LoopingCall on the injected clock calls ``loop_misc`` (keep-alive) every second. paho's
connect (DNS, TCP connect, TLS handshake) blocks, so it runs off the reactor thread
(``run_blocking``, the reactor's thread pool by default); nothing else touches the client there.

The bridge is a hub :class:`~robonet.model.Subscriber`: local devices' data and statuses go to the
broker; commands from the broker go through :meth:`MqttBridge.route_command` (``hub.command``, as
the web face does); with ``federate`` other hubs' devices become remote devices here
(:class:`MqttRemoteLink`). While the broker is away, a bounded drop-oldest queue
(:class:`DropOldestQueue`) keeps the newest data; reconnects back off on the injected clock.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import orjson
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from robonet.config import Config, MqttConfig
from robonet.model import Command, Event, HubError, Message, Priority
from robonet.protocols import mqtt_topics as mt
from robonet.protocols.websocket import MOTION_COMMANDS, Deadman

# Device roles not announced on the broker (dashboards and peer hubs are not fleet devices).
UNANNOUNCED_ROLES = frozenset(("website", "peer"))
MISC_INTERVAL = 1.0
_CONTROL = Priority.CONTROL
MAX_INFLIGHT = 100
MAX_QUEUED_QOS = 1000


@attrs.frozen
class BrokerAddress:
    """A parsed ``mqtt.broker``: host, port, TLS on/off, optional URL credentials."""

    host: str
    port: int
    tls: bool
    username: str = ""
    password: str = ""


def parse_broker(text: str) -> BrokerAddress:
    """Parse ``tcp:HOST:PORT``, ``ssl:HOST:PORT`` (also ``host=``/``port=`` keywords) or an URL.

    URLs: ``mqtt://[user[:password]@]host[:1883]``, ``mqtts://...[:8883]``. Raises ValueError.
    """
    low = text.lower()
    if low.startswith(("mqtt://", "mqtts://")):
        u = urlsplit(text)
        tls = u.scheme.lower() == "mqtts"
        if not u.hostname:
            raise ValueError(f"no host in {text!r}")
        return BrokerAddress(
            u.hostname,
            u.port or (8883 if tls else 1883),
            tls,
            unquote(u.username or ""),
            unquote(u.password or ""),
        )
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind not in ("tcp", "ssl"):
        raise ValueError(f"unsupported broker endpoint {text!r}")
    host, port = "", 8883 if kind == "ssl" else 1883
    positional: list[str] = []
    for part in rest.split(":"):
        if "=" in part:
            k, _, v = part.partition("=")
            if k == "host":
                host = v
            elif k == "port":
                port = int(v)
        else:
            positional.append(part)
    if positional and positional[0]:
        host = host or positional[0]
    if len(positional) > 1:
        port = int(positional[1])  # ValueError for a missing or non-numeric port
    if not host or not 0 < port < 65536:
        raise ValueError(f"broker endpoint {text!r} needs a host and a port")
    return BrokerAddress(host, port, kind == "ssl")


class DropOldestQueue:
    """A FIFO of ``(topic, payload, qos, retain)`` bounded by payload bytes, dropping the oldest.

    ``max_bytes`` is the budget (topic + payload bytes); ``on_drop(n)`` is told about each drop.
    """

    def __init__(self, max_bytes: int, on_drop: Callable[[int], object] | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0
        self._items: deque[tuple[str, bytes, int, bool]] = deque()
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._items)

    def put(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Append one message; drop the oldest ones while over budget (a lone oversize item too)."""
        self._items.append((topic, payload, qos, retain))
        self.bytes += len(topic) + len(payload)
        dropped = 0
        while self.bytes > self.max_bytes and self._items:
            t, p, _, _ = self._items.popleft()
            self.bytes -= len(t) + len(p)
            dropped += 1
        if dropped:
            self.dropped += dropped
            if self._on_drop is not None:
                self._on_drop(dropped)

    def pop(self) -> tuple[str, bytes, int, bool]:
        """Remove and return the oldest message (IndexError when empty)."""
        item = self._items.popleft()
        self.bytes -= len(item[0]) + len(item[1])
        return item

    def clear(self) -> None:
        """Drop everything without counting (shutdown)."""
        self._items.clear()
        self.bytes = 0


@implementer(IReadDescriptor, IWriteDescriptor)
class _PahoSocket:
    """paho's socket as a reactor descriptor: readable -> ``loop_read``, writable -> ``loop_write``."""

    def __init__(self, bridge: MqttBridge, fd: int) -> None:
        self.bridge = bridge
        self.fd = fd  # kept: paho closes the socket before the reactor forgets it

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.bridge._do_read()

    def doWrite(self) -> None:
        self.bridge._do_write()

    def connectionLost(self, reason: Failure) -> None:
        self.bridge._descriptor_lost(self, reason)

    def logPrefix(self) -> str:
        return "mqtt"


class MqttRemoteLink:
    """The Link of a device owned by hub ``hub_id`` on the broker (``mqtt.federate``).

    ``deliver`` publishes the command on ``<device_id>/cmd/<type>`` with an ``id`` and this hub's
    ``hub``; the Deferred fires on the owner's ``ack`` result, fails with its error code, or with
    ``delivery_timeout`` after ``mqtt.command_timeout``.
    """

    face = "mqtt"

    def __init__(self, bridge: MqttBridge, hub_id: str, device_id: str, face: str) -> None:
        self.bridge = bridge
        self.hub_id = hub_id
        self.device_id = device_id
        self.face = face

    def deliver(self, command: Command) -> defer.Deferred[Any]:
        return self.bridge.send_remote_command(self, command)

    def close_link(self, code: str, message: str) -> None:
        self.bridge._forget_remote(self)


class MqttBridge(Service):
    """The ``[mqtt]`` service. ``client_factory(bridge)`` builds the paho-like client (tests fake it).

    ``run_blocking(fn) -> Deferred`` runs paho's blocking connect off the reactor (default: the
    reactor's thread pool). :meth:`stats` returns connected, messages_out, messages_in, dropped,
    reconnects, queued_bytes, remote_devices.
    """

    log = Logger()
    name = "mqtt"

    def __init__(
        self,
        config: Config,
        hub: Any,
        reactor: Any,
        *,
        client_factory: Callable[[MqttBridge], Any] | None = None,
        run_blocking: Callable[[Callable[[], Any]], defer.Deferred[Any]] | None = None,
    ) -> None:
        self.config: MqttConfig = config.mqtt
        self.teleop_deadman_ms = config.teleop.deadman_ms
        self.hub = hub
        self.reactor = reactor
        self.node_id: str = hub.node.node_id
        self.topics = mt.Topics(self.config.prefix, hub.node.project_id)
        self.broker = parse_broker(self.config.broker)
        self.v5 = self.config.protocol == "5"
        self._client_factory = client_factory or make_paho_client
        self._run_blocking = run_blocking or self._in_thread
        self.client: Any = None
        self.connected = False
        self.connecting = False
        self.stopping = False
        self.messages_out = 0
        self.messages_in = 0
        self.reconnects = 0
        self.queue = DropOldestQueue(self.config.max_queue_bytes, self._queue_dropped)
        self._policy = backoffPolicy(initialDelay=0.5, maxDelay=self.config.reconnect_max, factor=2.0)
        self._attempt = 0
        self._retry: IDelayedCall | None = None
        self._misc: task.LoopingCall | None = None
        self._sock: _PahoSocket | None = None
        self._writing = False
        self._backlog = 0  # bytes handed to paho since its buffer was last empty
        self._latest: dict[tuple[str, str], Event] = {}
        self._control: list[Event] = []
        self._flush_call: IDelayedCall | None = None
        self._interval = self.config.batch_interval
        self._offered = 0
        self._remote: dict[str, MqttRemoteLink] = {}
        self._hub_states: dict[str, str] = {}
        self._pending: dict[str, tuple[defer.Deferred[Any], IDelayedCall]] = {}
        self._next_cmd = 0
        self.conflated = 0
        # the web face's deadman rules, with the broker as the one "website" (origin ``mqtt``)
        self.deadman = Deadman(hub, reactor, self.teleop_deadman_ms)

    # -- service --

    def startService(self) -> None:
        """Subscribe to the hub and start connecting (off the reactor thread)."""
        super().startService()
        self.stopping = False
        self.client = self._client_factory(self)
        self.hub.subscribe(self)
        self._misc = task.LoopingCall(self._loop_misc)
        self._misc.clock = self.reactor
        self._misc.start(MISC_INTERVAL, now=False)
        self.log.info(
            "MQTT bridge: connecting to {host}:{port} (MQTT {protocol}{tls})",
            host=self.broker.host,
            port=self.broker.port,
            protocol=self.config.protocol,
            tls=", TLS" if self.broker.tls else "",
        )
        self._connect()

    def stopService(self) -> defer.Deferred[None] | None:
        """Announce local devices and this hub offline, disconnect cleanly, cancel timers."""
        self.stopping = True
        self.hub.unsubscribe(self)
        for call in (self._retry, self._flush_call):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._flush_call = None
        if self._misc is not None and self._misc.running:
            self._misc.stop()
        self.deadman.stop()
        for req_id in list(self._pending):
            self._resolve(req_id, HubError("delivery_timeout", "MQTT bridge stopped"))
        d: defer.Deferred[None] | None = None
        if self.connected and self.client is not None:
            self._flush()
            for dev in self.hub.registry.devices():
                if self._announced(dev.hub, dev.role) and dev.online:
                    record = dev.as_dict(latest=False)
                    record["status"] = "offline"
                    self._publish_status(dev.device_id, record)
            self._publish(self.topics.hub(self.node_id), b"offline", self.config.status_qos, True)
            self.client.disconnect()
            self._do_write()
        self._drop_socket()
        self.connected = False
        self.queue.clear()
        super().stopService()
        return d

    # -- connection --

    def _in_thread(self, fn: Callable[[], Any]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn)

    def _connect(self) -> None:
        self._retry = None
        if self.stopping or self.connecting or self.client is None:
            return
        self.connecting = True
        self._drop_socket()
        d = self._run_blocking(self.client.reconnect)
        d.addCallbacks(self._socket_ready, self._connect_failed)

    def _socket_ready(self, rc: Any) -> None:
        self.connecting = False
        if self.stopping:
            self.client.disconnect()
            return
        sock = self.client.socket()
        if sock is None:
            self._schedule_reconnect(f"connect returned {rc}")
            return
        self._register(sock)
        if self.client.want_write():
            self._start_writing()

    def _connect_failed(self, f: Failure) -> None:
        self.connecting = False
        self.hub.stats.error("mqtt_connect_failed")
        self._schedule_reconnect(f.getErrorMessage() or repr(f.value))

    def _schedule_reconnect(self, why: str) -> None:
        if self.stopping or self._retry is not None:
            return
        delay = self._policy(self._attempt)
        self._attempt += 1
        self.log.warn(
            "MQTT broker {host}:{port} unavailable ({why}); retrying in {delay:.1f} s",
            host=self.broker.host,
            port=self.broker.port,
            why=why,
            delay=delay,
        )
        self._retry = self.reactor.callLater(delay, self._connect)

    def _register(self, sock: Any) -> None:
        self._drop_socket()
        self._sock = _PahoSocket(self, sock.fileno())
        self.reactor.addReader(self._sock)

    def _drop_socket(self) -> None:
        s = self._sock
        if s is not None:
            self._sock = None
            self.reactor.removeReader(s)
            if self._writing:
                self.reactor.removeWriter(s)
        self._writing = False

    def _start_writing(self) -> None:
        if self._sock is not None and not self._writing:
            self._writing = True
            self.reactor.addWriter(self._sock)

    def _stop_writing(self) -> None:
        if self._sock is not None and self._writing:
            self.reactor.removeWriter(self._sock)
        self._writing = False

    # paho callbacks (the reactor thread; during the threaded connect they are ignored, and the
    # socket is registered once the connect returns)

    def on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        """paho opened its socket (registered by ``_socket_ready``)."""

    def on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        """paho is about to close its socket: forget it in the reactor first."""
        if not self.connecting:
            self._drop_socket()

    def on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        """paho has bytes to write."""
        if not self.connecting:
            self._start_writing()

    def on_socket_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        """paho's buffer is empty (paho also writes by itself, e.g. after a CONNACK): send more."""
        if not self.connecting:
            self._stop_writing()
            self._backlog = 0
            if self.connected and len(self.queue):
                self._drain()

    def _do_read(self) -> None:
        try:
            self.client.loop_read()
        except Exception:
            self.hub.stats.error("internal")
            self.log.failure("MQTT read failed")
            self._lost("read failed")

    def _do_write(self) -> None:
        if self.client is None:
            return
        try:
            self.client.loop_write()
        except Exception:
            self.hub.stats.error("internal")
            self.log.failure("MQTT write failed")
            self._lost("write failed")
            return

    def _descriptor_lost(self, sock: _PahoSocket, reason: Failure) -> None:
        if sock is self._sock:
            self._sock = None
            self._writing = False
            self._lost(reason.getErrorMessage())

    def _lost(self, why: str) -> None:
        self._drop_socket()
        if self.connected:
            self.on_disconnect(self.client, None, None, why, None)
        else:
            self._schedule_reconnect(why)

    def _loop_misc(self) -> None:
        if self.client is not None and not self.connecting and self._sock is not None:
            try:
                self.client.loop_misc()
            except Exception:
                self.log.failure("MQTT keep-alive failed")

    def on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        """CONNACK: subscribe, announce this hub and every local device, send what was queued."""
        if getattr(reason_code, "is_failure", False):
            self.hub.stats.error("mqtt_connect_refused")
            self.log.error("MQTT broker refused the connection: {reason}", reason=str(reason_code))
            return
        self.connected = True
        self._attempt = 0
        self.log.info("MQTT bridge connected to {host}:{port}", host=self.broker.host, port=self.broker.port)
        subs: list[tuple[str, Any]] = []
        for flt in self.topics.filters(self.config.federate):
            subs.append((flt, self._sub_options()))
        self.client.subscribe(subs)
        self._publish(self.topics.hub(self.node_id), b"online", self.config.status_qos, True)
        for dev in self.hub.registry.devices():
            if self._announced(dev.hub, dev.role):
                self._publish_status(dev.device_id, dev.as_dict(latest=False))
        self._drain()

    def _sub_options(self) -> Any:
        if not self.v5:
            return 1
        from paho.mqtt.subscribeoptions import SubscribeOptions

        # MQTT 5: the broker does not echo this hub's own publications back to it.
        return SubscribeOptions(qos=1, noLocal=True)

    def on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        """Connection lost (or closed by us): remote devices unreachable, then back off and retry."""
        was = self.connected
        self.connected = False
        self._backlog = 0
        if was:
            self.reconnects += 1
        self.deadman.website_gone("mqtt")  # the broker's drivers are gone: stop what they moved
        for req_id in list(self._pending):
            self._resolve(req_id, HubError("delivery_timeout", "MQTT broker connection lost"))
        for link in list(self._remote.values()):
            self._remote.pop(link.device_id, None)
            self.hub.disconnect(link, link.device_id, "unreachable")
        self._hub_states.clear()
        if not self.stopping:
            self.hub.stats.error("mqtt_disconnected")
            self._schedule_reconnect(str(reason_code))

    # -- outbound --

    def _announced(self, hub_id: str, role: str) -> bool:
        return hub_id == "" and role not in UNANNOUNCED_ROLES

    def offer(self, event: Event) -> None:
        """Hub fan-out: local devices' data (batched, latest values conflated) and statuses."""
        if event.hub:
            return  # never re-publish a remote device (loops are impossible)
        if event.kind == "data":
            # the hot path: one dict store per message; drops are counted once per batch
            if event.priority is _CONTROL or not self._interval:
                self._control.append(event)
            else:
                self._latest[(event.device_id, event.type)] = event
                self._offered += 1
            if self._flush_call is None:
                self._flush_call = self.reactor.callLater(self._interval, self._flush)
        elif event.kind == "status":
            if self._announced("", str(event.body.get("role", ""))):
                self._publish_status(event.device_id, event.body)

    def _flush(self) -> None:
        self._flush_call = None
        control, self._control = self._control, []
        latest, self._latest = self._latest, {}
        conflated = self._offered - len(latest)
        self._offered = 0
        if conflated:
            self.conflated += conflated
            self.hub.stats.drop("mqtt_conflated", conflated)
        qos_by_type = self.config.qos_by_type
        default_qos = self.config.data_qos
        for ev in control:
            self._publish_data(ev, qos_by_type.get(ev.type, default_qos))
        for ev in latest.values():
            self._publish_data(ev, qos_by_type.get(ev.type, default_qos))

    def _publish_data(self, ev: Event, qos: int) -> None:
        topic = self.topics.data(ev.device_id, ev.type)
        if topic is None:
            self.hub.stats.drop("mqtt_bad_topic")
            return
        self._publish(topic, mt.data_payload(ev.body, ev.device_id, self.node_id, ev.at), qos, False)

    def _publish_status(self, device_id: str, record: dict[str, Any]) -> None:
        topic = self.topics.status(device_id)
        if topic is None:
            self.hub.stats.drop("mqtt_bad_topic")
            return
        payload = mt.status_payload(record, self.node_id, self.hub.now())
        # statuses are re-published from the registry on reconnect: never queued
        if self.connected:
            self._publish(topic, payload, self.config.status_qos, True)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Hand one message to paho, or queue it while disconnected or paho's buffer is full."""
        if not self.connected or self._backlog > self.config.max_queue_bytes:
            self.queue.put(topic, payload, qos, retain)
            return
        info = self.client.publish(topic, payload, qos, retain)
        rc = getattr(info, "rc", 0)
        if rc:
            self.hub.stats.drop("mqtt_publish_refused")  # paho's own QoS>0 queue is full
            return
        self._backlog += len(payload) + len(topic)
        self.messages_out += 1

    def _drain(self) -> None:
        while len(self.queue) and self.connected and self._backlog <= self.config.max_queue_bytes:
            self._publish(*self.queue.pop())

    def _queue_dropped(self, n: int) -> None:
        self.hub.stats.drop("mqtt_queue", n)

    # -- inbound --

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        """paho's message callback: classify and handle; bad input is counted, never raised."""
        try:
            self.handle(msg.topic, msg.payload, bool(msg.retain))
        except Exception:
            self.hub.stats.error("internal")
            self.log.failure("MQTT message on {topic} failed", topic=msg.topic)

    def handle(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Act on one incoming message (commands, results, statuses, data, hub statuses)."""
        self.messages_in += 1
        parsed = self.topics.parse(topic)
        if parsed is None:
            self.hub.stats.drop("mqtt_unknown_topic")
            return
        if parsed.kind == "cmd":
            self._on_command(parsed.device_id, parsed.type, payload)
        elif parsed.kind == "hub":
            self._on_hub_status(parsed.device_id, payload)
        elif parsed.kind == "status":
            self._on_device_status(parsed.device_id, payload, retain)
        elif parsed.kind == "data":
            self._on_data(parsed.device_id, parsed.type, payload)
        elif parsed.kind == "result":
            self._on_result(payload)

    def _answer(self, device_id: str, cmd_type: str, req_id: Any, error: HubError | None) -> None:
        topic = self.topics.result(device_id, cmd_type)
        if topic is not None:
            payload = mt.result_payload(req_id, device_id, cmd_type, self.node_id, error)
            self._publish(topic, payload, self.config.status_qos, False)

    def _on_command(self, device_id: str, cmd_type: str, payload: bytes) -> None:
        try:
            obj = mt.decode_object(payload, self.config.max_payload)
        except HubError as e:
            self.hub.stats.error(e.code)
            self.log.info("MQTT command for {device_id}: {error}", device_id=device_id, error=e.message)
            self._answer(device_id, cmd_type, None, e)
            return
        if obj.get("hub") == self.node_id:
            return  # our own forwarded command, echoed (MQTT 3.1.1 has no no-local)
        dev = self.hub.registry.get(device_id)
        if (
            dev is not None
            and dev.hub
            and (isinstance(dev.link, MqttRemoteLink) or self._hub_states.get(dev.hub) == "online")
        ):
            return  # another hub on this broker owns it and answers
        if dev is None and self.config.federate and not self._answers_unknown():
            return
        req_id = mt.request_id(obj)
        body = mt.command_body(obj, device_id, cmd_type)
        d = self.route_command(body, "mqtt", device_id)
        d.addCallbacks(
            lambda _: self._answer(device_id, cmd_type, req_id, None),
            self._command_failed,
            errbackArgs=(device_id, cmd_type, req_id),
        )

    def _answers_unknown(self) -> bool:
        # With several federated hubs, the online hub with the smallest node id answers for
        # devices nobody has: one device_offline result instead of one per hub.
        others = [h for h, s in self._hub_states.items() if s == "online" and h != self.node_id]
        return not others or self.node_id < min(others)

    def route_command(self, body: dict[str, Any], origin: str, target: str) -> defer.Deferred[Any]:
        """Route one broker command exactly like a dashboard's: ``hub.command`` (allowlist, checks).

        The one place an authorization check (robonet/auth.py) belongs. Motion commands feed the
        deadman as the web face does (origin ``mqtt``: stopped when the broker link is lost).
        """
        cmd_type = body.get("type")
        if cmd_type in MOTION_COMMANDS and cmd_type in self.hub.commands:
            self.deadman.moved(origin, cmd_type, body, [target])
        return self.hub.command(body, origin=origin, target=target)  # type: ignore[no-any-return]

    def _command_failed(self, f: Failure, device_id: str, cmd_type: str, req_id: Any) -> None:
        err = f.value if isinstance(f.value, HubError) else HubError("internal", "command failed")
        if not isinstance(f.value, HubError):
            self.log.failure("MQTT command {cmd_type} failed", f, cmd_type=cmd_type)
        self._answer(device_id, cmd_type, req_id, err)

    def _on_result(self, payload: bytes) -> None:
        try:
            obj = mt.decode_object(payload, self.config.max_payload)
        except HubError as e:
            self.hub.stats.error(e.code)
            return
        req_id = obj.get("id")
        if not isinstance(req_id, str) or req_id not in self._pending:
            return  # someone else's command
        if obj.get("status") == "ack":
            self._resolve(req_id, None)
        else:
            code, msg = obj.get("code"), obj.get("message")
            code = code if isinstance(code, str) else "internal"
            msg = msg if isinstance(msg, str) else ""
            self._resolve(req_id, HubError(code[:64], msg[:256]))

    def _resolve(self, req_id: str, error: HubError | None) -> None:
        entry = self._pending.pop(req_id, None)
        if entry is None:
            return
        d, timer = entry
        if timer.active():
            timer.cancel()
        if error is None:
            d.callback(None)
        else:
            d.errback(error)

    def send_remote_command(self, link: MqttRemoteLink, command: Command) -> defer.Deferred[Any]:
        """Publish ``command`` for a device of hub ``link.hub_id``; fires on its result."""
        if not self.connected:
            raise HubError("device_offline", "the MQTT broker is not connected")
        topic = self.topics.cmd(link.device_id, command.type)
        if topic is None:
            raise HubError("unknown_command", f"command type {command.type!r} cannot be an MQTT topic")
        self._next_cmd += 1
        req_id = f"{self.node_id}:{self._next_cmd}"
        body = dict(command.body)
        body["id"] = req_id
        body["hub"] = self.node_id
        body["origin"] = command.origin
        d: defer.Deferred[Any] = defer.Deferred()
        timer = self.reactor.callLater(
            self.config.command_timeout,
            self._resolve,
            req_id,
            HubError("delivery_timeout", f"no result from hub {link.hub_id} for {link.device_id}"),
        )
        self._pending[req_id] = (d, timer)
        self._publish(topic, orjson.dumps(body), self.config.status_qos, False)
        return d

    def _on_hub_status(self, node_id: str, payload: bytes) -> None:
        if node_id == self.node_id:
            return
        state = "online" if payload.strip() == b"online" else "offline"
        self._hub_states[node_id] = state
        if len(self._hub_states) > self.config.max_remote_devices:
            self._hub_states.pop(next(iter(self._hub_states)))
        if state == "offline":
            for link in [lk for lk in self._remote.values() if lk.hub_id == node_id]:
                self._remote.pop(link.device_id, None)
                self.hub.disconnect(link, link.device_id)

    def _on_device_status(self, device_id: str, payload: bytes, retain: bool) -> None:
        try:
            obj = mt.decode_object(payload, self.config.max_payload)
        except HubError as e:
            self.hub.stats.error(e.code)
            return
        hub_id = obj.get("hub")
        if not isinstance(hub_id, str) or not mt.valid_segment(hub_id):
            self.hub.stats.error("bad_request")
            return
        online = obj.get("status") == "online"
        if hub_id == self.node_id:
            # A retained "online" from our previous life (kill -9) for a device not here now.
            dev = self.hub.registry.get(device_id)
            if retain and online and (dev is None or not dev.online or dev.hub):
                record = dict(obj)
                record["status"] = "offline"
                self._publish_status(device_id, record)
            return
        if not self.config.federate:
            return
        if not online:
            link = self._remote.get(device_id)
            if link is not None and link.hub_id == hub_id:
                del self._remote[device_id]
                self.hub.disconnect(link, device_id)
            return
        if self._hub_states.get(hub_id) == "offline":
            return  # a dead hub's stale retained status
        existing = self.hub.registry.get(device_id)
        if existing is not None and existing.online and existing.hub == "":
            self.hub.stats.drop("mqtt_device_shadowed")
            return
        link = self._remote.get(device_id)
        if link is not None and link.hub_id == hub_id and existing is not None and existing.link is link:
            return  # already known (a repeated status)
        if link is None and len(self._remote) >= self.config.max_remote_devices:
            self.hub.stats.drop("mqtt_remote_limit")
            return

        def text(key: str, default: str) -> str:
            v = obj.get(key)
            return v[:64] if isinstance(v, str) and v else default

        link = MqttRemoteLink(self, hub_id, device_id, text("face", "mqtt"))
        self._remote[device_id] = link
        self.hub.connect(
            link,
            device_id,
            face=link.face,
            role=text("role", "robot"),
            address=f"mqtt:{hub_id}",
            name=text("name", ""),
            hub_id=hub_id,
            dialect=text("dialect", ""),
        )

    def _forget_remote(self, link: MqttRemoteLink) -> None:
        if self._remote.get(link.device_id) is link:
            del self._remote[link.device_id]

    def _on_data(self, device_id: str, mtype: str, payload: bytes) -> None:
        link = self._remote.get(device_id)
        if link is None:
            return  # a local device's data (echo) or an unknown device
        try:
            obj = mt.decode_object(payload, self.config.max_payload)
        except HubError as e:
            self.hub.stats.error(e.code)
            return
        if obj.get("hub") != link.hub_id:
            self.hub.stats.drop("mqtt_data_wrong_hub")
            return
        dev = self.hub.registry.get(device_id)
        if dev is None or dev.link is not link or not dev.online:
            return
        for k in mt.ADDED_KEYS:
            obj.pop(k, None)
        self.hub.ingest(dev, Message(mtype, obj, device_id, self.hub.now()))

    # -- metrics --

    def stats(self) -> dict[str, Any]:
        """Bridge counters for ``/metrics`` and the stats endpoint."""
        return {
            "connected": 1 if self.connected else 0,
            "messages_out": self.messages_out,
            "messages_in": self.messages_in,
            "dropped": self.queue.dropped,
            "conflated": self.conflated,
            "reconnects": self.reconnects,
            "queued_bytes": self.queue.bytes,
            "remote_devices": len(self._remote),
        }


def make_paho_client(bridge: MqttBridge) -> Any:
    """A paho-mqtt 2.x Client set up for ``bridge`` (external loop, Last Will, credentials, TLS)."""
    import paho.mqtt.client as paho

    cfg = bridge.config
    protocol = paho.MQTTv5 if bridge.v5 else paho.MQTTv311
    kwargs: dict[str, Any] = {}
    if not bridge.v5:
        kwargs["clean_session"] = True
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=cfg.client_id or f"robonet-{bridge.node_id}",
        protocol=protocol,
        **kwargs,
    )
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(MAX_QUEUED_QOS)
    client.connect_timeout = cfg.connect_timeout
    client.will_set(bridge.topics.hub(bridge.node_id), b"offline", qos=cfg.status_qos, retain=True)
    username = cfg.username or bridge.broker.username
    password = cfg.password or bridge.broker.password
    if username:
        client.username_pw_set(username, password or None)
    if bridge.broker.tls:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)  # CERT_REQUIRED + host name check
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        client.tls_set_context(ctx)
    client.on_connect = bridge.on_connect
    client.on_disconnect = bridge.on_disconnect
    client.on_message = bridge.on_message
    client.on_socket_open = bridge.on_socket_open
    client.on_socket_close = bridge.on_socket_close
    client.on_socket_register_write = bridge.on_socket_register_write
    client.on_socket_unregister_write = bridge.on_socket_unregister_write
    client.connect_async(bridge.broker.host, bridge.broker.port, keepalive=cfg.keepalive)
    return client
