"""A real PostgreSQL for tests and benchmarks: ``initdb`` + ``pg_ctl`` in a temporary directory.

:func:`shared_server` starts one server per test process (on first use; stopped by PID at exit) and
:meth:`PostgresServer.fresh_database` gives each test its own database. Tests that stop and start
the server (the outage test) make their own :class:`PostgresServer`. The binaries come from
``$ROBONET_PG_BIN``, else the newest ``/usr/lib/postgresql/*/bin``, else ``$PATH``;
:data:`SKIP_REASON` says why they cannot run (None when they can). ``initdb`` refuses to run as root:
as root the server runs as the ``nobody`` user (``runuser``), with its directory chowned to it.
Listens on 127.0.0.1 only, on a free port, with ``trust`` authentication; no other host is touched.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _bin_dir() -> Path | None:
    env = os.environ.get("ROBONET_PG_BIN")
    if env:
        return Path(env)
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if dirs:
        return Path(dirs[-1])
    found = shutil.which("initdb")
    return Path(found).parent if found else None


BIN = _bin_dir()
SKIP_REASON: str | None = None
if BIN is None or not (BIN / "initdb").exists() or not (BIN / "pg_ctl").exists():
    SKIP_REASON = "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
elif os.geteuid() == 0 and shutil.which("runuser") is None:
    SKIP_REASON = "running as root and runuser(1) is missing: cannot run initdb unprivileged"

START_TIMEOUT = 60  # s


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in ``base`` (a directory it owns), on 127.0.0.1:``port``."""

    def __init__(self, base: Path) -> None:
        if SKIP_REASON is not None:
            raise RuntimeError(SKIP_REASON)
        self.base = Path(base)
        self.data = self.base / "data"
        self.port = free_port()
        self.pid: int | None = None
        self._ids = itertools.count(1)
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "nobody", "--"]

    @classmethod
    def start_new(cls, base: Path) -> PostgresServer:
        """initdb + start in ``base``; returns the running server."""
        server = cls(base)
        server.init()
        server.start()
        return server

    def _run(self, *argv: str, timeout: float = START_TIMEOUT) -> None:
        cmd = [*self._as_user, *argv]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd="/")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout.decode()}{proc.stderr.decode()}")

    def init(self) -> None:
        """Create the cluster (``initdb``, trust auth, no fsync: test data)."""
        self.base.mkdir(parents=True, exist_ok=True)
        if self._as_user:
            os.chmod(self.base, 0o755)
            shutil.chown(self.base, "nobody")
        assert BIN is not None
        self._run(
            str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--no-locale",
        )

    def start(self) -> None:
        """Start (or restart) the server on the same port; waits until it accepts connections."""
        assert BIN is not None
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.base} -c fsync=off -c max_connections=50"
        self._run(
            str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "log"), "-o", opts, "-w",
            "-t", str(START_TIMEOUT), "start",
        )
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop the server by its PID (SIGINT: fast shutdown) and wait for it to exit."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URL for ``dbname`` on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def fresh_database(self) -> str:
        """CREATE DATABASE with a new name; returns its DSN."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._ids)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def destroy(self) -> None:
        """Stop and remove the directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


_shared: PostgresServer | None = None


def shared_server() -> PostgresServer:
    """The test process's PostgreSQL (started on first call; stopped and removed at exit)."""
    global _shared
    if _shared is None:
        server = PostgresServer(Path(tempfile.mkdtemp(prefix="robonet-pg-")))
        server.init()
        server.start()
        atexit.register(server.destroy)
        _shared = server
    return _shared
