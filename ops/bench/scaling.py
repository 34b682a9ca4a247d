"""Scaling model and scaling benchmark of the relay cluster (issue 13, point 3).

    python3 -m ops.bench.scaling [--ledger COST.json] [--check] [--sweep] [--plot FILE.png]
                                 [--output docs/benchmarks.md] [--json]

**Model** (``predict``), from the cost ledger (``ops/bench/cost.py``; run now unless
``--ledger`` gives its ``--json`` output), for N = 1, 2, 4, 8, 16, 32 workers, each on
a core of its own, the coordinator on one more, load spread evenly:

* relayed frames: a pair's two clients are on one shard with probability 1/N, so a
  fraction f = (N-1)/N of frames crosses shards. Worker CPU per frame
  w(N) = (1-f)·same + f·cross (cross = both workers' CPU per cross-shard frame); the
  N workers together give ``frames/s = N / w(N)``.
* handshakes: the accepting worker spends ``own`` (its handshake, register, close and
  its own replica's update), each of the N-1 other workers applies the routing map's
  SET and DEL (``replica`` each), the coordinator ``coord``. Workers give
  N / (own + (N-1)·replica) handshakes/s, the coordinator 1 / coord; the smaller
  one is the limit. The replica term is batched (docs/benchmarks.md, "Replica cost
  per update"): replica(R) = 2·u + P·publications/s / R at a cluster rate of R
  handshakes/s, with publications/s <= min(2R, 1 / PUBLISH_MIN_INTERVAL) (the
  coordinator's pacing); u (µs per update) and P (µs per publication) are measured
  by ``ops/bench/replica_live.py`` (``--replica-update-us``,
  ``--replica-publication-us``; 0 falls back to the ledger's flat per-handshake
  value, the 2-worker rate's). R and replica(R) are solved together.
* efficiency = rate(N) / (N · rate(1)); the generator's cores are not counted (the
  table gives how many it needs at its ledger cost).

**Check** (``--check``): on this machine, 1 and 2 workers measured with ``cluster
loadtest`` and ``taskset``: generator on core 0 and relay on core 1 ("pinned"), then
both on both cores ("shared"); the model's prediction for the same cores beside it.

**Sweep** (``--sweep``): on a many-core machine, N = 1, 2, 4, ... while N workers, the
coordinator and the generator fit on the cores: each N measured (throughput with 8
pairs per worker, handshakes), beside the model; ``--plot`` draws both (needs the
``plot`` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coordinator.service import PUBLISH_MIN_INTERVAL

WORKER_COUNTS = (1, 2, 4, 8, 16, 32)
EFFICIENCY_GOAL = 0.8
SECTION = "## Scaling"


@dataclass(frozen=True)
class UnitCosts:
    """Microseconds of CPU per unit, from the ledger (see the module docstring)."""

    same: float  # worker CPU per relayed frame, one shard
    cross: float  # both workers' CPU per relayed frame across two shards
    own: float  # accepting worker's CPU per connection lifecycle (1 worker)
    replica: float  # one other worker's CPU per handshake (applying SET + DEL)
    coord: float  # coordinator's CPU per handshake
    generator_frame: float = 0.0  # load generator per frame / per handshake
    generator_handshake: float = 0.0
    # The batched replica term (0: use ``replica`` as a flat per-handshake cost).
    replica_update: float = 0.0  # u: one replica's CPU per map update applied
    replica_publication: float = 0.0  # P: one replica's CPU per publication received


# replica_live.py on this machine (docs/benchmarks.md, "Replica cost per update"):
# the live worker's line through µs per publication against updates per publication.
REPLICA_UPDATE_US = 0.73
REPLICA_PUBLICATION_US = 83.0
# The coordinator publishes at most this many batches per second when busy.
PUBLICATIONS_MAX_PER_S = 1.0 / PUBLISH_MIN_INTERVAL


@dataclass(frozen=True)
class Prediction:
    workers: int
    cross_fraction: float
    frames_per_s: float
    frame_efficiency: float
    handshakes_per_s: float
    handshake_efficiency: float
    handshake_limit: str  # "workers" or "coordinator"
    generator_cores: float  # cores the generator needs to drive frames_per_s


def cross_fraction(workers: int) -> float:
    """Share of pairs whose clients land on different shards, (N-1)/N."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    return (workers - 1) / workers


def worker_us_per_frame(costs: UnitCosts, workers: int) -> float:
    f = cross_fraction(workers)
    return (1 - f) * costs.same + f * costs.cross


def frames_per_s(costs: UnitCosts, workers: int, cores: float | None = None) -> float:
    """Relayed frames/s of ``workers`` workers on ``cores`` cores (default: one each)."""
    cores = workers if cores is None else min(cores, workers)
    return cores * 1e6 / worker_us_per_frame(costs, workers)


def replica_us(costs: UnitCosts, cluster_handshakes_per_s: float) -> float:
    """One other worker's CPU per handshake at that cluster rate (see the module
    docstring): two updates plus its share of the publications that carry them."""
    if costs.replica_update <= 0 and costs.replica_publication <= 0:
        return costs.replica
    rate = max(cluster_handshakes_per_s, 1.0)
    publications = min(2.0 * rate, PUBLICATIONS_MAX_PER_S)
    return 2.0 * costs.replica_update + costs.replica_publication * publications / rate


def handshakes_per_s(costs: UnitCosts, workers: int) -> tuple[float, str]:
    """(handshakes/s, what limits it): the workers together or the coordinator."""
    rate = workers * 1e6 / (costs.own + (workers - 1) * costs.replica)
    for _ in range(100):  # the replica term depends on the rate: a fixed point
        following = workers * 1e6 / (costs.own + (workers - 1) * replica_us(costs, rate))
        if abs(following - rate) < 1e-6 * rate:
            break
        rate = following
    by_workers = rate
    by_coordinator = 1e6 / costs.coord if costs.coord > 0 else float("inf")
    if by_coordinator < by_workers:
        return by_coordinator, "coordinator"
    return by_workers, "workers"


def predict(costs: UnitCosts, counts: tuple[int, ...] = WORKER_COUNTS) -> list[Prediction]:
    base_frames = frames_per_s(costs, 1)
    base_handshakes, _ = handshakes_per_s(costs, 1)
    rows = []
    for n in counts:
        frames = frames_per_s(costs, n)
        handshakes, limit = handshakes_per_s(costs, n)
        rows.append(
            Prediction(
                workers=n,
                cross_fraction=cross_fraction(n),
                frames_per_s=frames,
                frame_efficiency=frames / (n * base_frames),
                handshakes_per_s=handshakes,
                handshake_efficiency=handshakes / (n * base_handshakes),
                handshake_limit=limit,
                generator_cores=frames * costs.generator_frame / 1e6,
            )
        )
    return rows


def largest_efficient(rows: list[Prediction], attribute: str) -> int | None:
    """The largest N (of those predicted) up to which every efficiency is still
    >= EFFICIENCY_GOAL (1 when N = 2 already falls short; N = 1 is 1.0 by definition)."""
    best = None
    for row in rows:
        if getattr(row, attribute) < EFFICIENCY_GOAL:
            break
        best = row.workers
    return best


def costs_from_ledger(rows: list[dict[str, Any]]) -> UnitCosts:
    """UnitCosts from ``ops.bench.cost --json``'s rows (frame-same and connection on
    ours-1w, frame-cross and connection on ours-2w)."""
    by = {(r["phase"], r["target"]): r["by_kind_us"] for r in rows}
    try:
        same = by[("frame-same", "ours-1w")]
        cross = by[("frame-cross", "ours-2w")]
        one = by[("connection", "ours-1w")]
        two = by[("connection", "ours-2w")]
    except KeyError as missing:
        raise ValueError(f"the ledger has no {missing} row") from None

    def workers(kinds: dict[str, float]) -> float:
        return sum(v for k, v in kinds.items() if k in ("worker", "peer worker"))

    return UnitCosts(
        same=workers(same),
        cross=workers(cross),
        own=one.get("worker", 0.0),
        replica=two.get("peer worker", 0.0),
        coord=one.get("coordinator", 0.0),
        generator_frame=same.get("generator", 0.0),
        generator_handshake=one.get("generator", 0.0),
    )


# -- measuring -----------------------------------------------------------------


def _pinned(cores: str | None) -> list[str]:
    return ["taskset", "-c", cores] if cores else []


def measure_rates(
    workers: int,
    relay_cores: str | None,
    generator_cores: str | None,
    pairs: int,
    seconds: float,
    connections: int,
    processes: int,
) -> dict[str, float]:
    """frames/s and handshakes/s of a fresh ``workers``-worker cluster (taskset-pinned)."""
    from ops.bench.targets import REPO_ROOT, start_cluster

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="scaling-") as scratch:
        mine = os.sched_getaffinity(0)
        if relay_cores:  # the cluster's processes inherit it
            os.sched_setaffinity(0, set(_cpu_list(relay_cores)))
        try:
            target = start_cluster(Path(scratch), workers)
        finally:
            os.sched_setaffinity(0, mine)
        try:
            rates = {}
            for mode, extra, key in (
                ("throughput", ["-P", str(pairs), "-W", "16", "-S", "128", "-D", str(seconds)],
                 "frames_per_s"),
                ("handshake", ["-C", str(connections), "-K", "64"], "handshakes_per_s"),
            ):  # fmt: skip
                argv = [*_pinned(generator_cores), sys.executable, "-m", "cluster.cli", "loadtest",
                        mode, "127.0.0.1", str(target.port), target.public_key.hex(), *extra,
                        "--processes", str(processes), "--json", "--quiet"]  # fmt: skip
                done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
                report = json.loads(done.stdout.strip().splitlines()[-1])
                rates[key] = float(report["results"][key] or 0.0)
            return rates
        finally:
            target.stop()


def _cpu_list(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def check_here(costs: UnitCosts, repetitions: int) -> list[dict[str, Any]]:
    """1 and 2 workers on this machine (needs 2 cores): pinned and shared, medians."""
    rows = []
    for workers in (1, 2):
        for layout, relay, generator, relay_cores in (
            ("pinned: generator core 0, relay core 1", "1", "0", 1.0),
            ("shared: both on cores 0-1", None, None, None),
        ):
            runs = [
                measure_rates(workers, relay, generator, 8, 3.0, 2000, 1)
                for _ in range(repetitions)
            ]
            measured = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            # Shared: the relay gets what the generator leaves of the two cores.
            cores = relay_cores
            if cores is None:
                relay_frame = worker_us_per_frame(costs, workers)
                share = relay_frame / (relay_frame + costs.generator_frame)
                cores = min(float(workers), 2.0 * share)
            predicted_frames = frames_per_s(costs, workers, cores)
            generator_cap = 1e6 / costs.generator_frame if costs.generator_frame else float("inf")
            if relay_cores is not None:  # the generator has one core of its own
                predicted_frames = min(predicted_frames, generator_cap)
            # On few cores the coordinator shares them: all CPU per handshake counts.
            relay_us = costs.own + (workers - 1) * costs.replica + costs.coord  # 2w: measured
            handshake_cores = cores
            if relay_cores is None and costs.generator_handshake:
                share = relay_us / (relay_us + costs.generator_handshake)
                handshake_cores = min(float(workers), 2.0 * share)
            predicted_handshakes = handshake_cores * 1e6 / relay_us
            if relay_cores is not None and costs.generator_handshake:
                predicted_handshakes = min(predicted_handshakes, 1e6 / costs.generator_handshake)
            rows.append({
                "workers": workers,
                "layout": layout,
                "relay_cores": cores,
                "frames_per_s": measured["frames_per_s"],
                "frames_per_s_model": predicted_frames,
                "handshakes_per_s": measured["handshakes_per_s"],
                "handshakes_per_s_model": predicted_handshakes,
                "runs": [asdict_like(r) for r in runs],
            })  # fmt: skip
    return rows


def asdict_like(value: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in value.items()}


def sweep(costs: UnitCosts, repetitions: int) -> list[dict[str, Any]]:
    """N = 1, 2, 4, ... on this machine while N workers + coordinator + generator fit."""
    cores = len(os.sched_getaffinity(0))
    rows = []
    for workers in WORKER_COUNTS:
        generator = max(1, round(workers * costs.generator_frame / max(costs.same, 1e-9)))
        if workers + 1 + generator > cores:
            break
        relay = f"0-{workers}"  # workers + coordinator
        gen = f"{workers + 1}-{workers + generator}"
        runs = [
            measure_rates(workers, relay, gen, 8 * workers, 4.0, 2000 * workers, generator)
            for _ in range(repetitions)
        ]
        rows.append({
            "workers": workers,
            "frames_per_s": statistics.median(r["frames_per_s"] for r in runs),
            "handshakes_per_s": statistics.median(r["handshakes_per_s"] for r in runs),
            "generator_processes": generator,
        })  # fmt: skip
    return rows


# -- output ----------------------------------------------------------------------


def _n(value: float) -> str:
    return f"{value:,.0f}"


def render_model(costs: UnitCosts, rows: list[Prediction], measured: list[dict[str, Any]]) -> str:
    by_n = {m["workers"]: m for m in measured}
    lines = [
        "| workers N | cross-shard pairs | frames/s (model) | efficiency | handshakes/s (model) "
        "| efficiency | handshakes limited by | generator cores needed | measured frames/s "
        "| measured handshakes/s |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        m = by_n.get(row.workers)
        lines.append(
            f"| {row.workers} | {row.cross_fraction:.0%} | {_n(row.frames_per_s)} "
            f"| {row.frame_efficiency:.2f} | {_n(row.handshakes_per_s)} "
            f"| {row.handshake_efficiency:.2f} | {row.handshake_limit} "
            f"| {row.generator_cores:.1f} | {_n(m['frames_per_s']) if m else '-'} "
            f"| {_n(m['handshakes_per_s']) if m else '-'} |"
        )
    return "\n".join(lines)


def render_check(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workers | layout | relay cores (model) | frames/s measured | model | handshakes/s "
        "measured | model |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['layout']} | {r['relay_cores']:.2f} | {_n(r['frames_per_s'])} "
            f"| {_n(r['frames_per_s_model'])} | {_n(r['handshakes_per_s'])} "
            f"| {_n(r['handshakes_per_s_model'])} |"
        )
    return "\n".join(lines)


def replica_text(costs: UnitCosts, rows: list[Prediction]) -> str:
    """How the replica term was modelled, with its value at the largest N."""
    if costs.replica_update <= 0 and costs.replica_publication <= 0:
        return f"{costs.replica:.1f} µs each, flat"
    last = rows[-1]
    return (
        f"2 x {costs.replica_update:.2f} µs + {costs.replica_publication:.0f} µs per "
        f"publication, at most {PUBLICATIONS_MAX_PER_S:.0f} publications/s: "
        f"{replica_us(costs, last.handshakes_per_s):.1f} µs each at N = {last.workers}, "
        f"{costs.replica:.1f} µs measured at 2 workers' ledger rate"
    )


def limits_text(costs: UnitCosts, rows: list[Prediction]) -> str:
    """The largest efficient N for frames and handshakes, and what stops each."""
    frames_n = largest_efficient(rows, "frame_efficiency")
    handshakes_n = largest_efficient(rows, "handshake_efficiency")
    limit_frames = costs.same / costs.cross if costs.cross else 1.0
    coordinator = f"{1e6 / costs.coord:,.0f}/s" if costs.coord > 0 else "not reached"
    return (
        f"Largest N with efficiency >= {EFFICIENCY_GOAL}: **frames N = {frames_n}**, "
        f"**handshakes N = {handshakes_n}**. Frames: a cross-shard frame costs the workers "
        f"{costs.cross:.1f} µs against {costs.same:.1f} µs on one shard (the bus: batch, "
        "send, receive and route on the second worker), and the cross-shard share (N-1)/N "
        f"tends to 1, so efficiency falls towards same/cross = {limit_frames:.2f}: above 0.8 "
        "only once a cross-shard frame costs at most 1.25x a same-shard one, or when linked "
        "pairs are placed on one shard. Handshakes: every handshake costs each of the N-1 "
        f"other workers a replica update (the SET and the DEL: {replica_text(costs, rows)}), "
        f"against {costs.own:.0f} µs on the accepting worker, so the workers' total per "
        "handshake grows linearly with N; the coordinator alone would cap the cluster at "
        f"{coordinator} ({costs.coord:.1f} µs per handshake)."
    )


def render_section(
    command: str,
    costs: UnitCosts,
    rows: list[Prediction],
    checked: list[dict[str, Any]],
    swept: list[dict[str, Any]],
) -> str:
    cpus = len(os.sched_getaffinity(0))
    lines = [
        SECTION,
        "",
        f"Generated by `{command}` ({cpus} CPUs). The model (`ops/bench/scaling.py`) takes "
        "the cost ledger's CPU per unit -- same-shard frame "
        f"{costs.same:.1f} µs, cross-shard frame {costs.cross:.1f} µs (both workers), "
        f"connection {costs.own:.0f} µs on its worker, {costs.replica:.1f} µs on each other "
        f"worker (at the 2-worker ledger's rate; modelled as {replica_text(costs, rows)}), "
        f"{costs.coord:.1f} µs on the coordinator -- and assumes one core per worker, "
        "one for the coordinator, pairs spread at random ((N-1)/N of them cross shards). "
        "Efficiency = rate(N) / (N x rate(1)). *generator cores* = what `cluster loadtest` "
        f"needs at its ledger cost ({costs.generator_frame:.1f} µs per frame) to drive that "
        "rate.",
        "",
        render_model(costs, rows, swept),
        "",
        limits_text(costs, rows),
    ]
    if not swept:
        lines += [
            "",
            "No many-core machine was lent to this session, so the measured columns are "
            "empty. On one, `python3 -m ops.bench.scaling --sweep --plot "
            "docs/benchmarks/scaling.png --output docs/benchmarks.md` measures N = 1, 2, 4, "
            "... as far as N workers, the coordinator and the generator fit on the cores, "
            "and fills them in.",
        ]
    if checked:
        lines += [
            "",
            "Check against this machine (`--check`; medians of the repetitions; the "
            "machine was shared with other work, so these wall-clock rates are noisy; "
            "the model is given the relay's cores: 1 when pinned, what the generator "
            "leaves of 2 when shared):",
            "",
            render_check(checked),
        ]
    return "\n".join(lines)


def write_plot(path: Path, rows: list[Prediction], measured: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[plot]'") from None
    figure, (frames, handshakes) = plt.subplots(1, 2, figsize=(10, 4))
    n = [r.workers for r in rows]
    frames.plot(n, [r.frames_per_s for r in rows], "o-", label="model")
    handshakes.plot(n, [r.handshakes_per_s for r in rows], "o-", label="model")
    if measured:
        measured_n = [m["workers"] for m in measured]
        frames.plot(measured_n, [m["frames_per_s"] for m in measured], "s--", label="measured")
        handshakes.plot(
            measured_n, [m["handshakes_per_s"] for m in measured], "s--", label="measured"
        )
    for axis, title in ((frames, "relayed frames/s"), (handshakes, "handshakes/s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("workers")
        axis.set_title(title)
        axis.legend()
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m ops.bench.scaling",
        description="Predict throughput and handshakes/s for 1..32 workers from the cost "
        "ledger; check against 1-2 workers here; sweep on a many-core machine.",
    )
    parser.add_argument(
        "--ledger",
        type=Path,
        metavar="COST.json",
        help="`python3 -m ops.bench.cost --json` output (default: run it now)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="measure 1 and 2 workers here, pinned and shared (taskset)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="measure N = 1, 2, 4, ... as far as the cores allow"
    )
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument(
        "--replica-update-us",
        type=float,
        default=REPLICA_UPDATE_US,
        help="u: a replica's CPU per map update (ops/bench/replica_live.py; "
        "0 with the next = the ledger's flat per-handshake replica cost)",
    )
    parser.add_argument(
        "--replica-publication-us",
        type=float,
        default=REPLICA_PUBLICATION_US,
        help="P: a replica's CPU per publication it receives (ops/bench/replica_live.py)",
    )
    parser.add_argument("--plot", type=Path, metavar="FILE.png")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE.md",
        help="write/replace the page's '## Scaling' section",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.ledger is not None:
        ledger = json.loads(args.ledger.read_text())
    else:
        from ops.bench import cost

        phases = [p for p in cost.PHASES if p.name in ("frame-same", "frame-cross", "connection")]
        costs_list = cost.run_ledger(
            ["ours-1w", "ours-2w"], phases, cost.FULL, args.repetitions,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )  # fmt: skip
        ledger = {"rows": cost.summarize(costs_list)}
    costs = dataclasses.replace(
        costs_from_ledger(ledger["rows"]),
        replica_update=args.replica_update_us,
        replica_publication=args.replica_publication_us,
    )
    rows = predict(costs)
    checked = check_here(costs, args.repetitions) if args.check else []
    swept = sweep(costs, args.repetitions) if args.sweep else []
    if args.plot is not None:
        write_plot(args.plot, rows, swept)
    frames_n = largest_efficient(rows, "frame_efficiency")
    handshakes_n = largest_efficient(rows, "handshake_efficiency")
    if args.json:
        print(json.dumps({
            "costs": asdict(costs), "model": [asdict(r) for r in rows], "check": checked,
            "sweep": swept, "largest_n_frames": frames_n, "largest_n_handshakes": handshakes_n,
        }))  # fmt: skip
    else:
        print(render_model(costs, rows, swept))
        if checked:
            print()
            print(render_check(checked))
        print(f"\nlargest N with efficiency >= {EFFICIENCY_GOAL}: frames {frames_n}, "
              f"handshakes {handshakes_n}")  # fmt: skip
    if args.output is not None:
        from ops.bench.cost import splice_section

        command = " ".join(
            ["python3 -m ops.bench.scaling", *(sys.argv[1:] if argv is None else argv)]
        )
        section = render_section(command, costs, rows, checked, swept)
        text = args.output.read_text() if args.output.exists() else ""
        args.output.write_text(splice_section(text, section, SECTION))
    return 0


if __name__ == "__main__":
    sys.exit(main())
