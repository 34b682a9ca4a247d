"""A key that reconnects on another shard, and traffic to it that races the
routing map's update (issue 12): the cluster must behave as one process.

A1 and B connect; A2 connects with A1's key, so A1 is closed (R-CONF-3); as
soon as A1's close is seen, B sends to that key. One process delivers to A2
whatever B sends from then on (R-OOB-2, R-ROUTE-6). In the cluster, B's
shard may still map the key to A1's shard and epoch when B's frames arrive:
what it sends there must reach A2, not be dropped as stale.

Each run places the three clients on shards of ``--workers 4`` by their
direct addresses, rotating, so that A2 lands on A1's shard, on B's shard and
on a third one in turn.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from cluster.client import RelayClient
from relaycore.packets import (
    ConnectNotification,
    OobReceive,
    OobSend,
    Packet,
    RoutingRequest,
    RoutingResponse,
)
from tests.cluster_process.support import (
    Cluster,
    check_data,
    closed_within,
    expect_event,
    run,
)

RUNS = 20
SETTLE = 0.1  # seconds for every replica to map A1 (updates are pushed at once)


def _placements(count: int, runs: int) -> list[tuple[int, int, int]]:
    """(A1, B, A2) shard indexes: A2 on A1's shard, on B's, or on a third."""
    placements = []
    for run_index in range(runs):
        a1 = run_index % count
        b = (a1 + 1) % count
        a2 = (a1, b, (a1 + 2) % count)[run_index % 3]
        placements.append((a1, b, a2))
    return placements


async def _events_until(client: RelayClient, wanted: set[type], timeout: float) -> list[Packet]:
    """The client's events until one of each ``wanted`` kind has come."""
    events: list[Packet] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not wanted <= {type(event) for event in events}:
        events.append(await client.next_event(max(0.01, deadline - loop.time())))
    return events


def test_traffic_to_a_key_that_just_reconnected_reaches_its_new_connection(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(4)
    shards = cluster.shards()

    async def body() -> None:
        for run_index, (i, j, k) in enumerate(_placements(len(shards), RUNS)):
            a_key = os.urandom(32)
            a1 = await cluster.connect(shards[i], secret_key=a_key)
            b = await cluster.connect(shards[j])
            await asyncio.sleep(SETTLE)  # B's shard maps A's key to A1
            a2 = await cluster.connect(shards[k], secret_key=a_key, confirm=False)
            a2.route_request(b.public_key)  # A2's first frame confirms it
            response = await expect_event(a2, RoutingResponse)
            await closed_within(a1, 3.0)
            # At once, in one write: an OOB and a routing request to A's key.
            payload = b"run %d" % run_index
            b.queue(OobSend(a1.public_key, payload))
            b.queue(RoutingRequest(a1.public_key))
            b.flush()
            where = f"run {run_index}: A1 on {i}, B on {j}, A2 on {k}"
            events = await _events_until(a2, {OobReceive, ConnectNotification}, 3.0)
            assert OobReceive(b.public_key, payload) in events, (where, events)
            assert ConnectNotification(response.connection_id) in events, (where, events)
            b_response = await expect_event(b, RoutingResponse)
            assert await expect_event(b, ConnectNotification) == ConnectNotification(
                b_response.connection_id
            ), where
            await check_data(b, b_response.connection_id, a2, response.connection_id, payload)
            assert a2.pending_events() == [] and b.pending_events() == [], where
            for client in (a2, b):
                await client.close()

    run(body(), timeout=120.0)
