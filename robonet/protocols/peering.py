"""Peer-link handshake codec (spec/discovery-peers.md, "Peer links"): pure, no Twisted I/O.

The challenge-response exchange a dialling hub and an accepting hub run over bot link framing
before a peer link is up: hello -> challenge -> proof -> welcome.

- :func:`hmac_proof` and :func:`new_nonce`: the proof and nonce values (the secret never leaves
  the process);
- :class:`DiallerHandshake` (dialling side) and :class:`ResponderHandshake` (accepting side): each
  takes the other side's decoded frame and returns the next frame to send, or raises
  :class:`HandshakeError` with the spec's error code;
- :class:`PeerInfo`: who is at the other end once the handshake is complete;
- :class:`StaticPeer` / :func:`parse_static`: a ``peers.static`` entry (where to dial).

The connections that carry these frames live in :mod:`robonet.services.peerconn`.
"""

from __future__ import annotations

import hmac
import re
import secrets
import uuid
from hashlib import sha256
from typing import Any

import attrs

import robonet
from robonet.node import NodeIdentity

HEARTBEAT_S = 10.0
NONCE_RE = re.compile(r"[0-9a-f]{32}\Z")
NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")

# Handshake error codes (spec) plus the link-level ones robonet adds.
BAD_HELLO = "bad_hello"
WRONG_PROJECT = "wrong_project"
INCOMPATIBLE = "incompatible"
AUTH_FAILED = "auth_failed"
DUPLICATE = "duplicate_link"


def hmac_proof(secret: str, nonce: str, node_id: str) -> str:
    """HMAC-SHA256(``secret``, ``nonce + node_id``) as 64 lowercase hex chars (UTF-8 throughout).

    With no secret the key is empty: the proof then proves nothing and the link is marked
    unauthenticated (spec: only loopback or static peers link that way).
    """
    return hmac.new(secret.encode(), (nonce + node_id).encode(), sha256).hexdigest()


def new_nonce() -> str:
    """32 random lowercase hex chars (128 bits from ``secrets``)."""
    return secrets.token_hex(16)


class HandshakeError(Exception):
    """The handshake failed: ``code`` is bad_hello, wrong_project, incompatible or auth_failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class PeerInfo:
    """Who is at the other end of a completed handshake."""

    node_id: str
    name: str
    version: str
    hash: str = ""


def _str_field(obj: dict[str, Any], key: str, limit: int, code: str = BAD_HELLO) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise HandshakeError(code, f"{key} must be a string of at most {limit} characters")
    return value


@attrs.define
class DiallerHandshake:
    """The dialling side: hello -> (challenge) -> proof -> (welcome).

    ``expected_node_id`` is the node we meant to reach (from discovery) or None (static peer).
    """

    node: NodeIdentity
    secret: str
    expected_node_id: str | None = None
    nonce: str = attrs.field(factory=new_nonce)
    responder: str | None = None

    def hello(self) -> dict[str, Any]:
        """The first frame."""
        return {
            "type": "hello",
            "proto": robonet.PROTO_VERSION,
            "role": "peer",
            "node_id": self.node.node_id,
            "name": self.node.name,
            "project_id": self.node.project_id,
            "hash": self.node.hash,
            "version": self.node.version,
            "nonce": self.nonce,
        }

    def on_challenge(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Check the responder's proof; return our proof frame. Raises HandshakeError.

        ``auth_failed``: the proof is wrong (the responder does not know the secret);
        ``bad_hello``: malformed, our own node id, or not the node we meant to reach.
        """
        if obj.get("type") != "challenge":
            raise HandshakeError(BAD_HELLO, "expected a challenge")
        node_id = _str_field(obj, "node_id", 64)
        nonce = _str_field(obj, "nonce", 32)
        proof = _str_field(obj, "proof", 64)
        if not NODE_ID_RE.match(node_id) or not NONCE_RE.match(nonce):
            raise HandshakeError(BAD_HELLO, "malformed challenge")
        if node_id == self.node.node_id:
            raise HandshakeError(BAD_HELLO, "connected to ourselves")
        if self.expected_node_id is not None and node_id != self.expected_node_id:
            raise HandshakeError(BAD_HELLO, f"expected node {self.expected_node_id}, reached {node_id}")
        if not hmac.compare_digest(proof, hmac_proof(self.secret, self.nonce, node_id)):
            raise HandshakeError(AUTH_FAILED, "the responder's proof is wrong")
        self.responder = node_id
        return {"type": "proof", "proof": hmac_proof(self.secret, nonce, self.node.node_id)}

    def on_welcome(self, obj: dict[str, Any]) -> PeerInfo:
        """Check the welcome; return the responder's identity. Raises HandshakeError."""
        if obj.get("type") != "welcome" or self.responder is None:
            raise HandshakeError(BAD_HELLO, "expected a welcome")
        server = obj.get("server")
        if not isinstance(server, dict):
            server = {}
        node_id = obj.get("node_id", server.get("id"))
        if node_id != self.responder:
            raise HandshakeError(BAD_HELLO, "welcome from a different node")
        name = server.get("name")
        version = server.get("version")
        return PeerInfo(
            node_id=self.responder,
            name=name[:128] if isinstance(name, str) else "",
            version=version[:32] if isinstance(version, str) else "",
        )


@attrs.define
class ResponderHandshake:
    """The accepting side: (hello) -> challenge -> (proof) -> welcome.

    ``require_same_hash``: peers.require_same_hash; ``max_frame``: announced in the welcome.
    """

    node: NodeIdentity
    secret: str
    require_same_hash: bool = False
    max_frame: int = 1048576
    nonce: str = attrs.field(factory=new_nonce)
    dialler: PeerInfo | None = None
    _dialler_nonce: str = ""

    def on_hello(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Check the dialler's hello; return the challenge frame. Raises HandshakeError.

        ``bad_hello`` (malformed, our own id), ``wrong_project``, ``incompatible`` (protocol
        version, or hash when required).
        """
        if obj.get("type") != "hello" or obj.get("role") != "peer":
            raise HandshakeError(BAD_HELLO, "expected a peer hello")
        node_id = _str_field(obj, "node_id", 64)
        nonce = _str_field(obj, "nonce", 32)
        if not NODE_ID_RE.match(node_id) or not NONCE_RE.match(nonce):
            raise HandshakeError(BAD_HELLO, "malformed node_id or nonce")
        if node_id == self.node.node_id:
            raise HandshakeError(BAD_HELLO, "that is our own node id")
        name = obj.get("name", "")
        version = obj.get("version", "")
        node_hash = obj.get("hash", "")
        project = obj.get("project_id")
        if not isinstance(name, str) or not isinstance(version, str) or not isinstance(node_hash, str):
            raise HandshakeError(BAD_HELLO, "name, version and hash must be strings")
        if project != self.node.project_id:
            raise HandshakeError(WRONG_PROJECT, f"this hub serves project {self.node.project_id!r}")
        if obj.get("proto", robonet.PROTO_VERSION) != robonet.PROTO_VERSION:
            raise HandshakeError(INCOMPATIBLE, f"peer protocol must be {robonet.PROTO_VERSION}")
        if self.require_same_hash and node_hash != self.node.hash:
            raise HandshakeError(INCOMPATIBLE, "different robonet sources (peers.require_same_hash)")
        self.dialler = PeerInfo(node_id, name[:128], version[:32], node_hash[:64])
        self._dialler_nonce = nonce
        return {
            "type": "challenge",
            "node_id": self.node.node_id,
            "nonce": self.nonce,
            "proof": hmac_proof(self.secret, nonce, self.node.node_id),
        }

    def on_proof(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Check the dialler's proof; return the welcome frame. Raises HandshakeError(auth_failed)."""
        if self.dialler is None or obj.get("type") != "proof":
            raise HandshakeError(AUTH_FAILED, "expected a proof")
        proof = obj.get("proof")
        expected = hmac_proof(self.secret, self.nonce, self.dialler.node_id)
        if not isinstance(proof, str) or not hmac.compare_digest(proof.encode(), expected.encode()):
            raise HandshakeError(AUTH_FAILED, "wrong proof")
        return {
            "type": "welcome",
            "proto": robonet.PROTO_VERSION,
            "session": str(uuid.uuid4()),
            "node_id": self.node.node_id,
            "server": {"id": self.node.node_id, "name": self.node.name, "version": self.node.version},
            "heartbeat_s": HEARTBEAT_S,
            "max_frame": self.max_frame,
        }


@attrs.frozen
class StaticPeer:
    """A ``peers.static`` entry: ``host:port``, ``tcp:host:port``, ``ssl:host:port[:ca=FILE][:hostname=N]``.

    ``host=`` and ``port=`` keyword forms are accepted too; IPv6 hosts go in brackets.
    """

    entry: str
    host: str
    port: int
    tls: bool = False
    ca: str = ""
    hostname: str = ""


def parse_static(entry: str) -> StaticPeer:
    """Parse one ``peers.static`` entry. Raises ValueError naming the problem."""
    text = entry.strip()
    tls = False
    for prefix, is_tls in (("tcp:", False), ("ssl:", True), ("tls:", True)):
        if text.startswith(prefix):
            text, tls = text[len(prefix) :], is_tls
            break
    host = ""
    if text.startswith("["):
        host, _, text = text[1:].partition("]")
        text = text.removeprefix(":")
    parts = [p for p in text.split(":") if p] if text else []
    port = 0
    options: dict[str, str] = {}
    positional = []
    for part in parts:
        key, eq, value = part.partition("=")
        if eq:
            options[key] = value
        else:
            positional.append(part)
    if not host:
        host = options.pop("host", "") or (positional.pop(0) if positional else "")
    port_text = options.pop("port", "") or (positional.pop(0) if positional else "")
    if positional:
        raise ValueError(f"peers.static: cannot parse {entry!r}")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"peers.static: expected host:port, got {entry!r}")
    port = int(port_text)
    ca = options.pop("ca", "") or options.pop("trustRoots", "")
    hostname = options.pop("hostname", "")
    if options:
        raise ValueError(f"peers.static: unknown option(s) {sorted(options)} in {entry!r}")
    return StaticPeer(entry, host, port, tls, ca, hostname)
