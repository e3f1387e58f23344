"""The one authentication/authorization core (ARCHITECTURE.md "Principles"; docs/security.rst).

Authentication uses :mod:`twisted.cred`: a face turns its dialect's credential into a
credentials object — :class:`TokenCredentials` (a bearer token), :class:`NetworkCredentials`
(no token: the peer's address, for ``lan`` mode and the legacy dialects), or
:class:`twisted.cred.credentials.UsernamePassword` (the camera password) — and calls
:meth:`Auth.login`, which asks the :class:`~twisted.cred.portal.Portal`. The avatar is an
:class:`Identity` (name, role, rights, device patterns, command types). All checkers answer
synchronously, so :meth:`Auth.login_now` can return the identity at once for the hot path.

Authorization is one method, :meth:`Authorizer.check` ``(identity, action, target, mtype, face)``,
called by the hub for every routed command, request and data source (robonet.hub). A denial
raises :class:`Forbidden` (HubError code ``forbidden``), is counted per (face, reason) for
``robonet_auth_denied_total`` and logged at most once per identity and reason per minute.

Live sessions are registered per credential (:class:`Sessions`) with a close callback, so a
revoked token's connections are closed when the store's watcher sees the change (within 2 s).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from robonet.model import HubError
from robonet.tokens import TokenRecord, TokenStore

# -- rights --------------------------------------------------------------------------------------

PUBLISH = "publish"  # send data as a device (target = device_id)
COMMAND = "command"  # send a command to a robot (target = device_id or "*", mtype = command type)
REQUEST = "request"  # call any endpoint
READ = "read"  # dashboards' stream, REST GET, metrics, read-only endpoints
ADMIN = "admin"  # manage credentials, read the audit log
PEER = "peer"  # federate as a peer hub
ACTIONS = (PUBLISH, COMMAND, REQUEST, READ, ADMIN, PEER)

ROLE_RIGHTS: dict[str, frozenset[str]] = {
    "robot": frozenset({PUBLISH, REQUEST}),
    "operator": frozenset({COMMAND, REQUEST, READ}),
    "viewer": frozenset({READ}),
    "peer": frozenset({PUBLISH, COMMAND, REQUEST, READ, PEER}),
    "admin": frozenset(ACTIONS),
}
#: endpoints a ``read``-only identity may call (the hub's built-ins; custom ones may change state)
READ_ENDPOINTS = frozenset({"ping", "echo", "status", "info", "devices", "stats", "peer_list"})
MODES = ("lan", "token", "open")
DENY_LOG_INTERVAL = 60.0


class Forbidden(HubError):
    """A denied action: HubError code ``forbidden``; ``reason`` is the metric label
    (no_right, device_pattern, command_type, not_own_device, lease_held, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("forbidden", message)
        self.reason = reason


class Unauthorized(HubError):
    """A refused login (no, bad or revoked credential; address not allowed): code ``unauthorized``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("unauthorized", message)
        self.reason = reason


# -- the avatar ----------------------------------------------------------------------------------


class IIdentity(Interface):
    """The avatar interface of robonet's portal: who is on a connection and what it may do."""

    name = Attribute("credential or network name, e.g. 'alice' or 'lan@192.168.1.20'")
    role = Attribute("robot, operator, viewer, peer or admin")
    rights = Attribute("frozenset of ACTIONS")


@implementer(IIdentity)
@attrs.frozen
class Identity:
    """An authenticated principal. ``devices`` are device-id glob patterns limiting PUBLISH (a
    robot; empty = the identity's own name) and COMMAND (an operator; empty = any device);
    ``commands`` limits command types (empty = all). ``credential`` names the token it came from
    ("" for network and open identities) so revoking that token can close its sessions."""

    name: str
    role: str
    rights: frozenset[str]
    devices: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    source: str = "token"
    credential: str = ""

    def may(self, right: str) -> bool:
        """Whether the identity holds ``right`` at all (no target check)."""
        return right in self.rights

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for ``whoami`` and dashboards (no secrets)."""
        return {
            "name": self.name,
            "role": self.role,
            "rights": sorted(self.rights),
            "devices": list(self.devices),
            "commands": list(self.commands),
            "source": self.source,
        }


OPEN_IDENTITY = Identity("open", "admin", ROLE_RIGHTS["admin"], source="open")


def identity_for(rec: TokenRecord) -> Identity:
    """The Identity granted by a stored token record."""
    return Identity(
        rec.name, rec.role, ROLE_RIGHTS[rec.role], rec.devices, rec.commands, rec.source, rec.name
    )


# -- credentials and checkers ----------------------------------------------------------------------


class IToken(ICredentials):
    """A bearer token."""

    token = Attribute("the plain token (str)")


class INetworkAddress(ICredentials):
    """No credential: only where the connection comes from."""

    host = Attribute("the peer's IP address (str)")
    face = Attribute("botlink, line, camera, web, peer")
    legacy = Attribute("True for a dialect that cannot carry a token")


@implementer(IToken)
@attrs.frozen
class TokenCredentials:
    """A bearer token presented by a client (hello ``token``, ``?token=``, ``Bearer``)."""

    token: str


@implementer(INetworkAddress)
@attrs.frozen
class NetworkCredentials:
    """The address of a connection that presented no token (``lan`` mode's trusted networks)."""

    host: str
    face: str = ""
    legacy: bool = False


def address_class(host: str) -> str:
    """``loopback``, ``private`` (RFC 1918, link-local, IPv6 ULA, CGNAT) or ``public``; ``local``
    for a non-IP peer (UNIX socket, in-process). Unparseable hosts are ``public`` (the safe side)."""
    if host in ("", "local", "unix"):
        return "local"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "public"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local or ip.is_private or ip in ipaddress.ip_network("100.64.0.0/10"):
        return "private"
    return "public"


@implementer(ICredentialsChecker)
class TokenChecker:
    """Checks :class:`TokenCredentials` against a :class:`~robonet.tokens.TokenStore` (hashed file
    tokens and config-file tokens). The avatar id is the record name (bytes)."""

    credentialInterfaces = (IToken,)

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        """Fire with the token's name, or fail with UnauthorizedLogin."""
        rec = self.store.lookup(credentials.token)
        if rec is None:
            return defer.fail(cred_error.UnauthorizedLogin("invalid or revoked token"))
        return defer.succeed(b"token:" + rec.name.encode())


@implementer(ICredentialsChecker)
class NetworkChecker:
    """Grants identities by address (``lan`` mode, docs/security.rst "Modes").

    - the web face without a token, from anywhere allowed: ``anonymous`` — read-only plus data
      from WebSocket robots; dashboards need a token to command (a browser on the hub itself
      can be steered by any web page it visits, so loopback is not trusted there).
    - loopback and in-process: ``local`` — trusted as before auth existed (publish, command,
      request, read); admin needs a token.
    - private networks (and ``auth.allow``): legacy dialects get the same rights as loopback;
      others (robonet/1 without a token, dashboards) may publish data and read, but not command.
    - public addresses not in ``auth.allow``: refused.
    """

    credentialInterfaces = (INetworkAddress,)

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allow = tuple(ipaddress.ip_network(c, strict=False) for c in allow)

    def klass(self, host: str) -> str:
        """address_class, with ``auth.allow`` networks counted as private."""
        kind = address_class(host)
        if kind == "public" and self.allow:
            try:
                ip = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return kind
            if any(ip in net for net in self.allow):
                return "private"
        return kind

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        """Fire with ``net:<class>:<legacy>:<host>``, or fail for a public address."""
        kind = self.klass(credentials.host)
        if kind == "public":
            return defer.fail(cred_error.UnauthorizedLogin(f"address {credentials.host} is not allowed"))
        legacy = "1" if credentials.legacy else "0"
        face = str(credentials.face).replace(":", "_")
        return defer.succeed(f"net:{kind}:{legacy}:{face}:{credentials.host}".encode())


@implementer(ICredentialsChecker)
class PasswordChecker:
    """The camera face's shared password (spec/camera.md): UsernamePassword, any username."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, password: Callable[[], str]) -> None:
        self.password = password

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        """Constant-time comparison with the configured password."""
        import hmac

        want = self.password().encode()
        got = (
            credentials.password
            if isinstance(credentials.password, bytes)
            else str(credentials.password).encode()
        )
        if want and hmac.compare_digest(want, got):
            return defer.succeed(b"camera")
        return defer.fail(cred_error.UnauthorizedLogin("wrong camera password"))


_LOCAL_RIGHTS = frozenset({PUBLISH, COMMAND, REQUEST, READ})
_LAN_RIGHTS = frozenset({PUBLISH, READ})


@implementer(IRealm)
class Realm:
    """Turns avatar ids from the checkers into :class:`Identity` avatars."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def identity(self, avatar_id: bytes) -> Identity:
        """The Identity for one avatar id (raises UnauthorizedLogin if a token vanished meanwhile)."""
        text = avatar_id.decode()
        kind, _, rest = text.partition(":")
        if kind == "token":
            rec = self.store.get(rest)
            if rec is None:
                raise cred_error.UnauthorizedLogin("revoked token")
            return identity_for(rec)
        if kind == "net":
            klass, legacy, face, host = rest.split(":", 3)
            if face == "web":  # a browser on any address: read-only (and WebSocket robots' data)
                return Identity(f"anonymous@{host}", "viewer", _LAN_RIGHTS, ("*",), source="network")
            if klass in ("loopback", "local"):
                return Identity(f"local@{host}", "operator", _LOCAL_RIGHTS, ("*",), source="network")
            if legacy == "1":
                return Identity(f"lan@{host}", "operator", _LOCAL_RIGHTS, ("*",), source="network")
            return Identity(f"lan@{host}", "viewer", _LAN_RIGHTS, ("*",), source="network")
        if kind == "camera":
            return Identity("camera", "operator", frozenset({COMMAND, READ}), source="password")
        raise cred_error.UnauthorizedLogin(f"unknown avatar {text!r}")

    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, Any, Callable[[], None]]:
        """IRealm: only IIdentity avatars exist."""
        if IIdentity not in interfaces:
            raise NotImplementedError("robonet's realm only provides IIdentity")
        return IIdentity, self.identity(avatarId), lambda: None


# -- sessions ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Session:
    """One live connection's login: its identity, face, address and close callback."""

    identity: Identity
    face: str
    address: str
    close: Callable[[str], object]


class Sessions:
    """Live sessions per credential name, so a revoked credential's connections can be closed."""

    def __init__(self) -> None:
        self._by_credential: dict[str, set[Session]] = {}

    def add(self, identity: Identity, face: str, address: str, close: Callable[[str], object]) -> Session:
        """Register a live connection; ``close(reason)`` is called if its credential is revoked."""
        s = Session(identity, face, address, close)
        if identity.credential:
            self._by_credential.setdefault(identity.credential, set()).add(s)
        return s

    def remove(self, session: Session | None) -> None:
        """Forget a session (its connection closed). Unknown sessions are ignored."""
        if session is None:
            return
        group = self._by_credential.get(session.identity.credential)
        if group is not None:
            group.discard(session)
            if not group:
                del self._by_credential[session.identity.credential]

    def count(self, credential: str | None = None) -> int:
        """Live sessions in all (or of one credential)."""
        if credential is not None:
            return len(self._by_credential.get(credential, ()))
        return sum(len(g) for g in self._by_credential.values())

    def credentials(self) -> list[str]:
        """Names of credentials with live sessions."""
        return list(self._by_credential)

    def close_credential(self, credential: str, reason: str = "revoked") -> int:
        """Close every session of ``credential``; returns how many."""
        group = self._by_credential.pop(credential, set())
        for s in list(group):
            try:
                s.close(reason)
            except Exception:
                Auth.log.failure("closing a {face} session of {name} failed", face=s.face, name=credential)
        return len(group)


# -- the authorizer ------------------------------------------------------------------------------


def _matches(value: str, patterns: tuple[str, ...]) -> bool:
    return any(value == p or fnmatch.fnmatchcase(value, p) for p in patterns)


class Authorizer:
    """The one authorization decision (docs/security.rst "Roles").

    :meth:`check` raises :class:`Forbidden` or returns None. Denials are counted in
    ``denied[(face, reason)]`` and logged once per (identity, reason) per ``log_interval`` s of
    ``clock`` time.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, log_interval: float = DENY_LOG_INTERVAL) -> None:
        self.clock = clock
        self.log_interval = log_interval
        self.denied: dict[tuple[str, str], int] = {}
        self._logged: dict[tuple[str, str], float] = {}

    def decide(self, identity: Identity, action: str, target: str = "", mtype: str = "") -> str | None:
        """The pure decision: None if allowed, else the denial reason (no counting)."""
        rights = identity.rights
        if action == PUBLISH:
            if PUBLISH not in rights:
                return "no_right"
            if identity.devices:
                return None if _matches(target, identity.devices) else "not_own_device"
            if identity.role == "robot":
                return None if target == identity.name else "not_own_device"
            return None
        if action == COMMAND:
            if COMMAND not in rights:
                return "no_right"
            if identity.commands and mtype not in identity.commands and mtype != "stop":
                return "command_type"
            if identity.devices and target != "*" and not _matches(target, identity.devices):
                return "device_pattern"
            if identity.devices and target == "*" and identity.devices != ("*",):
                return "device_pattern"  # a broadcast would reach robots outside the patterns
            return None
        if action == REQUEST:
            if REQUEST in rights or (READ in rights and mtype in READ_ENDPOINTS):
                return None
            return "no_right"
        return None if action in rights else "no_right"

    def check(
        self, identity: Identity, action: str, target: str = "", mtype: str = "", face: str = ""
    ) -> None:
        """Allow or raise :class:`Forbidden` (counted and rate-limited logged)."""
        reason = self.decide(identity, action, target, mtype)
        if reason is None:
            return
        self.deny(
            identity,
            reason,
            face,
            f"{identity.name} ({identity.role}) may not {action}"
            + (f" {mtype}" if mtype else "")
            + (f" on {target}" if target else ""),
        )

    def deny(self, identity: Identity, reason: str, face: str, message: str) -> None:
        """Count, log (rate-limited) and raise a denial decided elsewhere (e.g. a lease)."""
        key = (face or "hub", reason)
        self.denied[key] = self.denied.get(key, 0) + 1
        now = self.clock.seconds()
        lkey = (identity.name, reason)
        last = self._logged.get(lkey)
        if last is None or now - last >= self.log_interval:
            if len(self._logged) > 4096:
                self._logged.clear()
            self._logged[lkey] = now
            self.log.warn(
                "auth: denied {identity} on {face}: {reason} ({message})",
                identity=identity.name,
                face=face or "hub",
                reason=reason,
                message=message,
            )
        raise Forbidden(reason, message)

    def count_refused(self, face: str, reason: str) -> None:
        """Count a refused login (``robonet_auth_denied_total{face,reason}``)."""
        key = (face or "hub", reason)
        self.denied[key] = self.denied.get(key, 0) + 1


# -- the service the daemon runs -----------------------------------------------------------------


class Auth(Service):
    """The auth core of one hub: mode, token store, portal, authorizer, sessions, store watcher.

    ``mode`` is ``lan``, ``token`` or ``open`` (docs/security.rst). ``clock`` drives the watcher
    (every ``poll_interval`` s: reload the token file if it changed and close the sessions of
    credentials that disappeared). ``camera_password`` is a callable returning the camera's
    current password (the camera face owns generating it).
    """

    log = Logger()
    name = "auth"

    def __init__(
        self,
        mode: str,
        store: TokenStore,
        clock: IReactorTime,
        *,
        allow: Iterable[str] = (),
        camera_password: Callable[[], str] | None = None,
        poll_interval: float = 1.0,
        audit: Any = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"auth mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.store = store
        self.clock = clock
        self.audit = audit
        self.authorizer = Authorizer(clock)
        self.sessions = Sessions()
        self.network = NetworkChecker(allow)
        self.realm = Realm(store)
        checkers: list[ICredentialsChecker] = [TokenChecker(store)]
        if mode == "lan":
            checkers.append(self.network)
        if camera_password is not None:
            checkers.append(PasswordChecker(camera_password))
        self.portal = Portal(self.realm, checkers)
        self.poll_interval = poll_interval
        self._loop: task.LoopingCall | None = None

    # -- service --

    def startService(self) -> None:
        """Start watching the token file."""
        super().startService()
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.poll_interval, now=False)

    def stopService(self) -> defer.Deferred[None] | None:
        """Stop the watcher."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()  # type: ignore[no-any-return]

    def poll(self) -> int:
        """Reload a changed token file; close sessions whose credential is gone. Returns closed count."""
        try:
            changed = self.store.poll()
        except Exception as e:
            self.log.error("auth: cannot reload the token file: {error}", error=str(e))
            return 0
        if not changed:
            return 0
        return self.close_revoked()

    def close_revoked(self) -> int:
        """Close the live sessions of every credential no longer in the store."""
        closed = 0
        for name in self.sessions.credentials():
            if self.store.get(name) is None:
                n = self.sessions.close_credential(name, "revoked")
                closed += n
                self.log.info("auth: token {name} revoked, closed {n} connection(s)", name=name, n=n)
        return closed

    # -- login --

    @property
    def open(self) -> bool:
        """True in ``open`` mode (every connection is OPEN_IDENTITY)."""
        return self.mode == "open"

    def login(self, credentials: Any) -> defer.Deferred[Identity]:
        """Ask the portal; fires with an Identity or fails with :class:`Unauthorized`."""
        if self.open:
            return defer.succeed(OPEN_IDENTITY)

        def refused(f: Failure) -> Failure:
            f.trap(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials)
            reason = "bad_credential" if IToken.providedBy(credentials) else "address"
            if IUsernamePassword.providedBy(credentials):
                reason = "bad_password"
            if isinstance(credentials, NetworkCredentials) and self.mode == "token":
                reason = "no_credential"
            return Failure(Unauthorized(reason, str(f.value) or "credential required"))

        d: defer.Deferred[Any] = self.portal.login(credentials, None, IIdentity)
        d.addCallback(lambda result: result[1])
        return d.addErrback(refused)

    def login_now(self, token: str | None, host: str, face: str, *, legacy: bool = False) -> Identity:
        """Synchronous login from a face: ``token`` if the dialect carried one, else the address.

        Raises :class:`Unauthorized` (counted per face) when refused.
        """
        creds: Any = TokenCredentials(token) if token else NetworkCredentials(host, face, legacy)
        result: list[Any] = []
        self.login(creds).addBoth(result.append)
        out = result[0] if result else Failure(Unauthorized("internal", "login did not complete"))
        if isinstance(out, Failure):
            err = out.value
            if isinstance(err, Unauthorized):
                self.authorizer.count_refused(face, err.reason)
                raise err
            out.raiseException()
        return out  # type: ignore[no-any-return]

    def check(
        self, identity: Identity, action: str, target: str = "", mtype: str = "", face: str = ""
    ) -> None:
        """Shortcut for ``self.authorizer.check`` (open mode allows everything)."""
        if self.open:
            return
        self.authorizer.check(identity, action, target, mtype, face)
