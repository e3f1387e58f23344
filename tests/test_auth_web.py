"""The web face's security (robonet/services/web_auth.py): identities, admin REST, audit, metrics."""

from __future__ import annotations

import io
from typing import Any

import orjson
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.trial import unittest
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from robonet.audit import AuditLog
from robonet.auth import Auth
from robonet.config import load_config
from robonet.hub import Hub
from robonet.services.web import make_site
from robonet.tokens import TokenStore


def call(
    site: Any,
    path: str,
    method: bytes = b"GET",
    *,
    token: str | None = None,
    query_token: str | None = None,
    body: Any = None,
    host: str = "127.0.0.1",
) -> tuple[int, Any]:
    raw_path, _, query = path.partition("?")
    request = DummyRequest([s.encode() for s in raw_path.split("/")[1:]])
    request.method = method
    request.uri = path.encode()
    request.path = raw_path.encode()
    request.client = IPv4Address("TCP", host, 40000)
    for part in filter(None, query.split("&")):
        k, _, v = part.partition("=")
        request.args.setdefault(k.encode(), []).append(v.encode())
    if query_token:
        request.args[b"token"] = [query_token.encode()]
    if token:
        request.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
    request.content = io.BytesIO(orjson.dumps(body) if body is not None else b"")
    resource = getChildForRequest(site.resource, request)
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    raw = b"".join(request.written)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = raw
    return request.responseCode or 200, parsed


class WebAuthTests(unittest.SynchronousTestCase):
    """lan mode hub with an admin, an operator and a viewer token."""

    def setUp(self) -> None:
        state = self.mktemp()
        self.config = load_config(environ={}, overrides={"hub": {"state_dir": state}})
        self.clock = task.Clock()
        self.hub = Hub(self.config, self.clock)
        store = TokenStore(state)
        self.hub.auth = Auth("lan", store, self.clock)
        self.hub.audit = AuditLog(100)
        _, self.admin = store.add("root", "admin", 0.0)
        _, self.viewer = store.add("v", "viewer", 0.0)
        self.site = make_site(self.config, self.hub, self.clock)

    def test_whoami(self) -> None:
        """whoami names the token's identity; a browser without a token is the read-only anonymous."""
        code, body = call(self.site, "/api/auth/whoami", token=self.viewer)
        self.assertEqual((code, body["identity"]["name"], body["mode"]), (200, "v", "lan"))
        code, body = call(self.site, "/api/auth/whoami")
        self.assertEqual((code, body["identity"]["role"]), (200, "viewer"))
        self.assertNotIn("command", body["identity"]["rights"])
        code, body = call(self.site, "/api/auth/whoami", token="rn_bad")
        self.assertEqual((code, body["code"]), (401, "unauthorized"))

    def test_public_address_refused(self) -> None:
        """lan mode: a public address without a token gets 401 on the API and metrics, counted."""
        self.assertEqual(call(self.site, "/api/devices", host="8.8.8.8")[0], 401)
        self.assertEqual(call(self.site, "/metrics", host="8.8.8.8")[0], 401)
        self.assertEqual(call(self.site, "/api/devices", host="192.168.1.4")[0], 200)
        self.assertEqual(call(self.site, "/api/devices", host="8.8.8.8", token=self.viewer)[0], 200)
        self.assertEqual(self.hub.auth.authorizer.denied[("web", "address")], 2)

    def test_admin_manages_tokens(self) -> None:
        """An admin adds (token shown once), lists (no secrets) and revokes tokens; each is audited."""
        code, body = call(
            self.site,
            "/api/auth/tokens",
            b"POST",
            token=self.admin,
            body={"name": "alice", "role": "operator", "devices": ["robot_*"]},
        )
        self.assertEqual(code, 201)
        alice = body["token"]
        self.assertEqual(self.hub.auth.login_now(alice, "10.0.0.1", "web").devices, ("robot_*",))
        code, body = call(self.site, "/api/auth/tokens", token=self.admin)
        self.assertEqual(sorted(t["name"] for t in body["tokens"]), ["alice", "root", "v"])
        self.assertNotIn(alice, orjson.dumps(body).decode())
        code, body = call(self.site, "/api/auth/tokens/alice", b"DELETE", token=self.admin)
        self.assertEqual((code, body["revoked"]), (200, "alice"))
        code, body = call(self.site, "/api/audit", token=self.admin)
        self.assertEqual([e["action"] for e in body["entries"]], ["token_add", "token_revoke"])
        self.assertEqual(body["entries"][0]["identity"], "root")

    def test_non_admin_refused(self) -> None:
        """A viewer (or anonymous loopback) may not list, add, revoke or read the audit: 403/401,
        counted, nothing changes; a write with ?token= instead of the header is refused too."""
        before = [r.name for r in self.hub.auth.store.records()]
        for method, path in (
            (b"GET", "/api/auth/tokens"),
            (b"POST", "/api/auth/tokens"),
            (b"DELETE", "/api/auth/tokens/root"),
            (b"GET", "/api/audit"),
        ):
            code, body = call(self.site, path, method, token=self.viewer, body={"name": "x", "role": "admin"})
            self.assertEqual((code, body["code"]), (403, "forbidden"), path)
            code, _ = call(self.site, path, method, body={"name": "x", "role": "admin"})
            self.assertEqual(code, 403, path)
        code, _ = call(
            self.site,
            "/api/auth/tokens",
            b"POST",
            query_token=self.admin,
            body={"name": "x", "role": "admin"},
        )
        self.assertEqual(code, 403)
        self.assertEqual([r.name for r in self.hub.auth.store.records()], before)
        self.assertGreaterEqual(self.hub.auth.authorizer.denied[("web", "no_right")], 9)

    def test_metrics_counts_denials(self) -> None:
        """/metrics exports robonet_auth_denied_total{face,reason}."""
        call(self.site, "/api/audit", token=self.viewer)
        code, text = call(self.site, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b'robonet_auth_denied_total{face="web",reason="no_right"} 1.0', text)
