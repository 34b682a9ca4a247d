"""ops/bench/bus_latency.py: each mode really passes the message back and
forth between two processes, and the bus of another revision can run beside
ours (issue 13, point 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.bench import bus_latency

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["unix-uvloop", "zmq-uvloop", "peerbus", "peerbus-baseline"])
def test_a_mode_times_every_round_trip_and_counts_both_processes_cpu(mode: str) -> None:
    times, cpu = bus_latency.run_mode(mode, 100, 50, baseline=str(REPO / "worker" / "bus.py"))
    assert len(times) == 50
    assert all(0 < t < 1.0 for t in times)
    assert 0 < cpu < 5.0


def test_the_table_has_a_row_per_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        bus_latency.main(["--count", "20", "--rounds", "2", "--modes", "unix-uvloop,peerbus"]) == 0
    )
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows[1:]] == ["unix-uvloop", "peerbus"]
    assert all(len(row.split()) == 4 + 2 for row in rows[1:])  # p50, p90, CPU, two rounds
