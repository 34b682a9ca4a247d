"""Sends a worker's counters and gauges to the supervisor once a second.

The supervisor sums them over the cluster for the metrics endpoint and
`cluster status` (``cluster.metrics``). One PUSH socket to the supervisor's
PULL (``supervisor.sock`` in the runtime directory); a full queue drops the
report (the next one carries the same cumulative counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from pathlib import Path

import msgpack
import zmq

from relaycore.relay import ConnectionState
from runtime.ipc import supervisor_endpoint
from worker.shard import Shard

REPORT_INTERVAL = 1.0


def resident_memory_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def shard_report(shard: Shard, extra_counters: dict[str, int]) -> dict:
    """Everything one report carries (cumulative counters, current gauges)."""
    server = shard.server
    incoming = sum(1 for c in server.pending if c.state is ConnectionState.INCOMING)
    return {
        "counters": {**server.stats, **extra_counters},
        "connections": {
            "incoming": incoming,
            "unconfirmed": len(server.pending) - incoming,
            "confirmed": len(server.by_key),
        },
        "loop_lag": shard.loop_lag,
        "rss": resident_memory_bytes(),
        "cpu": cpu_seconds(),
    }


class StatsReporter:
    def __init__(self, shard: Shard, runtime_dir: Path, extra: callable) -> None:  # type: ignore[valid-type]
        self.shard = shard
        self.extra = extra
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 10)
        self.socket.connect(supervisor_endpoint(runtime_dir))
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._report()

    def _report(self) -> None:
        try:
            message = [
                "stats",
                self.shard.server.shard,
                os.getpid(),
                shard_report(self.shard, self.extra()),
            ]
            with contextlib.suppress(zmq.Again):
                self.socket.send(msgpack.packb(message, use_bin_type=True), zmq.NOBLOCK)
        except Exception:
            self.shard.faults.contained("report")
        finally:
            self._timer = self.shard.loop.call_later(REPORT_INTERVAL, self._report)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.socket.close()
