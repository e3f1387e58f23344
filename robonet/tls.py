"""TLS for the web face and the bot/line links (docs/security.rst "TLS"; ``[tls]`` config).

- ``mode = "auto"``: :func:`ensure_self_signed` creates one ECDSA P-256 key and a self-signed
  certificate in ``<state_dir>/tls/`` on first start (never again: the fingerprint that clients
  pin stays the same), valid for this host's name, ``localhost``, 127.0.0.1 and ::1.
- ``mode = "files"``: ``[tls] cert`` and ``key`` name a PEM pair (e.g. from Let's Encrypt).

:func:`fingerprint` is the SHA-256 of the certificate's DER form (``AB:CD:...``), logged at start.
Clients pin it: :func:`check_pin` for blocking sockets (``BotClient(fingerprint=...)``) and
:func:`pinned_client_endpoint` / :class:`PinnedCertificateOptions` for Twisted clients
(``robonet.client.tx``, peer links): the chain is not checked against any CA, only the pin.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import ssl as _ssl
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from zope.interface import implementer

TLS_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
VALID_DAYS = 3650


class PinMismatch(Exception):
    """The server's certificate does not have the pinned SHA-256 fingerprint."""


def normalise_fingerprint(text: str) -> str:
    """``AB:CD:..`` upper-case hex with colons from any of ``abcd..``, ``AB:CD``, ``sha256:abcd``."""
    hexpart = text.strip().lower().removeprefix("sha256:").replace(":", "").replace(" ", "")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"not a SHA-256 fingerprint: {text!r}")
    return ":".join(hexpart[i : i + 2] for i in range(0, 64, 2)).upper()


def fingerprint_der(der: bytes) -> str:
    """SHA-256 fingerprint of a DER certificate, ``AB:CD:...``."""
    return normalise_fingerprint(hashlib.sha256(der).hexdigest())


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate in ``cert_pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(cert_pem)
    return fingerprint_der(cert.public_bytes(Encoding.DER))


def ensure_self_signed(
    state_dir: str | Path, hostname: str, now: datetime.datetime
) -> tuple[Path, Path, bool]:
    """Create ``<state_dir>/tls/{cert,key}.pem`` unless both exist; returns (cert, key, created).

    ``now`` (aware UTC) starts the validity (a day earlier, for skewed clocks). The key file is 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(state_dir) / TLS_DIR
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path, False
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    if hostname and hostname != "localhost":
        names.insert(0, x509.DNSName(hostname))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname or "robonet")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, True


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def ssl_listen(desc: str, cert: str | Path, key: str | Path) -> str:
    """Add ``privateKey=``/``certKey=`` to an ``ssl:`` server endpoint string that lacks them.

    Other descriptions (``tcp:``...) come back unchanged.
    """
    if not desc.lower().startswith("ssl:") or "privatekey=" in desc.lower():
        return desc
    return f"{desc}:privateKey={_escape(str(key))}:certKey={_escape(str(cert))}"


# -- pinning ---------------------------------------------------------------------------------------


def check_pin(der: bytes | None, pinned: str) -> None:
    """Raise :class:`PinMismatch` unless the DER certificate has fingerprint ``pinned``."""
    want = normalise_fingerprint(pinned)
    got = fingerprint_der(der) if der else ""
    if not hmac.compare_digest(want, got):
        raise PinMismatch(f"server certificate fingerprint {got or 'none'} is not the pinned {want}")


def pinned_ssl_context() -> _ssl.SSLContext:
    """A stdlib client context that skips CA checks; the caller must :func:`check_pin` afterwards."""
    ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = _ssl.CERT_NONE
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    return ctx


def wrap_pinned(sock: Any, pinned: str, server_hostname: str | None = None) -> _ssl.SSLSocket:
    """TLS-wrap a connected blocking socket and check the pin (closes it on a mismatch)."""
    tls = pinned_ssl_context().wrap_socket(sock, server_hostname=server_hostname)
    try:
        check_pin(tls.getpeercert(binary_form=True), pinned)
    except PinMismatch:
        tls.close()
        raise
    return tls


@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificateOptions:
    """Twisted client TLS options accepting exactly the certificate with SHA-256 ``fingerprint``."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = normalise_fingerprint(fingerprint)
        self._ctx = SSL.Context(SSL.TLS_METHOD)
        self._ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._ctx.set_verify(SSL.VERIFY_PEER, self._verify)

    def _verify(self, conn: Any, x509: Any, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True  # only the leaf is pinned
        from OpenSSL.crypto import FILETYPE_ASN1, dump_certificate

        der = dump_certificate(FILETYPE_ASN1, x509)
        return hmac.compare_digest(fingerprint_der(der), self.fingerprint)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """IOpenSSLClientConnectionCreator."""
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        return conn


def pinned_client_endpoint(reactor: Any, host: str, port: int, fingerprint: str) -> IStreamClientEndpoint:
    """A TLS client endpoint to ``host:port`` that accepts only the pinned certificate."""
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    return wrapClientTLS(
        PinnedCertificateOptions(fingerprint), HostnameEndpoint(reactor, host, port, timeout=10)
    )
