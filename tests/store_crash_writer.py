"""Helper process for the kill -9 test in tests/test_store.py (not a test module).

Usage: ``python tests/store_crash_writer.py DB_PATH|postgresql://DSN [RATE]``. Runs a TelemetryStore under the real
reactor, appends about RATE (default 500) telemetry rows a second, each carrying a sequence number
``seq`` in its body, and writes ``<seq>\\n`` to stdout only from the batch's ok callback, i.e. only
once the row's COMMIT returned — exactly when a face would send the ack. It runs until killed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, cast

import orjson
from twisted.internet import reactor, task

from robonet.services.store import GroupCommitStore, TelemetryStore

TICK = 0.01  # seconds between bursts


def main(argv: list[str]) -> None:
    """Start the store and the paced writer; never returns until the process is killed."""
    rate = int(argv[2]) if len(argv) > 2 else 500
    per_tick = max(1, round(rate * TICK))
    store: GroupCommitStore
    if argv[1].startswith("postgresql://"):
        from robonet.services.store_pg import PostgresStore

        store = PostgresStore(argv[1], reactor=cast(Any, reactor))
    else:
        store = TelemetryStore(Path(argv[1]), reactor=cast(Any, reactor))
    store.startService()
    seq = 0

    def acked(n: int) -> None:
        os.write(1, b"%d\n" % n)  # unbuffered: what is printed was acked

    def failed(failure: object, n: int) -> None:
        os.write(2, b"commit failed for %d: %s\n" % (n, str(failure).encode()))

    def burst() -> None:
        nonlocal seq
        now = reactor.seconds()
        for _ in range(per_tick):
            seq += 1
            body = {"type": "telemetry", "seq": seq, "battery": 80.0, "cpu": 12.5, "ts": now}
            raw = orjson.dumps(body)
            store.append("crash_bot", "telemetry", now, body, raw).when_committed(acked, failed, seq)

    task.LoopingCall(burst).start(TICK)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
