"""CPU per relayed frame in the sans-IO core: two linked clients on one
relay (a shard of a cluster: ``shard=1``, as a worker runs it), one sending
routed data to the other as fast as the core takes it, and the adapter's
part reduced to taking the output (``data_to_send``, or the outbox on trees
that predate it). No sockets, no event loop: what the number measures is the
core's hot path (decrypt, route, encrypt, queue), the part a restructuring
of ``relaycore`` can make dearer.

    python3 -m ops.bench.frame_cost [--frames N] [--rounds R] [--payload BYTES] [--cross]

``--cross``: the two clients are on two shards of a cluster (two relays with
shard ids 1 and 2, their link messages handed from one's ``take_bus`` to the
other's ``receive_link`` in process): the core's share of a cross-shard
frame, both shards together, without the bus's encoding and ZeroMQ.

Prints one JSON line: microseconds of process CPU per frame, the best and
the median of the rounds. Run it against two trees (PYTHONPATH) in
alternation to compare them on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from relaycore.client import ClientConnection
from relaycore.crypto import generate_keypair
from relaycore.packets import Ping, RoutedData, RoutingRequest
from relaycore.relay import RelayServer
from relaycore.shardlink import MapUpdate


def _data_to_send(connection: object) -> bytes:
    """``connection.data_to_send()``, or what it does on trees that predate it."""
    data_to_send = getattr(connection, "data_to_send", None)
    if data_to_send is not None:
        return data_to_send()
    outbox = connection.outbox  # type: ignore[attr-defined]
    data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
    outbox.clear()
    connection.outbox_size = 0  # type: ignore[attr-defined]
    return data


def _drain(server: RelayServer) -> int:
    """The adapter's part: what each connection has to write, in bytes."""
    return sum(len(_data_to_send(connection)) for connection in server.take_dirty())


def _exchange(servers: dict[int, RelayServer]) -> bool:
    """Hand each shard's link messages and map registrations to every shard
    (as the bus and the coordinator would); True when anything moved."""
    moved = False
    for shard, server in servers.items():
        cluster = server.cluster
        for kind, public_key, epoch in cluster.take_registry():  # type: ignore[attr-defined]
            moved = True
            for other in servers.values():
                if kind == 1:  # REGISTER
                    update = (MapUpdate.SET, public_key, shard, epoch, None, None)
                else:
                    update = (MapUpdate.DEL, public_key, shard, epoch)
                other.cluster.apply_map_update(update, 0.0)  # type: ignore[attr-defined]
        for destination, message in cluster.take_bus(0.0):  # type: ignore[attr-defined]
            moved = True
            servers[destination].cluster.receive_link(shard, message, 0.0)  # type: ignore[attr-defined]
    return moved


def _pump(servers: dict[int, RelayServer], ends: list[tuple]) -> None:
    """Move bytes and link messages every way until quiet (handshakes, link).
    ``ends``: (client, its server, its connection there)."""
    for _ in range(20):
        moved = _exchange(servers)
        for client, server, connection in ends:
            data = client.take_outbox()
            if data:
                server.receive(connection, data, 0.0)
                moved = True
            for dirty in server.take_dirty():
                output = _data_to_send(dirty)
                if dirty is connection:
                    client.receive(output)
        if not moved:
            return


def measure(frames: int, payload: int, cross: bool = False) -> float:
    """Seconds of process CPU per frame, for ``frames`` frames in one batch
    per 256 (FRAMES_PER_RECEIVE: one read of a busy socket); ``cross``: the
    receiver on a second shard, link messages handed over in process."""
    server_sk = generate_keypair()[1]
    shard_ids = [1, 2] if cross else [1]
    servers = {shard: RelayServer(server_sk, shard=shard) for shard in shard_ids}
    for server in servers.values():
        server.cluster.set_peer_shards(shard_ids, 0.0)  # type: ignore[attr-defined]
    first, last = servers[shard_ids[0]], servers[shard_ids[-1]]
    sender = ClientConnection(os.urandom(32), first.public_key)
    receiver = ClientConnection(os.urandom(32), last.public_key)
    ends = [
        (sender, first, first.open_connection("127.0.0.1", 0.0)),
        (receiver, last, last.open_connection("127.0.0.2", 0.0)),
    ]
    _pump(servers, ends)
    sender.send(Ping(b"12345678"))
    receiver.send(Ping(b"12345678"))
    _pump(servers, ends)
    sender.send(RoutingRequest(receiver.public_key))
    receiver.send(RoutingRequest(sender.public_key))
    _pump(servers, ends)
    body = os.urandom(payload)
    batch = 256
    chunks = []
    for _ in range(frames // batch):
        for _ in range(batch):
            sender.send(RoutedData(16, body))
        chunks.append(sender.take_outbox())
    connection = ends[0][2]
    relayed_before = last.stats["relayed"]
    started = time.process_time()
    for chunk in chunks:
        first.receive(connection, chunk, 1.0)
        _drain(first)
        if cross:
            for _, message in first.cluster.take_bus(1.0):  # type: ignore[attr-defined]
                last.cluster.receive_link(1, message, 1.0)  # type: ignore[attr-defined]
            _drain(last)
    spent = time.process_time() - started
    relayed = last.stats["relayed"] - relayed_before
    if relayed != len(chunks) * batch:
        raise SystemExit(f"relayed {relayed} of {len(chunks) * batch} frames")
    return spent / relayed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--payload", type=int, default=128)
    parser.add_argument("--cross", action="store_true", help="sender and receiver on two shards")
    arguments = parser.parse_args(argv)
    per_frame = [
        measure(arguments.frames, arguments.payload, arguments.cross)
        for _ in range(arguments.rounds)
    ]
    print(
        json.dumps(
            {
                "us_per_frame_best": round(min(per_frame) * 1e6, 3),
                "us_per_frame_median": round(statistics.median(per_frame) * 1e6, 3),
                "rounds": arguments.rounds,
                "frames": arguments.frames,
                "payload": arguments.payload,
                "cross_shard": arguments.cross,
            }
        )
    )


if __name__ == "__main__":
    main()
