"""Metrics an operator can trust when workers end (issue 14, point 1 and 2).

A reload, a stop and a `kill -9` of a worker on a real cluster: the counts
of a worker that stops cleanly reach the totals in full (its final report,
including the connections the stop closed, `reason="shutdown"`); a killed
worker's last report is kept; no series starts over.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

from cluster.client import ConnectionClosed, RelayClient
from cluster.supervisor import read_final_report
from relaycore.packets import ConnectNotification, RoutedData, RoutingResponse
from testbed.relay_process import RelayProcess, start_relay

METRICS = ["--metrics", "127.0.0.1:0"]
PACKETS = 40


def metrics_url(relay: RelayProcess) -> str:
    return next(line.split()[-1] for line in relay.stdout_lines if line.startswith("Metrics on"))


def scrape(relay: RelayProcess) -> str:
    return urllib.request.urlopen(metrics_url(relay), timeout=5).read().decode()


def value(text: str, series: str) -> float:
    """One sample of the exposition text; 0 for a series that is absent."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def wait_for_line(relay: RelayProcess, prefix: str, after: int = 0, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in relay.stdout_lines[after:]:
            if line.startswith(prefix):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} line; stdout={relay.stdout_lines!r}")


async def held_pair_with_traffic(
    relay: RelayProcess, source: str
) -> tuple[RelayClient, RelayClient]:
    """Two linked clients (from ``source``) after ``PACKETS`` data packets a -> b."""
    local = (source, 0)
    a = await RelayClient.connect(relay.host, relay.port, relay.public_key, local_addr=local)
    b = await RelayClient.connect(relay.host, relay.port, relay.public_key, local_addr=local)
    a.route_request(b.public_key)
    a_id = (await a.expect(RoutingResponse)).connection_id
    b.route_request(a.public_key)
    await b.expect(RoutingResponse)
    await b.expect(ConnectNotification)
    await a.expect(ConnectNotification)
    for _ in range(PACKETS):
        a.send_data(a_id, b"x" * 100)
        await b.expect(RoutedData)
    return a, b


async def wait_closed(clients: list[RelayClient]) -> None:
    for client in clients:
        try:
            await asyncio.wait_for(asyncio.shield(client.closed), 10)
        except (TimeoutError, ConnectionClosed):
            client.abort()


def test_reload_hands_over_every_count_including_the_shutdown_closes(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "relay", workers=2, extra_args=METRICS)
    try:

        async def scenario() -> None:
            pairs = [await held_pair_with_traffic(relay, f"127.0.0.{n}") for n in (2, 3, 4)]
            clients = [client for pair in pairs for client in pair]
            mark = len(relay.stdout_lines)
            os.kill(relay.pid, signal.SIGHUP)  # at once: the last second is not reported yet
            await asyncio.to_thread(wait_for_line, relay, "Reload complete", mark)
            await wait_closed(clients)

        before = scrape(relay)
        asyncio.run(scenario())
        text = scrape(relay)  # right after the reload, no periodic report awaited
        assert value(text, 'toxrelay_closed_connections_total{reason="shutdown"}') == 6
        assert value(text, "toxrelay_relayed_packets_total") == 3 * PACKETS
        assert value(text, "toxrelay_accepted_connections_total") == 6
        assert value(text, 'toxrelay_handshakes_total{result="confirmed"}') == 6
        assert value(text, "toxrelay_workers") == 2
        # One CPU series per worker slot, no per-process label: a reload
        # continues the same series and it never goes backwards.
        cpu = re.findall(r"^toxrelay_worker_cpu_seconds_total\{(.*)\} (\S+)$", text, re.M)
        assert sorted(labels for labels, _ in cpu) == ['worker="0"', 'worker="1"']
        for labels, seconds in cpu:
            assert float(seconds) >= value(before, f"toxrelay_worker_cpu_seconds_total{{{labels}}}")
    finally:
        relay.stop()


def test_clean_stop_prints_the_final_totals(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "relay", workers=2, extra_args=METRICS)
    codes: list[int | None] = []
    try:

        async def scenario() -> None:
            await held_pair_with_traffic(relay, "127.0.0.5")
            await held_pair_with_traffic(relay, "127.0.0.6")
            codes.append(relay.stop(signal.SIGTERM))  # within a second of the traffic

        asyncio.run(scenario())
    finally:
        relay.stop()
    assert codes == [0]
    line = wait_for_line(relay, "Final counters: ", timeout=5)
    totals = json.loads(line.removeprefix("Final counters: "))
    assert totals["relayed"] == 2 * PACKETS
    assert totals["closed.shutdown"] == 4
    assert totals["accepted"] == 4 and totals["confirmed"] == 4
    assert totals["links"] == 2


def test_killed_worker_keeps_its_last_reported_counts(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "relay", workers=2, extra_args=METRICS)
    try:
        clients: list[RelayClient] = []

        async def traffic() -> None:
            clients.extend(await held_pair_with_traffic(relay, "127.0.0.7"))

        asyncio.run(traffic())
        deadline = time.monotonic() + 10
        while value(text := scrape(relay), "toxrelay_relayed_packets_total") < PACKETS:
            assert time.monotonic() < deadline, "traffic never reported"
            time.sleep(0.2)
        cpu_before = {
            labels: float(seconds)
            for labels, seconds in re.findall(
                r"^toxrelay_worker_cpu_seconds_total\{(.*)\} (\S+)$", text, re.M
            )
        }
        for row in relay.status()["workers"]:
            os.kill(row["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:
            text = scrape(relay)
            restarted = value(text, "toxrelay_worker_restarts_total") == 2
            if restarted and value(text, "toxrelay_workers") == 2:
                break
            assert time.monotonic() < deadline, f"workers not restarted: {text}"
            time.sleep(0.2)
        assert value(text, "toxrelay_relayed_packets_total") == PACKETS
        assert value(text, "toxrelay_accepted_connections_total") == 2
        for labels, seconds in cpu_before.items():
            assert value(text, f"toxrelay_worker_cpu_seconds_total{{{labels}}}") >= seconds
    finally:
        relay.stop()


def test_accepted_connections_exclude_refused_ones(tmp_path: Path) -> None:
    """docs/operations.md: accepted = admitted within every limit; every
    socket accepted = accepted + refused."""
    relay = start_relay(
        tmp_path / "relay", workers=1, extra_args=METRICS, config="max_connections_per_ip = 2\n"
    )
    try:

        async def scenario() -> None:
            local = ("127.0.0.8", 0)
            kept = [
                await RelayClient.connect(
                    relay.host, relay.port, relay.public_key, local_addr=local
                )
                for _ in range(2)
            ]
            try:
                await RelayClient.connect(
                    relay.host, relay.port, relay.public_key, local_addr=local, timeout=5
                )
                raise AssertionError("a third connection from one address was admitted")
            except (ConnectionClosed, ConnectionError):
                pass
            for client in kept:
                await client.close()

        asyncio.run(scenario())
        deadline = time.monotonic() + 10
        series = 'toxrelay_refused_connections_total{reason="max_connections_per_ip"}'
        while value(text := scrape(relay), series) < 1:
            assert time.monotonic() < deadline, "refusal never reported"
            time.sleep(0.2)
        assert value(text, series) == 1
        assert value(text, "toxrelay_accepted_connections_total") == 2
    finally:
        relay.stop()


def test_final_report_is_the_last_final_line_and_garbage_is_ignored() -> None:
    async def final_of(script: str) -> dict | None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        await process.wait()
        return await read_final_report(process)

    good = 'print("READY 1 x"); print("FINAL " + \'{"counters": {"relayed": 3}}\')'
    assert asyncio.run(final_of(good)) == {"counters": {"relayed": 3}}
    assert asyncio.run(final_of('print("FINAL {not json")')) is None
    assert asyncio.run(final_of('print("FINAL [1, 2]")')) is None
    assert asyncio.run(final_of("import os; os.kill(os.getpid(), 9)")) is None
