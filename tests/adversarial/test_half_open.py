"""Issue 10 #6: a half-open flood (bare TCP connects that never send a byte)
must not lock honest newcomers out. Against a real `--workers 2` cluster
(`max_unconfirmed` lowered to 300 per worker so that a test-sized flood fills
it), a flooding process holds bare sockets open and keeps adding more while
honest newcomers, each from an address of its own, connect: all of them get
in, the honest pair's round trips stay within the bound, and cross-worker
linking still works after the flood.

Measured (this machine, 20 newcomers during each flood): before the fix
0/20 connected under the 8-address flood and 0/20 under the one-address
flood; after it, 20/20 under both."""

from __future__ import annotations

import asyncio

from tests.adversarial.limits_attacks import (
    METRICS_CONFIG,
    AttackProcess,
    assert_rtt_within_bound,
    counters,
    half_open_flood,
    honest_p99_during,
    newcomer_connects,
    sources,
)
from tests.adversarial.support import (
    RSS_GROWTH_LIMIT,
    HonestPair,
    check_cross_worker_link,
    cluster_rss_bytes,
)
from tests.cluster_process.support import Cluster, run, wait_until

CONFIG = METRICS_CONFIG + "max_unconfirmed = 300\n"  # per worker; per-address cap: default
NEWCOMERS = 20
ATTACK_SECONDS = 4.0


def test_newcomers_connect_during_a_flood_from_many_addresses(attack_cluster) -> None:  # type: ignore[no-untyped-def]
    """1200 bare sockets from 8 addresses (~600 per worker, twice the cap), 40
    more every 50 ms: the flooders' oldest handshakes are evicted for each
    newcomer (a flood from many addresses; one client can hold several)."""
    cluster = attack_cluster(CONFIG)
    rss_before = cluster_rss_bytes(cluster)
    run(_flood(cluster, list(sources("127.0.7", 8)), 150, "evicted"), timeout=60)
    assert cluster_rss_bytes(cluster) - rss_before <= RSS_GROWTH_LIMIT


def test_newcomers_connect_during_a_flood_from_one_address(attack_cluster) -> None:  # type: ignore[no-untyped-def]
    """700 bare sockets from one address: past `max_unconfirmed_per_ip` (256
    per worker) its further sockets are refused, the cap is never reached."""
    cluster = attack_cluster(CONFIG)
    rss_before = cluster_rss_bytes(cluster)
    run(_flood(cluster, ["127.0.9.1"], 700, "refused"), timeout=60)
    assert cluster_rss_bytes(cluster) - rss_before <= RSS_GROWTH_LIMIT


def _incoming(cluster: Cluster) -> float:
    return counters(cluster).get('toxrelay_connections{state="incoming"}', 0.0)


async def _newcomers(cluster: Cluster, flooders: list[str], per_source: int) -> tuple[int, int]:
    """The flood starts; once it is held, NEWCOMERS honest clients connect one
    by one; (how many got in, how many sockets the flood opened)."""
    relay = cluster.relay
    flood = AttackProcess(
        half_open_flood, relay.host, relay.port, flooders, per_source, ATTACK_SECONDS
    )
    try:
        await wait_until(lambda: _incoming(cluster) >= 400, 10, "the flood to be held")
        connected = 0
        for source in sources("127.0.8", NEWCOMERS):
            connected += await newcomer_connects(cluster, source)
        opened = await flood.result(timeout=ATTACK_SECONDS + 20)
    finally:
        flood.stop()
    assert isinstance(opened, int)
    return connected, opened


async def _flood(cluster: Cluster, flooders: list[str], per_source: int, how: str) -> None:
    pair = await HonestPair.open(cluster)
    try:
        baseline, during, (connected, opened) = await honest_p99_during(
            pair, lambda: _newcomers(cluster, flooders, per_source)
        )
    finally:
        await pair.close()
    samples = counters(cluster)
    print(f"half-open ({how}, {len(flooders)} addresses, {opened} sockets): "
          f"{connected}/{NEWCOMERS} newcomers connected")  # fmt: skip
    assert connected == NEWCOMERS
    assert_rtt_within_bound(baseline, during)
    if how == "evicted":
        assert samples.get('toxrelay_closed_connections_total{reason="evicted_unconfirmed"}')
    else:
        assert samples.get('toxrelay_refused_connections_total{reason="max_unconfirmed_per_ip"}')
    await asyncio.sleep(0.5)  # the flood's sockets are closed: their ends go
    await check_cross_worker_link(cluster)
