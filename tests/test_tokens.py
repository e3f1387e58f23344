"""The credential store (robonet/tokens.py): hashed, atomic, shared between processes."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from robonet.tokens import TokenError, TokenStore, token_hash


class TokenStoreTests(unittest.SynchronousTestCase):
    """Add, look up, list and revoke tokens."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.store = TokenStore(self.dir)

    def test_stored_hashed(self) -> None:
        """The file holds the SHA-256, never the plain token, and is readable by its owner only."""
        rec, token = self.store.add("alice", "operator", 12.5, ["robot_*"], ["robot_move"])
        text = (self.dir / "tokens.json").read_text()
        self.assertNotIn(token, text)
        self.assertIn(token_hash(token), text)
        self.assertEqual((self.dir / "tokens.json").stat().st_mode & 0o777, 0o600)
        self.assertTrue(token.startswith("rn_") and len(token) == 46)
        self.assertEqual(self.store.lookup(token), rec)
        self.assertIsNone(self.store.lookup(token[:-1]))
        self.assertIsNone(self.store.lookup(""))

    def test_other_process_sees_changes(self) -> None:
        """A second store on the same directory (the CLI) sees adds; poll() notices revocations."""
        _, token = self.store.add("bob", "viewer", 0.0)
        other = TokenStore(self.dir)
        self.assertEqual(other.lookup(token).name, "bob")  # type: ignore[union-attr]
        self.assertFalse(self.store.poll())
        other.revoke("bob")
        self.assertTrue(self.store.poll())
        self.assertIsNone(self.store.lookup(token))
        self.assertIsNone(self.store.get("bob"))

    def test_errors(self) -> None:
        """Duplicate names, bad roles, bad names and unknown names are refused with one line."""
        self.store.add("a", "robot", 0.0)
        self.assertRaises(TokenError, self.store.add, "a", "robot", 0.0)
        self.assertRaises(TokenError, self.store.add, "b", "god", 0.0)
        self.assertRaises(TokenError, self.store.add, "bad name", "robot", 0.0)
        self.assertRaises(TokenError, self.store.revoke, "nobody")
        self.assertEqual([r.name for r in self.store.records()], ["a"])

    def test_broken_file_keeps_records(self) -> None:
        """A corrupted file raises TokenError on reload and keeps the previous records in memory."""
        _, token = self.store.add("a", "robot", 0.0)
        (self.dir / "tokens.json").write_text("{not json")
        self.assertRaises(TokenError, self.store.poll)
        self.assertIsNotNone(self.store.lookup(token))

    def test_config_tokens(self) -> None:
        """Config tokens are looked up like file tokens and cannot be revoked through the file."""
        store = TokenStore(self.dir, {"plain": "viewer"})
        self.assertEqual(store.lookup("plain").role, "viewer")  # type: ignore[union-attr]
        self.assertRaises(TokenError, store.revoke, "config:1")
        self.assertRaises(TokenError, TokenStore, self.dir, {"x": "wizard"})
