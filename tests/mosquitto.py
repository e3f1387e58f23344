"""Run a real Mosquitto broker for end-to-end tests, and a small blocking MQTT test client.

:func:`start_mosquitto` writes a config with ``listener PORT 127.0.0.1`` and
``allow_anonymous true`` into the test's temporary directory, starts ``mosquitto -c`` and stops it
(by PID) at cleanup. :class:`Watcher` is a paho client on its own network thread that records every
message of a topic filter, so a test can wait (bounded) for what the bridge published.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from tests.daemon import free_port, wait_for_port

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
SKIP_REASON = "mosquitto is not installed (Debian package mosquitto)"


@attrs.define
class Broker:
    """A running Mosquitto: its ``port``, ``proc``, config and log paths."""

    proc: subprocess.Popen[bytes]
    port: int
    conf: Path
    log_path: Path

    def stop(self) -> None:
        """SIGTERM then SIGKILL, by PID."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill9(self) -> None:
        """SIGKILL the broker at once (outage tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start_mosquitto(testcase: Any, port: int | None = None, directory: Path | None = None) -> Broker:
    """Start ``mosquitto -c <conf>`` on 127.0.0.1:``port`` (a free one by default); stopped at cleanup."""
    assert MOSQUITTO is not None, SKIP_REASON
    d = (directory or Path(testcase.mktemp())).resolve()
    d.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {d}/\nqueue_qos0_messages true\nlog_dest stderr\n"
        # run as root (containers), mosquitto would switch to user mosquitto: keep our own
        f"user {getpass.getuser()}\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
    )
    log_path = d / f"mosquitto-{port}-{int(time.monotonic() * 1000)}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    broker = Broker(proc, port, conf, log_path)
    testcase.addCleanup(broker.stop)
    wait_for_port(port, proc, timeout=10)
    return broker


class Watcher:
    """A paho client (own loop thread) subscribed to ``filters``; records (topic, payload, retain)."""

    def __init__(
        self, testcase: Any, port: int, *filters: str, protocol: str = "3.1.1", persistent: str = ""
    ) -> None:
        """Connect and wait for the SUBACK; ``persistent`` names a client id with a kept session."""
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._pace = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=persistent or f"watcher-{id(self)}",
            protocol=paho.MQTTv5 if protocol == "5" else paho.MQTTv311,
            clean_session=not persistent,
        )
        self.connected = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()

        def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
            self.connected.set()
            if filters:
                c.subscribe([(flt, 1) for flt in filters])

        self.client.on_connect = on_connect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        testcase.addCleanup(self.close)
        if filters and not self._subscribed.wait(10):
            raise TimeoutError("watcher did not get SUBACK within 10 s")
        if not self.connected.wait(10):
            raise TimeoutError("watcher did not connect within 10 s")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait (bounded) until paho sent it."""
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(10)

    def find(self, pred: Callable[[str, bytes, bool], bool]) -> list[tuple[str, bytes, bool]]:
        """Every recorded message matching ``pred``."""
        with self._lock:
            return [m for m in self.messages if pred(*m)]

    def wait_for(
        self, pred: Callable[[str, bytes, bool], bool], timeout: float = 15.0, what: str = "message"
    ) -> tuple[str, bytes, bool]:
        """Block until a matching message was recorded (bounded by ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(pred)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                with self._lock:
                    seen = [t for t, _, _ in self.messages[-20:]]
                raise TimeoutError(f"no {what} within {timeout} s; last topics: {seen}")
            self._pace.wait(0.02)  # paces the loop (an Event nobody sets)

    def close(self) -> None:
        """Disconnect and stop the loop thread."""
        self.client.disconnect()
        self.client.loop_stop()
