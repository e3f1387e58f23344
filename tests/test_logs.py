"""Logging: the --log-level filter and the optional JSON log file (robonet/logs.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from robonet.logs import observer_factory
from robonet.protocols.botlink import encode_obj
from tests.daemon import start_daemon


class ObserverTests(SynchronousTestCase):
    def test_level_filter_and_json_file(self) -> None:
        """Events below the level are dropped from both outputs; the JSON file gets one event per line."""
        base = Path(self.mktemp())
        base.mkdir()
        text, js = base / "robonet.log", base / "robonet.json"
        observer = observer_factory("warn", str(js), str(text), nodaemon=False)()
        log = Logger(namespace="robonet.test", observer=observer)
        log.info("quiet {n}", n=1)
        log.warn("loud {n}", n=2)
        log.error("louder {n}", n=3)
        text_out = text.read_text()
        self.assertNotIn("quiet", text_out)
        self.assertIn("loud 2", text_out)
        self.assertIn("louder 3", text_out)
        lines = [line.strip("\x1e") for line in js.read_text().splitlines()]
        events = [json.loads(line) for line in lines if line]
        self.assertEqual([e["n"] for e in events], [2, 3])
        self.assertEqual(events[0]["log_namespace"], "robonet.test")


class DaemonLoggingTests(SynchronousTestCase):
    def test_log_level_and_json_file_in_daemon(self) -> None:
        """--log-level warn hides device up/down lines; [log] json_file receives warnings as JSON lines.

        The camera's first start warns that it generated a password: a warning we can expect.
        """
        state = Path(self.mktemp()).resolve()
        json_path = state / "log.json"
        daemon = start_daemon(
            self,
            "--log-level",
            "warn",
            faces=("botlink",),
            camera=True,
            store=False,
            state_dir=state,
            env={"ROBONET_LOG_JSON_FILE": str(json_path)},
        )
        with socket.create_connection(("127.0.0.1", daemon.ports["botlink"]), timeout=5) as s:
            s.sendall(encode_obj({"type": "hello", "proto": 1, "role": "robot", "device_id": "quiet_bot"}))
            self.assertEqual(s.recv(4096)[4:5], b"{")
        daemon.stop()
        log = daemon.log()
        self.assertNotIn("device quiet_bot up", log)
        self.assertNotIn("Traceback", log)
        lines = [line.strip("\x1e") for line in json_path.read_text().splitlines()]
        events = [json.loads(line) for line in lines if line]
        self.assertTrue(any("generated" in e.get("log_format", "") for e in events), events)
        self.assertTrue(all(e["log_level"]["name"] in ("warn", "error", "critical") for e in events))
