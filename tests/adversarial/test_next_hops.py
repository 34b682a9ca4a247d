"""Issue 10 #5: a client must not make the relay send chosen bytes to UDP
services on its own host or LAN. Against a real `--workers 2` cluster in its
default configuration, an attacker on both workers aims type 8 and type 10
requests at a UDP socket on 127.0.0.1 (a service on the relay's host) for
the whole attack: nothing arrives there, every request is counted as
refused, the honest pair's round trips stay within the bound, and
cross-worker linking still works.

Measured (this machine, 3 s, 4 connections): before the fix every datagram
(472/472) reached the service; after it, 0/472."""

from __future__ import annotations

import asyncio

from tests.adversarial.limits_attacks import (
    METRICS_CONFIG,
    assert_rtt_within_bound,
    dropped,
    forward_request,
    honest_p99_during,
    onion_request,
    settled_counters,
    udp_sink,
)
from tests.adversarial.support import (
    ATTACKER,
    RSS_GROWTH_LIMIT,
    HonestPair,
    check_cross_worker_link,
    cluster_rss_bytes,
    connect_from,
)
from tests.cluster_process.support import Cluster, run

ATTACK_SECONDS = 3.0


def test_no_datagram_reaches_a_service_on_the_relays_host(attack_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = attack_cluster(METRICS_CONFIG)
    rss_before = cluster_rss_bytes(cluster)
    run(_attack(cluster), timeout=60)
    assert cluster_rss_bytes(cluster) - rss_before <= RSS_GROWTH_LIMIT


async def _probe(cluster: Cluster, port: int) -> int:
    """Two connections per worker, each sending a type 10 and a type 8 to the
    service every 50 ms; the number of requests sent."""
    attackers = [
        await connect_from(cluster, ATTACKER, where) for where in cluster.shards() for _ in "ab"
    ]
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ATTACK_SECONDS
    while loop.time() < deadline:
        for client in attackers:
            client.send_plain(forward_request("127.0.0.1", port, b"GET / %d" % sent))
            client.send_plain(onion_request("127.0.0.1", port))
            sent += 2
        await asyncio.sleep(0.05)
    for client in attackers:
        await client.ping()
        assert not client.closed.done()  # a silent drop, as the spec drops a failed request
        await client.close()
    return sent


async def _attack(cluster: Cluster) -> None:
    pair = await HonestPair.open(cluster)
    async with udp_sink("127.0.0.1") as (service, port):
        try:
            baseline, during, sent = await honest_p99_during(pair, lambda: _probe(cluster, port))
        finally:
            await pair.close()
        samples = await settled_counters(cluster)
        print(f"next hops: {len(service.datagrams)}/{sent} datagrams reached the service")
        assert service.datagrams == []
        assert dropped(samples, "next_hop_own_address") == sent
    assert_rtt_within_bound(baseline, during)
    await check_cross_worker_link(cluster)
