"""Cost ledger: CPU time per unit of work, summed over every process of a relay.

    python3 -m ops.bench.cost [--quick] [--repetitions N] [--json] [--output docs/benchmarks.md]

Units (``PHASES``): a relayed frame between two clients on one shard
(``frame-same``, `cluster loadtest throughput`), the same across two shards
(``frame-cross``: a 2-worker cluster started with ``--shard-ports``, one client of
each pair on each shard's direct port, ``--partner-port``), an OOB frame (``oob``),
one connection lifecycle -- handshake, register, the confirming PING, close
(``connection``, `cluster loadtest handshake`) -- and one onion request forwarded to
a UDP address (``onion``, ``ops.bench.onion_load``; the cluster runs with its onion
rate limits off, as tox-bootstrapd has none).

Targets: ``ours-1w`` (``cluster start --workers 1``), ``ours-2w`` (2 workers,
``--shard-ports``: ``frame-cross``, and ``connection`` with every client on the first
shard, so the other worker's CPU -- kind ``peer worker`` -- is what one replica's
update costs per handshake) and ``bootstrapd`` (Debian's
tox-bootstrapd 0.2.18), each started once, fresh, per repetition
(``ops/bench/targets.py``).

How a cost is measured: every phase runs twice, a short run and a run with three
times the work (longer window, more connections or requests). Before and after each
run the CPU time (``/proc/<pid>/task/*/schedstat``, see ``proctree``) of every process of the
relay's tree is read (``ops/bench/proctree.py``) and split by kind: supervisor,
coordinator, worker (ours) or tox-bootstrapd; the load generator's is the CPU of
the finished subprocess and everything it waited for (``RUSAGE_CHILDREN``). The
cost per unit is (long - short) / (units of long - units of short): start-up,
linking, idle ticks and interpreter start cancel out. Units are what the
generator counted: frames received, handshakes completed, datagrams that reached
the sink. CPU seconds per unit are robust to other load on the machine (wall-clock
rates are not); the median over ``--repetitions`` runs is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.bench import page, proctree
from ops.bench.targets import (
    REPO_ROOT,
    Target,
    bootstrapd_available,
    start_bootstrapd,
    start_cluster,
)

CLUSTER_KINDS = ("worker", "coordinator", "supervisor")
PEER_WORKER = "peer worker"  # ours-2w: the worker(s) of the other shard(s)
BOOTSTRAPD_KIND = "tox-bootstrapd"
GENERATOR = "generator"
LONG_FACTOR = 3  # the long run does this many times the short run's work
# The onion phase measures cost, not limits: every rate limit off, and the UDP
# sink it sends to is on loopback, which a relay refuses as a next hop by default.
ONION_LIMITS_OFF = (
    "onion_rate_per_client = 0\n"
    "onion_rate_per_ip = 0\n"
    "onion_rate_per_worker = 0\n"
    "allow_private_next_hops = true\n"
)
SECTION = "## Cost ledger"
RUN_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Size:
    """How much work the short run does (the long run does LONG_FACTOR times it)."""

    seconds: float  # throughput / oob window
    connections: int  # handshake
    requests: int  # onion
    pairs: int = 8
    window: int = 16
    frame_size: int = 128
    concurrency: int = 32
    processes: int = 2  # generator processes


FULL = Size(seconds=1.5, connections=600, requests=10000)
QUICK = Size(seconds=0.5, connections=150, requests=3000)


@dataclass(frozen=True)
class Phase:
    name: str
    unit: str
    targets: tuple[str, ...]
    argv: Callable[[Target, Size, int], list[str]]  # (target, size, factor) -> command
    units: Callable[[dict[str, Any]], int]  # the command's JSON -> units done


def _loadtest(mode: str, target: Target, extra: list[str], size: Size) -> list[str]:
    return [
        sys.executable, "-m", "cluster.cli", "loadtest", mode, "127.0.0.1", str(target.port),
        target.public_key.hex(), "--processes", str(size.processes), "--json", "--quiet",
        "--max-loss-fraction", "1", "--max-failure-fraction", "1",
        "--max-disconnect-fraction", "1", *extra,
    ]  # fmt: skip


def _traffic(mode: str, cross: bool) -> Callable[[Target, Size, int], list[str]]:
    def argv(target: Target, size: Size, factor: int) -> list[str]:
        extra = ["-P", str(size.pairs), "-W", str(size.window), "-S", str(size.frame_size)]
        extra += ["-D", str(size.seconds * factor), "--warmup", "0", "--drain", "1"]
        if cross:
            shard_a, shard_b = target.shard_ports[:2]
            extra += ["--partner-port", str(shard_b)]
            target = Target(target.name, shard_a, target.public_key, target.pid, target.workdir)
        return _loadtest(mode, target, extra, size)

    return argv


def _handshakes(target: Target, size: Size, factor: int) -> list[str]:
    extra = ["-C", str(size.connections * factor), "-K", str(size.concurrency)]
    if target.shard_ports:  # every connection on the first shard; the other only replicates
        target = Target(target.name, target.shard_ports[0], target.public_key, target.pid,
                        target.workdir)  # fmt: skip
    return _loadtest("handshake", target, extra, size)


def _onion(target: Target, size: Size, factor: int) -> list[str]:
    return [
        sys.executable, "-m", "ops.bench.onion_load", "127.0.0.1", str(target.port),
        target.public_key.hex(), "-N", str(size.requests * factor), "--json",
    ]  # fmt: skip


def _frames(report: dict[str, Any]) -> int:
    return int(report["results"]["frames_total"])


PHASES = (
    Phase("frame-same", "relayed frame, same shard", ("ours-1w", "bootstrapd"),
          _traffic("throughput", cross=False), _frames),
    Phase("frame-cross", "relayed frame, cross shard", ("ours-2w",),
          _traffic("throughput", cross=True), _frames),
    Phase("oob", "OOB frame", ("ours-1w", "bootstrapd"), _traffic("oob", cross=False), _frames),
    Phase("connection", "connection lifecycle", ("ours-1w", "ours-2w", "bootstrapd"),
          _handshakes, lambda report: int(report["results"]["handshakes"])),
    Phase("onion", "onion request", ("ours-1w", "bootstrapd"), _onion,
          lambda report: int(report["delivered"])),
)  # fmt: skip
TARGET_NAMES = ("ours-1w", "ours-2w", "bootstrapd")


@dataclass
class Run:
    """One command against one target: CPU seconds per kind and the units it did."""

    cpu_s: dict[str, float]
    units: int
    changed_processes: int
    wall_s: float


@dataclass
class Cost:
    """One phase on one target in one repetition: microseconds of CPU per unit."""

    phase: str
    target: str
    repetition: int
    units: int  # marginal units (long - short)
    us_per_unit: dict[str, float] = field(default_factory=dict)  # per kind, GENERATOR too
    note: str = ""

    @property
    def relay_us(self) -> float:
        return sum(v for k, v in self.us_per_unit.items() if k != GENERATOR)


def kind_of(target: Target) -> Callable[[int, list[str]], str]:
    """Process kinds; with shard ports, workers other than the first shard's are
    ``PEER_WORKER`` (the one the generator's clients -- or first clients -- reach
    is ``worker``), so a replica's share of a handshake is seen on its own."""
    if target.name == "bootstrapd":
        return lambda pid, argv: BOOTSTRAPD_KIND
    cluster = proctree.cluster_kind(target.pid)
    peers = set(target.shard_pids[1:])
    return lambda pid, argv: PEER_WORKER if pid in peers else cluster(pid, argv)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(target: Target, argv: list[str], units_of: Callable[[dict[str, Any]], int]) -> Run:
    """Run ``argv`` to completion; the relay tree's CPU per kind, the generator's, units."""
    classify = kind_of(target)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    before = proctree.snapshot(target.pid, classify)
    generator_before = _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, cwd=REPO_ROOT
    )
    wall = time.perf_counter() - started
    generator = _children_cpu_s() - generator_before
    after = proctree.snapshot(target.pid, classify)
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(
            f"{' '.join(argv[1:5])}: no JSON (exit {done.returncode}): {done.stderr[-1500:]}"
        ) from None
    cpu = proctree.delta(before, after)
    cpu[GENERATOR] = generator
    return Run(cpu, units_of(report), proctree.changed_processes(before, after), wall)


def marginal(phase: str, target: str, repetition: int, short: Run, long: Run) -> Cost:
    """Cost per unit from a short and a long run: (long - short) / (their units' difference)."""
    units = long.units - short.units
    cost = Cost(phase, target, repetition, units)
    if units <= 0:
        cost.note = f"no more units in the long run ({short.units} -> {long.units})"
        return cost
    for kind in sorted(set(short.cpu_s) | set(long.cpu_s)):
        spent = long.cpu_s.get(kind, 0.0) - short.cpu_s.get(kind, 0.0)
        cost.us_per_unit[kind] = max(0.0, spent) / units * 1e6
    if short.changed_processes or long.changed_processes:
        cost.note = "a relay process started or ended during the phase"
    return cost


def start_target(name: str, workdir: Path) -> Target:
    if name == "bootstrapd":
        return start_bootstrapd(workdir / name)
    workers = 2 if name == "ours-2w" else 1
    return start_cluster(workdir / name, workers, shard_ports=workers > 1, config=ONION_LIMITS_OFF)


def run_ledger(
    targets: list[str],
    phases: list[Phase],
    size: Size,
    repetitions: int,
    log: Callable[[str], None] = lambda line: None,
) -> list[Cost]:
    """Every phase on every target it applies to, ``repetitions`` times, fresh relays."""
    costs = []
    with tempfile.TemporaryDirectory(prefix="cost-ledger-") as scratch:
        for repetition in range(1, repetitions + 1):
            for name in targets:
                wanted = [phase for phase in phases if name in phase.targets]
                if not wanted:
                    continue
                target = start_target(name, Path(scratch) / f"rep{repetition}")
                try:
                    for phase in wanted:
                        short = measure(target, phase.argv(target, size, 1), phase.units)
                        long = measure(target, phase.argv(target, size, LONG_FACTOR), phase.units)
                        cost = marginal(phase.name, name, repetition, short, long)
                        costs.append(cost)
                        log(
                            f"rep {repetition} {name:10} {phase.name:11} {cost.units:>8} units "
                            f"relay {cost.relay_us:8.1f} us  generator "
                            f"{cost.us_per_unit.get(GENERATOR, 0.0):8.1f} us {cost.note}"
                        )
                finally:
                    target.stop()
    return costs


# -- summary and rendering ----------------------------------------------------


def summarize(costs: list[Cost]) -> list[dict[str, Any]]:
    """Median per (phase, target) of every kind's us/unit and of the relay total."""
    rows = []
    order = {phase.name: i for i, phase in enumerate(PHASES)}
    keys = sorted(
        {(c.phase, c.target) for c in costs},
        key=lambda k: (order[k[0]], TARGET_NAMES.index(k[1])),
    )
    for phase, target in keys:
        group = [c for c in costs if (c.phase, c.target) == (phase, target) and c.units > 0]
        if not group:
            continue
        kinds = sorted({k for c in group for k in c.us_per_unit})
        median = {k: statistics.median(c.us_per_unit.get(k, 0.0) for c in group) for k in kinds}
        relay = [c.relay_us for c in group]
        rows.append({
            "phase": phase,
            "target": target,
            "repetitions": len(group),
            "units": int(statistics.median(c.units for c in group)),
            "relay_us": statistics.median(relay),
            "relay_us_min": min(relay),
            "relay_us_max": max(relay),
            "by_kind_us": median,
            "notes": sorted({c.note for c in group if c.note}),
        })  # fmt: skip
    return rows


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    unit_of = {phase.name: phase.unit for phase in PHASES}
    lines = [
        "| unit | target | relay total µs | workers | of which other shard | coordinator "
        "| supervisor | generator µs | generator / relay | runs (min-max total) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        kinds = row["by_kind_us"]
        generator = kinds.get(GENERATOR)
        relay = row["relay_us"]
        is_reference = row["target"] == "bootstrapd"
        worker = (
            kinds.get(BOOTSTRAPD_KIND)
            if is_reference
            else kinds.get("worker", 0.0) + kinds.get(PEER_WORKER, 0.0)
        )
        ratio = f"{generator / relay:.2f}" if generator is not None and relay > 0 else "-"
        lines.append(
            f"| {unit_of[row['phase']]} | {row['target']} | **{_us(relay)}** "
            f"| {_us(worker)} | {_us(kinds.get(PEER_WORKER))} "
            f"| {'-' if is_reference else _us(kinds.get('coordinator'))} "
            f"| {'-' if is_reference else _us(kinds.get('supervisor'))} | {_us(generator)} "
            f"| {ratio} | {row['repetitions']} ({_us(row['relay_us_min'])}-"
            f"{_us(row['relay_us_max'])}) |"
        )
    return "\n".join(lines)


def render_section(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    return "\n".join([
        SECTION,
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['elapsed_s'] / 60:.1f} min, "
        f"{meta['cpus']} CPUs, machine shared with other work: CPU seconds per unit are robust "
        "to that, rates are not).",
        "",
        "CPU time per unit of work, in microseconds, summed over every process of the relay "
        "(ours: supervisor, coordinator, workers; tox-bootstrapd: its one process), read from "
        "`/proc/<pid>/task/*/schedstat` (nanoseconds on the CPU, every thread) before and "
        "after a short and a 3x longer run of each phase: "
        "cost = Δ CPU / Δ units, so start-up and idle time cancel. *workers* is tox-bootstrapd "
        "itself on its rows. On the ours-2w connection row every client is on the first "
        "shard: *of which other shard* is the second worker applying the routing map's "
        "updates (one replica's share of a handshake). *generator* is the load generator "
        "(`cluster loadtest`, "
        "`ops.bench.onion_load` for onion requests), all its processes. Median of "
        f"{meta['repetitions']} repetition(s); the last column gives the runs and the range "
        "of the relay total.",
        "",
        render_table(rows),
        "",
        "Units: *relayed frame* = one routed data frame delivered (P=8 pairs echoing W=16 "
        "frames of 128 bytes; one client sends, the relay opens and seals it once); *cross "
        "shard* = both clients of each pair on different workers of a 2-worker cluster; "
        "*connection lifecycle* = handshake + register + confirming PING + close "
        "(`cluster loadtest handshake`, K=32); *onion request* = one type 8 request "
        "forwarded as a UDP datagram (onion rate limits off).",
    ])  # fmt: skip


def splice_section(text: str, section: str, heading: str = SECTION) -> str:
    """``text`` with its ``heading`` section replaced by ``section`` (ops/bench/page.py)."""
    return page.splice_section(text, section, heading)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m ops.bench.cost",
        description="CPU time per relayed frame, OOB frame, connection and onion request, "
        "summed over every process of our relay and of tox-bootstrapd.",
    )
    parser.add_argument(
        "--repetitions",
        type=int,
        default=3,
        metavar="N",
        help="fresh relays and runs per phase (default 3; medians)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 1 min)")
    parser.add_argument(
        "--targets",
        default=",".join(TARGET_NAMES),
        help=f"comma-separated subset of {','.join(TARGET_NAMES)}",
    )
    parser.add_argument(
        "--phases",
        default=",".join(p.name for p in PHASES),
        help="comma-separated subset of " + ",".join(p.name for p in PHASES),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE.md",
        help="write/replace the page's '## Cost ledger' section",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.repetitions < 1:
        parser.error("--repetitions must be >= 1")
    for name in args.targets.split(","):
        if name not in TARGET_NAMES:
            parser.error(f"--targets: unknown target {name!r}")
    known = {p.name for p in PHASES}
    for name in args.phases.split(","):
        if name not in known:
            parser.error(f"--phases: unknown phase {name!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = args.targets.split(",")
    if "bootstrapd" in targets and not bootstrapd_available():
        print("cost: tox-bootstrapd not installed; measuring ours only", file=sys.stderr)
        targets.remove("bootstrapd")
    phases = [p for p in PHASES if p.name in args.phases.split(",")]
    started = time.monotonic()
    costs = run_ledger(
        targets, phases, QUICK if args.quick else FULL, args.repetitions,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    rows = summarize(costs)
    meta = {
        "command": "python3 -m ops.bench.cost "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": time.monotonic() - started,
        "repetitions": args.repetitions,
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows,
                          "costs": [c.__dict__ for c in costs]}))  # fmt: skip
    else:
        print(render_table(rows))
    if args.output is not None:
        text = args.output.read_text() if args.output.exists() else ""
        args.output.write_text(splice_section(text, render_section(rows, meta)))
    return 0 if rows and all(c.units > 0 for c in costs) else 1


if __name__ == "__main__":
    sys.exit(main())
