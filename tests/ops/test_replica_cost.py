"""The replica term's benchmarks (issue 13): ops/bench/replica_cost.py (in
isolation) and ops/bench/replica_live.py (a running 2-worker cluster)."""

from __future__ import annotations

import pytest

from ops.bench import replica_cost, replica_live
from relaycore.shardlink import MapUpdate
from runtime.ipc import unpack


def test_publications_set_then_del_each_key_in_sequence() -> None:
    messages = [unpack(m) for m in replica_cost.publications(4, 6, 0, 100)]
    sequences = [s for m in messages for s, _ in m[2]]
    assert sequences == list(range(1, 25))
    set_before: dict[bytes, int] = {}
    for number, message in enumerate(messages):
        assert message[0] == "u" and len(message[2]) == 6
        for _, update in message[2]:
            if update[0] == MapUpdate.SET:
                assert update[2] == replica_cost.THERE and update[1] not in set_before
                set_before[update[1]] = number
            else:
                assert update[0] == MapUpdate.DEL
                assert set_before.pop(update[1]) == number - 1  # SET one publication earlier


def test_a_round_applies_every_update_and_the_fit_is_a_line() -> None:
    assert replica_cost.run_round(batch=8, count=50, directory=100, tick_every=10) > 0
    assert replica_cost.fit([(2, 5.0), (16, 19.0), (128, 131.0)]) == pytest.approx((3.0, 1.0))


def test_live_run_counts_the_coordinators_publications() -> None:
    run = replica_live.measure(300)
    assert run["handshakes"] == 300
    assert run["publications"] >= 1
    # Every handshake's SET at least (its DEL may still be on its way).
    assert run["updates_per_publication"] * run["publications"] >= 300
