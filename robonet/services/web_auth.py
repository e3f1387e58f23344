"""The web face's side of the security model (docs/security.rst): who a request is, admin REST.

- :func:`request_token` / :func:`request_identity`: a request's credential (``Authorization:
  Bearer``, else ``?token=``) turned into an :class:`~robonet.auth.Identity` by the hub's auth
  core (without one attached, the old ``[auth] tokens`` check);
- ``GET /api/auth/whoami``: the caller's identity (``401`` without one);
- ``GET /api/auth/tokens``, ``POST /api/auth/tokens`` (``{"name","role","devices","commands"}``
  -> ``201 {"token": ..., "record": ...}``, the plain token shown once), ``DELETE
  /api/auth/tokens/<name>``: admin only; writes need the token in the ``Authorization`` header
  (a ``?token=`` in a URL could be replayed by a forged form);
- ``GET /api/audit?limit=N``: the audit log (admin);
- ``GET /api/leases``: who controls which robot (read).

Errors: ``401 {"error", "code": "unauthorized"}``, ``403 {"error", "code": "forbidden",
"reason"}``; every refusal is counted (``hub.stats.error``, ``robonet_auth_denied_total``).
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.web.http import Request
from twisted.web.resource import Resource

from robonet.auth import ADMIN, OPEN_IDENTITY, READ, Forbidden, Identity, Unauthorized
from robonet.tokens import TokenError

MAX_BODY = 65536


def _json(request: Request, obj: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return orjson.dumps(obj)


def request_token(request: Request, header_only: bool = False) -> str | None:
    """The bearer token of ``request``: the ``Authorization: Bearer`` header, else ``?token=``."""
    header = request.getHeader(b"authorization")
    if header and header[:7].lower() == b"bearer ":
        return header[7:].strip().decode("utf-8", "replace") or None
    if header_only:
        return None
    values = (request.args or {}).get(b"token")
    if values:
        return values[0].decode("utf-8", "replace") or None
    return None


def client_host(request: Request) -> str:
    """The peer's IP address ("" when not an IP connection)."""
    addr = request.getClientAddress()
    return str(getattr(addr, "host", "") or "")


def request_identity(config: Any, hub: Any, request: Request, header_only: bool = False) -> Identity:
    """Authenticate ``request`` through ``hub.auth``; raises :class:`~robonet.auth.Unauthorized`.

    Without an auth core (unit tests building a bare Hub) it falls back to ``[auth] tokens``.
    """
    token = request_token(request, header_only)
    auth = getattr(hub, "auth", None)
    if auth is None:
        if config.auth.mode != "token" or (token and token in config.auth.tokens):
            return OPEN_IDENTITY
        raise Unauthorized("no_credential", "a valid token is required")
    return auth.login_now(token, client_host(request), "web")  # type: ignore[no-any-return]


def read_allowed(config: Any, hub: Any, request: Request) -> bool:
    """True when the request may read (REST GET, metrics); counts a refusal."""
    try:
        identity = request_identity(config, hub, request)
        if getattr(hub, "auth", None) is not None:
            hub.authorize(identity, READ, request.path.decode("utf-8", "replace"), face="web")
    except (Unauthorized, Forbidden):
        return False
    return True


def _refuse(request: Request, hub: Any, err: Exception) -> bytes:
    if isinstance(err, Forbidden):
        return _json(request, {"error": err.message, "code": "forbidden", "reason": err.reason}, 403)
    hub.stats.error("unauthorized")
    request.setHeader(b"www-authenticate", b'Bearer realm="robonet"')
    message = getattr(err, "message", str(err))
    return _json(request, {"error": f"unauthorized: {message}", "code": "unauthorized"}, 401)


class _AuthResource(Resource):
    def __init__(self, config: Any, hub: Any) -> None:
        super().__init__()
        self.config = config
        self.hub = hub

    def _identity(self, request: Request, right: str, header_only: bool = False) -> Identity:
        identity = request_identity(self.config, self.hub, request, header_only)
        if getattr(self.hub, "auth", None) is not None:
            self.hub.authorize(identity, right, request.path.decode("utf-8", "replace"), face="web")
        return identity


class WhoamiResource(_AuthResource):
    """``GET /api/auth/whoami`` -> the caller's identity, plus the hub's auth mode."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """Render the identity or 401."""
        try:
            identity = request_identity(self.config, self.hub, request)
        except Unauthorized as e:
            return _refuse(request, self.hub, e)
        mode = self.hub.auth.mode if getattr(self.hub, "auth", None) is not None else self.config.auth.mode
        return _json(request, {"identity": identity.as_dict(), "mode": mode})


class TokensResource(_AuthResource):
    """``/api/auth/tokens``: list (GET), add (POST), revoke (DELETE ``/<name>``); admin only."""

    isLeaf = True

    def _store(self) -> Any:
        auth = getattr(self.hub, "auth", None)
        return auth.store if auth is not None else None

    def render_GET(self, request: Request) -> bytes:
        """List the tokens (never the tokens themselves)."""
        try:
            self._identity(request, ADMIN)
        except (Unauthorized, Forbidden) as e:
            return _refuse(request, self.hub, e)
        store = self._store()
        records = [r.public() for r in store.records()] if store is not None else []
        return _json(request, {"tokens": records})

    def render_POST(self, request: Request) -> bytes:
        """Create a token; ``201 {"token", "record"}``."""
        try:
            identity = self._identity(request, ADMIN, header_only=True)
        except (Unauthorized, Forbidden) as e:
            return _refuse(request, self.hub, e)
        store = self._store()
        if store is None:
            return _json(request, {"error": "no credential store on this hub"}, 503)
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        try:
            body = orjson.loads(raw) if len(raw) <= MAX_BODY else None
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self.hub.stats.error("bad_json")
            return _json(request, {"error": "expected a JSON object {name, role, devices?, commands?}"}, 400)
        devices, commands = body.get("devices") or [], body.get("commands") or []
        if isinstance(devices, str):
            devices = [d for d in devices.split(",") if d]
        if isinstance(commands, str):
            commands = [c for c in commands.split(",") if c]
        if not all(isinstance(x, str) for x in [*devices, *commands]):
            return _json(request, {"error": "devices and commands must be lists of strings"}, 400)
        try:
            rec, token = store.add(
                str(body.get("name", "")), str(body.get("role", "")), self.hub.now(), devices, commands
            )
        except TokenError as e:
            self._audit(request, identity, "token_add", str(body.get("name", "")), f"error:{e}")
            return _json(request, {"error": str(e)}, 409 if "exists" in str(e) else 400)
        self._audit(request, identity, "token_add", rec.name, "ok")
        return _json(request, {"token": token, "record": rec.public()}, 201)

    def render_DELETE(self, request: Request) -> bytes:
        """Revoke ``/api/auth/tokens/<name>``; its live connections are closed at once."""
        try:
            identity = self._identity(request, ADMIN, header_only=True)
        except (Unauthorized, Forbidden) as e:
            return _refuse(request, self.hub, e)
        postpath = getattr(request, "postpath", None)
        name = postpath[0].decode("utf-8", "replace") if postpath else ""
        store = self._store()
        if store is None or not name:
            return _json(request, {"error": "DELETE /api/auth/tokens/<name>"}, 400)
        try:
            rec = store.revoke(name)
        except TokenError as e:
            self._audit(request, identity, "token_revoke", name, f"error:{e}")
            return _json(request, {"error": str(e)}, 404)
        closed = self.hub.auth.close_revoked()
        self._audit(request, identity, "token_revoke", rec.name, "ok")
        return _json(request, {"revoked": rec.name, "closed": closed})

    def _audit(self, request: Request, identity: Identity, action: str, target: str, outcome: str) -> None:
        audit = getattr(self.hub, "audit", None)
        if audit is not None:
            audit.record(
                self.hub.now(),
                identity,
                face="web",
                address=client_host(request),
                action=action,
                target=target,
                outcome=outcome,
            )


class AuditResource(_AuthResource):
    """``GET /api/audit?limit=N`` (default 100, at most the ring's size): admin only."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """The newest audit entries, oldest first."""
        try:
            self._identity(request, ADMIN)
        except (Unauthorized, Forbidden) as e:
            return _refuse(request, self.hub, e)
        audit = getattr(self.hub, "audit", None)
        try:
            limit = int((request.args or {}).get(b"limit", [b"100"])[0])
        except ValueError:
            return _json(request, {"error": "limit must be an integer", "param": "limit"}, 400)
        entries = audit.recent(max(0, min(limit, 100000))) if audit is not None else []
        total = audit.total if audit is not None else 0
        return _json(request, {"entries": entries, "total": total})


class LeasesResource(_AuthResource):
    """``GET /api/leases``: every control lease (read)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """The lease table."""
        try:
            self._identity(request, READ)
        except (Unauthorized, Forbidden) as e:
            return _refuse(request, self.hub, e)
        leases = getattr(self.hub, "leases", None)
        return _json(request, {"leases": leases.all() if leases is not None else []})


def auth_resources(config: Any, hub: Any) -> dict[str, Resource]:
    """``{path: resource}`` to mount on the web face's ``/api``."""
    auth = Resource()
    auth.putChild(b"whoami", WhoamiResource(config, hub))
    auth.putChild(b"tokens", TokensResource(config, hub))
    return {
        "auth": auth,
        "audit": AuditResource(config, hub),
        "leases": LeasesResource(config, hub),
    }
