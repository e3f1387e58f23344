"""The audit log (robonet/audit.py)."""

from __future__ import annotations

from twisted.logger import capturedLogs
from twisted.trial import unittest

from robonet.audit import AuditLog
from robonet.auth import Identity


class AuditTests(unittest.SynchronousTestCase):
    """Bounded ring + structured log."""

    def test_bounded_and_logged(self) -> None:
        """Only the newest max_entries are kept; every entry is logged with its fields."""
        audit = AuditLog(3)
        who = Identity("alice", "operator", frozenset())
        with capturedLogs() as events:
            for n in range(5):
                audit.record(
                    float(n),
                    who,
                    face="web",
                    address="10.0.0.1",
                    action="command",
                    target=f"r{n}",
                    mtype="robot_move",
                )
        self.assertEqual([e["target"] for e in audit.recent()], ["r2", "r3", "r4"])
        self.assertEqual(audit.total, 5)
        self.assertEqual(len([e for e in events if e.get("audit")]), 5)
        self.assertEqual(events[-1]["identity"], "alice")
        self.assertEqual([e["target"] for e in audit.recent(1)], ["r4"])
        self.assertEqual([e["target"] for e in audit.recent(since=3.0)], ["r3", "r4"])
