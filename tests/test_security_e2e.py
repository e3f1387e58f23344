"""End to end with the real daemon: pairing on first start, the CLI while it runs, revocation."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from typing import Any

import orjson
from twisted.trial import unittest

from tests.daemon import REPO, start_daemon

REVOKE_DEADLINE = 2.0  # the bound: a revoked token's connections close within 2 s


def cli(state: Any, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBONET_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", "from robonet.cli import run; run()", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    return out.stdout


def frame(obj: Any) -> bytes:
    payload = orjson.dumps(obj)
    return struct.pack(">I", len(payload)) + payload


def read_frame(sock: socket.socket) -> Any:
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return orjson.loads(body)


class SecurityE2ETests(unittest.TestCase):
    """token mode daemon on 127.0.0.1."""

    timeout = 90

    def test_cli_token_lifecycle(self) -> None:
        """First start logs a pairing URL whose admin token works on the REST API; a token added with
        the CLI while the daemon runs is usable within 2 s; revoking it closes its connection
        within 2 s and later hellos with it are refused."""
        daemon = start_daemon(self, env={"ROBONET_AUTH_MODE": "token"}, store=False)
        log = daemon.log()
        match = re.search(r"#token=(rn_[A-Za-z0-9_-]+)", log)
        self.assertIsNotNone(match, log[-2000:])
        admin = match.group(1)  # type: ignore[union-attr]
        req = urllib.request.Request(
            f"http://127.0.0.1:{daemon.ports['web']}/api/auth/whoami",
            headers={"Authorization": f"Bearer {admin}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            self.assertEqual(orjson.loads(resp.read())["identity"]["role"], "admin")

        token = cli(daemon.state_dir, "token", "add", "--name", "bot7", "--role", "robot").splitlines()[-1]
        hello = {"type": "hello", "proto": 1, "role": "robot", "device_id": "bot7", "token": token}
        deadline = time.monotonic() + REVOKE_DEADLINE + 1.0
        welcome = None
        while welcome is None or welcome.get("type") != "welcome":  # the daemon polls once a second
            self.assertLess(time.monotonic(), deadline, f"token not accepted in time: {welcome}")
            with socket.create_connection(("127.0.0.1", daemon.ports["botlink"]), timeout=5) as s:
                s.sendall(frame(hello))
                welcome = read_frame(s)
                if welcome and welcome.get("type") == "welcome":
                    break
            time.sleep(0.2)
        sock = socket.create_connection(("127.0.0.1", daemon.ports["botlink"]), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(frame(hello))
        self.assertEqual(read_frame(sock)["type"], "welcome")
        sock.sendall(frame({"type": "telemetry", "id": 1, "battery": 50}))
        self.assertEqual(read_frame(sock)["type"], "ack")

        cli(daemon.state_dir, "token", "revoke", "bot7")
        sock.settimeout(REVOKE_DEADLINE)
        err = read_frame(sock)  # socket.timeout here means the connection outlived the deadline
        self.assertEqual(err["code"], "unauthorized")
        self.assertIsNone(read_frame(sock))
        with socket.create_connection(("127.0.0.1", daemon.ports["botlink"]), timeout=5) as s:
            s.sendall(frame(hello))
            self.assertEqual(read_frame(s)["code"], "auth_failed")
        self.assertNotIn("bot7\t", cli(daemon.state_dir, "token", "list"))
