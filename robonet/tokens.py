"""The credential store: hashed bearer tokens in ``<state_dir>/tokens.json`` (docs/security.rst).

A token is 32 random bytes, URL-safe base64 (43 characters), prefixed ``rn_``. Only its SHA-256
is stored. A slow KDF (scrypt, PBKDF2) exists to protect *guessable* passwords; a 256-bit random
token cannot be brute-forced from its hash, and a fast hash keeps a login cheap, so a flood of
bad hellos cannot burn the hub's CPU. Lookups go by hash and are confirmed with
:func:`hmac.compare_digest` (constant time).

The file is written atomically (temporary file + ``os.replace``) under an ``fcntl`` lock, so the
``robonet`` CLI, the admin REST endpoints and the daemon can share it. :class:`TokenStore`
re-reads it when its (inode, mtime, size) changes; :meth:`TokenStore.poll` is what the daemon's
watcher (robonet.auth.AuthService) calls every second.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson

TOKEN_FILE = "tokens.json"
TOKEN_PREFIX = "rn_"
ROLES = ("robot", "operator", "viewer", "peer", "admin")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")


class TokenError(Exception):
    """A bad store operation (duplicate or unknown name, invalid role); ``str()`` is one line."""


def new_token() -> str:
    """A fresh bearer token: ``rn_`` + 43 characters of URL-safe base64 (256 random bits)."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def token_hash(token: str) -> str:
    """``sha256:<hex>`` of the UTF-8 token (the only form that is stored)."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@attrs.frozen
class TokenRecord:
    """One stored credential: ``name`` (unique), ``role`` (one of ROLES), ``devices`` (device-id
    glob patterns; empty = every device, for a robot: its own name), ``commands`` (command types;
    empty = all), ``hash`` (``sha256:...``), ``created`` (Unix seconds), ``source`` (``file`` or
    ``config`` for ``[auth] tokens``)."""

    name: str
    role: str
    hash: str
    devices: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    created: float = 0.0
    source: str = "file"

    def public(self) -> dict[str, Any]:
        """The record without its hash, for ``token list`` and ``GET /api/auth/tokens``."""
        return {
            "name": self.name,
            "role": self.role,
            "devices": list(self.devices),
            "commands": list(self.commands),
            "created": self.created,
            "source": self.source,
        }


def check_record_fields(name: str, role: str) -> None:
    """Raise :class:`TokenError` for an invalid name or role."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TokenError(f"invalid name {name!r}: 1..64 of A-Z a-z 0-9 _ . @ : -")
    if role not in ROLES:
        raise TokenError(f"invalid role {role!r}: one of {', '.join(ROLES)}")


def _record(obj: Any) -> TokenRecord | None:
    if not isinstance(obj, dict):
        return None
    try:
        rec = TokenRecord(
            name=str(obj["name"]),
            role=str(obj["role"]),
            hash=str(obj["hash"]),
            devices=tuple(str(d) for d in obj.get("devices") or ()),
            commands=tuple(str(c) for c in obj.get("commands") or ()),
            created=float(obj.get("created") or 0.0),
        )
    except (KeyError, TypeError, ValueError):
        return None
    if rec.role not in ROLES or not rec.hash.startswith("sha256:"):
        return None
    return rec


class TokenStore:
    """The token file of one state directory, plus config-file tokens (``[auth] tokens``).

    ``config_tokens`` maps plain token -> role (or ``role:pattern,pattern``), as the old
    ``[auth] tokens`` table did; they are hashed in memory at once and named ``config:<n>``.
    """

    def __init__(self, state_dir: str | Path, config_tokens: dict[str, str] | None = None) -> None:
        self.path = Path(state_dir) / TOKEN_FILE
        self._lock_path = Path(state_dir) / (TOKEN_FILE + ".lock")
        self._by_hash: dict[str, TokenRecord] = {}
        self._by_name: dict[str, TokenRecord] = {}
        self._config: dict[str, TokenRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.load_errors = 0
        for n, (plain, spec) in enumerate(sorted((config_tokens or {}).items()), 1):
            role, _, patterns = spec.partition(":")
            role = role.strip()
            if role == "client":  # the old [auth] role name for scripts and dashboards
                role = "operator"
            if role not in ROLES:
                raise TokenError(f"auth.tokens: invalid role {spec!r} for token #{n}")
            devices = tuple(p.strip() for p in patterns.split(",") if p.strip())
            rec = TokenRecord(f"config:{n}", role, token_hash(plain), devices, source="config")
            self._config[rec.hash] = rec
        self.reload()

    # -- reading --

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def exists(self) -> bool:
        """Whether the token file exists (False on a first start)."""
        return self.path.exists()

    def _read_file(self) -> list[TokenRecord]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            data = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            self.load_errors += 1
            raise TokenError(f"{self.path}: not valid JSON") from None
        items = data.get("tokens", []) if isinstance(data, dict) else []
        records = [r for r in map(_record, items if isinstance(items, list) else []) if r is not None]
        return records

    def reload(self) -> bool:
        """Re-read the file; returns True when its content was (re)loaded. A broken file keeps the
        previous records (and raises :class:`TokenError` so the caller can log it)."""
        stamp = self._file_stamp()
        records = self._read_file()
        self._stamp = stamp
        self._by_name = {r.name: r for r in records}
        self._by_hash = {r.hash: r for r in records}
        return True

    def poll(self) -> bool:
        """Reload if the file changed since the last load; True when it did."""
        if self._file_stamp() == self._stamp:
            return False
        return self.reload()

    def lookup(self, token: str) -> TokenRecord | None:
        """The record for plain ``token`` (file or config), or None. Constant-time confirmation."""
        if not isinstance(token, str) or not token or len(token) > 512:
            return None
        h = token_hash(token)
        rec = self._by_hash.get(h) or self._config.get(h)
        if rec is None or not hmac.compare_digest(rec.hash, h):
            return None
        return rec

    def get(self, name: str) -> TokenRecord | None:
        """The current record called ``name`` (file or config), or None once revoked."""
        rec = self._by_name.get(name)
        if rec is None:
            rec = next((r for r in self._config.values() if r.name == name), None)
        return rec

    def records(self) -> list[TokenRecord]:
        """Every record, file ones first, by name."""
        return sorted(self._by_name.values(), key=lambda r: r.name) + sorted(
            self._config.values(), key=lambda r: r.name
        )

    # -- writing (CLI, admin REST, first start) --

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[TokenRecord]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                records = self._read_file()
                yield records
                self._write(records)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.reload()

    def _write(self, records: list[TokenRecord]) -> None:
        body = {
            "version": 1,
            "tokens": [
                {
                    "name": r.name,
                    "role": r.role,
                    "devices": list(r.devices),
                    "commands": list(r.commands),
                    "hash": r.hash,
                    "created": r.created,
                }
                for r in records
            ],
        }
        fd, tmp = tempfile.mkstemp(prefix=".tokens.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def add(
        self,
        name: str,
        role: str,
        now: float,
        devices: tuple[str, ...] | list[str] = (),
        commands: tuple[str, ...] | list[str] = (),
    ) -> tuple[TokenRecord, str]:
        """Create credential ``name``; returns (record, plain token). The plain token is never
        stored: show it once. Raises :class:`TokenError` for a taken name or invalid fields."""
        check_record_fields(name, role)
        token = new_token()
        rec = TokenRecord(name, role, token_hash(token), tuple(devices), tuple(commands), round(now, 3))
        with self._locked() as records:
            if any(r.name == name for r in records):
                raise TokenError(f"a token named {name!r} exists already (revoke it first)")
            records.append(rec)
        return rec, token

    def revoke(self, name: str) -> TokenRecord:
        """Delete credential ``name``; raises :class:`TokenError` if there is none in the file."""
        found: list[TokenRecord] = []
        with self._locked() as records:
            found = [r for r in records if r.name == name]
            if not found:
                if any(r.name == name for r in self._config.values()):
                    raise TokenError(f"{name!r} comes from [auth] tokens in the config file; edit it there")
                raise TokenError(f"no token named {name!r}")
            records[:] = [r for r in records if r.name != name]
        return found[0]
