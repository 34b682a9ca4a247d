"""The replica term measured on a running cluster: CPU of the *other* worker
and of the coordinator per handshake, and what the coordinator published
meanwhile (publications, updates per publication), so that the real
per-publication overhead of a worker (wake-up, ``recv``, decode, flush) can
be split from the per-update cost that ``ops.bench.replica_cost`` measures.

    python3 -m ops.bench.replica_live [-C CONNECTIONS] [--repetitions R]

Starts ``cluster start --workers 2 --shard-ports`` (fresh per repetition),
drives every connection to the first shard with ``cluster loadtest
handshake`` (so the second worker only applies the SET and DEL of each), and
listens on the coordinator's PUB socket (``updates.sock`` in the runtime
directory named on its command line) to count the ``"u"`` messages. CPU is
read from ``/proc/<pid>/task/*/schedstat`` right before and after the
generator runs (start-up excluded; the generator's own connect and close are
in the window). Prints JSON: per repetition and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from ops.bench import proctree
from ops.bench.targets import start_cluster
from runtime.ipc import unpack, updates_endpoint

IDLE_S = 2.0  # seconds of no load, to measure what the processes spend idle


class PublicationCounter:
    """Counts the coordinator's publications from a SUB socket of our own."""

    def __init__(self, runtime_dir: Path) -> None:
        self.publications = 0
        self.updates = 0
        self._stop = threading.Event()
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.connect(updates_endpoint(runtime_dir))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(100):
                continue
            message = unpack(self._socket.recv())
            if message[0] == "u":
                self.publications += 1
                self.updates += len(message[2])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close(linger=0)


def _coordinator(root_pid: int) -> tuple[int, Path]:
    kind_of = proctree.cluster_kind(root_pid)
    for pid in proctree.descendants(root_pid):
        argv = proctree.cmdline(pid)
        if kind_of(pid, argv) == "coordinator":
            return pid, Path(argv[argv.index("coordinator") + 1])
    raise RuntimeError("no coordinator process")


def measure(connections: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="replica-live-") as workdir:
        target = start_cluster(Path(workdir), 2, shard_ports=True)
        try:
            coordinator, runtime_dir = _coordinator(target.pid)
            peer = target.shard_pids[1]
            counter = PublicationCounter(runtime_dir)
            time.sleep(1.0)  # the counter's subscription takes
            idle = [proctree.cpu_seconds(pid) or 0.0 for pid in (peer, coordinator)]
            time.sleep(IDLE_S)
            idle = [
                (proctree.cpu_seconds(pid) or 0.0) - i
                for pid, i in zip((peer, coordinator), idle, strict=True)
            ]
            argv = [
                sys.executable, "-m", "cluster.cli", "loadtest", "handshake", "127.0.0.1",
                str(target.shard_ports[0]), target.public_key.hex(), "-C", str(connections),
                "-K", "32", "--processes", "2", "--json", "--quiet",
                "--max-failure-fraction", "1",
            ]  # fmt: skip
            before = [proctree.cpu_seconds(pid) or 0.0 for pid in (peer, coordinator)]
            published = (counter.publications, counter.updates)
            started = time.monotonic()
            report = json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)
            time.sleep(0.3)  # the last DELs
            after = [proctree.cpu_seconds(pid) or 0.0 for pid in (peer, coordinator)]
            wall = time.monotonic() - started
            publications = counter.publications - published[0]
            updates = counter.updates - published[1]
            counter.close()
        finally:
            target.stop()
    handshakes = int(report["results"]["handshakes"])
    # What each process spends with no load (timers, heartbeats, stats) over
    # the same wall time is not the handshakes' doing.
    peer_cpu = after[0] - before[0] - idle[0] / IDLE_S * wall
    coordinator_cpu = after[1] - before[1] - idle[1] / IDLE_S * wall
    return {
        "handshakes": handshakes,
        "wall_s": wall,
        "handshakes_per_s": handshakes / wall,
        "peer_worker_idle_ms_per_s": idle[0] / IDLE_S * 1e3,
        "coordinator_idle_ms_per_s": idle[1] / IDLE_S * 1e3,
        "peer_worker_us_per_handshake": peer_cpu / handshakes * 1e6,
        "coordinator_us_per_handshake": coordinator_cpu / handshakes * 1e6,
        "publications": publications,
        "updates_per_publication": updates / max(publications, 1),
        "peer_worker_us_per_publication": peer_cpu / max(publications, 1) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-C", "--connections", type=int, default=10_000)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args(argv)
    runs = [measure(args.connections) for _ in range(args.repetitions)]
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(json.dumps({"runs": runs, "median": medians}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
