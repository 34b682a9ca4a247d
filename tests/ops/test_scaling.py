"""The scaling model's arithmetic (ops/bench/scaling.py, issue 13 point 3)."""

from __future__ import annotations

import dataclasses

import pytest

from ops.bench.scaling import (
    UnitCosts,
    costs_from_ledger,
    cross_fraction,
    frames_per_s,
    handshakes_per_s,
    largest_efficient,
    predict,
    replica_us,
    worker_us_per_frame,
)

COSTS = UnitCosts(same=5.0, cross=7.0, own=200.0, replica=10.0, coord=40.0, generator_frame=5.0)


def test_cross_fraction_is_n_minus_one_over_n() -> None:
    assert [cross_fraction(n) for n in (1, 2, 4, 32)] == [0.0, 0.5, 0.75, 31 / 32]
    with pytest.raises(ValueError):
        cross_fraction(0)


def test_frame_cost_mixes_same_and_cross_shard() -> None:
    assert worker_us_per_frame(COSTS, 1) == 5.0
    assert worker_us_per_frame(COSTS, 2) == pytest.approx(6.0)  # half cross
    assert worker_us_per_frame(COSTS, 4) == pytest.approx(6.5)
    assert frames_per_s(COSTS, 1) == pytest.approx(200_000)
    assert frames_per_s(COSTS, 2) == pytest.approx(2e6 / 6.0)
    assert frames_per_s(COSTS, 2, cores=1) == pytest.approx(1e6 / 6.0)  # two workers, one core


def test_handshakes_limited_by_workers_then_coordinator() -> None:
    assert handshakes_per_s(COSTS, 1) == (pytest.approx(5000), "workers")
    # 4 workers: 4e6 / (200 + 3*10) = 17,391/s, under the coordinator's 25,000/s.
    assert handshakes_per_s(COSTS, 4) == (pytest.approx(4e6 / 230), "workers")
    # 8 workers: 8e6 / 270 = 29,630/s > 1e6 / 40: the coordinator limits.
    assert handshakes_per_s(COSTS, 8) == (pytest.approx(25_000), "coordinator")


def test_batched_replica_term_shrinks_towards_two_updates() -> None:
    """u = 1 us per update, P = 100 us per publication, at most 200
    publications/s: below 100 handshakes/s each update is a publication of
    its own (2u + 2P); above, the 200/s share the P."""
    batched = dataclasses.replace(COSTS, replica_update=1.0, replica_publication=100.0)
    assert replica_us(batched, 50.0) == pytest.approx(2 + 100 * 100 / 50)
    assert replica_us(batched, 20_000.0) == pytest.approx(2 + 100 * 200 / 20_000)
    assert replica_us(COSTS, 20_000.0) == 10.0  # no u / P: the ledger's flat value
    # The rate and its replica term agree (the fixed point).
    rate, limit = handshakes_per_s(dataclasses.replace(batched, coord=0.0), 8)
    assert limit == "workers"
    assert rate == pytest.approx(8e6 / (200 + 7 * replica_us(batched, rate)), rel=1e-5)


def test_efficiency_and_largest_n() -> None:
    rows = predict(COSTS, (1, 2, 4, 8, 16))
    assert rows[0].frame_efficiency == 1.0 and rows[0].handshake_efficiency == 1.0
    assert rows[1].frame_efficiency == pytest.approx(5 / 6)
    assert rows[2].frame_efficiency == pytest.approx(5 / 6.5)  # 0.77 < 0.8
    assert largest_efficient(rows, "frame_efficiency") == 2
    # handshakes: 2 -> 2e6/210/2/5000 = 0.95, 4 -> 0.87, 8 -> 25000/8/5000 = 0.625
    assert rows[2].handshake_efficiency == pytest.approx(4e6 / 230 / 4 / 5000)
    assert largest_efficient(rows, "handshake_efficiency") == 4
    assert rows[0].generator_cores == pytest.approx(1.0)  # 200,000 frames/s x 5 us


def test_costs_from_ledger_rows() -> None:
    rows = [
        {"phase": "frame-same", "target": "ours-1w",
         "by_kind_us": {"worker": 6.0, "coordinator": 0.1, "generator": 5.5}},
        {"phase": "frame-cross", "target": "ours-2w",
         "by_kind_us": {"worker": 5.0, "peer worker": 4.5}},
        {"phase": "connection", "target": "ours-1w",
         "by_kind_us": {"worker": 220.0, "coordinator": 30.0, "generator": 150.0}},
        {"phase": "connection", "target": "ours-2w",
         "by_kind_us": {"worker": 230.0, "peer worker": 12.0, "coordinator": 31.0}},
    ]  # fmt: skip
    costs = costs_from_ledger(rows)
    assert (costs.same, costs.cross, costs.own, costs.replica, costs.coord) == (
        6.0, 9.5, 220.0, 12.0, 30.0,
    )  # fmt: skip
    assert costs.generator_frame == 5.5 and costs.generator_handshake == 150.0
    with pytest.raises(ValueError, match="frame-cross"):
        costs_from_ledger([r for r in rows if r["phase"] != "frame-cross"])


def test_section_names_the_largest_n_and_the_missing_device() -> None:
    from ops.bench.scaling import render_section

    text = render_section("python3 -m ops.bench.scaling", COSTS, predict(COSTS), [], [])
    assert text.startswith("## Scaling")
    assert "frames N = 2" in text and "handshakes N = 4" in text
    assert "No many-core machine was lent" in text
    assert "| 32 | 97% |" in text  # every N of the model is in the table


def test_sweep_measures_each_n_that_fits_on_the_cores(monkeypatch) -> None:
    from ops.bench import scaling

    calls = []

    def fake_measure(workers, relay, generator, pairs, seconds, connections, processes):
        calls.append((workers, relay, generator, pairs, processes))
        return {"frames_per_s": 1000.0 * workers, "handshakes_per_s": 10.0 * workers}

    monkeypatch.setattr(scaling, "measure_rates", fake_measure)
    monkeypatch.setattr(scaling.os, "sched_getaffinity", lambda pid: set(range(16)))
    rows = scaling.sweep(COSTS, repetitions=1)  # generator = 1 process per worker here
    # N workers + the coordinator on cores 0..N, the generator's N processes after them.
    assert [c[:3] for c in calls] == [(1, "0-1", "2-2"), (2, "0-2", "3-4"), (4, "0-4", "5-8")]
    assert [c[3] for c in calls] == [8, 16, 32] and [c[4] for c in calls] == [1, 2, 4]
    assert [r["workers"] for r in rows] == [1, 2, 4]  # 8 + 1 + 8 > 16 cores: stop
    assert rows[2]["frames_per_s"] == 4000.0
