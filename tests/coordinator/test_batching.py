"""Batching between the workers and the coordinator (issue 5, handshakes/s).

A worker sends all of one event-loop turn's REGISTER / UNREGISTER events in
one message, at most one message per EVENTS_MIN_INTERVAL; the coordinator
publishes the updates of what it received in one "u" message, at most one
per PUBLISH_MIN_INTERVAL. A "u" message therefore carries a range of
sequence numbers, and the replica's gap detection must still work inside it.
Real ZeroMQ sockets in a temporary runtime directory, no worker processes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import zmq

from coordinator import client as coordinator_client
from coordinator import service as coordinator_service
from coordinator.client import CoordinatorClient
from coordinator.service import CoordinatorService
from relaycore.shardlink import MapUpdate, Registry
from runtime.ipc import router_endpoint, unpack, updates_endpoint
from tests.coordinator.replica import RecordingHandler

SHARD = 7
KEYS = [bytes([n]) * 32 for n in range(1, 6)]


def _set(n: int) -> tuple:
    return (MapUpdate.SET, KEYS[n], 2, 100 + n, None, None)


def _recv_all(sock: zmq.Socket, timeout_s: float = 2.0, settle_s: float = 0.2) -> list:
    """Every message that arrives until none came for ``settle_s``."""
    messages: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sock.poll(int(settle_s * 1000)):
            if messages:
                break
            continue
        messages.append(sock.recv_multipart())
    return messages


class FakeCoordinator:
    """A ROUTER on the coordinator's endpoint, to see what a client sends."""

    def __init__(self, runtime_dir: Path) -> None:
        self.context = zmq.Context.instance()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(router_endpoint(runtime_dir))
        self.publisher = self.context.socket(zmq.PUB)
        self.publisher.setsockopt(zmq.LINGER, 0)
        self.publisher.bind(updates_endpoint(runtime_dir))

    def received(self) -> list[list]:
        return [unpack(frames[-1]) for frames in _recv_all(self.router)]

    def close(self) -> None:
        self.router.close()
        self.publisher.close()


def _client(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> CoordinatorClient:
    return CoordinatorClient(tmp_path, SHARD, loop, RecordingHandler())


def test_one_turns_events_leave_in_one_message_in_order(tmp_path: Path) -> None:
    coordinator = FakeCoordinator(tmp_path)
    loop = asyncio.new_event_loop()
    client = _client(tmp_path, loop)
    try:
        events = [(Registry.REGISTER, key, n) for n, key in enumerate(KEYS)]
        for event in events[:3]:  # three connections confirmed in one turn
            client.send_events([event])
        client.send_events([(Registry.UNREGISTER, KEYS[0], 0)])
        client.send_events(events[3:])
        assert coordinator.received() == []  # nothing before the end of the turn
        loop.run_until_complete(asyncio.sleep(0))
        messages = [m for m in coordinator.received() if m[0] == "events"]
        assert messages == [
            [
                "events",
                SHARD,
                [
                    [*events[0]],
                    [*events[1]],
                    [*events[2]],
                    [Registry.UNREGISTER, KEYS[0], 0],
                    [*events[3]],
                    [*events[4]],
                ],
            ]
        ]
    finally:
        client.close()
        loop.close()
        coordinator.close()


def test_events_soon_after_a_message_wait_and_leave_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the burst, at most one events message per EVENTS_MIN_INTERVAL:
    what comes in the meantime waits, then leaves in one message."""
    interval = 0.3  # long enough for a loaded machine
    monkeypatch.setattr(coordinator_client, "EVENTS_MIN_INTERVAL", interval)
    monkeypatch.setattr(coordinator_client, "EVENTS_BURST", 1)
    coordinator = FakeCoordinator(tmp_path)
    loop = asyncio.new_event_loop()
    client = _client(tmp_path, loop)
    try:
        client.send_events([(Registry.REGISTER, KEYS[0], 0)])
        loop.run_until_complete(asyncio.sleep(0))  # end of turn: the first leaves
        client.send_events([(Registry.REGISTER, KEYS[1], 1)])
        loop.run_until_complete(asyncio.sleep(0))
        client.send_events([(Registry.UNREGISTER, KEYS[0], 0)])
        loop.run_until_complete(asyncio.sleep(0))
        assert client._pending_events  # held: the last message left just now
        loop.run_until_complete(asyncio.sleep(interval * 1.5))
        assert not client._pending_events
        messages = [m for m in coordinator.received() if m[0] == "events"]
        assert messages == [
            ["events", SHARD, [[Registry.REGISTER, KEYS[0], 0]]],
            ["events", SHARD, [[Registry.REGISTER, KEYS[1], 1], [Registry.UNREGISTER, KEYS[0], 0]]],
        ]
    finally:
        client.close()
        loop.close()
        coordinator.close()


def test_close_sends_what_is_still_queued(tmp_path: Path) -> None:
    coordinator = FakeCoordinator(tmp_path)
    loop = asyncio.new_event_loop()
    client = _client(tmp_path, loop)
    try:
        client.send_events([(Registry.REGISTER, KEYS[0], 1)])
    finally:
        client.close(linger_ms=1000)
        loop.close()
    try:
        messages = [m for m in coordinator.received() if m[0] == "events"]
        assert messages == [["events", SHARD, [[Registry.REGISTER, KEYS[0], 1]]]]
    finally:
        coordinator.close()


def _synced_client(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> CoordinatorClient:
    client = _client(tmp_path, loop)
    client.replica.coordinator = 1
    client._on_reply(["snapshot", 1, 0, [], 1])
    assert not client.syncing
    client.replica.resyncs = 0
    return client


def test_a_batch_carries_a_range_of_sequence_numbers(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    client = _synced_client(tmp_path, loop)
    try:
        client._on_publication(["u", 1, [[1, list(_set(0))], [2, list(_set(1))]]])
        client._on_publication(["u", 1, [[3, list(_set(2))], [4, list(_set(3))]]])
        assert client.handler.applied == [_set(0), _set(1), _set(2), _set(3)]
        assert client.replica.last_sequence == 4
        assert client.resyncs == 0
    finally:
        client.close()
        loop.close()


def test_a_batch_overlapping_what_was_applied_skips_the_old_part(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    client = _synced_client(tmp_path, loop)
    try:
        client._on_publication(["u", 1, [[1, list(_set(0))], [2, list(_set(1))]]])
        client._on_publication(["u", 1, [[2, list(_set(1))], [3, list(_set(2))]]])
        assert client.handler.applied == [_set(0), _set(1), _set(2)]
        assert client.resyncs == 0
    finally:
        client.close()
        loop.close()


def test_a_gap_inside_a_batch_applies_up_to_it_and_fetches_a_snapshot(tmp_path: Path) -> None:
    coordinator = FakeCoordinator(tmp_path)
    loop = asyncio.new_event_loop()
    client = _synced_client(tmp_path, loop)
    try:
        batch = [[1, list(_set(0))], [2, list(_set(1))], [4, list(_set(3))], [5, list(_set(4))]]
        client._on_publication(["u", 1, batch])
        assert client.handler.applied == [_set(0), _set(1)]  # 3 is missing
        assert client.replica.last_sequence == 2
        assert client.syncing and client.resyncs == 1
        assert any(m[0] == "snapshot" for m in coordinator.received())
        # The snapshot (at 4) replaces the replica; the buffered 5 follows it.
        client._on_reply(["snapshot", 1, 4, [[KEYS[3], 2, 103]], client.replica.snapshot_requests])
        assert client.handler.resets[-1] == ([(KEYS[3], 2, 103)], False)
        assert client.handler.applied[2:] == [_set(4)]
        assert client.replica.last_sequence == 5 and not client.syncing
    finally:
        client.close()
        loop.close()
        coordinator.close()


def test_a_gap_between_batches_fetches_a_snapshot(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    client = _synced_client(tmp_path, loop)
    try:
        client._on_publication(["u", 1, [[1, list(_set(0))], [2, list(_set(1))]]])
        client._on_publication(["u", 1, [[5, list(_set(4))]]])  # 3 and 4 lost
        assert client.handler.applied == [_set(0), _set(1)]
        assert client.syncing and client.resyncs == 1
    finally:
        client.close()
        loop.close()


# -- the coordinator's side ---------------------------------------------------------


def _subscribed(service: CoordinatorService) -> zmq.Socket:
    """A SUB socket that provably receives the service's publications."""
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.setsockopt(zmq.LINGER, 0)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(updates_endpoint(service.runtime_dir))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # PUB drops until the subscription arrived
        service._heartbeat()
        if subscriber.poll(50):
            _recv_all(subscriber, settle_s=0.1)
            return subscriber
    raise AssertionError("subscription never arrived")


def _publications(subscriber: zmq.Socket) -> list[list]:
    return [unpack(frames[0]) for frames in _recv_all(subscriber)]


def _joined(service: CoordinatorService, subscriber: zmq.Socket, *shards: int) -> None:
    """Shards say hello (each announced at once); what that published is read."""
    for shard in shards:
        service._handle(f"w{shard}".encode(), ["hello", shard])
    _recv_all(subscriber, settle_s=0.1)


def test_the_coordinator_publishes_one_message_per_batch_with_contiguous_sequences(
    tmp_path: Path,
) -> None:
    service = CoordinatorService(tmp_path)
    subscriber = _subscribed(service)
    _joined(service, subscriber, 1, 2)
    try:
        service._handle(b"w1", ["events", 1, [[Registry.REGISTER, KEYS[0], 11]]])
        service._handle(b"w2", ["events", 2, [[Registry.REGISTER, KEYS[1], 21]]])
        service._handle(
            b"w1",
            [
                "events",
                1,
                [[Registry.REGISTER, KEYS[2], 12], [Registry.UNREGISTER, KEYS[0], 11]],
            ],
        )
        assert subscriber.poll(100) == 0  # held until the batch ends
        service._flush_updates()
        assert _publications(subscriber) == [
            [
                "u",
                service.incarnation,
                [
                    [1, [MapUpdate.SET, KEYS[0], 1, 11, None, None]],
                    [2, [MapUpdate.SET, KEYS[1], 2, 21, None, None]],
                    [3, [MapUpdate.SET, KEYS[2], 1, 12, None, None]],
                    [4, [MapUpdate.DEL, KEYS[0], 1, 11]],
                ],
            ]
        ]
        assert service.updates_published == 4
    finally:
        subscriber.close()
        service.close()


def test_the_heartbeat_never_announces_a_sequence_not_yet_published(tmp_path: Path) -> None:
    """A replica takes a heartbeat sequence above its own as a gap: the
    queued updates must leave before the heartbeat that counts them."""
    service = CoordinatorService(tmp_path)
    subscriber = _subscribed(service)
    _joined(service, subscriber, 1, 2)
    try:
        service._handle(b"w1", ["events", 1, [[Registry.REGISTER, KEYS[0], 11]]])
        service._heartbeat()
        kinds = [(m[0], m[2]) for m in _publications(subscriber)]
        assert kinds[0] == ("u", [[1, [MapUpdate.SET, KEYS[0], 1, 11, None, None]]])
        assert kinds[1] == ("hb", 1)
    finally:
        subscriber.close()
        service.close()


def test_a_snapshot_is_never_ahead_of_the_published_updates(tmp_path: Path) -> None:
    service = CoordinatorService(tmp_path)
    subscriber = _subscribed(service)
    _joined(service, subscriber, 1, 2)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(router_endpoint(tmp_path))
    try:
        service._handle(b"w1", ["events", 1, [[Registry.REGISTER, KEYS[0], 11]]])
        dealer.send(b"")  # gives the ROUTER an identity to answer
        identity, _ = service.router.recv_multipart()
        service._handle(identity, ["snapshot", 1])
        # The update first, then a heartbeat for the requester (it may have
        # missed the last one) that states no later sequence.
        publications = _publications(subscriber)
        assert [m[0] for m in publications] == ["u", "hb"]
        assert publications[1][2] == 1
        reply = unpack(dealer.recv())
        assert reply[:3] == ["snapshot", service.incarnation, 1]
    finally:
        dealer.close()
        subscriber.close()
        service.close()


def test_publications_soon_after_one_wait_and_leave_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interval = 0.3  # long enough for a loaded machine
    monkeypatch.setattr(coordinator_service, "PUBLISH_MIN_INTERVAL", interval)
    monkeypatch.setattr(coordinator_service, "PUBLISH_BURST", 1)
    service = CoordinatorService(tmp_path)
    subscriber = _subscribed(service)
    _joined(service, subscriber, 1, 2)
    try:
        service._handle(b"w1", ["events", 1, [[Registry.REGISTER, KEYS[0], 11]]])
        assert service._publish_due() is None  # nothing published for a while: at once
        service._handle(b"w1", ["events", 1, [[Registry.REGISTER, KEYS[1], 12]]])
        service._handle(b"w2", ["events", 2, [[Registry.REGISTER, KEYS[2], 21]]])
        due = service._publish_due()
        assert due is not None and due > time.monotonic()  # held
        time.sleep(interval * 1.2)
        assert service._publish_due() is None
        assert [m[2] for m in _publications(subscriber)] == [
            [[1, [MapUpdate.SET, KEYS[0], 1, 11, None, None]]],
            [
                [2, [MapUpdate.SET, KEYS[1], 1, 12, None, None]],
                [3, [MapUpdate.SET, KEYS[2], 2, 21, None, None]],
            ],
        ]
    finally:
        subscriber.close()
        service.close()


def test_a_new_shard_and_a_dropped_one_are_announced_at_once(tmp_path: Path) -> None:
    """While a SET may be held, a shard offers OOB for keys it does not know
    to every live shard: that list must not wait for the next heartbeat."""
    service = CoordinatorService(tmp_path)
    subscriber = _subscribed(service)
    try:
        service._handle(b"w1", ["hello", 1])
        service._handle(b"w1", ["events", 1, [[Registry.REGISTER, KEYS[0], 11]]])
        service._handle(b"w2", ["hello", 2])
        service._handle(b"w2", ["heartbeat", 2])  # known already: nothing new to say
        service._handle(b"", ["drop", 1])
        messages = [m for m in _publications(subscriber)]
        heartbeats = [m[3] for m in messages if m[0] == "hb"]
        assert heartbeats == [[1], [1, 2], [2]]
        # Every heartbeat's sequence was published before it.
        published = 0
        for message in messages:
            if message[0] == "u":
                published = message[2][-1][0]
            else:
                assert message[2] <= published or message[2] == 0
    finally:
        subscriber.close()
        service.close()
