"""Control leases (robonet/lease.py), pure."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from robonet.lease import LeaseHeld, Leases


class LeaseTests(unittest.SynchronousTestCase):
    """Acquire, refuse, take over, release."""

    def test_flow(self) -> None:
        """The first holder acquires; another is refused naming the holder; take notifies the first."""
        leases = Leases()
        told: list[tuple[str, dict[str, Any]]] = []
        leases.watch("a", lambda ev, body: told.append((ev, body)))
        leases.check("r1", "a", "alice", 1.0)
        leases.check("r1", "a", "alice", 2.0)
        with self.assertRaises(LeaseHeld) as cm:
            leases.check("r1", "b", "bob", 3.0)
        self.assertIn("alice", str(cm.exception))
        old = leases.take("r1", "b", "bob", 4.0)
        self.assertEqual(old.holder, "a")  # type: ignore[union-attr]
        self.assertEqual(
            told, [("lease_lost", {"device_id": "r1", "holder": "b", "holder_name": "bob", "since": 4.0})]
        )
        self.assertRaises(LeaseHeld, leases.check, "r1", "a", "alice", 5.0)
        self.assertFalse(leases.release("r1", "a"))
        self.assertEqual(leases.release_holder("b"), ["r1"])
        self.assertEqual(leases.all(), [])

    def test_broken_watcher(self) -> None:
        """A watcher that raises does not stop the take."""
        leases = Leases()
        leases.watch("a", lambda ev, body: 1 / 0)
        leases.check("r1", "a", "alice", 1.0)
        leases.take("r1", "b", "bob", 2.0)
        self.assertEqual(leases.holder("r1").holder, "b")  # type: ignore[union-attr]
        self.flushLoggedErrors(ZeroDivisionError)
