"""Issue 10 findings 3 and 4 against a real `--workers 2` cluster.

- Empty frames: one client streaming 00 00 cost ~46 ms of CPU per MiB in a
  Python loop (a client at ~20 MB/s pinned a worker). Runs are now skipped
  at C speed and one read handles a bounded number of frames; the honest
  pair on the attacked worker keeps its round-trip time.
- Input while waiting: while a routing request waits for another worker's
  answer, everything the client sent was kept in memory. The relay now stops
  reading from it (TCP pushes back), so the cluster's memory does not grow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from relaycore.packets import Ping, Pong
from tests.adversarial.support import (
    ATTACKER,
    RSS_GROWTH_LIMIT,
    HonestPair,
    check_cross_worker_link,
    cluster_rss_bytes,
    connect_from,
    measure_during,
    rtt_bound,
)
from tests.cluster_process.support import Cluster, request, run

ATTACK_SECONDS = 5.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_stream_of_empty_frames_does_not_hold_the_worker(
    attack_cluster: Callable[..., Cluster],
) -> None:
    cluster = attack_cluster()
    attacked = cluster.shards()[0]  # HonestPair.open puts its first client here

    async def body() -> None:
        pair = await HonestPair.open(cluster)
        cpu_before = cpu_seconds(attacked.pid)
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.adversarial.zero_flood",
            attacked.host, str(attacked.port), cluster.relay.public_key.hex(),
            ATTACKER, str(ATTACK_SECONDS),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            await asyncio.sleep(0.5)  # its handshake; then the flood runs
            baseline, during = await measure_during(pair, ATTACK_SECONDS - 1.5)
            output, _ = await attacker.communicate()
        finally:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()
        accepted = int(output)
        cpu = cpu_seconds(attacked.pid) - cpu_before
        mib = accepted / (1 << 20)
        print(
            f"empty frames: {mib:.0f} MiB accepted, worker CPU {cpu * 1000 / max(mib, 1):.2f} ms"
            f"/MiB; honest p99 {baseline * 1000:.2f} ms before, {during * 1000:.2f} ms during"
        )
        assert mib > 20, "the flood did not run"
        assert during <= rtt_bound(baseline), (baseline, during)
        await check_cross_worker_link(cluster)
        await pair.close()

    run(body(), timeout=40)


def test_input_sent_while_a_routing_request_waits_stays_in_the_kernel(
    attack_cluster: Callable[..., Cluster],
) -> None:
    """The answer is made to wait by stopping the other worker (SIGSTOP, less
    than the coordinator's silence limit); meanwhile the attacker sends 96 MiB."""
    cluster = attack_cluster()
    asking, answering = cluster.shards()

    async def body() -> None:
        victim = await connect_from(cluster, "127.0.0.5", answering)
        attacker = await connect_from(cluster, ATTACKER, asking)
        await asyncio.sleep(0.3)  # the map has the victim's key on every worker
        rss_before = cluster_rss_bytes(cluster)
        os.kill(answering.pid, signal.SIGSTOP)
        try:
            await request(attacker, victim.public_key)  # its WANT waits
            for _ in range(96):
                attacker.send_raw(bytes(1 << 20))  # empty frames: cheap to send
            await asyncio.sleep(1.2)
            growth = cluster_rss_bytes(cluster) - rss_before
        finally:
            os.kill(answering.pid, signal.SIGCONT)
        print(f"held while waiting: cluster RSS grew {growth / (1 << 20):.1f} MiB for 96 MiB sent")
        assert growth < RSS_GROWTH_LIMIT
        # The wait ends (answer or timeout); what was sent is read after all.
        attacker.send(Ping(b"after!!!"))
        assert await attacker.expect(Pong, timeout=10) == Pong(b"after!!!")
        await check_cross_worker_link(cluster)
        await attacker.close()
        await victim.close()

    run(body(), timeout=40)
