"""Peer link connections (spec/discovery-peers.md, "Peer links"): the dialling and the accepting side.

- :class:`Dialler`, :class:`PeerClientProtocol`, :class:`PeerClientFactory`: the dialling side's
  target record and thin protocol (bot link framing, handshake from
  :mod:`robonet.protocols.peering`);
- :class:`ResponderHandler` (over a :class:`BotlinkChannel`): the accepting side, handed inbound
  ``role: "peer"`` hellos by the bot link (``hub.peer_acceptor.accept(proto, hello)``).

Once the handshake is complete both hand their frames to a :class:`~robonet.services.peerlink.PeerLink`.
They are written against :class:`~robonet.services.peerlink.LinkOwner`, not the PeerService class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import orjson
from twisted.application.internet import ClientService
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from robonet.protocols.botlink import FrameDecoder, FrameError, encode_obj
from robonet.protocols.envelope import error_obj
from robonet.protocols.peering import (
    AUTH_FAILED,
    BAD_HELLO,
    DUPLICATE,
    DiallerHandshake,
    HandshakeError,
    ResponderHandshake,
    StaticPeer,
)
from robonet.services.peerlink import LinkOwner, PeerLink

if TYPE_CHECKING:
    pass


# --- the dialling side --------------------------------------------------------------------------


@attrs.define(eq=False)
class Dialler:
    """One dial target: a discovered node (``expected_node_id`` set) or a static entry.

    ``state``: connecting | handshake | up | paused | stopped; ``node_id`` is learned from the
    challenge; ``last_error`` the last handshake/connection problem.
    """

    key: str
    host: str
    port: int
    static: StaticPeer | None = None
    expected_node_id: str | None = None
    node_id: str | None = None
    name: str = ""
    state: str = "connecting"
    last_error: str = ""
    last_seen: float | None = None
    client: ClientService | None = None
    paused_for: str | None = None
    protocol: Any = None


class PeerClientProtocol(Protocol):
    """The dialler's connection: handshake, then frames go to the PeerLink."""

    log = Logger()

    def __init__(self, service: LinkOwner, dialler: Dialler) -> None:
        self.service = service
        self.dialler = dialler
        cfg = service.config.botlink
        self.decoder = FrameDecoder(cfg.max_hello_frame)
        self.handshake = DiallerHandshake(
            service.node, service.config.peers.secret, expected_node_id=dialler.expected_node_id
        )
        self.link: PeerLink | None = None
        self.closing = False
        self._deadline: IDelayedCall | None = None
        self._stage = "challenge"
        self.error = ""

    def connectionMade(self) -> None:
        self.dialler.state = "handshake"
        self.dialler.protocol = self
        self.write_frame(encode_obj(self.handshake.hello()))
        self._deadline = self.service.reactor.callLater(
            self.service.config.botlink.hello_timeout, self._handshake_expired
        )

    def _handshake_expired(self) -> None:
        self._deadline = None
        if self.link is None:
            self.error = "handshake timeout"
            self.close_with_error(BAD_HELLO, "handshake did not complete in time")

    def write_frame(self, frame: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.service.hub.stats.bytes_sent(len(frame))
            self.transport.write(frame)

    def close_with_error(self, code: str, message: str) -> None:
        if self.closing:
            return
        self.write_frame(encode_obj(error_obj(code, message)))
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.service.hub.stats.bytes_received(len(data))
        try:
            payloads = self.decoder.feed(data)
        except FrameError as e:
            self.service.hub.stats.error(e.code)
            self.close_with_error(e.code, e.message)
            return
        for raw in payloads:
            if self.closing:
                return
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.service.hub.stats.error("bad_json")
                if self.link is None:
                    self.close_with_error("bad_json", "frame is not valid UTF-8 JSON")
                else:
                    self.write_frame(encode_obj(error_obj("bad_json", "frame is not valid UTF-8 JSON")))
                continue
            if not isinstance(obj, dict):
                self.service.hub.stats.error("not_object")
                if self.link is None:
                    self.close_with_error("not_object", "frame must be a JSON object")
                continue
            if self.link is not None:
                self.link.frame_received(obj, raw)
            else:
                self._handshake_frame(obj)

    def _handshake_frame(self, obj: dict[str, Any]) -> None:
        if obj.get("type") == "error":
            code = str(obj.get("code"))[:64]
            self.error = f"{code}: {str(obj.get('message'))[:200]}"
            self.service.handshake_refused(self.dialler, code)
            self.log.info(
                "peer {host}:{port} refused the link: {error}",
                host=self.dialler.host,
                port=self.dialler.port,
                error=self.error,
            )
            self.closing = True
            if self.transport is not None:
                self.transport.loseConnection()
            return
        try:
            if self._stage == "challenge":
                proof = self.handshake.on_challenge(obj)
                assert self.handshake.responder is not None
                self.dialler.node_id = self.handshake.responder
                if self.handshake.responder == self.service.node.node_id:
                    raise HandshakeError(BAD_HELLO, "connected to ourselves")
                if not self.service.may_add_link(self.handshake.responder, dialled=True):
                    self.error = f"{DUPLICATE}: already linked"
                    self.service.pause_dialler(self.dialler, self.handshake.responder)
                    self.close_with_error(DUPLICATE, "already linked")
                    return
                self._stage = "welcome"
                self.write_frame(encode_obj(proof))
                return
            info = self.handshake.on_welcome(obj)
        except HandshakeError as e:
            self.service.hub.stats.error(e.code)
            self.error = f"{e.code}: {e.message}"
            self.log.info(
                "peer {host}:{port}: handshake failed: {error}",
                host=self.dialler.host,
                port=self.dialler.port,
                error=self.error,
            )
            if e.message == "connected to ourselves":
                self.service.stop_dialler(self.dialler, "that address is this hub")
            self.close_with_error(e.code, e.message)
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.decoder.max_frame = self.service.config.botlink.max_frame
        self.dialler.name = info.name
        self.dialler.last_error = ""
        link = PeerLink(
            self.service,
            self,
            info,
            address=f"{self.dialler.host}:{self.dialler.port}",
            authenticated=bool(self.service.config.peers.secret),
            dialled=True,
        )
        if self.service.link_up(link):
            self.link = link
            self.dialler.state = "up"
        else:
            self.error = f"{DUPLICATE}: already linked"
            self.service.pause_dialler(self.dialler, info.node_id)
            self.close_with_error(DUPLICATE, "already linked")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closing = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.dialler.state in ("up", "handshake"):
            self.dialler.state = "connecting"
        self.dialler.last_seen = self.service.reactor.seconds()
        if self.link is not None:
            link, self.link = self.link, None
            self.service.link_down(link)
        else:
            self.dialler.last_error = self.error or reason.getErrorMessage()
            self.service.dial_failed(self.dialler)


class PeerClientFactory(Factory):
    """Builds the dialler's protocol for one target."""

    def __init__(self, service: LinkOwner, dialler: Dialler) -> None:
        self.service = service
        self.dialler = dialler

    def buildProtocol(self, addr: Any) -> PeerClientProtocol:
        return PeerClientProtocol(self.service, self.dialler)


# --- the accepting side -------------------------------------------------------------------------


class BotlinkChannel:
    """Adapter over the lead's BotLinkProtocol for inbound peer connections."""

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.transport = proto.transport
        self._write = proto.send_frame

    def write_frame(self, frame: bytes) -> None:
        self._write(frame)

    def close_with_error(self, code: str, message: str) -> None:
        self.proto.close_with_error(code, message)


class ResponderHandler:
    """Handles an inbound peer connection after the bot link saw ``role: "peer"`` in the hello.

    The bot link calls ``frame_received(obj, raw)`` for every later frame and
    ``connection_lost(reason)`` at the end.
    """

    log = Logger()

    def __init__(self, service: LinkOwner, proto: Any) -> None:
        self.service = service
        self.proto = proto
        self.channel = BotlinkChannel(proto)
        peer = proto.transport.getPeer() if proto.transport is not None else None
        self.host = str(getattr(peer, "host", "?"))
        self.address = f"{self.host}:{getattr(peer, 'port', 0)}"
        self.handshake = ResponderHandshake(
            service.node,
            service.config.peers.secret,
            require_same_hash=service.config.peers.require_same_hash,
            max_frame=service.config.botlink.max_frame,
        )
        self.link: PeerLink | None = None
        self.done = False
        self._deadline: IDelayedCall | None = None

    def start(self, hello: dict[str, Any]) -> None:
        """Answer the hello with a challenge, or refuse and close."""
        if hello.get("node_id") == self.service.node.node_id:
            self.service.self_dial(hello.get("nonce"))
        try:
            if not self.service.may_accept_from(self.host):
                raise HandshakeError(AUTH_FAILED, "no peers.secret: only loopback or static peers may link")
            challenge = self.handshake.on_hello(hello)
        except HandshakeError as e:
            self._refuse(e)
            return
        self.proto.send_obj(challenge)
        self._deadline = self.service.reactor.callLater(
            self.service.config.botlink.hello_timeout, self._expired
        )

    def _refuse(self, e: HandshakeError) -> None:
        self.done = True
        self.service.hub.stats.error(e.code)
        self.log.info(
            "peer link from {address} refused: {code}: {message}",
            address=self.address,
            code=e.code,
            message=e.message,
        )
        self.channel.close_with_error(e.code, e.message)

    def _expired(self) -> None:
        self._deadline = None
        if self.link is None and not self.done:
            self._refuse(HandshakeError(AUTH_FAILED, "no proof in time"))

    def frame_received(self, obj: dict[str, Any], raw: bytes) -> None:
        if self.link is not None:
            self.link.frame_received(obj, raw)
            return
        if self.done:
            return
        try:
            welcome = self.handshake.on_proof(obj)
        except HandshakeError as e:
            self._refuse(e)
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        info = self.handshake.dialler
        assert info is not None
        if not self.service.may_add_link(info.node_id, dialled=False):
            self._refuse(HandshakeError(DUPLICATE, "already linked"))
            return
        self.proto.send_obj(welcome)
        link = PeerLink(
            self.service,
            self.channel,
            info,
            address=self.address,
            authenticated=bool(self.service.config.peers.secret),
            dialled=False,
        )
        if self.service.link_up(link):
            self.link = link
        else:
            self._refuse(HandshakeError(DUPLICATE, "already linked"))

    def connection_lost(self, reason: Any = None) -> None:
        self.done = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.link is not None:
            link, self.link = self.link, None
            self.service.link_down(link)
