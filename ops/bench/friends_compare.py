"""Two real toxcore clients through tox-bootstrapd 0.2.18 versus through our relay, in one run.

Run from the repository root (needs libtoxcore2 and toxcore-utils)::

    python ops/bench/friends_compare.py [--rounds N] [--relays bootstrapd,ours-1w,ours-2w]
                                        [--file-size BYTES] [--rtt-rounds N] [--json]

One private 3-node DHT (tox-bootstrapd, TCP relays off) on loopback serves every run.
Each round runs the scenario of ``testbed/friends.py`` once per relay (the
relays of ``testbed/relay_kinds.py``, each started fresh for the run and
stopped after it), and the order of the relays rotates every round so that
background load on a small shared machine hits each alike. Per run:

* **self online** -- clients created until both report ``TOX_CONNECTION_TCP`` for
  themselves (announced through the onion, whose first hop is the relay).
* **friend connected** -- clients created until both see each other connected
  (includes the onion search, the friend request and the net_crypto handshake).
* **message RTT** median and p95 over ``--rtt-rounds`` echoes (A sends, B's callback
  sends it back, A's callback stops the clock; includes both clients' toxcore).
* **file MB/s** -- ``--file-size`` random bytes A -> B, from ``tox_file_send`` to the
  last byte at B (10^6 bytes per MB).

The table shows the median over rounds; a run that fails is reported (``failed``
count and the first error) and left out of the medians. Both clients run in this
process, iterated in turns; toxcore's own timers (onion announce intervals) dominate
the connection times, the relay's per-hop latency the RTT (tox-bootstrapd sleeps
30 ms per main-loop iteration, tox-bootstrapd-reference.md section 6).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ops.bench import common  # noqa: E402
from testbed.bootstrapd import bootstrapd_available  # noqa: E402
from testbed.friends import ScenarioConfig, run_friends_scenario  # noqa: E402
from testbed.relay_kinds import RELAY_KINDS, start_relay_under_test  # noqa: E402
from testbed.toxcore import load_toxcore, toxcore_error  # noqa: E402
from testbed.toxdht import start_private_dht  # noqa: E402

METRICS: tuple[tuple[str, str, str], ...] = (
    ("self_online_s", "self online", "s"),
    ("friend_connected_s", "friend connected", "s"),
    ("rtt_median_ms", "message RTT median", "ms"),
    ("rtt_p95_ms", "message RTT p95", "ms"),
    ("file_mb_per_s", "file A->B", "MB/s"),
)


def run_once(kind: str, workroot: Path, dht_nodes: list, config: ScenarioConfig) -> dict[str, Any]:
    """Start relay ``kind``, run the scenario once, stop it; the metrics or the error."""
    relay = start_relay_under_test(kind, workroot)
    try:
        result = run_friends_scenario(relay.endpoint_a, relay.endpoint_b, dht_nodes, config)
    except AssertionError as error:  # ScenarioError: a step failed or timed out
        return {"error": str(error).splitlines()[0]}
    finally:
        relay.stop()
    return {
        "self_online_s": result.self_connected_s,
        "friend_connected_s": result.friend_connected_s,
        "rtt_median_ms": result.rtt_median * 1000,
        "rtt_p95_ms": result.rtt_p95 * 1000,
        "file_mb_per_s": result.file_mb_per_s,
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for kind, results in runs.items():
        good = [r for r in results if "error" not in r]
        row: dict[str, Any] = {
            key: statistics.median(r[key] for r in good) if good else None for key, _, _ in METRICS
        }
        row["runs"] = len(results)
        row["failed"] = len(results) - len(good)
        errors = [r["error"] for r in results if "error" in r]
        row["first_error"] = errors[0] if errors else ""
        summary[kind] = row
    return summary


def _fmt(value: float | None) -> str:
    if value is None:  # no successful run
        return "n/a"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def render_table(summary: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    kinds = list(summary)
    lines = [
        "toxcore friends end to end: tox-bootstrapd 0.2.18 vs our relay -- loopback, interleaved",
        f"date:     {meta['date']}",
        f"command:  {meta['command']}",
        f"machine:  nproc={meta['machine']['nproc']}, kernel {meta['machine']['kernel']}, "
        f"Python {meta['machine']['python']}",
        f"settings: rounds={meta['rounds']}, file {meta['file_size']} B, "
        f"{meta['rtt_rounds']} RTT samples per run, private DHT of 3 nodes",
        "values:   median over successful runs",
        "",
    ]
    header = f"{'metric':<20} {'unit':>4} " + " ".join(f"{k:>14}" for k in kinds)
    lines += [header, "-" * len(header)]
    for key, label, unit in METRICS:
        lines.append(
            f"{label:<20} {unit:>4} " + " ".join(f"{_fmt(summary[k][key]):>14}" for k in kinds)
        )
    lines.append(
        f"{'failed runs':<20} {'':>4} "
        + " ".join(f"{summary[k]['failed']:>10}/{summary[k]['runs']:<3}" for k in kinds)
    )
    lines.append("-" * len(header))
    for kind in kinds:
        if summary[kind]["first_error"]:
            lines.append(f"{kind}: first error: {summary[kind]['first_error']}")
    lines.append(f"total wall time: {meta['wall_s']:.1f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    add(
        "--relays",
        default="bootstrapd,ours-1w,ours-2w",
        help=f"comma-separated relay kinds, of {', '.join(RELAY_KINDS)}",
    )
    add("--file-size", type=int, default=1024 * 1024, help="file bytes (default 1 MiB)")
    add("--rtt-rounds", type=int, default=20, help="echo round trips per run (default 20)")
    add("--json", action="store_true", help="print one JSON line instead of the table")
    add("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.relay_kinds = [k.strip() for k in args.relays.split(",") if k.strip()]
    unknown = [k for k in args.relay_kinds if k not in RELAY_KINDS]
    if unknown or not args.relay_kinds:
        parser.error(f"unknown relay kinds {unknown}; choose from {', '.join(RELAY_KINDS)}")
    if args.rounds < 1 or args.file_size < 1 or args.rtt_rounds < 1:
        parser.error("rounds, file-size and rtt-rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if load_toxcore() is None:
        print(f"libtoxcore not loadable: {toxcore_error()}", file=sys.stderr)
        return 2
    if not bootstrapd_available():
        print("tox-bootstrapd not installed (apt-get install toxcore-utils)", file=sys.stderr)
        return 2
    config = ScenarioConfig(
        rtt_rounds=args.rtt_rounds,
        file_size=args.file_size,
        file_timeout_s=max(30.0, args.file_size / 50_000),
        total_timeout_s=90.0 + max(30.0, args.file_size / 50_000),
    )
    header = common.run_header()
    common.stop_on_signals()
    wall_start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.relay_kinds}
    with tempfile.TemporaryDirectory(prefix="friends-compare-") as tmp:
        dht = start_private_dht(Path(tmp) / "dht")
        try:
            for round_index in range(args.rounds):
                shift = round_index % len(args.relay_kinds)
                order = args.relay_kinds[shift:] + args.relay_kinds[:shift]
                for kind in order:
                    workroot = Path(tmp) / f"round-{round_index}"
                    result = run_once(kind, workroot, dht.nodes, config)
                    runs[kind].append(result)
                    if not args.quiet:
                        shown = {
                            k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()
                        }
                        print(f"round {round_index + 1} {kind}: {shown}", file=sys.stderr)
        finally:
            dht.stop()
    meta: dict[str, Any] = {
        **header,
        "rounds": args.rounds,
        "file_size": args.file_size,
        "rtt_rounds": args.rtt_rounds,
        "wall_s": time.perf_counter() - wall_start,
    }
    common.print_report(args.json, meta, summarize(runs), ("runs", runs), render_table)
    return 0


if __name__ == "__main__":
    common.run_main(main, "relays")
