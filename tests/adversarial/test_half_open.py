"""Issue 10 #6: a half-open flood (bare TCP connects that never send a byte)
must not lock honest newcomers out. Against a real `--workers 2` cluster
(`max_unconfirmed` lowered to 300 per worker so that a test-sized flood fills
it), attackers hold many bare sockets open while honest newcomers, each from
an address of its own, connect: all of them get in, and cross-worker linking
still works after the flood.

Measured (this machine, 20 newcomers during each flood): before the fix
0/20 connected under the 8-address flood and 0/20 under the one-address
flood; after it, 20/20 under both."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.adversarial.limits_attacks import (
    bare_sockets,
    close_all,
    connect_from,
    counters,
    newcomer_connects,
    sources,
    start_limits_cluster,
)
from tests.cluster_process.support import Cluster, link, run, wait_until

CONFIG = "max_unconfirmed = 300\n"  # per worker; max_unconfirmed_per_ip keeps its default
NEWCOMERS = 20


def test_newcomers_connect_during_a_flood_from_many_addresses(tmp_path: Path) -> None:
    """1200 bare sockets from 8 addresses (~600 per worker, twice the cap):
    the flooders' oldest handshakes are evicted for each newcomer."""
    cluster = start_limits_cluster(tmp_path / "relay", CONFIG)
    try:
        run(_flood(cluster, list(sources("127.0.7", 8)), 150, "evicted"), timeout=60)
    finally:
        cluster.stop()


def test_newcomers_connect_during_a_flood_from_one_address(tmp_path: Path) -> None:
    """700 bare sockets from one address: past `max_unconfirmed_per_ip` (256
    per worker) its further sockets are refused, the cap is never reached."""
    cluster = start_limits_cluster(tmp_path / "relay", CONFIG)
    try:
        run(_flood(cluster, ["127.0.9.1"], 700, "refused"), timeout=60)
    finally:
        cluster.stop()


def _incoming(cluster: Cluster) -> float:
    return counters(cluster).get('toxrelay_connections{state="incoming"}', 0.0)


async def _flood(cluster: Cluster, flooders: list[str], per_source: int, how: str) -> None:
    relay = cluster.relay
    flood = bare_sockets(relay.host, relay.port, flooders, per_source)
    try:
        # The flood has filled what it can once the workers report it.
        await wait_until(lambda: _incoming(cluster) >= 400, 10, "the flood to be held")
        connected = 0
        for number, source in enumerate(sources("127.0.8", NEWCOMERS)):
            connected += await newcomer_connects(cluster, source)
            # Keep the pressure on: the flooders reconnect what was closed.
            flood += bare_sockets(relay.host, relay.port, flooders[number % len(flooders) :][:1], 5)
        samples = counters(cluster)
        print(f"half-open ({how}, {len(flooders)} addresses): {connected}/{NEWCOMERS} connected")
        assert connected == NEWCOMERS
        if how == "evicted":
            assert samples.get('toxrelay_closed_connections_total{reason="evicted_unconfirmed"}')
        else:
            refused = 'toxrelay_refused_connections_total{reason="max_unconfirmed_per_ip"}'
            assert samples.get(refused)
    finally:
        close_all(flood)
    a = await connect_from(cluster, "127.0.6.1", cluster.shards()[0])
    b = await connect_from(cluster, "127.0.6.2", cluster.shards()[1])
    await link(a, b)
    await asyncio.gather(a.close(), b.close())
