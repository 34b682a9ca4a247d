"""Cluster-wide statistics: sums, no counter resets across restarts, the
Prometheus endpoint and `cluster status` of a running cluster."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from cluster.client import RelayClient
from cluster.metrics import ClusterCollector, ClusterStats
from relaycore.packets import ConnectNotification, RoutedData, RoutingResponse
from testbed.relay_process import start_relay


def report(frames_in: int, confirmed: int = 1, cpu: float = 0.5) -> dict:
    return {
        "counters": {"frames_in": frames_in, "closed.R-FRAME-2": 1, "packets_in.ping": 3},
        "connections": {"incoming": 0, "unconfirmed": 0, "confirmed": confirmed},
        "loop_lag": 0.002,
        "rss": 1000,
        "cpu": cpu,
    }


def test_counters_never_go_backwards_when_a_worker_is_replaced() -> None:
    stats = ClusterStats()
    stats.slot_of_shard.update({1: 0, 2: 1})
    stats.record(1, 100, report(50), now=1.0)
    stats.record(2, 200, report(30), now=1.0)
    assert stats.totals()["frames_in"] == 80
    stats.retire(1)  # worker 0 died; its successor starts from zero
    stats.slot_of_shard[3] = 0
    stats.record(3, 300, report(5), now=2.0)
    assert stats.totals()["frames_in"] == 85  # 50 retired + 30 + 5
    assert stats.connections()["confirmed"] == 2
    # A report of the ended worker that was still queued is not counted twice.
    stats.record(1, 100, report(60), now=2.5)
    assert stats.totals()["frames_in"] == 85 and len(stats.workers) == 2


def test_worker_cpu_is_one_series_per_slot_across_restarts() -> None:
    """docs/operations.md: `toxrelay_worker_cpu_seconds_total{worker}` only;
    a restarted or reloaded slot continues its series (issue 14, point 2)."""
    stats = ClusterStats()
    stats.slot_of_shard.update({1: 0, 2: 1})
    stats.record(1, 100, report(5, cpu=2.0), now=1.0)
    stats.record(2, 200, report(5, cpu=1.0), now=1.0)
    stats.retire(1)  # slot 0's process ended; shard 3 replaces it
    stats.slot_of_shard[3] = 0
    stats.record(3, 300, report(0, cpu=0.25), now=2.0)
    cpu = re.findall(r"^toxrelay_worker_cpu_seconds_total\{(.*)\} (\S+)$", scrape(stats), re.M)
    assert sorted(cpu) == [('worker="0"', "2.25"), ('worker="1"', "1.0")]


def test_rates_come_from_consecutive_reports() -> None:
    stats = ClusterStats()
    stats.slot_of_shard[1] = 0
    stats.record(1, 100, report(100, cpu=1.0), now=10.0)
    stats.record(1, 100, report(300, cpu=1.5), now=12.0)
    row = stats.status()["workers"][0]
    assert row["frames_in_per_s"] == 100.0
    assert row["cpu_percent"] == 25.0


def scrape(stats: ClusterStats) -> str:
    """The Prometheus text the supervisor would serve for ``stats``."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(stats))
    return generate_latest(registry).decode()


def test_collector_exposes_labelled_counters() -> None:
    stats = ClusterStats()
    stats.slot_of_shard[1] = 0
    stats.record(1, 100, report(7), now=1.0)
    text = scrape(stats)
    assert 'toxrelay_closed_connections_total{reason="R-FRAME-2"} 1.0' in text
    assert 'toxrelay_packets_received_total{type="ping"} 3.0' in text
    assert 'toxrelay_frames_total{direction="in"} 7.0' in text
    assert 'toxrelay_connections{state="confirmed"} 1.0' in text
    assert "toxrelay_workers 1.0" in text


def test_collector_exposes_onion_and_bus_counters() -> None:
    stats = ClusterStats()
    stats.slot_of_shard[1] = 0
    sample = report(1)
    sample["counters"].update(
        {
            "onion.requests_sent": 4,
            "onion.replies_to_other_shards": 2,
            "forward.replies_delivered": 1,
            "udp.ignored": 6,
            "dropped.onion_rate_client": 5,
            "bus.messages_to_gone_shard": 9,
            "bus.batches_sent": 11,
            "onion.replies_delivered_0x84": 7,
            "onion.replies_delivered_0x88": 3,
            "dropped.onion_reply_bad_type": 8,
        }
    )
    stats.record(1, 100, sample, now=1.0)
    text = scrape(stats)
    assert 'toxrelay_onion_packets_total{event="requests_sent"} 4.0' in text
    assert 'toxrelay_onion_packets_total{event="replies_to_other_shards"} 2.0' in text
    assert 'toxrelay_forward_packets_total{event="replies_delivered"} 1.0' in text
    assert 'toxrelay_udp_datagrams_total{event="ignored"} 6.0' in text
    assert 'toxrelay_dropped_packets_total{reason="onion_rate_client"} 5.0' in text
    assert "toxrelay_bus_messages_to_exited_workers_total 9.0" in text
    assert "toxrelay_bus_batches_total 11.0" in text
    assert 'toxrelay_onion_packets_total{event="replies_delivered_0x88"} 3.0' in text
    totals = stats.status()["totals"]
    assert totals["onion_requests"] == 4 and totals["onion_replies_crossed_shards"] == 2
    # By response id (R-ORET-2a): what the issue-11 closing note reports.
    assert totals["onion_replies_by_type"] == {"0x84": 7, "0x88": 3}
    assert totals["onion_replies_dropped_bad_type"] == 8


def test_contained_errors_are_one_labelled_counter_that_survives_a_restart() -> None:
    """Issue 10 finding 2: toxrelay_internal_errors_total{where}."""
    stats = ClusterStats()
    stats.slot_of_shard.update({1: 0, 2: 1})
    sample = report(1)
    sample["counters"].update({"internal_errors.tick": 2, "internal_errors.bus_message": 1})
    stats.record(1, 100, sample, now=1.0)
    stats.retire(1)
    other = report(1)
    other["counters"]["internal_errors.tick"] = 1
    stats.record(2, 200, other, now=2.0)
    text = scrape(stats)
    assert 'toxrelay_internal_errors_total{where="tick"} 3.0' in text
    assert 'toxrelay_internal_errors_total{where="bus_message"} 1.0' in text


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match[1])


def scrape_url(url: str) -> str:
    return urllib.request.urlopen(url, timeout=5).read().decode()


def test_running_cluster_reports_traffic_in_metrics_and_status(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "relay", workers=2, extra_args=["--metrics", "127.0.0.1:0"])
    try:
        url = next(line.split()[-1] for line in relay.stdout_lines if line.startswith("Metrics on"))

        async def checks() -> None:
            # a and b stay open until the checks end: "confirmed 2" needs them.
            a = await RelayClient.connect(relay.host, relay.port, relay.public_key)
            b = await RelayClient.connect(relay.host, relay.port, relay.public_key)
            a.route_request(b.public_key)
            await a.expect(RoutingResponse)
            b.route_request(a.public_key)
            await b.expect(RoutingResponse)
            await b.expect(ConnectNotification)
            await a.expect(ConnectNotification)
            for _ in range(50):
                a.send_data(16, b"x" * 100)
                await b.expect(RoutedData)
            bad = await RelayClient.connect(relay.host, relay.port, relay.public_key)
            bad.send_plain(b"\x0c")  # reserved id: killed by R-RSV-1
            await asyncio.wait_for(asyncio.shield(bad.closed), 5)

            deadline = time.monotonic() + 10
            while True:  # reports arrive once a second
                text = await asyncio.to_thread(scrape_url, url)
                done = 'toxrelay_closed_connections_total{reason="R-RSV-1"}' in text and (
                    metric(text, "toxrelay_relayed_packets_total") >= 50
                )
                if done or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert metric(text, "toxrelay_relayed_packets_total") >= 50
            assert metric(text, "toxrelay_relayed_bytes_total") >= 50 * 100
            assert metric(text, 'toxrelay_handshakes_total{result="confirmed"}') >= 3
            assert metric(text, 'toxrelay_closed_connections_total{reason="R-RSV-1"}') == 1
            assert metric(text, 'toxrelay_packets_received_total{type="routing_request"}') == 2
            assert metric(text, "toxrelay_workers") == 2
            assert metric(text, "toxrelay_links_total") == 1

            deadline = time.monotonic() + 10
            while True:  # the map size comes from the coordinator's next report
                status = await asyncio.to_thread(relay.status)
                settled = (
                    status["totals"]["map_entries"] == 2 and status["totals"]["confirmed"] == 2
                )
                if settled or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert len(status["workers"]) == 2
            assert {row["pid"] for row in status["workers"]} and all(
                row["rss_bytes"] > 0 for row in status["workers"]
            )
            totals = status["totals"]
            assert totals["confirmed"] == 2  # a and b; the bad one is gone
            # Read after the scrape: each worker's next report may have added to it.
            assert totals["relayed_packets"] >= metric(text, "toxrelay_relayed_packets_total") >= 50
            assert totals["frames_in"] >= metric(text, 'toxrelay_frames_total{direction="in"}')
            assert totals["map_entries"] == 2
            table = (
                await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "cluster.cli", "status", "--once"],
                    cwd=relay.workdir,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            ).stdout
            assert "confirmed clients 2" in table
            for client in (a, b):
                await client.close()

        asyncio.run(checks())
    finally:
        relay.stop()


def test_status_without_a_cluster_fails_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no cluster is running" in result.stderr


def test_admin_socket_is_private_and_json_logs(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "relay", workers=1, extra_args=["--log-format", "json"])
    try:
        socket_path = relay.workdir / "relay-admin.sock"
        assert oct(os.stat(socket_path).st_mode & 0o777) == oct(0o600)
    finally:
        relay.stop(signal.SIGTERM)
    lines = [line for line in relay.stderr_text().splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "process", "message"} <= set(entries[0])
    assert any(e["process"] == "coordinator" for e in entries)
    secret = relay.secret_key.hex()
    assert all(secret not in line.lower() for line in lines)
