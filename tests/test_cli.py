"""The ``robonet`` console script (robonet/cli.py)."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
from twisted.trial import unittest

from robonet.cli import main
from robonet.tokens import TokenStore


class CliTests(unittest.SynchronousTestCase):
    """token add / list / revoke with --state-dir and --config."""

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    def test_add_list_revoke(self) -> None:
        """add prints the token alone on its last line; list never shows it; revoke removes it."""
        state = self.mktemp()
        status, out, _ = self.run_cli(
            "token",
            "add",
            "--name",
            "alice",
            "--role",
            "operator",
            "--devices",
            "robot_*",
            "--commands",
            "robot_move,stop",
            "--state-dir",
            state,
        )
        self.assertEqual(status, 0)
        token = out.splitlines()[-1]
        self.assertTrue(token.startswith("rn_"))
        rec = TokenStore(state).lookup(token)
        assert rec is not None
        self.assertEqual(
            (rec.role, rec.devices, rec.commands), ("operator", ("robot_*",), ("robot_move", "stop"))
        )
        status, out, _ = self.run_cli("token", "list", "--json", "--state-dir", state)
        self.assertEqual(status, 0)
        self.assertNotIn(token, out)
        self.assertEqual([t["name"] for t in orjson.loads(out)["tokens"]], ["alice"])
        self.assertEqual(self.run_cli("token", "revoke", "alice", "--state-dir", state)[0], 0)
        self.assertIsNone(TokenStore(state).lookup(token))
        status, _, err = self.run_cli("token", "revoke", "alice", "--state-dir", state)
        self.assertEqual(status, 1)
        self.assertIn("no token named 'alice'", err)

    def test_config_file_state_dir(self) -> None:
        """--config's [hub] state_dir is used, like the daemon's loader."""
        state = Path(self.mktemp())
        cfg = Path(self.mktemp())
        cfg.write_text(f'[hub]\nstate_dir = "{state}"\n')
        status, out, _ = self.run_cli("token", "add", "--name", "r1", "--role", "robot", "--config", str(cfg))
        self.assertEqual(status, 0)
        self.assertIsNotNone(TokenStore(state).lookup(out.splitlines()[-1]))

    def test_bad_config(self) -> None:
        """An invalid config file exits 2 with one line."""
        cfg = Path(self.mktemp())
        cfg.write_text("[auth]\nmode = 'wide-open'\n")
        status, _, err = self.run_cli("token", "list", "--config", str(cfg))
        self.assertEqual(status, 2)
        self.assertIn("auth.mode", err)
