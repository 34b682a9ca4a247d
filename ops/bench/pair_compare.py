"""Side-by-side benchmark: Debian's tox-bootstrapd 0.2.18 versus our relay, in one run.

Run from the repository root::

    python ops/bench/pair_compare.py [--rounds N] [--json]

Both relays are started on loopback (temporary work directories, random keys) and
measured in turns -- each phase runs against one relay, then the other, and the order
flips every round -- so that background load on a small shared machine hits both alike.
Per round and relay:

1. **handshakes/s** -- ``--connections`` connections opened ``--concurrency`` at a time;
   each does the handshake plus the confirming first PING round trip, then closes.
   Reports handshakes/s and p50/p99 latency (connect start to PONG).
2. **RTT of one client pair** -- two clients route to each other and wait for both
   connect notifications; then up to ``--rtt-count`` ping-pong round trips of a
   ``--rtt-size``-byte routed data packet (A sends, B echoes, A waits), and the same
   number of PING->PONG round trips to the relay. Each series also stops after
   ``--rtt-time-limit`` seconds: tox-bootstrapd sleeps 30 ms per main-loop iteration
   (tox-bootstrapd-reference.md section 6), so 2000 of its round trips would take a minute;
   the sample counts are reported. Both series start after up to 20 untimed round
   trips (at most 0.5 s) and are timed with ``time.perf_counter`` from the client
   protocol's receive callback; PINGs go the same way rather than through
   ``RelayClient.ping()``, whose ``loop.time()`` has 1 ms resolution under uvloop.
3. **windowed throughput of one pair** -- A keeps ``--window`` data packets of
   ``--frame-size`` bytes in flight to B (in flight = sent by A, not yet counted by B)
   for ``--duration`` seconds; B only counts. Reports relayed frames/s.

The table shows the median over rounds of each metric for each relay and the ratio
ours/bootstrapd; ``--json`` prints one JSON line (with per-round values) instead.

The clients are Python (this repo's ``cluster.client.RelayClient`` on uvloop) and
share the machine's cores with the relay under test, so for a fast relay the numbers
include client cost. tox-bootstrapd does not notice a client closing its socket
(reference section 7): the handshake phase leaves its connections registered there for
up to ~40 s, which our relay does not -- noted, not corrected for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repo

import uvloop

from cluster.client import RelayClient
from ops.bench import common
from relaycore.packets import (
    ConnectNotification,
    Packet,
    Ping,
    Pong,
    RoutedData,
    RoutingResponse,
)
from testbed.bootstrapd import start_bootstrapd
from testbed.relay_process import start_relay

REFERENCE = "bootstrapd"
OURS = "ours"


class Relay(Protocol):
    """What the benchmark needs of a started relay (both helpers' classes fit)."""

    host: str
    port: int
    public_key: bytes
    pid: int

    def stop(self) -> Any: ...


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("handshakes_per_s", "handshakes/s", "1/s", True),
    Metric("handshake_p50_ms", "handshake latency p50", "ms", False),
    Metric("handshake_p99_ms", "handshake latency p99", "ms", False),
    Metric("data_rtt_p50_us", "data RTT median", "us", False),
    Metric("data_rtt_p90_us", "data RTT p90", "us", False),
    Metric("data_rtt_p99_us", "data RTT p99", "us", False),
    Metric("ping_rtt_p50_us", "PING RTT median", "us", False),
    Metric("ping_rtt_p90_us", "PING RTT p90", "us", False),
    Metric("ping_rtt_p99_us", "PING RTT p99", "us", False),
    Metric("frames_per_s", "windowed frames/s", "1/s", True),
)

# Counts that explain the metrics (reported, not compared).
COUNTS: tuple[str, ...] = ("handshake_failures", "data_rtt_samples", "ping_rtt_samples")


# ---------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------


class BenchClient(RelayClient):
    """``RelayClient`` timed through its ``on_packets`` fast path: packets go
    straight from ``data_received`` to the callback (no task switch per packet,
    which would dominate a fast relay's RTT); without it, the event queue."""


async def connect(relay: Relay) -> BenchClient:
    client = await BenchClient.connect(relay.host, relay.port, relay.public_key, confirm=True)
    assert isinstance(client, BenchClient)
    return client


async def link_pair(relay: Relay) -> tuple[BenchClient, int, BenchClient, int]:
    """Two clients routed to each other, both connected; (a, a's id, b, b's id)."""
    a = await connect(relay)
    b = await connect(relay)
    a.route_request(b.public_key)
    b.route_request(a.public_key)
    a_id, b_id = await asyncio.gather(_await_link(a, b.public_key), _await_link(b, a.public_key))
    return a, a_id, b, b_id


async def _await_link(client: BenchClient, peer_key: bytes) -> int:
    """Wait for the RoutingResponse for ``peer_key`` and its ConnectNotification."""
    connection_id: int | None = None
    connected: set[int] = set()
    while connection_id is None or connection_id not in connected:
        event = await client.next_event(timeout=10.0)
        if isinstance(event, RoutingResponse) and event.public_key == peer_key:
            if event.connection_id == 0:
                raise RuntimeError("relay refused the routing request")
            connection_id = event.connection_id
        elif isinstance(event, ConnectNotification):
            connected.add(event.connection_id)
    return connection_id


async def close_all(*clients: RelayClient) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------


async def bench_handshakes(relay: Relay, connections: int, concurrency: int) -> dict[str, float]:
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with semaphore:
            started = time.perf_counter()
            try:
                client = await connect(relay)
            except Exception:  # refused, reset, timed out: counted, not fatal
                failures += 1
                return
            latencies.append(time.perf_counter() - started)
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {
        "handshakes_per_s": len(latencies) / elapsed,
        "handshake_p50_ms": percentile(latencies, 0.50) * 1e3,
        "handshake_p99_ms": percentile(latencies, 0.99) * 1e3,
        "handshake_failures": failures,
    }


async def _round_trips(
    client: BenchClient,
    send: Callable[[], None],
    is_reply: Callable[[Packet], bool],
    count: int,
    time_limit: float,
    warmup: int,
) -> list[float]:
    """Up to ``count`` timed round trips (after ``warmup`` untimed ones, at most 0.5 s).

    ``send`` emits one request; the round trip ends when ``client`` receives a packet
    for which ``is_reply`` is true. Times come from ``time.perf_counter`` (uvloop's
    ``loop.time()`` has 1 ms resolution). Stops early after ``time_limit`` seconds.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def arrived(packets: list[Packet]) -> None:
        if not waiter.done() and any(is_reply(p) for p in packets):
            waiter.set_result(None)

    client.on_packets = arrived
    rtts: list[float] = []
    try:
        async with asyncio.timeout(time_limit + 30.0):
            warmup_end = time.perf_counter() + 0.5
            for _ in range(warmup):
                waiter = loop.create_future()
                send()
                await waiter
                if time.perf_counter() >= warmup_end:
                    break
            deadline = time.perf_counter() + time_limit
            for _ in range(count):
                waiter = loop.create_future()
                started = time.perf_counter()
                send()
                await waiter
                finished = time.perf_counter()
                rtts.append(finished - started)
                if finished >= deadline:
                    break
    finally:
        client.on_packets = None
    return rtts


async def bench_rtt(
    relay: Relay, count: int, size: int, time_limit: float, warmup: int
) -> dict[str, float]:
    a, a_id, b, b_id = await link_pair(relay)
    try:

        def echo(packets: list[Packet]) -> None:
            for packet in packets:
                if isinstance(packet, RoutedData):
                    b.send_data(b_id, packet.payload)

        b.on_packets = echo
        payload = os.urandom(size)
        data_rtts = await _round_trips(
            a,
            lambda: a.send_data(a_id, payload),
            lambda p: isinstance(p, RoutedData),
            count,
            time_limit,
            warmup,
        )
        b.on_packets = None
        # PING -> PONG through the same path (a.ping() awaits via asyncio.wait and
        # times with loop.time(), too coarse under uvloop for a fast relay).
        ping_id = os.urandom(8)
        ping_rtts = await _round_trips(
            a,
            lambda: a.send(Ping(ping_id)),
            lambda p: isinstance(p, Pong) and p.ping_id == ping_id,
            count,
            time_limit,
            warmup,
        )
    finally:
        b.on_packets = None
        await close_all(a, b)
    return {
        "data_rtt_p50_us": percentile(data_rtts, 0.50) * 1e6,
        "data_rtt_p90_us": percentile(data_rtts, 0.90) * 1e6,
        "data_rtt_p99_us": percentile(data_rtts, 0.99) * 1e6,
        "data_rtt_samples": len(data_rtts),
        "ping_rtt_p50_us": percentile(ping_rtts, 0.50) * 1e6,
        "ping_rtt_p90_us": percentile(ping_rtts, 0.90) * 1e6,
        "ping_rtt_p99_us": percentile(ping_rtts, 0.99) * 1e6,
        "ping_rtt_samples": len(ping_rtts),
    }


async def bench_throughput(
    relay: Relay, window: int, size: int, duration: float, warmup: float
) -> dict[str, float]:
    a, a_id, b, _ = await link_pair(relay)
    loop = asyncio.get_running_loop()
    received = 0
    wakeup: asyncio.Future[None] | None = None

    def count(packets: list[Packet]) -> None:
        nonlocal received
        received += sum(1 for p in packets if isinstance(p, RoutedData))
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    b.on_packets = count
    payload = os.urandom(size)
    sent = 0
    try:
        async with asyncio.timeout(warmup + duration + 30.0):
            measure_from = time.perf_counter() + warmup
            end = measure_from + duration
            base: int | None = None
            base_time = 0.0
            while True:
                now = time.perf_counter()
                if base is None and now >= measure_from:
                    base, base_time = received, now
                if now >= end:
                    break
                while sent - received < window:
                    a.send_data(a_id, payload)
                    sent += 1
                wakeup = loop.create_future()
                await wakeup
        assert base is not None
        frames_per_s = (received - base) / (now - base_time)
    finally:
        b.on_packets = None
        await close_all(a, b)
    return {"frames_per_s": frames_per_s}


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int
    connections: int
    concurrency: int
    rtt_count: int
    rtt_size: int
    rtt_time_limit: float
    window: int
    frame_size: int
    duration: float


PhaseFn = Callable[[Relay], Coroutine[Any, Any, dict[str, float]]]


async def run_rounds(
    relays: dict[str, Relay], settings: Settings, progress: bool
) -> dict[str, list[dict[str, float]]]:
    phases: list[tuple[str, PhaseFn]] = [
        ("rtt", lambda r: bench_rtt(r, settings.rtt_count, settings.rtt_size,
                                    settings.rtt_time_limit, warmup=20)),
        ("throughput", lambda r: bench_throughput(r, settings.window, settings.frame_size,
                                                  settings.duration, warmup=0.3)),
        ("handshakes", lambda r: bench_handshakes(r, settings.connections,
                                                  settings.concurrency)),
    ]  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {name: [] for name in relays}
    names = list(relays)
    for round_no in range(settings.rounds):
        order = names if round_no % 2 == 0 else names[::-1]
        per_round: dict[str, dict[str, float]] = {name: {} for name in names}
        for phase_name, phase in phases:
            for name in order:
                t0 = time.perf_counter()
                per_round[name].update(await phase(relays[name]))
                if progress:
                    print(
                        f"  round {round_no + 1}/{settings.rounds} {phase_name:<10} "
                        f"{name:<10} {time.perf_counter() - t0:5.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        for name in names:
            results[name].append(per_round[name])
    return results


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median over rounds per relay and metric, plus ratio ours/bootstrapd."""
    summary: dict[str, dict[str, float]] = {}
    for key in [m.key for m in METRICS] + list(COUNTS):
        row: dict[str, float] = {}
        for name, rounds in results.items():
            row[name] = statistics.median(r[key] for r in rounds)
        ref = row.get(REFERENCE, float("nan"))
        row["ratio"] = row.get(OURS, float("nan")) / ref if ref else float("nan")
        summary[key] = row
    return summary


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(summary: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    machine = meta["machine"]
    settings = meta["settings"]
    lines = [
        "tox-bootstrapd 0.2.18 vs our relay (cluster start) -- loopback, interleaved",
        f"date:     {meta['date']}",
        f"command:  {meta['command']}",
        f"machine:  nproc={machine['nproc']}, CPU: {machine['cpu_model']}, "
        f"kernel {machine['kernel']}, Python {machine['python']}, uvloop {machine['uvloop']}",
        f"settings: rounds={settings['rounds']}, handshakes C={settings['connections']} "
        f"K={settings['concurrency']}; RTT N<={settings['rtt_count']} x "
        f"{settings['rtt_size']} B (<= {settings['rtt_time_limit']:g} s per series); "
        f"window W={settings['window']} x {settings['frame_size']} B for "
        f"{settings['duration']:g} s",
        "values:   median over rounds; ratio = ours / bootstrapd",
        "",
    ]
    header = f"{'metric':<24} {'unit':>4} {'bootstrapd':>12} {'ours':>12} {'ratio':>9}  better"
    lines += [header, "-" * len(header)]
    for m in METRICS:
        row = summary[m.key]
        ratio = row["ratio"]
        ratio_text = "n/a" if ratio != ratio else f"{ratio:.3g}x"
        lines.append(
            f"{m.label:<24} {m.unit:>4} {_fmt(row[REFERENCE]):>12} {_fmt(row[OURS]):>12} "
            f"{ratio_text:>9}  {'higher' if m.higher_is_better else 'lower'}"
        )
    lines.append("-" * len(header))
    counts = ", ".join(
        f"{key} {summary[key][REFERENCE]:.0f} / {summary[key][OURS]:.0f}" for key in COUNTS
    )
    lines.append(f"counts (bootstrapd / ours, median per round): {counts}")
    lines.append(f"total wall time: {meta['wall_s']:.1f} s")
    return "\n".join(lines)


@contextmanager
def started_relays(workroot: Path) -> Iterator[dict[str, Relay]]:
    """Start both relays (random keys); stop every started one on any exit."""
    relays: dict[str, Relay] = {}
    try:
        relays[REFERENCE] = start_bootstrapd(workroot / "bootstrapd", os.urandom(32))
        relays[OURS] = start_relay(workroot / "ours", os.urandom(32))
        yield relays
    finally:
        for relay in relays.values():
            try:
                relay.stop()
            except Exception as error:  # keep stopping the others
                print(f"warning: stopping {relay!r} failed: {error}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_pair_arguments(parser)
    add = parser.add_argument
    add("--connections", type=int, default=300, help="handshake phase: connections C")
    add("--concurrency", type=int, default=32, help="handshake phase: concurrency K")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.connections < 1 or args.concurrency < 1 or args.window < 1:
        parser.error("rounds, connections, concurrency and window must be >= 1")
    if args.rtt_count < 1 or args.rtt_time_limit <= 0 or args.duration <= 0:
        parser.error("rtt-count, rtt-time-limit and duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings, header, wall_start = common.start_run(args, Settings)
    with (
        tempfile.TemporaryDirectory(prefix="pair-compare-") as tmp,
        started_relays(Path(tmp)) as relays,
    ):
        if not args.quiet:
            print(
                "relays: "
                + ", ".join(f"{n} {r.host}:{r.port} pid {r.pid}" for n, r in relays.items()),
                file=sys.stderr,
            )
        results = uvloop.run(run_rounds(relays, settings, progress=not args.quiet))
    meta = {**header, "settings": vars(settings), "wall_s": time.perf_counter() - wall_start}
    common.print_report(args.json, meta, summarize(results), ("rounds", results), render_table)
    return 0


if __name__ == "__main__":
    common.run_main(main, "relays")
