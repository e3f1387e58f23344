"""The audit log (docs/security.rst "Audit"): every command and every credential change.

Each entry records when (hub time), who (identity name and role), on which face and from which
address, the action (``command``, ``token_add``, ``token_revoke``, ``lease_take``, ...), the
target (device id or credential name), the command type and the outcome (``ok``, ``denied:<reason>``,
``error:<code>``). Entries go to the structured log (so to ``[log] json_file`` with every field) and
into a bounded ring served by ``GET /api/audit`` (admin).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from twisted.logger import Logger


@attrs.frozen
class AuditEntry:
    """One audited action; ``at`` is Unix seconds (hub time)."""

    at: float
    identity: str
    role: str
    face: str
    address: str
    action: str
    target: str
    mtype: str
    outcome: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for ``GET /api/audit``."""
        return attrs.asdict(self)


class AuditLog:
    """A bounded ring of :class:`AuditEntry` (``max_entries``, oldest dropped) that also logs."""

    log = Logger()

    def __init__(self, max_entries: int = 1000) -> None:
        self.entries: deque[AuditEntry] = deque(maxlen=max_entries)
        self.total = 0

    def record(
        self,
        now: float,
        identity: Any,
        *,
        face: str,
        address: str = "",
        action: str,
        target: str = "",
        mtype: str = "",
        outcome: str = "ok",
    ) -> AuditEntry:
        """Append one entry (``identity`` an auth.Identity or None for "unknown") and log it."""
        name = getattr(identity, "name", "unknown") if identity is not None else "unknown"
        role = getattr(identity, "role", "") if identity is not None else ""
        entry = AuditEntry(round(now, 6), name, role, face, address, action, target, mtype, outcome)
        self.entries.append(entry)
        self.total += 1
        self.log.info(
            "audit: {identity} ({role}) {action} {mtype} -> {target} via {face} from {address}: {outcome}",
            audit=True,
            identity=name,
            role=role,
            action=action,
            mtype=mtype,
            target=target,
            face=face,
            address=address,
            outcome=outcome,
        )
        return entry

    def recent(self, limit: int = 100, since: float | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries (oldest first), optionally only those at or after ``since``."""
        items = [e for e in self.entries if since is None or e.at >= since]
        return [e.as_dict() for e in items[-limit:]] if limit > 0 else []
