"""Same-shard versus cross-shard benchmark of our relay cluster, in one run.

Run from the repository root::

    python ops/bench/shard_compare.py [--rounds N] [--json]

Starts ONE cluster (``cluster start --workers 2 --shard-ports``, loopback, temporary
work directory, random key) and places clients on a chosen shard by connecting to that
shard's direct address (the ``Shard <id> (worker <i>) pid <pid> direct address
<host>:<port>`` lines). "Shard A" is the first shard listed, "shard B" the second. A
same-shard pair has both clients on shard A; a cross-shard pair has A's client on shard
A and B's on shard B, so every packet between them crosses the peer bus (ZeroMQ ipc
PUSH/PULL between the two worker processes) once.

Per round (the order of the configurations flips every round, so that background load
on a small shared machine hits them alike):

1. **data RTT of one pair**, same-shard and cross-shard -- up to ``--rtt-count``
   ping-pong round trips of a ``--rtt-size``-byte routed data packet (A sends, B echoes,
   A waits), after up to 20 untimed ones; p50/p90/p99 in microseconds. Timed with
   ``time.perf_counter`` from the client protocol's receive callback (the helpers of
   ``ops/bench/pair_compare.py``).
2. **windowed throughput of one pair**, same-shard and cross-shard -- A keeps
   ``--window`` data packets of ``--frame-size`` bytes in flight to B for
   ``--duration`` seconds (after ``--warmup``); B only counts. Relayed frames/s.
3. **aggregate throughput of P pairs at once** (``--pairs``, default 4, even), each
   driven as in 2, the total counted: *spread* (half the pairs same-shard on shard A,
   half same-shard on shard B: both workers busy, no bus traffic), *one shard* (all
   pairs same-shard on shard A: one worker busy) and *cross* (all pairs cross-shard,
   half of them sending A->B and half B->A).

The table shows the median over rounds of each metric, the ratio cross/same (and
spread/one-shard), and the bus cost: cross-shard RTT median minus same-shard RTT
median, and half of that per bus crossing (a round trip crosses the bus twice).
``--json`` prints one JSON line (with per-round values) instead.

The clients are Python (``cluster.client.RelayClient`` on uvloop, one process, one
thread) and share the machine's cores with the two workers and the coordinator. On a
2-core machine the load generator takes about one core itself, so the aggregate phase
can show at most part of what the second worker adds; the output says so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repo

import uvloop

from ops.bench import common
from ops.bench.pair_compare import (
    BenchClient,
    _await_link,
    _fmt,
    _round_trips,
    close_all,
    percentile,
)
from relaycore.packets import Packet, RoutedData
from testbed.relay_process import RelayProcess, start_relay

WORKERS = 2
SAME = "same"
CROSS = "cross"
SPREAD = "spread"
ONE_SHARD = "one_shard"
AGG_CROSS = "agg_cross"

_SHARD_RE = re.compile(
    r"^Shard (?P<id>\d+) \(worker (?P<worker>\d+)\) pid (?P<pid>\d+) "
    r"direct address (?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:\s]+)):(?P<port>\d+)$"
)


@dataclass(frozen=True)
class Shard:
    """One worker's direct address: connecting there places the client on that shard."""

    shard_id: int
    worker: int
    pid: int
    host: str
    port: int
    public_key: bytes


@dataclass
class Pair:
    """Two clients routed to each other and connected: A sends to ``a_id``, B to ``b_id``."""

    a: BenchClient
    a_id: int
    b: BenchClient
    b_id: int


def parse_shards(relay: RelayProcess) -> list[Shard]:
    shards = []
    for line in relay.stdout_lines:
        match = _SHARD_RE.match(line)
        if match:
            shards.append(
                Shard(
                    shard_id=int(match["id"]),
                    worker=int(match["worker"]),
                    pid=int(match["pid"]),
                    host=match["v6"] or match["v4"],
                    port=int(match["port"]),
                    public_key=relay.public_key,
                )
            )
    return shards


# ---------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------


async def connect_to(shard: Shard) -> BenchClient:
    client = await BenchClient.connect(shard.host, shard.port, shard.public_key, confirm=True)
    assert isinstance(client, BenchClient)
    return client


async def link(shard_a: Shard, shard_b: Shard) -> Pair:
    """A on ``shard_a`` and B on ``shard_b``, routed to each other, both connected."""
    a = await connect_to(shard_a)
    try:
        b = await connect_to(shard_b)
    except BaseException:
        await close_all(a)
        raise
    try:
        a.route_request(b.public_key)
        b.route_request(a.public_key)
        a_id, b_id = await asyncio.gather(
            _await_link(a, b.public_key), _await_link(b, a.public_key)
        )
    except BaseException:
        await close_all(a, b)
        raise
    return Pair(a, a_id, b, b_id)


async def link_all(placements: Sequence[tuple[Shard, Shard]]) -> list[Pair]:
    pairs: list[Pair] = []
    try:
        for shard_a, shard_b in placements:
            pairs.append(await link(shard_a, shard_b))
    except BaseException:
        await close_pairs(pairs)
        raise
    return pairs


async def close_pairs(pairs: Sequence[Pair]) -> None:
    await close_all(*(c for p in pairs for c in (p.a, p.b)))


# ---------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------


async def bench_rtt(
    shard_a: Shard, shard_b: Shard, count: int, size: int, time_limit: float
) -> dict[str, float]:
    """Routed-data ping-pong of one pair: A sends ``size`` bytes, B echoes, A waits."""
    (pair,) = await link_all([(shard_a, shard_b)])
    try:

        def echo(packets: list[Packet]) -> None:
            for packet in packets:
                if isinstance(packet, RoutedData):
                    pair.b.send_data(pair.b_id, packet.payload)

        pair.b.on_packets = echo
        payload = os.urandom(size)
        rtts = await _round_trips(
            pair.a,
            lambda: pair.a.send_data(pair.a_id, payload),
            lambda p: isinstance(p, RoutedData),
            count,
            time_limit,
            warmup=20,
        )
    finally:
        pair.b.on_packets = None
        await close_pairs([pair])
    return {
        "rtt_p50_us": percentile(rtts, 0.50) * 1e6,
        "rtt_p90_us": percentile(rtts, 0.90) * 1e6,
        "rtt_p99_us": percentile(rtts, 0.99) * 1e6,
        "rtt_samples": len(rtts),
    }


async def bench_windowed(
    placements: Sequence[tuple[Shard, Shard]],
    window: int,
    size: int,
    duration: float,
    warmup: float,
) -> dict[str, float]:
    """All pairs at once, each A keeping ``window`` frames in flight to its B.

    In flight = sent by A, not yet counted by B (as in pair_compare). Returns the
    total frames/s counted by all Bs over the measured ``duration`` and the slowest
    pair's share of it.
    """
    pairs = await link_all(placements)
    loop = asyncio.get_running_loop()
    received = [0] * len(pairs)
    wakeups: list[asyncio.Future[None] | None] = [None] * len(pairs)
    payload = os.urandom(size)

    def counter(index: int) -> Callable[[list[Packet]], None]:
        def count(packets: list[Packet]) -> None:
            received[index] += sum(1 for p in packets if isinstance(p, RoutedData))
            wakeup = wakeups[index]
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(None)

        return count

    async def pump(index: int, pair: Pair) -> None:
        sent = 0
        while True:
            while sent - received[index] < window:
                pair.a.send_data(pair.a_id, payload)
                sent += 1
            wakeup = wakeups[index] = loop.create_future()
            await wakeup

    for index, pair in enumerate(pairs):
        pair.b.on_packets = counter(index)
    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(pairs)]
    try:
        await asyncio.sleep(warmup)
        base_time, base = time.perf_counter(), list(received)
        await asyncio.sleep(duration)
        end_time, end = time.perf_counter(), list(received)
        for task in tasks:
            if task.done():  # a pump only ends by failing (e.g. connection lost)
                task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pair in pairs:
            pair.b.on_packets = None
        await close_pairs(pairs)
    elapsed = end_time - base_time
    per_pair = [(e - b) / elapsed for e, b in zip(end, base, strict=True)]
    total = sum(per_pair)
    return {
        "frames_per_s": total,
        "min_pair_share": min(per_pair) / total * len(pairs) if total else float("nan"),
    }


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int
    rtt_count: int
    rtt_size: int
    rtt_time_limit: float
    window: int
    frame_size: int
    duration: float
    warmup: float
    pairs: int


PhaseFn = Callable[[], Coroutine[Any, Any, dict[str, float]]]


def build_phases(
    shard_a: Shard, shard_b: Shard, s: Settings
) -> list[tuple[str, list[tuple[str, PhaseFn]]]]:
    """(phase name, [(configuration, run)]) in the order of a round."""
    half = s.pairs // 2
    spread = [(shard_a, shard_a)] * half + [(shard_b, shard_b)] * half
    one_shard = [(shard_a, shard_a)] * s.pairs
    cross = [(shard_a, shard_b)] * half + [(shard_b, shard_a)] * half

    def windowed(placements: list[tuple[Shard, Shard]]) -> PhaseFn:
        return lambda: bench_windowed(placements, s.window, s.frame_size, s.duration, s.warmup)

    def rtt(b_shard: Shard) -> PhaseFn:
        return lambda: bench_rtt(shard_a, b_shard, s.rtt_count, s.rtt_size, s.rtt_time_limit)

    phases: list[tuple[str, list[tuple[str, PhaseFn]]]] = [
        ("rtt", [(SAME, rtt(shard_a)), (CROSS, rtt(shard_b))]),
        ("throughput", [(SAME, windowed([(shard_a, shard_a)])),
                        (CROSS, windowed([(shard_a, shard_b)]))]),
    ]  # fmt: skip
    if s.pairs:
        phases.append(
            (
                "aggregate",
                [(SPREAD, windowed(spread)), (ONE_SHARD, windowed(one_shard)),
                 (AGG_CROSS, windowed(cross))],
            )
        )  # fmt: skip
    return phases


async def run_rounds(
    shard_a: Shard, shard_b: Shard, settings: Settings, progress: bool
) -> list[dict[str, dict[str, float]]]:
    """Per round: {configuration: {metric: value}}."""
    phases = build_phases(shard_a, shard_b, settings)
    results: list[dict[str, dict[str, float]]] = []
    for round_no in range(settings.rounds):
        per_round: dict[str, dict[str, float]] = {}
        for phase_name, configs in phases:
            order = configs if round_no % 2 == 0 else configs[::-1]
            for config, run in order:
                t0 = time.perf_counter()
                per_round.setdefault(config, {}).update(await run())
                if progress:
                    print(
                        f"  round {round_no + 1}/{settings.rounds} {phase_name:<10} "
                        f"{config:<10} {time.perf_counter() - t0:5.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        results.append(per_round)
    return results


def summarize(results: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians over rounds per configuration and metric, ratios and the bus cost."""
    medians: dict[str, dict[str, float]] = {}
    for config in results[0]:
        medians[config] = {
            key: statistics.median(r[config][key] for r in results) for key in results[0][config]
        }
    same, cross = medians[SAME], medians[CROSS]
    summary: dict[str, Any] = {"medians": medians}
    summary["cross_over_same"] = {
        key: cross[key] / same[key] if same[key] else float("nan")
        for key in ("rtt_p50_us", "rtt_p90_us", "rtt_p99_us", "frames_per_s")
    }
    extra = cross["rtt_p50_us"] - same["rtt_p50_us"]
    summary["bus"] = {
        "extra_rtt_us": extra,
        "per_crossing_us": extra / 2,
        "extra_rtt_us_per_round": [r[CROSS]["rtt_p50_us"] - r[SAME]["rtt_p50_us"] for r in results],
    }
    if SPREAD in medians:
        one = medians[ONE_SHARD]["frames_per_s"]
        summary["aggregate_ratios"] = {
            "spread_over_one_shard": medians[SPREAD]["frames_per_s"] / one if one else None,
            "cross_over_one_shard": medians[AGG_CROSS]["frames_per_s"] / one if one else None,
        }
    return summary


def _ratio(value: float | None) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.3g}x"


def render_table(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    machine = meta["machine"]
    s = meta["settings"]
    med = summary["medians"]
    same, cross = med[SAME], med[CROSS]
    lines = [
        f"our relay cluster, {WORKERS} workers: same-shard vs cross-shard pairs "
        "-- loopback, one cluster, interleaved",
        f"date:     {meta['date']}",
        f"command:  {meta['command']}",
        f"machine:  nproc={machine['nproc']}, CPU: {machine['cpu_model']}, "
        f"kernel {machine['kernel']}, Python {machine['python']}, uvloop {machine['uvloop']}",
        "cluster:  " + ", ".join(meta["shards"]),
        f"settings: rounds={s['rounds']}; RTT N<={s['rtt_count']} x {s['rtt_size']} B "
        f"(<= {s['rtt_time_limit']:g} s per series); window W={s['window']} x "
        f"{s['frame_size']} B for {s['duration']:g} s (+{s['warmup']:g} s warm-up); "
        f"aggregate P={s['pairs']} pairs",
        "values:   median over rounds",
        "",
        "1. one pair (same = both clients on shard A; cross = A on shard A, B on shard B)",
    ]
    header = f"{'metric':<24} {'unit':>4} {'same-shard':>12} {'cross-shard':>12} {'cross/same':>11}"
    lines += [header, "-" * len(header)]
    for key, label, unit in (
        ("rtt_p50_us", "data RTT median", "us"),
        ("rtt_p90_us", "data RTT p90", "us"),
        ("rtt_p99_us", "data RTT p99", "us"),
        ("frames_per_s", "windowed frames/s", "1/s"),
    ):
        lines.append(
            f"{label:<24} {unit:>4} {_fmt(same[key]):>12} {_fmt(cross[key]):>12} "
            f"{_ratio(summary['cross_over_same'][key]):>11}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"RTT samples per series (median): same {same['rtt_samples']:.0f}, "
        f"cross {cross['rtt_samples']:.0f}"
    )
    bus = summary["bus"]
    per_round = ", ".join(_fmt(v) for v in bus["extra_rtt_us_per_round"])
    lines += [
        "",
        "2. bus cost (cross-shard RTT median - same-shard RTT median)",
        f"   extra per round trip: {_fmt(bus['extra_rtt_us'])} us (per round: {per_round} us)",
        f"   per bus crossing (half; a round trip crosses twice): "
        f"{_fmt(bus['per_crossing_us'])} us",
    ]
    if SPREAD in med:
        agg = summary["aggregate_ratios"]
        half = s["pairs"] // 2
        lines += [
            "",
            f"3. aggregate windowed throughput, P={s['pairs']} pairs at once "
            f"(W={s['window']} each)",
        ]
        header3 = f"{'placement':<46} {'frames/s':>10} {'vs one shard':>13} {'min share':>10}"
        lines += [header3, "-" * len(header3)]
        for config, label, ratio in (
            (ONE_SHARD, f"one shard: {s['pairs']} same-shard pairs on A", 1.0),
            (SPREAD, f"spread: {half} same-shard on A + {half} on B", agg["spread_over_one_shard"]),
            (AGG_CROSS, f"cross: {half} A->B + {half} B->A", agg["cross_over_one_shard"]),
        ):
            lines.append(
                f"{label:<46} {_fmt(med[config]['frames_per_s']):>10} {_ratio(ratio):>13} "
                f"{med[config]['min_pair_share']:>10.2f}"
            )
        lines.append("-" * len(header3))
        lines.append(
            "   min share = slowest pair's frames/s relative to an equal split (1.00 = fair)."
        )
        lines.append(
            f"   note: nproc={machine['nproc']}; the load generator (one Python process) "
            f"shares these cores with the {WORKERS} workers and the coordinator, so this "
            "shows only part of what the second worker adds."
        )
    lines += ["", f"total wall time: {meta['wall_s']:.1f} s"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    common.add_pair_arguments(parser)
    add = parser.add_argument
    add("--warmup", type=float, default=0.3, help="throughput: seconds before measuring")
    add("--pairs", type=int, default=4, help="aggregate: pairs P at once (even; 0 = skip)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.window < 1 or args.rtt_count < 1:
        parser.error("rounds, window and rtt-count must be >= 1")
    if args.rtt_time_limit <= 0 or args.duration <= 0 or args.warmup < 0:
        parser.error("rtt-time-limit and duration must be positive, warmup >= 0")
    if args.pairs < 0 or args.pairs % 2:
        parser.error("pairs must be even and >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings, header, wall_start = common.start_run(args, Settings)
    with tempfile.TemporaryDirectory(prefix="shard-compare-") as tmp:
        relay: RelayProcess | None = None
        try:
            relay = start_relay(
                Path(tmp) / "cluster",
                secret_key=os.urandom(32),
                extra_args=["--shard-ports"],
                workers=WORKERS,
            )
            shards = parse_shards(relay)
            if len(shards) < 2:
                raise RuntimeError(f"expected {WORKERS} shard lines, got {relay.stdout_lines!r}")
            shard_a, shard_b = shards[0], shards[1]
            shard_text = [
                f"shard {sh.shard_id} ({name}) worker {sh.worker} pid {sh.pid} {sh.host}:{sh.port}"
                for name, sh in (("A", shard_a), ("B", shard_b))
            ]
            if not args.quiet:
                print(
                    f"cluster: pid {relay.pid}, public {relay.host}:{relay.port}; "
                    + "; ".join(shard_text),
                    file=sys.stderr,
                )
            results = uvloop.run(run_rounds(shard_a, shard_b, settings, not args.quiet))
        finally:
            if relay is not None:
                code = relay.stop()
                if code not in (0, None) and not args.quiet:
                    print(f"warning: cluster exited with {code}", file=sys.stderr)
    meta: dict[str, Any] = {
        **header,
        "workers": WORKERS,
        "shards": shard_text,
        "settings": vars(settings),
        "wall_s": time.perf_counter() - wall_start,
    }
    common.print_report(args.json, meta, summarize(results), ("rounds", results), render_table)
    return 0


if __name__ == "__main__":
    common.run_main(main, "cluster")
