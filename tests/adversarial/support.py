"""What an honest user of an attacked relay cares about, measured from outside.

The attack tests of issue 10 run each attack against a real `cluster start
--workers 2` over loopback. The attacker and the honest clients use different
127.x source addresses (per-address limits must not punish the honest ones).
This module holds what every attack test asserts afterwards:

- ``HonestPair``: two clients on different workers, linked, that bounce a
  numbered payload back and forth through the relay; its round-trip samples
  give a baseline and a p99 during the attack;
- ``cluster_rss_bytes``: resident memory of the whole cluster (supervisor,
  coordinator and every worker: the supervisor's process tree, from /proc);
- ``check_cross_worker_link``: a fresh pair on different workers still links
  and passes DATA and OOB both ways;
- ``rtt_bound``: the issue's bound on the p99 during an attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path

from cluster.client import RelayClient
from relaycore.packets import RoutedData
from tests.cluster_process.support import Cluster, ShardLine, check_data, check_oob, link

HONEST_A = "127.0.0.2"
HONEST_B = "127.0.0.3"
HONEST_NEWCOMER = "127.0.0.4"
ATTACKER = "127.0.0.66"

RSS_GROWTH_LIMIT = 64 * 1024 * 1024  # bytes, whole cluster, any single-client attack
RTT_FLOOR = 0.020  # seconds: the p99 bound is max(RTT_FLOOR, RTT_FACTOR x baseline p99)
RTT_FACTOR = 5.0


def rtt_bound(baseline_p99: float) -> float:
    """Issue 10: an honest pair's p99 during an attack stays within this."""
    return max(RTT_FLOOR, RTT_FACTOR * baseline_p99)


def percentile(samples: list[float], fraction: float) -> float:
    """The sample below which ``fraction`` of the samples lie (nearest rank)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


# -- memory -------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant alive now."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue += _children(current)
    return tree


def rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cluster_rss_bytes(cluster: Cluster) -> int:
    """Resident memory of the supervisor and all its descendants."""
    return sum(rss_bytes(pid) for pid in process_tree(cluster.relay.pid))


# -- honest clients -------------------------------------------------------------


async def connect_from(
    cluster: Cluster, source_ip: str, where: ShardLine | None = None, timeout: float = 5.0
) -> RelayClient:
    """A confirmed client from ``source_ip`` on ``where``'s shard (or the shared port)."""
    return await cluster.connect(where, timeout=timeout, source_ip=source_ip)


class HonestPair:
    """Two honest clients on different workers bouncing numbered DATA.

    ``a`` sends sequence n to ``b``; ``b`` answers with the same n; one round
    trip is one sample (two relay traversals each way when the workers differ:
    it crosses the peer bus twice)."""

    def __init__(self, a: RelayClient, b: RelayClient, id_a: int, id_b: int) -> None:
        self.a, self.b = a, b
        self.id_a, self.id_b = id_a, id_b
        self.samples: list[float] = []
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._sequence = 0

    @classmethod
    async def open(cls, cluster: Cluster) -> HonestPair:
        shards = cluster.shards()
        a = await connect_from(cluster, HONEST_A, shards[0])
        b = await connect_from(cluster, HONEST_B, shards[-1])
        id_a, id_b = await link(a, b)
        return cls(a, b, id_a, id_b)

    async def round_trip(self, timeout: float = 5.0) -> float:
        loop = asyncio.get_running_loop()
        self._sequence += 1
        payload = b"rtt" + self._sequence.to_bytes(8, "big")
        started = loop.time()
        self.a.send_data(self.id_a, payload)
        await self._await_payload(self.b, self.id_b, payload, timeout)
        self.b.send_data(self.id_b, payload)
        await self._await_payload(self.a, self.id_a, payload, timeout)
        return loop.time() - started

    @staticmethod
    async def _await_payload(
        client: RelayClient, connection_id: int, payload: bytes, timeout: float
    ) -> None:
        async with asyncio.timeout(timeout):
            while True:
                event = await client.next_event(None)
                if event == RoutedData(connection_id, payload):
                    return

    async def measure(self, seconds: float, interval: float = 0.005) -> list[float]:
        """Round trips for ``seconds`` (one every ``interval``); the samples."""
        loop = asyncio.get_running_loop()
        samples: list[float] = []
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            samples.append(await self.round_trip())
            await asyncio.sleep(interval)
        return samples

    def start(self, interval: float = 0.005) -> None:
        """Sample round trips in the background until ``stop``."""

        async def run() -> None:
            while True:
                try:
                    self.samples.append(await self.round_trip())
                except TimeoutError:
                    self.failures.append("round trip timed out")
                except Exception as error:  # reported by stop()
                    self.failures.append(repr(error))
                    return
                await asyncio.sleep(interval)

        self.samples = []
        self.failures = []
        self._task = asyncio.get_running_loop().create_task(run())

    async def stop(self) -> list[float]:
        """Stop sampling; the samples taken since ``start``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        return self.samples

    async def close(self) -> None:
        await self.stop()
        for client in (self.a, self.b):
            await client.close()


async def measure_during(
    pair: HonestPair, attack_seconds: float, attack: asyncio.Future[object] | None = None
) -> tuple[float, float]:
    """(baseline p99, p99 while the attack runs ``attack_seconds``).

    The baseline is taken first (1 s, before the attack starts). ``attack`` is
    awaited-after (cancelled if still running) so its errors surface."""
    baseline = await pair.measure(1.0)
    pair.start()
    await asyncio.sleep(attack_seconds)
    samples = await pair.stop()
    if attack is not None:
        attack.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attack
    assert not pair.failures, pair.failures
    assert len(samples) >= 10, f"only {len(samples)} round trips in {attack_seconds} s"
    return percentile(baseline, 0.99), percentile(samples, 0.99)


async def check_cross_worker_link(cluster: Cluster) -> None:
    """A fresh pair from a new address, on different workers, links and talks."""
    shards = cluster.shards()
    first = await connect_from(cluster, HONEST_NEWCOMER, shards[0])
    second = await connect_from(cluster, HONEST_NEWCOMER, shards[-1])
    try:
        id_first, id_second = await link(first, second)
        await check_data(first, id_first, second, id_second, b"after the attack")
        await check_data(second, id_second, first, id_first, b"both ways")
        await check_oob(first, second, b"oob after the attack")
        await check_oob(second, first, b"oob back")
    finally:
        await first.close()
        await second.close()
