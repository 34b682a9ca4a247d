"""The cost ledger (ops/bench/cost.py, issue 13 point 1) against a real 1-worker cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.bench import cost, proctree
from ops.bench.targets import start_cluster

TINY = cost.Size(seconds=0.4, connections=60, requests=1500, pairs=4, window=8, processes=1)


def test_short_ledger_run_on_one_worker_gives_positive_costs_that_sum(tmp_path: Path) -> None:
    phases = [p for p in cost.PHASES if p.name in ("frame-same", "connection", "onion")]
    costs = cost.run_ledger(["ours-1w"], phases, TINY, repetitions=1)
    assert [c.phase for c in costs] == ["frame-same", "connection", "onion"]
    for item in costs:
        assert item.units > 0, item
        kinds = item.us_per_unit
        assert {"worker", "coordinator", "supervisor", cost.GENERATOR} <= kinds.keys(), item
        assert all(value >= 0 for value in kinds.values())
        # The relay total is exactly the sum of its kinds; the generator is apart.
        relay_kinds = sum(v for k, v in kinds.items() if k != cost.GENERATOR)
        assert item.relay_us == pytest.approx(relay_kinds)
        assert item.relay_us > 0 and kinds["worker"] > 0 and kinds[cost.GENERATOR] > 0
    by_phase = {c.phase: c for c in costs}
    # A connection (three X25519 operations on the relay) costs far more than a frame.
    assert by_phase["connection"].relay_us > 5 * by_phase["frame-same"].relay_us
    rows = cost.summarize(costs)
    table = cost.render_table(rows)
    assert "relayed frame, same shard" in table and "connection lifecycle" in table


def test_process_tree_split_sums_to_the_tree_total(tmp_path: Path) -> None:
    relay = start_cluster(tmp_path / "relay", 1)
    try:
        classify = proctree.cluster_kind(relay.pid)
        snapshot = proctree.snapshot(relay.pid, classify)
        kinds = {sample.kind for sample in snapshot.values()}
        assert {"supervisor", "coordinator", "worker"} <= kinds
        total = sum(proctree.cpu_seconds(pid) or 0.0 for pid in snapshot)
        split = proctree.delta({}, snapshot)
        assert sum(split.values()) == pytest.approx(total, abs=0.05)
        assert split["supervisor"] > 0  # its start-up alone takes CPU
    finally:
        relay.stop()


def test_marginal_cost_cancels_fixed_costs() -> None:
    short = cost.Run(
        {"worker": 1.0, cost.GENERATOR: 2.0}, units=1000, changed_processes=0, wall_s=1
    )
    long = cost.Run({"worker": 1.5, cost.GENERATOR: 2.2}, 3000, changed_processes=0, wall_s=3)
    item = cost.marginal("frame-same", "ours-1w", 1, short, long)
    assert item.units == 2000
    assert item.us_per_unit["worker"] == pytest.approx(250.0)
    assert item.us_per_unit[cost.GENERATOR] == pytest.approx(100.0)
    assert item.relay_us == pytest.approx(250.0)
    flat = cost.marginal("x", "t", 1, short, short)
    assert flat.units == 0 and flat.note and not flat.us_per_unit


def test_section_is_replaced_not_duplicated() -> None:
    page = "# B\n\n## Medians\n\nold\n\n## Cost ledger\n\nstale\n\n## Machine\n\nm\n"
    once = cost.splice_section(page, "## Cost ledger\n\nnew")
    twice = cost.splice_section(once, "## Cost ledger\n\nnewer")
    assert "stale" not in once and once.count("## Cost ledger") == 1
    assert twice.count("## Cost ledger") == 1 and "newer" in twice and "new\n" not in twice
    assert twice.index("## Cost ledger") < twice.index("## Machine")


def test_section_is_replaced_where_it_stands() -> None:
    page = "# B\n\n## Cost ledger\n\nold\n\n## Cost profile\n\np\n\n## Machine\n\nm\n"
    text = cost.splice_section(page, "## Cost ledger\n\nnew")
    assert text.index("## Cost ledger") < text.index("## Cost profile") < text.index("## Machine")
    assert "old" not in text and "new" in text
