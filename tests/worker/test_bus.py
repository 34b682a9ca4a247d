"""The peer bus (worker/bus.py) over real ipc:// sockets, and when a worker's
bus forgets another shard (worker/cluster_member.py): only once that shard's
process is gone, never when the coordinator dropped it for silence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import uvloop
import zmq

from relaycore.shardlink import MapUpdate
from worker.bus import MAX_BATCH_BYTES, RECEIVE_BATCHES_PER_TURN, PeerBus, _payload_size
from worker.cluster_member import ClusterMember

WANT = (1, b"a" * 32, 1 << 32 | 1, b"b" * 32, 2 << 32 | 1)


def test_a_forgotten_shard_gets_no_new_socket_and_what_is_sent_to_it_is_counted(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        context = zmq.Context()
        received: list[tuple[int, list]] = []
        one = PeerBus(tmp_path, 1, loop, lambda s, b: None, context)
        two = PeerBus(tmp_path, 2, loop, lambda s, b: received.append((s, list(b))), context)
        try:
            one.send([(2, WANT)])
            for _ in range(200):
                if received:
                    break
                await asyncio.sleep(0.01)
            assert received == [(1, [WANT])]

            one.forget(2)  # its process exited
            one.send([(2, WANT), (2, WANT)])
            await asyncio.sleep(0.1)
            assert 2 not in one._push  # no socket connecting to a dead endpoint
            assert one.stats["messages_to_gone_shard"] == 2
            assert received == [(1, [WANT])]
        finally:
            one.close()
            two.close()
            context.term()

    uvloop.run(asyncio.wait_for(body(), 30))


def _data(number: int, size: int, parts: int = 1) -> tuple:
    """A DATA message (relaycore.crossshard) of ``parts`` payloads, ``size``
    bytes in all, as the receiving bus decodes it (tuples)."""
    payload = number.to_bytes(4, "big") * (size // parts // 4)
    return (4, b"a" * 32, 1 << 32 | 1, b"b" * 32, 2 << 32 | 1, (payload,) * parts)


def test_one_turn_goes_as_one_batch_and_a_turn_past_the_batch_bound_is_split_in_order(
    tmp_path: Path,
) -> None:
    """The per-pair order holds across the batches a large turn is cut into,
    and no batch carries much more than MAX_BATCH_BYTES."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        context = zmq.Context()
        batches: list[list] = []
        done = asyncio.Event()
        expected = [0]

        def deliver(from_shard: int, batch: list) -> None:
            assert from_shard == 1
            batches.append(list(batch))
            if sum(map(len, batches)) >= expected[0]:
                done.set()

        one = PeerBus(tmp_path, 1, loop, lambda s, b: None, context)
        two = PeerBus(tmp_path, 2, loop, deliver, context)
        try:
            small = [_data(number, 100) for number in range(3)]
            expected[0] = 3
            one.send([(2, message) for message in small[:2]])
            one.send([(2, small[2])])  # the same turn
            await asyncio.wait_for(done.wait(), 5)
            assert batches == [small]
            assert one.stats["batches_sent"] == 1

            batches.clear()
            done.clear()
            large = [_data(number, 1024, parts=4) for number in range(300)]  # ~320 KiB
            expected[0] = len(large)
            one.send([(2, message) for message in large])
            await asyncio.wait_for(done.wait(), 5)
            assert [message for batch in batches for message in batch] == large
            assert len(batches) >= 5
            assert all(
                sum(_payload_size(m[-1]) for m in batch) <= MAX_BATCH_BYTES + 1024
                for batch in batches
            )
            assert one.stats["messages_sent"] == two.stats["messages_received"] == 303
        finally:
            one.close()
            two.close()
            context.term()

    uvloop.run(asyncio.wait_for(body(), 30))


def test_the_reader_is_woken_for_every_batch_with_nothing_else_happening(tmp_path: Path) -> None:
    """ZeroMQ's descriptor only signals a change: a reader that leaves a
    batch behind is never woken for it. More batches than one turn reads are
    waiting at once, then one more comes to an idle reader: all arrive."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        context = zmq.Context()
        received: list[int] = []
        arrived = asyncio.Event()

        def deliver(from_shard: int, batch: list) -> None:
            received.extend(message[0] for message in batch)
            arrived.set()

        two = PeerBus(tmp_path, 2, loop, deliver, context)
        raw = context.socket(zmq.PUSH)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(f"ipc://{tmp_path / 'shard-2.sock'}")
        try:
            waiting = 2 * RECEIVE_BATCHES_PER_TURN + 10
            for number in range(waiting):  # no await: all queue before the reader runs
                raw.send(msgpack.packb([1, [[number]]]))
            while len(received) < waiting:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 5)
            assert received == list(range(waiting))
            for number in range(waiting, waiting + 3):  # each to an idle reader
                await asyncio.sleep(0.05)
                arrived.clear()
                raw.send(msgpack.packb([1, [[number]]]))
                await asyncio.wait_for(arrived.wait(), 2)
            assert received == list(range(waiting + 3))
        finally:
            raw.close()
            two.close()
            context.term()

    uvloop.run(asyncio.wait_for(body(), 30))


class _Server:
    shard = 1

    def __init__(self) -> None:
        self.updates: list[tuple] = []

    def apply_map_updates(self, updates: list, now: float) -> None:
        self.updates.extend(updates)


class _Bus:
    def __init__(self) -> None:
        self.forgotten: list[int] = []

    def forget(self, shard: int) -> None:
        self.forgotten.append(shard)


def test_the_bus_forgets_a_shard_only_when_its_process_exited() -> None:
    """A shard dropped for silence (SIGSTOP, a stalled host) may come back
    with the same id (tests/cluster_process/test_faults.py, the shard stopped
    past the silence limit): its socket and what is queued in it stay."""
    member = ClusterMember.__new__(ClusterMember)  # the adapter's decision alone
    member.links, member.bus = _Server(), _Bus()  # type: ignore[assignment]
    member.apply_map_update((MapUpdate.DROP_SHARD, 2, False), 0.0)  # silent
    assert member.bus.forgotten == []  # type: ignore[attr-defined]
    member.apply_map_update((MapUpdate.DROP_SHARD, 1, True), 0.0)  # ourselves (seen as gone)
    assert member.bus.forgotten == []  # type: ignore[attr-defined]
    member.apply_map_update((MapUpdate.DROP_SHARD, 2, True), 0.0)  # exited
    assert member.bus.forgotten == [2]  # type: ignore[attr-defined]
    assert len(member.links.updates) == 3  # type: ignore[attr-defined]
