"""A publication's updates reach the shard in one call (issue 13, the replica
term of a connection's cost), and only when they are exactly the next ones;
anything else is sorted out update by update, as before."""

from __future__ import annotations

import contextlib

import pytest

from coordinator.replica import Replica, SnapshotRequest
from relaycore.shardlink import MapUpdate
from tests.coordinator.replica import RecordingHandler

KEYS = [bytes([n]) * 32 for n in range(1, 9)]


def _set(n: int) -> list:
    return [MapUpdate.SET, KEYS[n], 2, 100 + n, None, None]


def _del(n: int) -> list:
    return [MapUpdate.DEL, KEYS[n], 2, 100 + n]


class BatchRecorder(RecordingHandler):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list] = []

    def apply_map_updates(self, updates: list, now: float) -> None:
        self.batches.append(list(updates))
        super().apply_map_updates(updates, now)


def _synced(handler: RecordingHandler) -> Replica:
    replica = Replica(handler)
    replica.start(0.0)
    replica.take_requests()
    replica.snapshot(["snapshot", 1, 0, [], 1], 0.0)
    return replica


def test_the_next_updates_go_in_one_call() -> None:
    handler = BatchRecorder()
    replica = _synced(handler)
    replica.publication(["u", 1, [[1, _set(0)], [2, _set(1)], [3, _del(0)]]], 1.0)
    assert handler.batches == [[_set(0), _set(1), _del(0)]]
    assert replica.last_sequence == 3
    replica.publication(["u", 1, [[4, _del(1)]]], 1.1)
    assert handler.batches[-1] == [_del(1)] and replica.last_sequence == 4
    assert replica.take_requests() == []


def test_updates_seen_before_are_skipped_one_by_one() -> None:
    """A batch that starts before the replica's sequence (read after a
    snapshot that covered part of it): only the rest is applied."""
    handler = BatchRecorder()
    replica = _synced(handler)
    replica.publication(["u", 1, [[1, _set(0)], [2, _set(1)]]], 1.0)
    replica.publication(["u", 1, [[2, _set(1)], [3, _set(2)]]], 1.1)
    assert handler.applied == [tuple(_set(0)), tuple(_set(1)), tuple(_set(2))]
    assert replica.last_sequence == 3 and replica.take_requests() == []


@pytest.mark.parametrize(("sequences", "applied"), [([1, 3, 4], 1), ([1, 2, 4], 2), ([2, 3, 4], 0)])
def test_a_gap_inside_a_batch_applies_up_to_it_and_fetches_a_snapshot(
    sequences: list[int], applied: int
) -> None:
    handler = BatchRecorder()
    replica = _synced(handler)
    updates = [_set(0), _set(1), _set(2)]
    replica.publication(
        ["u", 1, [list(pair) for pair in zip(sequences, updates, strict=True)]], 1.0
    )
    assert handler.batches == []
    assert handler.applied == [tuple(u) for u in updates[:applied]]
    assert replica.syncing and replica.take_requests() == [SnapshotRequest(2)]


def test_a_batch_that_raises_counts_as_not_applied() -> None:
    """The handler may have applied part of it: the replica takes none of it
    as applied, so the next publication is a gap and a snapshot replaces
    whatever part was (the error itself goes to the adapter, counted)."""
    handler = BatchRecorder()
    replica = _synced(handler)

    def broken(updates: list, now: float) -> None:
        raise RuntimeError("injected")

    handler.apply_map_updates = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        replica.publication(["u", 1, [[1, _set(0)], [2, _set(1)]]], 1.0)
    assert replica.last_sequence == 0
    del handler.apply_map_updates
    replica.publication(["u", 1, [[3, _set(2)]]], 1.1)
    assert replica.syncing and replica.take_requests() == [SnapshotRequest(2)]


@pytest.mark.parametrize("updates", [17, [], [[1]], [[1, _set(0), 5]], [["1", _set(0)]]])
def test_a_malformed_batch_is_refused_as_before(updates: object) -> None:
    """Not pairs of (sequence, update): the per-update path decides, as it
    did for every publication (an error for the adapter to count, or nothing)."""
    handler = BatchRecorder()
    replica = _synced(handler)
    with contextlib.suppress(TypeError, ValueError):
        replica.publication(["u", 1, updates], 1.0)
    assert handler.batches == [] and handler.applied == []
    assert replica.last_sequence == 0
