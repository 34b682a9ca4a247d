"""The control run of the attack harness: no attack, the honest measures hold.

If these fail, an attack test's failure says nothing about the attack."""

from __future__ import annotations

import asyncio

from tests.adversarial.support import (
    RSS_GROWTH_LIMIT,
    HonestPair,
    check_cross_worker_link,
    cluster_rss_bytes,
    measure_during,
    percentile,
    process_tree,
    rtt_bound,
)
from tests.cluster_process.support import run


def test_percentile_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert percentile(samples, 0.99) == 99.0
    assert percentile(samples, 0.5) == 50.0
    assert percentile([3.0], 0.99) == 3.0


def test_rtt_bound_has_a_floor() -> None:
    assert rtt_bound(0.001) == 0.020
    assert rtt_bound(0.010) == 0.050


def test_idle_cluster_meets_every_honest_measure(attack_cluster) -> None:
    cluster = attack_cluster()
    tree = process_tree(cluster.relay.pid)
    assert cluster.child_pids() <= set(tree), (tree, cluster.child_pids())
    rss_before = cluster_rss_bytes(cluster)
    assert rss_before > 0

    async def body() -> None:
        pair = await HonestPair.open(cluster)
        try:
            idle = asyncio.get_running_loop().create_future()
            baseline_p99, during_p99 = await measure_during(pair, 2.0, idle)
            assert during_p99 <= rtt_bound(baseline_p99), (baseline_p99, during_p99)
        finally:
            await pair.close()
        await check_cross_worker_link(cluster)

    run(body())
    assert cluster_rss_bytes(cluster) - rss_before <= RSS_GROWTH_LIMIT
