"""Unit tests of robonet.limits.PerAddressLimiter."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from robonet.limits import PerAddressLimiter


class PerAddressLimiterTests(SynchronousTestCase):
    def test_limit(self) -> None:
        """acquire succeeds up to the limit per address, then refuses without counting."""
        lim = PerAddressLimiter(2)
        self.assertTrue(lim.acquire("10.0.0.1"))
        self.assertTrue(lim.acquire("10.0.0.1"))
        self.assertFalse(lim.acquire("10.0.0.1"))
        self.assertEqual(lim.count("10.0.0.1"), 2)
        self.assertTrue(lim.acquire("10.0.0.2"))
        self.assertEqual(len(lim), 2)

    def test_release_deletes_at_zero(self) -> None:
        """An address's entry disappears with its last connection (bounded memory)."""
        lim = PerAddressLimiter(3)
        for i in range(100):
            self.assertTrue(lim.acquire(f"10.0.0.{i}"))
            lim.release(f"10.0.0.{i}")
        self.assertEqual(len(lim), 0)
        lim.acquire("a")
        lim.acquire("a")
        lim.release("a")
        self.assertEqual((lim.count("a"), len(lim)), (1, 1))
        lim.release("a")
        self.assertEqual((lim.count("a"), len(lim)), (0, 0))

    def test_release_unknown(self) -> None:
        """Releasing an address never acquired changes nothing."""
        lim = PerAddressLimiter(1)
        lim.release("x")
        self.assertEqual(len(lim), 0)
        self.assertTrue(lim.acquire("x"))

    def test_slot_freed(self) -> None:
        """After a release at the limit, one more acquire succeeds."""
        lim = PerAddressLimiter(1)
        self.assertTrue(lim.acquire("x"))
        self.assertFalse(lim.acquire("x"))
        lim.release("x")
        self.assertTrue(lim.acquire("x"))

    def test_bad_limit(self) -> None:
        """The limit must be a positive int."""
        for bad in (0, -1, 1.5, True):
            self.assertRaises(ValueError, PerAddressLimiter, bad)
