"""The typed seams between robonet's parts (issue 11, "Typed seams"), as ``typing.Protocol``s.

Each face (bot link, line link, WebSocket relay, peer links, ...) is written against these, not
against the concrete classes, so a test can hand it a fake and mypy checks both:

- :class:`FaceHub`: what a face may call on the hub (:class:`robonet.hub.Hub` implements it);
- :class:`StatsSink` / :class:`SampleSink`: the public counting methods of
  :class:`robonet.stats.Stats` (faces never write into its dicts);
- :class:`Store` / :class:`Batch`: the telemetry store (:class:`robonet.services.store.TelemetryStore`)
  and the group-commit batch an ``append`` returns (ack only once ``when_committed`` fires ``ok``);
- :class:`PeerAcceptor` / :class:`PeerSession`: who takes over an inbound bot link connection whose
  hello says ``role: "peer"`` (the PeerService), and what the bot link then feeds;
- :class:`PeerDirectory`: what the hub delegates to the PeerService (peer_list, peer messages);
- :class:`PeerHub`: what the PeerService uses of the hub (a FaceHub that it can attach to);
- :class:`PeerChannel`: what a peer link needs of a connection (write a frame, close with an error).

Nothing here imports Twisted's reactor or does I/O; the module only declares shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from robonet.config import Config
    from robonet.model import Link, Message, Subscriber
    from robonet.node import NodeIdentity
    from robonet.registry import Device, Registry


class SampleSink(Protocol):
    """A bounded ring of latency samples (``Stats.ack_rtt``, ``Stats.ack_delay``)."""

    def add(self, seconds: float) -> None:
        """Record one sample, in seconds."""


class StatsSink(Protocol):
    """The public counting interface of :class:`robonet.stats.Stats`: all a face may do to stats."""

    @property
    def ack_rtt(self) -> SampleSink:
        """Round-trip times of commands the hub sent, acked by robots."""

    @property
    def ack_delay(self) -> SampleSink:
        """Frame received -> ack written (includes the store's group commit)."""

    def count_in(self, mtype: str, nbytes: int = 0) -> None:
        """One message of ``mtype`` received (``nbytes`` of payload)."""

    def count_out(self, mtype: str, nbytes: int = 0) -> None:
        """One message of ``mtype`` sent (``nbytes`` of payload)."""

    def bytes_received(self, nbytes: int) -> None:
        """``nbytes`` read, apart from any message."""

    def bytes_sent(self, nbytes: int) -> None:
        """``nbytes`` written, apart from any message."""

    def error(self, code: str) -> None:
        """One error of spec code ``code``."""

    def drop(self, reason: str, count: int = 1) -> None:
        """``count`` items dropped for ``reason``."""

    def connection(self, face: str, delta: int) -> None:
        """A connection of ``face`` opened (+1) or closed (-1)."""


@runtime_checkable
class Batch(Protocol):
    """One group commit of the store: every row appended into it commits (or fails) together."""

    def when_committed(self, ok: Callable[..., object], failed: Callable[..., object], *args: Any) -> None:
        """Call ``ok(*args)`` once the batch is durable, or ``failed(failure, *args)`` if it failed.

        Either fires at once when the batch has already settled; exactly one of them fires.
        """


class Store(Protocol):
    """The telemetry store as the hub and the web face use it (spec/botlink.md ack-after-commit)."""

    def append(
        self, device_id: str, type: str, received_at: float, body: dict[str, Any], raw: bytes | None
    ) -> Batch:
        """Queue one message for the next group commit (no I/O); raises RuntimeError when stopped."""

    def query(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        type: str | None = None,
    ) -> Deferred[list[dict[str, Any]]]:
        """Stored rows, newest first (``since``/``until`` in Unix s, inclusive)."""

    def battery_history(self, device_id: str | None = None, limit: int = 100) -> Deferred[list[list[Any]]]:
        """The last ``limit`` battery readings as ``[epoch_ms, battery]``, oldest first."""

    def stats(self) -> dict[str, Any]:
        """Counters for the ``stats`` endpoint (rows_written, pending_rows, ...)."""


class PeerSession(Protocol):
    """An accepted inbound peer connection, as the bot link drives it after a ``role: "peer"`` hello."""

    def frame_received(self, obj: dict[str, Any], raw: bytes) -> None:
        """One later decoded frame (``obj``) and its JSON payload bytes (``raw``)."""

    def connection_lost(self, reason: Any = None) -> None:
        """The bot link connection ended."""


class PeerAcceptor(Protocol):
    """Takes over inbound peer links (``hub.peer_acceptor``); the bot link hands it the hello."""

    def accept(self, proto: Any, hello: dict[str, Any]) -> PeerSession:
        """Answer ``hello`` on connection ``proto`` (a bot link protocol with ``send_obj``,
        ``send_frame``, ``close_with_error`` and ``transport``) and return the session to feed."""


class PeerDirectory(Protocol):
    """What the hub delegates to the federation service while it runs (``hub.peers``)."""

    def peer_list(self) -> dict[str, Any]:
        """``{"peers": [...]}`` (docs/federation.rst, "peer_list")."""

    def broadcast_to_peers(self, body: Any) -> int:
        """Send ``body`` as a peer_message to every linked peer; returns how many links took it."""

    def send_to_peer(self, node_id: str, body: Any) -> bool:
        """Send ``body`` as a peer_message to ``node_id``; False if it is not linked."""


class PeerService(PeerDirectory, Protocol):
    """A federation service the hub can attach: a directory that may also accept inbound links.

    ``acceptor`` is None when inbound peer links are refused (``peers.accept = false``).
    """

    @property
    def acceptor(self) -> PeerAcceptor | None:
        """Who accepts inbound peer hellos, or None."""


class PeerChannel(Protocol):
    """What a peer link writes to: a dialled connection or an inbound bot link connection."""

    transport: Any

    def write_frame(self, frame: bytes) -> None:
        """Write one complete, already framed message."""

    def close_with_error(self, code: str, message: str) -> None:
        """Send ``{"type":"error","code","message"}`` and close."""


class FaceHub(Protocol):
    """What a face may use of the hub (:class:`robonet.hub.Hub`); ARCHITECTURE.md "The hub".

    Faces decode their dialect into :class:`~robonet.model.Message` objects and call these; they
    never reach into the hub's, registry's or stats' private state.
    """

    @property
    def config(self) -> Config:
        """The validated configuration."""

    @property
    def registry(self) -> Registry:
        """The live device table (read it; change it only through the hub's methods)."""

    @property
    def stats(self) -> StatsSink:
        """Process-wide counters (public methods only)."""

    @property
    def node(self) -> NodeIdentity:
        """This hub's identity."""

    def now(self) -> float:
        """Hub time, Unix seconds."""

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
    ) -> Device:
        """Register ``device_id`` as online on ``link`` (an older link with that id is replaced)."""

    def disconnect(self, link: Link | None, device_id: str, status: str = "offline") -> None:
        """Mark ``device_id`` offline if ``link`` is still its current connection."""

    def rename(self, device: Device, name: str) -> None:
        """Set a device's display ``name`` (observers get ``device_update`` when it changed)."""

    def ingest(self, device: Device, msg: Message) -> Batch | None:
        """Take one data message; returns the store Batch to wait on before acking, or None."""

    def command(self, body: dict[str, Any], origin: str, target: str | None = None) -> Deferred[list[str]]:
        """Route a command to ``target`` (or every robot); fires with the ids that took it."""

    def request(self, endpoint: str, data: Any, origin: str) -> Deferred[Any]:
        """Call a request endpoint; fails with HubError ``unknown_endpoint``/``internal``/..."""

    def subscribe(self, sub: Subscriber) -> None:
        """Start offering every fan-out Event to ``sub``."""

    def unsubscribe(self, sub: Subscriber) -> None:
        """Stop offering events to ``sub``."""


class PeerHub(FaceHub, Protocol):
    """What the federation service uses of the hub: a face's view plus attaching itself."""

    def attach_peers(self, service: PeerService) -> None:
        """Delegate peer_list/peer messages to ``service``; its ``acceptor`` takes peer hellos."""

    def detach_peers(self, service: PeerService) -> None:
        """Undo :meth:`attach_peers` if ``service`` is still the attached one."""
