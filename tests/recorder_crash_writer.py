"""Helper process for the kill -9 test in tests/test_recorder.py (not a test module).

Usage: ``python tests/recorder_crash_writer.py DIR``. Runs a real Hub and Recorder under the real
reactor (small chunks, flushed every 50 ms) and ingests about 1,000 telemetry messages a second
from device ``crash_bot``, each carrying a sequence number ``seq``. After every batch the writer
thread flushed to the file it writes ``<messages recorded>\\n`` to stdout. It runs until killed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor, task

from robonet.config import load_config
from robonet.hub import Hub
from robonet.model import Message
from robonet.services.recorder import BatchResult, Recorder


class ReportingRecorder(Recorder):
    """Prints the recorded count whenever a batch reached the file (flushed)."""

    def _written(self, result: BatchResult) -> None:
        super()._written(result)
        if result.flushed:
            os.write(1, b"%d\n" % self.recorded)


def main(argv: list[str]) -> None:
    """Start hub and recorder, ingest forever."""
    directory = Path(argv[1])
    config = load_config(
        None,
        environ={},
        overrides={
            "hub": {"state_dir": str(directory)},
            "recorder": {"enabled": True, "chunk_kb": 4, "flush_interval": 0.05, "compression": "zstd"},
        },
    )
    r = cast(Any, reactor)
    hub = Hub(config, r)
    rec = ReportingRecorder(config.recorder, directory, hub, r)
    rec.startService()
    dev = hub.connect(None, "crash_bot", face="botlink", role="robot", address="local")
    seq = 0

    def burst() -> None:
        nonlocal seq
        for _ in range(10):
            seq += 1
            body = {"type": "telemetry", "seq": seq, "battery": 50.0}
            hub.ingest(dev, Message("telemetry", body, "crash_bot", r.seconds()))

    task.LoopingCall(burst).start(0.01)
    r.run()


if __name__ == "__main__":
    main(sys.argv)
