"""Issue 10 #5: a client must not make the relay send chosen bytes to UDP
services on its own host or LAN. Against a real `--workers 2` cluster in its
default configuration, an attacker aims type 8 and type 10 requests at a UDP
socket on 127.0.0.1 (a service on the relay's host): nothing arrives, every
request is counted as refused, and cross-worker linking still works.

Measured (this machine): before the fix the service received every one of
the 80 datagrams; after it, none."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.adversarial.limits_attacks import (
    connect_from,
    dropped,
    forward_request,
    onion_request,
    settled_counters,
    start_limits_cluster,
    udp_sink,
)
from tests.cluster_process.support import link, run

REQUESTS_PER_CONNECTION = 20
CONNECTIONS = 4


def test_no_datagram_reaches_a_service_on_the_relays_host(tmp_path: Path) -> None:
    cluster = start_limits_cluster(tmp_path / "relay")
    try:
        run(_attack(cluster), timeout=60)
    finally:
        cluster.stop()


async def _attack(cluster) -> None:  # type: ignore[no-untyped-def]
    async with udp_sink("127.0.0.1") as (service, port):
        attackers = [
            await connect_from(cluster, "127.0.5.1", where)
            for where in cluster.shards()
            for _ in range(CONNECTIONS // 2)
        ]
        for client in attackers:
            for number in range(REQUESTS_PER_CONNECTION // 2):
                client.send_plain(forward_request("127.0.0.1", port, b"GET / %d" % number))
                client.send_plain(onion_request("127.0.0.1", port))
        for client in attackers:
            await client.ping()
        samples = await settled_counters(cluster)
        sent = CONNECTIONS * REQUESTS_PER_CONNECTION
        print(f"next hops: {len(service.datagrams)} of {sent} datagrams reached the service")
        assert service.datagrams == []
        assert dropped(samples, "next_hop_own_address") == sent
        for client in attackers:
            assert not client.closed.done()  # a silent drop, as the spec drops a failed request
            await client.close()
    # Honest users on both workers still link across them.
    a = await connect_from(cluster, "127.0.6.1", cluster.shards()[0])
    b = await connect_from(cluster, "127.0.6.2", cluster.shards()[1])
    await link(a, b)
    await asyncio.gather(a.close(), b.close())
