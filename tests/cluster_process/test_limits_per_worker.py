"""max_connections and max_connections_per_ip are per worker (issue 10
finding 9): docs, alert, example and code now say one thing. A real cluster
of 2 workers with max_connections = 3 holds 3 on each worker (6 in all),
refuses the 4th on a full worker, and reports each worker's count as
toxrelay_worker_connections, the metric the documented alert uses."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest

from cluster.client import ConnectionClosed, RelayClient
from testbed.relay_process import start_relay
from tests.cluster_process.support import Cluster, run

EXAMPLE = Path(__file__).resolve().parents[2] / "ops" / "cluster.example.toml"
OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def metric(body: str, name: str, labels: str) -> float | None:
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", body, re.MULTILINE)
    return float(match[1]) if match else None


def test_limits_apply_per_worker(tmp_path: Path) -> None:
    relay = start_relay(
        tmp_path / "relay",
        config="max_connections = 3\n",
        extra_args=["--shard-ports", "--metrics", "127.0.0.1:0"],
        workers=2,
    )
    cluster = Cluster(relay)
    url = next(line.split()[-1] for line in relay.stdout_lines if line.startswith("Metrics on"))

    async def scenario() -> str:
        first, second = cluster.shards()
        held: list[RelayClient] = []
        try:
            for shard in (first, second):
                for _ in range(3):
                    held.append(await cluster.connect(shard))
            with pytest.raises(ConnectionClosed):  # worker 0 is full
                await cluster.connect(first)
            for client in held:  # the cluster holds 2 x max_connections
                await client.ping()
            for _ in range(50):  # workers report once a second
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = response.read().decode()
                if all(
                    metric(body, "toxrelay_worker_connections", f'worker="{worker}"') == 3
                    for worker in (0, 1)
                ):
                    break
                await asyncio.sleep(0.1)
            return body
        finally:
            for client in held:
                await client.close()

    try:
        body = run(scenario())
    finally:
        cluster.stop()
    assert metric(body, "toxrelay_worker_connections", 'worker="0"') == 3
    assert metric(body, "toxrelay_worker_connections", 'worker="1"') == 3
    assert metric(body, "toxrelay_refused_connections_total", 'reason="max_connections"') == 1


def test_docs_example_and_alert_say_per_worker() -> None:
    example = EXAMPLE.read_text()
    for key in ("max_connections", "max_connections_per_ip", "max_unconfirmed"):
        comment = example.split(f"\n{key} = ")[0].rsplit("\n\n", 1)[1]
        assert comment.startswith("# PER WORKER:"), key
    operations = OPERATIONS.read_text()
    assert "**The connection limits apply per worker**" in operations
    alert = operations.split("alert: ToxRelayNearMaxConnections")[1].split("- alert:")[0]
    assert "max by (instance) (toxrelay_worker_connections)" in alert
    assert "sum by (instance) (toxrelay_connections)" not in alert
