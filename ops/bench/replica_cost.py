"""The replica term of a connection's cost, in isolation: CPU per routing-map
update and per publication that one worker spends applying the coordinator's
``SET`` / ``DEL`` for connections of *other* shards.

With N workers each connection's SET and DEL reach N - 1 replicas, so this
is the term of the scaling model (issue 13) that grows with N. The script
feeds ``--publications`` packed ``"u"`` messages, each a batch of SET / DEL
updates of keys on another shard (every key SET, then DEL'd one publication
later, as a handshake load makes them), into a real
``coordinator.replica.Replica`` whose handler is the shard's real
``relaycore.crossshard.CrossShard``, the way ``coordinator.client`` does for a
message read from the SUB socket: decode (msgpack), ``Replica.publication``,
then the adapter's flush (``take_bus`` / ``take_registry``). No sockets and no
event loop: the wake-up, ``recv`` and ``Shard.flush`` of a real worker come on
top, once per publication (see docs/benchmarks.md, "Replica cost per update").

    python3 -m ops.bench.replica_cost [--publications N] [--batches 2,16,128] [--rounds R]

The replica holds ``--directory`` entries of other shards before the run
(the size of a loaded cluster's map) and runs its 1-second tick every
``--tick-every`` publications. For each batch size the median of the rounds
is reported; per update and per publication are the least-squares line
through (batch size, microseconds per publication). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from coordinator.replica import Replica
from relaycore.crossshard import CrossShard
from relaycore.relay import RelayServer
from relaycore.shardlink import MapUpdate
from runtime.ipc import pack, unpack

HERE = 1  # the shard whose replica is measured
THERE = 2  # the shard whose clients connect and leave
INCARNATION = 7


class BenchHandler:
    """The replica's handler as the worker has it (worker.cluster_member):
    every call goes to the shard's CrossShard."""

    def __init__(self, links: CrossShard) -> None:
        self.links = links

    def apply_map_update(self, update: tuple, now: float) -> None:
        self.links.apply_map_update(update, now)

    def apply_map_updates(self, updates: list[tuple], now: float) -> None:
        self.links.apply_map_updates(updates, now)

    def reset_directory(self, entries: list, merge: bool, request: int | None, now: float) -> None:
        self.links.reset_directory(entries, now, merge=merge, request=request)

    def registrations(self) -> list[tuple[bytes, int]]:
        return self.links.registrations()

    def set_peer_shards(self, shards: list[int], now: float) -> None:
        self.links.set_peer_shards(shards, now)


def publications(count: int, batch: int, first_sequence: int, serial: int) -> list[bytes]:
    """``count`` packed "u" messages of ``batch`` updates each: a new key's
    SET, and the DEL of a key SET one publication earlier."""
    messages = []
    sequence = first_sequence
    live: list[tuple[bytes, int]] = []
    for _ in range(count):
        updates = []
        ending, live = live, []
        for index in range(batch):
            sequence += 1
            if index % 2 == 0 or not ending:
                serial += 1
                key = serial.to_bytes(32, "big")
                epoch = (THERE << 32) | serial
                live.append((key, epoch))
                updates.append([sequence, [MapUpdate.SET, key, THERE, epoch, None, None]])
            else:
                key, epoch = ending.pop()
                updates.append([sequence, [MapUpdate.DEL, key, THERE, epoch]])
        messages.append(pack(["u", INCARNATION, updates]))
    return messages


def run_round(batch: int, count: int, directory: int, tick_every: int) -> float:
    """CPU seconds for ``count`` publications of ``batch`` updates."""
    relay = RelayServer(os.urandom(32), shard=HERE)
    links = relay.cluster
    assert isinstance(links, CrossShard)
    replica = Replica(BenchHandler(links))
    replica.coordinator = INCARNATION
    entries = [
        ((1 << 200 | serial).to_bytes(32, "big"), THERE, (THERE << 32) | serial)
        for serial in range(directory)
    ]
    links.reset_directory(entries, 0.0)
    messages = publications(count, batch, 0, 1 << 40)
    now = 0.0
    start = time.process_time()
    for number, payload in enumerate(messages):
        now += 0.001
        replica.publication(unpack(payload), now)
        links.take_bus(now)
        links.take_registry()
        if number % tick_every == 0:
            links.tick(now)
    spent = time.process_time() - start
    if replica.last_sequence != count * batch or replica.syncing:
        raise SystemExit(f"replica fell behind: {replica.last_sequence}, syncing {replica.syncing}")
    return spent


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares us_per_publication = a + b * batch: (a, b)."""
    xs = [float(x) for x, _ in points]
    ys = [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - slope * mean_x, slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publications", type=int, default=2000)
    parser.add_argument("--batches", default="2,16,128", help="updates per publication")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--directory", type=int, default=10_000, help="entries held before")
    parser.add_argument("--tick-every", type=int, default=1000, help="publications per tick")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if len(batches) < 2 or min(batches) < 1:
        parser.error("--batches: at least two sizes, each >= 1")
    rows = []
    for batch in batches:
        count = max(10, args.publications * 16 // batch)  # similar update counts
        per_publication = []
        for _ in range(args.rounds):
            spent = run_round(batch, count, args.directory, args.tick_every)
            per_publication.append(spent / count * 1e6)
        median = statistics.median(per_publication)
        rows.append(
            {
                "batch": batch,
                "publications": count,
                "us_per_publication": round(median, 2),
                "us_per_update": round(median / batch, 3),
                "range_us_per_publication": [
                    round(min(per_publication), 2),
                    round(max(per_publication), 2),
                ],
            }
        )
    overhead, per_update = fit([(row["batch"], row["us_per_publication"]) for row in rows])
    print(
        json.dumps(
            {
                "us_per_update": round(per_update, 3),
                "us_per_publication_overhead": round(overhead, 2),
                "rows": rows,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
