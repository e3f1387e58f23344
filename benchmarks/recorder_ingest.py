#!/usr/bin/env python3
"""Recorder on vs off on bot-link ingest (issue 10's benchmark). Not a test.

Runs benchmarks/botlink_ingest.py's S1 ingest (N connections x window W of 190-byte telemetry,
acked) against a fresh ``twistd -n robonet`` with ``[recorder] enabled = false`` and then ``true``,
alternating ``--rounds`` times in one run, and prints acked msgs/s of each, the on/off ratio of the
medians (target: at least 0.80), the daemon's CPU, and what the recorder wrote (files, bytes,
messages read back with robonet.mcapio).

    python benchmarks/recorder_ingest.py                      # 2 rounds x (off, on), 10 s each
    python benchmarks/recorder_ingest.py --duration 5 --rounds 3 --store off
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import botlink_ingest as bi  # noqa: E402

from robonet import mcapio  # noqa: E402


def one(args: argparse.Namespace, recorder: bool) -> dict[str, Any]:
    os.environ["ROBONET_RECORDER_ENABLED"] = "true" if recorder else "false"
    daemon = bi.Daemon(store=args.store == "on", idle_timeout=600.0)
    try:
        result = bi.run_ingest(args, "127.0.0.1", daemon.port, bi.ProcStats(daemon.pid))
    finally:
        daemon.stop(keep=True)
    files = sorted((daemon.dir / "state" / "recordings").glob("*.mcap"))
    result["recorder"] = recorder
    result["rec_files"] = len(files)
    result["rec_bytes"] = sum(f.stat().st_size for f in files)
    count = 0
    for f in files:
        with open(f, "rb") as fh:
            got, _ = mcapio.read_complete(fh)
            count += len(got)
    result["rec_messages"] = count
    shutil.rmtree(daemon.dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--payload", type=int, default=190)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--store", choices=("on", "off"), default="on")
    p.add_argument("--rounds", type=int, default=2, help="(off, on) pairs, alternating (default 2)")
    args = p.parse_args(argv)
    bi.raise_fd_limit()
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for i in range(args.rounds):
        for rec in (False, True):
            r = one(args, rec)
            runs[rec].append(r)
            print(
                f"round {i + 1} recorder {'on ' if rec else 'off'}: "
                f"{r['acked_msgs_per_s']:>9,.0f} acked msgs/s, "
                f"daemon CPU {r['daemon_cpu_pct'] or 0:.0f} %, p99 {r['ack_rtt_p99_ms']:.1f} ms"
                + (
                    f", wrote {r['rec_messages']:,} messages in {r['rec_files']} file(s), "
                    f"{r['rec_bytes'] / 2**20:.1f} MiB"
                    if rec
                    else ""
                ),
                flush=True,
            )
    off = statistics.median(r["acked_msgs_per_s"] for r in runs[False])
    on = statistics.median(r["acked_msgs_per_s"] for r in runs[True])
    print(f"median acked msgs/s: off {off:,.0f}, on {on:,.0f}; on/off = {on / off:.2f} (target >= 0.80)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
