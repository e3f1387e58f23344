"""TLS helpers (robonet/tls.py): the self-signed certificate, its fingerprint, pinned clients."""

from __future__ import annotations

import datetime
from pathlib import Path

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest

from robonet.tls import (
    PinMismatch,
    check_pin,
    ensure_self_signed,
    fingerprint,
    normalise_fingerprint,
    pinned_client_endpoint,
    ssl_listen,
)

NOW = datetime.datetime(2026, 12, 4, tzinfo=datetime.UTC)


class CertificateTests(unittest.SynchronousTestCase):
    """Created once, key private, fingerprint stable."""

    def test_created_once(self) -> None:
        """The second call reuses the files (the pinned fingerprint does not change)."""
        state = Path(self.mktemp())
        cert, key, created = ensure_self_signed(state, "hub-a", NOW)
        self.assertTrue(created)
        self.assertEqual(key.stat().st_mode & 0o777, 0o600)
        fp = fingerprint(cert.read_bytes())
        self.assertEqual(len(fp), 95)
        _, _, again = ensure_self_signed(state, "hub-a", NOW)
        self.assertFalse(again)
        self.assertEqual(fingerprint(cert.read_bytes()), fp)

    def test_pin_checks(self) -> None:
        """Fingerprint spellings normalise; a different certificate does not match."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        cert, _, _ = ensure_self_signed(Path(self.mktemp()), "a", NOW)
        other, _, _ = ensure_self_signed(Path(self.mktemp()), "a", NOW)
        der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
        fp = fingerprint(cert.read_bytes())
        check_pin(der, fp.lower().replace(":", ""))
        self.assertRaises(PinMismatch, check_pin, der, fingerprint(other.read_bytes()))
        self.assertRaises(PinMismatch, check_pin, None, fp)
        self.assertRaises(ValueError, normalise_fingerprint, "abc")

    def test_ssl_listen(self) -> None:
        """ssl: descriptions get escaped key/cert paths; others are unchanged."""
        self.assertEqual(
            ssl_listen("ssl:8443", "/s/c:1.pem", "/s/k.pem"),
            "ssl:8443:privateKey=/s/k.pem:certKey=/s/c\\:1.pem",
        )
        self.assertEqual(ssl_listen("tcp:8000", "c", "k"), "tcp:8000")


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.got: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"hi")

    def dataReceived(self, data: bytes) -> None:
        if not self.got.called:
            self.got.callback(data)


class PinnedConnectionTests(unittest.TestCase):
    """A real TLS listener on 127.0.0.1 (the daemon's ssl_listen string) and a pinned client."""

    timeout = 20

    @defer.inlineCallbacks
    def test_pinned_client(self) -> defer.Generator[defer.Deferred[object], object, None]:
        """The right pin talks; a wrong pin fails the handshake."""
        cert, key, _ = ensure_self_signed(Path(self.mktemp()), "localhost", NOW)
        other, _, _ = ensure_self_signed(Path(self.mktemp()), "localhost", NOW)
        desc = ssl_listen("ssl:0:interface=127.0.0.1", cert, key)
        port = yield endpoints.serverFromString(reactor, desc).listen(protocol.Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        portno = port.getHost().port
        ep = pinned_client_endpoint(reactor, "127.0.0.1", portno, fingerprint(cert.read_bytes()))
        client = yield endpoints.connectProtocol(ep, Client())
        data = yield client.got
        self.assertEqual(data, b"hi")
        client.transport.loseConnection()
        bad = pinned_client_endpoint(reactor, "127.0.0.1", portno, fingerprint(other.read_bytes()))
        client2 = yield endpoints.connectProtocol(bad, Client())
        lost: defer.Deferred[None] = defer.Deferred()
        client2.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]
        yield lost
        self.assertFalse(client2.got.called)


class DaemonTlsTests(unittest.TestCase):
    """tls.mode = auto on the real daemon: the ssl: bot link, and BotClient pinning its fingerprint."""

    timeout = 60

    def test_botclient_pins_daemon_certificate(self) -> None:
        """The daemon logs its fingerprint; BotClient(fingerprint=) says hello over TLS with it, and
        refuses a different pin."""
        import re

        from robonet.client import BotClient
        from tests.daemon import free_port, start_daemon

        port = free_port()
        daemon = start_daemon(
            self,
            faces=("botlink",),
            store=False,
            env={
                "ROBONET_TLS_MODE": "auto",
                "ROBONET_TLS_BOTLINK_LISTEN": f"ssl:{port}:interface=127.0.0.1",
                "ROBONET_TLS_LINE_LISTEN": "none",
                "ROBONET_TLS_WEB_LISTEN": "none",
            },
            ports={"ssl": port},
        )
        match = re.search(r"fingerprint ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})", daemon.log())
        self.assertIsNotNone(match, daemon.log()[-2000:])
        fp = match.group(1)  # type: ignore[union-attr]
        with BotClient("127.0.0.1", port, role="client", fingerprint=fp, auto_reconnect=False) as c:
            self.assertEqual(c.request("ping")["pong"], True)
        wrong = "00:" * 31 + "00"
        bad = BotClient("127.0.0.1", port, role="client", fingerprint=wrong, auto_reconnect=False)
        self.assertRaises(PinMismatch, bad.connect)
