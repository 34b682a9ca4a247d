"""The replica's state machine alone (coordinator/replica.py): messages in,
requests out, time passed in."""

from __future__ import annotations

from coordinator.replica import MERGE_CHECK_DELAY, Replica, Reregister, SnapshotRequest
from relaycore.shardlink import MapUpdate, Registry
from tests.coordinator.replica import RecordingHandler

KEY, OTHER = bytes([1]) * 32, bytes([2]) * 32


def _set(key: bytes, epoch: int) -> list:
    return [MapUpdate.SET, key, 2, epoch, None, None]


def _synced(handler: RecordingHandler) -> Replica:
    replica = Replica(handler)
    replica.start(0.0)
    assert replica.take_requests() == [SnapshotRequest(1)]
    replica.snapshot(["snapshot", 1, 0, [], 1], 0.0)
    assert not replica.syncing
    return replica


def test_an_answer_to_an_older_request_is_ignored() -> None:
    """An answer read after the updates that followed it would roll the
    replica back: only the latest request's answer counts."""
    handler = RecordingHandler()
    replica = _synced(handler)
    replica.publication(["hb", 1, 3, [1, 2]], 1.0)  # a gap: snapshot 2
    replica.timer(5.0)  # unanswered: snapshot 3
    assert replica.take_requests() == [SnapshotRequest(2), SnapshotRequest(3)]
    replica.snapshot(["snapshot", 1, 2, [[KEY, 2, 5]], 2], 5.1)
    assert replica.syncing and replica.stale_snapshots == 1
    replica.snapshot(["snapshot", 1, 3, [[KEY, 2, 5]], 3], 5.2)
    assert not replica.syncing and replica.last_sequence == 3
    replica.snapshot(["snapshot", 1, 2, [], 2], 5.3)  # a duplicate, late
    assert replica.last_sequence == 3 and replica.stale_snapshots == 2
    assert handler.reset_requests == [1, 3]


def test_a_coordinator_restart_registers_again_merges_then_replaces() -> None:
    handler = RecordingHandler()
    replica = _synced(handler)
    replica.publication(["u", 1, [[1, _set(KEY, 5)]]], 1.0)
    replica.publication(["hb", 2, 0, [1, 2]], 2.0)  # a new incarnation
    requests = replica.take_requests()
    assert isinstance(requests[0], Reregister) and requests[1:] == [SnapshotRequest(2)]
    assert requests[0].events == []  # (RecordingHandler holds no clients)
    replica.snapshot(["snapshot", 2, 0, [], 2], 2.1)
    assert handler.resets[-1] == ([], True)  # merged: nothing ends yet
    replica.publication(["u", 2, [[1, _set(OTHER, 7)]]], 2.5)
    assert handler.applied[-1] == tuple(_set(OTHER, 7))
    replica.timer(2.1 + MERGE_CHECK_DELAY - 0.1)
    assert replica.take_requests() == []
    replica.timer(2.1 + MERGE_CHECK_DELAY)
    assert replica.take_requests() == [SnapshotRequest(3)]
    replica.snapshot(["snapshot", 2, 1, [[OTHER, 2, 7]], 3], 5.5)
    assert handler.resets[-1] == ([(OTHER, 2, 7)], False)  # KEY's entry goes
    replica.timer(100.0)
    assert replica.take_requests() == []  # once


def test_reregister_events_are_register_events() -> None:
    class Holding(RecordingHandler):
        def registrations(self) -> list[tuple[bytes, int]]:
            return [(KEY, 9)]

    replica = _synced(Holding())
    replica.publication(["hb", 2, 0, []], 1.0)
    assert replica.take_requests()[0] == Reregister([(Registry.REGISTER, KEY, 9)])
