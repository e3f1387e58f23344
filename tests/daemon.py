"""Run the real ``twistd -n robonet`` in a subprocess for end-to-end tests (STYLE.md rule 9).

Every face listens on a free 127.0.0.1 port; the state directory is the test's own temporary
directory; discovery and the camera are off unless asked for. The daemon is stopped (SIGTERM, then
SIGKILL) in the test's cleanup, by PID.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class Daemon:
    """A running daemon: ``ports`` by face name, ``state_dir``, ``log_path``, the ``proc``."""

    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    state_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL the daemon at once (crash tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = START_TIMEOUT
) -> None:
    """Block until 127.0.0.1:``port`` accepts a connection (or the process dies / time runs out)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if proc is not None:
            try:
                proc.wait(0.05)  # paces the loop and notices an early exit
            except subprocess.TimeoutExpired:
                pass
            else:
                raise RuntimeError(f"daemon exited with {proc.returncode} before port {port} opened")
        else:
            select.select([], [], [], 0.05)
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} did not open within {timeout} s")


def start_daemon(
    testcase: Any,
    *extra_args: str,
    faces: tuple[str, ...] = ("botlink", "line", "web"),
    camera: bool = False,
    store: bool = True,
    discovery: bool = False,
    env: dict[str, str] | None = None,
    state_dir: Path | None = None,
    ports: dict[str, int] | None = None,
) -> Daemon:
    """Start ``twistd -n robonet`` with ``faces`` on free loopback ports; stopped at cleanup.

    ``ports`` may fix some ports (to restart a daemon on the same ones); ``extra_args`` are added
    after ``robonet``. The working tree's robonet is used (PYTHONPATH = repo root).
    """
    state = (state_dir or Path(testcase.mktemp())).resolve()
    state.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, int] = dict(ports or {})
    args = [
        os.path.join(os.path.dirname(sys.executable), "twistd"),
        "-n",
        "--pidfile=",
        "robonet",
        "--state-dir",
        str(state),
    ]
    for face in ("botlink", "line", "web", "foxglove"):
        if face in faces:
            chosen.setdefault(face, free_port())
            args += [f"--{face}", f"tcp:{chosen[face]}:interface=127.0.0.1"]
        else:
            args += [f"--{face}", "none"]
    if camera:
        for key in ("camera-data", "camera-settings", "camera-auth"):
            chosen.setdefault(key, free_port())
            args += [f"--{key}", f"tcp:{chosen[key]}:interface=127.0.0.1"]
    args += list(extra_args)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ROBONET_")}
    full_env.update(
        {
            "PYTHONPATH": str(REPO),
            "ROBONET_CAMERA_ENABLED": "true" if camera else "false",
            "ROBONET_STORE_ENABLED": "true" if store else "false",
            "ROBONET_DISCOVERY_ENABLED": "true" if discovery else "false",
            "ROBONET_DISCOVERY_MDNS": "false",
        }
    )
    full_env.update(env or {})
    log_path = state / f"daemon-{len(list(state.glob('daemon-*.log')))}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=str(state))
    daemon = Daemon(proc, chosen, state, log_path)
    testcase.addCleanup(daemon.stop)
    try:
        for port in chosen.values():
            wait_for_port(port, proc)
    except Exception:
        daemon.stop()
        raise RuntimeError(f"daemon did not start:\n{daemon.log()[-4000:]}") from None
    return daemon
